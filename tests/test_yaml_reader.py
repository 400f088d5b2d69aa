"""Reading hostile YAML: capped size, bounded depth and aliases, values that cannot be read."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import pytest

from deqcli.config import ConfigError, load_config, parse_config
from deqcli.yaml_reader import (
    MAX_ALIAS_EXPANSION,
    MAX_CONFIG_BYTES,
    MAX_DEPTH,
    load_document,
    read_capped,
)

DOTTIE = "problem: {kind: expression, fixed_point: cos(z), initial: 1.0}\n"


def billion_laughs(levels: int = 9) -> str:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for k in range(1, levels):
        refs = ",".join([f"*a{k - 1}"] * 9)
        lines.append(f"a{k}: &a{k} [{refs}]")
    return "\n".join(lines) + "\n" + DOTTIE


def test_a_billion_laughs_is_refused_where_it_starts_to_expand() -> None:
    # 9**9 values if expanded; refused at the first level beyond the limit (9**6 values), before
    # the levels that would take the time and the memory are even composed (bench/hostile.py
    # measures it: milliseconds).
    with pytest.raises(ConfigError, match=r"a5 \(line 6\): aliases expand this document by more"):
        parse_config(billion_laughs())


def test_aliases_that_only_share_values_still_work_and_keep_their_lines() -> None:
    value, lines = load_document("base: &b {x: 1, y: [1, 2]}\nother: *b\nlast:\n  deep: 3\n")
    assert value["other"] == {"x": 1, "y": [1, 2]}
    # The alias's own key has its line; nothing inside the alias is walked again.
    assert lines[("other",)] == 2 and lines[("last", "deep")] == 4
    assert ("other", "x") not in lines and lines[("base", "y")] == 1


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (
            "run: {atol: 1.0e-3}\nrun: {atol: 1.0e-9}\n",
            r"run \(line 2\): duplicate key \(also given at line 1;",
        ),
        (
            "run:\n  atol: 1.0e-3\n  max_iter: 5\n  atol: 1.0e-9\n",
            r"run\.atol \(line 4\): .* at line 2;",
        ),
        ("a: {b: 1, c: 2, b: 3}\n", r"a\.b \(line 1\): duplicate key \(also given at line 1;"),
    ],
)
def test_a_key_given_twice_in_one_mapping_is_refused(text: str, where: str) -> None:
    # YAML forbids it; PyYAML would silently keep the last value and lose the first.
    with pytest.raises(ConfigError, match=where + r" YAML would keep only the last\): keep one"):
        load_document(text)


def test_equal_keys_in_different_mappings_or_of_different_types_are_not_duplicates() -> None:
    value, _ = load_document("a: {x: 1}\nb: {x: 2}\nc: {1: int, '1': text}\n")
    assert value == {"a": {"x": 1}, "b": {"x": 2}, "c": {1: "int", "1": "text"}}
    # A merge key's values are overridden by the mapping's own keys, as YAML intends.
    value, _ = load_document("base: &b {atol: 1, max_iter: 5}\nrun:\n  <<: *b\n  atol: 2\n")
    assert value["run"] == {"atol": 2, "max_iter": 5}


def test_expansion_just_under_the_limit_is_accepted() -> None:
    chunk = "[" + ",".join(["1"] * 999) + "]"
    count = MAX_ALIAS_EXPANSION // 1000 - 1  # each alias adds 1000 values
    text = f"a: &a {chunk}\nb: [{','.join(['*a'] * count)}]\n"
    value, _ = load_document(text)
    assert len(value["b"]) == count and len(value["b"][0]) == 999


def test_a_recursive_alias_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"problem\.params\.a \(line 1\): alias \*p refers to"):
        parse_config("problem: &p {kind: expression, fixed_point: cos(z), params: {a: *p}}\n")
    with pytest.raises(ConfigError, match="recursive alias"):
        load_document("a: &x\n  <<: *x\n")


def test_deep_nesting_is_refused_before_any_recursive_code_sees_it() -> None:
    text = "problem: {a: " + "[" * 100_000 + "]" * 100_000 + "}\n"
    with pytest.raises(ConfigError, match=f"nested more than {MAX_DEPTH} levels"):
        load_document(text)
    # Just inside the limit is fine.
    value, _ = load_document("a: " + "[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1))
    assert value["a"] is not None


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ("!!float abc", r"cannot read this value \(could not convert string to float: 'abc'\)"),
        ("!!timestamp 2020-99-99", r"cannot read this value \(month must be in 1..12\)"),
        ("!!int 12ab", r"cannot read this value \(invalid literal"),
        ("9" * 5000, r"integer 999999999999…999999 \(5000 digits\) is out of range"),
        ("-9223372036854775809", "out of range"),
        ("!!python/object/apply:os.system ['echo hi']", "could not determine a constructor"),
    ],
)
def test_values_that_cannot_be_read_name_their_line(value: str, match: str) -> None:
    with pytest.raises(ConfigError, match=r"^run\.seed \(line 2\): .*" + match) as err:
        parse_config(
            f"problem: {{kind: expression, fixed_point: cos(z)}}\nrun: {{seed: {value}}}\n"
        )
    assert "\n" not in str(err.value)


def test_64_bit_integers_are_kept() -> None:
    cfg = parse_config(DOTTIE + "run: {seed: 9223372036854775807}\n")
    assert cfg.run.seed == 2**63 - 1


def test_set_refuses_huge_integers_and_deep_values() -> None:
    with pytest.raises(ConfigError, match=r"--set: integer .* \(5000 digits\) is out of range"):
        parse_config(DOTTIE, overrides=["run.max_iter=" + "9" * 5000])
    with pytest.raises(ConfigError, match="--set: YAML nested more than"):
        parse_config(DOTTIE, overrides=["problem.initial=" + "[" * 200 + "]" * 200])
    assert parse_config(DOTTIE, overrides=["run.atol=1." + "9" * 5000]).run.atol == 2.0


def test_several_documents_are_refused() -> None:
    with pytest.raises(
        ConfigError, match="expected a single YAML document, found another at line 2"
    ):
        parse_config(DOTTIE + "---\nb: 1\n")


def test_reads_are_capped(tmp_path: Path) -> None:
    assert read_capped(io.BytesIO(b"a: 1\n"), "x") == "a: 1\n"
    with pytest.raises(ConfigError, match="longer than 4 MiB"):
        read_capped(io.BytesIO(b"#" * (MAX_CONFIG_BYTES + 1)), "x")
    with pytest.raises(ConfigError, match="not UTF-8 text"):
        read_capped(io.BytesIO(b"\xff\xfe"), "x")
    if os.path.exists("/dev/zero"):
        with pytest.raises(ConfigError, match="'/dev/zero' is longer than"):
            load_config("/dev/zero")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_an_endless_fifo_is_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "endless.yaml"
    os.mkfifo(fifo)
    stop = threading.Event()

    def writer() -> None:
        # The reader closes its end once it has seen enough: the write, or the flush on close,
        # then meets a broken pipe, which is this test's expected ending.
        try:
            with open(fifo, "wb") as fh:
                while not stop.is_set():
                    fh.write(b"# endless\n" * 1000)
        except BrokenPipeError:
            pass

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    try:
        with pytest.raises(ConfigError, match="longer than 4 MiB"):
            load_config(fifo)
    finally:
        stop.set()
        thread.join(timeout=5)


def test_syntax_errors_keep_pyyaml_s_words_and_the_tab_hint() -> None:
    with pytest.raises(ConfigError, match=r"malformed YAML at line 2, column 1: .*tab"):
        parse_config("problem:\n\tkind: expression\n")
    with pytest.raises(ConfigError, match=r"line 1, column 19: expected ',' or '\]', but got '}'"):
        parse_config("problem: {a: [1, 2}\n")
