"""The diagnostics through `deq solve`: the panel, --explain, --precheck, --no-diagnostics, and the
example configs in configs/diagnostics/ classified as their theory says."""

from __future__ import annotations

import json
import math

import pytest

from tests.conftest import CONFIGS

DIAG = CONFIGS / "diagnostics"


def solve_json(cli, path, *flags: str) -> dict:
    run = cli("solve", path, "--json", "-", *flags)
    assert run.exit_code in (0, 1), run.stderr
    return json.loads(run.stdout)


def first(doc: dict) -> dict:
    return doc["samples"][0]["diagnostics"]


def test_report_has_a_diagnostics_panel_with_remedies(cli) -> None:
    run = cli("solve", DIAG / "logistic_period2.yaml")
    assert run.exit_code == 1
    assert "diagnostics" in run.stdout and "oscillating" in run.stdout
    assert "period-2" in run.stdout and "→ remedy" in run.stdout
    assert run.stderr == ""


def test_explain_prints_the_reasoning(cli) -> None:
    run = cli("solve", DIAG / "tanh_period2.yaml", "--explain")
    assert run.exit_code == 1
    for heading in ("What happened", "The evidence, test by test", "The map at the fixed point"):
        assert heading in run.stdout
    assert "period test" in run.stdout and "What to do" in run.stdout


def test_explain_without_diagnostics_is_a_usage_error(cli) -> None:
    run = cli("solve", DIAG / "tanh_period2.yaml", "--explain", "--no-diagnostics")
    assert run.exit_code == 2
    assert "--no-diagnostics" in run.stderr and run.stdout == ""


def test_no_diagnostics_keeps_the_driver_status(cli) -> None:
    doc = solve_json(cli, DIAG / "logistic_period2.yaml", "--no-diagnostics")
    assert doc["status"] == "max_iter" and "diagnostics" not in doc
    assert "diagnostics" not in doc["samples"][0]


def test_precheck_is_labelled_an_estimate(cli) -> None:
    doc = solve_json(cli, CONFIGS / "tanh_layer.yaml", "--precheck")
    assert doc["diagnostics"]["precheck"]["label"].startswith("estimates around the start")
    for sample in doc["samples"]:
        secant = sample["diagnostics"]["precheck"]["secant"]
        assert "estimate" in secant["label"]
        # The certificate L ≤ ‖W‖₂ = 0.9 bounds every secant ratio.
        assert 0 < secant["estimate"] <= 0.9 + 1e-9


def test_max_period_flag(cli) -> None:
    assert cli("solve", DIAG / "logistic_period2.yaml", "--max-period", "1").exit_code == 2
    doc = solve_json(cli, DIAG / "logistic_period2.yaml", "--max-period", "2")
    assert first(doc)["evidence"]["period"] == 2
    assert doc["diagnostics"]["settings"]["max_period"] == 2


def test_logistic_configs(cli) -> None:
    converge = first(solve_json(cli, DIAG / "logistic_converge.yaml"))
    assert converge["spectral"]["spectral_radius"] == pytest.approx(0.8, abs=1e-9)
    assert converge["rates"]["step_rate"] == pytest.approx(0.8, abs=1e-3)
    period2 = first(solve_json(cli, DIAG / "logistic_period2.yaml"))
    assert period2["evidence"]["period"] == 2
    chaos = first(solve_json(cli, DIAG / "logistic_chaos.yaml"))
    assert chaos["classification"] == "chaotic"
    assert chaos["spectral"]["spectral_radius"] == pytest.approx(1.9, abs=1e-8)


def test_gradient_descent_configs(cli) -> None:
    ok = solve_json(cli, DIAG / "gd_lr_ok.yaml")
    assert ok["diagnostics"]["certificate"]["exact"] is True
    assert ok["diagnostics"]["certificate"]["lipschitz_bound"] == pytest.approx(0.9)
    assert first(ok)["rates"]["step_rate"] == pytest.approx(0.9, abs=1e-6)
    bad = solve_json(cli, DIAG / "gd_lr_too_big.yaml")
    assert bad["status"] == "diverged"
    remedies = first(bad)["remedies"]
    assert remedies[0].startswith("tried: fixed_point beta=0.635 (learning rate β·lr = 0.6667)")
    assert any("lr 1.05 > 2/λmax = 1" in text for text in remedies)


def test_nonnormal_config_converges_and_is_explained(cli) -> None:
    doc = solve_json(cli, DIAG / "nonnormal.yaml")
    s = first(doc)
    assert doc["status"] == "converged" and s["classification"] == "converged"
    assert s["spectral"]["norm2"] == pytest.approx((4 + math.sqrt(17)) / 2)
    assert s["spectral"]["spectral_radius"] == pytest.approx(0.5, abs=1e-7)
    assert doc["samples"][0]["solution"] == pytest.approx([18.0, 2.0], abs=1e-10)


def test_newton_configs(cli) -> None:
    double = first(solve_json(cli, DIAG / "newton_double_root.yaml"))
    assert double["rates"]["step_rate"] == pytest.approx(0.5, abs=1e-12)
    assert double["theory"]["linear_newton"] is True
    stalled = first(solve_json(cli, DIAG / "newton_no_root.yaml"))
    assert stalled["classification"] == "stalled" and "local minimum" in stalled["reason"]
    sqrt2 = first(solve_json(cli, CONFIGS / "sqrt2.yaml"))
    assert sqrt2["rates"]["order"] == pytest.approx(2.0, abs=0.1)


def test_slow_config_predicts_its_budget(cli) -> None:
    s = first(solve_json(cli, DIAG / "slow.yaml"))
    assert s["classification"] == "slow"
    exact = math.ceil(math.log(1e-10 / 0.011) / math.log(0.999))
    assert s["evidence"]["iterations_needed"] == pytest.approx(exact, rel=0.01)


def test_solve_tries_its_remedies_and_reports_each_outcome(cli) -> None:
    run = cli("solve", DIAG / "logistic_period2.yaml")
    assert run.exit_code == 1
    assert "→ remedy  tried: fixed_point beta=0.45 → converged in" in run.stdout
    doc = solve_json(cli, DIAG / "logistic_period2.yaml")
    trials = doc["diagnostics"]["trials"]
    assert trials["enabled"] is True and trials["sample"] == 0
    assert trials["budget"] == {"evaluations": 201, "seconds": 2.0}  # the run's 201 evaluations
    for run_ in trials["runs"]:
        assert run_["evaluations"]["cost"] <= trials["budget"]["evaluations"] + 10
        assert run_["wall_time"] > 0 and run_["text"].startswith("tried")
    s = first(doc)
    assert s["remedies"][0] == trials["runs"][s["advice"][0]["trial"]]["text"]


def test_no_try_leaves_every_remedy_a_suggestion(cli) -> None:
    doc = solve_json(cli, DIAG / "logistic_period2.yaml", "--no-try")
    assert doc["diagnostics"]["trials"] == {
        "enabled": False,
        "runs": [],
        "skipped": "remedy trials are off (--no-try)",
    }
    kinds = {entry["kind"] for entry in first(doc)["advice"]}
    assert kinds <= {"note", "suggestion"}
    assert all(t.startswith("suggestion") for t in first(doc)["remedies"] if "beta" in t)


def test_try_budget_caps_every_trial(cli) -> None:
    # 5 evaluations: plain iteration gets 5 steps and Newton one Jacobian before the guard stops it.
    doc = solve_json(cli, DIAG / "logistic_period2.yaml", "--try-budget", "5")
    trials = doc["diagnostics"]["trials"]
    assert trials["budget"]["evaluations"] == 5
    assert all(r["budget_exhausted"] for r in trials["runs"] if r["status"] != "converged")
    assert any("not converged within the budget" in r["text"] for r in trials["runs"])
    bad = cli("solve", DIAG / "logistic_period2.yaml", "--no-try", "--try-budget", "5")
    assert bad.exit_code == 2 and bad.stderr.strip() == (
        "error: --try-budget sets the budget of the remedy trials; drop --no-try"
    )


def test_the_error_bound_is_reported_for_every_solver(cli) -> None:
    doc = solve_json(cli, CONFIGS / "dottie.yaml", "--solver", "anderson")
    bound = first(doc)["error_bound"]
    # J_g = 1 + sin z at the Dottie number: σ_min = 1 + sin z* in one dimension.
    assert bound["sigma_min"] == pytest.approx(1 + math.sin(0.7390851332151607), rel=1e-9)
    assert bound["forward_error_estimate"] == pytest.approx(
        doc["samples"][0]["residual"] / bound["sigma_min"]
    )
    run = cli("solve", DIAG / "newton_double_root.yaml", "--explain")
    assert "J_g is near singular at the solution" in " ".join(run.stdout.split())
    assert "Error bound" in run.stdout and "Remedies tried" in run.stdout


def test_compare_solvers_runs_no_remedy_trials(cli) -> None:
    # compare-solvers times solvers: its diagnostics plan remedies but never run them.
    run = cli(
        "compare-solvers", DIAG / "logistic_period2.yaml", "--solvers", "fixed_point",
        "--repeat", "1", "--json", "-",
    )  # fmt: skip
    doc = json.loads(run.stdout)
    result = doc["problems"][0]["solvers"][0]["result"]
    assert "trials" not in result["diagnostics"]
    diag = result["samples"][0]["diagnostics"]
    assert diag["plan"]["candidates"] and all(
        e["kind"] in ("note", "suggestion") for e in diag["advice"]
    )


def test_escape_nonzero_minimum_and_precision_floor_configs(cli) -> None:
    escape = first(solve_json(cli, DIAG / "escape.yaml"))
    assert escape["classification"] == "diverged" and escape["evidence"]["escaping"] is True
    assert escape["evidence"]["residual_max"] == pytest.approx(math.pi / 2, rel=1e-9)
    assert escape["advice"][0]["label"] == "newton with line search"
    assert escape["advice"][0]["kind"] == "verified"
    minimum = first(solve_json(cli, DIAG / "nonzero_minimum.yaml"))
    assert minimum["classification"] == "stalled" and minimum["evidence"]["nonzero_level"]
    assert minimum["final_residual"] == pytest.approx(0.01, rel=1e-3)
    assert minimum["stationarity"]["stationary"] is True
    doc = solve_json(cli, DIAG / "precision_floor.yaml")
    floor = first(doc)
    assert floor["classification"] == "precision_floor" and doc["status"] == "stalled"
    eps32 = 2.0**-23
    assert floor["evidence"]["resolution"] == pytest.approx(eps32 * floor["evidence"]["scale"])
    assert floor["evidence"]["reachable_tolerance"] > doc["tolerance"]["atol"]
