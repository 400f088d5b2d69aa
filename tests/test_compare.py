"""deq compare-solvers: the suite end to end, agreement of every rendering, plots, baselines, errors."""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from typer.testing import CliRunner

from deqcli.analyses import compare
from deqcli.cli import app
from deqcli.solvers import SOLVERS, SolverInfo
from deqcli.solvers.base import Solver, State

from .conftest import CONFIGS, Run

SUITE = CONFIGS / "suite"
PAIR = "fixed_point,newton"
DOTTIE = 0.7390851332151607
# The stable 2-cycle of the logistic map r z (1 − z): z = (r + 1 ± √((r + 1)(r − 3))) / (2r).
R = 3.2
LOGISTIC_CYCLE = sorted((R + 1 + s * math.sqrt((R + 1) * (R - 3))) / (2 * R) for s in (-1, 1))
UNITS = {"s": 1.0, "ms": 1e-3, "µs": 1e-6}


def invoke(*args: Any) -> Run:
    """Run `deq ARGS` in-process with a wide terminal, so table cells are never truncated."""
    res = CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "200"})
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return Run(res.exit_code, res.stdout, res.stderr)


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One comparison of the whole suite, written in every format (shared by the tests below)."""
    out = tmp_path_factory.mktemp("suite")
    run = invoke(
        "compare-solvers", SUITE, "--solvers", PAIR, "--repeat", 2, "--warmup", 1,
        "--json", out / "c.json", "--csv", out / "c.csv", "--markdown", out / "c.md",
        "--plot", out / "fig.png", "--save-baseline", out / "base.json",
    )  # fmt: skip
    doc = json.loads((out / "c.json").read_text())
    return {"run": run, "doc": doc, "dir": out}


def rows_by(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(p["name"], r["solver"]): r for p in doc["problems"] for r in p["solvers"]}


def solution(row: dict[str, Any], sample: int = 0) -> list[float]:
    return row["result"]["samples"][sample]["solution"]


# -- the suite end to end -------------------------------------------------------------------------


def test_suite_known_answers(suite_run: dict[str, Any]) -> None:
    run, doc = suite_run["run"], suite_run["doc"]
    assert run.exit_code == 0, run.stderr
    assert doc["kind"] == "deq.compare-solvers" and doc["schema_version"] == "1"
    assert [p["name"] for p in doc["problems"]] == [
        "cubic-divergent", "dottie", "logistic-oscillating", "sqrt2", "tanh-layer",
    ]  # fmt: skip
    rows = rows_by(doc)
    # Dottie: both solve cos z = z; plain iteration is linear, Newton quadratic, so far fewer steps.
    for solver in ("fixed_point", "newton"):
        row = rows["dottie", solver]
        assert row["converged"] and abs(solution(row)[0] - DOTTIE) < 1e-11
    assert rows["dottie", "newton"]["iterations"] < rows["dottie", "fixed_point"]["iterations"] / 5
    # Plain iteration costs exactly one map evaluation per iteration (plus the start).
    fp = rows["dottie", "fixed_point"]
    assert fp["nfev"] == fp["iterations"] + 1 and fp["njev"] == 0
    # √2: Newton finds it; z ← z − (z² − 2) from 1 falls onto the exact cycle 2 ↔ 0.
    assert abs(solution(rows["sqrt2", "newton"])[0] - math.sqrt(2)) < 1e-12
    stuck = rows["sqrt2", "fixed_point"]
    assert not stuck["converged"] and solution(stuck)[0] in (0.0, 2.0)
    assert stuck["residual"] == 2.0
    # z = z³ from 2: the fixed point 1 repels the plain iteration, Newton converges to it.
    assert rows["cubic-divergent", "fixed_point"]["status"] == "diverged"
    assert abs(solution(rows["cubic-divergent", "newton"])[0] - 1.0) < 1e-12
    # Logistic r = 3.2: the plain iteration ends on the 2-cycle, Newton reaches z* = 1 − 1/r.
    osc = rows["logistic-oscillating", "fixed_point"]
    assert not osc["converged"]
    assert min(abs(solution(osc)[0] - c) for c in LOGISTIC_CYCLE) < 1e-9
    assert abs(solution(rows["logistic-oscillating", "newton"])[0] - (1 - 1 / R)) < 1e-12
    for key in (("logistic-oscillating", "fixed_point"), ("sqrt2", "fixed_point")):
        # When the diagnostics classify the trajectory, the period must be the theoretical 2.
        if rows[key]["status"] == "oscillating" or rows[key]["period"] is not None:
            assert rows[key]["period"] == 2 and rows[key]["status"] == "oscillating"
    # tanh layer, ‖W‖ = 0.8: a contraction has one fixed point, so the two answers agree within
    # (‖g(a)‖ + ‖g(b)‖) / (1 − L) per sample.
    a, b = rows["tanh-layer", "fixed_point"], rows["tanh-layer", "newton"]
    assert a["converged"] and b["converged"] and a["converged_samples"] == 4
    for s in range(4):
        gap = math.dist(solution(a, s), solution(b, s))
        bound = (
            a["result"]["samples"][s]["residual"] + b["result"]["samples"][s]["residual"]
        ) / 0.2
        assert gap <= bound


def test_suite_ranks_and_summary(suite_run: dict[str, Any]) -> None:
    doc = suite_run["doc"]
    for problem in doc["problems"]:
        done = sorted(
            (r for r in problem["solvers"] if r["converged"]), key=lambda r: r["time"]["median"]
        )
        assert [r["rank"] for r in done] == list(range(1, len(done) + 1))
        assert problem["fastest"] == done[0]["solver"] and done[0]["relative_time"] == 1.0
        for r in done:
            assert r["relative_time"] == pytest.approx(
                r["time"]["median"] / done[0]["time"]["median"]
            )
            assert r["time"]["min"] <= r["time"]["median"] <= r["time"]["max"]
            assert len(r["time"]["runs"]) == 2
        for r in problem["solvers"]:
            if not r["converged"]:
                assert r["rank"] is None and r["relative_time"] is None
            # Counts are deterministic: the repeats agree.
            assert r["deterministic"]
    summary = doc["summary"]
    solved = {r["solver"]: r["solved"] for r in summary["solvers"]}
    assert solved == {"fixed_point": 2, "newton": 5}
    assert summary["common"] == ["dottie", "tanh-layer"] and summary["unsolved"] == []
    rows = rows_by(doc)
    for entry in summary["solvers"]:
        rel = [rows[p, entry["solver"]]["relative_time"] for p in summary["common"]]
        expected = math.exp(sum(map(math.log, rel)) / len(rel))
        assert entry["geomean_relative_time"] == pytest.approx(expected)
        wins = sum(rows[p["name"], entry["solver"]]["rank"] == 1 for p in doc["problems"])
        assert entry["wins"] == wins


# -- every rendering shows the same numbers -------------------------------------------------------


def seconds(text: str) -> float:
    value, unit = text.split()
    return float(value) * UNITS[unit]


def close(text: str, value: Any, rel: float) -> bool:
    """A printed number against the JSON value, at the printed precision."""
    if text == "–":
        return value is None
    return math.isclose(float(text), float(value), rel_tol=rel, abs_tol=0.0)


def check_cells(cells: dict[str, str], row: dict[str, Any]) -> None:
    assert cells["status"].split()[0] == row["status"]
    for key in ("iterations", "nfev", "njev", "rank"):
        assert cells[key] == ("–" if row[key] is None else str(row[key])), key
    assert close(cells["residual"], row["residual"], 1e-3)
    assert math.isclose(seconds(cells["time"]), row["time"]["median"], rel_tol=6e-3)
    low, high = re.fullmatch(r"(.+?)–(.+)", cells["range"]).groups()
    unit = high.split()[1]
    low = low if " " in low else f"{low} {unit}"
    assert math.isclose(seconds(low), row["time"]["min"], rel_tol=6e-3)
    assert math.isclose(seconds(high), row["time"]["max"], rel_tol=6e-3)
    rel = cells["rel"].rstrip("×")
    assert (
        (rel == "–")
        if row["relative_time"] is None
        else abs(float(rel) - row["relative_time"]) < 6e-3
    )


TABLE_ROW = re.compile(
    r"^(?P<solver>\S+) +(?P<status>[a-z_]+(?: \([^)]*\))?) +(?P<iterations>\d+|–) +(?P<nfev>\d+|–) +"
    r"(?P<njev>\d+|–) +(?P<residual>\S+) +(?P<time>[\d.]+ (?:s|ms|µs)|–) +(?P<range>.+?) +"
    r"(?P<rel>[\d.]+×|–) +(?P<rank>\d+|–)$"
)


def test_table_agrees_with_json(suite_run: dict[str, Any]) -> None:
    doc, stdout = suite_run["doc"], suite_run["run"].stdout
    rows = rows_by(doc)
    names = [p["name"] for p in doc["problems"]]
    current, seen = None, 0
    for line in stdout.splitlines():
        head = line.split("  ")[0].strip()
        if head in names:
            current = head
            continue
        m = TABLE_ROW.match(line.strip())
        if current is not None and m and (current, m["solver"]) in rows:
            check_cells(m.groupdict(), rows[current, m["solver"]])
            seen += 1
    assert seen == len(rows) == 10
    for entry in doc["summary"]["solvers"]:
        line = next(
            x for x in stdout.splitlines() if x.startswith(entry["solver"] + " ") and "/5" in x
        )
        assert f"{entry['solved']}/5" in line and f"{entry['geomean_relative_time']:.2f}×" in line


def test_csv_agrees_with_json(suite_run: dict[str, Any]) -> None:
    rows = rows_by(suite_run["doc"])
    table = list(csv.DictReader(io.StringIO((suite_run["dir"] / "c.csv").read_text())))
    assert len(table) == len(rows)
    for line in table:
        row = rows[line["problem"], line["solver"]]
        assert line["status"] == row["status"] and line["converged"] == str(row["converged"])
        for key in ("iterations", "nfev", "njev", "jvp", "vjp", "rank"):
            assert line[key] == ("" if row[key] is None else str(row[key]))
        # CSV keeps full precision: exact equality with the JSON.
        assert float(line["residual"]) == float(row["residual"])
        assert float(line["time_median"]) == row["time"]["median"]
        assert float(line["time_min"]) == row["time"]["min"]
        assert float(line["time_max"]) == row["time"]["max"]
        assert (line["relative_time"] == "") == (row["relative_time"] is None)
        if row["relative_time"] is not None:
            assert float(line["relative_time"]) == row["relative_time"]


def test_markdown_agrees_with_json(suite_run: dict[str, Any]) -> None:
    doc = suite_run["doc"]
    rows = rows_by(doc)
    text = (suite_run["dir"] / "c.md").read_text()
    current, seen, header = None, 0, None
    for line in text.splitlines():
        if line.startswith("### "):
            current = line[4:].split(" — ")[0]
            continue
        if not line.startswith("| ") or current is None:
            continue
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        if cells[0] == "solver":
            header = cells
            continue
        if (current, cells[0]) not in rows:
            continue
        named = dict(zip(header, cells, strict=True))
        named.update(range=named["min–max"], time=named["median time"], rel=named["× fastest"])
        check_cells(named, rows[current, cells[0]])
        seen += 1
    assert seen == len(rows)
    summary = text[text.index("### Summary") :]
    for entry in doc["summary"]["solvers"]:
        assert f"| {entry['solver']} | {entry['solved']}/5 | {entry['wins']} |" in summary


# -- plots ----------------------------------------------------------------------------------------


def test_png_plots_one_per_problem(suite_run: dict[str, Any]) -> None:
    from matplotlib.image import imread

    out = suite_run["dir"]
    for problem in suite_run["doc"]["problems"]:
        path = out / f"fig-{problem['name']}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600
        # Not a blank canvas: lines and text give many distinct colours.
        assert len({tuple(px) for px in image[::7, ::7].reshape(-1, image.shape[2]).tolist()}) > 20
    assert "plot written" in suite_run["run"].stderr


def test_svg_plot_parses_and_names_every_solver(tmp_path: Path) -> None:
    target = tmp_path / "dottie.svg"
    run = invoke(
        "compare-solvers", SUITE / "dottie.yaml", "--solvers", PAIR, "--repeat", 1, "--plot", target
    )
    assert run.exit_code == 0, run.stderr
    root = ET.parse(target).getroot()
    assert root.tag.endswith("svg")
    text = target.read_text()
    # The legend names each solver with its status (matplotlib writes text as glyph paths, with
    # the string kept in a comment).
    assert "fixed_point (converged" in text and "newton (converged" in text


# -- baselines ------------------------------------------------------------------------------------


def test_doctored_baseline_fails_and_honest_rerun_passes(
    suite_run: dict[str, Any], tmp_path: Path
) -> None:
    base = suite_run["dir"] / "base.json"
    saved = json.loads(base.read_text())
    assert saved == suite_run["doc"]  # --save-baseline and --json write the same document
    honest = invoke(
        "compare-solvers", SUITE, "--solvers", PAIR, "--repeat", 1,
        "--baseline", base, "--max-slowdown", 1000, "--json", tmp_path / "rerun.json",
    )  # fmt: skip
    assert honest.exit_code == 0, honest.stderr
    assert "regression" not in honest.stderr.replace("no regressions", "")
    assert "baseline: no regressions in 7 solver-problem pair(s)" in honest.stderr
    assert json.loads((tmp_path / "rerun.json").read_text())["baseline"]["regressions"] == []

    # Doctor the baseline: every time 10⁴ × faster, so the same code now looks far slower.
    doctored = json.loads(base.read_text())
    for problem in doctored["problems"]:
        for row in problem["solvers"]:
            if row["time"]:
                row["time"]["median"] /= 1e4
    bad = tmp_path / "doctored.json"
    bad.write_text(json.dumps(doctored))
    run = invoke(
        "compare-solvers", SUITE / "dottie.yaml", SUITE / "sqrt2.yaml", "--solvers", PAIR,
        "--repeat", 1, "--baseline", bad, "--quiet",
    )  # fmt: skip
    assert run.exit_code == 1
    lines = [x for x in run.stderr.splitlines() if x.startswith("regression:")]
    flagged = {re.match(r"regression: (\S+) / (\S+): median time", x).groups() for x in lines}
    # Every pair that converged in the baseline and ran now; sqrt2/fixed_point never converged.
    assert flagged == {("dottie", "fixed_point"), ("dottie", "newton"), ("sqrt2", "newton")}
    assert "3 regression(s) in 3 solver-problem pair(s)" in run.stderr
    assert run.stdout == ""


def test_no_longer_converging_is_a_regression(tmp_path: Path) -> None:
    base = tmp_path / "base.json"
    first = invoke(
        "compare-solvers", SUITE / "dottie.yaml", "--solvers", PAIR, "--repeat", 1,
        "--max-iter", 100, "--save-baseline", base, "--quiet",
    )  # fmt: skip
    assert first.exit_code == 0, first.stderr
    # Plain iteration needs 68 iterations for the Dottie number; 50 is not enough any more.
    run = invoke(
        "compare-solvers", SUITE / "dottie.yaml", "--solvers", PAIR, "--repeat", 1,
        "--max-iter", 50, "--baseline", base, "--max-slowdown", 1000,
    )  # fmt: skip
    assert run.exit_code == 1
    assert "regression: dottie / fixed_point: converged before, now max_iter" in run.stderr
    regressions = [x for x in run.stderr.splitlines() if x.startswith("regression:")]
    assert len(regressions) == 1  # Newton still converges in 4 iterations
    assert "baseline note: dottie: max_iter differ from the baseline" in run.stderr


def test_nfev_growth_is_a_regression(tmp_path: Path) -> None:
    base = tmp_path / "base.json"
    invoke(
        "compare-solvers", SUITE / "dottie.yaml", "--solvers", "fixed_point", "--repeat", 1,
        "--tol", "1e-6", "--save-baseline", base, "--quiet",
    )  # fmt: skip
    before = json.loads(base.read_text())["problems"][0]["solvers"][0]["nfev"]
    run = invoke(
        "compare-solvers", SUITE / "dottie.yaml", "--solvers", "fixed_point", "--repeat", 1,
        "--baseline", base, "--max-slowdown", 1000, "--json", "-",
    )  # fmt: skip
    assert run.exit_code == 1
    doc = json.loads(run.stdout)  # with --json -, stdout holds only the document
    now = doc["problems"][0]["solvers"][0]["nfev"]
    # Linear convergence at rate sin(z*) ≈ 0.674: six more decades of accuracy cost more evaluations.
    assert now > before
    assert f"regression: dottie / fixed_point: nfev grew {before} → {now}" in run.stderr
    assert doc["baseline"]["regressions"][0]["what"] == "nfev"


def test_baseline_rules_on_documents() -> None:
    def row(solver: str, status: str, nfev: int | None, median: float | None) -> dict[str, Any]:
        return {
            "solver": solver, "status": status, "converged": status == "converged",
            "message": "why", "nfev": nfev, "njev": 0, "jvp": 0, "vjp": 0,
            "time": None if median is None else {"median": median},
        }  # fmt: skip

    def doc(*rows: dict[str, Any]) -> dict[str, Any]:
        return {"problems": [{"name": "p", "atol": 1e-10, "solvers": list(rows)}]}

    before = doc(
        row("a", "converged", 10, 1.0),
        row("b", "max_iter", 100, 1.0),
        row("c", "converged", 10, 1.0),
        row("d", "converged", 10, 1.0),
        row("e", "converged", 10, 1.0),
    )
    now = doc(
        row("a", "converged", 10, 2.9),  # slower, but within 3×
        row("b", "converged", 200, 9.0),  # never converged before: nothing to regress
        row("c", "error", None, None),  # could not run any more
        row("d", "converged", 9, 3.1),  # fewer evaluations, but beyond 3×
    )
    check = compare.check_baseline(now, before, max_slowdown=3.0)
    found = {(r.solver, r.what) for r in check.regressions}
    assert found == {("c", "convergence"), ("d", "time")}
    assert check.compared == 3
    assert any("p / e: in the baseline but not run now" in n for n in check.notes)
    assert "now error: why" in next(r.line() for r in check.regressions if r.solver == "c")


def test_bad_baseline_files_are_bad_input(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.json"
    garbage.write_text("{not json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"schema_version": "1", "status": "converged"}))
    for path, words in (
        (tmp_path / "missing.json", "does not exist"),
        (garbage, "cannot read"),
        (other, "not a deq compare-solvers document"),
    ):
        run = invoke("compare-solvers", SUITE / "dottie.yaml", "--baseline", path)
        assert run.exit_code == 2 and words in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


# -- failures are rows, not crashes; exit codes ---------------------------------------------------


def test_solver_that_rejects_an_option_is_an_error_row(tmp_path: Path) -> None:
    # β = 0.5 damps the naive iteration into a contraction for √2 (|1 − z*| < 1 at z* = √2);
    # Newton has no option beta and is shown with the reason instead of being dropped.
    run = invoke(
        "compare-solvers", SUITE / "sqrt2.yaml", "--solvers", PAIR, "--repeat", 1,
        "--set", "solver.beta=0.5", "--json", tmp_path / "c.json",
    )  # fmt: skip
    assert run.exit_code == 0, run.stderr
    rows = rows_by(json.loads((tmp_path / "c.json").read_text()))
    assert rows["sqrt2", "newton"]["status"] == "error"
    assert "unknown option for solver 'newton'" in rows["sqrt2", "newton"]["message"]
    assert abs(solution(rows["sqrt2", "fixed_point"])[0] - math.sqrt(2)) < 1e-11
    assert re.search(r"newton +error", run.stdout) and "newton: solver.beta" in run.stdout


def test_dense_jacobian_refusal_is_an_error_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import deqcli.problems.base as problems_base

    monkeypatch.setattr(problems_base, "DENSE_JACOBIAN_LIMIT_BYTES", 64)
    run = invoke(
        "compare-solvers", SUITE / "tanh_layer.yaml", "--solvers", PAIR, "--repeat", 1,
        "--warmup", 0, "--json", tmp_path / "c.json",
    )  # fmt: skip
    assert run.exit_code == 0, run.stderr  # fixed_point still solved it
    row = rows_by(json.loads((tmp_path / "c.json").read_text()))["tanh-layer", "newton"]
    assert row["status"] == "error" and "dense Jacobians need about" in row["message"]


@dataclass
class Broken(Solver):
    """A solver whose step fails with an internal error."""

    name: ClassVar[str] = "broken"

    def init(self, problem: Any, z0: Any) -> State:
        return State(z0, problem.g(z0))

    def step(self, problem: Any, state: State) -> State:
        raise RuntimeError("singular matrix in step")


def test_exception_inside_a_solver_is_an_error_row(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(SOLVERS, "broken", SolverInfo("broken", f"{__name__}:Broken", "fails"))
    run = invoke(
        "compare-solvers", SUITE / "dottie.yaml", "--solvers", "broken", "--repeat", 1,
        "--json", tmp_path / "c.json",
    )  # fmt: skip
    assert run.exit_code == 1  # nobody solved it
    row = rows_by(json.loads((tmp_path / "c.json").read_text()))["dottie", "broken"]
    assert row["status"] == "error"
    assert row["message"] == "RuntimeError: singular matrix in step"
    assert "not solved by any solver: dottie" in run.stdout


def test_problem_nobody_solves_exits_1() -> None:
    run = invoke(
        "compare-solvers", SUITE / "divergent.yaml", "--solvers", "fixed_point", "--repeat", 1
    )
    assert run.exit_code == 1
    assert re.search(r"fixed_point +diverged", run.stdout)
    assert "not solved by any solver: cubic-divergent" in run.stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--solvers", "nope"], "unknown solver 'nope'"),
        (["--solvers", "newton", "--all"], "exclude each other"),
        (["--plot", "fig.gif"], "must end in .png, .svg or .pdf"),
        (["--json", "-", "--csv", "-"], "only one of --json, --csv and --markdown"),
        (["--repeat", "0"], "--repeat: must be from 1 to 1000, got 0"),
        (["--repeat", "1000000000"], "--repeat: must be from 1 to 1000"),
        (["--warmup", "-1"], "--warmup: must be from 0 to 1000"),
        (["--max-slowdown", "0.5"], "--max-slowdown: must be a number ≥ 1"),
        (["--set", "run.max_iter=-3"], "run.max_iter"),
        (["--json", SUITE / "dottie.yaml"], "refusing to overwrite the input file"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[Any], words: str) -> None:
    run = invoke("compare-solvers", SUITE / "dottie.yaml", *args)
    assert run.exit_code == 2
    assert words in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert run.stdout == ""


def test_missing_config_and_empty_folder_are_bad_input(tmp_path: Path) -> None:
    run = invoke("compare-solvers", tmp_path / "nothing.yaml")
    assert run.exit_code == 2 and "does not exist" in run.stderr
    run = invoke("compare-solvers", tmp_path)
    assert run.exit_code == 2 and "holds no .yaml config files" in run.stderr


# -- solver selection, output channels, import weight ---------------------------------------------


def test_default_set_is_our_family_and_all_adds_installed_peers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    ours = [name for name, info in SOLVERS.items() if info.family == "deq"]
    installed = [
        name
        for name, info in SOLVERS.items()
        if info.family != "deq" and importlib.util.find_spec(info.family) is not None
    ]
    assert compare.resolve_solvers(None, include_peers=False) == ours
    # 'json' stands in for an installed peer library, the other for a missing one.
    monkeypatch.setitem(
        SOLVERS, "json:peer", SolverInfo("json:peer", "json:JSONDecoder", "x", "json")
    )
    monkeypatch.setitem(
        SOLVERS, "absent:peer", SolverInfo("absent:peer", "absent:X", "x", "no_such_peer_library")
    )
    assert compare.resolve_solvers(None, include_peers=False) == ours
    assert compare.resolve_solvers(None, include_peers=True) == [*ours, *installed, "json:peer"]
    assert compare.resolve_solvers(" newton , fixed_point,newton", include_peers=False) == [
        "newton", "fixed_point",
    ]  # fmt: skip


def test_default_run_compares_every_solver_of_ours(tmp_path: Path) -> None:
    run = invoke(
        "compare-solvers", SUITE / "dottie.yaml", "--repeat", 1, "--json", tmp_path / "c.json"
    )
    doc = json.loads((tmp_path / "c.json").read_text())
    ours = [name for name, info in SOLVERS.items() if info.family == "deq"]
    assert doc["settings"]["solvers"] == ours
    assert [r["solver"] for r in doc["problems"][0]["solvers"]] == ours
    assert run.exit_code == 0  # fixed_point and newton (at least) solve the Dottie number


def test_json_to_stdout_is_pure_and_no_progress_when_not_a_terminal() -> None:
    run = invoke(
        "compare-solvers", SUITE / "dottie.yaml", "--solvers", PAIR, "--repeat", 1, "--json", "-"
    )
    assert run.exit_code == 0
    doc = json.loads(run.stdout)
    assert doc["problems"][0]["name"] == "dottie"
    assert run.stderr == ""  # the progress bar stays off when stderr is not a terminal


def test_markdown_to_stdout(tmp_path: Path) -> None:
    run = invoke(
        "compare-solvers",
        SUITE / "dottie.yaml",
        "--solvers",
        PAIR,
        "--repeat",
        1,
        "--markdown",
        "-",
    )
    assert run.exit_code == 0
    assert run.stdout.startswith("## deq compare-solvers") and "| solver | status |" in run.stdout


def test_modules_do_not_import_torch() -> None:
    code = "import sys, deqcli.analyses.compare, deqcli.render.compare, deqcli.render.plots; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
