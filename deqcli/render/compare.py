"""Renderings of a compare-solvers document: the terminal tables, CSV, Markdown, the progress bar and
the lines on stderr (unsolved problems, plots written, baseline regressions and verdict).

They all read the same JSON document (see ``deqcli.analyses.compare``), so they show the same numbers.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group, RenderableType
from rich.measure import Measurement
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from deqcli.analyses.compare import COUNT_KINDS, ERROR, ProgressCallback
from deqcli.render.report import STATUS_STYLE, fmt, fmt_time
from deqcli.result import Status

if TYPE_CHECKING:
    from deqcli.analyses.jobs import CompareOutcome

ERROR_STYLE = "bold red"
SUMMARY_COLUMNS = ["solver", "solved", "wins", "errors", "geomean × fastest"]


def status_label(row: dict[str, Any]) -> str:
    """Status with the cycle period and, for batches, how many samples converged."""
    label = row["status"]
    extra = []
    if row["period"]:
        extra.append(f"period {row['period']}")
    if row["status"] != ERROR and (row["samples"] or 1) > 1 and not row["converged"]:
        extra.append(f"{row['converged_samples']}/{row['samples']} samples")
    return label + (f" ({', '.join(extra)})" if extra else "")


def _cells(row: dict[str, Any]) -> dict[str, str]:
    """The formatted cells of a row, shared by the terminal table and the Markdown table."""
    time = row["time"]
    return {
        "solver": row["solver"],
        "status": status_label(row),
        "iterations": _int(row["iterations"]),
        "nfev": _int(row["nfev"]),
        "njev": _int(row["njev"]),
        "jvp": _int(row["jvp"]),
        "vjp": _int(row["vjp"]),
        "residual": fmt(float(row["residual"])) if row["residual"] is not None else "–",
        "median time": fmt_time(time["median"]) if time else "–",
        "min–max": time_range(time["min"], time["max"]) if time else "–",
        "× fastest": f"{row['relative_time']:.2f}×" if row["relative_time"] is not None else "–",
        "rank": _int(row["rank"]),
    }


def time_range(low: float, high: float) -> str:
    """``1.2–3.4 ms`` when both ends share a unit, else ``950 µs–1.2 ms``."""
    a, b = fmt_time(low), fmt_time(high)
    (a_num, a_unit), (b_num, b_unit) = a.split(" "), b.split(" ")
    return f"{a_num}–{b_num} {a_unit}" if a_unit == b_unit else f"{a}–{b}"


# Short headers keep the terminal table within 80 columns; Markdown and CSV use the full names.
SHORT_HEADERS = {"iterations": "iter", "median time": "time", "× fastest": "×best"}


def _columns(problem: dict[str, Any]) -> list[str]:
    """Table columns; jvp/vjp appear only when some solver used them."""
    cols = ["solver", "status", "iterations", "nfev", "njev"]
    cols += [k for k in ("jvp", "vjp") if any(row[k] for row in problem["solvers"])]
    return [*cols, "residual", "median time", "min–max", "× fastest", "rank"]


def _ordered(problem: dict[str, Any]) -> list[dict[str, Any]]:
    """Converged rows by rank, then the failures in the order asked for, errors last."""
    rows = problem["solvers"]
    return (
        sorted((r for r in rows if r["converged"]), key=lambda r: r["rank"])
        + [r for r in rows if not r["converged"] and r["status"] != ERROR]
        + [r for r in rows if r["status"] == ERROR]
    )


def _heading(problem: dict[str, Any]) -> str:
    tol = f"atol {problem['atol']:g}" + (f", rtol {problem['rtol']:g}" if problem["rtol"] else "")
    size = f"batch {problem['batch']}, n {problem['dim']}, " if problem["batch"] is not None else ""
    return f"{size}{problem['dtype']}, {problem['device']}; {tol}, max_iter {problem['max_iter']}"


def _reasons(problem: dict[str, Any]) -> list[tuple[str, str]]:
    """(solver, why) for every row that did not converge, and notes on the others."""
    out = []
    for row in _ordered(problem):
        solver = row["solver"]
        if not row["converged"]:
            why = row["message"] + (f"; {row['reason']}" if row["reason"] else "")
            out.append((solver, why))
        out.extend((solver, unprefixed(note, solver)) for note in row["notes"])
    return out


def unprefixed(note: str, solver: str) -> str:
    """A note without the solver's name in front: it is shown under that name already."""
    return note.removeprefix(f"{solver}: ")


def render(doc: dict[str, Any], console: Console) -> None:
    """Print the comparison: one table per problem, then the summary across problems.

    Nothing is ever cut: a table that does not fit the console's width (80 columns in a piped CI
    log) drops its secondary columns (njev/jvp/vjp and the time range: the JSON, CSV and Markdown
    keep them), and below that each solver gets a short paragraph of its own.
    """
    for problem in doc["problems"]:
        console.print(problem_view(problem, console))
        reasons = _reasons(problem)
        if reasons:
            # A grid keeps a wrapped reason aligned under its own first line.
            grid = Table.grid(padding=(0, 1))
            grid.add_column(no_wrap=True, style="bold")
            grid.add_column(style="dim")
            for solver, why in reasons:
                grid.add_row(f"  {solver}:", why)
            console.print(grid)
        console.print()
    console.print(_summary_renderable(doc))


def problem_view(problem: dict[str, Any], console: Console) -> RenderableType:
    """The widest layout of one problem's rows that fits ``console``: the full table, a compact
    table, or one paragraph per solver."""
    unbounded = console.options.update_width(NATURAL_WIDTH)
    for cols in (_columns(problem), _compact_columns(problem)):
        table = _problem_table(problem, cols)
        if Measurement.get(console, unbounded, table).maximum <= console.width:
            return table
    return _stacked(problem)


# Wide enough to measure a table without squeezing it.
NATURAL_WIDTH = 10_000
# The compact table: what decides between solvers (status, work, accuracy, time, rank).
COMPACT = ("solver", "status", "iterations", "nfev", "residual", "median time", "× fastest", "rank")


def _compact_columns(problem: dict[str, Any]) -> list[str]:
    return [c for c in _columns(problem) if c in COMPACT]


def _title(problem: dict[str, Any]) -> Text:
    return Text.assemble(
        (problem["name"], "bold"),
        (f"  {problem['description']}" if problem["description"] else "", "dim"),
    )


def _stacked(problem: dict[str, Any]) -> Group:
    """One short paragraph per solver, for consoles too narrow for any table."""
    parts: list[RenderableType] = [_title(problem), Text(_heading(problem), style="dim")]
    for row in _ordered(problem):
        cells = _cells(row)
        style = ERROR_STYLE if row["status"] == ERROR else STATUS_STYLE[Status(row["status"])]
        head = Text.assemble((cells["solver"], "bold"), "  ", (cells["status"], style))
        if row["rank"] is not None:
            head.append(f"  rank {cells['rank']}, {cells['× fastest']} the fastest")
        parts.append(head)
        if row["status"] == ERROR:
            continue
        counts = ", ".join(f"{k} {cells[k]}" for k in COUNT_KINDS if k == "nfev" or row[k])
        detail = (
            f"{cells['iterations']} iterations, {counts}, residual {cells['residual']}, "
            f"time {cells['median time']}"
        )
        parts.append(Padding(Text(detail), (0, 0, 0, 2)))
    return Group(*parts)


def _problem_table(problem: dict[str, Any], cols: list[str]) -> Table:
    table = Table(
        title=_title(problem),
        title_justify="left",
        caption=_heading(problem),
        caption_justify="left",
        header_style="bold underline",
        box=None,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
    )
    longest = max(len(row["solver"]) for row in problem["solvers"])
    for col in cols:
        table.add_column(
            SHORT_HEADERS.get(col, col),
            justify="left" if col in ("solver", "status") else "right",
            # Only the status may wrap (a period goes on a second line); names and numbers stay whole.
            no_wrap=col != "status",
            min_width=longest if col == "solver" else None,
        )
    for row in _ordered(problem):
        cells = _cells(row)
        style = ERROR_STYLE if row["status"] == ERROR else STATUS_STYLE[Status(row["status"])]
        table.add_row(*(Text(cells[c], style=style) if c == "status" else cells[c] for c in cols))
    return table


def _summary_renderable(doc: dict[str, Any]) -> Group:
    summary = doc["summary"]
    if summary["problems"] == 1:
        # One problem: its table already says everything but whether anyone solved it.
        unsolved = summary["unsolved"]
        return Group(
            *(
                [Text(f"not solved by any solver: {unsolved[0]}", style="bold red")]
                if unsolved
                else []
            )
        )
    n = summary["problems"]
    common = summary["common"]
    table = Table(
        title=Text(f"summary over {n} problem{'s' if n != 1 else ''}", style="bold"),
        title_justify="left",
        header_style="bold underline",
        box=None,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
    )
    for col in SUMMARY_COLUMNS:
        table.add_column(col, justify="left" if col == "solver" else "right")
    for row in summary["solvers"]:
        table.add_row(*_summary_cells(row))
    parts: list[Any] = [table]
    if common:
        parts.append(
            Text(
                f"geometric mean of time relative to the fastest, over the {len(common)} "
                f"problem(s) every solver solved: {', '.join(common)}",
                style="dim",
            )
        )
    else:
        parts.append(
            Text("no problem was solved by every solver: no common time ratio", style="dim")
        )
    if summary["unsolved"]:
        parts.append(
            Text(f"not solved by any solver: {', '.join(summary['unsolved'])}", style="bold red")
        )
    return Group(*parts)


def _summary_cells(row: dict[str, Any]) -> list[str]:
    geo = row["geomean_relative_time"]
    return [
        row["solver"],
        f"{row['solved']}/{row['problems']}",
        str(row["wins"]),
        str(row["errors"]),
        f"{geo:.2f}×" if geo is not None else "–",
    ]


CSV_COLUMNS = [
    "problem",
    "config",
    "solver",
    "family",
    "status",
    "period",
    "converged",
    "converged_samples",
    "samples",
    "iterations",
    *COUNT_KINDS,
    "residual",
    "time_median",
    "time_min",
    "time_max",
    "relative_time",
    "rank",
    "message",
    "reason",
]


def to_csv(doc: dict[str, Any]) -> str:
    """One row per problem and solver, numbers at full precision."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for problem in doc["problems"]:
        for row in problem["solvers"]:
            time = row["time"] or {}
            writer.writerow(
                {
                    "problem": problem["name"],
                    "config": problem["config"],
                    **{k: _csv(row[k]) for k in CSV_COLUMNS if k in row},
                    "time_median": _csv(time.get("median")),
                    "time_min": _csv(time.get("min")),
                    "time_max": _csv(time.get("max")),
                }
            )
    return out.getvalue()


def to_markdown(doc: dict[str, Any]) -> str:
    """Tables ready for a README or a pull-request comment (same formatting as the terminal)."""
    lines = ["## deq compare-solvers", ""]
    for problem in doc["problems"]:
        desc = f" — `{problem['description']}`" if problem["description"] else ""
        lines += [f"### {problem['name']}{desc}", "", f"_{_heading(problem)}_", ""]
        cols = _columns(problem)
        lines.append("| " + " | ".join(cols) + " |")
        lines.append(
            "|" + "|".join(":--" if c in ("solver", "status") else "--:" for c in cols) + "|"
        )
        for row in _ordered(problem):
            cells = _cells(row)
            lines.append("| " + " | ".join(_md(cells[c]) for c in cols) + " |")
        reasons = _reasons(problem)
        if reasons:
            lines.append("")
            lines += [f"- **{solver}**: {_md(why)}" for solver, why in reasons]
        lines.append("")
    summary = doc["summary"]
    lines += [f"### Summary over {summary['problems']} problem(s)", ""]
    cols = SUMMARY_COLUMNS
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "|".join(":--" if c == "solver" else "--:" for c in cols) + "|")
    for row in summary["solvers"]:
        lines.append("| " + " | ".join(_md(c) for c in _summary_cells(row)) + " |")
    lines.append("")
    if summary["common"]:
        lines.append(
            "Geometric mean of time relative to the fastest solver, over the problems every solver "
            f"solved: {', '.join(summary['common'])}."
        )
    else:
        lines.append("No problem was solved by every solver, so there is no common time ratio.")
    if summary["unsolved"]:
        lines.append(f"Not solved by any solver: {', '.join(summary['unsolved'])}.")
    lines.append("")
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _int(value: int | None) -> str:
    return "–" if value is None else str(value)


def _csv(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return value


# -- the command's report --------------------------------------------------------------------------


def report(outcome: CompareOutcome, out: Console, err: Console, *, quiet: bool) -> None:
    """The tables on ``out`` (unless quiet or an output went to stdout), then on ``err``: unsolved
    problems when the tables are not shown, the plots written, and the baseline's regressions, notes
    and verdict (regressions even when quiet)."""
    doc, check = outcome.doc, outcome.check
    if not quiet and not outcome.to_stdout:
        render(doc, out)
    elif doc["summary"]["unsolved"]:
        unsolved = ", ".join(doc["summary"]["unsolved"])
        err.print(f"not solved by any solver: {unsolved}", highlight=False, soft_wrap=True)
    if not quiet:
        for path in outcome.plots:
            err.print(Text(f"plot written: {path}", style="dim"), soft_wrap=True)
    if check is None:
        return
    regressions = check.regressions
    for regression in regressions:
        err.print(
            Text.assemble(("regression:", "bold red"), f" {regression.line()}"), soft_wrap=True
        )
    if not quiet:
        for note in check.notes:
            err.print(Text(f"baseline note: {note}", style="dim"), soft_wrap=True)
    if regressions or not quiet:
        verdict = f"{len(regressions)} regression(s)" if regressions else "no regressions"
        err.print(
            f"baseline: {verdict} in {check.compared} solver-problem pair(s) checked "
            f"against {check.path} (max slowdown {check.max_slowdown:g}×)",
            highlight=False,
            soft_wrap=True,
        )


# -- terminal progress ----------------------------------------------------------------------------


@contextmanager
def progress_bar(console: Console, total: int, *, enabled: bool) -> Iterator[ProgressCallback]:
    """A transient progress bar on ``console`` (stderr); a no-op callback when disabled."""
    if not enabled:
        yield lambda _label: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(
        TextColumn("{task.description}", style="progress.description", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("preparing", total=total)
        started = 0

        def advance(label: str) -> None:
            # Called as each solve starts: the bar counts the solves already finished.
            nonlocal started
            bar.update(task, completed=started, description=label)
            started += 1

        yield advance
