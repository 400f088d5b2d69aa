"""Fuzzing the promises: hostile configs, expressions, flags and output paths.

For every generated input: the config loader returns a Config or raises one ConfigError line;
the expression compiler returns or raises one ExpressionError line, its cost model never fails
and predicts the shape torch computes; and the command line, run in-process, exits with 0, 1 or 2,
prints no traceback, at most one stderr line for exit 2, and pure JSON on stdout with ``--json -``.
Resources stay bounded: every generated run gets small ``run.max_memory``/``run.max_work`` limits
and a ``run.timeout``, and hypothesis bounds the time per example. The hand-built hostile cases of
the hardening issue run through the same checks as explicit examples.

Profiles (``DEQ_FUZZ_PROFILE``): ``ci`` (the default: a few thousand examples, derandomised, well
under a minute) and ``long`` (25 times as many, random, no per-example deadline) for local runs:
``DEQ_FUZZ_PROFILE=long pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shlex
import tempfile
import textwrap
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from deqcli.config import ConfigError, parse_config
from deqcli.errors import DeqError
from deqcli.expr import FUNCTION_SPECS, ExpressionError, parse_expression
from deqcli.limits import Limits
from tests.conftest import CONFIGS, Run

PROFILE = os.environ.get("DEQ_FUZZ_PROFILE", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"DEQ_FUZZ_PROFILE must be ci or long, got {PROFILE!r}")
SCALE = 25 if PROFILE == "long" else 1


def fuzz(examples: int, deadline_s: float) -> settings:
    """Settings for one property: ``examples`` in CI (scaled in the long profile)."""
    return settings(
        max_examples=examples * SCALE,
        deadline=None if PROFILE == "long" else timedelta(seconds=deadline_s),
        derandomize=PROFILE == "ci",
        database=None,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            # The cli fixture holds no state between invocations.
            HealthCheck.function_scoped_fixture,
        ],
    )


# Bounds every generated run: small enough that no example can take the machine's memory or
# minutes of time, whatever it asks for.
BOUNDS = ["--set", "run.max_memory=256MiB", "--set", "run.max_work=1e7", "--set", "run.timeout=3"]


# -- hostile pieces --------------------------------------------------------------------------------

HOSTILE_SCALARS = [
    "0", "-1", "1", "2", "3", "0.5", "1e-3", "1.0e-300", "1.0e308", ".nan", "-.inf", ".inf",
    "9" * 5000, "-9223372036854775809", "9223372036854775807", "1." + "9" * 5000,
    "!!float abc", "!!timestamp 2020-99-99", "!!int 12ab", "!!binary 'a'", "!!str 3",
    "true", "null", "~", "''", '"[/]"', '"[red]x"', '":smile:"', "'\\t'", "\"\\x00\"",
    "!!python/object/apply:os.system ['true']", "*undefined", "[]", "{}", "[1, 2, 3]",
    "[[1, 0], [0, 1]]", "[[1, 2], [3]]", "{file: x.csv}", "{file: /dev/zero.npy}",
    "{random: normal}", "{random: orthogonal, scale: 0.5}", "{random: symmetric}",
    "cos(z)", "z**2 - 2", "sum(w**2)", "ones(n)", "eye(n) * 0.5", "'z[2:'", "__import__",
    "'sum(ones(20000,1)*ones(1,20000))'", "'ones(3000,3000) @ ones(3000,3000)'",
    "'[' * 100", "[" * 80 + "]" * 80, "&a [1, 2]", "&b {x: 1}",
]  # fmt: skip
KEYS = [
    "kind", "name", "dim", "batch", "input_dim", "W", "U", "b", "x", "initial", "fixed_point",
    "residual", "loss", "lr", "params", "batch_params", "target", "args", "form",
]  # fmt: skip
RUN_KEYS = [
    "atol", "rtol", "max_iter", "timeout", "dtype", "device", "seed", "keep_iterates",
    "divergence_factor", "history_limit", "stop_mode", "max_memory", "max_work", "check_every",
]  # fmt: skip
KINDS = ["tanh_layer", "expression", "gradient_descent", "python", "module", "other"]

scalars = st.sampled_from(HOSTILE_SCALARS)


@st.composite
def yaml_texts(draw: Callable) -> str:
    """A config as text: a problem mapping, maybe run and solver sections, hostile values,
    aliases and tags, sometimes a bomb or a deep nest."""
    kind = draw(st.sampled_from(KINDS))
    lines = ["problem:", f"  kind: {kind}"]
    for key in draw(st.lists(st.sampled_from(KEYS), max_size=6, unique=True)):
        if key in ("params", "batch_params", "args"):
            lines.append(f"  {key}:")
            for name in draw(
                st.lists(st.sampled_from(["a", "b", "W", "_x", "z", "n"]), max_size=3)
            ):
                lines.append(f"    {name}: {draw(scalars)}")
        elif key != "kind":
            lines.append(f"  {key}: {draw(scalars)}")
    if draw(st.booleans()):
        lines.append("run:")
        for key in draw(st.lists(st.sampled_from(RUN_KEYS), max_size=4, unique=True)):
            lines.append(f"  {key}: {draw(scalars)}")
    if draw(st.booleans()):
        name = draw(st.sampled_from(["fixed_point", "newton", "anderson", "nosuch", "'[/]'"]))
        lines.append(f"solver: {{name: {name}, m: {draw(scalars)}}}")
    extra = draw(st.sampled_from(["", "bomb", "recursive", "deep", "tab", "two docs", "merge"]))
    if extra == "bomb":
        lines = [
            'l0: &l0 ["x","x","x","x","x","x","x","x","x","x"]',
            *(f"l{k}: &l{k} [{','.join([f'*l{k - 1}'] * 10)}]" for k in range(1, 7)),
            *lines,
        ]
    elif extra == "recursive":
        lines.append("loop: &loop {again: *loop}")
    elif extra == "deep":
        lines.append("deep: " + "[" * 200 + "]" * 200)
    elif extra == "tab":
        lines.append("\tkey: 1")
    elif extra == "two docs":
        lines += ["---", "b: 1"]
    elif extra == "merge":
        lines += ["base: &base {atol: 1.0e-8}", "other:", "  <<: *base"]
    return "\n".join(lines) + "\n"


@fuzz(700, 5)
@given(text=yaml_texts())
@example(text="problem: &p {kind: expression, fixed_point: cos(z), params: {a: *p}}\n")
@example(text="a: !!float abc\n")
@example(text="problem: {kind: expression, fixed_point: cos(z), dim: 1000000000}\n")
def test_any_config_text_is_a_config_or_one_config_error(text: str) -> None:
    try:
        cfg = parse_config(text)
    except ConfigError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert cfg.problem.kind in KINDS


@fuzz(500, 5)
@given(text=st.text(max_size=300))
def test_arbitrary_text_as_a_config_never_escapes(text: str) -> None:
    try:
        parse_config(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)


# -- expressions: the compiler and the cost model ---------------------------------------------------

N = 3
VARIABLE_SHAPES: dict[str, tuple[int, ...]] = {"z": (N,), "W": (N, N), "v": (5,), "s": ()}
NUMBERS = ["0", "1", "2", "3", "n", "-1", "0.5", "1e308", "10**9", "2**64", "nan", "inf"]


def _call(name: str, args: list[str]) -> str:
    return f"{name}({', '.join(args)})"


@st.composite
def expressions(draw: Callable, depth: int = 0) -> str:
    """Random expressions over z, W, v, s and n, with the whole function table (right and wrong
    arities), operators, indexing and sizes from tiny to absurd."""
    leaf = st.sampled_from([*VARIABLE_SHAPES, *NUMBERS])
    if depth >= 3 or draw(st.integers(0, 3)) == 0:
        return draw(leaf)
    choice = draw(st.integers(0, 4))
    if choice == 0:
        op = draw(st.sampled_from(["+", "-", "*", "/", "**", "@", "%", "//", "<", "==", "&", "|"]))
        return f"({draw(expressions(depth + 1))} {op} {draw(expressions(depth + 1))})"
    if choice == 1:
        name = draw(st.sampled_from(sorted(FUNCTION_SPECS)))
        spec = FUNCTION_SPECS[name]
        high = spec.max_args if spec.max_args is not None else spec.min_args + 2
        count = draw(st.integers(max(0, spec.min_args - 1), high + 1))
        return _call(name, [draw(expressions(depth + 1)) for _ in range(count)])
    if choice == 2:
        index = draw(st.sampled_from(["0", "-1", "1:", ":2", "::-1", "0, 1", ":, 0", "n", "9"]))
        return f"{draw(expressions(depth + 1))}[{index}]"
    if choice == 3:
        return f"-{draw(expressions(depth + 1))}"
    return draw(st.sampled_from(["ones(n, n)", "eye(n)", "arange(n)", "zeros(2, n)", "diag(z)"]))


@fuzz(900, 5)
@given(text=expressions())
@example(text="sum(ones(20000,1)*ones(1,20000))")
@example(text="ones(3000,3000) @ ones(3000,3000)")
@example(text="outer(arange(100000), arange(100000))")
@example(text="9**9**9")
@example(text="zeros(1e308, 1e308)")  # found by the long profile: sizes beyond a float
@example(text="ones(1e308)[1:][0]")  # found by the long profile: a slice beyond a C ssize_t
def test_expressions_compile_cost_and_evaluate_within_their_limits(text: str) -> None:
    known = {**VARIABLE_SHAPES, "n": N}
    try:
        expr = parse_expression(text, key="problem.fixed_point", names=set(known))
    except ExpressionError as exc:
        assert "\n" not in str(exc)
        return
    cost = expr.cost(known)  # never raises, whatever the text
    try:
        Limits(max_memory=64 * 2**20, max_work=1e6).check_expression(expr, known)
    except ExpressionError as exc:
        assert "raise run.max_" in str(exc)
        return
    env = {
        name: torch.ones(shape, dtype=torch.float64) * 0.5
        for name, shape in VARIABLE_SHAPES.items()
    }
    try:
        out = expr.evaluate({**env, "n": N}, dtype=torch.float64, device="cpu")
    except ExpressionError as exc:
        assert "\n" not in str(exc)
        return
    # The cost model predicted the shape torch computed (where it knew it).
    if isinstance(cost.result, tuple) and all(d is not None for d in cost.result):
        assert tuple(out.shape) == cost.result, text
    elif isinstance(cost.result, (int, float)) and not isinstance(cost.result, bool):
        assert out.dim() == 0, text
        value = float(out)
        if math.isfinite(value) and math.isfinite(cost.result):
            assert math.isclose(value, cost.result, rel_tol=1e-12), text


# -- the command line, in-process --------------------------------------------------------------------

TEMPLATES = {
    "dottie": (CONFIGS / "dottie.yaml").read_text(),
    "sqrt2": (CONFIGS / "sqrt2.yaml").read_text(),
    "layer": textwrap.dedent(
        """
        problem: {kind: tanh_layer, name: layer, dim: 6, batch: 2,
                  W: {random: normal, seed: 0, spectral_norm: 0.8}, x: {random: normal, seed: 1}}
        run: {max_iter: 100}
        """
    ),
    "gd": (CONFIGS / "quadratic_lr.yaml").read_text(),
    "params": "problem: {kind: expression, name: p, fixed_point: 'a * cos(z)', initial: 1.0, "
    "params: {a: 0.9}}\nrun: {max_iter: 100}\n",
}
SOLVERS = [
    "fixed_point", "newton", "anderson", "broyden", "newton-krylov", "trust-region", "auto",
    "scipy:hybr", "scipy:df-sane", "scipy:anderson", "torchdeq:anderson", "nosuch", "[/]", "",
]  # fmt: skip
VALUES = [
    "0", "1", "-1", "2", "1e-8", "nan", "inf", "-inf", "1e400", "9" * 60, "abc", "", "[/]",
    "[1,2]", "{a: 1}", "cos(z)", "*x", "!!float x", "1000000000", "0.5",
]  # fmt: skip
SET_KEYS = [
    "run.atol", "run.max_iter", "run.timeout", "run.dtype", "run.seed", "run.keep_iterates",
    "run.check_every", "problem.dim", "problem.batch", "problem.initial", "problem.fixed_point", "problem.name",
    "problem.params.a", "solver.beta", "solver.m", "solver.name", "run", "problem", "",
]  # fmt: skip


@st.composite
def command_lines(draw: Callable) -> tuple[str, list[str]]:
    """(template, argv): a command over one of the configs with hostile flags and values."""
    template = draw(st.sampled_from(sorted(TEMPLATES)))
    command = draw(
        st.sampled_from(["validate", "solve", "solve", "gradcheck", "compare-solvers", "sweep"])
    )
    args = [command, "CONFIG"]
    value = st.sampled_from(VALUES)
    if command == "solve" and draw(st.booleans()):
        args += ["--no-diagnostics"]
    if command in ("solve", "gradcheck", "sweep") and draw(st.booleans()):
        args += ["--solver", draw(st.sampled_from(SOLVERS))]
    if command == "compare-solvers":
        names = draw(st.lists(st.sampled_from(SOLVERS[:10]), min_size=1, max_size=2))
        args += ["--solvers", ",".join(names), "--repeat", "1", "--warmup", "0"]
    if command == "gradcheck":
        args += [
            "--loss",
            draw(st.sampled_from(["sum(z**2)", "1.0", "z > 0", "sum(z)", "cos(", "[/]"])),
        ]
        args += ["--directions", "1"]
    if command == "sweep":
        spec = draw(
            st.sampled_from(["a=0.1:0.9:3", "a=[0.5,0.7]", "a=1:0:0", "nosuch=1,2", "a=x", "a"])
        )
        args += ["--param", spec]
    if command != "validate":
        for flag in draw(
            st.lists(
                st.sampled_from(["--tol", "--max-iter", "--seed", "--dtype"]),
                max_size=2,
                unique=True,
            )
        ):
            args += [flag, draw(value)]
        if draw(st.booleans()):
            args += [
                "--json",
                draw(
                    st.sampled_from(
                        ["-", "-", "OUT/r.json", "OUT/missing/r.json", "OUT", "OUT/" + "x" * 300]
                    )
                ),
            ]
    for _ in range(draw(st.integers(0, 2))):
        args += ["--set", f"{draw(st.sampled_from(SET_KEYS))}={draw(value)}"]
    if draw(st.integers(0, 9)) == 0:
        args.insert(
            draw(st.integers(0, len(args))), draw(st.sampled_from(["--bogus", "-x", "--json"]))
        )
    return template, args


def check_run(run: Run, args: list[str]) -> None:
    """The promises for one command line, whatever it was."""
    shown = shlex.join(args)
    assert run.exit_code in (0, 1, 2), (shown, run.exit_code, run.stderr[-2000:])
    assert "Traceback" not in run.stderr, (shown, run.stderr[-2000:])
    assert "╭" not in run.stderr, (shown, run.stderr[-2000:])  # no boxed error panels
    if run.exit_code == 2:  # exactly one line, not even a blank one around it
        assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1, (shown, run.stderr)
    json_to_stdout = any(a == "--json" and b == "-" for a, b in itertools.pairwise(args))
    if json_to_stdout:
        if run.exit_code == 2:
            assert run.stdout == "", (shown, run.stdout[:500])
        else:
            json.loads(run.stdout)  # pure JSON, nothing else


def run_line(cli: Callable[..., Run], template_text: str, args: list[str], folder: Path) -> Run:
    config = folder / "cfg.yaml"
    config.write_text(template_text)
    out = folder / "out"
    out.mkdir(exist_ok=True)
    argv = [str(config) if a == "CONFIG" else a.replace("OUT", str(out)) for a in args]
    return cli(*argv, *(BOUNDS if args[0] != "validate" else BOUNDS[:4]))


@fuzz(250, 30)
@given(line=command_lines())
def test_any_command_line_keeps_the_promises(cli, line: tuple[str, list[str]]) -> None:
    template, args = line
    with tempfile.TemporaryDirectory() as folder:
        run = run_line(cli, TEMPLATES[template], args, Path(folder))
    check_run(run, [*args, *BOUNDS])


@fuzz(300, 10)
@given(text=yaml_texts())
def test_any_config_through_validate_keeps_the_promises(cli, text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        run = run_line(cli, text, ["validate", "CONFIG"], Path(folder))
    check_run(run, ["validate", "CONFIG"])


# -- the hardening issue's cases, by hand ---------------------------------------------------------------

BOMB = "\n".join(
    ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    + [f"l{k}: &l{k} [{','.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 9)]
)
DOT = "problem: {kind: expression, fixed_point: cos(z), initial: 1.0}\n"

HOSTILE = [
    ("dim beyond memory", "problem: {kind: expression, fixed_point: cos(z), dim: 1000000000}\n", ["solve"], 2),
    ("batch beyond memory", "problem: {kind: tanh_layer, dim: 100000, W: 0.0, batch: 100000}\n", ["solve"], 2),
    ("seed out of range", DOT + "run: {seed: 1000000000000000000000000000000}\n", ["solve"], 2),
    ("random seed out of range", "problem: {kind: tanh_layer, dim: 4, W: {random: normal, seed: 100000000000000000000000}}\n", ["solve"], 2),
    ("5000 digits in the file", DOT + "run: {max_iter: " + "9" * 5000 + "}\n", ["solve"], 2),
    ("5000 digits in --set", DOT, ["solve", "--set", "run.max_iter=" + "9" * 5000], 2),
    ("recursive alias", "problem: &p {kind: expression, fixed_point: cos(z), params: {a: *p}}\n", ["validate"], 2),
    ("deep nesting", "problem: {kind: expression, fixed_point: cos(z), params: {a: " + "[" * 5000 + "]" * 5000 + "}}\n", ["validate"], 2),
    ("bad !!float", "problem: {kind: expression, fixed_point: cos(z), initial: !!float abc}\n", ["validate"], 2),
    ("bad !!timestamp", "problem: {kind: expression, fixed_point: cos(z), name: !!timestamp 2020-99-99}\n", ["validate"], 2),
    ("alias bomb", BOMB + "\n" + DOT, ["validate"], 2),
    ("infinite tolerance", DOT, ["solve", "--tol", "inf", "--json", "-"], 2),
    ("NaN tolerance", DOT, ["solve", "--set", "run.rtol=.nan", "--json", "-"], 2),
    ("infinite option", DOT, ["solve", "--set", "solver.beta=.inf", "--json", "-"], 2),
    ("markup in a name", DOT.replace("{kind", "{name: '[/]', kind"), ["solve"], 0),
    ("markup in a loss", "problem: {kind: gradient_descent, loss: 'sum(w**2)', lr: 0.1, dim: 2, initial: 1.0}\n", ["solve"], 0),
    ("gradcheck with a constant loss", "problem: {kind: expression, fixed_point: a*cos(z), initial: 1.0, params: {a: 1.0}}\n", ["gradcheck", "--loss", "1.0"], 2),
    ("gradcheck with a boolean loss", "problem: {kind: expression, fixed_point: a*cos(z), initial: 1.0, params: {a: 1.0}}\n", ["gradcheck", "--loss", "z > 0"], 2),
    ("gradcheck with zero budgets", "problem: {kind: expression, fixed_point: a*cos(z), initial: 1.0, params: {a: 1.0}}\n", ["gradcheck", "--unroll", "0", "--max-iter", "0", "--json", "-"], 1),
    ("gradcheck with zero directions", DOT, ["gradcheck", "--directions", "0"], 2),
    ("boolean loss", "problem: {kind: gradient_descent, loss: 'w[0] > 0', lr: 0.1, dim: 2}\n", ["solve"], 2),
    ("empty start", "problem: {kind: expression, fixed_point: cos(z), initial: []}\n", ["solve"], 2),
    ("string start", "problem: {kind: expression, fixed_point: cos(z), initial: 'abc'}\n", ["solve"], 2),
    ("empty string start", "problem: {kind: expression, fixed_point: cos(z), initial: ''}\n", ["solve"], 2),
    ("outer product of builders", DOT.replace("cos(z)", "'sum(ones(20000,1)*ones(1,20000))*0 + cos(z)'"), ["validate"], 2),
    ("3000x3000 matmul in the map", DOT.replace("cos(z)", "'sum(ones(3000,3000) @ ones(3000,3000))*0 + cos(z)'"), ["validate"], 2),
    ("torchdeq with max_iter 1e9", DOT, ["solve", "--solver", "torchdeq:broyden", "--max-iter", "1000000000", "--json", "-"], 0),
    ("a peer past run.timeout", "problem: {kind: tanh_layer, dim: 50, W: {random: normal, spectral_norm: 0.99999}}\nrun: {atol: 0, max_iter: 1000000000, timeout: 0.5}\n", ["solve", "--solver", "scipy:anderson", "--json", "-"], 1),
    ("an output name too long", DOT, ["solve", "--json", "OUT/" + "x" * 300], 2),
    ("an output folder that does not exist", DOT, ["solve", "--json", "OUT/missing/r.json"], 2),
    ("an output that is a folder", DOT, ["solve", "--json", "OUT"], 2),
    ("JSON to a device", DOT, ["solve", "--json", "/dev/null"], 0),
    ("a plot path that is wrong", DOT, ["compare-solvers", "--solvers", "fixed_point", "--repeat", "1", "--plot", "OUT/p.txt", "--json", "-"], 2),
    ("a config that cannot be built", "problem: {kind: expression, fixed_point: log(z), initial: -1.0}\n", ["compare-solvers", "--solvers", "fixed_point", "--repeat", "1", "--json", "-"], 1),
    ("code without consent", "problem: {kind: python, target: 'os:system', args: {command: 'true'}}\n", ["solve"], 2),
    ("an unknown flag", DOT, ["solve", "--jsn", "-"], 2),
]  # fmt: skip


@pytest.mark.parametrize(
    ("config", "args", "code"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE]
)
def test_the_issue_s_hostile_inputs(
    cli, tmp_path: Path, config: str, args: list[str], code: int
) -> None:
    if "torchdeq" in " ".join(args):
        pytest.importorskip("torchdeq")
    run = run_line(cli, config, [args[0], "CONFIG", *args[1:]], tmp_path)
    check_run(run, args)
    assert run.exit_code == code, (run.exit_code, run.stderr)


def test_dev_zero_and_a_missing_config_are_one_line(cli) -> None:
    for path in ("/dev/zero", "/nonexistent/cfg.yaml"):
        if os.path.exists("/dev/zero") or path != "/dev/zero":
            run = cli("validate", path)
            check_run(run, ["validate", path])
            assert run.exit_code == 2


def test_consent_refusal_is_a_usage_error_in_every_command(
    cli, tmp_path: Path, monkeypatch
) -> None:
    monkeypatch.delenv("DEQ_TRUST_CODE", raising=False)
    config = tmp_path / "code.yaml"
    config.write_text("problem: {kind: python, target: 'os:system', args: {command: 'true'}}\n")
    for args in (
        ["solve", config],
        ["gradcheck", config],
        ["sweep", config, "--param", "command=[a,b]"],
        ["compare-solvers", config, "--solvers", "fixed_point"],
    ):
        run = cli(*args, "--json", "-")
        check_run(run, [*map(str, args), "--json", "-"])
        assert run.exit_code == 2 and "--trust-code" in run.stderr and run.stdout == ""


def test_loader_errors_are_our_own_kind() -> None:
    # Whatever the loader refuses, it refuses as a DeqError (the CLI's one line, exit 2).
    for text in (BOMB, "a: " + "[" * 100000, "\x00", "a: !!omap [x]"):
        with pytest.raises(DeqError):
            parse_config(text)
