"""Figures for ``deq compare-solvers --plot``: residual against iteration and against time.

matplotlib is optional (``pip install deqcli[plot]``) and imported only inside these functions. The
figures are drawn on a plain ``Figure`` with the Agg canvas, so no GUI backend is touched and the
global pyplot state stays as it was.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deqcli.errors import UsageError
from deqcli.render.report import residual_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOT_SUFFIXES = (".png", ".svg", ".pdf")
# Distinct line styles on top of colours, so curves stay apart in greyscale prints.
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def check_plot_path(path: str, suffixes: tuple[str, ...], wanted: str) -> Path:
    """Validate ``--plot PATH`` before any solving: matplotlib present, and a folder or a file with one
    of ``suffixes`` (``wanted`` names them in the error) in a folder that exists.

    A path ending in ``/`` names a folder; it is created if its parent exists (``--plot plots/``).
    """
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot: matplotlib is not installed; pip install 'deqcli[plot]'")
    from deqcli.render.files import check_not_empty, check_writable

    check_not_empty(path, flag="--plot")
    target = Path(path)
    if target.is_dir():
        if not os.access(target, os.W_OK | os.X_OK):
            raise UsageError(f"--plot: directory '{path}' is not writable")
        return target
    if path.endswith(("/", os.sep)):
        if target.exists() or not target.parent.is_dir():
            raise UsageError(f"--plot: cannot make the folder '{path}' (its parent must exist)")
        target.mkdir()
        return target
    if target.suffix.lower() not in suffixes:
        raise UsageError(f"--plot: '{path}' must end in {wanted}")
    check_writable(target, flag="--plot")
    return target


def check_plot_target(path: str) -> Path:
    """Validate compare-solvers' ``--plot PATH``: .png, .svg or .pdf, or an existing folder for
    PNGs."""
    return check_plot_path(
        path, PLOT_SUFFIXES, ".png, .svg or .pdf (or name an existing folder for PNGs)"
    )


def plot_paths(target: Path, names: list[str]) -> list[Path]:
    """One file per problem: ``target`` itself for one problem, ``stem-<problem>.ext`` for several,
    ``<folder>/<problem>.png`` when ``target`` is a folder."""
    if target.is_dir():
        return [target / f"{_slug(name)}.png" for name in names]
    if len(names) == 1:
        return [target]
    return [target.with_name(f"{target.stem}-{_slug(name)}{target.suffix}") for name in names]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "problem"


def write_plots(doc: dict[str, Any], target: Path) -> list[Path]:
    """Draw every problem of a comparison document; returns the files written."""
    paths = plot_paths(target, [p["name"] for p in doc["problems"]])
    for problem, path in zip(doc["problems"], paths, strict=True):
        plot_problem(problem, path)
    return paths


def plot_problem(problem: dict[str, Any], path: Path) -> None:
    """Draw one problem of a comparison (see ``problem_figure``) to ``path`` (.png, .svg, .pdf)."""
    problem_figure(problem).savefig(path, format=path.suffix.lstrip(".").lower(), dpi=120)


def problem_figure(problem: dict[str, Any]) -> Figure:
    """Residual (worst sample) against iteration and against wall time, log scale, every solver.

    The y axis names what is drawn (‖g(z)‖ for a root problem, ‖f(z) − z‖ for a map); the time
    axis turns logarithmic when the solvers' times differ by two orders of magnitude or more; the
    legend sits below the axes, so it never hides a curve; each solver has its own colour, line
    style and marker, however many there are.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = [row for row in problem["solvers"] if row["curve"]]
    fig = Figure(figsize=(11, 5 + 0.25 * math.ceil(len(curves) / 3)), layout="constrained")
    FigureCanvasAgg(fig)
    by_iter, by_time = fig.subplots(1, 2)
    floor = _floor(curves, problem["atol"])
    colours = solver_colours(len(curves))
    for k, row in enumerate(curves):
        curve = row["curve"]
        residual = [_value(v, floor) for v in curve["residual"]]
        iterations = curve.get("iteration") or list(range(len(residual)))
        style = {
            "color": colours[k],
            "linestyle": LINESTYLES[k % len(LINESTYLES)],
            "marker": MARKERS[k % len(MARKERS)],
            "markevery": max(1, len(residual) // 12),
            "markersize": 4,
            "linewidth": 1.6,
            "label": _label(row),
        }
        by_iter.plot(iterations, residual, **style)
        by_time.plot(curve["time"], residual, **style)
    name = residual_name(problem.get("form", "fixed_point")).replace("−", " − ")
    threshold = problem["atol"]
    for ax, xlabel in ((by_iter, "iteration"), (by_time, "wall time [s]")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel, fontsize=11)
        ax.set_ylabel(f"residual {name} (worst sample)", fontsize=11)
        ax.grid(True, which="major", alpha=0.35)
        ax.tick_params(labelsize=10)
        if threshold > 0:
            ax.axhline(threshold, color="0.4", linewidth=1, linestyle=(0, (4, 3)), label="atol")
    if wide_time_range(curves):
        by_time.set_xscale("log")
        by_time.set_xlabel("wall time [s] (log scale)", fontsize=11)
    failed = [row["solver"] for row in problem["solvers"] if not row["curve"]]
    title = problem["name"] + (f"  ({problem['description']})" if problem["description"] else "")
    fig.suptitle(title, fontsize=13)
    handles, labels = by_iter.get_legend_handles_labels()
    if failed:
        by_iter.text(
            0.01,
            0.01,
            "not drawn (error): " + ", ".join(failed),
            transform=by_iter.transAxes,
            fontsize=9,
            color="firebrick",
        )
    if handles:
        # As many columns as the labels' length lets fit across the figure (about 150 characters).
        columns = max(1, min(3, len(handles), 150 // (max(map(len, labels)) + 6)))
        fig.legend(handles, labels, loc="outside lower center", ncols=columns, fontsize=9)
    return fig


# Times this many times apart get a logarithmic time axis.
LOG_TIME_RATIO = 100.0


def wide_time_range(rows: list[dict[str, Any]]) -> bool:
    """Whether the solvers' total times differ by ``LOG_TIME_RATIO`` or more."""
    ends = [row["curve"]["time"][-1] for row in rows if row["curve"]["time"]]
    ends = [t for t in ends if isinstance(t, (int, float)) and t > 0]
    return len(ends) > 1 and max(ends) >= LOG_TIME_RATIO * min(ends)


def solver_colours(count: int) -> list[Any]:
    """``count`` distinct colours: matplotlib's ten, then tab20's twenty, then evenly spaced hues."""
    from matplotlib import colormaps

    if count <= 10:
        return [colormaps["tab10"](k) for k in range(count)]
    if count <= 20:
        return [colormaps["tab20"](k) for k in range(count)]
    return [colormaps["turbo"](k / (count - 1)) for k in range(count)]


def _label(row: dict[str, Any]) -> str:
    status = row["status"] + (f", period {row['period']}" if row["period"] else "")
    return f"{row['solver']} ({status}, {row['iterations']} it, nfev {row['nfev']})"


def _floor(rows: list[dict[str, Any]], atol: float) -> float:
    """Exact zeros cannot sit on a log axis: draw them a decade below the smallest positive value."""
    positive = [
        float(v)
        for row in rows
        for v in row["curve"]["residual"]
        if isinstance(v, (int, float)) and v > 0
    ]
    lowest = min([*positive, atol] if atol > 0 else positive, default=1.0)
    return lowest / 10


def _value(v: Any, floor: float) -> float:
    """A JSON residual as a plottable float: "inf"/"nan" become gaps, zeros sit on the floor."""
    x = float(v) if v is not None else math.nan
    if not math.isfinite(x):
        return math.nan
    return x if x > 0 else floor
