"""Shared test helpers: run the CLI in-process and write throwaway configs."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from deqcli.cli import app

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"


class Run:
    """The outcome of one CLI invocation with stdout and stderr kept apart."""

    def __init__(self, exit_code: int, stdout: str, stderr: str) -> None:
        self.exit_code = exit_code
        self.stdout = stdout
        self.stderr = stderr


@pytest.fixture
def cli() -> Callable[..., Run]:
    """Invoke `deq ARGS...` in-process; returns exit code, stdout and stderr separately."""
    runner = CliRunner()

    def invoke(*args: str) -> Run:
        res = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return Run(res.exit_code, res.stdout, res.stderr)

    return invoke


def one_line_error(run: Run, *fragments: str, code: int = 2) -> str:
    """Assert the run failed with exit ``code`` and exactly one 'error:' line on stderr holding
    every fragment, no traceback and nothing on stdout; return the line."""
    assert run.exit_code == code, (run.exit_code, run.stdout, run.stderr)
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in run.stderr and run.stdout == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write YAML text (dedented) to a file in a temporary folder and return its path."""

    def write(text: str, name: str = "cfg.yaml") -> Path:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Run torch on one thread: the models in these tests are so small that a second thread only
    adds synchronisation (which costs seconds on a busy machine)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
