"""Nothing lost: output paths checked before the solve, written safely, kept when a write fails;
text from configs shown as written."""

from __future__ import annotations

import errno
import json
import os
import stat
import threading
from pathlib import Path

import numpy as np
import pytest

from deqcli import interrupt
from deqcli.render import files
from tests.conftest import CONFIGS, one_line_error

DOTTIE = CONFIGS / "dottie.yaml"


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_new_files_honour_the_umask(cli, tmp_path: Path, umask_027: int) -> None:
    out = tmp_path / "result.json"
    assert cli("solve", DOTTIE, "--json", out, "--quiet").exit_code == 0
    assert _mode(out) == 0o640  # 0666 & ~027, not 0600
    schema = tmp_path / "schema.json"
    assert cli("schema", "--output", schema).exit_code == 0
    assert _mode(schema) == 0o640


def test_a_replaced_file_keeps_its_mode(cli, tmp_path: Path) -> None:
    out = tmp_path / "result.json"
    out.write_text("old")
    out.chmod(0o604)
    assert cli("solve", DOTTIE, "--json", out, "--quiet").exit_code == 0
    assert _mode(out) == 0o604 and json.loads(out.read_text())["status"] == "converged"


def test_a_symlink_is_followed_and_stays_a_symlink(cli, tmp_path: Path) -> None:
    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    assert cli("solve", DOTTIE, "--json", link, "--quiet").exit_code == 0
    assert link.is_symlink() and json.loads(target.read_text())["status"] == "converged"


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_a_fifo_is_written_in_place_not_replaced(cli, tmp_path: Path) -> None:
    fifo = tmp_path / "out.json"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()), daemon=True)
    reader.start()
    assert cli("solve", DOTTIE, "--json", fifo, "--quiet").exit_code == 0
    reader.join(timeout=60)
    assert stat.S_ISFIFO(fifo.stat().st_mode)  # still the FIFO the reader opened
    assert json.loads(received[0])["status"] == "converged"


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("x" * 300 + ".json", "the file name is 305 bytes long; the limit is 255"),
        ("missing/out.json", "directory 'DIR/missing' does not exist"),
        ("plain/out.json", "'DIR/plain' is not a directory"),
        ("folder", "is a directory; give a file path"),
    ],
)
def test_output_paths_are_checked_before_solving(
    cli, tmp_path: Path, monkeypatch, name: str, fragment: str
) -> None:
    (tmp_path / "plain").write_text("a file, not a folder")
    (tmp_path / "folder").mkdir()
    from deqcli import api

    def never(*args, **kwargs):
        raise AssertionError("solved before the output path was checked")

    monkeypatch.setattr(api, "solve", never)
    one_line_error(
        cli("solve", DOTTIE, "--json", tmp_path / name),
        "--json",
        fragment.replace("DIR", str(tmp_path)),
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_a_read_only_folder_is_refused_before_solving(cli, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        one_line_error(cli("solve", DOTTIE, "--json", folder / "x.json"), "is not writable")
    finally:
        folder.chmod(0o755)


def test_a_write_that_fails_after_the_solve_keeps_the_result(cli, tmp_path, monkeypatch) -> None:
    def disk_full(target: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files, "write_text", disk_full)
    monkeypatch.setattr(files.tempfile, "tempdir", str(tmp_path))
    line = one_line_error(
        cli("solve", DOTTIE, "--json", tmp_path / "result.json"),
        "--json: cannot write",
        "No space left on device",
        "it was written to",
    )
    kept = Path(line.split("it was written to ")[1].removesuffix(" instead"))
    assert kept.parent == tmp_path and kept.suffix == ".json"
    assert json.loads(kept.read_text())["status"] == "converged"


def test_the_fallback_is_stdout_when_no_file_can_be_written(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(files.tempfile, "tempdir", str(tmp_path / "gone"))
    where = files.fallback("the text\n", tmp_path / "x.json")
    assert where == "it follows on stdout instead" and capsys.readouterr().out == "the text\n"


# -- compare-solvers -----------------------------------------------------------------------------


def test_a_plot_that_fails_does_not_cost_the_json(cli, tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("matplotlib")
    from deqcli.render import plots

    def broken(problem, path):
        raise ValueError("Format 'png' is not supported by this backend")

    monkeypatch.setattr(plots, "plot_problem", broken)
    out = tmp_path / "c.json"
    run = cli(
        "compare-solvers", DOTTIE, "--solvers", "fixed_point", "--repeat", "1", "--warmup", "0",
        "--json", out, "--plot", tmp_path / "p.png", "--quiet",
    )  # fmt: skip
    one_line_error(run, "--plot: cannot write it", "not supported")
    assert json.loads(out.read_text())["problems"][0]["solved_by"] == ["fixed_point"]


def test_a_config_whose_problem_cannot_be_built_is_an_error_row(cli, write_config) -> None:
    broken = write_config(
        "problem: {kind: expression, name: bad-log, fixed_point: log(z), initial: -1.0}\n",
        name="bad.yaml",
    )
    run = cli(
        "compare-solvers", broken, DOTTIE, "--solvers", "fixed_point,newton", "--repeat", "1",
        "--warmup", "0", "--json", "-",
    )  # fmt: skip
    assert run.exit_code == 1, run.stderr  # bad-log was solved by no solver
    doc = json.loads(run.stdout)
    bad, dottie = doc["problems"]
    assert [row["status"] for row in bad["solvers"]] == ["error", "error"]
    assert "could not be built: problem.fixed_point: is not finite" in bad["solvers"][0]["message"]
    assert sorted(dottie["solved_by"]) == ["fixed_point", "newton"]
    assert doc["complete"] is True and doc["interrupted"] is False


def test_ctrl_c_in_compare_writes_what_finished_marked_partial(
    cli, tmp_path: Path, monkeypatch
) -> None:
    from deqcli.analyses import compare

    real = compare._compare_one
    calls = []

    def second_is_interrupted(*args, **kwargs):
        calls.append(args[0])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "_compare_one", second_is_interrupted)
    monkeypatch.setattr(interrupt, "_announced", False)
    out = tmp_path / "c.json"
    run = cli(
        "compare-solvers", DOTTIE, CONFIGS / "sqrt2.yaml", "--solvers", "newton", "--repeat", "1",
        "--json", out, "--quiet",
    )  # fmt: skip
    assert run.exit_code == 130
    lines = run.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "interrupted: the comparison is partial (1 problem"
    )
    doc = json.loads(out.read_text())
    assert doc["interrupted"] is True and doc["complete"] is False
    assert [p["name"] for p in doc["problems"]] == ["dottie"]


# -- no output replaces an input or another output ----------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["solve", "c.yaml", "--json", "W.npy"],
        ["solve", "c.yaml", "--save", "W.npy"],
        ["gradcheck", "c.yaml", "--json", "W.npy"],
        ["sweep", "c.yaml", "--param", "problem.b=0,0.1", "--json", "W.npy"],
        ["sweep", "c.yaml", "--param", "problem.b=0,0.1", "--results", "W.npy"],
        ["compare-solvers", "c.yaml", "--solvers", "newton", "--csv", "W.npy"],
        ["compare-solvers", "c.yaml", "--solvers", "newton", "--save-baseline", "W.npy"],
    ],
)
def test_no_output_replaces_a_file_the_config_reads(
    cli, tmp_path: Path, monkeypatch, args: list[str]
) -> None:
    np.save(tmp_path / "W.npy", 0.3 * np.eye(3))
    weights = (tmp_path / "W.npy").read_bytes()
    (tmp_path / "c.yaml").write_text("problem: {kind: tanh_layer, dim: 3, W: {file: W.npy}}\n")
    monkeypatch.chdir(tmp_path)
    one_line_error(cli(*args), f"{args[-2]}: refusing to overwrite the input file 'W.npy'")
    assert (tmp_path / "W.npy").read_bytes() == weights


def test_no_output_replaces_the_config_s_python_code(cli, tmp_path: Path, monkeypatch) -> None:
    code = "import torch\ndef make():\n    return (lambda z: 0.5 * z), torch.zeros(2)\n"
    (tmp_path / "model.py").write_text(code)
    (tmp_path / "c.yaml").write_text("problem: {kind: python, target: model.py:make}\n")
    monkeypatch.chdir(tmp_path)
    run = cli("solve", "c.yaml", "--trust-code", "--json", "model.py")
    one_line_error(run, "--json: refusing to overwrite the input file 'model.py'")
    assert (tmp_path / "model.py").read_text() == code


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["solve", DOTTIE, "--save", "z.npy", "--json", "z.npy"], "--save: 'z.npy' is also"),
        (["solve", DOTTIE, "--save", "z.npy", "--json", "./z.npy"], "--save: 'z.npy' is also"),
        (
            ["compare-solvers", DOTTIE, "--json", "x.json", "--csv", "x.json"],
            "--csv: 'x.json' is also the --json file",
        ),
        (
            ["compare-solvers", DOTTIE, "--csv", "x.json", "--save-baseline", "x.json"],
            "--save-baseline: 'x.json' is also the --csv file",
        ),
        (
            ["sweep", DOTTIE, "-p", "run.seed=1,2", "--csv", "x.json", "--json", "x.json"],
            "--csv: 'x.json' is also the --json file",
        ),
        (
            ["sweep", DOTTIE, "-p", "run.seed=1,2", "--json", "x.json", "--results", "x.json"],
            "--results: 'x.json' is also the --json file",
        ),
    ],
)
def test_two_outputs_of_one_command_may_not_name_one_file(
    cli, tmp_path: Path, monkeypatch, args: list, fragment: str
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.json").write_text("kept")
    one_line_error(cli(*args), fragment, "give each output its own path")
    assert (tmp_path / "x.json").read_text() == "kept" and not (tmp_path / "z.npy").exists()


def test_outputs_may_share_a_device(cli) -> None:
    run = cli(
        "compare-solvers", DOTTIE, "--solvers", "fixed_point", "--repeat", "1", "--warmup", "0",
        "--json", "/dev/null", "--csv", "/dev/null", "--quiet",
    )  # fmt: skip
    assert run.exit_code == 0, run.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["solve", DOTTIE, "--json="],
        ["solve", DOTTIE, "--save="],
        ["gradcheck", CONFIGS / "tanh_layer.yaml", "--json="],
        ["compare-solvers", DOTTIE, "--csv="],
        ["schema", "--file="],
    ],
)
def test_an_empty_output_path_is_refused(cli, tmp_path: Path, monkeypatch, args: list) -> None:
    # An empty path is '.', the current folder: --json "$UNSET" must not write JSON to stdout
    # (as '-' does) nor anything into the folder.
    monkeypatch.chdir(tmp_path)
    one_line_error(cli(*args), "the path is empty; give a file path")
    assert list(tmp_path.iterdir()) == []


# -- text from configs is shown as written -------------------------------------------------------------


def test_markup_in_names_paths_and_losses_is_printed_as_written(cli, tmp_path: Path) -> None:
    cfg = tmp_path / "[red]x.yaml"
    cfg.write_text(
        "problem: {kind: expression, name: '[/]', fixed_point: a * cos(z), initial: 1.0,\n"
        "          params: {a: 1.0}}\nrun: {atol: 1.0e-12}\n"
    )
    solved = cli("solve", cfg)
    assert solved.exit_code == 0 and "[/]" in solved.stdout
    assert "[red]x.yaml: " in cli("validate", cfg).stdout
    compared = cli("compare-solvers", cfg, "--solvers", "fixed_point", "--repeat", "1")
    assert compared.exit_code == 0 and "[/]" in compared.stdout
    checked = cli("gradcheck", cfg, "--loss", "sum(z**2) + :smile:")
    one_line_error(checked, "--loss", "':'")
    graded = cli("gradcheck", cfg, "--loss", "sum(z**2)")
    assert graded.exit_code == 0 and "sum(z**2)" in graded.stdout
    missing = cli("solve", tmp_path / "[bold]nothing.yaml")
    one_line_error(missing, "[bold]nothing.yaml")
