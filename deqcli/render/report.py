"""Rich rendering of results for the terminal. Knows results, not configs or solvers."""

from __future__ import annotations

import math
from collections import Counter as Tally
from typing import Any

from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from deqcli.result import SolveResult, Status

SPARK = "▁▂▃▄▅▆▇█"
# Values a log scale cannot draw: an exact zero (a root hit exactly) and inf/NaN.
ZERO_MARK = "0"
BAD_MARK = "×"
STATUS_STYLE = {
    Status.CONVERGED: "bold green",
    Status.MAX_ITER: "bold yellow",
    Status.TIMEOUT: "bold yellow",
    Status.STALLED: "bold yellow",
    Status.OSCILLATING: "bold magenta",
    Status.DIVERGED: "bold red",
    Status.NONFINITE: "bold red",
}
# Batches up to this size list every sample; larger ones list only the worst.
LIST_ALL_SAMPLES = 8
WORST_SHOWN = 5
# z* is printed in full up to this many entries per sample and this many samples.
SOLUTION_ENTRIES = 8
SOLUTION_SAMPLES = 4
# Otherwise the norm of the worst sample's z* and its first entries.
SOLUTION_FIRST = 4


def fmt(value: float | None, digits: int = 3) -> str:
    """Compact scientific formatting that survives inf/NaN."""
    if value is None:
        return "–"
    v = float(value)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}e}"


def fmt_time(seconds: float) -> str:
    """Seconds as s, ms or µs."""
    if seconds >= 1:
        return f"{seconds:.3g} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds * 1e6:.3g} µs"


def sparkline(values: list[float], width: int = 60) -> str:
    """log10 of positive values as a one-line bar chart, downsampled to ``width`` columns.

    The bars span the smallest to the largest positive value (``spark_scale`` says which);
    an exact zero is drawn as ``ZERO_MARK`` and inf, NaN or a negative value as ``BAD_MARK``.
    """
    if len(values) > width:
        step = len(values) / width
        values = [values[min(len(values) - 1, int(i * step))] for i in range(width - 1)] + [
            values[-1]
        ]
    positive = [math.log10(v) for v in values if v > 0 and math.isfinite(v)]
    if not positive and not any(v == 0 for v in values):
        return ""
    lo, hi = (min(positive), max(positive)) if positive else (0.0, 0.0)
    span = hi - lo or 1.0
    chars = []
    for v in values:
        if v == 0:
            chars.append(ZERO_MARK)
        elif not (v > 0 and math.isfinite(v)):
            chars.append(BAD_MARK)
        else:
            level = (math.log10(v) - lo) / span * (len(SPARK) - 1)
            chars.append(SPARK[min(len(SPARK) - 1, int(level + 0.5))])
    return "".join(chars)


def spark_scale(values: list[float]) -> str:
    """The key to a sparkline of ``values``: its log scale's ends and the marks it uses."""
    positive = [v for v in values if v > 0 and math.isfinite(v)]
    parts = []
    if positive:
        lo, hi = min(positive), max(positive)
        parts.append(
            f"log scale {SPARK[0]} {fmt(lo, 1)} … {SPARK[-1]} {fmt(hi, 1)}"
            if hi > lo
            else f"{SPARK[0]} {fmt(lo, 1)}"
        )
    if any(v == 0 for v in values):
        parts.append(f"{ZERO_MARK} exactly zero")
    if any(not (v >= 0 and math.isfinite(v)) for v in values):
        parts.append(f"{BAD_MARK} inf/NaN")
    return "; ".join(parts)


def residual_name(form: str) -> str:
    """What the residual of a problem in ``form`` is: ‖g(z)‖ for a root problem, else ‖f(z)−z‖."""
    return "‖g(z)‖" if form == "residual" else "‖f(z)−z‖"


def status_text(status: Status) -> Text:
    """The status name in its colour."""
    return Text(status.value, style=STATUS_STYLE[status])


def worst_sample(result: SolveResult) -> int:
    """Index of the sample with the largest final residual (non-converged first)."""
    finals = result.final_residuals()

    def badness(b: int) -> tuple[int, float]:
        r = finals[b]
        return (0 if result.sample_status[b].ok else 1, math.inf if math.isnan(r) else r)

    return max(range(result.batch), key=badness)


def render_result(result: SolveResult, console: Console, *, description: str = "") -> None:
    """Print the full human report of one solve."""
    status = result.status
    head = Table.grid(padding=(0, 2))
    head.add_column(style="dim")
    head.add_column()
    head.add_row(
        "problem", Text.assemble(result.problem, (f"  {description}" if description else "", "dim"))
    )
    opts = ", ".join(f"{k}={v}" for k, v in result.options.items())
    head.add_row("solver", f"{result.solver}" + (f" ({opts})" if opts else ""))
    head.add_row("device", f"{result.device}, {result.dtype}, batch {result.batch}")
    tol = f"atol {result.atol:g}" + (f", rtol {result.rtol:g}" if result.rtol else "")
    head.add_row("stop", f"{tol}, max_iter {result.max_iter}")
    line = Text.assemble(status_text(status), "  ", (status.message, "dim"))
    if result.batch > 1:
        line.append(
            f"  ({sum(s.ok for s in result.sample_status)}/{result.batch} samples converged)"
        )
    head.add_row("status", line)

    totals = result.counts.totals()
    head.add_row("iterations", str(result.nit))
    evals = ", ".join(f"{k} {v}" for k, v in totals.items() if v or k == "nfev")
    head.add_row("evaluations", evals)
    finals = result.final_residuals()
    head.add_row(
        "residual",
        Text.assemble(
            f"{residual_name(result.form)} {fmt(max(finals))}  "
            f"(relative {fmt(max(result.final_relative()))})",
            ("  worst sample" if result.batch > 1 else "", "dim"),
        ),
    )
    for label, text in solution_rows(result):
        head.add_row(label, text)
    head.add_row("wall time", fmt_time(result.wall_time))
    parts: list[Any] = [head]
    worst = worst_sample(result)
    _, curve, _ = result.sample_history(worst)
    if len(curve) > 1:
        label = "residual" if result.batch == 1 else f"residual (sample {worst})"
        parts += [
            Text(""),
            Text.assemble(
                (f"{label}  ", "dim"),
                fmt(curve[0], 1),
                " ",
                sparkline(curve),
                " ",
                fmt(curve[-1], 1),
            ),
            Text(" " * (len(label) + 2) + spark_scale(curve), style="dim"),
        ]
    if result.batch > 1:
        parts += [Text(""), _samples_table(result)]
    for note in result.notes:
        parts.append(Text(f"note: {note}", style="yellow"))
    console.print(
        Panel(
            Group(*parts), title="deq solve", title_align="left", border_style=STATUS_STYLE[status]
        )
    )
    if result.diagnostics and result.diagnostics.get("samples"):
        render_diagnostics(result, console)


def solution_rows(result: SolveResult) -> list[tuple[str, str]]:
    """z* in the state's shape: every entry for small problems, else its norm and first entries.

    In full when each sample has at most SOLUTION_ENTRIES entries and there are at most
    SOLUTION_SAMPLES samples; otherwise for the worst sample (``--json`` and ``--save`` have all).
    """
    z = result.z_star.detach().cpu()
    per = z[0].numel() if z.shape[0] else 0
    if per <= SOLUTION_ENTRIES and result.batch <= SOLUTION_SAMPLES:
        if result.batch == 1:
            return [("solution", f"z* = {_entries(z[0].tolist())}")]
        return [
            ("solution" if b == 0 else "", f"z*[{b}] = {_entries(z[b].tolist())}")
            for b in range(result.batch)
        ]
    b = worst_sample(result)
    flat = z[b].reshape(-1)
    first = ", ".join(_number(float(v), 6) for v in flat[:SOLUTION_FIRST])
    first += ", …" if flat.numel() > SOLUTION_FIRST else ""
    shape = "×".join(str(d) for d in z.shape[1:])
    which = "" if result.batch == 1 else f" (sample {b}, the worst)"
    norm = float(flat.norm())
    return [
        (
            "solution",
            f"‖z*‖ {fmt(norm)}{which}, z* of shape {shape}: [{first}]  (--json or --save for all)",
        )
    ]


def _entries(value: Any) -> str:
    """A (nested) list of numbers, each to 12 significant digits."""
    if isinstance(value, list):
        return "[" + ", ".join(_entries(v) for v in value) + "]"
    return _number(float(value))


def _number(v: float, digits: int = 12) -> str:
    return f"{v:.{digits}g}" if math.isfinite(v) else fmt(v)


def _samples_table(result: SolveResult) -> Table:
    tally = Tally(s.value for s in result.sample_status)
    title = ", ".join(f"{n} {name}" for name, n in tally.most_common())
    table = Table(
        title=f"samples: {title}",
        title_justify="left",
        box=None,
        padding=(0, 2),
        header_style="bold",
    )
    for col in ("sample", "status", "iterations", residual_name(result.form), "relative"):
        table.add_column(col, justify="right" if col != "status" else "left")
    finals, rels = result.final_residuals(), result.final_relative()
    order = list(range(result.batch))
    if result.batch > LIST_ALL_SAMPLES:
        order = sorted(order, key=lambda b: (result.sample_status[b].ok, -_safe(finals[b])))[
            :WORST_SHOWN
        ]
        table.caption = f"worst {WORST_SHOWN} of {result.batch} samples shown; --json has them all"
    for b in order:
        table.add_row(
            str(b),
            status_text(result.sample_status[b]),
            str(result.iterations[b]),
            fmt(finals[b]),
            fmt(rels[b]),
        )
    return table


def _safe(x: float) -> float:
    return math.inf if math.isnan(x) else x


# -- diagnostics ---------------------------------------------------------------------------------
CLASS_STYLE = {
    "converged": "green",
    "oscillating": "magenta",
    "diverged": "red",
    "nonfinite": "red",
}


# Verified remedies stand out; remedies that failed their trial and untried suggestions do not.
ROW_STYLE = {"remedy": "cyan", "tried": "dim", "suggestion": "dim", "error": ""}


def render_diagnostics(result: SolveResult, console: Console) -> None:
    """The diagnostics panel: certificate, spectrum, rates, classification and remedies.

    For a batch it describes the worst sample and tallies the classifications of all.
    """
    from deqcli.diagnostics.explain import panel_rows, summary_line

    diag = result.diagnostics or {}
    worst = worst_sample(result)
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="dim", no_wrap=True)
    grid.add_column()
    if result.batch > 1 and "summary" in diag:
        grid.add_row("samples", summary_line(diag))
        grid.add_row("shown", f"sample {worst} (the worst); --explain or --json for every sample")
    for label, text in panel_rows(diag, worst):
        style = ""
        if label == "outcome":
            style = CLASS_STYLE.get(text.split(" ", 1)[0], "yellow")
        else:
            style = ROW_STYLE.get(label, "")
        grid.add_row("→ remedy" if label == "remedy" else label, Text(text, style=style))
    console.print(Panel(grid, title="diagnostics", title_align="left", border_style="dim"))


def render_explain(result: SolveResult, console: Console) -> None:
    """``deq solve --explain``: the diagnostics' reasoning at length, sample by sample."""
    from deqcli.diagnostics.explain import explain_sections

    diag = result.diagnostics or {}
    if not diag.get("samples"):
        console.print("no diagnostics (they were switched off)", style="dim")
        return
    order = list(range(result.batch))
    if result.batch > LIST_ALL_SAMPLES:
        order = [worst_sample(result)]
    for b in order:
        parts: list[Any] = []
        for title, lines in explain_sections(diag, b):
            if parts:
                parts.append(Text(""))
            parts.append(Text(title, style="bold"))
            parts += [Text(line) for line in lines]
        if result.batch > LIST_ALL_SAMPLES:
            parts += [
                Text(""),
                Text(f"sample {b} of {result.batch} (the worst); --json has all", style="dim"),
            ]
        title = "explain" if result.batch == 1 else f"explain: sample {b}"
        console.print(Panel(Group(*parts), title=title, title_align="left", border_style="dim"))
