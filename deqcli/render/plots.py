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
from typing import Any

from deqcli.errors import UsageError

PLOT_SUFFIXES = (".png", ".svg")
# Distinct line styles on top of colours, so curves stay apart in greyscale prints.
LINESTYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def check_plot_path(path: str, suffixes: tuple[str, ...], wanted: str) -> Path:
    """Validate ``--plot PATH`` before any solving: matplotlib present, and a folder or a file with one
    of ``suffixes`` (``wanted`` names them in the error) in a folder that exists."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot: matplotlib is not installed; pip install 'deqcli[plot]'")
    from deqcli.render.files import check_writable

    target = Path(path)
    if target.is_dir():
        if not os.access(target, os.W_OK | os.X_OK):
            raise UsageError(f"--plot: directory '{path}' is not writable")
        return target
    if target.suffix.lower() not in suffixes:
        raise UsageError(f"--plot: '{path}' must end in {wanted}")
    check_writable(target, flag="--plot")
    return target


def check_plot_target(path: str) -> Path:
    """Validate compare-solvers' ``--plot PATH``: .png or .svg, or an existing folder for PNGs."""
    return check_plot_path(
        path, PLOT_SUFFIXES, ".png or .svg (or name an existing folder for PNGs)"
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
    """Residual (worst sample) against iteration and against wall time, log scale, every solver."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    by_iter, by_time = fig.subplots(1, 2)
    curves = [row for row in problem["solvers"] if row["curve"]]
    floor = _floor(curves, problem["atol"])
    for k, row in enumerate(curves):
        residual = [_value(v, floor) for v in row["curve"]["residual"]]
        times = row["curve"]["time"]
        style = {
            "linestyle": LINESTYLES[k % len(LINESTYLES)],
            "marker": MARKERS[k % len(MARKERS)],
            "markevery": max(1, len(residual) // 12),
            "markersize": 4,
            "linewidth": 1.6,
            "label": _label(row),
        }
        by_iter.plot(range(len(residual)), residual, **style)
        by_time.plot(times, residual, **style)
    threshold = problem["atol"]
    for ax, xlabel in ((by_iter, "iteration"), (by_time, "wall time [s]")):
        ax.set_yscale("log")
        ax.set_xlabel(xlabel, fontsize=11)
        ax.set_ylabel("residual ‖f(z) − z‖ (worst sample)", fontsize=11)
        ax.grid(True, which="major", alpha=0.35)
        ax.tick_params(labelsize=10)
        if threshold > 0:
            ax.axhline(threshold, color="0.4", linewidth=1, linestyle=(0, (4, 3)), label="atol")
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
        by_time.legend(handles, labels, fontsize=9, loc="best", framealpha=0.9)
    fig.savefig(path, format=path.suffix.lstrip(".").lower(), dpi=120)


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
