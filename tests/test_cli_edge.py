"""The command edge: whatever happens, one stderr line and the right exit code.

Usage errors from Click, exceptions nothing else caught, the config's own code misbehaving
(printing, sys.exit, raising), third-party warnings, and Ctrl-C at any moment.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import pytest

from deqcli import interrupt
from tests.conftest import CONFIGS, ROOT, one_line_error

DOTTIE = CONFIGS / "dottie.yaml"


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["solve", DOTTIE, "--jsn", "x"], ["No such option: --jsn", "--json", "deq solve --help"]),
        (["solve"], ["Missing argument", "deq solve --help"]),
        (["solve", DOTTIE, "--max-iter", "abc"], ["'--max-iter'", "integer"]),
        (["gradcheck", DOTTIE, "--directions", "0"], ["'--directions'"]),
        (["frobnicate"], ["No such command 'frobnicate'", "deq --help"]),
        (["compare-solvers", DOTTIE, "--repeat"], ["--repeat", "requires an argument"]),
        # Integers beyond 64 bits are named under the flag given, not as the --set they become.
        (["solve", DOTTIE, "--seed", "9" * 23], ["--seed: 999", "out of range", "< 2**63"]),
        (["sweep", DOTTIE, "--param", "a=1", "--max-iter", "-" + "9" * 23], ["--max-iter: -99"]),
        # An option is never the value of the option before it (--json: see below).
        (["solve", DOTTIE, "-s", "-q"], ["-s: expected a value, got the option -q", "--solver=-q"]),
        (
            ["sweep", DOTTIE, "--param", "--quiet"],
            ["--param: expected a value", "deq sweep --help"],
        ),
    ],
)
def test_click_usage_errors_are_one_line(cli, args: list, fragments: list[str]) -> None:
    run = cli(*args)
    line = one_line_error(run, *fragments)
    assert "Usage:" not in run.stderr and "╭" not in run.stderr and line.count("error") == 1


def test_an_unexpected_exception_is_one_line_and_exit_one(cli, monkeypatch) -> None:
    from deqcli.analyses import jobs

    def broken(request, **kwargs):
        raise TypeError("an internal slip")

    monkeypatch.setattr(jobs, "solve", broken)
    one_line_error(
        cli("solve", DOTTIE), "unexpected TypeError: an internal slip", "--debug", code=1
    )
    run = cli("solve", DOTTIE, "--debug")
    assert run.exit_code == 1 and "Traceback" in run.stderr and "an internal slip" in run.stderr


def test_third_party_warnings_are_silent_unless_debug(cli, monkeypatch) -> None:
    from deqcli.analyses import jobs

    solve = jobs.solve

    def noisy(request, **kwargs):
        warnings.warn("`torch.jit.script` is deprecated", DeprecationWarning, stacklevel=1)
        warnings.warn("overflow encountered in scalar power", RuntimeWarning, stacklevel=1)
        return solve(request, **kwargs)

    monkeypatch.setattr(jobs, "solve", noisy)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        quiet = cli("solve", DOTTIE, "--json", "-")
    assert quiet.exit_code == 0 and quiet.stderr == "" and shown == []
    assert json.loads(quiet.stdout)["status"] == "converged"
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        loud = cli("solve", DOTTIE, "--json", "-", "--debug")
    assert loud.exit_code == 0
    assert {str(w.message) for w in shown} >= {
        "`torch.jit.script` is deprecated",
        "overflow encountered in scalar power",
    }


def test_torch_s_own_notices_stay_off_the_terminal(tmp_path: Path) -> None:
    # A map whose torch call makes torch warn (copy-constructing a tensor from a tensor): even when
    # Python is told to show every warning, only --debug lets it through.
    (tmp_path / "noisy.py").write_text(
        textwrap.dedent(
            """
            import torch

            def make():
                def f(z):
                    return 0.5 * torch.cos(torch.tensor(z))
                return f, torch.zeros(1, 1)
            """
        )
    )
    config = tmp_path / "noisy.yaml"
    config.write_text("problem: {kind: python, target: noisy.py:make}\n")
    args = [sys.executable, "-m", "deqcli", "solve", str(config), "--trust-code"]
    env = {**os.environ, "PYTHONWARNINGS": "always"}
    quiet = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    loud = subprocess.run(
        [*args, "--debug"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert loud.returncode == 0 and "UserWarning" in loud.stderr


def test_an_option_like_value_is_written_with_an_equals_sign(
    cli, tmp_path: Path, monkeypatch
) -> None:
    # Taken as --json's value, --no-diagnostics would name the file written (and the
    # diagnostics would run): in a folder of its own, so that no such file can land elsewhere.
    monkeypatch.chdir(tmp_path)
    one_line_error(
        cli("solve", DOTTIE, "--json", "--no-diagnostics"),
        "--json: expected a value, got the option --no-diagnostics",
        "--json=--no-diagnostics",
    )
    assert list(tmp_path.iterdir()) == []
    run = cli("solve", DOTTIE, "--json=--no-diagnostics", "--quiet")
    assert run.exit_code == 0 and (tmp_path / "--no-diagnostics").is_file()


# -- the config's own code ---------------------------------------------------------------------


def _model(tmp_path: Path, body: str, target: str = "make") -> Path:
    (tmp_path / "model.py").write_text(textwrap.dedent(body))
    cfg = tmp_path / "model.yaml"
    cfg.write_text(
        f"problem: {{kind: python, target: 'model.py:{target}'}}\nrun: {{atol: 1.0e-12}}\n"
    )
    return cfg


def test_prints_of_the_config_code_go_to_stderr(cli, tmp_path: Path) -> None:
    cfg = _model(
        tmp_path,
        """
        import torch
        print("importing the model")
        def make():
            print("making the map")
            def f(z):
                print("evaluating")
                return 0.5 * z + 1
            return f, torch.zeros(1, 2)
        """,
    )
    run = cli("solve", cfg, "--trust-code", "--json", "-")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)  # stdout is pure JSON
    assert doc["status"] == "converged" and doc["samples"][0]["solution"] == pytest.approx([2, 2])
    for said in ("importing the model", "making the map", "evaluating"):
        assert said in run.stderr


@pytest.mark.parametrize("where", ["import", "factory", "map"])
def test_sys_exit_in_the_config_code_is_bad_input(cli, tmp_path: Path, where: str) -> None:
    exit_at = {"import": "sys.exit(5)", "factory": "pass", "map": "pass"}[where]
    cfg = _model(
        tmp_path,
        f"""
        import sys
        import torch
        {exit_at}
        calls = 0
        def make():
            {"sys.exit(5)" if where == "factory" else "pass"}
            def f(z):
                global calls
                calls += 1
                if {where == "map"} and calls > 2:
                    sys.exit(5)
                return 0.5 * z + 1
            return f, torch.zeros(1, 2)
        """,
    )
    one_line_error(cli("solve", cfg, "--trust-code", "--json", "-"), "sys.exit(5)", "model.py")


@pytest.mark.parametrize(
    ("raised", "line", "fragment"),
    [
        ('ArithmeticError("boom in the model")', "model.py:11", "boom in the model"),
        # A BaseException of the config's own code is still its error, not a crash of ours.
        ('Halt("halted by the model")', "model.py:11", "Halt: halted by the model"),
    ],
)
def test_an_exception_in_the_map_names_the_line_of_the_config_code(
    cli, tmp_path: Path, raised: str, line: str, fragment: str
) -> None:
    cfg = _model(
        tmp_path,
        f"""
        import torch
        class Halt(BaseException):
            pass
        calls = 0
        def make():
            def f(z):
                global calls
                calls += 1
                if calls > 3:
                    raise {raised}
                return 0.5 * z + 1
            return f, torch.zeros(1, 2)
        """,
    )
    one_line_error(cli("solve", cfg, "--trust-code"), line, fragment)


@pytest.mark.parametrize(
    ("made", "fragment"),
    [
        ("(lambda z: (0.5 * z).to(torch.complex128), torch.zeros(1, 2))", "complex128"),
        ("(lambda z: z > 0, torch.zeros(1, 2))", "torch.bool"),
        (
            "(lambda z: torch.cat([z, z], dim=1), torch.zeros(1, 2))",
            "returned (1, 4) for z of shape (1, 2)",
        ),
        ("(lambda z: z, 'abc')", "z0 from model.py:make is not a tensor"),
        ("(lambda z: z, torch.zeros(1, 0))", "is empty"),
        ("(lambda z: z, [1 + 2j])", "must be real numbers"),
        # Meta tensors have a shape and no values; torch fails on them deep inside a solver.
        ("(lambda z: z, torch.zeros(1, 2, device='meta'))", "z0 from model.py:make is a meta"),
        (
            "(lambda z: (0.5 * z).to('meta'), torch.zeros(1, 2))",
            "returned a tensor on meta for z on cpu",
        ),
    ],
)
def test_unusable_maps_and_starts_are_bad_input(cli, tmp_path, made: str, fragment: str) -> None:
    cfg = _model(tmp_path, f"import torch\ndef make():\n    return {made}\n")
    one_line_error(cli("solve", cfg, "--trust-code"), "problem.target", fragment)


def test_an_exception_without_a_message_is_named_by_its_type(cli, tmp_path: Path) -> None:
    cfg = _model(tmp_path, "def make():\n    raise MemoryError\n")
    line = one_line_error(cli("solve", cfg, "--trust-code"), "calling model.py:make failed")
    assert line.endswith("failed: MemoryError")


# -- Ctrl-C ------------------------------------------------------------------------------------


def test_a_keyboard_interrupt_in_a_command_is_one_line_and_130(cli, monkeypatch) -> None:
    from deqcli.analyses import jobs

    def interrupted(request, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(jobs, "solve", interrupted)
    monkeypatch.setattr(interrupt, "_announced", False)
    run = cli("solve", DOTTIE)
    assert run.exit_code == 130 and run.stderr == "interrupted\n" and run.stdout == ""


def test_a_press_inside_torch_is_held_until_the_next_evaluation(monkeypatch) -> None:
    monkeypatch.setattr(interrupt, "_presses", 0)
    monkeypatch.setattr(interrupt, "_pending", False)
    # A frame whose code lives in a torch file, as during torch's imports and transforms.
    namespace: dict = {"interrupt": interrupt, "signal": signal, "sys": sys}
    fake = os.path.join(os.sep, "site-packages", "torch", "_ops.py")
    exec(compile("interrupt._on_sigint(signal.SIGINT, sys._getframe())", fake, "exec"), namespace)
    with pytest.raises(KeyboardInterrupt):
        interrupt.checkpoint()
    interrupt.checkpoint()  # raised once only


def _start(args: list[str], **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "deqcli", *args],
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until the run is evaluating (its map touched ``path``); a guard against hanging, not a timing."""
    for _ in range(6000):
        if path.exists() or proc.poll() is not None:
            return
        time.sleep(0.01)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_a_solve_exits_130_with_one_line(tmp_path: Path, presses: int) -> None:
    started = tmp_path / "started"
    cfg = _model(
        tmp_path,
        f"""
        import pathlib, time, torch
        def make():
            def f(z):
                pathlib.Path({str(started)!r}).touch()
                time.sleep(0.002)
                return 0.9999 * z + 1
            return f, torch.zeros(1, 4)
        """,
    )
    proc = _start(["solve", str(cfg), "--max-iter", "100000000", "--tol", "0"], DEQ_TRUST_CODE="1")
    _wait_for(started, proc)
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err == "interrupted\n" and out == ""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_start_up_exits_130_with_one_line(presses: int) -> None:
    # The presses arrive while the command line is being imported (before typer, rich, torch).
    code = textwrap.dedent(
        f"""
        import builtins, os, signal, sys
        sys.argv = ["deq", "solve", "configs/dottie.yaml"]
        real_import = builtins.__import__
        def importing(name, *args, **kwargs):
            if name == "deqcli.cli":
                builtins.__import__ = real_import
                for _ in range({presses}):
                    os.kill(os.getpid(), signal.SIGINT)
            return real_import(name, *args, **kwargs)
        builtins.__import__ = importing
        from deqcli.__main__ import main
        main()
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 130 and out.stderr == "interrupted\n" and out.stdout == ""
