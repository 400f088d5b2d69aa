"""Consent before code: a config that names Python code runs it only when the user has said so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from deqcli.api import load_problem
from deqcli.config import parse_config
from deqcli.consent import ConsentError, allowed, granted
from tests.conftest import CONFIGS


def _side_effect_module(tmp_path: Path) -> tuple[Path, Path]:
    """A model file that leaves a mark when imported, and a config naming it."""
    mark = tmp_path / "imported.txt"
    (tmp_path / "model.py").write_text(
        f"open({str(mark)!r}, 'w').write('ran')\n"
        "import torch\n"
        "def make():\n"
        "    return (lambda z: 0.5 * z + 1, torch.zeros(1, 2))\n"
    )
    cfg = tmp_path / "model.yaml"
    cfg.write_text("problem: {kind: python, target: model.py:make}\n")
    return cfg, mark


def test_no_code_runs_without_consent(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DEQ_TRUST_CODE", raising=False)
    cfg, mark = _side_effect_module(tmp_path)
    run = cli("solve", cfg)
    assert run.exit_code == 2
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr
    assert "model.py:make" in run.stderr and "DEQ_TRUST_CODE=1" in run.stderr
    assert not mark.exists()  # nothing was imported


def test_a_config_alone_cannot_run_a_shell_command(cli, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("DEQ_TRUST_CODE", raising=False)
    witness = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(
        f"problem: {{kind: python, target: 'os:system', args: {{command: 'touch {witness}'}}}}\n"
    )
    run = cli("solve", cfg)
    assert run.exit_code == 2 and "os:system" in run.stderr
    assert not witness.exists()


def test_validate_never_imports_and_says_consent_is_needed(cli, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DEQ_TRUST_CODE", raising=False)
    cfg, mark = _side_effect_module(tmp_path)
    run = cli("validate", cfg)
    assert run.exit_code == 0 and "needs consent" in run.stdout
    assert not mark.exists()


def test_the_trust_code_flag_gives_consent_on_every_solving_command(cli, tmp_path, monkeypatch):
    monkeypatch.delenv("DEQ_TRUST_CODE", raising=False)
    cfg, mark = _side_effect_module(tmp_path)
    run = cli("solve", cfg, "--trust-code", "--json", "-")
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)["status"] == "converged" and mark.exists()
    for command in ("compare-solvers", "sweep", "gradcheck"):
        assert "--trust-code" in cli(command, "--help").stdout
    # Consent is asked for up front, before anything runs: a usage error, not a failed row.
    run = cli("compare-solvers", cfg, "--solvers", "fixed_point", "--repeat", "1", "--json", "-")
    assert run.exit_code == 2 and "--trust-code" in run.stderr and run.stdout == ""
    ok = cli(
        "compare-solvers",
        cfg,
        "--trust-code",
        "--solvers",
        "fixed_point",
        "--repeat",
        "1",
        "--json",
        "-",
    )
    assert ok.exit_code == 0, ok.stderr


def test_the_environment_gives_consent(cli, tmp_path: Path, monkeypatch) -> None:
    cfg, mark = _side_effect_module(tmp_path)
    monkeypatch.setenv("DEQ_TRUST_CODE", "1")
    run = cli("solve", cfg, "--json", "-")
    assert run.exit_code == 0, run.stderr
    assert json.loads(run.stdout)["status"] == "converged"
    assert mark.exists()


def test_the_api_asks_for_trust_code(monkeypatch) -> None:
    monkeypatch.delenv("DEQ_TRUST_CODE", raising=False)
    cfg = parse_config((CONFIGS / "python_map.yaml").read_text(), base_dir=CONFIGS)
    with pytest.raises(ConsentError, match="trust-code"):
        load_problem(cfg)
    assert load_problem(cfg, trust_code=True).batch == 3
    assert not granted()  # consent does not outlive the call
    with allowed(True):
        assert granted()
    assert not granted()
