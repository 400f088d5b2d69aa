"""The solver protocol and the one driver loop every solver runs under.

A solver holds only its mathematics: ``init(problem, z0) -> state`` and ``step(problem, state) -> state``,
where the state carries at least the iterate ``z`` and its residual ``g = g(z)``. The driver owns what
all solvers share: iteration counting, the per-sample history (bounded: ``solvers/history.py``),
the convergence test (``solvers/convergence.py``, the same object auto, the peers and the
diagnostics use), freezing converged samples, non-finite checks, the divergence guard, max_iter,
the time limit and the optional monitor.

Our solvers are split in two: an options class (a dataclass of typed fields with ``check()``, in
``solvers/options.py``, torch-free so that ``deq validate`` and ``deq list-solvers`` never import
torch) and a ``Method`` that holds the mathematics (its module imports torch at the top). The
options class names its method in ``method``; ``Solver.init``/``step``/``observe``/``finish``
load it on first use and hand over to it. Peers subclass ``Solver`` and implement the hooks
directly.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib
import math
import time
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args, get_origin

from deqcli import deadline
from deqcli.errors import UsageError
from deqcli.result import SolveResult, Status
from deqcli.solvers.convergence import DIVERGENCE_FACTOR, ConvergenceTest, Limits, StopMode
from deqcli.solvers.history import HISTORY_LIMIT, History

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem

# How many of the last iterates are kept for cycle detection by the diagnostics.
KEEP_ITERATES = 32
# Iterations between stopping tests by default (run.check_every): every iteration on the CPU,
# where the test is a few microseconds, every 8th on a GPU, where reading the norms to the host
# waits for every queued kernel and leaves the device idle until the next step is queued.
CHECK_EVERY = {"cpu": 1}
CHECK_EVERY_ACCELERATOR = 8


@dataclass
class State:
    """The part of a solver's state the driver reads and writes.

    ``z`` and ``g`` are the iterate and its residual, both (batch, n). ``active`` is the (batch,)
    mask of samples still running, set by the driver before each step, so a solver can skip
    finished samples (line searches, restarts) without tracking stops itself. ``res`` (‖g‖),
    ``f_norm`` (‖f(z)‖) and ``step_norm`` (‖z − z_prev‖) per row are norms the step has computed
    anyway or knows exactly; the driver reuses them instead of passes of its own over g and z, and
    clears them before each step.
    """

    z: torch.Tensor
    g: torch.Tensor
    active: torch.Tensor | None = field(default=None, kw_only=True)
    res: torch.Tensor | None = field(default=None, kw_only=True)
    f_norm: torch.Tensor | None = field(default=None, kw_only=True)
    step_norm: torch.Tensor | None = field(default=None, kw_only=True)


@dataclass
class StopRule:
    """When to stop: the convergence test per sample, budgets, guards and what is recorded."""

    atol: float = 1e-10
    rtol: float = 0.0
    max_iter: int = 1000
    timeout: float | None = None
    divergence_factor: float = DIVERGENCE_FACTOR
    keep_iterates: int = KEEP_ITERATES
    stop_mode: StopMode = "abs"
    history_limit: int = HISTORY_LIMIT
    monitor_every: int = 1
    check_every: int | None = None  # None: by device (CHECK_EVERY)

    def checks_every(self, device: torch.device) -> int:
        """Iterations between stopping tests on ``device``."""
        if self.check_every is not None:
            return self.check_every
        return CHECK_EVERY.get(device.type, CHECK_EVERY_ACCELERATOR)

    @property
    def test(self) -> ConvergenceTest:
        """The convergence test this rule applies (shared with auto, the peers and the diagnostics)."""
        return ConvergenceTest(
            atol=self.atol,
            rtol=self.rtol,
            mode=self.stop_mode,
            divergence_factor=self.divergence_factor,
        )


@dataclass
class Iteration:
    """What a monitor sees: the iteration, every sample's ‖g‖, how many still run, elapsed time."""

    k: int
    residual: torch.Tensor  # (B,)
    running: int
    elapsed: float
    stop: StopRule


Monitor = Callable[[Iteration], None]


def evaluate(problem: Problem, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(z), g(z)) from one counted evaluation in the problem's own form.

    The form's own output is kept exact: f for a fixed-point map, g for a residual. Deriving g as
    z − f for a residual problem would cancel to zero once |z| ≫ |g| (a run far out would then
    look converged).
    """
    if problem.form == "residual":
        g = problem.g(z)
        return z - g, g
    f = problem.f(z)
    return f, z - f


class Method:
    """The mathematics of one of our solvers, built from its options on first use.

    Subclasses implement ``init`` and ``step`` (and optionally ``observe`` and ``finish``) with the
    same meaning as the ``Solver`` hooks; they may import torch freely.
    """

    def __init__(self, options: Solver) -> None:
        self.options = options

    def init(self, problem: Problem, z0: torch.Tensor) -> State:
        """Build the starting state from ``z0`` (evaluating the residual there)."""
        raise NotImplementedError

    def step(self, problem: Problem, state: State) -> State:
        """Advance every sample by one iteration."""
        raise NotImplementedError

    def setup(self, stop: StopRule) -> None:
        """The stopping rule in force, before ``init`` (see ``Solver.setup``)."""

    def observe(self, state: State, active: torch.Tensor) -> torch.Tensor | None:
        """The samples this method cannot advance any further (see ``Solver.observe``)."""
        return None

    def finish(self, state: State, result: SolveResult) -> None:
        """Add notes or ``result.extra`` entries at the end of a run."""


@dataclass
class Solver:
    """Base class: subclasses are dataclasses whose fields are their options (with defaults)."""

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    method: ClassVar[str] = ""  # "module:Class" of the Method that implements it (ours)
    # True for solvers whose steps evaluate nothing (a peer's recorded run, replayed): the time
    # limit was applied while recording, so the replay of what was recorded is never cut short.
    replays: ClassVar[bool] = False

    def implementation(self) -> Method:
        """The Method for these options, imported and built on first use (then kept)."""
        built = self.__dict__.get("_method")
        if built is None:
            target = self.method_path()
            if not target:
                raise NotImplementedError(f"solver '{self.name}' implements its hooks itself")
            module, cls = target.split(":")
            built = getattr(importlib.import_module(module), cls)(self)
            self.__dict__["_method"] = built
        return built

    def method_path(self) -> str:
        """ "module:Class" of the Method for these option values (by default ``method``)."""
        return self.method

    def init(self, problem: Problem, z0: torch.Tensor) -> State:
        """Build the starting state from ``z0`` (evaluating the residual there)."""
        return self.implementation().init(problem, z0)

    def step(self, problem: Problem, state: State) -> State:
        """Advance every sample by one iteration; the driver freezes converged samples afterwards."""
        return self.implementation().step(problem, state)

    def check(self) -> None:
        """Validate option values; raise ``ValueError("option: reason")`` on a bad one."""

    # -- optional hooks the driver calls; the defaults do nothing -------------------------------
    def setup(self, stop: StopRule) -> None:
        """Called before ``init`` with the stopping rule in force.

        Peers that run their own loop take their tolerance and iteration budget from it.
        """
        if self.method_path():
            self.implementation().setup(stop)

    def observe(self, state: State, active: torch.Tensor) -> torch.Tensor | None:
        """Called before each step with the (batch,) mask of samples still running.

        The driver has already stored the mask in ``state.active``. A solver may
        return a mask of samples it cannot advance any further (a peer whose
        recorded run ended, a trust region that collapsed); the driver stops those that are still
        running as ``stalled``. Return None when there is nothing to report.
        """
        if not self.method_path():
            return None
        return self.implementation().observe(state, active)

    def finish(self, state: State, result: SolveResult) -> None:
        """Called with the finished result: a solver may append ``result.notes`` or set ``result.extra``."""
        if self.method_path():
            self.implementation().finish(state, result)

    def options(self) -> dict[str, Any]:
        """The options in effect, for reports and JSON."""
        return dataclasses.asdict(self)

    @classmethod
    def option_fields(cls) -> dict[str, dataclasses.Field[Any]]:
        """The option fields by name."""
        return {f.name: f for f in dataclasses.fields(cls)}

    @classmethod
    def configure(cls, options: dict[str, Any], *, key: str = "solver") -> Solver:
        """Build a solver from user options, converting types and rejecting unknown names."""
        fields = cls.option_fields()
        hints = _option_hints(cls)
        values: dict[str, Any] = {}
        for opt, raw in options.items():
            if opt not in fields:
                valid = ", ".join(sorted(fields)) or "none"
                close = difflib.get_close_matches(opt, list(fields), n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise UsageError(
                    f"{key}.{opt}: unknown option for solver '{cls.name}'{hint} (valid options: {valid})"
                )
            if raw is None and type(None) not in get_args(hints[opt]):
                continue  # null keeps the option's default, as `--set key=` does for run keys
            values[opt] = _coerce(raw, hints[opt], f"{key}.{opt}")
        solver = cls(**values)
        try:
            solver.check()
        except ValueError as exc:
            raise UsageError(f"{key}.{exc}") from None
        return solver


@functools.cache
def _option_hints(cls: type[Solver]) -> dict[str, Any]:
    """A solver class's resolved type hints (resolving them costs about 0.5 ms: once per class)."""
    return typing.get_type_hints(cls)


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML/flag value to an option's declared type, or raise a UsageError naming the key."""
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if value not in choices:
            raise UsageError(f"{key}: must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise UsageError(f"{key}: must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, bool) or not (isinstance(value, int) or _is_integral(value)):
            raise UsageError(f"{key}: must be an integer, got {value!r}")
        return int(value)
    if hint is float:
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            number = None
        if number is None or isinstance(value, bool):
            raise UsageError(f"{key}: must be a number, got {value!r}")
        if not math.isfinite(number):
            # inf or NaN would reach the JSON result, which must stay valid JSON.
            raise UsageError(f"{key}: must be a finite number, got {value!r}")
        return number
    if hint is str:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return ",".join(value)  # a YAML list where comma-separated names go (auto's stages)
        if isinstance(value, (bool, dict, list, tuple)) or value is None:
            raise UsageError(f"{key}: must be text, got {value!r}")
        return str(value)
    return value


def _is_integral(value: Any) -> bool:
    return isinstance(value, float) and value.is_integer()


def run(
    problem: Problem,
    solver: Solver,
    stop: StopRule,
    *,
    monitor: Monitor | None = None,
) -> SolveResult:
    """Run ``solver`` on ``problem`` until every sample stops; the one loop all solvers share.

    ``monitor`` (optional) is called with an ``Iteration`` at the start, after every
    ``stop.monitor_every``-th iteration and once at the end (live progress, ``--monitor``).
    ``stop.timeout`` is a deadline for every evaluation made during the run
    (``deqcli.deadline``), so it also stops a step that evaluates many times, and a peer's loop.

    With ``stop.check_every`` = c > 1 the stopping test reads the norms to the host only every c
    iterations (and before any other reason to stop). The rows in between are then tested in
    order, so a sample stops at the first iteration it met the test, as with c = 1: its iteration
    count, status, history, kept iterates and solution are those of that iteration. Only the
    evaluation counts differ: they include the up to c − 1 evaluations made after it.
    """
    with deadline.armed(stop.timeout):
        return _run(problem, solver, stop, monitor)


def _run(problem: Problem, solver: Solver, stop: StopRule, monitor: Monitor | None) -> SolveResult:
    import torch

    problem.counter.reset()
    problem.pack(None)
    start = time.perf_counter()
    test = stop.test
    solver.setup(stop)
    limit = deadline.current()
    started = evaluated = True  # evaluated: the start's residual is known (see below)
    try:
        state = solver.init(problem, problem.z0)
    except deadline.DeadlineExceeded:
        # Past the deadline before the first iterate (a peer's whole run happens in init): the
        # result is the start, evaluated once more so the report has its residual. The method
        # has no state of its own to report from, so its ``finish`` is not called.
        started = False
        g0, evaluated = _start_residual(problem, limit)
        state = State(z=problem.z0, g=g0)
    res = _norms(state.g)
    f_norm = _norms(state.z - state.g)
    # Per-sample limits fixed for the run: the tolerance base and the divergence ceiling.
    limits = test.start(res)
    host = HostLimits.of(limits) if problem.batch <= HOST_TEST_MAX else None
    history = History(limit=stop.history_limit)
    history.append(0, res, f_norm, None, time.perf_counter() - start)
    tail = [state.z.detach().clone()]

    status: list[Status | None] = [None] * problem.batch
    iterations = [0] * problem.batch
    active = torch.ones(problem.batch, dtype=torch.bool, device=state.z.device)
    if not evaluated:
        # The start's residual could not be had again (see _start_residual): a timeout, not a
        # non-finite map.
        _finish(status, iterations, Status.TIMEOUT, 0)
        active = torch.zeros_like(active)
    counted: torch.Tensor | None = None  # the mask the counter last read (it reads it to the host)
    k = 0
    every = max(1, stop.monitor_every)
    check_every = stop.checks_every(state.z.device)
    # With check_every > 1: the iterations not yet tested, (k, ‖g‖, ‖f‖, z, g) each.
    untested = _Untested(test, limits, host, history, tail) if check_every > 1 else None
    # Iterates kept: with untested rows, enough that dropping those after the end leaves as many.
    tail_length = stop.keep_iterates + check_every - 1
    # While the problem is packed: the stopped rows to put back when the running rows change.
    frozen: _Frozen | None = None
    # The first iteration whose iterate has stopped rows a packed step left as the solver wrote.
    stale_from: int | None = None

    def test_now(last: bool = False) -> None:
        """Stop the samples that met the test or failed (all untested rows when ``last``)."""
        nonlocal active, res, f_norm, k
        if untested is None:
            stopped = _stop_samples(test, limits, host, res, f_norm, status, iterations, active, k)
        elif last or k % check_every == 0:
            running = status.count(None)
            ended = untested.test(state, status, iterations)
            res, f_norm = state.res, state.f_norm
            stopped = status.count(None) < running
            if ended is not None:
                k = ended  # every sample stopped by then: the run ended at that iteration
        else:
            return
        if stopped:
            active = torch.tensor([s is None for s in status], device=active.device)

    if untested is not None:
        untested.add(k, res, f_norm, state)
    while True:
        test_now(last=k >= stop.max_iter)
        n_active = status.count(None)
        if monitor is not None and k % every == 0:
            monitor(Iteration(k, res, n_active, time.perf_counter() - start, stop))
        if n_active == 0:
            break
        if k >= stop.max_iter:
            _finish(status, iterations, Status.MAX_ITER, k)
            break
        if limit is not None and not solver.replays and limit.expired():
            test_now(last=True)
            _finish(status, iterations, Status.TIMEOUT, k)
            break
        state.active = active
        stuck = solver.observe(state, active)
        if stuck is not None and bool(stuck.any()):
            test_now(last=True)  # a sample that converged before it stalled has converged
            if _stall_samples(stuck & active, status, iterations, k):
                active = torch.tensor([s is None for s in status], device=active.device)
            n_active = status.count(None)
            if n_active == 0:
                break
            state.active = active
        z_prev, g_prev, res_prev, f_norm_prev = state.z, state.g, res, f_norm
        state.res = state.f_norm = state.step_norm = None
        if active is not counted:  # a stopped sample's evaluations no longer count
            problem.counter.running = counted = active
            if frozen is not None:
                frozen.restore(state)
            problem.pack(active, state.z)  # nor are they made (the map evaluates running rows)
            frozen = _Frozen.of(state, active) if problem.packed and untested is None else None
        try:
            state = solver.step(problem, state)
        except deadline.DeadlineExceeded:
            # The deadline passed inside the step (a line search, an inner solve): keep the
            # last finished iterate.
            state.z, state.g, state.res, state.f_norm = z_prev, g_prev, res_prev, f_norm_prev
            test_now(last=True)
            _finish(status, iterations, Status.TIMEOUT, k)
            break
        k += 1
        res = state.res if state.res is not None else _norms(state.g)
        f_norm = state.f_norm if state.f_norm is not None else _norms(state.z - state.g)
        step = state.step_norm if state.step_norm is not None else _norms(state.z - z_prev)
        if n_active < problem.batch:
            # Converged or failed samples stop changing: restore their norms, and their rows
            # unless the problem is packed (then ``frozen`` puts them back later, once).
            if frozen is None:
                keep = active[:, None]
                state.z = torch.where(keep, state.z, z_prev)
                state.g = torch.where(keep, state.g, g_prev)
            elif stale_from is None:
                stale_from = k
            res = torch.where(active, res, res_prev)
            f_norm = torch.where(active, f_norm, f_norm_prev)
            step = torch.where(active, step, 0.0)
            state.res = res
        history.append(k, res, f_norm, step, time.perf_counter() - start)
        tail.append(state.z)  # detached once, for the result
        if len(tail) > tail_length:
            tail.pop(0)
        if untested is not None:
            untested.add(k, res, f_norm, state)

    problem.pack(None)  # what follows (reports, diagnostics) evaluates every row
    if frozen is not None:
        frozen.restore(state)
    if stale_from is not None:
        _settle_tail(tail, state.z, iterations, k, stale_from)
    if monitor is not None and k % every != 0:
        monitor(Iteration(k, res, 0, time.perf_counter() - start, stop))
    final = [s if s is not None else Status.MAX_ITER for s in status]
    result = SolveResult(
        problem=problem.name,
        solver=solver.name,
        options=solver.options(),
        solution=state.z.detach(),
        sample_status=final,
        iterations=iterations,
        counts=problem.counter.snapshot(),
        **history.export(),
        tail_iterates=[z.detach() for z in tail[-stop.keep_iterates :]],
        wall_time=time.perf_counter() - start,
        device=str(problem.device),
        dtype=str(problem.dtype).removeprefix("torch."),
        atol=stop.atol,
        rtol=stop.rtol,
        stop_mode=stop.stop_mode,
        max_iter=stop.max_iter,
        form=problem.form,
    )
    if started:
        solver.finish(state, result)
    else:
        note = f"{solver.name}: stopped by the time limit before its first step"
        if not evaluated:
            note += "; the start's residual is unknown: evaluating it again did not return in time"
        result.notes.append(note)
    return result


# The least time the start's residual gets for the report of a run stopped inside its init (a
# limit of 0.1 s may be shorter than one evaluation).
START_RESIDUAL_SECONDS = 1.0


def _start_residual(problem: Problem, limit: deadline.Deadline | None) -> tuple[torch.Tensor, bool]:
    """(g(z0), True) for the report of a run stopped inside its solver's init: evaluated once
    more with as long again as the run had (like the diagnostics; at least
    START_RESIDUAL_SECONDS); (NaN, False) where even that does not return (an evaluation that
    hangs, stopped by the watchdog)."""
    import torch

    seconds = max(limit.seconds, START_RESIDUAL_SECONDS) if limit is not None else None
    with deadline.suspended(), deadline.armed(seconds):
        try:
            return problem.g(problem.z0), True
        except deadline.DeadlineExceeded:
            return torch.full_like(problem.z0, torch.nan), False


def _norms(x: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.linalg.vector_norm(x, dim=1)


@dataclass
class HostLimits:
    """A run's per-sample limits as Python floats, for the stopping test on the host."""

    base: list[float]
    ceiling: list[float]

    @classmethod
    def of(cls, limits: Limits) -> HostLimits:
        """Read the limits to the host once, at the start of a run."""
        return cls(base=limits.base.tolist(), ceiling=limits.ceiling.tolist())


# Up to this many samples the stopping test runs on the host: the norms are read once (they had
# to reach the host for the verdicts anyway) and compared in Python. Every torch operation after
# an evaluation of f costs tens of microseconds (its code and data are no longer in cache), so
# for a modest batch a loop over the samples is cheaper than the handful of tensor operations
# it replaces; for larger batches the tensor form wins.
HOST_TEST_MAX = 1024


def _stop_samples(
    test: ConvergenceTest,
    limits: Limits,
    host: HostLimits | None,
    res: torch.Tensor,
    f_norm: torch.Tensor,
    status: list[Status | None],
    iterations: list[int],
    active: torch.Tensor,
    k: int,
) -> bool:
    """Stop samples that converged, diverged or went non-finite at iteration k; True if any did.

    It runs every iteration, so it is kept to one read of the norms to the host and either a
    Python loop over the samples still running (``host``) or a handful of tensor operations.
    Both apply ``test`` exactly: the comparisons are those of ``ConvergenceTest.converged`` and
    ``failed``, on the same float values (a float32 norm converts to a Python float exactly).
    """
    import torch

    if host is not None:
        values = res.tolist()
        threshold = host.base if not limits.rtol else test.threshold(limits, f_norm).tolist()
        stopped = False
        for b, s in enumerate(status):
            if s is not None:
                continue
            value = values[b]
            if value <= threshold[b]:
                status[b] = Status.CONVERGED
            elif not value <= host.ceiling[b]:
                status[b] = Status.DIVERGED if math.isfinite(value) else Status.NONFINITE
            else:
                continue
            iterations[b] = k
            stopped = True
        return stopped
    converged = test.converged(res, limits, f_norm)
    stopped = active & (converged | test.failed(res, limits))
    if not bool(stopped.any()):
        return False
    # The verdicts as lists, read once: indexing the tensors sample by sample costs a dispatch
    # (and on a GPU a synchronisation) per stopped sample.
    verdicts = zip(stopped.tolist(), converged.tolist(), torch.isfinite(res).tolist(), strict=True)
    for b, (stops, ok, finite) in enumerate(verdicts):
        if stops:
            status[b] = Status.CONVERGED if ok else Status.DIVERGED if finite else Status.NONFINITE
            iterations[b] = k
    return True


@dataclass
class _Untested:
    """The iterations run since the last stopping test (``StopRule.check_every`` > 1).

    ``test`` reads their norms to the host in one transfer and tests them in order. A sample that
    met the test (or failed) at an earlier row stops there: the later rows of the history and of
    the kept iterates, and the state, get that row's values for it, as if the driver had frozen
    it at once.
    """

    rule: ConvergenceTest
    limits: Limits
    host: HostLimits | None
    history: History
    tail: list[torch.Tensor]
    rows: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = field(
        default_factory=list
    )
    on_host: Limits = field(init=False)

    def __post_init__(self) -> None:
        # The rows are tested on the host: the limits go there once.
        self.on_host = Limits(self.limits.base.cpu(), self.limits.ceiling.cpu(), self.limits.rtol)

    def add(self, k: int, res: torch.Tensor, f_norm: torch.Tensor, state: State) -> None:
        """Iteration ``k``'s norms and iterate, to be tested later."""
        self.rows.append((k, res, f_norm, state.z, state.g))

    def test(self, state: State, status: list[Status | None], iterations: list[int]) -> int | None:
        """Test every untested row in order and freeze what stopped early. Leaves the last row
        that still counts in ``state`` (z, g, res, f_norm): the newest, or, once every sample has
        stopped, that of the last one to stop, whose iteration is returned (the rows after it are
        dropped: the run ended there)."""
        import torch

        rows, self.rows = self.rows, []
        if not rows:
            return None
        norms = torch.stack([torch.stack([row[1], row[2]]) for row in rows]).cpu()  # one transfer
        stopped_at: dict[int, int] = {}  # sample -> index of the row it stopped at
        for i, (k, *_) in enumerate(rows):
            running = torch.tensor([s is None for s in status])
            if _stop_samples(
                self.rule, self.on_host, self.host, norms[i, 0], norms[i, 1], status, iterations,
                running, k,
            ):  # fmt: skip
                stopped_at.update(
                    (b, i) for b, on in enumerate(running.tolist()) if on and status[b]
                )
        # Rows after a sample's stopping row repeat that row for it (step 0), as the driver's
        # freezing would have made them.
        _, res, f_norm, z, g = rows[0]
        kept = [(res, f_norm, z, g)]
        for i in range(1, len(rows)):
            k, res_i, f_i, z_i, g_i = rows[i]
            frozen = [stopped_at.get(b, i) < i for b in range(len(status))]
            if any(frozen):
                mask = torch.tensor(frozen, device=z.device)
                res, f_norm = torch.where(mask, res, res_i), torch.where(mask, f_norm, f_i)
                z, g = torch.where(mask[:, None], z, z_i), torch.where(mask[:, None], g, g_i)
                self.history.replace(k, res, f_norm, mask)
                depth = rows[-1][0] - k  # 0 for the newest kept iterate
                if depth < len(self.tail):
                    self.tail[-1 - depth] = z
            else:
                res, f_norm, z, g = res_i, f_i, z_i, g_i
            kept.append((res, f_norm, z, g))
        last = None
        if all(s is not None for s in status):
            last = max(iterations)
            newest = rows[-1][0]
            self.history.truncate(last)
            del self.tail[max(1, len(self.tail) - (newest - last)) :]
            kept = kept[: len(kept) - (newest - last)]
        state.res, state.f_norm, state.z, state.g = kept[-1]
        return last


@dataclass
class _Frozen:
    """The rows of the samples that had stopped when the problem was packed, as they were then.

    A packed problem's stopped rows have a constant map and nothing reads what a solver computes
    for them, so the driver need not restore them after every step: two full-size selects per
    iteration, a third of an iteration's cost when one sample of a batch runs alone. They are
    put back once, when the running rows change again or the run ends.
    """

    stopped: torch.Tensor  # (B,) bool
    z: torch.Tensor
    g: torch.Tensor

    @classmethod
    def of(cls, state: State, active: torch.Tensor) -> _Frozen:
        """The stopped rows of ``state`` (those not ``active``), which are final now."""
        return cls(~active, state.z, state.g)

    def restore(self, state: State) -> None:
        """Put the stopped rows of ``state``'s z and g back to their final values."""
        import torch

        keep = self.stopped[:, None]
        state.z = torch.where(keep, self.z, state.z)
        state.g = torch.where(keep, self.g, state.g)


def _settle_tail(
    tail: list[torch.Tensor], solution: torch.Tensor, iterations: list[int], k: int, first: int
) -> None:
    """Give every kept iterate from iteration ``first`` on, after a sample's last iteration, that
    sample's solution row (the driver left stopped rows stale while the problem was packed;
    earlier iterates are exact). tail[-1 - i] is iteration k − i: without untested rows the run
    keeps one iterate per iteration."""
    import torch

    last = torch.tensor(iterations, device=solution.device)
    for i in range(min(len(tail), k - first + 1)):
        done = (last < k - i)[:, None]
        tail[-1 - i] = torch.where(done, solution, tail[-1 - i])


def _stall_samples(
    stuck: torch.Tensor, status: list[Status | None], iterations: list[int], k: int
) -> bool:
    """Stop the samples a solver reports it cannot advance (``Solver.observe``); True if any."""
    if not bool(stuck.any()):
        return False
    for b in stuck.nonzero().flatten().tolist():
        status[b] = Status.STALLED
        iterations[b] = k
    return True


def _finish(status: list[Status | None], iterations: list[int], why: Status, k: int) -> None:
    for b, s in enumerate(status):
        if s is None:
            status[b] = why
            iterations[b] = k
