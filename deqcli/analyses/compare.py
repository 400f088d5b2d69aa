"""``deq compare-solvers``: run several solvers on the same problems and say which one to use.

Every solver runs the same built problem from the same start with the same stopping rule, in the same
process, after warm-up; repeats are interleaved across solvers so that slow drifts of the machine
(frequency scaling, other load) spread over all of them instead of penalising whoever runs last.
Each solve goes through :func:`deqcli.api.solve`, so it gets the same driver loop as ``deq solve``;
the diagnostics (which refine a max_iter status to oscillating, stalled, … with a period or reason)
are left out of the warm-up and timed runs and attached once, to the solve each row reports.

The outcome is one versioned JSON document (``--json`` and ``--save-baseline`` share it); the rich
table, CSV and Markdown are renderings of that document, so they always show the same numbers.

This module does not import torch at import time (solving does, through ``deqcli.api``).
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from deqcli import __version__
from deqcli.errors import DeqError, UsageError
from deqcli.render.report import STATUS_STYLE, fmt, fmt_time
from deqcli.result import Status
from deqcli.result import _num as json_number

if TYPE_CHECKING:
    from deqcli.config import Config
    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult

SCHEMA_VERSION = "1"
DOCUMENT_KIND = "deq.compare-solvers"
CONFIG_SUFFIXES = (".yaml", ".yml")
DEFAULT_REPEAT = 3
DEFAULT_WARMUP = 1
# Wall time is noisy (other load, frequency scaling, a different CI machine): only a large slowdown
# against a baseline counts as a regression by default.
DEFAULT_MAX_SLOWDOWN = 3.0
# Solutions are kept in the JSON only up to this many numbers per solve, so that baselines of large
# problems stay small files.
MAX_SOLUTION_VALUES = 4096
ERROR = "error"
COUNT_KINDS = ("nfev", "njev", "jvp", "vjp")

ProgressCallback = Callable[[str], None]


# -- inputs ---------------------------------------------------------------------------------------


def expand_configs(paths: list[Path]) -> list[Path]:
    """Config files from the command line: files as given, folders as their *.yaml files (sorted)."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix in CONFIG_SUFFIXES and p.is_file())
            if not found:
                raise UsageError(f"CONFIG: folder '{path}' holds no .yaml config files")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise UsageError(
                f"CONFIG: '{path}' does not exist; give config files or a folder of them"
            )
    return files


def resolve_solvers(spec: str | None, *, include_peers: bool) -> list[str]:
    """The solver names to compare.

    ``spec`` is a comma-separated list (every name must be registered); without it, every solver of
    our own family, plus the peers whose library is installed when ``include_peers`` (``--all``).
    """
    from deqcli.solvers import SOLVERS, solver_info

    if spec is not None and include_peers:
        raise UsageError("--solvers and --all exclude each other; give one of them")
    if spec is not None:
        names = [name.strip() for name in spec.split(",") if name.strip()]
        if not names:
            raise UsageError(
                "--solvers: give at least one solver name, e.g. --solvers newton,fixed_point"
            )
        for name in names:
            solver_info(name, key="--solvers")
        return list(dict.fromkeys(names))
    return [
        info.name
        for info in SOLVERS.values()
        if info.family == "deq" or (include_peers and peer_available(info.family))
    ]


def peer_available(family: str) -> bool:
    """Whether the library behind a peer family is importable (without importing it)."""
    import importlib.util

    return family == "deq" or importlib.util.find_spec(family) is not None


def check_settings(*, repeat: int, warmup: int, max_slowdown: float) -> None:
    """Reject impossible numeric flags before any solving starts."""
    if repeat < 1:
        raise UsageError(f"--repeat: must be at least 1, got {repeat}")
    if warmup < 0:
        raise UsageError(f"--warmup: must be 0 or more, got {warmup}")
    if not (math.isfinite(max_slowdown) and max_slowdown >= 1.0):
        raise UsageError(
            f"--max-slowdown: must be a number ≥ 1 (1 = no slowdown allowed), got {max_slowdown:g}"
        )


def load_configs(paths: list[Path], overrides: list[str]) -> list[Config]:
    """Load and validate every config up front, so bad input fails before any solving starts."""
    from deqcli.config import load_config

    return [load_config(path, overrides) for path in paths]


# -- running --------------------------------------------------------------------------------------


@dataclass
class _Runs:
    """The measured solves of one solver on one problem."""

    results: list[SolveResult] = field(default_factory=list)
    error: str | None = None


def compare(
    paths: list[Path],
    solvers: list[str],
    *,
    overrides: list[str] | None = None,
    repeat: int = DEFAULT_REPEAT,
    warmup: int = DEFAULT_WARMUP,
    progress: ProgressCallback | None = None,
    debug: bool = False,
) -> dict[str, Any]:
    """Run every solver on every config and return the comparison document (see module docstring).

    A solver that cannot handle a problem (unknown option, dense Jacobian too large, peer library
    missing, an exception inside the solver) gets an ``error`` row with a one-line reason; the
    comparison goes on. Problems that cannot be built are bad input and raise.
    """
    check_settings(repeat=repeat, warmup=warmup, max_slowdown=DEFAULT_MAX_SLOWDOWN)
    if not solvers:
        raise UsageError("no solvers to compare; name some with --solvers (see deq list-solvers)")
    overrides = list(overrides or [])
    configs = load_configs(paths, overrides)
    problems = []
    names: set[str] = set()
    for path, cfg in zip(paths, configs, strict=True):
        problems.append(
            _compare_one(
                path, cfg, solvers, overrides, repeat, warmup, progress, debug, _unique(cfg, names)
            )
        )
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": DOCUMENT_KIND,
        "deq_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": _environment(),
        "settings": {
            "solvers": list(solvers),
            "repeat": repeat,
            "warmup": warmup,
            "overrides": overrides,
        },
        "problems": problems,
    }
    doc["summary"] = summarise(problems, solvers)
    return doc


def _unique(cfg: Config, taken: set[str]) -> str:
    """The problem's name, made unique within one comparison (names key baseline comparisons)."""
    name = cfg.problem_name
    candidate, k = name, 2
    while candidate in taken:
        candidate, k = f"{name}-{k}", k + 1
    taken.add(candidate)
    return candidate


def _compare_one(
    path: Path,
    cfg: Config,
    solvers: list[str],
    overrides: list[str],
    repeat: int,
    warmup: int,
    progress: ProgressCallback | None,
    debug: bool,
    name: str,
) -> dict[str, Any]:
    """All solvers on one config: build the problem once, warm up, then interleaved repeats."""
    from deqcli import api
    from deqcli.config import load_config

    problem = api.load_problem(cfg)
    runs = {solver: _Runs() for solver in solvers}
    per_solver: dict[str, Config] = {}

    def attempt(solver: str) -> SolveResult | None:
        slot = runs[solver]
        if progress is not None:
            progress(f"{name} · {solver}")
        if slot.error is not None:
            return None
        try:
            if solver not in per_solver:
                # The config's own solver options apply only when it names this solver; --set
                # overrides apply to every solver (one that lacks the option shows an error row).
                per_solver[solver] = load_config(path, overrides, solver=solver)
            # Diagnostics do not touch the timed part, but they cost time on every repeat: they
            # are attached once to the representative solve instead (see _row).
            return api.solve(per_solver[solver], problem=problem, diagnostics=False)
        except KeyboardInterrupt:
            raise
        except DeqError as exc:
            slot.error = _one_line(str(exc))
        except Exception as exc:
            if debug:
                raise
            slot.error = _one_line(f"{type(exc).__name__}: {exc}")
        return None

    for solver in solvers:
        for _ in range(warmup):
            attempt(solver)
    for _ in range(repeat):
        for solver in solvers:
            result = attempt(solver)
            if result is not None:
                runs[solver].results.append(result)

    rows = [_row(solver, runs[solver], problem, debug) for solver in solvers]
    _rank(rows)
    solved_by = [row["solver"] for row in rows if row["converged"]]
    return {
        "name": name,
        "config": str(path),
        "kind": cfg.problem.kind,
        "description": problem.description,
        "batch": problem.batch,
        "dim": problem.dim,
        "device": str(problem.device),
        "dtype": cfg.run.dtype,
        "atol": cfg.atol,
        "rtol": cfg.run.rtol,
        "max_iter": cfg.run.max_iter,
        "solved_by": solved_by,
        "fastest": next((row["solver"] for row in rows if row["rank"] == 1), None),
        "solvers": rows,
    }


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _row(solver: str, runs: _Runs, problem: Problem, debug: bool = False) -> dict[str, Any]:
    """One solver's row: status, counts, residual and timing over the repeats."""
    from deqcli.solvers import SOLVERS

    info = SOLVERS.get(solver)
    row: dict[str, Any] = {
        "solver": solver,
        "family": info.family if info is not None else "deq",
        "status": ERROR,
        "converged": False,
        "message": runs.error or "",
        "reason": None,
        "period": None,
        "samples": problem.batch,
        "converged_samples": 0,
        "iterations": None,
        **dict.fromkeys(COUNT_KINDS),
        "residual": None,
        "time": None,
        "relative_time": None,
        "rank": None,
        "deterministic": True,
        "options": {},
        "notes": [],
        "result": None,
        "curve": None,
    }
    if runs.error is not None or not runs.results:
        return row
    times = [r.wall_time for r in runs.results]
    # The representative solve is the one whose time is the median (the lower one for even counts),
    # so its curve against time matches the median in the table.
    order = sorted(range(len(times)), key=lambda i: times[i])
    rep = runs.results[order[(len(order) - 1) // 2]]
    signature = {(r.status, r.nit, tuple(r.counts.totals().values())) for r in runs.results}
    notes = list(rep.notes)
    if len(signature) > 1:
        notes.append("iterations or counts differed between repeats (nondeterministic solver)")
    notes.extend(_attach_diagnostics(problem, rep, debug))
    status = rep.status
    counts = rep.counts.totals()
    period, reason = _diagnosis(rep)
    row.update(
        status=status.value,
        converged=status.ok,
        message=status.message,
        reason=reason,
        period=period,
        converged_samples=sum(s.ok for s in rep.sample_status),
        iterations=rep.nit,
        **counts,
        residual=json_number(max(rep.final_residuals(), default=0.0)),
        time={
            "median": statistics.median(times),
            "min": min(times),
            "max": max(times),
            "runs": times,
        },
        deterministic=len(signature) == 1,
        options=rep.options,
        notes=notes,
        result=_result_doc(rep),
        curve=_curve(rep),
    )
    return row


def _attach_diagnostics(problem: Problem, result: SolveResult, debug: bool) -> list[str]:
    """The post-processing ``deq solve`` applies (status refinement, period, reason), in place.

    A failure here must not hide the solve's own numbers: it becomes a note on the row.
    """
    from deqcli.diagnostics import attach

    try:
        attach(problem, result)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if debug:
            raise
        return [_one_line(f"diagnostics failed: {type(exc).__name__}: {exc}")]
    return []


def _result_doc(result: SolveResult) -> dict[str, Any]:
    """The solve's own JSON document, without history (the curve has it) and without huge solutions."""
    doc = result.to_dict(history=False)
    if result.batch * (len(doc["samples"][0]["solution"]) if doc["samples"] else 0) > (
        MAX_SOLUTION_VALUES
    ):
        for sample in doc["samples"]:
            sample.pop("solution", None)
        doc["solution_omitted"] = f"more than {MAX_SOLUTION_VALUES} numbers; use deq solve --json"
    return doc


def _curve(result: SolveResult) -> dict[str, list[Any]]:
    """The worst residual over the samples at each iteration, and the time of each iteration.

    Stopped samples keep their final residual in the history, so the maximum is the residual the
    whole batch still has to bring under the tolerance.
    """
    residual = []
    for row in result.residual_history:
        values = [float(v) for v in row]
        residual.append(
            json_number(math.nan if any(math.isnan(v) for v in values) else max(values))
        )
    return {"residual": residual, "time": list(result.time_history)}


def _diagnosis(result: SolveResult) -> tuple[int | None, str | None]:
    """The cycle period and the one-line reason the diagnostics give for the first sample that did
    not converge (diagnostics are optional: None, None without them)."""
    diagnostics = result.diagnostics
    if not isinstance(diagnostics, dict) or result.status.ok:
        return None, None
    samples = diagnostics.get("samples") or []
    failed = [b for b, s in enumerate(result.sample_status) if not s.ok]
    places = [samples[b] for b in failed if b < len(samples)] + [diagnostics]
    period = next((p for p in (_find(x, "period", int) for x in places) if p is not None), None)
    reason = next((r for r in (_find(x, "reason", str) for x in places) if r), None)
    return (period if period is not None and period > 1 else None), reason


def _find(node: Any, key: str, kind: type, depth: int = 3) -> Any:
    """The first value of ``key`` with type ``kind`` in nested dicts (not below ``depth`` levels)."""
    if not isinstance(node, dict) or depth < 0:
        return None
    value = node.get(key)
    if isinstance(value, kind) and not isinstance(value, bool):
        return value
    for name, child in node.items():
        if name != "samples" and isinstance(child, dict):
            found = _find(child, key, kind, depth - 1)
            if found is not None:
                return found
    return None


def _rank(rows: list[dict[str, Any]]) -> None:
    """Rank converged solvers by median time (ties: fewer evaluations); relative to the fastest."""
    done = [row for row in rows if row["converged"]]
    done.sort(key=lambda row: (row["time"]["median"], row["nfev"], row["solver"]))
    if not done:
        return
    fastest = done[0]["time"]["median"]
    for rank, row in enumerate(done, start=1):
        row["rank"] = rank
        row["relative_time"] = row["time"]["median"] / fastest if fastest > 0 else 1.0


def summarise(problems: list[dict[str, Any]], solvers: list[str]) -> dict[str, Any]:
    """Across problems: how many each solver solved, its wins, and the geometric mean of its
    relative time over the problems that every solver solved."""
    common = [p["name"] for p in problems if len(p["solved_by"]) == len(p["solvers"])]
    rows = []
    for solver in solvers:
        mine = [row for p in problems for row in p["solvers"] if row["solver"] == solver]
        rel = [
            row["relative_time"]
            for p in problems
            if p["name"] in common
            for row in p["solvers"]
            if row["solver"] == solver
        ]
        rows.append(
            {
                "solver": solver,
                "solved": sum(row["converged"] for row in mine),
                "problems": len(problems),
                "wins": sum(row["rank"] == 1 for row in mine),
                "errors": sum(row["status"] == ERROR for row in mine),
                "geomean_relative_time": (
                    math.exp(sum(math.log(r) for r in rel) / len(rel)) if rel else None
                ),
            }
        )
    return {
        "problems": len(problems),
        "common": common,
        "unsolved": [p["name"] for p in problems if not p["solved_by"]],
        "solvers": rows,
    }


def exit_code(doc: dict[str, Any], regressions: list[Regression]) -> int:
    """0 when every problem was solved by some solver and nothing regressed, else 1."""
    return 1 if doc["summary"]["unsolved"] or regressions else 0


def _environment() -> dict[str, Any]:
    """Where the times were measured (a baseline from another machine is compared with care)."""
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["cuda_device"] = torch.cuda.get_device_name()
    return env


# -- baseline -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Regression:
    """One thing that got worse than the baseline."""

    problem: str
    solver: str
    what: str  # "convergence", "nfev", "njev", "jvp", "vjp" or "time"
    detail: str

    def line(self) -> str:
        """One human line, e.g. ``dottie / newton: nfev grew 5 → 7``."""
        return f"{self.problem} / {self.solver}: {self.detail}"

    def to_dict(self) -> dict[str, str]:
        """JSON form."""
        return {
            "problem": self.problem,
            "solver": self.solver,
            "what": self.what,
            "detail": self.detail,
        }


@dataclass
class BaselineCheck:
    """The outcome of comparing a run with a stored baseline."""

    path: str
    max_slowdown: float
    compared: int = 0
    regressions: list[Regression] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON form, embedded in the comparison document under ``baseline``."""
        return {
            "path": self.path,
            "max_slowdown": self.max_slowdown,
            "compared": self.compared,
            "regressions": [r.to_dict() for r in self.regressions],
            "notes": self.notes,
        }


def load_baseline(path: Path) -> dict[str, Any]:
    """Read a document written by ``--json`` / ``--save-baseline``; bad files are a UsageError."""
    if not path.exists():
        raise UsageError(
            f"--baseline: file '{path}' does not exist; write one with --save-baseline"
        )
    if path.is_dir():
        raise UsageError(f"--baseline: '{path}' is a directory; give the JSON file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(
            f"--baseline: cannot read '{path}' as JSON: {_one_line(str(exc))}"
        ) from None
    if not isinstance(doc, dict) or doc.get("kind") != DOCUMENT_KIND:
        raise UsageError(
            f"--baseline: '{path}' is not a deq compare-solvers document (write one with --save-baseline)"
        )
    if doc.get("schema_version") != SCHEMA_VERSION:
        raise UsageError(
            f"--baseline: '{path}' has schema_version {doc.get('schema_version')!r}; this deq reads "
            f"{SCHEMA_VERSION!r}; save a new baseline with --save-baseline"
        )
    if not isinstance(doc.get("problems"), list):
        raise UsageError(f"--baseline: '{path}' has no 'problems' list")
    return doc


def check_baseline(
    doc: dict[str, Any],
    baseline: dict[str, Any],
    *,
    max_slowdown: float = DEFAULT_MAX_SLOWDOWN,
    path: str = "",
) -> BaselineCheck:
    """Compare a run with a baseline, solver by solver on the problems (matched by name) of both.

    Only solvers that converged in the baseline are checked. A regression is: it no longer converges;
    one of its evaluation counts (nfev, njev, jvp, vjp) grew — counts are deterministic for a given
    problem, solver, dtype and device, so any growth is a change in behaviour, not noise; or its
    median time grew by more than ``max_slowdown`` times.
    """
    check_settings(repeat=1, warmup=0, max_slowdown=max_slowdown)
    check = BaselineCheck(path=path, max_slowdown=max_slowdown)
    now = {p["name"]: p for p in doc["problems"]}
    for before_problem in baseline["problems"]:
        name = before_problem.get("name")
        current = now.get(name)
        if current is None:
            check.notes.append(f"problem '{name}' is in the baseline but was not run now")
            continue
        differs = [
            key
            for key in ("atol", "rtol", "max_iter", "dtype", "device", "batch", "dim")
            if before_problem.get(key) != current.get(key)
        ]
        if differs:
            check.notes.append(
                f"{name}: {', '.join(differs)} differ from the baseline; the comparison may not be fair"
            )
        rows = {row["solver"]: row for row in current["solvers"]}
        for before in before_problem.get("solvers", []):
            solver = before.get("solver")
            if not before.get("converged"):
                continue
            row = rows.get(solver)
            if row is None:
                check.notes.append(f"{name} / {solver}: in the baseline but not run now")
                continue
            check.compared += 1
            check.regressions.extend(_regressions(name, solver, before, row, max_slowdown))
    return check


def _regressions(
    problem: str, solver: str, before: dict[str, Any], now: dict[str, Any], max_slowdown: float
) -> list[Regression]:
    if not now["converged"]:
        why = now["status"] + (f": {now['message']}" if now["status"] == ERROR else "")
        return [Regression(problem, solver, "convergence", f"converged before, now {why}")]
    found = []
    for kind in COUNT_KINDS:
        old, new = before.get(kind), now.get(kind)
        if isinstance(old, int) and isinstance(new, int) and new > old:
            found.append(Regression(problem, solver, kind, f"{kind} grew {old} → {new}"))
    old_time = (before.get("time") or {}).get("median")
    new_time = now["time"]["median"]
    if isinstance(old_time, (int, float)) and old_time > 0:
        factor = new_time / old_time
        if factor > max_slowdown:
            found.append(
                Regression(
                    problem,
                    solver,
                    "time",
                    f"median time {fmt_time(old_time)} → {fmt_time(new_time)} "
                    f"({factor:.1f}× slower, limit {max_slowdown:g}×)",
                )
            )
    return found


# -- renderings -----------------------------------------------------------------------------------

ERROR_STYLE = "bold red"
SUMMARY_COLUMNS = ["solver", "solved", "wins", "errors", "geomean × fastest"]


def status_label(row: dict[str, Any]) -> str:
    """Status with the cycle period and, for batches, how many samples converged."""
    label = row["status"]
    extra = []
    if row["period"]:
        extra.append(f"period {row['period']}")
    if row["status"] != ERROR and row["samples"] > 1 and not row["converged"]:
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
    return (
        f"batch {problem['batch']}, n {problem['dim']}, {problem['dtype']}, {problem['device']}; "
        f"{tol}, max_iter {problem['max_iter']}"
    )


def _reasons(problem: dict[str, Any]) -> list[tuple[str, str]]:
    """(solver, why) for every row that did not converge, and notes on the others."""
    out = []
    for row in _ordered(problem):
        if not row["converged"]:
            why = row["message"] + (f"; {row['reason']}" if row["reason"] else "")
            out.append((row["solver"], why))
        out.extend((row["solver"], note) for note in row["notes"])
    return out


def render(doc: dict[str, Any], console: Console) -> None:
    """Print the comparison: one table per problem, then the summary across problems."""
    for problem in doc["problems"]:
        console.print(_problem_table(problem))
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


def _problem_table(problem: dict[str, Any]) -> Table:
    title = Text.assemble(
        (problem["name"], "bold"),
        (f"  {problem['description']}" if problem["description"] else "", "dim"),
    )
    table = Table(
        title=title,
        title_justify="left",
        caption=_heading(problem),
        caption_justify="left",
        header_style="bold underline",
        box=None,
        padding=(0, 1),
        collapse_padding=True,
        pad_edge=False,
    )
    cols = _columns(problem)
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
        TextColumn("[progress.description]{task.description}"),
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
