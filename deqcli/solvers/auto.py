"""``auto``: an ordered list of presets, and the evidence that moves a run from one to the next.

The list for problems whose dense Jacobians are affordable:

    anderson → newton → trust-region → levenberg-marquardt → ptc

and, beyond ``dense_max`` unknowns or the dense-Jacobian memory limit:

    anderson → newton-krylov → ptc

Problems given as a residual g(z) = 0 skip anderson: it accelerates a fixed-point map, and the
naive map z − g(z) of a residual has no reason to contract. ``stages`` replaces the list.

The whole batch runs one preset at a time. After every step the samples still running are
checked, and the batch moves on when any of them shows

- a non-finite residual, or one the driver would call diverged (the shared ``ConvergenceTest``):
  the step is discarded, every sample restarts the next preset from its best iterate;
- growth: ‖g‖ > ``growth`` × the smallest residual it has had in the run;
- a stall (the shared ``StallWatch``): ‖g‖ has not fallen below ``progress`` × its level at the
  last such fall for the stage's patience (``patience`` for anderson, the trust region, LM;
  ``newton_patience`` for newton and newton-krylov);
- in newton and newton-krylov, two line searches in a row that found no acceptable step;
- or the preset reports it cannot advance the sample (a collapsed trust region, hybrj's slow-
  progress tests, Levenberg–Marquardt steps at rounding level, Broyden's failed resets).

On a fixed-point problem with the default list, plain iteration runs first for a trial of 8
steps and goes on where its rate predicts a short run; else anderson starts from z0
(``AutoMethod._end_trial``). After 30 iterations of anderson whose rate predicts a long run, a
spectral probe (a few Arnoldi steps on J_f) estimates what plain iteration, Anderson, dense
Newton and Newton–Krylov would cost and moves to the cheapest (``AutoMethod._probe``; Newton–Krylov
preconditioned by the batch's shared linearisation is weighed on either list where the map
allows it, the tanh layer, and inserted when clearly the cheapest); where anderson stalls or
grows, a second probe puts plain iteration next if it contracts there and costs less than Newton
started from a stall (``AutoMethod._plain_after_stall``). ``probe: false`` turns both off.

Ψtc, the last resort for problems where every local method stalls far from a root, runs until the
driver stops it. Each switch costs one evaluation (the new preset's start, more for a Jacobian).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from deqcli.errors import UsageError
from deqcli.solvers.base import Method, Solver, State
from deqcli.solvers.convergence import ConvergenceTest, Limits, StallState, StallWatch

if TYPE_CHECKING:
    from deqcli.linalg import LinearOperator
    from deqcli.linalg.preconditioners import SharedLinearisation
    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult
    from deqcli.solvers.base import StopRule
    from deqcli.solvers.options import Auto

# Stages whose stall patience is ``newton_patience`` (fast local methods: few steps tell) and
# whose steps come from a line search: a step that leaves z where it was means the search found
# nothing acceptable along the direction, which repeats from the same point.
NEWTON_STAGES = {"newton", "newton-krylov"}
# Line-search failures in a row (z unchanged) that move a Newton stage on.
FAILED_SEARCHES = 2
# The spectral probe (see ``AutoMethod._probe``): after this many iterations of the first
# anderson stage (its rate is read over the second half, past the first steps' transient, which
# overstates it), when that rate predicts more work than PROBE_LONG further iterations at
# ANDERSON_COST evaluations each (PROBE_LONG iterations where Anderson costs that; fewer on a
# small closed-form layer, where an Anderson iteration is worth many evaluations of f).
PROBE_AFTER = 30
PROBE_LONG = 100
# Arnoldi steps of the probe on J_f (one JVP each).
PROBE_STEPS = 12
# The relative residual down to which the probe reads GMRES's progress off its Arnoldi steps: a
# preconditioner's own products (``deqcli.linalg.krylov._Products``) replace the JVPs where they
# are that accurate (the residuals that decide between methods lie above 1e-3 after 12 steps;
# below, a few more or fewer predicted steps change no choice).
PROBE_TOLERANCE = 1e-3
# The cost model, in evaluations of f: an Anderson iteration costs about ANDERSON_COST plain
# ones (its mixing and QR updates are memory-bound passes over m stored columns); a Newton solve
# about NEWTON_STEPS iterations of one Jacobian and an LU, about NEWTON_COST·n evaluations each
# with autodiff's Jacobian (n reverse passes, vectorised) and NEWTON_COST_CLOSED·n with a closed
# form (writing the B·n² entries; the tanh layer). Measured on tanh layers, n = 64–1024 and
# B = 4–32, one thread: the autodiff Jacobian 0.2–1.5·n evaluations, the closed form 0.1–0.45·n,
# the LU 0.1–0.75·n; at n = 1024, B = 32 a Newton iteration with the closed form is 0.56·n. On
# small layers the per-iteration overheads make it relatively cheaper (0.12–0.38·n plain
# iterations at n = 64–256); the constant follows the large ones, where the choice matters most.
# Iteration counts predicted from the rate read over the probe's window come out short: on the
# hard family the runs took 0.7–2.5 times the prediction, 1.6 in the median: ITERATION_MARGIN.
# Counted work, not timings: the choice is reproducible.
ANDERSON_COST = 2.0
# Where f is a dense layer given in closed form (the tanh layer: B·n² multiply-adds per
# evaluation), Anderson's own work per iteration (about a hundred tensor operations on (B, m, n)
# and (B, n) data, m = 5) is ANDERSON_WORK_CLOSED/n evaluations of f, at least one: measured 3.9,
# 2.1 and 0.9 extra evaluations at n = 256, 512, 1024 (B = 64, 32, 32). On small layers this, not
# f, is most of an Anderson iteration, and a Newton step is relatively cheap.
ANDERSON_WORK_CLOSED = 1000.0
ITERATION_MARGIN = 1.6
NEWTON_STEPS = 7
NEWTON_COST = 1.3
NEWTON_COST_CLOSED = 0.5
# Newton–Krylov (beyond dense_max): one GMRES step costs about KRYLOV_STEP_COST evaluations of f
# (a JVP and the Gram–Schmidt against the basis: 1.2–2.8 on tanh layers with n = 1024–2048,
# B = 8–16, closed-form or autodiff JVPs alike), each Newton step KRYLOV_NEWTON_EXTRA more (the
# new residual, the restart's true residual).
KRYLOV_STEP_COST = 2.0
KRYLOV_NEWTON_EXTRA = 2
# Newton–Krylov preconditioned by the batch's shared linearisation (maps with J_f = diag(s) W,
# one W: the tanh layer; ``deqcli.linalg.preconditioners``): a GMRES step costs KRYLOV_STEP_COST
# as well, its two triangular solves in the JVP's place (the solve gives the step's product:
# ``SharedLinearisation.product``; 0.7–3.5 evaluations measured at n = 256–2048, B = 8–64,
# against 1.2–2.7 unpreconditioned), and a run about PRECONDITIONER_FACTORS LUs of n³/3
# multiply-adds, n/(3B) evaluations each (2–5 on the hard family). The probe reads the GMRES
# steps off the preconditioned system itself.
PRECONDITIONER_FACTORS = 3
# Where the list does not hold Newton–Krylov (the dense list), the preconditioned one is put
# ahead of it only when estimated this many times cheaper than the next best. Its estimate
# assumes Newton converges from the probe's iterate in NEWTON_STEPS steps; on a strongly
# non-normal layer with inputs of scale 1 (nonnormal-x1: rows' scales far apart, 177 GMRES steps
# predicted, 925 evaluations against plain iteration's 1141) its line searches failed and auto
# went on through four more presets, 7.5 s against plain iteration's 0.8 s. Where it paid, it
# was estimated 2.4–25 times cheaper.
PRECONDITIONED_MARGIN = 2.0
# Where anderson stalled or its residual grew, Newton starts outside the region where
# NEWTON_STEPS steps suffice: on the family's strongly non-normal layer (‖W‖₂ = 3.4, ρ(W) = 0.995,
# inputs of scale 1) its globalised stages then took 88 Jacobians, 12 times the estimate, while
# plain iteration converged in 1,400 steps. After such a switch Newton's estimate is taken
# NEWTON_AFTER_STALL times over, and plain iteration goes first where it is cheaper than that.
NEWTON_AFTER_STALL = 4.0
# A plain-iteration preset is checked every FIXED_POINT_CHECKS steps (its stall patience counted
# in steps all the same): its step is one evaluation of f and a norm, and the dozen small tensor
# operations of the checks, plus a host read, made auto's plain iteration cost 1.8 times the
# solver's own on a layer with n = 512, B = 16.
FIXED_POINT_CHECKS = 8
# The plain-iteration trial (see ``AutoMethod._end_trial``): on a fixed-point problem with the
# default list, plain iteration runs first for FIXED_POINT_CHECKS steps and goes on where its
# rate over the second half of them predicts at most PLAIN_ENOUGH further steps for every sample:
# at such rates Anderson, at about ANDERSON_COST times the work per step, saves a few iterations
# at most. On the family's easy layer (n = 512, B = 32) auto's Anderson took 19 iterations and 2.9 times
# plain iteration's time for its 20.
PLAIN_ENOUGH = 32


def _rate_and_steps(
    now: torch.Tensor, mark: torch.Tensor, span: int, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample: the rate per iteration over the last ``span`` iterations (‖g‖ went from
    ``mark`` to ``now``), and the iterations that rate needs to bring ‖g‖ down to ``target``."""
    tiny = torch.finfo(now.dtype).tiny
    q = (now.clamp_min(tiny) / mark.clamp_min(tiny)) ** (1.0 / span)
    return q, torch.log(target.clamp_min(tiny) / now.clamp_min(tiny)) / torch.log(q)


def _jacobian_f(problem: Problem, z: torch.Tensor, running: torch.Tensor) -> LinearOperator:
    """J_f at z as an operator on the running rows (its products are counted JVPs)."""
    from deqcli.linalg import jacobian_operator

    return jacobian_operator(problem, z, of="f").with_active(running)


def _krylov_residual(
    op: LinearOperator,
    g: torch.Tensor,
    running: torch.Tensor,
    precond: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B,) GMRES's relative residual on the Newton system (I − J_f) d = −g after PROBE_STEPS
    steps, with ``op`` = J_f at the iterate of g: PROBE_STEPS Arnoldi steps started from g.

    From g the Krylov space is the one GMRES builds for that system, and the Arnoldi steps on
    the system's operator I − J_f (or (I − J_f) M⁻¹ with a right preconditioner M⁻¹), with
    Hessenberg matrix H̄, give its residual after those steps as min ‖e₁ − H̄ y‖: how fast a
    Newton–Krylov solve from z converges. (ρ(J_f) is estimated from a random start instead,
    ``_ritz_rho``: after Anderson's steps g holds little of the slow modes Anderson has already
    found, and Ritz values from g would miss them.)
    """
    from deqcli.linalg import ShiftedOperator, arnoldi

    start = torch.where(running[:, None], g, torch.zeros_like(g))
    newton = ShiftedOperator(op, 1.0, -1.0).with_active(running)  # I − J_f
    krylov = arnoldi(newton, start, PROBE_STEPS, precond=precond, tolerance=PROBE_TOLERANCE)
    system = krylov.hessenberg.to("cpu", torch.float64)
    k = system.shape[2]
    e1 = torch.zeros(system.shape[0], k + 1, 1, dtype=torch.float64)
    e1[:, 0] = 1.0
    y = torch.linalg.lstsq(system, e1).solution
    return torch.linalg.vector_norm(e1 - system @ y, dim=(1, 2)).to(g.device, g.dtype)


def _krylov_steps(
    krylov: torch.Tensor, now: torch.Tensor, target: torch.Tensor, slow: torch.Tensor
) -> float:
    """GMRES steps, summed over a Newton–Krylov run, that bring ‖g‖ from ``now`` to ``target``
    for the slowest of the ``slow`` samples (inf where GMRES made no progress).

    Near a root each Newton step cuts ‖g‖ by the relative residual its inner solve reached, so
    the inner solves together must reduce it by target/now; at the rate per step that GMRES
    showed over the probe's PROBE_STEPS steps, that takes PROBE_STEPS·log(target/now)/log(r).
    """
    tiny = torch.finfo(now.dtype).tiny
    reach = torch.log(target.clamp_min(tiny) / now.clamp_min(tiny))
    per_probe = torch.log(krylov.clamp(min=tiny))
    steps = torch.where(per_probe < 0, PROBE_STEPS * reach / per_probe.clamp(max=-tiny), torch.inf)
    return float(torch.where(slow, steps, torch.zeros_like(steps)).max())


def _shared_preconditioner(
    problem: Problem, op: LinearOperator, running: torch.Tensor
) -> SharedLinearisation | None:
    """The shared linearisation newton-krylov would precondition with here (its LU), or None
    where the map's Jacobian is not diag(s)·W with one W, or n is beyond MAX_DIM."""
    from deqcli.linalg.preconditioners import MAX_DIM, SharedLinearisation

    return None if problem.dim > MAX_DIM else SharedLinearisation.of(op, running)


def _hand_over(solver: Solver, shared: SharedLinearisation) -> None:
    """Give the Newton–Krylov preset just started the probe's factorisation of the shared
    linearisation (at the iterate it starts from), so its first solve needs no LU of its own."""
    from deqcli.solvers.directions import KrylovDirection

    direction = getattr(solver.implementation(), "direction", None)
    if isinstance(direction, KrylovDirection) and direction.precondition != "none":
        direction.shared = shared
        direction.factorisations += 1


def _anderson_cost(problem: Problem) -> float:
    """One Anderson iteration in evaluations of f: ANDERSON_COST, more on small closed-form layers."""
    if problem.row_scaled_jacobian is None:
        return ANDERSON_COST
    return 1.0 + max(ANDERSON_COST - 1.0, ANDERSON_WORK_CLOSED / problem.dim)


def _ritz_rho(op: LinearOperator, running: torch.Tensor) -> float:
    """ρ(J_f) estimated by PROBE_STEPS Arnoldi steps with ``op`` = J_f (from a random start):
    the largest Ritz modulus over the running rows.

    J_f itself, not J_g = I − J_f: a row that broke down early pads its Ritz values with zeros,
    harmless for the largest modulus of J_f (they would read as 1 for J_g)."""
    from deqcli.linalg import ritz_values

    rho = ritz_values(op, PROBE_STEPS).abs().amax(dim=1).to(running.device)
    return float(torch.where(running, rho, torch.zeros_like(rho)).max())


def _cheapest(
    costs: dict[str, float], iterations: dict[str, float], left: float, inserted: bool
) -> tuple[str, bool, list[str]]:
    """The probe's choice: the cheapest method whose predicted iterations (ITERATION_MARGIN
    times ``iterations``; NEWTON_STEPS for the Newton methods) fit in the ``left`` remaining,
    or the cheapest of all where none fits. A Newton–Krylov ``inserted`` ahead of the list
    must be PRECONDITIONED_MARGIN times cheaper than the runner-up. Returns the choice, whether
    Newton–Krylov was passed over for that margin, and the methods that fit."""
    fits = [n for n in costs if ITERATION_MARGIN * iterations.get(n, NEWTON_STEPS) <= left]
    choice = min(fits or costs, key=lambda name: costs[name])
    if choice == "newton-krylov" and inserted:
        rest = [n for n in (fits or costs) if n != choice]
        runner_up = min(rest, key=lambda name: costs[name]) if rest else None
        if runner_up and PRECONDITIONED_MARGIN * costs[choice] > costs[runner_up]:
            return runner_up, True, fits
    return choice, False, fits


@dataclass
class AutoState(State):
    """The current preset's own state plus what ``auto`` watches to decide when to switch."""

    sub: Solver
    sub_state: State
    stages: list[str]
    stage: int
    watch: StallWatch
    progress: StallState
    limits: Limits
    best_z: torch.Tensor  # (B, n) where each sample's smallest ‖g‖ was seen
    z0: torch.Tensor  # (B, n) the run's start
    stage_start: torch.Tensor  # (B,) ‖g‖ where the current preset started
    stage_best: torch.Tensor  # (B,) its smallest ‖g‖ since
    from_start: bool = True  # the current preset started at z0 (nothing to retry)
    still: torch.Tensor | None = None  # (B,) consecutive steps that left z unchanged
    k: int = 0
    stuck: torch.Tensor | None = None  # samples the current preset reported it cannot advance
    methods: list[str] = field(default_factory=list)
    switches: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    stage_k: int = 0  # iterations of the current preset
    probe_mark: torch.Tensor | None = None  # (B,) the stage's best ‖g‖ halfway to the probe
    patience: dict[str, int] = field(default_factory=dict)  # per-preset patience set by the probe
    probe: dict[str, Any] | None = None  # what the spectral probe measured and chose
    trial: bool = False  # the first preset is the plain-iteration trial, not yet decided
    alarm: torch.Tensor | None = None  # (B,) see AutoMethod._alarm
    alarm_for: torch.Tensor | None = None  # the progress.best it was computed from


class AutoMethod(Method):
    """Run the presets of ``STAGES`` in order, switching on evidence (module docstring)."""

    options: Auto

    def __init__(self, options: Solver) -> None:
        super().__init__(options)
        self.test = ConvergenceTest()
        self.stop: StopRule | None = None  # the run's rule (``setup``); its presets get it too

    def setup(self, stop: StopRule) -> None:
        """Adopt the run's convergence test (its divergence ceiling and non-finite rule) and
        iteration budget; the presets are set up with the same rule."""
        self.test = stop.test
        self.stop = stop

    def _make(self, name: str) -> Solver:
        from deqcli.solvers import make_solver

        options: dict[str, Any] = {"m": self.options.m} if name == "anderson" else {}
        solver = make_solver(name, options)
        if self.stop is not None:
            solver.setup(self.stop)
        return solver

    def _iterations_left(self, s: AutoState) -> float:
        """The run's iterations still to come (inf without a stopping rule)."""
        return math.inf if self.stop is None else self.stop.max_iter - s.k

    def _watch(self, name: str, patience: int | None = None) -> StallWatch:
        o = self.options
        if patience is None:
            patience = o.newton_patience if name in NEWTON_STAGES else o.patience
        if name == "fixed_point":  # the watch sees every FIXED_POINT_CHECKS-th step
            patience = math.ceil(patience / FIXED_POINT_CHECKS)
        return StallWatch(progress=o.progress, patience=patience)

    def init(self, problem: Problem, z0: torch.Tensor) -> AutoState:
        """Start the first preset at z0: the plain-iteration trial on a fixed-point problem with
        the default list (and the probes on)."""
        stages = self.options.stage_names(problem)
        trial = (
            problem.form == "fixed_point"
            and self.options.probe
            and not self.options.stage_list()
            and stages[0] == "anderson"
        )
        if trial:
            stages.insert(0, "fixed_point")
        sub = self._make(stages[0])
        sub_state = sub.init(problem, z0)
        res = torch.linalg.vector_norm(sub_state.g, dim=1)
        watch = self._watch(stages[0])
        return AutoState(
            z=sub_state.z,
            g=sub_state.g,
            sub=sub,
            sub_state=sub_state,
            stages=stages,
            stage=0,
            watch=watch,
            progress=watch.start(res),
            limits=self.test.start(res),
            best_z=sub_state.z,
            z0=z0,
            stage_start=res,
            stage_best=res,
            methods=[stages[0]],
            trial=trial,
        )

    def observe(self, state: AutoState, active: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        """Pass the running samples on; report stuck ones only at the last preset."""
        # auto drives its current preset as the driver drives auto: hand the mask on the same way.
        state.sub_state.active = active
        stuck = state.sub.observe(state.sub_state, active)
        if stuck is not None and state.stage + 1 < len(state.stages):
            state.stuck = stuck  # handled by switching at the next step
            return None
        return stuck

    def step(self, problem: Problem, state: AutoState) -> AutoState:  # type: ignore[override]
        """Advance the current preset one step, then decide whether to switch."""
        s = state
        s.k += 1
        running = (
            s.active if s.active is not None else torch.ones_like(s.limits.base, dtype=torch.bool)
        )
        last = s.stage + 1 == len(s.stages)
        if s.stuck is not None and bool((s.stuck & running).any()):
            s.stuck = None
            return self._switch(problem, s, f"{s.stages[s.stage]} could not advance a sample")
        s.stuck = None
        # The driver restores the rows of finished samples in s.z/s.g; the current preset keeps
        # its own copy, which is harmless for those rows (they are never read again).
        z_old = s.sub_state.z
        s.sub_state = s.sub.step(problem, s.sub_state)
        z_new, g_new = s.sub_state.z, s.sub_state.g
        name = s.stages[s.stage]
        # The preset's own norms reach the driver (they are of z_new, and its step from z_old).
        s.f_norm, s.step_norm = s.sub_state.f_norm, s.sub_state.step_norm
        res = s.sub_state.res
        if res is None:
            res = torch.linalg.vector_norm(g_new, dim=1)
        # Between a plain-iteration preset's checks only a failed or grown residual is looked
        # for: the driver would stop a failed sample as diverged, where auto moves on.
        between = name == "fixed_point" and (s.stage_k + 1) % FIXED_POINT_CHECKS and not last
        if between and not bool((running & ~(res <= self._alarm(s))).any()):
            s.stage_k += 1
            s.z, s.g, s.res = z_new, g_new, res
            if s.trial and s.stage_k == FIXED_POINT_CHECKS // 2:
                s.probe_mark = res
            return s
        failed = running & self.test.failed(res, s.limits)
        grew = running & (res > self.options.growth * s.progress.best)
        newton = name in NEWTON_STAGES
        if newton:
            # Only a line search leaves z where it was; other presets always move.
            unchanged = (z_new == z_old).all(dim=1)
            s.still = torch.where(unchanged, (0 if s.still is None else s.still) + 1, 0)
        # Every test of this iteration is computed first and read back in one host
        # synchronisation: this runs once per iteration, often with a cheap map. None of the
        # updates below can mark a failed (diverged or non-finite) residual as an improvement,
        # so they may precede the switch that such a residual triggers.
        s.stage_best = torch.fmin(s.stage_best, res)  # a NaN row keeps its best
        improved = res < s.progress.best
        stalled = running & s.watch.update(s.progress, res)
        checks = [failed.any(), improved.all(), improved.any(), grew.any(), stalled.any()]
        if newton:
            checks.append((running & (s.still >= FAILED_SEARCHES)).any())
        flags = torch.stack(checks).tolist()
        failure = None
        if flags[0]:
            finite = bool(torch.isfinite(res[failed]).all())
            failure = "residual beyond the divergence limit" if finite else "non-finite residual"
        if s.trial and (failure or flags[3]):
            # Plain iteration fails here: anderson from z0, or, where the trial's first step
            # failed (anderson's first step is that same plain step), the preset after it.
            s.trial = False
            why = failure or "residual growth"
            if s.stage_k == 0:
                s.stage += 1
            else:
                why = f"plain iteration: {why}"
            return self._switch(problem, s, why, start=s.z0)
        if failure and not last:
            return self._switch(problem, s, failure)
        if flags[1]:
            s.best_z = z_new  # steps build new tensors: keeping a reference is a snapshot
        elif flags[2]:
            s.best_z = torch.where(improved[:, None], z_new, s.best_z)
        s.z, s.g = z_new, g_new
        s.res = res
        if last:
            return s
        if flags[3] or flags[4]:
            why = "residual growth" if flags[3] else "no progress"
            if name == "anderson" and self.options.probe and problem.form == "fixed_point":
                why = self._plain_after_stall(problem, s, running, why)
            return self._switch(problem, s, why)
        if newton and flags[5]:
            return self._switch(problem, s, "the line search found no acceptable step")
        s.stage_k += 1
        if s.trial:
            return self._end_trial(problem, s, running, res)
        if name == "anderson" and self.options.probe and "choice" not in (s.probe or {}):
            if s.stage_k == PROBE_AFTER // 2:
                s.probe_mark = s.stage_best.clone()
            elif s.stage_k == PROBE_AFTER and problem.form == "fixed_point":
                return self._probe(problem, s, running)
        return s

    def _alarm(self, s: AutoState) -> torch.Tensor:
        """(B,) the residual beyond which a sample has failed or grown: the smaller of the
        divergence ceiling and ``growth`` × its best ‖g‖ (NaN is beyond it too).

        The best changes only at a check, so between checks this is computed once, not every
        step: a plain-iteration step of a small map is a few dozen microseconds, and the two
        separate tests cost as much again.
        """
        best = s.progress.best
        if s.alarm_for is not best:
            s.alarm = torch.minimum(s.limits.ceiling, self.options.growth * best)
            s.alarm_for = best
        return s.alarm

    def _probe(self, problem: Problem, s: AutoState, running: torch.Tensor) -> AutoState:
        """Probe the spectrum once a long anderson run is in sight, and pick the cheaper method.

        Anderson's rate q per iteration is read off its own progress over the last
        PROBE_AFTER/2 iterations; where it predicts more work than PROBE_LONG further iterations
        at ANDERSON_COST (its predicted iterations times ``_anderson_cost``),
        PROBE_STEPS Arnoldi steps on J_f at the current iterate (counted JVPs) estimate ρ(J_f),
        the rate of plain iteration, from the largest Ritz value. Ritz values lie inside the
        spectrum's hull and Anderson converges at least as fast as plain iteration on the same
        problem, so ρ_fp = max(ρ̂, q) estimates that rate from below. In evaluations of f:

        - plain iteration costs log(tol/‖g‖)/log ρ_fp, Anderson ``_anderson_cost`` times its
          count;
          where the slow modes surround 1 (a near-isometry, rotations) Anderson gains nothing
          per iteration and plain iteration is the cheaper;
        - Newton with dense Jacobians (where they are affordable) about NEWTON_STEPS·NEWTON_COST·n
          (NEWTON_COST_CLOSED·n for a Jacobian in closed form);
        - Newton–Krylov (where it is in the list) KRYLOV_STEP_COST per GMRES step, the steps read
          from GMRES's residual on the Newton system after PROBE_STEPS more Arnoldi steps
          (``_krylov_residual``, ``_krylov_steps``), plus KRYLOV_NEWTON_EXTRA per Newton step;
          preconditioned by the shared linearisation where the map allows it (on any default
          list), with the Arnoldi steps on the preconditioned system, the same cost per step
          and PRECONDITIONER_FACTORS LUs (see PRECONDITIONED_MARGIN).

        The cheapest is chosen for the slowest running sample; a switch names the numbers.
        The Ritz steps come last, and only where they can matter: plain iteration at
        Anderson's own rate q (it never converges faster) sets a lower bound on its cost, and
        where another method is chosen against that bound, ρ̂ could only confirm it (the probe
        then records ``ritz_rho`` None and ``fixed_point_at_least``).
        """
        tiny = torch.finfo(s.stage_best.dtype).tiny
        mark = s.probe_mark if s.probe_mark is not None else s.stage_start
        now = s.stage_best
        target = self._target(s).to(now.dtype)
        q, need = _rate_and_steps(now, mark, PROBE_AFTER - PROBE_AFTER // 2, target)
        slow = running & (now > target) & (q < 1)
        s.probe = {**(s.probe or {}), "iteration": s.k}
        if not bool(slow.any()):
            s.probe["choice"] = "anderson"
            return s
        need = torch.where(slow, need, torch.zeros_like(need))
        worst = int(torch.argmax(need))
        k_anderson = float(need[worst])
        s.probe["anderson_rate"] = float(q[worst])
        s.probe["anderson_iterations"] = round(k_anderson)
        if k_anderson * _anderson_cost(problem) <= PROBE_LONG * ANDERSON_COST:
            s.probe["choice"] = "anderson"
            return s
        jacobian = _jacobian_f(problem, s.z, running)
        r_now, r_target = float(now[worst]), float(target[worst].clamp_min(tiny))
        costs = {"anderson": ITERATION_MARGIN * _anderson_cost(problem) * k_anderson}
        newton = self._newton_cost(problem, s)
        if newton is not None:
            costs["newton"] = newton
        record: dict[str, Any] = {}
        listed = "newton-krylov" in s.stages[s.stage + 1 :]
        # Preconditioned by the shared linearisation, Newton–Krylov is weighed on the default
        # lists even where they do not hold it (the dense one): it is inserted if chosen.
        shared = None
        if listed or not self.options.stage_list():
            shared = _shared_preconditioner(problem, jacobian, running)
        if listed or shared is not None:
            krylov = _krylov_residual(jacobian, s.g, running, shared)
            steps = _krylov_steps(krylov, now, target, slow)
            record["krylov_steps"] = None if math.isinf(steps) else round(steps)
            krylov_steps = max(steps, NEWTON_STEPS)
            factors = 0.0
            if shared is not None:
                record["preconditioner"] = "shared"
                factors = PRECONDITIONER_FACTORS * problem.dim / (3 * problem.batch)
            costs["newton-krylov"] = ITERATION_MARGIN * (
                KRYLOV_STEP_COST * krylov_steps + KRYLOV_NEWTON_EXTRA * NEWTON_STEPS + factors
            )
        # A method whose predicted iterations do not fit in the iterations left is not chosen
        # while another does (the Newton methods' few outer steps always fit).
        left = self._iterations_left(s)
        inserted = shared is not None and not listed
        # Plain iteration is never faster than Anderson on the same problem: at Anderson's own
        # rate it would take k_anderson iterations, a cost it can only exceed. Where the choice
        # is already made against that bound, ρ(J_f) cannot change it and is not probed
        # (PROBE_STEPS JVPs saved; the near-isometries and slow modes that go to Newton–Krylov).
        bound = {
            "anderson": costs["anderson"],
            "fixed_point": ITERATION_MARGIN * k_anderson,
            **costs,
        }
        iterations = {"anderson": k_anderson, "fixed_point": k_anderson}
        choice, passed_over, fits = _cheapest(bound, iterations, left, inserted)
        rho: float | None = None
        if choice == "fixed_point":
            rho = _ritz_rho(jacobian, running)
            rate = min(max(rho, float(q[worst])), 1 - 1e-12)
            k_fixed = math.log(r_target / r_now) / math.log(rate)
            costs = {**bound, "fixed_point": ITERATION_MARGIN * k_fixed}
            record.update(ritz_rho=rho, fixed_point_iterations=round(k_fixed))
            iterations["fixed_point"] = k_fixed
            choice, passed_over, fits = _cheapest(costs, iterations, left, inserted)
        else:
            record.update(ritz_rho=None, fixed_point_at_least=round(bound["fixed_point"]))
        if passed_over:
            record["passed_over"] = f"newton-krylov: not {PRECONDITIONED_MARGIN:g} times cheaper"
        # What was weighed (the bound stands for plain iteration where ρ̂ was not needed).
        weighed = costs if rho is not None else bound
        if fits and len(fits) < len(weighed):
            record["iterations_left"] = left
        record["costs"] = {
            name: (None if math.isinf(cost) else round(cost)) for name, cost in costs.items()
        }
        record["choice"] = choice
        s.probe.update(record)
        if choice == "anderson":
            return s
        spectrum = "not needed" if rho is None else f"≈ {rho:.4g}"
        why = (
            f"spectral probe: ρ(J_f) {spectrum}, anderson rate {float(q[worst]):.4g}; "
            f"estimated cost in evaluations of f: "
            + ", ".join(f"{name} {round(cost)}" for name, cost in costs.items())
        )
        if rho is None:
            why += f", fixed_point at least {record['fixed_point_at_least']}"
        if "iterations_left" in record:
            too_long = ", ".join(name for name in weighed if name not in fits)
            why += f"; {too_long} would not finish in the {left} iterations left"
        if choice == "fixed_point":  # chosen only with ρ̂ measured: ``rate`` is its rate
            # Plain iteration halves the residual only every log(1/2)/log(rate) steps: its stall
            # watch waits three times that before calling it stalled.
            halve = math.log(self.options.progress) / math.log(rate)
            s.patience["fixed_point"] = max(self.options.patience, min(math.ceil(3 * halve), 10**6))
            s.stages.insert(s.stage + 1, "fixed_point")
        elif choice not in s.stages[s.stage + 1 :]:
            s.stages.insert(s.stage + 1, choice)  # preconditioned Newton–Krylov, not listed
        else:
            # Straight on to Newton (or Newton–Krylov): drop whatever stood between.
            s.stages[s.stage + 1 : s.stages.index(choice, s.stage + 1)] = []
        s = self._switch(problem, s, why, retry=False)
        if choice == "newton-krylov" and shared is not None:
            _hand_over(s.sub, shared)
        return s

    def _target(self, s: AutoState) -> torch.Tensor:
        """Each sample's tolerance at the current iterate (with ‖f(z)‖ for ``stop_mode: rel``)."""
        return self.test.threshold(s.limits, torch.linalg.vector_norm(s.z - s.g, dim=1))

    def _end_trial(
        self, problem: Problem, s: AutoState, running: torch.Tensor, res: torch.Tensor
    ) -> AutoState:
        """Decide the plain-iteration trial after its FIXED_POINT_CHECKS steps: go on where every
        running sample contracts at a rate that needs at most PLAIN_ENOUGH further steps, else
        start anderson from z0 (so its run, and what the probes see, are those of a run without
        the trial: the trial costs FIXED_POINT_CHECKS + 1 evaluations and changes nothing else)."""
        s.trial = False
        mark = s.probe_mark if s.probe_mark is not None else s.stage_start
        s.probe_mark = None
        target = self._target(s).to(res.dtype)
        span = FIXED_POINT_CHECKS - FIXED_POINT_CHECKS // 2
        q, need = _rate_and_steps(res, mark, span, target)
        slow = running & (res > target)
        # A rate of 1 or more never gets there.
        need = torch.where(slow & (q < 1), need, torch.where(slow, torch.inf, 0.0))
        worst = float(need.max())
        rate = float(torch.where(slow, q, torch.zeros_like(q)).max())
        s.probe = {
            "trial": {
                "iteration": s.k,
                "rate": rate,
                "iterations": None if math.isinf(worst) else round(worst),
                "choice": "fixed_point" if worst <= PLAIN_ENOUGH else "anderson",
            }
        }
        if worst <= PLAIN_ENOUGH:
            return s
        ahead = "no end" if math.isinf(worst) else f"{round(worst)} more iterations"
        return self._switch(problem, s, f"plain iteration's rate {rate:.3g}: {ahead}", start=s.z0)

    def _plain_after_stall(
        self, problem: Problem, s: AutoState, running: torch.Tensor, why: str
    ) -> str:
        """Anderson stalled (or grew): put plain iteration next where it contracts and costs less.

        PROBE_STEPS Arnoldi steps on J_f at the best iterates estimate ρ(J_f) there. Below 1,
        plain iteration from those iterates needs about log(tol/‖g‖)/log ρ steps for the slowest
        sample; it goes next (before newton and the rest of the list) when that count, times
        ITERATION_MARGIN, fits in the iterations left and costs less than Newton's estimate taken
        NEWTON_AFTER_STALL times over (Newton starts outside its fast region here). Returns the
        switch's reason, with the probe's numbers when it chose plain iteration. Runs once.
        """
        if "fixed_point" in s.stages[s.stage + 1 :]:
            return why
        tiny = torch.finfo(s.stage_best.dtype).tiny
        rho = _ritz_rho(_jacobian_f(problem, s.best_z, running), running)
        now = s.progress.best
        target = self._target(s).to(now.dtype)
        record: dict[str, Any] = {"iteration": s.k, "ritz_rho": rho, "choice": "next preset"}
        s.probe = {**(s.probe or {}), "after_stall": record}
        if not rho < 1 - 1e-12:
            return why
        slow = running & (now > target)
        # ρ = 0 (a map constant near these iterates): one step; the log needs a positive rate.
        need = torch.log(target.clamp_min(tiny) / now.clamp_min(tiny)) / math.log(max(rho, 1e-300))
        k_fixed = float(torch.where(slow, need, torch.zeros_like(need)).max())
        cost = ITERATION_MARGIN * k_fixed
        record["fixed_point_iterations"] = round(k_fixed)
        left = self._iterations_left(s)
        newton = self._newton_cost(problem, s)
        if newton is not None:
            newton *= NEWTON_AFTER_STALL
            record["newton_cost"] = round(newton)
        if cost > left or (newton is not None and cost > newton):
            return why
        record["choice"] = "fixed_point"
        # A map whose anderson stalled is often strongly non-normal: its residual can stand still
        # or grow for many steps before the asymptotic rate shows. Plain iteration gets the
        # steps the probe predicted before it is called stalled.
        s.patience["fixed_point"] = max(self.options.patience, min(math.ceil(cost), 10**6))
        s.stages.insert(s.stage + 1, "fixed_point")
        against = f" against newton {round(newton)}" if newton is not None else ""
        return (
            f"{why}; spectral probe: ρ(J_f) ≈ {rho:.4g}, plain iteration ≈ {round(cost)} "
            f"evaluations of f{against}"
        )

    def _newton_cost(self, problem: Problem, s: AutoState) -> float | None:
        """Newton's estimated cost in evaluations of f, where it is still ahead in the list and
        its dense Jacobians are affordable; else None."""
        n = problem.dim
        if n > self.options.dense_max or "newton" not in s.stages[s.stage + 1 :]:
            return None
        try:
            problem.check_dense_fits()
        except UsageError:
            return None
        per_step = NEWTON_COST if problem.row_scaled_jacobian is None else NEWTON_COST_CLOSED
        return NEWTON_STEPS * per_step * n

    def _switch(
        self,
        problem: Problem,
        s: AutoState,
        reason: str,
        *,
        retry: bool = True,
        start: torch.Tensor | None = None,
    ) -> AutoState:
        """Start the next preset from each sample's best iterate, or retry this one from z0.

        A preset that started from an earlier preset's best iterate and could not improve on it
        (‖g‖ never fell below ``progress`` × its starting value) may have been started in a bad
        basin — at a local minimum of ‖g‖ or a singular Jacobian the earlier preset found. It
        gets one more run from the original start for those samples before the list moves on.
        """
        running = (
            s.active if s.active is not None else torch.ones_like(s.stage_best, dtype=torch.bool)
        )
        idle = running & ~(s.stage_best <= self.options.progress * s.stage_start)
        # Plain iteration chosen by the probe has no basin to be trapped in: when it is slower
        # than the probe estimated, a rerun from z0 would only repeat that.
        retry = retry and s.stages[s.stage] != "fixed_point"
        if retry and not s.from_start and bool(idle.any()):
            start = torch.where(idle[:, None], s.z0, s.best_z)
            name = s.stages[s.stage]
            reason += "; retried from the start"
            s.from_start = True
        else:
            s.stage += 1
            s.from_start = start is not None
            start = s.best_z if start is None else start
            name = s.stages[s.stage]
        s.sub = self._make(name)
        s.sub_state = s.sub.init(problem, start)
        s.z, s.g = s.sub_state.z, s.sub_state.g
        s.res = s.f_norm = s.step_norm = None  # of the previous preset's iterate: the driver's own
        res = torch.linalg.vector_norm(s.g, dim=1)
        s.watch = self._watch(name, s.patience.get(name))
        s.still = None
        s.stage_k = 0
        s.stage_start = res
        s.stage_best = res
        best = torch.minimum(s.progress.best, res)
        improved = res < s.progress.best
        s.best_z = torch.where(improved[:, None], s.z, s.best_z)
        s.progress = s.watch.start(res)
        s.progress.best = best
        s.methods.append(name)
        s.switches.append(s.k)
        s.reasons.append(reason)
        if s.active is not None:
            s.sub_state.active = s.active
            s.sub.observe(s.sub_state, s.active)
        return s

    def finish(self, state: AutoState, result: SolveResult) -> None:  # type: ignore[override]
        """Record the presets used and the switches; the last preset's notes carry its name."""
        before = len(result.notes)
        state.sub.finish(state.sub_state, result)
        result.notes[before:] = [f"{state.methods[-1]}: {note}" for note in result.notes[before:]]
        result.extra["auto"] = {
            "methods": list(state.methods),
            "switches": list(state.switches),
            "reasons": list(state.reasons),
        }
        if state.probe is not None:
            result.extra["auto"]["probe"] = dict(state.probe)
        if state.switches:
            steps = "; ".join(
                f"{state.methods[i + 1]} at iteration {k} ({why})"
                for i, (k, why) in enumerate(zip(state.switches, state.reasons, strict=True))
            )
            result.notes.insert(before, f"started with {state.methods[0]}, switched to {steps}")
        else:
            result.notes.insert(before, f"{state.methods[0]} sufficed")
