"""Rich rendering of sensitivities, gradient checks and sweeps (with the sweep's progress bar and its
lines on stderr). Knows their records, not configs or CLIs.

Imports no torch at module level: the records arrive already computed.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from deqcli.render.report import fmt, fmt_time

if TYPE_CHECKING:
    from collections.abc import Iterator

    from deqcli.analyses.gradcheck import GradcheckReport
    from deqcli.analyses.jobs import PointCallback, SweepOutcome
    from deqcli.analyses.sensitivity import Sensitivity
    from deqcli.analyses.sweep import SweepResult

# A per-sample dz*/da with at most this many entries is printed in full.
FULL_ENTRIES = 24
# Samples listed one by one in a sensitivity report.
SAMPLES_SHOWN = 8
# Regime-map characters for 2-D sweeps (legend printed below the map).
MAP_CHARS = {
    "converged": "·",
    "slow": "s",
    "max_iter": "m",
    "timeout": "t",
    "stalled": "=",
    "undetermined": "?",
    "chaotic": "#",
    "growing": "g",
    "diverged": "x",
    "nonfinite": "!",
    "error": "E",
}
MAP_LIMIT = 80


# -- sensitivity ---------------------------------------------------------------------------------------


def render_sensitivity(sens: Sensitivity, console: Console) -> None:
    """dz*/da: in full when small, else its norm and largest entries, with the solve and conditioning."""
    batch = sens.jacobian.shape[0]
    n = sens.jacobian.shape[1]
    shape = "×".join(str(s) for s in sens.shape) or "scalar"
    head = Table.grid(padding=(0, 2))
    head.add_column(style="dim")
    head.add_column()
    head.add_row("parameter", f"{sens.name} ({shape})")
    head.add_row(
        "method",
        f"(I − ∂f/∂z) dz* = ∂f/∂a da, {sens.mode} mode: {sens.solve.systems} {sens.solve.method} "
        f"solve(s) per sample",
    )
    solve_style = "" if sens.solve.converged else "bold red"
    head.add_row(
        "linear solve",
        Text(
            f"relative residual {fmt(sens.solve.residual)} (tol {sens.solve.tol:g}), "
            f"{sens.solve.iterations} iterations, {sens.solve.matvecs} products",
            style=solve_style,
        ),
    )
    cond = sens.conditioning
    worst = min(range(batch), key=lambda b: _safe(cond.sigma_min[b]))
    line = f"σ_min(I − ∂f/∂z) {fmt(cond.sigma_min[worst])}, amplification ‖(I − ∂f/∂z)⁻¹‖ {fmt(cond.amplification[worst])}"
    rho = cond.spectral_radius[worst]
    if rho is not None:
        line += f", ρ(∂f/∂z) {rho:.4g}"
    text = Text(line)
    if cond.method != "dense":
        text.append(f"  ({cond.method} estimate)", style="dim")
    if batch > 1:
        text.append(f"  (sample {worst}, the worst)", style="dim")
    head.add_row("conditioning", text)
    parts: list[Any] = [head, Text("")]
    per = n * max(1, math.prod(sens.shape))
    if per <= FULL_ENTRIES:
        parts.append(_full_table(sens, min(batch, SAMPLES_SHOWN)))
    else:
        parts.append(_largest_table(sens, min(batch, SAMPLES_SHOWN)))
    if batch > SAMPLES_SHOWN:
        parts.append(
            Text(
                f"first {SAMPLES_SHOWN} of {batch} samples shown; --json has them all", style="dim"
            )
        )
    for note in sens.notes:
        style = "bold red" if "near singular" in note else "yellow"
        parts.append(Text(f"note: {note}", style=style))
    border = "red" if any(cond.near_singular) or not sens.solve.converged else "cyan"
    console.print(
        Panel(
            Group(*parts),
            title=Text(f"sensitivity dz*/d{sens.name}"),  # a Panel reads markup in str titles
            title_align="left",
            border_style=border,
        )
    )


def _full_table(sens: Sensitivity, samples: int) -> Table:
    table = Table(box=None, padding=(0, 2), header_style="bold")
    batch = sens.jacobian.shape[0]
    if batch > 1:
        table.add_column("sample", justify="right")
    table.add_column("entry")
    table.add_column("dz*/d" + sens.name, justify="right")
    n = sens.jacobian.shape[1]
    for b in range(samples):
        flat = sens.jacobian[b].reshape(n, -1)
        for i in range(n):
            for j in range(flat.shape[1]):
                index = _param_index(j, sens.shape)
                entry = f"dz*[{i}]/d{sens.name}{index}" if n > 1 or index else f"dz*/d{sens.name}"
                row = [entry, fmt(float(flat[i, j]), 6)]
                table.add_row(*([str(b)] if batch > 1 else []), *row)
    return table


def _largest_table(sens: Sensitivity, samples: int) -> Table:
    table = Table(box=None, padding=(0, 2), header_style="bold")
    table.add_column("sample", justify="right")
    table.add_column("‖dz*/d" + sens.name + "‖_F", justify="right")
    table.add_column(f"largest entries [z index, {sens.name} index]=value")
    norms = sens.norms
    largest = sens.largest()
    for b in range(samples):
        text = ",  ".join(f"[{','.join(str(i) for i in idx)}]={fmt(v, 2)}" for idx, v in largest[b])
        table.add_row(str(b), fmt(norms[b]), text)
    return table


def _param_index(j: int, shape: tuple[int, ...]) -> str:
    if not shape:
        return ""
    idx = []
    for size in reversed(shape):
        idx.append(j % size)
        j //= size
    return "[" + ",".join(str(i) for i in reversed(idx)) + "]"


# -- gradcheck -----------------------------------------------------------------------------------------


def render_gradcheck(report: GradcheckReport, console: Console) -> None:
    """The three gradients side by side, the backward solve, the Jacobian check and the verdict."""
    fwd = report.forward
    head = Table.grid(padding=(0, 2))
    head.add_column(style="dim")
    head.add_column()
    head.add_row("problem", report.problem)
    head.add_row("loss", f"ℓ = Σ_samples {report.loss_text}  = {fmt(report.loss, 6)}")
    head.add_row("parameters", ", ".join(report.params))
    head.add_row(
        "forward",
        Text.assemble(
            (fwd.status.value, "green" if fwd.status.ok else "bold red"),
            f"  {fwd.solver}, {fwd.nit} iterations, ‖f(z)−z‖ {fmt(max(fwd.final_residuals()))} (atol {fwd.atol:g})",
        ),
    )
    b = report.backward
    head.add_row(
        "backward",
        Text(
            f"{b.method}: {b.iterations} iterations, relative residual {fmt(b.residual)} (tol {b.tol:g})",
            style="" if b.converged else "bold red",
        ),
    )
    cond = report.conditioning
    rhos = [r for r in cond.spectral_radius if r is not None]
    line = f"σ_min(I − ∂f/∂z) {fmt(min(cond.sigma_min))}"
    if rhos:
        line += f", ρ(∂f/∂z) {max(rhos):.4g}"
    head.add_row("conditioning", line)

    table = Table(box=None, padding=(0, 2), header_style="bold", title_justify="left")
    table.add_column("gradient")
    table.add_column("‖∇ℓ‖", justify="right")
    table.add_column("error vs (3)", justify="right")
    table.add_column("", style="dim")
    fd_err = Text(fmt(report.error_ift), style="green" if report.agree else "bold red")
    table.add_row("(1) implicit (IFT)", fmt(_norm(report.ift)), fd_err, "adjoint solve at z*")
    table.add_row(
        f"(2) unrolled ×{report.unroll_steps}",
        fmt(_norm(report.unrolled)),
        fmt(report.error_unrolled),
        f"final ‖g‖ {fmt(report.unroll_residual, 1)}, vs (1) {fmt(report.ift_vs_unrolled, 1)}",
    )
    table.add_row(
        f"(3) finite diff. ×{len(report.directions)}",
        "",
        "reference",
        f"eps {report.eps:.2g}, re-solved to atol {report.fd_atol:.2g}",
    )
    jac = Table(box=None, padding=(0, 2), header_style="bold")
    jac.add_column("autodiff check")
    jac.add_column("directions", justify="right")
    jac.add_column("largest discrepancy", justify="right")
    jac.add_column("relative", justify="right")
    for c in report.jacobian_checks:
        jac.add_row(
            c.what,
            str(c.directions),
            fmt(c.max_abs),
            Text(fmt(c.max_rel), style="green" if c.ok else "bold red"),
        )
    parts: list[Any] = [head, Text(""), table, Text(""), jac, Text("")]
    if report.ok:
        parts.append(
            Text(
                f"ok: the IFT gradient agrees with finite differences to {report.error_ift:.2g} "
                f"(tolerance {report.rtol:g})",
                style="bold green",
            )
        )
    elif report.silent_failure:
        parts.append(
            Text(
                f"warning: the forward solve converged, yet the IFT gradient is off by {report.error_ift:.2g} "
                f"(tolerance {report.rtol:g})",
                style="bold red",
            )
        )
    else:
        parts.append(Text("the gradients cannot be trusted", style="bold red"))
    for cause in report.causes:
        parts.append(Text(f"  likely cause: {cause}", style="yellow"))
    for note in report.notes:
        parts.append(Text(f"note: {note}", style="yellow"))
    console.print(
        Panel(
            Group(*parts),
            title="deq gradcheck",
            title_align="left",
            border_style="green" if report.ok else "red",
        )
    )


def _norm(grads: dict[str, Any]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in grads.values()))


# -- sweep ---------------------------------------------------------------------------------------------


def render_sweep(sweep: SweepResult, console: Console) -> None:
    """Where convergence is lost, where the period changes, where the certificate holds."""
    from deqcli.analyses.sweep import summarise

    summary = summarise(sweep)
    head = Table.grid(padding=(0, 2))
    head.add_column(style="dim")
    head.add_column()
    head.add_row("config", sweep.source)
    for a in sweep.axes:
        span = f"{_v(a.values[0])} … {_v(a.values[-1])}" if len(a.values) > 1 else _v(a.values[0])
        head.add_row(
            "sweep",
            Text.assemble(f"{a.name} = {span}, {len(a.values)} values", (f"  ({a.key})", "dim")),
        )
    done = len(sweep.points)
    state = "interrupted" if sweep.interrupted else "complete" if done == sweep.total else "partial"
    extra = f", {sweep.resumed} read back from the results file" if sweep.resumed else ""
    head.add_row("points", f"{done}/{sweep.total} ({state}{extra}), {fmt_time(sweep.wall_time)}")
    where = sweep.execution
    if where.get("backend") == "dask":
        workers = where.get("workers")
        threads = where.get("threads_per_worker", 1)
        head.add_row(
            "ran on",
            f"Dask ({where.get('cluster')}), {workers if workers is not None else '?'} workers, "
            f"{threads} torch thread{'' if threads == 1 else 's'} each",
        )
    if sweep.warm_start:
        head.add_row("starts", "warm: each point from its converged neighbour's solution")
    if sweep.results_path:
        head.add_row("results", sweep.results_path)
    labels = ", ".join(f"{n} {lab}" for lab, n in summary["labels"].items())
    head.add_row("regimes", labels or "–")
    parts: list[Any] = [head]
    if "regimes" in summary:
        parts += [Text(""), _regimes_table(sweep, summary)]
        events = summary["events"]
        if events:
            parts.append(Text(""))
        for e in events:
            a, b = e["between"]
            style = "bold red" if e["event"] == "convergence lost" else "bold"
            parts.append(
                Text.assemble(
                    (f"{e['event']}", style),
                    f" between {sweep.axes[0].name} = {_v(a)} and {_v(b)}: {e['from']} → {e['to']}",
                )
            )
        cert = summary["certificate_ranges"]
        if cert:
            ranges = ", ".join(f"[{_v(lo)}, {_v(hi)}]" for lo, hi in cert)
            parts.append(
                Text(
                    f"contraction certificate (L < 1) holds for {sweep.axes[0].name} in {ranges}",
                    style="green",
                )
            )
        elif any(p.get("certificate") is not None for p in sweep.points):
            parts.append(
                Text("the contraction certificate holds nowhere on this sweep", style="yellow")
            )
        if "lr_limit" in summary:
            parts.append(
                Text(
                    f"theory: gradient descent on this quadratic converges exactly when lr < 2/λmax = {summary['lr_limit']:.6g}"
                )
            )
        rho = summary["rho_below_one_ranges"]
        if rho:
            ranges = ", ".join(f"[{_v(lo)}, {_v(hi)}]" for lo, hi in rho)
            parts.append(
                Text(f"ρ(∂f/∂z) < 1 (locally attracting) for {sweep.axes[0].name} in {ranges}")
            )
    elif len(sweep.axes) == 2:
        parts += [Text(""), *_regime_map(sweep)]
    errors = [p for p in sweep.points if p.get("status") == "error"]
    if errors:
        parts.append(
            Text(f"{len(errors)} point(s) failed; first: {errors[0]['error']}", style="bold red")
        )
    for note in sweep.notes:
        parts.append(Text(f"note: {note}", style="yellow"))
    console.print(Panel(Group(*parts), title="deq sweep", title_align="left", border_style="cyan"))


def report_sweep(outcome: SweepOutcome, out: Console, err: Console, *, quiet: bool) -> None:
    """The plot written (on ``err``), the sweep's panel on ``out`` (unless quiet or an output went to
    stdout), and how to continue an interrupted sweep (on ``err``)."""
    sweep = outcome.sweep
    if outcome.plot is not None and not quiet:
        err.print(Text(f"plot written: {outcome.plot}", style="dim"), soft_wrap=True)
    if not quiet and not outcome.to_stdout:
        render_sweep(sweep, out)
    if sweep.interrupted:
        results = sweep.results_path
        where = f"; --resume --results {results} continues" if results is not None else ""
        err.print(
            f"interrupted after {len(sweep.points)} of {sweep.total} points{where}",
            highlight=False,
            soft_wrap=True,
        )


@contextmanager
def sweep_progress(console: Console, *, enabled: bool) -> Iterator[PointCallback]:
    """A transient progress bar of the sweep's points on ``console`` (stderr); hidden when disabled."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from deqcli.analyses.sweep import describe_point

    columns = (
        TextColumn("sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}", markup=False),
    )
    with Progress(*columns, console=console, transient=True, disable=not enabled) as bar:
        task = bar.add_task("", total=None)

        def step(count: int, total: int, point: dict[str, Any]) -> None:
            bar.update(task, completed=count, total=total, description=describe_point(point))

        yield step


def _regimes_table(sweep: SweepResult, summary: dict[str, Any]) -> Table:
    from deqcli.render.sweep_plots import colour

    name = sweep.axes[0].name
    table = Table(box=None, padding=(0, 2), header_style="bold")
    table.add_column(f"{name} from", justify="right")
    table.add_column("to", justify="right")
    table.add_column("regime")
    table.add_column("points", justify="right")
    table.add_column("iterations", justify="right")
    for r in summary["regimes"]:
        its = r["iterations"]
        span = str(its[0]) if its[0] == its[1] else f"{its[0]} → {its[1]}"
        table.add_row(
            _v(r["from"]),
            _v(r["to"]),
            Text(r["label"], style=colour(r["label"])),
            str(r["points"]),
            span,
        )
    return table


def _regime_map(sweep: SweepResult) -> list[Any]:
    ya, xa = sweep.axes
    if len(xa.values) > MAP_LIMIT or len(ya.values) > MAP_LIMIT:
        return [Text(f"(regime map shown up to {MAP_LIMIT}×{MAP_LIMIT}; see --plot)", style="dim")]
    cells = {tuple(p["index"]): p.get("label", "error") for p in sweep.points}
    used: dict[str, str] = {}
    lines = [
        Text(f"{ya.name} ↓  {xa.name} → {_v(xa.values[0])} … {_v(xa.values[-1])}", style="dim")
    ]
    for i in reversed(range(len(ya.values))):
        row = Text(f"{_v(ya.values[i]):>10} ")
        for j in range(len(xa.values)):
            lab = cells.get((i, j))
            if lab is None:
                row.append(" ")
                continue
            ch = _char(lab)
            used[lab] = ch
            row.append(ch)
        lines.append(row)
    legend = "  ".join(f"{ch} {lab}" for lab, ch in used.items())
    lines.append(Text(f"{'':>10} {legend}", style="dim"))
    return lines


def _char(label: str) -> str:
    if label.startswith("period "):
        p = int(label.split()[1])
        return str(p) if p < 10 else "p"
    return MAP_CHARS.get(label, "?")


def _v(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _safe(x: float) -> float:
    return math.inf if math.isnan(x) else x
