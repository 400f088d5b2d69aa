"""Figures for ``deq sweep --plot``: what the fixed point, the iteration count and ρ(J) do along a sweep.

One swept key gives three stacked panels sharing the x axis, coloured by regime: the recorded value
of the solution (for samples that did not converge, the last kept iterates — the attractor, so the
logistic map draws its bifurcation diagram), the iterations, and ρ(J) with the line ρ = 1 and the
range where the contraction certificate holds shaded. Two keys give a regime map.

matplotlib is optional and imported only here, on a plain Figure with the Agg canvas (no GUI backend,
no global pyplot state).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from deqcli.analyses.sweep import SweepResult, summarise

# Classes whose orbits escape: nothing to draw in the attractor panel.
UNBOUNDED = ("diverged", "nonfinite", "growing")

# Fixed colours for the regimes that are not periods; periods take successive colours of a ramp.
COLOURS = {
    "converged": "#2ca02c",
    "slow": "#98df8a",
    "max_iter": "#ff7f0e",
    "timeout": "#ff7f0e",
    "stalled": "#8c564b",
    "undetermined": "#7f7f7f",
    "chaotic": "#525252",
    "growing": "#ff9896",
    "diverged": "#d62728",
    "nonfinite": "#000000",
    "error": "#c7c7c7",
}
# Periods 2, 3, 4, … 8 (then repeating): distinct from each other and from the fixed colours.
PERIOD_RAMP = ("#1f77b4", "#17becf", "#e7ba52", "#637939", "#843c39", "#7b4173", "#9467bd")


def check_target(path: str) -> Path:
    """Validate ``--plot PATH`` before sweeping: .png, .svg or .pdf (or a folder), and matplotlib present."""
    from deqcli.render.plots import PLOT_SUFFIXES, check_plot_path

    return check_plot_path(path, PLOT_SUFFIXES, ".png, .svg or .pdf (or name a folder)")


def colour(label: str) -> str:
    """The colour of a regime label ('period p' labels by p)."""
    if label.startswith("period "):
        p = int(label.split()[1])
        return PERIOD_RAMP[(p - 2) % len(PERIOD_RAMP)]
    return COLOURS.get(label, "#7f7f7f")


def _label_order(labels: set[str]) -> list[str]:
    def key(lab: str) -> tuple[int, int, str]:
        if lab in ("converged", "slow"):
            return (0, lab != "converged", lab)
        if lab.startswith("period "):
            return (1, int(lab.split()[1]), lab)
        return (2, 0, lab)

    return sorted(labels, key=key)


def plot_sweep(sweep: SweepResult, path: Path) -> Path:
    """Draw the sweep to ``path`` (.png, .svg or .pdf); a folder gets ``<folder>/sweep.png``."""
    if path.is_dir():
        path = path / "sweep.png"
    if len(sweep.axes) > 2:
        from deqcli.errors import UsageError

        raise UsageError("--plot: sweeps of one or two keys can be plotted; this one has more")
    if len(sweep.axes) == 1:
        _plot_1d(sweep, path)
    else:
        _plot_2d(sweep, path)
    return path


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _plot_1d(sweep: SweepResult, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    axis = sweep.axes[0]
    fig = Figure(figsize=(9, 8.5), layout="constrained")
    FigureCanvasAgg(fig)
    top, mid, low = fig.subplots(3, 1, sharex=True)
    seen: set[str] = set()
    series: dict[str, dict[str, list[float]]] = {}
    for p in sweep.points:
        x = axis.values[p["index"][0]]
        if not isinstance(x, (int, float)):
            continue
        if p.get("status") == "error":
            seen.add("error")
            series.setdefault("error", {"x": [], "y": [], "ix": [], "iy": [], "rx": [], "ry": []})
            continue
        for s in p["samples"]:
            lab = s["label"]
            seen.add(lab)
            d = series.setdefault(lab, {"x": [], "y": [], "ix": [], "iy": [], "rx": [], "ry": []})
            # An escaping orbit has no attractor to draw, and its size would flatten the others.
            orbit = [] if s["classification"] in UNBOUNDED else s["orbit"]
            for v in orbit:
                if (fv := _finite(v)) is not None:
                    d["x"].append(x)
                    d["y"].append(fv)
            d["ix"].append(x)
            d["iy"].append(s["iterations"])
            if (rho := _finite(s.get("rho"))) is not None:
                d["rx"].append(x)
                d["ry"].append(rho)
    dense = len(sweep.points) > 80
    for lab in _label_order(seen):
        d = series[lab]
        style = {"color": colour(lab), "label": lab, "s": 3 if dense else 14, "linewidths": 0}
        top.scatter(d["x"], d["y"], **style)
        mid.scatter(d["ix"], d["iy"], **style)
        low.scatter(d["rx"], d["ry"], **style)
    top.set_ylabel(_value_label(sweep) + "  (attractor if not converged)")
    top.ticklabel_format(axis="y", useOffset=False)
    mid.set_ylabel("iterations")
    if any(d["iy"] and max(d["iy"]) > 0 for d in series.values()):
        mid.set_yscale("log")
    low.set_ylabel("ρ(∂f/∂z)")
    low.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    summary = summarise(sweep)
    xs = sorted({float(v) for v in axis.values if isinstance(v, (int, float))})
    edges = _edges(xs) if len(xs) > 1 else [xs[0], xs[0]] if xs else []
    for lo, hi in summary.get("certificate_ranges", []):
        # Shade out to half-way to the neighbouring points: the transition lies somewhere there.
        left = edges[xs.index(float(lo))] if float(lo) in xs else lo
        right = edges[xs.index(float(hi)) + 1] if float(hi) in xs else hi
        for ax in (top, mid, low):
            ax.axvspan(left, right, color="#2ca02c", alpha=0.08, linewidth=0)
    if "lr_limit" in summary:
        for ax in (top, mid, low):
            ax.axvline(summary["lr_limit"], color="#d62728", linewidth=0.9, linestyle=":")
        low.text(summary["lr_limit"], 1.0, " 2/λmax", color="#d62728", va="bottom", fontsize=8)
    low.set_xlabel(axis.name if axis.name == axis.key else f"{axis.name}  ({axis.key})")
    for ax in (top, mid, low):
        ax.grid(True, alpha=0.3)
    # Outside the axes, so no regime's points are hidden behind it.
    top.legend(
        loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, markerscale=2 if dense else 1
    )
    top.set_title(f"{_title(sweep)}: sweep of {axis.name}", loc="left")
    fig.savefig(path)


def _plot_2d(sweep: SweepResult, path: Path) -> None:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ya, xa = sweep.axes
    labels = {p.get("label", "error") for p in sweep.points}
    order = _label_order(labels)
    code = {lab: k for k, lab in enumerate(order)}
    grid = np.full((len(ya.values), len(xa.values)), np.nan)
    for p in sweep.points:
        i, j = p["index"]
        grid[i, j] = code[p.get("label", "error")]
    fig = Figure(figsize=(8, 6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    cmap = ListedColormap([colour(lab) for lab in order])
    numeric = all(isinstance(v, (int, float)) for v in (*xa.values, *ya.values))
    if numeric and len(xa.values) > 1 and len(ya.values) > 1:
        x = _edges([float(v) for v in xa.values])
        y = _edges([float(v) for v in ya.values])
        ax.pcolormesh(x, y, grid, cmap=cmap, vmin=-0.5, vmax=len(order) - 0.5)
    else:
        ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=len(order) - 0.5, origin="lower", aspect="auto")
        ax.set_xticks(range(len(xa.values)), [str(v) for v in xa.values])
        ax.set_yticks(range(len(ya.values)), [str(v) for v in ya.values])
    ax.set_xlabel(xa.name)
    ax.set_ylabel(ya.name)
    ax.legend(
        handles=[Patch(color=colour(lab), label=lab) for lab in order],
        loc="upper left",
        bbox_to_anchor=(1.01, 1),
        fontsize=8,
    )
    ax.set_title(f"{_title(sweep)}: regimes over {ya.name} × {xa.name}", loc="left")
    fig.savefig(path)


def _title(sweep: SweepResult) -> str:
    return sweep.problem or Path(sweep.source).stem


def _value_label(sweep: SweepResult) -> str:
    """What the top panel draws (‖z*‖ when a norm is recorded), as the points say."""
    labels = {p["value_label"] for p in sweep.points if "value_label" in p}
    if len(labels) == 1:
        return labels.pop()
    value = sweep.options.value
    names = {"norm": "‖z*‖", "mean": "mean(z*)", "max": "max(z*)", "min": "min(z*)"}
    return names.get(value, "z* (or ‖z*‖ for vectors)" if value == "auto" else f"z*[{value}]")


def _edges(values: list[float]) -> list[float]:
    """Cell edges around sorted centres (half-way between neighbours)."""
    mids = [(a + b) / 2 for a, b in itertools.pairwise(values)]
    first = values[0] - (mids[0] - values[0])
    last = values[-1] + (values[-1] - mids[-1])
    return [first, *mids, last]
