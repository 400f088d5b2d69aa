"""`deq` end to end: exit codes, stdout/stderr separation, JSON, bad input, no torch for non-solving commands."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from deqcli.cli import app
from tests.conftest import CONFIGS, ROOT
from tests.conftest import one_line_error as _one_line_error

DOTTIE = 0.7390851332151607


def test_solve_reports_and_exits_zero(cli) -> None:
    run = cli("solve", CONFIGS / "dottie.yaml")
    assert run.exit_code == 0
    assert "converged" in run.stdout and "dottie" in run.stdout
    assert run.stderr == ""


def test_json_to_stdout_is_the_only_output(cli) -> None:
    run = cli("solve", CONFIGS / "sqrt2.yaml", "--json", "-")
    assert run.exit_code == 0
    doc = json.loads(run.stdout)
    assert doc["schema_version"] == "1"
    assert doc["status"] == "converged" and doc["converged"] is True
    assert doc["solver"] == "newton" and doc["iterations"] <= 6
    assert doc["samples"][0]["solution"][0] == pytest.approx(math.sqrt(2), abs=1e-14)
    assert doc["njev"] == doc["iterations"]
    assert len(doc["history"]["residual"]) == doc["iterations"] + 1


def test_json_file_and_report_together(cli, tmp_path) -> None:
    out = tmp_path / "result.json"
    run = cli("solve", CONFIGS / "dottie.yaml", "--json", out)
    assert run.exit_code == 0 and "converged" in run.stdout
    doc = json.loads(out.read_text())
    assert doc["samples"][0]["solution"][0] == pytest.approx(DOTTIE, abs=1e-11)


def test_not_converging_exits_one_with_the_reason(cli) -> None:
    run = cli("solve", CONFIGS / "dottie.yaml", "--max-iter", "5")
    assert run.exit_code == 1
    assert "max_iter" in run.stdout


def test_flags_override_the_config(cli) -> None:
    run = cli(
        "solve",
        CONFIGS / "dottie.yaml",
        "--solver",
        "newton",
        "--tol",
        "1e-13",
        "--dtype",
        "float64",
        "--set",
        "problem.initial=0.5",
        "--json",
        "-",
    )
    doc = json.loads(run.stdout)
    assert run.exit_code == 0 and doc["solver"] == "newton"
    assert doc["tolerance"]["atol"] == 1e-13
    assert doc["samples"][0]["solution"][0] == pytest.approx(DOTTIE, abs=1e-13)


def test_float32_run(cli) -> None:
    args = ("solve", CONFIGS / "tanh_layer.yaml", "--dtype", "float32", "--json", "-")
    doc = json.loads(cli(*args, "--tol", "1e-5").stdout)
    assert doc["dtype"] == "float32" and doc["status"] == "converged"
    assert doc["tolerance"]["atol"] == 1e-5
    # The file asks for atol 1e-10, which float32 cannot resolve: say so rather than just fail.
    doc = json.loads(cli(*args, "--max-iter", "50").stdout)
    assert any("below what float32 can resolve" in note for note in doc["notes"])
    # Samples that stopped short of 1e-10 reached float32's precision floor: the verdict says so,
    # and no further iteration can help (stalled, not max_iter).
    stopped = [s for s in doc["samples"] if s["status"] != "converged"]
    assert stopped and doc["status"] == "stalled"
    for sample in stopped:
        diag = sample["diagnostics"]
        assert diag["classification"] == "precision_floor" and sample["status"] == "stalled"
        assert diag["evidence"]["dtype"] == "float32"
        assert sample["residual"] <= diag["evidence"]["floor"]


def test_relative_stop_mode_needs_no_absolute_floor(cli) -> None:
    # torchdeq's rule ‖f(z) − z‖/‖f(z)‖ ≤ rtol with atol 0 is resolvable in float32: no warning.
    args = ("solve", CONFIGS / "tanh_layer.yaml", "--dtype", "float32", "--no-diagnostics")
    args += ("--set", "problem.batch=2", "--json", "-")
    rel = ("--set", "run.stop_mode=rel", "--tol", "0", "--rtol")
    doc = json.loads(cli(*args, *rel, "1e-4").stdout)
    assert doc["status"] == "converged" and doc["notes"] == []
    assert doc["relative_residual"] <= 1e-4
    doc = json.loads(cli(*args, *rel, "1e-9", "--max-iter", "50").stdout)
    assert any("rtol 1e-09 is below what float32 can resolve" in n for n in doc["notes"])


def test_quiet_prints_nothing(cli) -> None:
    run = cli("solve", CONFIGS / "dottie.yaml", "--quiet")
    assert run.exit_code == 0 and run.stdout == "" and run.stderr == ""


def test_gradient_descent_reaches_the_least_squares_solution(cli) -> None:
    doc = json.loads(cli("solve", CONFIGS / "gradient_descent.yaml", "--json", "-").stdout)
    X = np.array([[1.0, 0.0, 1.0], [0.0, 2.0, 0.0], [1.0, 1.0, 0.0], [0.0, 1.0, 3.0]])
    y = np.array([1.0, 2.0, 3.0, 4.0])
    expected = np.linalg.lstsq(X, y, rcond=None)[0]
    np.testing.assert_allclose(doc["samples"][0]["solution"], expected, atol=1e-8)


def test_linear_config_hits_the_exact_solution(cli) -> None:
    doc = json.loads(cli("solve", CONFIGS / "linear.yaml", "--json", "-").stdout)
    n = 5
    A = np.outer(np.arange(1, n + 1), np.ones(n)) / (2 * n * n)
    c = np.linspace(0, 1, n)
    np.testing.assert_allclose(
        doc["samples"][0]["solution"], np.linalg.solve(np.eye(n) - A, c), atol=1e-11
    )


def test_tanh_layer_batch_solutions_satisfy_the_layer(cli, tmp_path) -> None:
    np.save(tmp_path / "W.npy", np.diag([0.5, -0.3, 0.2]))
    cfg = tmp_path / "layer.yaml"
    cfg.write_text(
        "problem:\n  kind: tanh_layer\n  dim: 3\n  W: {file: W.npy}\n  x: [[1, 0, 0], [0, 2, -1]]\n"
        "  b: [0.1, 0.1, 0.1]\n  batch: 2\nrun: {atol: 1e-12}\n"
    )
    doc = json.loads(cli("solve", cfg, "--json", "-").stdout)
    assert doc["converged_samples"] == 2
    z = np.array([s["solution"] for s in doc["samples"]])
    W = np.diag([0.5, -0.3, 0.2])
    x = np.array([[1, 0, 0], [0, 2, -1]])
    np.testing.assert_allclose(z, np.tanh(z @ W.T + x + 0.1), atol=1e-12)


def test_python_kind_runs_user_code(cli) -> None:
    doc = json.loads(
        cli("solve", CONFIGS / "python_map.yaml", "--trust-code", "--json", "-").stdout
    )
    assert doc["status"] == "converged" and doc["batch"] == 3
    a = np.linspace(0.2, 0.8, 4)
    for sample in doc["samples"]:
        z = np.array(sample["solution"])
        np.testing.assert_allclose(z, a * np.cos(z) + 0.25, atol=1e-11)


def test_bad_input_is_one_line_and_exit_two(cli, write_config) -> None:
    _one_line_error(cli("solve", write_config("problem: [unclosed\n")), "malformed YAML at line")
    _one_line_error(
        cli(
            "solve",
            write_config("problem: {kind: expression, fixed_point: z, initial: 0, dimm: 2}\n"),
        ),
        "problem.dimm",
        "did you mean 'dim'",
    )
    _one_line_error(
        cli("solve", write_config("problem: {kind: expression, fixed_point: z, dim: two}\n")),
        "problem.dim",
        "integer",
    )
    _one_line_error(
        cli(
            "solve",
            write_config("problem: {kind: expression, fixed_point: cosh(zz), initial: 0}\n"),
        ),
        "problem.fixed_point",
        "unknown name 'zz'",
        "did you mean 'z'",
    )
    _one_line_error(
        cli(
            "solve",
            write_config("problem: {kind: expression, fixed_point: frobnicate(z), initial: 0}\n"),
        ),
        "unknown function 'frobnicate'",
    )
    _one_line_error(
        cli("solve", write_config("problem: {kind: expression, fixed_point: 1 / z, initial: 0}\n")),
        "problem.fixed_point",
        "not finite at the initial point",
    )
    _one_line_error(
        cli(
            "solve",
            write_config("problem: {kind: expression, fixed_point: a * z, params: {a: 1/0}}\n"),
        ),
        "problem.params.a",
        "inf or NaN",
    )
    _one_line_error(
        cli("solve", write_config("problem: {kind: tanh_layer, dim: 2, W: {file: missing.npy}}\n")),
        "problem.W",
        "missing.npy",
        "does not exist",
    )
    _one_line_error(cli("solve", CONFIGS / "nothing-here.yaml"), "does not exist")
    _one_line_error(
        cli("solve", CONFIGS / "dottie.yaml", "--solver", "newtn"),
        "unknown solver 'newtn'",
        "newton",
    )
    _one_line_error(
        cli("solve", CONFIGS / "dottie.yaml", "--set", "solver.betta=1"), "solver.betta", "beta"
    )
    _one_line_error(
        cli("solve", CONFIGS / "dottie.yaml", "--device", "tpu"), "run.device", "unknown device"
    )
    _one_line_error(cli("solve", CONFIGS / "dottie.yaml", "--dtype", "half"), "run.dtype")


def _fifo(path: Path) -> None:
    """A FIFO with no writer: reading it would wait forever. A daemon thread opens it for writing
    and closes it at once, so that a read that was not refused ends (at EOF) instead of hanging."""
    os.mkfifo(path)
    threading.Thread(target=lambda: open(path, "wb").close(), daemon=True).start()


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (_fifo, "'W.npy' is not a regular file"),
        (lambda path: path.mkdir(), "'W.npy' is a directory"),
        (lambda path: path.write_bytes(b""), "cannot read 'W.npy': the file is empty"),
    ],
)
def test_an_array_file_that_is_not_a_readable_file_is_bad_input(
    cli, write_config, make: Callable[[Path], None], fragment: str
) -> None:
    cfg = write_config("problem: {kind: tanh_layer, dim: 2, W: {file: W.npy}}\n")
    make(cfg.parent / "W.npy")
    if "empty" not in fragment:  # deq validate checks the file without reading it
        _one_line_error(cli("validate", cfg), "problem.W", fragment)
    _one_line_error(cli("solve", cfg), "problem.W", fragment)


def test_array_files_without_a_usable_array_are_bad_input(cli, write_config) -> None:
    import torch

    cfg = write_config("problem: {kind: tanh_layer, dim: 2, W: {file: W.pt}}\n")
    torch.save({"epoch": 3}, cfg.parent / "W.pt")
    _one_line_error(cli("solve", cfg), "problem.W", "'W.pt' holds no arrays")
    torch.save((0.3 * torch.eye(2)).to_sparse(), cfg.parent / "W.pt")
    _one_line_error(cli("solve", cfg), "problem.W", "sparse_coo tensor; save it dense")


def test_shape_mismatch_names_the_key(cli, write_config) -> None:
    _one_line_error(
        cli("solve", write_config("problem: {kind: tanh_layer, dim: 3, W: [[1, 0], [0, 1]]}\n")),
        "problem.W",
        "expected shape (3, 3)",
    )


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_unavailable_cuda_is_an_error_not_a_fallback(cli) -> None:
    _one_line_error(
        cli("solve", CONFIGS / "dottie.yaml", "--device", "cuda"),
        "run.device",
        "CUDA is not available",
    )


def test_debug_shows_a_traceback(cli) -> None:
    run = cli("solve", CONFIGS / "dottie.yaml", "--solver", "nope", "--debug")
    assert run.exit_code == 2 and "Traceback" in run.stderr


def test_json_never_overwrites_the_config(cli, tmp_path) -> None:
    cfg = tmp_path / "dottie.yaml"
    original = (CONFIGS / "dottie.yaml").read_text()
    cfg.write_text(original)
    _one_line_error(cli("solve", cfg, "--json", cfg), "refusing to overwrite")
    assert cfg.read_text() == original


def test_validate_schema_and_list_solvers(cli, write_config) -> None:
    ok = cli("validate", CONFIGS / "dottie.yaml", CONFIGS / "sqrt2.yaml")
    assert ok.exit_code == 0 and ok.stdout.count("ok") == 2
    _one_line_error(
        cli("validate", write_config("problem: {kind: tanh_layer, dim: 2, W: {file: nope.npy}}\n")),
        "nope.npy",
    )
    _one_line_error(
        cli("validate", CONFIGS / "dottie.yaml", "--set", "solver.beta=3"), "solver.beta", "(0, 2)"
    )
    schema = json.loads(cli("schema").stdout)
    assert schema["title"] == "deq configuration"
    listing = cli("list-solvers").stdout
    assert "fixed_point" in listing and "newton" in listing


def test_help_mentions_exit_codes(cli) -> None:
    out = cli("--help").stdout
    assert "Exit codes" in out and "solve" in out


RUN_FLAGS = ["--tol", "--atol", "--rtol", "--max-iter", "--device", "--dtype", "--seed", "--set"]


@pytest.mark.parametrize(
    ("command", "has_solver"),
    [("solve", True), ("sweep", True), ("gradcheck", True), ("compare-solvers", False)],
)
def test_solving_commands_share_the_run_flags(cli, command: str, has_solver: bool) -> None:
    out = cli(command, "--help").stdout
    assert all(flag in out for flag in RUN_FLAGS), out
    assert ("--solver " in out) is has_solver


def test_run_flags_reach_every_solving_command(cli) -> None:
    limit = ("--max-iter", "2", "--set", "run.atol=1e-15", "--json", "-")
    sweep = json.loads(cli("sweep", CONFIGS / "dottie.yaml", "-p", "run.rtol=0", *limit).stdout)
    assert sweep["points"][0]["status"] == "max_iter"
    compare = cli("compare-solvers", CONFIGS / "dottie.yaml", "--solvers", "newton", *limit)
    row = json.loads(compare.stdout)["problems"][0]["solvers"][0]
    assert compare.exit_code == 1 and row["status"] == "max_iter" and row["iterations"] == 2


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["solve", "--help"],
        ["validate", "configs/dottie.yaml"],
        ["schema"],
        ["schema", "--output", "solve"],
        ["list-solvers"],
        ["--show-completion"],
    ],
)
def test_commands_that_solve_nothing_do_not_import_torch(args: list[str]) -> None:
    code = (
        "import sys\nfrom deqcli.cli import app\n"
        f"try:\n    app({args!r}, prog_name='deq')\nexcept SystemExit as e:\n    code = e.code\n"
        "assert code in (0, None), code\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True
    )
    assert out.stdout.strip().endswith("NO-TORCH"), out.stdout[-500:]


def test_python_dash_m_runs_the_cli() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "deqcli", "solve", "configs/sqrt2.yaml", "--json", "-"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0 and json.loads(out.stdout)["status"] == "converged"


def test_error_text_is_not_rich_markup(cli, write_config) -> None:
    cfg = write_config("problem: {kind: tanh_layer, dim: 2, W: {random: symmetric}}\n")
    _one_line_error(cli("solve", cfg), "problem.W", "eigenvalues: [lo, hi]")


def test_python_factory_failures_are_bad_input(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("DEQ_TRUST_CODE", "1")
    (tmp_path / "broken.py").write_text(
        "def make(scale):\n    raise RuntimeError(f'no map at {scale}')\n"
    )
    cfg = tmp_path / "user.yaml"
    cfg.write_text("problem: {kind: python, target: broken.py:make, args: {scale: 1e-3}}\n")
    # 1e-3 reaches the factory as a number even though YAML 1.1 reads it as text.
    _one_line_error(cli("solve", cfg), "problem.args", "RuntimeError: no map at 0.001")
    missing = tmp_path / "missing.yaml"
    missing.write_text("problem: {kind: python, target: nowhere.py:make}\n")
    _one_line_error(cli("validate", missing), "problem.target", "nowhere.py")


def test_schema_accepts_the_solver_shorthand_and_writes_to_stdout(cli) -> None:
    schema = json.loads(cli("schema", "--output", "-").stdout)
    kinds = [option.get("type") for option in schema["properties"]["solver"]["anyOf"]]
    assert "string" in kinds


# -- everyday use: stdin, version, completion, help, monitor --------------------------------------


def test_config_from_stdin_resolves_paths_against_the_working_directory(
    tmp_path, monkeypatch
) -> None:
    np.save(tmp_path / "c.npy", np.array([2.0]))
    monkeypatch.chdir(tmp_path)
    text = (
        "problem: {kind: expression, residual: z**2 - c, params: {c: {file: c.npy}}, "
        "initial: 1.0}\nrun: {atol: 1.0e-12}\n"
    )
    res = CliRunner().invoke(app, ["solve", "-", "--json", "-"], input=text)
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    # No solver named: a residual is solved by Newton's method.
    assert doc["problem"] == "stdin" and doc["solver"] == "newton"
    assert doc["samples"][0]["solution"][0] == pytest.approx(math.sqrt(2), abs=1e-14)


def test_config_from_stdin_errors_name_stdin() -> None:
    text = "problem: {kind: expression, fixed_point: cos(z), initial: [1.0\n"
    res = CliRunner().invoke(app, ["solve", "-"], input=text)
    assert res.exit_code == 2 and "stdin: malformed YAML at line" in res.stderr


def test_version_prints_the_package_version() -> None:
    import deqcli

    res = CliRunner().invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout == f"deq {deqcli.__version__}\n"


def test_shell_completion_script_is_produced() -> None:
    # The shell is detected from the parent process (bash, zsh, fish or PowerShell).
    res = CliRunner().invoke(app, ["--show-completion"], prog_name="deq")
    assert res.exit_code == 0 and "_DEQ_COMPLETE=complete_" in res.stdout


def test_completion_offers_commands_and_flags() -> None:
    env = {"_DEQ_COMPLETE": "complete_bash", "COMP_WORDS": "deq solve --mon", "COMP_CWORD": "2"}
    res = CliRunner().invoke(app, [], prog_name="deq", env=env)
    assert "--monitor" in res.stdout.split()
    env.update(COMP_WORDS="deq comp", COMP_CWORD="1")
    assert CliRunner().invoke(app, [], prog_name="deq", env=env).stdout.split() == [
        "compare-solvers"
    ]


COMMANDS = ["solve", "validate", "schema", "list-solvers", "compare-solvers", "sweep", "gradcheck"]


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help_shows_every_help_text_as_written_and_no_type_names(command: list[str]) -> None:
    """No Python type placeholders (<bool>, <list[str]>) and no text eaten as markup."""
    import click

    res = CliRunner().invoke(app, [*command, "--help"], prog_name="deq", env={"COLUMNS": "200"})
    assert res.exit_code == 0
    assert not re.search(r"<(bool|str|int|float|path|list\[\w+\])>", res.stdout), res.stdout
    group = typer.main.get_command(app)
    cmd = group.get_command(click.Context(group), command[0]) if command else group
    flat = " ".join(res.stdout.split())
    for param in cmd.params:
        if param.help:
            assert " ".join(param.help.split()) in flat, param.help


def test_sweep_help_keeps_the_bracketed_list_syntax(cli) -> None:
    assert "KEY=[v1,v2,...]" in " ".join(cli("sweep", "--help").stdout.split())


def test_monitor_prints_one_line_per_iteration_on_stderr(cli) -> None:
    run = cli("solve", CONFIGS / "sqrt2.yaml", "--monitor", "--json", "-")
    doc = json.loads(run.stdout)  # stdout holds the JSON and nothing else
    lines = run.stderr.splitlines()
    assert lines[0].split() == ["iter", "‖g‖", "rate", "running", "time"]
    rows = [line.split() for line in lines[1:]]
    residuals = [row[0] for row in doc["history"]["residual"]]
    assert [int(row[0]) for row in rows] == list(range(doc["iterations"] + 1))
    assert [float(row[1]) for row in rows] == pytest.approx(residuals, rel=1e-3)
    # Newton on z² − 2 from 1: ‖g‖ goes 1 → 0.25, then the rate collapses (quadratic).
    assert rows[0][2] == "–" and float(rows[1][2]) == pytest.approx(0.25, rel=1e-3)
    assert float(rows[4][2]) < 1e-5
    assert rows[0][3] == "1/1" and rows[-1][3] == "0/1"


def test_monitor_every_k_and_before_the_config(cli) -> None:
    every = cli("solve", CONFIGS / "dottie.yaml", "--monitor", "10", "-q", "--no-diagnostics")
    ks = [int(line.split()[0]) for line in every.stderr.splitlines()[1:]]
    assert every.exit_code == 0 and every.stdout == ""
    assert ks[:-1] == list(range(0, ks[-1], 10)) and ks[-1] % 10 != 0
    # A bare --monitor before the config does not swallow it.
    first = cli("solve", "--monitor", CONFIGS / "sqrt2.yaml", "-q")
    assert first.exit_code == 0 and first.stderr.splitlines()[1].split()[0] == "0"


def test_no_progress_when_stderr_is_not_a_terminal(cli) -> None:
    run = cli("solve", CONFIGS / "tanh_layer.yaml", "--no-diagnostics")
    assert run.exit_code == 0 and run.stderr == ""
