"""``deq compare-solvers``: run several solvers on the same problems and say which one to use.

Every solver runs the same built problem from the same start with the same stopping rule, in the same
process, after warm-up; repeats are interleaved across solvers so that slow drifts of the machine
(frequency scaling, other load) spread over all of them instead of penalising whoever runs last.
Each solve goes through :func:`deqcli.api.solve`, so it gets the same driver loop as ``deq solve``;
the diagnostics (which refine a max_iter status to oscillating, stalled, … with a period or reason)
are left out of the warm-up and timed runs and attached once, to the solve each row reports.

With ``--workers``/``--scheduler``/``--cluster`` the comparison runs on Dask instead: one task per
(config, solver) builds the problem, warms up and runs the timed repeats back to back in one worker
process, which times one such task at a time; the rows come back as they finish and are ranked here.
The numbers are the same as in-process except the timings.

The outcome is one versioned JSON document (``--json`` and ``--save-baseline`` share it); the rich
table, CSV and Markdown (``deqcli.render.compare``) are renderings of that document, so they always
show the same numbers.

This module does not import torch at import time (solving does, through ``deqcli.api``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deqcli import __version__
from deqcli.consent import decided, granted, require_all
from deqcli.errors import ConfigError, DeqError, UsageError
from deqcli.execution import Executor, Task, TaskFailed, group_memo
from deqcli.execution.source import ConfigSource, ship
from deqcli.expr import ExpressionError
from deqcli.render.report import fmt_time
from deqcli.result import _num as json_number
from deqcli.schemas import COMPARE_KIND, COMPARE_VERSION
from deqcli.yaml_reader import MAX_DOCUMENT_BYTES, read_capped_file

if TYPE_CHECKING:
    from deqcli.config import Config
    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult

SCHEMA_VERSION = COMPARE_VERSION
DOCUMENT_KIND = COMPARE_KIND
CONFIG_SUFFIXES = (".yaml", ".yml")
DEFAULT_REPEAT = 3
DEFAULT_WARMUP = 1
# Wall time is noisy (other load, frequency scaling, a different CI machine): only a large slowdown
# against a baseline counts as a regression by default.
DEFAULT_MAX_SLOWDOWN = 3.0
# Timed runs beyond this add nothing to a median but can keep a CI job busy for hours.
MAX_REPEAT = 1000
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
    if not 1 <= repeat <= MAX_REPEAT:
        raise UsageError(f"--repeat: must be from 1 to {MAX_REPEAT}, got {repeat}")
    if not 0 <= warmup <= MAX_REPEAT:
        raise UsageError(f"--warmup: must be from 0 to {MAX_REPEAT}, got {warmup}")
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
    executor: Executor | None = None,
    configs: list[Config] | None = None,
) -> dict[str, Any]:
    """Run every solver on every config and return the comparison document (see module docstring).

    ``configs``: the configs of ``paths`` with ``overrides``, where the caller has loaded them
    already (else they are loaded here).

    Without ``executor`` (or with an in-process one) the solves run here, repeats interleaved
    across solvers; with a remote one each (config, solver) is a task.

    A solver that cannot handle a problem (unknown option, dense Jacobian too large, peer library
    missing, an exception inside the solver) gets an ``error`` row with a one-line reason; so does
    every solver of a problem that cannot be built; the comparison goes on. Configs that do not
    validate, and configs that would run Python code without consent, are bad input and raise
    before anything runs. A Ctrl-C keeps the problems finished so far: the document is marked
    ``interrupted`` (and not ``complete``).
    """
    check_settings(repeat=repeat, warmup=warmup, max_slowdown=DEFAULT_MAX_SLOWDOWN)
    if not solvers:
        raise UsageError("no solvers to compare; name some with --solvers (see deq list-solvers)")
    overrides = list(overrides or [])
    if configs is None:
        configs = load_configs(paths, overrides)
    require_all(cfg.problem for cfg in configs)
    taken: set[str] = set()
    names = [_unique(cfg, taken) for cfg in configs]
    problems: list[dict[str, Any]] = []
    interrupted = False
    if executor is not None and executor.remote:
        problems, interrupted = _compare_tasks(
            paths, configs, names, solvers, overrides, repeat, warmup, progress, debug, executor
        )
    else:
        try:
            for path, cfg, name in zip(paths, configs, names, strict=True):
                problems.append(
                    _compare_one(
                        path, cfg, solvers, overrides, repeat, warmup, progress, debug, name
                    )
                )
        except KeyboardInterrupt:
            interrupted = True  # the problem in progress is dropped; the finished ones are kept
    environment = _environment()
    environment["execution"] = executor.describe() if executor else {"backend": "in-process"}
    doc: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "kind": DOCUMENT_KIND,
        "deq_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment,
        "settings": {
            "solvers": list(solvers),
            "repeat": repeat,
            "warmup": warmup,
            "overrides": overrides,
        },
        "problems": problems,
        "complete": not interrupted,
        "interrupted": interrupted,
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

    try:
        problem = api.load_problem(cfg)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # the config validated, but its problem cannot be built
        if debug and not isinstance(exc, (DeqError, ExpressionError)):
            raise
        return _unbuilt(name, path, cfg, solvers, _failure(exc))
    attempt = _Attempts(
        problem, lambda solver: load_config(path, overrides, solver=solver), debug, progress, name
    )
    for solver in solvers:
        for _ in range(warmup):
            attempt(solver)
    for _ in range(repeat):
        for solver in solvers:
            attempt.timed(solver)
    rows = [
        _row(solver, attempt.runs(solver), problem, debug, cfg.run.timeout) for solver in solvers
    ]
    return _problem_entry(name, path, cfg, _problem_facts(problem), rows)


class _Attempts:
    """Solves of one built problem by named solvers; a solver that fails once gets an error row.

    Every solver runs the same problem from the same start; ``configs(solver)`` gives the config
    with that solver (the config's own solver options apply only when it names this solver;
    ``--set`` overrides apply to every solver, and one that lacks the option shows an error row).
    """

    def __init__(
        self,
        problem: Problem,
        configs: Callable[[str], Config],
        debug: bool,
        progress: ProgressCallback | None = None,
        name: str = "",
    ) -> None:
        self.problem = problem
        self.configs = configs
        self.debug = debug
        self.progress = progress
        self.name = name
        self._runs: dict[str, _Runs] = {}
        self._configs: dict[str, Config] = {}

    def runs(self, solver: str) -> _Runs:
        """The measured solves of ``solver`` so far (or its error)."""
        return self._runs.setdefault(solver, _Runs())

    def timed(self, solver: str) -> None:
        """One measured solve, kept for the row."""
        result = self(solver)
        if result is not None:
            self.runs(solver).results.append(result)

    def __call__(self, solver: str) -> SolveResult | None:
        """One solve (a warm-up when its result is not kept); None once the solver has failed."""
        from deqcli import api

        slot = self.runs(solver)
        if self.progress is not None:
            self.progress(f"{self.name} · {solver}")
        if slot.error is not None:
            return None
        try:
            if solver not in self._configs:
                self._configs[solver] = self.configs(solver)
            # Diagnostics do not touch the timed part, but they cost time on every repeat: they
            # are attached once to the representative solve instead (see _row).
            return api.solve(self._configs[solver], problem=self.problem, diagnostics=False)
        except KeyboardInterrupt:
            raise
        except (DeqError, ExpressionError) as exc:
            slot.error = _failure(exc)
        except Exception as exc:
            if self.debug:
                raise
            slot.error = _failure(exc)
        return None


def compare_task(
    source: ConfigSource, solver: str, warmup: int, repeat: int, debug: bool, trust: bool
) -> dict[str, Any]:
    """One solver on one config as a task, under the client's consent ``trust``: build the problem,
    warm up, run the timed repeats back to back; the problem's facts and the solver's row."""
    from deqcli import api

    with decided(trust):
        # The solver's config builds the problem too (its problem section is the config's own),
        # which saves a parse; where it does not parse, the solve reports that as in-process.
        try:
            own: Config | None = source.config(solver=solver)
        except DeqError:
            own = None
        cfg = own or source.config()
        # The config's other solvers in this group solve the same built problem, as in-process
        # (a model's checkpoint is loaded once per group, not once per solver).
        memo, built = group_memo(), ("problem", source, trust)
        problem = memo.get(built)
        if problem is None:
            try:
                problem = api.load_problem(cfg)
            except (DeqError, ExpressionError) as exc:  # an error row, as in-process
                error = source.shown(_built_failure(_failure(exc)))
                return {"facts": None, "row": _error_row(solver, error, None)}
            memo.clear()  # one problem at a time
            memo[built] = problem
        attempt = _Attempts(problem, lambda name: own or source.config(solver=name), debug)
        for _ in range(warmup):
            attempt(solver)
        for _ in range(repeat):
            attempt.timed(solver)
        facts = _problem_facts(problem)
        row = _row(solver, attempt.runs(solver), problem, debug, cfg.run.timeout)
    # What the user reads names their files, not the copies in this worker's store.
    facts["description"] = source.shown(facts["description"])
    row["message"] = source.shown(row["message"])
    row["notes"] = [source.shown(note) for note in row["notes"]]
    return {"facts": facts, "row": row}


def _compare_tasks(
    paths: list[Path],
    configs: list[Config],
    names: list[str],
    solvers: list[str],
    overrides: list[str],
    repeat: int,
    warmup: int,
    progress: ProgressCallback | None,
    debug: bool,
    executor: Executor,
) -> tuple[list[dict[str, Any]], bool]:
    """Every (config, solver) as a timed task on ``executor``; the problems' entries in order, and
    whether Ctrl-C stopped it (then only the problems whose every solver came back are kept)."""
    sources = []
    files = {}
    for path, cfg in zip(paths, configs, strict=True):
        source, blobs = ship(ConfigSource.from_path(path, overrides), [cfg])
        sources.append(source)
        files.update(blobs)
    trust = granted()  # the client's consent, carried by every task
    # A config's tasks are of one kind: a remote executor learns what each kind costs and starts
    # the costliest first (the document keeps the configs' order).
    tasks = [
        Task((i, solver), compare_task, (sources[i], solver, warmup, repeat, debug, trust), kind=i)
        for i in range(len(sources))
        for solver in solvers
    ]
    rows: dict[Any, dict[str, Any]] = {}
    facts: dict[int, dict[str, Any]] = {}
    interrupted = False
    try:
        for key, out in executor.run(tasks, files=files, exclusive=True):
            i, solver = key  # type: ignore[misc]
            if isinstance(out, TaskFailed):
                rows[key] = _error_row(solver, out.message, None)
            else:
                if out["facts"] is not None:
                    facts.setdefault(i, out["facts"])
                rows[key] = out["row"]
            if progress is not None:
                for _ in range(warmup + repeat):  # the bar counts solves
                    progress(f"{names[i]} · {solver}")
    except KeyboardInterrupt:
        interrupted = True
    unknown = dict.fromkeys(("form", "description", "batch", "dim", "device"))
    entries = [
        _problem_entry(
            names[i], paths[i], configs[i], facts.get(i, unknown), [rows[(i, s)] for s in solvers]
        )
        for i in range(len(paths))
        if all((i, s) in rows for s in solvers)
    ]
    return entries, interrupted


def _problem_facts(problem: Problem) -> dict[str, Any]:
    """What a problem entry reports of the built problem."""
    return {
        "form": problem.form,
        "description": problem.description,
        "batch": problem.batch,
        "dim": problem.dim,
        "device": str(problem.device),
    }


def _problem_entry(
    name: str, path: Path, cfg: Config, facts: dict[str, Any], rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """One problem of the document: its settings and facts, and its solvers' rows, ranked."""
    _rank(rows)
    return {
        "name": name,
        "config": str(path),
        "kind": cfg.problem.kind,
        **facts,
        "dtype": cfg.run.dtype,
        "atol": cfg.atol,
        "rtol": cfg.run.rtol,
        "max_iter": cfg.run.max_iter,
        "solved_by": [row["solver"] for row in rows if row["converged"]],
        "fastest": next((row["solver"] for row in rows if row["rank"] == 1), None),
        "solvers": rows,
    }


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _failure(exc: BaseException) -> str:
    """One line for an error row: the message of our own errors, the type and message of others."""
    if isinstance(exc, (DeqError, ExpressionError)):
        return _one_line(str(exc))
    return _one_line(f"{type(exc).__name__}: {exc}")


def _built_failure(error: str) -> str:
    return f"the problem could not be built: {error}"


def _unbuilt(name: str, path: Path, cfg: Config, solvers: list[str], error: str) -> dict[str, Any]:
    """A problem whose config validated but whose problem could not be built: an error row for
    every solver, the reason in each."""
    rows = [_error_row(solver, _built_failure(error), None) for solver in solvers]
    facts = {"description": "", "batch": None, "dim": None, "device": cfg.run.device}
    return _problem_entry(name, path, cfg, facts, rows)


def _error_row(solver: str, message: str, samples: int | None) -> dict[str, Any]:
    """The row of a solver that has no measured solve (it failed, or its task could not run)."""
    from deqcli.solvers import SOLVERS

    info = SOLVERS.get(solver)
    return {
        "solver": solver,
        "family": info.family if info is not None else "deq",
        "status": ERROR,
        "converged": False,
        "message": message,
        "reason": None,
        "period": None,
        "samples": samples,
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


def _row(
    solver: str,
    runs: _Runs,
    problem: Problem,
    debug: bool = False,
    timeout: float | None = None,
) -> dict[str, Any]:
    """One solver's row: status, counts, residual and timing over the repeats (the diagnostics
    of the representative solve bounded by ``timeout``, run.timeout)."""
    row = _error_row(solver, runs.error or "", problem.batch)
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
    notes.extend(_attach_diagnostics(problem, rep, debug, timeout))
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


def _attach_diagnostics(
    problem: Problem, result: SolveResult, debug: bool, timeout: float | None = None
) -> list[str]:
    """The post-processing ``deq solve`` applies (status refinement, period, reason), in place.

    A failure here must not hide the solve's own numbers: it becomes a note on the row; so does
    running past ``timeout`` (run.timeout), as in ``deq solve``.
    """
    from deqcli.deadline import bounded
    from deqcli.diagnostics import attach

    notes: list[str] = []
    try:
        with bounded(timeout, "the diagnostics", notes):
            attach(problem, result)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        if debug:
            raise
        return [_one_line(f"diagnostics failed: {type(exc).__name__}: {exc}")]
    return notes


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
    """The worst residual over the samples at each kept history row, with the row's iteration
    number (a long run's middle is thinned: see ``run.history_limit``) and time.

    Stopped samples keep their final residual in the history, so the maximum is the residual the
    whole batch still has to bring under the tolerance.
    """
    residual = []
    for row in result.residual_history:
        values = [float(v) for v in row]
        residual.append(
            json_number(math.nan if any(math.isnan(v) for v in values) else max(values))
        )
    return {"iteration": list(result.rows), "residual": residual, "time": list(result.time_history)}


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
        text = read_capped_file(path, f"'{path}'", MAX_DOCUMENT_BYTES, "is it a baseline?")
        doc = json.loads(text)
    except ConfigError as exc:
        raise UsageError(f"--baseline: {exc.message}") from None
    except (RecursionError, json.JSONDecodeError) as exc:
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
