"""Every example in configs/ runs through `deq solve` and ends as its header comment says.

A config states its expected overall status in a comment line `# expect: <status>`; without one it
must converge. Configs are validated (`deq validate`) before they are solved.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from deqcli.result import Status
from tests.conftest import CONFIGS

EXPECT = re.compile(r"^#\s*expect:\s*(\w+)\s*$", re.MULTILINE)
ALL_CONFIGS = sorted(CONFIGS.rglob("*.yaml"))


def expected_status(path: Path) -> Status:
    """The status a config's header promises (converged by default)."""
    match = EXPECT.search(path.read_text(encoding="utf-8"))
    return Status(match.group(1)) if match else Status.CONVERGED


def test_there_are_examples() -> None:
    assert len(ALL_CONFIGS) >= 6


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_example_config_runs_as_documented(cli, path: Path) -> None:
    assert cli("validate", path).exit_code == 0
    # The shipped examples are ours: the ones that run Python code may (as a user says so).
    run = cli("solve", path, "--trust-code", "--json", "-")
    expected = expected_status(path)
    doc = json.loads(run.stdout)
    assert doc["status"] == expected.value, (doc["status"], doc.get("notes"))
    assert run.exit_code == (0 if expected is Status.CONVERGED else 1)
