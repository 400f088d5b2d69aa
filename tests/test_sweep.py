"""Parameter sweeps: grid parsing, independent points, regimes against theory, resume, outputs."""

from __future__ import annotations

import copy
import csv
import io
import json
import pickle
from pathlib import Path

import pytest

from deqcli.analyses.sweep import (
    PointOptions,
    SweepBase,
    make_axes,
    parse_param,
    resolve_key,
    run_sweep,
    solve_point,
    summarise,
    to_csv,
)
from deqcli.errors import ConfigError, UsageError
from tests.conftest import CONFIGS

# -- parsing ------------------------------------------------------------------------------------------


def test_range_list_and_single_forms() -> None:
    assert parse_param("r=2.5:4:4") == ("r", [2.5, 3.0, 3.5, 4.0])
    assert parse_param("a=0:1:3") == ("a", [0.0, 0.5, 1.0])
    assert parse_param("n=2:10:5") == ("n", [2, 4, 6, 8, 10])
    assert parse_param("r=[2.8, 3.2,3.5]") == ("r", [2.8, 3.2, 3.5])
    assert parse_param("r=2.8,3.2") == ("r", [2.8, 3.2])
    assert parse_param("problem.lr=0.1") == ("problem.lr", [0.1])
    assert parse_param("solver.name=fixed_point,newton") == (
        "solver.name",
        ["fixed_point", "newton"],
    )
    assert parse_param("eta=1e-3:1e-1:3:log") == ("eta", [1e-3, 1e-2, 1e-1])
    # Evenly spaced values carry no last-bit noise and end exactly at STOP.
    assert parse_param("r=2.5:4:11")[1][9] == 3.85
    assert parse_param("r=2.5:4:11")[1][-1] == 4.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("r", "expected NAME=START:STOP:COUNT"),
        ("r=", "expected NAME=START:STOP:COUNT"),
        ("r=1:2:0", "COUNT must be a whole number"),
        ("r=1:2:2.5", "COUNT must be a whole number"),
        ("r=a:2:3", "START must be a number"),
        ("r=0:1:3:log", "log spacing needs START and STOP > 0"),
        ("r=1,,2", "empty entry"),
        ("r=1:2:1e9", "above the limit"),
        ("2r=1", "not a config key"),
        ("r=nan", "finite"),
    ],
)
def test_bad_axes_are_one_clear_error(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_param(text)


def test_short_names_resolve_to_params_then_problem_keys() -> None:
    expr = {"problem": {"kind": "expression", "params": {"r": 3.0}, "batch_params": {"s": [1, 2]}}}
    assert resolve_key(expr, "r") == "problem.params.r"
    assert resolve_key(expr, "initial") == "problem.initial"
    assert resolve_key(expr, "run.atol") == "run.atol"
    gd = {"problem": {"kind": "gradient_descent", "lr": 0.1, "params": {}}}
    assert resolve_key(gd, "lr") == "problem.lr"
    py = {"problem": {"kind": "python", "args": {"c": 0.25}}}
    assert resolve_key(py, "c") == "problem.args.c"
    with pytest.raises(ConfigError, match="one value per sample"):
        resolve_key(expr, "s")
    with pytest.raises(ConfigError, match=r"'q' is not a parameter .*use one of r, "):
        resolve_key(expr, "q")


def test_every_value_is_validated_before_the_sweep_starts() -> None:
    base = SweepBase.from_path(CONFIGS / "quadratic_lr.yaml")
    with pytest.raises(UsageError, match=r"--param lr=-0\.1: problem\.lr"):
        make_axes(base, ["lr=[0.1, -0.1]"])
    with pytest.raises(UsageError, match="swept twice"):
        make_axes(base, ["lr=0.1", "problem.lr=0.2"])
    # The solver and its options too: a bad one is bad input, not a failed point mid-sweep.
    with pytest.raises(UsageError, match=r"--param solver\.name=nope: solver\.name: unknown"):
        make_axes(base, ["solver.name=newton,nope"])
    with pytest.raises(UsageError, match=r"--param solver\.beta=3: solver\.beta: must lie in"):
        make_axes(base, ["solver.beta=0.5,3"])


# -- the logistic map: the period-doubling cascade -----------------------------------------------------


@pytest.fixture(scope="module")
def logistic() -> object:
    base = SweepBase.from_path(CONFIGS / "logistic_sweep.yaml", ["run.max_iter=200"])
    return run_sweep(base, make_axes(base, ["r=2.55:3.95:15"]))


def test_logistic_first_period_doubling_at_r_3_within_the_resolution(logistic) -> None:
    rs = list(logistic.axes[0].values)
    spacing = rs[1] - rs[0]
    labels = [p["label"] for p in logistic.points]
    first = labels.index("period 2")
    # Below r = 3 the fixed point attracts (slowly near 3: 'slow' when the budget runs out first).
    assert all(lab in ("converged", "slow") for lab in labels[:first])
    assert rs[first - 1] < 3.0 <= rs[first] and rs[first] - 3.0 <= spacing
    doubling = next(e for e in summarise(logistic)["events"] if e["to"] == "period 2")
    assert doubling["between"] == [rs[first - 1], rs[first]]
    assert doubling["event"] in ("period doubling", "convergence lost")


def test_logistic_cascade_then_chaos(logistic) -> None:
    labels = [p["label"] for p in logistic.points]
    rs = list(logistic.axes[0].values)
    periods = [int(lab.split()[1]) for lab in labels if lab.startswith("period")]
    # Periods only double along r (2, then 4 or 8 …), and the top of the range is chaotic.
    assert periods == sorted(periods) and max(periods) >= 4
    assert all(p & (p - 1) == 0 for p in periods)
    assert labels[rs.index(3.95)] == "chaotic"
    for point, r in zip(logistic.points, rs, strict=True):
        if point["converged"]:
            assert point["value"] == pytest.approx(1 - 1 / r, abs=1e-8)  # z* = 1 − 1/r
        # ρ(J) at the fixed point 1 − 1/r is |2 − r| (the diagnostics locate it when it repels).
        assert point["rho"] == pytest.approx(abs(2 - r), abs=1e-6)
    period2 = logistic.points[labels.index("period 2")]
    r = rs[labels.index("period 2")]
    # The 2-cycle of the logistic map: z± = (r + 1 ± √((r − 3)(r + 1))) / (2r).
    disc = ((r - 3) * (r + 1)) ** 0.5
    expected = sorted([(r + 1 - disc) / (2 * r), (r + 1 + disc) / (2 * r)])
    assert sorted(set(round(v, 6) for v in period2["samples"][0]["orbit"])) == pytest.approx(
        expected, abs=1e-6
    )


def test_the_attracting_range_counts_only_samples_analysed_at_a_fixed_point(logistic) -> None:
    # ρ(∂f/∂z) = |2 − r| < 1 at the fixed point 1 − 1/r exactly for r < 3 (on this grid 2.55 …
    # 2.95). A sample analysed at its last iterate, having found no fixed point, never counts,
    # whatever ρ there: local attraction is a property of a fixed point.
    rs = list(logistic.axes[0].values)
    below = [r for r in rs if r < 3]
    assert summarise(logistic)["rho_below_one_ranges"] == [[below[0], below[-1]]]
    edited = copy.deepcopy(logistic)
    sample = edited.points[1]["samples"][0]
    assert sample["rho_at"] == "solution" and sample["rho"] < 1
    sample["rho_at"] = "last iterate (not a fixed point)"
    assert summarise(edited)["rho_below_one_ranges"] == [[rs[0], rs[0]], [rs[2], below[-1]]]


# -- gradient descent: lr against 2/λmax ---------------------------------------------------------------


def test_gradient_descent_loses_convergence_at_two_over_lambda_max() -> None:
    # L(w) = ½ Σ h_i w_i² − Σ w_i with h = (1, 2, 4): λmax = 4, so lr < 2/λmax = 0.5 converges.
    base = SweepBase.from_path(CONFIGS / "quadratic_lr.yaml")
    sweep = run_sweep(base, make_axes(base, ["lr=0.325:0.675:8"]))
    lrs = list(sweep.axes[0].values)
    for lr, point in zip(lrs, sweep.points, strict=True):
        assert point["converged"] is (lr < 0.5)
        assert point["certificate"] is (lr < 0.5)
        assert point["rho"] == pytest.approx(max(abs(1 - lr * h) for h in (1, 2, 4)), abs=1e-9)
        if lr < 0.5:
            assert point["solution"][0] == pytest.approx([1.0, 0.5, 0.25], abs=1e-9)
        else:
            assert point["label"] == "diverged"
    summary = summarise(sweep)
    assert summary["lr_limit"] == pytest.approx(0.5, rel=1e-12)
    assert summary["certificate_ranges"] == [[0.325, 0.475]]
    assert summary["events"] == [
        {
            "event": "convergence lost",
            "between": [0.475, 0.525],
            "from": "converged",
            "to": "diverged",
        }
    ]


# -- points are independent tasks ----------------------------------------------------------------------

LINEAR = CONFIGS / "linear_scalar.yaml"


def test_solve_point_is_pure_and_picklable() -> None:
    base = SweepBase.from_path(LINEAR)
    options = PointOptions(value="auto")
    shipped = pickle.loads(pickle.dumps((base, options)))
    first = solve_point(*shipped[:1], {"problem.params.a": 0.75}, None, shipped[1])
    again = solve_point(base, {"problem.params.a": 0.75}, None, options)
    for record in (first, again):
        json.dumps(record, allow_nan=False)  # JSON-ready as it is
        assert record["value"] == pytest.approx(2.0 / (1 - 0.75), rel=1e-12)
        assert record["status"] == "converged" and record["warm_start"] is False
    assert {k: v for k, v in first.items() if k != "wall_time"} == {
        k: v for k, v in again.items() if k != "wall_time"
    }


def test_warm_starts_use_the_neighbours_solution() -> None:
    base = SweepBase.from_path(LINEAR)
    axes = make_axes(base, ["a=0.5:0.6:3"])
    cold = run_sweep(base, axes)
    warm = run_sweep(base, axes, warm_start=True)
    assert [p["warm_start"] for p in warm.points] == [False, True, True]
    for c, w in zip(cold.points, warm.points, strict=True):
        assert w["value"] == pytest.approx(c["value"], rel=1e-12)
    # Starting next to z* saves iterations: z* moves from 4 to 4.44 to 5 while z0 = 0 is far off.
    assert warm.points[2]["iterations"] < cold.points[2]["iterations"]


def test_failing_points_are_recorded_and_the_sweep_goes_on(tmp_path: Path) -> None:
    cfg = tmp_path / "sqrt.yaml"
    cfg.write_text(
        "problem: {kind: expression, fixed_point: 'sqrt(c - z)', params: {c: 1.0}, initial: 0.5}\n"
    )
    base = SweepBase.from_path(cfg)
    # At c = −1 the map is not finite at z0: that point's input is bad, the others still run
    # (z* = (√5 − 1)/2 for c = 1 and z* = 1 for c = 2).
    sweep = run_sweep(base, make_axes(base, ["c=[1.0, -1.0, 2.0]"]))
    statuses = [p["status"] for p in sweep.points]
    assert statuses == ["converged", "error", "converged"]
    assert "not finite at the initial point" in sweep.points[1]["error"]
    assert not sweep.ok
    assert sweep.points[0]["value"] == pytest.approx((5**0.5 - 1) / 2, abs=1e-9)
    assert sweep.points[2]["value"] == pytest.approx(1.0, abs=1e-9)


# -- results files, interruption and resume ----------------------------------------------------------


def test_interrupted_sweep_keeps_its_points_and_resumes(tmp_path: Path) -> None:
    base = SweepBase.from_path(LINEAR)
    axes = make_axes(base, ["a=0.1:0.5:5"])
    path = tmp_path / "points.jsonl"
    seen: list[list[int]] = []

    def stop_after_two(count: int, total: int, point: dict) -> None:
        seen.append(point["index"])
        if count == 2:
            raise KeyboardInterrupt

    partial = run_sweep(base, axes, results=path, on_point=stop_after_two)
    assert partial.interrupted and len(partial.points) == 2
    lines = path.read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "deq.sweep-results" and len(lines) == 3
    with pytest.raises(UsageError, match="already exists; pass --resume"):
        run_sweep(base, axes, results=path)
    with pytest.raises(UsageError, match="different sweep"):
        run_sweep(base, make_axes(base, ["a=0.1:0.5:6"]), results=path, resume=True)

    solved: list[list[int]] = []
    full = run_sweep(
        base, axes, results=path, resume=True, on_point=lambda c, t, p: solved.append(p["index"])
    )
    assert not full.interrupted and full.resumed == 2 and len(full.points) == 5
    assert solved == [[0], [1], [2], [3], [4]]
    assert len(path.read_text().splitlines()) == 6
    for a, point in zip(axes[0].values, full.points, strict=True):
        assert point["value"] == pytest.approx(2.0 / (1 - a), rel=1e-12)


# -- 2-D sweeps and output formats ----------------------------------------------------------------------


def test_two_dimensional_damping_map_csv_and_plot(tmp_path: Path) -> None:
    # Damped iteration z ← z − β(z − f(z)) of the logistic map: the fixed point's multiplier is
    # 1 − β(r − 1), so it converges exactly when β(r − 1) < 2 (and oscillates with period 2 beyond).
    base = SweepBase.from_path(CONFIGS / "logistic_sweep.yaml")
    sweep = run_sweep(base, make_axes(base, ["r=[2.8, 3.2, 3.9]", "solver.beta=0.5,1"]))
    assert [p["index"] for p in sweep.points] == [[0, 0], [0, 1], [1, 0], [1, 1], [2, 0], [2, 1]]
    for p in sweep.points:
        r, beta = p["assignment"]["problem.params.r"], p["assignment"]["solver.beta"]
        assert p["converged"] is (beta * (r - 1) < 2)
        if p["converged"]:
            assert p["value"] == pytest.approx(1 - 1 / r, abs=1e-8)
    assert sweep.points[3]["label"] == "period 2"  # r = 3.2, β = 1: between 3 and 3.449
    rows = list(csv.DictReader(io.StringIO(to_csv(sweep))))
    assert len(rows) == 6 and rows[1]["r"] == "2.8" and rows[1]["solver.beta"] == "1"
    assert rows[3]["classification"] == "oscillating" and rows[3]["period"] == "2"

    from deqcli.render.sweep_plots import plot_sweep

    out = plot_sweep(sweep, tmp_path / "map.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_sweep_outputs_and_exit_codes(cli, tmp_path: Path) -> None:
    run = cli("sweep", LINEAR, "--param", "a=0.2:0.6:3", "--json", "-")
    assert run.exit_code == 0
    doc = json.loads(run.stdout)
    assert doc["kind"] == "deq.sweep" and doc["complete"] and doc["points_total"] == 3
    assert [p["value"] for p in doc["points"]] == pytest.approx([2.5, 2 / 0.6, 5.0], rel=1e-12)

    plot, table = tmp_path / "s.svg", tmp_path / "s.csv"
    run = cli("sweep", LINEAR, "-p", "a=0.5,1.5", "--plot", plot, "--csv", table)
    assert run.exit_code == 0
    assert "convergence lost" in run.stdout and "a = 0.5 … 1.5" in run.stdout
    assert plot.read_text().lstrip().startswith("<?xml") and table.read_text().count("\n") == 3

    run = cli("sweep", LINEAR, "--param", "q=1:2:3")
    assert run.exit_code == 2 and "'q' is not a parameter" in run.stderr
    run = cli("sweep", CONFIGS / "quadratic_lr.yaml", "--param", "lr=-1,1")
    assert run.exit_code == 2 and "problem.lr" in run.stderr
    run = cli("sweep", LINEAR, "--param", "a=0.5", "--resume")
    assert run.exit_code == 2 and "--resume needs --results" in run.stderr
    run = cli("sweep", LINEAR, "--param", "a=0.5", "--value", "median")
    assert run.exit_code == 2 and "--value" in run.stderr
