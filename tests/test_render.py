"""What the terminal shows: sparklines, notes, live progress and compare tables at any width."""

from __future__ import annotations

import io
import json
import math
import re

import pytest
import torch
from rich.console import Console

from deqcli.render.compare import render, unprefixed
from deqcli.render.progress import LIVE_DELAY, LiveProgress
from deqcli.render.report import BAD_MARK, SPARK, ZERO_MARK, spark_scale, sparkline
from deqcli.solvers.base import Iteration, StopRule
from tests.conftest import CONFIGS


def test_sparkline_marks_an_exact_zero_as_zero_and_labels_its_scale() -> None:
    values = [1.0, 1e-4, 1e-8, 0.0]
    line = sparkline(values)
    # Three decades per bar step: 1 is the top bar, 1e-8 the bottom, 0 its own mark.
    assert line == SPARK[-1] + SPARK[4] + SPARK[0] + ZERO_MARK
    assert (
        spark_scale(values) == f"log scale {SPARK[0]} 1.0e-08 … {SPARK[-1]} 1.0e+00; 0 exactly zero"
    )
    bad = [1.0, math.inf, math.nan, 1e-3]
    assert sparkline(bad) == SPARK[-1] + BAD_MARK + BAD_MARK + SPARK[0]
    assert spark_scale(bad).endswith(f"; {BAD_MARK} inf/NaN")
    # A residual that is zero from the start still draws (and says what it is).
    assert sparkline([0.0, 0.0]) == ZERO_MARK * 2 and spark_scale([0.0]) == "0 exactly zero"


def test_sparkline_keeps_the_first_and_last_values_when_downsampling() -> None:
    values = [10.0 ** (-k / 10) for k in range(200)] + [0.0]
    line = sparkline(values, width=60)
    assert len(line) == 60 and line[0] == SPARK[-1] and line[-1] == ZERO_MARK


def test_the_report_draws_the_kept_history_of_the_worst_sample(cli) -> None:
    run = cli("solve", CONFIGS / "sqrt2.yaml", "--no-diagnostics")
    # Newton on z² − 2: 1, 0.25, 6.9e-3, 6.0e-6, 4.5e-12, 4.4e-16 over 16 decades, 7 bar levels.
    assert "residual  1.0e+00 ██▇▆▃▁ 4.4e-16" in run.stdout
    assert "log scale ▁ 4.4e-16 … █ 1.0e+00" in run.stdout
    assert "‖g(z)‖ 4.441e-16" in run.stdout  # a root problem's residual is ‖g(z)‖


def test_notes_are_shown_once_under_their_solver() -> None:
    assert unprefixed("auto: anderson sufficed", "auto") == "anderson sufficed"
    assert unprefixed("anderson restarted twice", "auto") == "anderson restarted twice"


def _iteration(k: int, residual: list[float], running: int, elapsed: float) -> Iteration:
    return Iteration(k, torch.tensor(residual), running, elapsed, StopRule())


def test_live_progress_never_captures_stdout(capsys) -> None:
    """While the line is shown, stdout (the report, --json -) still goes to stdout."""
    out = io.StringIO()
    live = LiveProgress(Console(file=out, force_terminal=True, width=100))
    live(_iteration(10, [1e-3], 1, LIVE_DELAY + 0.1))
    print("report")
    live.stop()
    assert capsys.readouterr().out == "report\n" and "report" not in out.getvalue()


def test_live_progress_appears_only_for_long_solves_and_goes_away() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    live = LiveProgress(console)
    live(_iteration(0, [1.0, 2.0], 2, 0.0))
    live(_iteration(5, [1e-2, 2e-2], 2, LIVE_DELAY / 2))
    assert out.getvalue() == ""  # a short solve shows nothing
    live(_iteration(10, [1e-3, 2e-3], 2, LIVE_DELAY + 0.1))
    shown = out.getvalue()
    assert "iteration 10" in shown and "‖g‖ 2.000e-03" in shown and "2/2 samples running" in shown
    live.stop()
    assert live.live is None


@pytest.fixture(scope="module")
def comparison() -> dict:
    """A real comparison with a converged, a diverged and an oscillating row (and auto's notes)."""
    from deqcli.analyses.compare import compare

    configs = [CONFIGS / "suite" / name for name in ("dottie.yaml", "oscillating.yaml")]
    doc = compare(configs, ["fixed_point", "newton", "auto", "trust-region"], repeat=1, warmup=0)
    return json.loads(json.dumps(doc))


@pytest.mark.parametrize("width", [200, 80, 60])
def test_compare_tables_fit_the_width_and_cut_nothing(comparison, width: int) -> None:
    out = io.StringIO()
    render(comparison, Console(file=out, width=width, color_system=None))
    text = out.getvalue()
    assert "…" not in text and max(len(line) for line in text.splitlines()) <= width
    words = re.split(r"[\s,]+", text)
    for problem in comparison["problems"]:
        for row in problem["solvers"]:
            assert row["solver"] in words and row["status"] in words
            assert f"{float(row['residual']):.3e}" in words
    ranks = [row["rank"] for p in comparison["problems"] for row in p["solvers"] if row["rank"]]
    assert ranks and all(str(rank) in words for rank in ranks)
    assert "auto: auto:" not in text and "auto:" in text


# -- plots ----------------------------------------------------------------------------------------


def _texts(fig) -> list[str]:
    return [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]


def test_compare_plot_names_what_it_draws_and_keeps_the_legend_off_the_data(comparison) -> None:
    pytest.importorskip("matplotlib")
    from deqcli.render.plots import problem_figure

    fig = problem_figure(comparison["problems"][0])
    fig.canvas.draw()
    assert any("‖f(z) − z‖" in t for t in _texts(fig)) and fig._suptitle.get_text().startswith(
        "dottie"
    )
    (legend,) = fig.legends
    box = legend.get_window_extent()
    assert all(not box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    # A root problem's axis says ‖g(z)‖; curves sit at their iteration numbers, not row indices.
    root = json.loads(json.dumps(comparison["problems"][0]))
    root["form"] = "residual"
    row = next(r for r in root["solvers"] if r["curve"])
    row["curve"]["iteration"] = [10 * k for k in range(len(row["curve"]["residual"]))]
    fig = problem_figure(root)
    assert any("‖g(z)‖" in t for t in _texts(fig))
    assert max(fig.axes[0].get_lines()[0].get_xdata()) == row["curve"]["iteration"][-1]


def test_time_axis_turns_logarithmic_when_solvers_differ_by_orders_of_magnitude(
    comparison,
) -> None:
    pytest.importorskip("matplotlib")
    from deqcli.render.plots import problem_figure, wide_time_range

    problem = json.loads(json.dumps(comparison["problems"][0]))
    rows = [row for row in problem["solvers"] if row["curve"]]
    for k, row in enumerate(rows):
        row["curve"]["time"] = [t * 10.0**k for t in row["curve"]["time"]]
    assert wide_time_range(rows)
    assert problem_figure(problem).axes[1].get_xscale() == "log"
    for row in rows:  # every solver within a few percent of one second
        row["curve"]["time"] = [1.0 + 0.01 * i for i in range(len(row["curve"]["time"]))]
    assert not wide_time_range(rows)
    assert problem_figure(problem).axes[1].get_xscale() == "linear"


@pytest.mark.parametrize("count", [3, 10, 15, 24])
def test_every_solver_gets_its_own_colour(count: int) -> None:
    pytest.importorskip("matplotlib")
    from deqcli.render.plots import solver_colours

    colours = solver_colours(count)
    assert len(colours) == count and len({tuple(c) for c in colours}) == count


def test_plots_are_written_as_pdf(tmp_path, comparison) -> None:
    pytest.importorskip("matplotlib")
    from deqcli.render.plots import check_plot_target, write_plots

    (path,) = write_plots(
        {"problems": comparison["problems"][:1]}, check_plot_target(str(tmp_path / "a.pdf"))
    )
    assert path.read_bytes()[:5] == b"%PDF-"


def test_sweep_plot_is_titled_by_the_problem_and_says_when_it_draws_a_norm(cli, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    target = tmp_path / "sweep.svg"
    run = cli("sweep", CONFIGS / "linear.yaml", "-p", "c=0.5,1", "--plot", target, "-q")
    assert run.exit_code == 0, run.stderr
    text = target.read_text()
    assert "linear-affine: sweep of c" in text and "‖z*‖" in text
