"""Parameter sweeps: solve a config at every value of one or more config keys and record what happened.

A sweep is a grid of *assignments* (config key → value). Each assignment is an independent task:
``solve_point(base, assignment, warm_start)`` re-builds the problem from the config text with the
values overridden, solves it, runs the diagnostics and returns a JSON-ready record. It reads no
global state and writes nothing, and its arguments pickle, so ``run_sweep`` hands the points to an
executor (``deqcli.execution``: in this process, or on Dask workers) as tasks, each carrying the
config text, its values and the client's consent; warm starts chain a point to its neighbour. The
client alone writes the results file, one line per point as results arrive, and resumes from it.

Axes are given as ``NAME=SPEC``:

* ``r=2.5:4:151`` — COUNT evenly spaced values from START to STOP inclusive (``…:COUNT:log`` for
  geometric spacing);
* ``r=[2.8, 3.2, 3.5]`` or ``r=2.8,3.2,3.5`` — a list;
* ``r=3.2`` — a single value.

NAME is a dotted config key (``problem.lr``, ``problem.W.spectral_norm``, ``run.atol``,
``solver.beta``) or a short name: ``a`` means ``problem.params.a`` when the config has that
parameter, else ``problem.a`` (e.g. ``lr`` for gradient descent), else ``problem.args.a`` for
Python problems. For ``kind: module`` every other name — short or dotted, such as ``scale`` or
``cell.norm.weight`` — is a parameter or buffer of the module by its state_dict name
(``problem.params.NAME``: a number fills it), checked against the module before the sweep starts.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deqcli.config import PROBLEM_MODELS, Config
from deqcli.consent import decided, granted
from deqcli.diagnostics import FIXED_POINTS
from deqcli.errors import ConfigError, DeqError, UsageError
from deqcli.execution import Executor, InProcess, Task, TaskFailed
from deqcli.execution.source import ConfigSource, ship, value_text
from deqcli.expr import ExpressionError
from deqcli.schemas import SWEEP_KIND, SWEEP_RESULTS_KIND, SWEEP_VERSION
from deqcli.yaml_reader import MAX_DOCUMENT_BYTES, read_capped_file

SWEEP_SCHEMA_VERSION = SWEEP_VERSION
# What a --results file written before the document kinds were unified says of itself.
LEGACY_RESULTS_KIND = "deq-sweep"
# Points are refused beyond this many (a typo such as 1:2:1e6 should not start a day-long run).
MAX_POINTS = 100_000
# Solutions with more entries than this are kept in memory for warm starts but not written out.
SOLUTION_SHOWN = 256
# How many of the last kept iterates of a sample that did not converge are recorded (its attractor).
ORBIT_POINTS = 16

# -- axes --------------------------------------------------------------------------------------------

_RANGE = re.compile(r"^\s*([^:]+):([^:]+):([^:]+)(?::(lin|log))?\s*$")


@dataclass(frozen=True)
class Axis:
    """One swept config key and its values, in order."""

    key: str  # the full dotted config key
    name: str  # as given on the command line
    values: tuple[Any, ...]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"key": self.key, "name": self.name, "values": list(self.values)}


def parse_param(text: str) -> tuple[str, list[Any]]:
    """Split ``NAME=SPEC`` into the name and its list of values (see the module doc for SPEC)."""
    name, sep, spec = text.partition("=")
    name = name.strip()
    if not sep or not name or not spec.strip():
        raise UsageError(
            f"--param: expected NAME=START:STOP:COUNT, NAME=[v1,v2,...] or NAME=v1,v2,..., got {text!r}"
        )
    if any(not part.isidentifier() for part in name.split(".")):
        raise UsageError(f"--param: '{name}' is not a config key (dotted names such as problem.lr)")
    spec = spec.strip()
    match = _RANGE.match(spec)
    if match and not spec.startswith("["):
        values = _range(name, *match.groups())
    else:
        items = spec[1:-1] if spec.startswith("[") and spec.endswith("]") else spec
        parts = [p.strip() for p in items.split(",")]
        if any(not p for p in parts):
            raise UsageError(f"--param {name}: empty entry in the list {spec!r}")
        values = [_value(p) for p in parts]
    if len(values) > MAX_POINTS:
        raise UsageError(f"--param {name}: {len(values)} values; the limit is {MAX_POINTS}")
    return name, values


def _range(name: str, start: str, stop: str, count: str, spacing: str | None) -> list[Any]:
    lo, hi = _number(name, start, "START"), _number(name, stop, "STOP")
    n = _number(name, count, "COUNT")
    if not float(n).is_integer() or n < 1:
        raise UsageError(f"--param {name}: COUNT must be a whole number ≥ 1, got {count.strip()}")
    k = int(n)
    if k > MAX_POINTS:
        raise UsageError(f"--param {name}: COUNT {k} is above the limit of {MAX_POINTS} points")
    if spacing == "log":
        if lo <= 0 or hi <= 0:
            raise UsageError(f"--param {name}: log spacing needs START and STOP > 0")
        if k == 1:
            return [float(lo)]
        ratio = (hi / lo) ** (1 / (k - 1))
        return [float(f"{lo * ratio**i:.14g}") for i in range(k)]
    if k == 1:
        return [lo]
    step = (hi - lo) / (k - 1)
    if isinstance(lo, int) and isinstance(hi, int) and float(step).is_integer():
        return [lo + int(step) * i for i in range(k)]
    # 14 significant digits drop the last-bit noise of lo + i·step (3.85, not 3.8499999999999996).
    return [float(f"{lo + (hi - lo) * i / (k - 1):.14g}") for i in range(k)]


def _number(name: str, text: str, what: str) -> int | float:
    value = _value(text.strip())
    if isinstance(value, str):
        raise UsageError(f"--param {name}: {what} must be a number, got {text.strip()!r}")
    return value


def _value(text: str) -> Any:
    """A number when the text is one (ints stay ints), else the text (e.g. a solver name)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        return text
    if not math.isfinite(value):
        raise UsageError(f"--param: values must be finite, got {text!r}")
    return value


def resolve_key(raw: Mapping[str, Any], name: str) -> str:
    """The full config key for NAME: dotted names as given, short names looked up in the problem."""
    problem = raw.get("problem") if isinstance(raw.get("problem"), dict) else {}
    kind = problem.get("kind")
    if "." in name:
        if kind == "module" and name.split(".")[0] not in Config.model_fields:
            return f"problem.params.{name}"  # a state_dict name such as cell.norm.weight
        return name
    params = problem.get("params") or {}
    if isinstance(params, dict) and name in params:
        return f"problem.params.{name}"
    batch_params = problem.get("batch_params") or {}
    if isinstance(batch_params, dict) and name in batch_params:
        raise ConfigError(
            f"problem.batch_params.{name}",
            "holds one value per sample and cannot be swept as a scalar; move it to problem.params "
            "or sweep a dotted key",
        )
    model = PROBLEM_MODELS.get(kind) if isinstance(kind, str) else None
    if model is not None and name in model.model_fields and name != "kind":
        return f"problem.{name}"
    args = problem.get("args") or {}
    if kind in ("python", "module") and isinstance(args, dict) and name in args:
        return f"problem.args.{name}"
    if kind == "module":
        return f"problem.params.{name}"  # the module's own names are checked when it is built
    choices = [str(k) for k in params] if isinstance(params, dict) else []
    if kind == "python" and isinstance(args, dict):
        choices += [str(k) for k in args]
    if model is not None:
        choices += [f for f in model.model_fields if f not in ("kind", "name") and f not in choices]
    raise ConfigError(
        "--param",
        f"'{name}' is not a parameter of this problem; use one of {', '.join(choices) or 'none'} or a dotted "
        "key such as problem.lr, solver.beta or run.atol",
    )


# -- the base config (picklable) ---------------------------------------------------------------------

# The config every point starts from: its text, origin, fixed overrides and solver (plain strings,
# so it pickles and reaches workers that cannot read the file).
SweepBase = ConfigSource


def make_axes(base: SweepBase, params: list[str]) -> list[Axis]:
    """Parse every ``--param`` and resolve its key; every value is validated against the config."""
    if not params:
        raise UsageError("--param: give at least one, e.g. --param r=2.5:4:151")
    raw = base.raw()
    axes = []
    for text in params:
        name, values = parse_param(text)
        axes.append(Axis(resolve_key(raw, name), name, tuple(values)))
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise UsageError(f"--param: the same key is swept twice ({', '.join(keys)})")
    total = math.prod(len(a.values) for a in axes)
    if total > MAX_POINTS:
        raise UsageError(f"--param: the grid has {total:,} points; the limit is {MAX_POINTS:,}")
    # Every value of each axis must make a valid config, with a known solver and valid options,
    # so a bad value fails now rather than halfway through a long sweep.
    from deqcli.solvers import make_solver

    for axis, value, assignment in _axis_points(axes):
        try:
            cfg = base.config(assignment)
            make_solver(cfg.solver.name, cfg.solver.options)
        except DeqError as exc:
            raise UsageError(f"--param {axis.name}={value_text(value)}: {exc}") from None
    if (base.raw().get("problem") or {}).get("kind") == "module":
        # Only the module knows its parameter names and shapes: build the first point once.
        from deqcli.api import load_problem

        try:
            load_problem(base.config(grid(axes)[0][1]))
        except DeqError as exc:
            raise UsageError(f"--param: {exc}") from None
    return axes


def _axis_points(axes: list[Axis]) -> Iterator[tuple[Axis, Any, dict[str, Any]]]:
    """Each value of each axis, with the other axes at their first value: every config value a
    sweep can set appears in one of these points."""
    for axis in axes:
        others = {a.key: a.values[0] for a in axes if a is not axis}
        for value in axis.values:
            yield axis, value, {**others, axis.key: value}


def grid(axes: list[Axis]) -> list[tuple[tuple[int, ...], dict[str, Any]]]:
    """Every point of the grid as (index tuple, assignment), the last axis varying fastest."""
    ranges = [range(len(a.values)) for a in axes]
    return [
        (idx, {a.key: a.values[i] for a, i in zip(axes, idx, strict=True)})
        for idx in itertools.product(*ranges)
    ]


# -- one point -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PointOptions:
    """What each point records. ``value``: auto, norm, mean, max, min, or a component index."""

    value: str = "auto"
    orbit: int = ORBIT_POINTS
    diagnostics: bool = True


def check_value_spec(spec: str) -> None:
    """Validate ``--value`` without torch."""
    if spec in ("auto", "norm", "mean", "max", "min"):
        return
    if re.fullmatch(r"-?\d+", spec):
        return
    raise UsageError(
        f"--value: use auto, norm, mean, max, min or a component index such as 0, got {spec!r}"
    )


def value_label(spec: str, n: int) -> str:
    """What ``--value spec`` draws of an n-vector z*: z*, ‖z*‖, mean(z*), z*[i], …"""
    if spec == "auto":
        spec = "0" if n == 1 else "norm"
    if spec == "norm":
        return "‖z*‖"
    if spec in ("mean", "max", "min"):
        return f"{spec}(z*)"
    return "z*" if n == 1 else f"z*[{spec}]"


def value_of(z: Any, spec: str) -> float:
    """The recorded scalar of one sample's vector z (a 1-D tensor)."""
    import torch

    if spec == "auto":
        spec = "0" if z.numel() == 1 else "norm"
    if spec == "norm":
        return float(torch.linalg.vector_norm(z))
    if spec in ("mean", "max", "min"):
        return float(getattr(z, spec)())
    index = int(spec)
    if not -z.numel() <= index < z.numel():
        raise UsageError(f"--value: component {index} does not exist; z has {z.numel()} entries")
    return float(z[index])


def solve_point(
    config: SweepBase,
    assignment: Mapping[str, Any],
    warm_start: list[list[float]] | None = None,
    options: PointOptions | None = None,
) -> dict[str, Any]:
    """Solve one point of a sweep and return its JSON-ready record (pure: no files, no globals).

    ``warm_start`` is a (batch, n) nested list used as z0 when its shape fits the problem (else the
    config's own start is used). A point whose config or map fails is recorded with an ``error``.
    """
    from deqcli.api import load_problem
    from deqcli.api import solve as api_solve

    options = options or PointOptions()
    record: dict[str, Any] = {"assignment": dict(assignment)}
    started = time.perf_counter()
    try:
        cfg = config.config(assignment)
        problem = load_problem(cfg)
        warm = False
        if warm_start is not None:
            import torch

            z0 = torch.as_tensor(warm_start, dtype=problem.dtype, device=problem.device)
            if tuple(z0.shape) == tuple(problem.z0.shape) and bool(torch.isfinite(z0).all()):
                problem = problem.with_start(z0)
                warm = True
        # The diagnostics classify the run (period p, chaotic, …) and estimate ρ(J) at the fixed point.
        result = api_solve(cfg, problem=problem, diagnostics=options.diagnostics)
    except (DeqError, ExpressionError) as exc:  # this point's own input is bad: record it, go on
        record.update(status="error", error=str(exc), wall_time=time.perf_counter() - started)
        return record
    record.update(_summarise_result(problem, result, options))
    record["warm_start"] = warm
    record["wall_time"] = time.perf_counter() - started
    return record


def point_task(
    base: SweepBase,
    index: tuple[int, ...],
    assignment: Mapping[str, Any],
    options: PointOptions,
    trust: bool,
    warm_start: list[list[float]] | None = None,
    previous: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One grid point as a task: its record with its ``index``, under the client's consent ``trust``.

    ``previous`` is the record of the neighbour this point runs after: its solution is the warm
    start when it converged (as ``warm_start`` is, for a neighbour read back on resume).
    """
    if previous is not None and previous.get("converged") and "solution" in previous:
        warm_start = previous["solution"]
    with decided(trust):
        return {"index": list(index), **solve_point(base, assignment, warm_start, options)}


def _summarise_result(problem: Any, result: Any, options: PointOptions) -> dict[str, Any]:
    """The fields of a point record that come from one SolveResult and its diagnostics."""
    from deqcli.result import _num

    diag = result.diagnostics or {}
    per = diag.get("samples") or [{} for _ in range(result.batch)]
    finals = result.final_residuals()
    samples = []
    for b in range(result.batch):
        item = per[b]
        classification = item.get("classification") or result.sample_status[b].value
        period = (
            (item.get("evidence") or {}).get("period") if classification == "oscillating" else None
        )
        spec = item.get("spectral") or {}
        z = result.solution[b]
        status = result.sample_status[b]
        if status.ok:
            orbit = [value_of(z, options.value)]
        else:
            tail = result.tail[-options.orbit :, b]
            orbit = [value_of(row, options.value) for row in tail]
        samples.append(
            {
                "status": status.value,
                "classification": classification,
                "label": label(classification, period),
                "period": period,
                "iterations": result.iterations[b],
                "residual": _num(finals[b]),
                "value": _num(value_of(z, options.value)),
                "orbit": [_num(v) for v in orbit],
                "rho": _num(spec["spectral_radius"]) if "spectral_radius" in spec else None,
                "rho_at": spec.get("point"),
            }
        )
    cert = diag.get("certificate")
    rhos = [s["rho"] for s in samples if isinstance(s["rho"], float)]
    first = samples[0]
    worst = _worst(samples)
    out: dict[str, Any] = {
        "status": result.status.value,
        "converged": result.status.ok,
        "classification": worst["classification"],
        "label": worst["label"],
        "period": worst["period"],
        "iterations": result.nit,
        "residual": _num(max(finals, default=0.0)),
        "value": first["value"],
        "value_label": value_label(options.value, result.solution.shape[1]),
        "rho": max(rhos) if rhos else None,
        "certificate": None if cert is None else bool(cert.get("contraction")),
        "lipschitz_bound": None if cert is None else _num(cert.get("lipschitz_bound")),
        # Gradient descent on a quadratic: plain iteration converges exactly when lr < 2/λmax.
        "lr_limit": ((cert or {}).get("gradient_descent") or {}).get("lr_limit"),
        "nfev": result.counts.totals()["nfev"],
        "samples": samples,
        "solution": result.solution.detach().cpu().tolist(),
    }
    return out


# Order in which a batch's per-sample labels are reported for the whole point (worst first).
_SEVERITY = [
    "nonfinite",
    "diverged",
    "growing",
    "chaotic",
    "oscillating",
    "stalled",
    "undetermined",
    "timeout",
    "slow",
    "max_iter",
    "converged",
]


def _worst(samples: list[dict[str, Any]]) -> dict[str, Any]:
    def rank(s: dict[str, Any]) -> int:
        c = s["classification"]
        return _SEVERITY.index(c) if c in _SEVERITY else 0

    return min(samples, key=rank)


def label(classification: str, period: int | None) -> str:
    """The regime name used in summaries and plots: 'period 2' for a 2-cycle, else the class."""
    if classification == "oscillating" and period:
        return f"period {period}"
    return classification


def describe_point(point: Mapping[str, Any]) -> str:
    """A one-line description of a finished point: its values and its regime, e.g. ``r=3.1: period 2``."""
    shown = ", ".join(
        f"{k.rsplit('.', 1)[-1]}={value_text(v) if not isinstance(v, float) else f'{v:.6g}'}"
        for k, v in point["assignment"].items()
    )
    return f"{shown}: {point.get('label', point.get('status', '?'))}"


# -- the sweep ---------------------------------------------------------------------------------------


@dataclass
class SweepResult:
    """All points of a sweep (in grid order), and how the run went."""

    source: str
    axes: list[Axis]
    points: list[dict[str, Any]]
    options: PointOptions
    warm_start: bool
    interrupted: bool = False
    resumed: int = 0  # points read back from the results file instead of solved
    wall_time: float = 0.0
    results_path: str | None = None
    notes: list[str] = field(default_factory=list)
    execution: dict[str, Any] = field(default_factory=lambda: {"backend": "in-process"})
    problem: str = ""  # the problem's name (titles, reports)

    @property
    def total(self) -> int:
        """Grid size."""
        return math.prod(len(a.values) for a in self.axes)

    @property
    def ok(self) -> bool:
        """Every point ran (none failed with an error) and the sweep finished."""
        return not self.interrupted and all(p.get("status") != "error" for p in self.points)

    def to_dict(self) -> dict[str, Any]:
        """The JSON document of the whole sweep (``kind: deq.sweep``)."""
        return {
            "kind": SWEEP_KIND,
            "schema_version": SWEEP_SCHEMA_VERSION,
            "problem": self.problem,
            "config": self.source,
            "axes": [a.to_dict() for a in self.axes],
            "options": {**asdict(self.options), "warm_start": self.warm_start},
            "complete": len(self.points) == self.total and not self.interrupted,
            "points_done": len(self.points),
            "points_total": self.total,
            "resumed": self.resumed,
            "wall_time": self.wall_time,
            "execution": self.execution,
            "summary": summarise(self),
            "notes": self.notes,
            "points": [_public(p) for p in self.points],
        }


def _public(point: dict[str, Any]) -> dict[str, Any]:
    """A point as written out: the solution only when it is small."""
    out = dict(point)
    sol = out.get("solution")
    if sol is not None and sum(len(row) for row in sol) > SOLUTION_SHOWN:
        out.pop("solution")
    return out


def header(base: SweepBase, axes: list[Axis], options: PointOptions, warm: bool) -> dict[str, Any]:
    """The first line of a results file: what the sweep is, for checking on --resume."""
    return {
        "kind": SWEEP_RESULTS_KIND,
        "schema_version": SWEEP_SCHEMA_VERSION,
        "config": str(Path(base.base_dir) / Path(base.source).name),
        "config_sha256": hashlib.sha256(base.text.encode("utf-8")).hexdigest(),
        "overrides": list(base.overrides),
        "solver": base.solver,
        "axes": [a.to_dict() for a in axes],
        "options": asdict(options),
        "warm_start": warm,
    }


def read_results(path: Path, expected: dict[str, Any]) -> dict[tuple[int, ...], dict[str, Any]]:
    """Points already in a results file (JSON lines), after checking it belongs to this sweep."""
    done: dict[tuple[int, ...], dict[str, Any]] = {}
    try:
        text = read_capped_file(path, f"'{path}'", MAX_DOCUMENT_BYTES, "is it a results file?")
    except ConfigError as exc:
        raise UsageError(f"--results: {exc.message}") from None
    lines = text.splitlines()
    if not lines:
        return done
    try:
        head = json.loads(lines[0])
    except (json.JSONDecodeError, RecursionError):  # RecursionError: nested too deeply
        head = None
    if not isinstance(head, dict) or head.get("kind") not in (
        SWEEP_RESULTS_KIND,
        LEGACY_RESULTS_KIND,
    ):
        raise UsageError(f"--results: '{path}' is not a deq sweep results file")
    for field_name in ("config", "overrides", "solver", "axes", "options", "warm_start"):
        if head.get(field_name) != json.loads(json.dumps(expected[field_name])):
            raise UsageError(
                f"--resume: '{path}' belongs to a different sweep ({field_name} differs); "
                "choose another --results path or drop --resume to start afresh"
            )
    if head.get("config_sha256") != expected["config_sha256"]:
        raise UsageError(
            f"--resume: the config file changed since '{path}' was written, so its points are "
            "stale; choose another --results path or drop --resume to start afresh"
        )
    for line in lines[1:]:
        try:
            point = json.loads(line)
        except (json.JSONDecodeError, RecursionError):
            continue  # the line an interrupt cut short: that point runs again
        if isinstance(point, dict) and point.get("status") != "error" and "index" in point:
            done[tuple(point["index"])] = point
    return done


def run_sweep(
    base: SweepBase,
    axes: list[Axis],
    *,
    options: PointOptions | None = None,
    warm_start: bool = False,
    results: Path | None = None,
    resume: bool = False,
    on_point: Callable[[int, int, dict[str, Any]], None] | None = None,
    executor: Executor | None = None,
) -> SweepResult:
    """Solve every grid point on ``executor`` (default: here, in grid order), appending each record
    to ``results`` (JSON lines) as it arrives; ``points`` come back in grid order.

    With ``warm_start`` a point starts from the solution of its predecessor along the last axis when
    that one converged (the point is a task that waits for its predecessor's). With ``resume`` the
    points already in ``results`` are read back and only the missing ones run. An interrupt (Ctrl-C)
    stops the sweep and returns what is done, marked ``interrupted``; every point that arrived is in
    ``results`` already.
    """
    options = options or PointOptions()
    executor = executor or InProcess()
    started = time.perf_counter()
    points = grid(axes)
    head = header(base, axes, options, warm_start)
    done: dict[tuple[int, ...], dict[str, Any]] = {}
    if results is not None:
        if results.exists() and resume:
            done = read_results(results, head)
        elif results.exists():
            raise UsageError(
                f"--results: '{results}' already exists; pass --resume to continue that sweep or "
                "choose another path"
            )
        elif resume:
            raise UsageError(f"--resume: '{results}' does not exist yet; nothing to resume")
    sweep = SweepResult(
        base.source, axes, [], options, warm_start, results_path=str(results) if results else None
    )
    sweep.resumed = len(done)
    missing = [(idx, assignment) for idx, assignment in points if idx not in done]
    source, files = base, None
    if executor.remote and missing:
        source, files = ship(base, (base.config(a) for _, _, a in _axis_points(axes)))
    tasks = _point_tasks(source, missing, done, options, warm_start)
    count = 0
    sweep.problem = base.problem_name
    with _Appender(results, head, fresh=not done) as out:

        def record(point: dict[str, Any]) -> None:
            nonlocal count
            count += 1
            sweep.points.append(point)
            if on_point is not None:
                on_point(count, len(points), point)

        for idx in sorted(done):
            record(done[idx])
        try:
            assignments = dict(missing)
            for idx, outcome in executor.run(tasks, files=files):
                failed = isinstance(outcome, TaskFailed)
                point = _failed(idx, assignments[idx], outcome) if failed else outcome
                out.write(point)
                record(point)
        except KeyboardInterrupt:
            sweep.interrupted = True
    sweep.points.sort(key=lambda p: p["index"])
    sweep.execution = executor.describe()
    sweep.wall_time = time.perf_counter() - started
    return sweep


def _point_tasks(
    source: SweepBase,
    missing: list[tuple[tuple[int, ...], dict[str, Any]]],
    done: Mapping[tuple[int, ...], Mapping[str, Any]],
    options: PointOptions,
    warm_start: bool,
) -> list[Task]:
    """One task per missing point; with warm starts, each runs after its predecessor along the last
    axis (or starts from that predecessor's solution when it was read back on resume)."""
    trust = granted()  # the client's consent, carried by every task
    tasks = []
    for idx, assignment in missing:
        kwargs: dict[str, Any] = {}
        after = None
        if warm_start and idx[-1] > 0:
            before = (*idx[:-1], idx[-1] - 1)
            if before not in done:
                after = before
            elif done[before].get("converged") and "solution" in done[before]:
                kwargs["warm_start"] = done[before]["solution"]
        tasks.append(
            Task(idx, point_task, (source, idx, assignment, options, trust), kwargs, after)
        )
    return tasks


def _failed(idx: tuple[int, ...], assignment: dict[str, Any], failed: TaskFailed) -> dict[str, Any]:
    """The record of a point whose task could not finish (its worker kept dying)."""
    return {
        "index": list(idx),
        "assignment": assignment,
        "status": "error",
        "error": failed.message,
    }


class _Appender:
    """Appends one JSON line per finished point and flushes it, so an interrupt loses at most one."""

    def __init__(self, path: Path | None, head: dict[str, Any], *, fresh: bool) -> None:
        self.path = path
        self.head = head
        self.fresh = fresh
        self.handle: Any = None

    def __enter__(self) -> _Appender:
        if self.path is not None:
            self.handle = self.path.open("w" if self.fresh else "a", encoding="utf-8")
            if self.fresh:
                self.write(self.head)
        return self

    def write(self, doc: dict[str, Any]) -> None:
        """One line, flushed to disk."""
        if self.handle is not None:
            self.handle.write(json.dumps(_public(doc), allow_nan=False) + "\n")
            self.handle.flush()

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.close()


# -- summaries -------------------------------------------------------------------------------------


def _attracting(point: dict[str, Any]) -> bool:
    """Whether every sample of the point has a fixed point with ρ(∂f/∂z) < 1 (locally attracting).

    A sample whose run found no fixed point is analysed at its last iterate: ρ there says nothing
    about attraction (a chaotic orbit passes through contracting regions too), so it never counts.
    """
    samples = point.get("samples") or []
    return bool(samples) and all(
        isinstance(s.get("rho"), float) and s["rho"] < 1 and s.get("rho_at") in FIXED_POINTS
        for s in samples
    )


def summarise(sweep: SweepResult) -> dict[str, Any]:
    """Regimes, transitions and certificate ranges (1-D), or label counts (any dimension)."""
    tally: dict[str, int] = {}
    for p in sweep.points:
        key = p.get("label", p.get("status", "error"))
        tally[key] = tally.get(key, 0) + 1
    out: dict[str, Any] = {"labels": tally}
    if len(sweep.axes) != 1:
        return out
    axis = sweep.axes[0]
    points = sorted(sweep.points, key=lambda p: p["index"][0])
    xs = [axis.values[p["index"][0]] for p in points]
    labels = [p.get("label", "error") for p in points]
    out["regimes"] = [
        {
            "label": lab,
            "from": xs[i],
            "to": xs[j],
            "points": j - i + 1,
            "iterations": [points[i].get("iterations"), points[j].get("iterations")],
        }
        for lab, i, j in _runs(labels)
    ]
    events = []
    for k in range(1, len(points)):
        a, b = labels[k - 1], labels[k]
        if a == b:
            continue
        events.append({"event": _event(a, b), "between": [xs[k - 1], xs[k]], "from": a, "to": b})
    out["events"] = events
    certified = [p.get("certificate") is True for p in points]
    out["certificate_ranges"] = [[xs[i], xs[j]] for ok, i, j in _runs(certified) if ok]
    rho_ok = [_attracting(p) for p in points]
    out["rho_below_one_ranges"] = [[xs[i], xs[j]] for ok, i, j in _runs(rho_ok) if ok]
    limits = {p["lr_limit"] for p in points if isinstance(p.get("lr_limit"), float)}
    if axis.key == "problem.lr" and len(limits) == 1:
        out["lr_limit"] = limits.pop()
    return out


def _event(a: str, b: str) -> str:
    """The name of a change of regime between neighbouring points, from label a to label b."""
    if a == "converged":
        return "convergence lost"
    if b == "converged":
        return "convergence gained"
    pa = 1 if a in ("converged", "slow") else _period(a)
    pb = _period(b)
    if pa and pb:
        return "period doubling" if pb == 2 * pa else "period change"
    if b == "chaotic":
        return "onset of chaos" if pa else "change"
    if a == "chaotic" and pb:
        return "periodic window"
    return "change"


def _period(label: str) -> int | None:
    return int(label.split()[1]) if label.startswith("period ") else None


def _runs(items: list[Any]) -> list[tuple[Any, int, int]]:
    """Maximal runs of equal items as (item, first index, last index)."""
    runs: list[tuple[Any, int, int]] = []
    for k, item in enumerate(items):
        if runs and runs[-1][0] == item and runs[-1][2] == k - 1:
            runs[-1] = (item, runs[-1][1], k)
        else:
            runs.append((item, k, k))
    return runs


CSV_FIELDS = (
    "status",
    "classification",
    "period",
    "iterations",
    "residual",
    "value",
    "rho",
)


def to_csv(sweep: SweepResult) -> str:
    """One row per point and sample: indices, parameter values, then the recorded fields."""
    import csv
    import io

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    names = [a.name for a in sweep.axes]
    writer.writerow(
        [f"i_{n}" for n in names] + names + ["sample", *CSV_FIELDS, "certificate", "error"]
    )
    for p in sweep.points:
        idx = p["index"]
        values = [a.values[i] for a, i in zip(sweep.axes, idx, strict=True)]
        if p.get("status") == "error":
            writer.writerow(
                [*idx, *values, "", "error", *[""] * (len(CSV_FIELDS) - 1), "", p["error"]]
            )
            continue
        for b, s in enumerate(p["samples"]):
            row = [s.get(k) for k in CSV_FIELDS]
            writer.writerow(
                [*idx, *values, b, *["" if v is None else v for v in row], p.get("certificate"), ""]
            )
    return buf.getvalue()
