"""The Newton-type methods: a direction (``directions.py``) paired with a globalisation.

- ``LineSearchMethod``: any direction × the capped backtracking line search (or none).
- ``TrustRegionMethod``: a Jacobian model × Powell's dogleg trust region, step for step the
  rules of MINPACK's hybrj, per sample.
- ``KrylovTrustRegionMethod``: GMRES on JVPs × the dogleg (a Krylov dogleg, matrix-free), with
  hybrj's rules where they apply.
- ``LevenbergMarquardtMethod``: exact Jacobians × Levenberg–Marquardt damping.

The presets are thin: ``NewtonMethod`` is NewtonDirection × line search, ``BroydenMethod`` is
BroydenDirection × line search, ``NewtonKrylovMethod`` is KrylovDirection × line search; a
preset's ``globalisation`` option picks another pairing (all three). Every per-sample
quantity (radius, damping, failure counters, Jacobian refreshes, model terms) is per sample, so a
batch of B problems follows, sample by sample, the path each would follow alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from deqcli.linalg import LinearOperator, jacobian_operator
from deqcli.linalg.dense import matvec
from deqcli.solvers.base import Method, State
from deqcli.solvers.directions import (
    BroydenDirection,
    Direction,
    JacobianModel,
    KrylovDirection,
    NewtonDirection,
    cap_steps,
    jacobian_products,
    jacobian_rows,
    row_norms,
)
from deqcli.solvers.globalisation import (
    Factored,
    damped_step,
    dogleg,
    dogleg_path,
    factor_scaled,
    line_search,
)

if TYPE_CHECKING:
    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult
    from deqcli.solvers.base import Solver, StopRule

# hybrj's constants: a step is accepted when its ratio of actual to predicted reduction reaches
# ACCEPT; below POOR it counts as a failure (the radius halves; two in a row refresh J).
ACCEPT = 1e-4
POOR = 0.1


def _keep_radius_state(
    s: Any,
    active: torch.Tensor,
    radius: torch.Tensor,
    ncsuc: torch.Tensor,
    ncfail: torch.Tensor,
    nslow1: torch.Tensor,
    nslow2: torch.Tensor,
) -> None:
    """Store a trust region's new radius and hybrj counters for the running samples only."""
    s.radius = torch.where(active, radius, s.radius)
    s.ncsuc = torch.where(active, ncsuc, s.ncsuc)
    s.ncfail = torch.where(active, ncfail, s.ncfail)
    s.nslow1 = torch.where(active, nslow1, s.nslow1)
    s.nslow2 = torch.where(active, nslow2, s.nslow2)


def _running(state: State) -> torch.Tensor:
    if state.active is not None:
        return state.active
    return torch.ones(state.z.shape[0], dtype=torch.bool, device=state.z.device)


def _column_norms(jac: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(jac, dim=1)


def _initial_scaling(jac: torch.Tensor, scaling: str) -> torch.Tensor:
    """MINPACK's mode 1: D = the column norms of J (a zero or non-finite norm counts as 1)."""
    norms = _column_norms(jac)
    if scaling == "none":
        return torch.ones_like(norms)
    return torch.where((norms == 0) | ~torch.isfinite(norms), torch.ones_like(norms), norms)


def _refresh_rows(
    problem: Problem, state: Any, scaling: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Fresh Jacobians for the running samples flagged ``refresh``; D grows to their column norms.

    Returns the mask of refreshed samples and their Jacobians (None when there were none).
    """
    fresh = _running(state) & state.refresh
    if not bool(fresh.any()):
        return fresh, None
    jac = jacobian_rows(problem, state.z, fresh)
    if scaling == "jacobian":
        grown = torch.maximum(state.diag, _column_norms(jac))
        state.diag = torch.where(fresh[:, None], grown, state.diag)
    state.refresh = state.refresh & ~fresh
    state.jacobians = state.jacobians + fresh.to(state.jacobians.dtype)
    return fresh, jac


# -- direction × line search ----------------------------------------------------------------------


@dataclass
class LineSearchState(State):
    """Iterate and residual plus the last few values of ½‖g‖² (the non-monotone reference), and,
    for a direction that is a function of z, the last two (iterate, direction) pairs."""

    recent: torch.Tensor  # (B, window)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # newest first
    repeating: torch.Tensor | None = None  # (B,) back at an earlier (z, d): it cycles for ever


class LineSearchMethod(Method):
    """A direction, capped at step_max·max(‖z‖, √n), then the Armijo line search on ½‖g‖².

    With ``globalisation: none`` the capped step is taken as it is. A sample whose line search
    finds no acceptable step stays where it was; the direction decides what to do about it (a
    Newton direction repeats, which the driver's history shows as a stall; Broyden resets its
    model and reports the sample stuck if that fails too).
    """

    window = 1

    def __init__(self, options: Solver) -> None:
        super().__init__(options)
        self.direction: Direction = self.make_direction()

    def make_direction(self) -> Direction:
        """The direction this preset pairs with the line search."""
        raise NotImplementedError

    def setup(self, stop: StopRule) -> None:
        """Hand the stopping rule to the direction (Newton–Krylov's tolerance bounds its solves)."""
        self.direction.setup(stop)

    def init(self, problem: Problem, z0: torch.Tensor) -> LineSearchState:
        """Evaluate g(z0) and start the direction."""
        g0 = problem.g(z0)
        self.direction.start(problem, z0, g0)
        phi0 = 0.5 * g0.square().sum(dim=1)
        window = getattr(self.options, "window", self.window)
        return LineSearchState(z=z0, g=g0, recent=phi0[:, None].repeat(1, window))

    def step(self, problem: Problem, state: LineSearchState) -> LineSearchState:  # type: ignore[override]
        """Propose, cap, search, learn."""
        o: Any = self.options
        active = _running(state)
        proposal = self.direction.propose(problem, state.z, state.g, active)
        d, scale = cap_steps(state.z, proposal.direction, o.step_max)
        searching = o.effective_globalisation() != "none"
        if searching and self.direction.function_of_z:
            self._note_repeats(state, d, active)
        if not searching:
            z_new = state.z + d
            g_new = problem.g(z_new)
            accepted = active & torch.isfinite(g_new).all(dim=1)
            step, g_trial = d, g_new
        else:
            search = line_search(
                problem,
                state.z,
                state.g,
                d,
                proposal.slope * scale,
                c=o.c,
                max_backtracks=o.max_backtracks,
                active=active,
                reference=state.recent.amax(dim=1),
            )
            z_new, g_new, accepted = search.z, search.g, search.accepted
            step, g_trial = search.step, search.g_trial
        self.direction.learn(state.z, state.g, step, g_trial, accepted, active)
        if state.recent.shape[1] > 1:
            state.recent = torch.roll(state.recent, 1, dims=1)
        state.recent[:, 0] = 0.5 * g_new.square().sum(dim=1)
        state.z, state.g = z_new, g_new
        return state

    def observe(self, state: LineSearchState, active: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        """Samples the direction gave up on (Broyden: its reset model failed too), and samples
        going round a cycle of one or two iterations (see ``_note_repeats``)."""
        stuck = self.direction.stuck()
        if state.repeating is not None:
            stuck = state.repeating if stuck is None else stuck | state.repeating
        return None if stuck is None else stuck & active

    @staticmethod
    def _note_repeats(state: LineSearchState, d: torch.Tensor, active: torch.Tensor) -> None:
        """Mark the samples whose iterate and direction equal, bit for bit, those of one or two
        iterations ago.

        Where the direction is a function of z (Newton's, Newton–Krylov's), the same z and d give
        the same search and the same next iterate, and so on round the cycle for ever. With a
        line search on, such a cycle is a search that finds no acceptable step (z stays), or steps
        that dither at a nonzero minimum of ‖g‖ or at the precision floor, where ½‖g‖² no longer
        changes in floating point and Armijo's test, φ ≤ φ + c·α·slope, rounds to φ ≤ φ. (Without
        one, Newton's exact cycles, such as 0 → 1 → 0 on z³ − 2z + 2, are left to run: the
        diagnostics report them as cycles, with their period.) Newton at the minimum of
        (z − 1)² + 0.01 went back and forth between two points for 290 of its 300 iterations.
        A step that leaves ½‖g‖² unchanged but moves z somewhere new is not a repeat (Newton
        walks Powell's badly scaled valley for 15 iterations before ‖g‖ falls).
        """
        repeating = torch.zeros_like(active)
        for z_then, d_then in state.seen:
            repeating |= (state.z == z_then).all(dim=1) & (d == d_then).all(dim=1)
        state.repeating = repeating & active
        state.seen = [(state.z, d), *state.seen[:1]]


class NewtonLineSearch(LineSearchMethod):
    """newton × line search."""

    def make_direction(self) -> NewtonDirection:
        """The exact Newton direction."""
        return NewtonDirection()


class BroydenLineSearch(LineSearchMethod):
    """broyden × line search (non-monotone over ``window`` iterations)."""

    def make_direction(self) -> BroydenDirection:
        """Broyden's good or bad inverse update."""
        o: Any = self.options
        return BroydenDirection(o.memory, o.h0, o.update, slide=o.when_full == "slide")

    def finish(self, state: LineSearchState, result: SolveResult) -> None:  # type: ignore[override]
        """The update used (``auto`` resolved by the problem's form)."""
        if isinstance(self.direction, BroydenDirection):
            result.extra["broyden"] = {"update": self.direction.update}


class KrylovLineSearch(LineSearchMethod):
    """newton-krylov × line search: KrylovDirection × the capped Armijo search (or none)."""

    def make_direction(self) -> KrylovDirection:
        """GMRES on JVPs with the configured forcing and preconditioner."""
        o: Any = self.options
        return KrylovDirection(o.krylov_dim, o.forcing, o.eta, o.eta_max, o.precondition)

    def finish(self, state: LineSearchState, result: SolveResult) -> None:  # type: ignore[override]
        """How often the shared preconditioner was factored (where it was used)."""
        _report_preconditioner(self.direction, result)


def NewtonMethod(options: Solver) -> Method:
    """newton with its ``globalisation``: line search (default), trust region, LM or none."""
    chosen = options.effective_globalisation()  # type: ignore[attr-defined]
    if chosen == "trust-region":
        return TrustRegionMethod(options)
    if chosen == "levenberg-marquardt":
        return LevenbergMarquardtMethod(options)
    return NewtonLineSearch(options)


def NewtonKrylovMethod(options: Solver) -> Method:
    """newton-krylov with its ``globalisation``: line search (default), trust region or none."""
    if options.effective_globalisation() == "trust-region":  # type: ignore[attr-defined]
        return KrylovTrustRegionMethod(options)
    return KrylovLineSearch(options)


def BroydenMethod(options: Solver) -> Method:
    """broyden with its ``globalisation``: line search (default), trust region or none."""
    if options.effective_globalisation() == "trust-region":  # type: ignore[attr-defined]
        return TrustRegionMethod(options)
    return BroydenLineSearch(options)


# -- Jacobian model × dogleg trust region (Powell's hybrid, hybrj) --------------------------------


def _ratio(
    fnorm: torch.Tensor, fnorm1: torch.Tensor, model: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """hybrj's ratio of actual to predicted reduction of ‖g‖², both relative to ‖g‖²; and the actual.

    ``fnorm`` is ‖g‖ at z, ``fnorm1`` at the trial point, ``model`` the model's ‖g + J p‖. No
    reduction (or a non-finite one) counts as −1 actual, 0 predicted, and the ratio is then 0.
    """
    tiny = torch.finfo(fnorm.dtype).tiny
    safe_f = fnorm.clamp_min(tiny)
    actred = torch.where(fnorm1 < fnorm, 1 - (fnorm1 / safe_f).square(), -1.0)
    prered = torch.where(model < fnorm, 1 - (model / safe_f).square(), 0.0)
    ratio = torch.where(prered > 0, actred / prered.clamp_min(tiny), 0.0)
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.zeros_like(ratio))
    return ratio, actred


def _next_radius(
    ratio: torch.Tensor,
    radius: torch.Tensor,
    pnorm: torch.Tensor,
    ncsuc: torch.Tensor,
    ncfail: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """hybrj's radius rule and its success/failure counters: (Δ, ncsuc, ncfail) after this step."""
    success = ratio >= POOR
    ncfail = torch.where(success, torch.zeros_like(ncfail), ncfail + 1)
    ncsuc = torch.where(success, ncsuc + 1, torch.zeros_like(ncsuc))
    grown = torch.where(
        success & ((ratio >= 0.5) | (ncsuc > 1)), torch.maximum(radius, 2 * pnorm), radius
    )
    grown = torch.where(success & ((ratio - 1).abs() <= POOR), 2 * pnorm, grown)
    return torch.where(success, grown, 0.5 * radius), ncsuc, ncfail


def _slow_counts(
    actred: torch.Tensor, jeval: torch.Tensor, nslow1: torch.Tensor, nslow2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """hybrj's progress counters: iterations since a 0.1 % fall of ‖g‖², Jacobians since a 10 % one."""
    nslow1 = torch.where(actred >= 1e-3, torch.zeros_like(nslow1), nslow1 + 1)
    nslow2 = torch.where(jeval, nslow2 + 1, nslow2)
    nslow2 = torch.where(actred >= POOR, torch.zeros_like(nslow2), nslow2)
    return nslow1, nslow2


def _stop_reason(
    radius: torch.Tensor,
    pnorm: torch.Tensor,
    xnorm: torch.Tensor,
    nslow1: torch.Tensor,
    nslow2: torch.Tensor,
) -> torch.Tensor:
    """hybrj's termination tests per sample: 3 radius at rounding level relative to ‖D z‖
    (``xnorm``), 4 five Jacobians without a 10 % fall, 5 ten iterations without 0.1 %; else 0."""
    eps = torch.finfo(radius.dtype).eps
    tiny_radius = POOR * torch.maximum(POOR * radius, pnorm) <= eps * xnorm
    return torch.where(tiny_radius, 3, torch.where(nslow2 >= 5, 4, torch.where(nslow1 >= 10, 5, 0)))


def _report_stops(
    result: SolveResult,
    why: torch.Tensor,
    radius: torch.Tensor,
    models: str,
    taken: torch.Tensor,
) -> None:
    """``result.extra["trust_region"]`` and a note naming the samples hybrj's tests stopped.

    ``models`` names what the method counts per sample in ``taken`` (Jacobians, linearisations).
    """
    reasons = {
        3: "the trust radius fell to rounding level relative to ‖D z‖",
        4: f"five {models} in a row without a 10 % fall of ‖g‖²",
        5: "ten iterations in a row without a 0.1 % fall of ‖g‖²",
    }
    codes = why.tolist()
    result.extra["trust_region"] = {
        models: taken.tolist(),
        "radius": radius.tolist(),
        "stopped": [reasons.get(w) for w in codes],
    }
    stopped = [b for b, w in enumerate(codes) if w and result.sample_status[b].value == "stalled"]
    if stopped:
        shown = ", ".join(f"{b} ({reasons[codes[b]]})" for b in stopped[:4])
        more = ", …" if len(stopped) > 4 else ""
        result.notes.append(f"trust-region stopped sample(s) {shown}{more}")


@dataclass
class TrustRegionState(State):
    """Per-sample model, scaling, radius and hybrj's counters."""

    model: JacobianModel
    diag: torch.Tensor  # (B, n) the scaling D
    radius: torch.Tensor  # (B,) Δ, a bound on ‖D p‖
    ncsuc: torch.Tensor  # (B,) consecutive successful steps (ratio ≥ 0.1)
    ncfail: torch.Tensor  # (B,) consecutive failures (ratio < 0.1)
    nslow1: torch.Tensor  # (B,) iterations since the residual last fell by 0.1 % (of ‖g‖²)
    nslow2: torch.Tensor  # (B,) Jacobians since it last fell by 10 %
    jeval: torch.Tensor  # (B,) this step uses a Jacobian evaluated at z
    first: torch.Tensor  # (B,) no step accepted yet (hybrj's iter == 1)
    refresh: torch.Tensor  # (B,) take a fresh Jacobian before the next step
    stuck: torch.Tensor  # (B,) hybrj would stop here (info 3, 4 or 5)
    why: torch.Tensor  # (B,) which test: 0 none, 3 radius at rounding level, 4 and 5 slow
    jacobians: torch.Tensor  # (B,) Jacobians taken


class TrustRegionMethod(Method):
    """Powell's hybrid method on g(z) = 0, per sample, with hybrj's rules.

    Each step minimises the linear model ‖g + J p‖ on the dogleg path within ‖D p‖ ≤ Δ. With
    ratio = (actual reduction)/(predicted reduction) of ‖g‖², both scaled by ‖g‖² as hybrj does:

    - ratio < 0.1: a failure; Δ ← Δ/2. Otherwise a success; Δ ← max(Δ, 2‖Dp‖) when ratio ≥ 0.5
      or after two successes in a row, and Δ = 2‖Dp‖ when |ratio − 1| ≤ 0.1.
    - ratio ≥ 10⁻⁴: the step is accepted. Until the first acceptance, Δ ≤ ‖D p‖.
    - Two failures in a row: a fresh Jacobian before the next step. Otherwise the model takes the
      scaled good-Broyden update J ← J + (y − Jp)(D²p)ᵀ/‖Dp‖², accepted step or not.
    - Scaling (``scaling: jacobian``): D holds the column norms of the first Jacobian and then the
      largest seen at each fresh Jacobian (MINPACK's mode 1); Δ₀ = factor·‖D z₀‖ (or factor).
    - Stop (reported to the driver as stalled): the radius fell to rounding level relative to
      ‖D z‖ (hybrj's info 3), five Jacobians in a row without a 10 % fall of ‖g‖² (info 4), or
      ten iterations without a 0.1 % fall (info 5).

    ``update: exact`` takes a fresh Jacobian after every accepted step (newton × trust region).
    The Broyden preset (``broyden`` with ``globalisation: trust-region``) starts from J = I/h0,
    never evaluates a Jacobian, and uses D = I.
    """

    def __init__(self, options: Solver) -> None:
        super().__init__(options)
        o: Any = options
        self.broyden_only = options.name == "broyden"
        self.update = "broyden" if self.broyden_only else getattr(o, "update", "exact")
        self.memory = getattr(o, "memory", 50)
        self.scaling = "none" if self.broyden_only else o.scaling
        self.factor = o.factor
        self.h0 = getattr(o, "h0", 1.0)

    def init(self, problem: Problem, z0: torch.Tensor) -> TrustRegionState:
        """Residual (and Jacobian) at z0, scaling and the starting radii."""
        batch = z0.shape[0]
        zeros = torch.zeros(batch, dtype=torch.int64, device=z0.device)
        flags = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        if self.broyden_only:
            g0 = problem.g(z0)
            model = JacobianModel(z0, self.memory, dense=False, h0=self.h0)
            diag = torch.ones_like(z0)
            jacobians = zeros.clone()
        else:
            problem.check_dense_fits()
            g0, jac = problem.jacobian(z0)
            model = JacobianModel(z0, self.memory, dense=True)
            model.set_jacobian(~flags, jac)
            diag = _initial_scaling(jac, self.scaling)
            jacobians = zeros + 1
        radius = self._initial_radius(diag, z0)
        return TrustRegionState(
            z=z0,
            g=g0,
            model=model,
            diag=diag,
            radius=radius,
            ncsuc=zeros.clone(),
            ncfail=zeros.clone(),
            nslow1=zeros.clone(),
            nslow2=zeros.clone(),
            jeval=~flags,
            first=~flags,
            refresh=flags.clone(),
            stuck=flags.clone(),
            why=zeros.clone(),
            jacobians=jacobians,
        )

    def _initial_radius(self, diag: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        radius = self.factor * row_norms(diag * z)
        return torch.where(radius == 0, torch.full_like(radius, self.factor), radius)

    def observe(self, state: TrustRegionState, active: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        """Samples hybrj would stop: no further progress possible or made."""
        return state.stuck & active

    def step(self, problem: Problem, state: TrustRegionState) -> TrustRegionState:  # type: ignore[override]
        """One dogleg step per sample with hybrj's radius, acceptance and refresh rules."""
        s = state
        active = _running(s)
        fresh, jac = _refresh_rows(problem, s, self.scaling)
        if jac is not None:
            s.model.set_jacobian(fresh, jac)
            # Until a first step is accepted, a fresh Jacobian starts over as at z₀ (hybrj's
            # iter == 1): scaling from this Jacobian alone and Δ = factor·‖D z‖.
            again = fresh & s.first
            if bool(again.any()):
                s.diag = torch.where(again[:, None], _initial_scaling(jac, self.scaling), s.diag)
                s.radius = torch.where(again, self._initial_radius(s.diag, s.z), s.radius)
            s.jeval = s.jeval | fresh

        model = s.model
        newton = -model.solve(s.g)
        grad = model.apply_t(s.g)
        j_dir = model.apply(grad / s.diag.square())
        p = dogleg(newton, grad, j_dir, s.diag, s.radius)
        pnorm = row_norms(s.diag * p)
        radius = torch.where(s.first, torch.minimum(s.radius, pnorm), s.radius)

        z_try = s.z + p
        g_try = problem.g(z_try)
        fnorm1 = row_norms(g_try)
        j_p = model.apply(p)
        ratio, actred = _ratio(row_norms(s.g), fnorm1, row_norms(s.g + j_p))
        radius, ncsuc, ncfail = _next_radius(ratio, radius, pnorm, s.ncsuc, s.ncfail)
        accept = (ratio >= ACCEPT) & torch.isfinite(fnorm1)
        nslow1, nslow2 = _slow_counts(actred, s.jeval, s.nslow1, s.nslow2)

        keep = accept[:, None]
        z_new = torch.where(keep, z_try, s.z)
        g_new = torch.where(keep, g_try, s.g)
        why = _stop_reason(radius, pnorm, row_norms(s.diag * z_new), nslow1, nslow2)
        newly = active & (why > 0) & ~s.stuck
        s.why = torch.where(newly, why, s.why)
        s.stuck = s.stuck | newly

        if self.update == "exact":
            need = active & accept
        else:
            # A Broyden-only model has no Jacobian to refresh: it keeps learning from every step.
            need = active & (ncfail == 2) & (not self.broyden_only)
            self._broyden_update(
                s, p, g_try - s.g, j_p, active & ~need & torch.isfinite(g_try).all(dim=1)
            )
        s.refresh = s.refresh | need
        s.jeval = s.jeval & ~active
        s.first = s.first & ~accept
        _keep_radius_state(s, active, radius, ncsuc, ncfail, nslow1, nslow2)
        s.z, s.g = z_new, g_new
        return s

    def _broyden_update(
        self,
        s: TrustRegionState,
        p: torch.Tensor,
        dg: torch.Tensor,
        j_p: torch.Tensor,
        rows: torch.Tensor,
    ) -> None:
        """J ← J + (y − Jp)wᵀ/(wᵀp) with w = D²p; H by Sherman–Morrison, or refactored if that fails."""
        model = s.model
        w = s.diag.square() * p
        wp = (w * p).sum(dim=1)
        h_dg = model.solve(dg)
        b = model.solve_t(w)
        denom = (b * dg).sum(dim=1)
        scale = row_norms(b) * row_norms(dg)
        usable = rows & (wp > 0) & torch.isfinite(wp)
        inverse_ok = usable & (denom.abs() > 1e-12 * scale) & torch.isfinite(denom)
        one = torch.ones_like(wp)
        c = (dg - j_p) / torch.where(usable, wp, one)[:, None]
        a = (p - h_dg) / torch.where(inverse_ok, denom, one)[:, None]
        model.append(inverse_ok, c=c, s=w, a=a, b=b)
        # Where the inverse update breaks down the updated J is (nearly) singular: keep J exact by
        # folding the update into a dense J₀ and refactoring (a shifted LU keeps H finite).
        broken = usable & ~inverse_ok
        if bool(broken.any()) and model.dense:
            updated = model.matrix() + c[:, :, None] * w[:, None, :]
            model.set_jacobian(broken, updated)

    def finish(self, state: TrustRegionState, result: SolveResult) -> None:  # type: ignore[override]
        """Jacobians per sample and hybrj's reason for the samples it stopped."""
        _report_stops(result, state.why, state.radius, "jacobians", state.jacobians)


# -- Newton–Krylov × dogleg trust region (matrix-free) -------------------------------------------


@dataclass
class KrylovTrustRegionState(State):
    """Per-sample radius, hybrj's counters, and the products at z that rejected steps re-use."""

    radius: torch.Tensor  # (B,) Δ, a bound on ‖p‖
    ncsuc: torch.Tensor  # (B,) consecutive successful steps (ratio ≥ 0.1)
    ncfail: torch.Tensor  # (B,) consecutive failures (ratio < 0.1)
    nslow1: torch.Tensor  # (B,) iterations since ‖g‖² last fell by 0.1 %
    nslow2: torch.Tensor  # (B,) linearisations since it last fell by 10 %
    stuck: torch.Tensor  # (B,) hybrj would stop here (info 3, 4 or 5)
    why: torch.Tensor  # (B,) which test: 0 none, 3 radius at rounding level, 4 and 5 slow
    newton: torch.Tensor  # (B, n) the inexact Newton step p_N at z (GMRES)
    j_newton: torch.Tensor  # (B, n) J p_N
    grad: torch.Tensor  # (B, n) Jᵀg at z (where ``cauchy``)
    j_grad: torch.Tensor  # (B, n) J Jᵀg
    solved: torch.Tensor  # (B,) newton and j_newton belong to the current z
    cauchy: torch.Tensor  # (B,) grad and j_grad belong to the current z
    linearisations: torch.Tensor  # (B,) GMRES solves (one per point where a step was accepted)


class KrylovTrustRegionMethod(Method):
    """newton-krylov × trust region: a Krylov dogleg on JVPs and VJPs (Brown & Saad 1990).

    Per sample and iteration, at a point z where no step has been accepted yet:

    - the inexact Newton step p_N from one GMRES cycle on J p = −g (JVPs, Eisenstat–Walker
      forcing as in the line-search pairing), and J p_N (one more JVP) for the model;
    - only when p_N leaves the ball ‖p‖ ≤ Δ (or is not finite): the gradient Jᵀg (one VJP) and
      J Jᵀg (one JVP), which give the Cauchy point;
    - the dogleg step of ``dogleg_path`` with D = I. It is a combination of p_N and Jᵀg, so J p
      is the same combination of the known products: the model ‖g + J p‖ costs no product. When
      the Cauchy point (cut to the ball) has the smaller model value — p_N is inexact, so the
      dogleg path need not descend the model all the way — it is taken instead, which keeps the
      Cauchy decrease that trust-region convergence rests on;
    - one evaluation of g at z + p, and hybrj's rules on the ratio of actual to predicted
      reduction of ‖g‖² (``TrustRegionMethod``): the same radius growth, acceptance at
      ratio ≥ 10⁻⁴, and stop tests (reported to the driver as stalled), a "Jacobian" there being
      a linearisation here.

    A rejected step changes only Δ: the next trial re-uses p_N and the Cauchy data at z (no
    product at all unless the smaller Δ first needs the Cauchy point). Where p_N is inexact,
    two of hybrj's rules are adapted (each comment says why): a failure halves min(Δ, ‖p‖)
    rather than Δ, and there is no Δ ≤ ‖p‖ cap before the first acceptance; and the "five
    Jacobians without a 10 % fall" test counts only linearisations whose full p_N was tried.
    Products are counted only for the samples they are made for (GMRES's as each sample needed
    them), so a sample's counts are those it has alone. D = I: MINPACK's column norms of J would
    take n products. Δ₀ = ``factor``·‖z₀‖ (``factor`` when z₀ = 0).
    """

    def __init__(self, options: Solver) -> None:
        super().__init__(options)
        o: Any = options
        self.factor = o.factor
        self.direction = KrylovDirection(o.krylov_dim, o.forcing, o.eta, o.eta_max, o.precondition)

    def setup(self, stop: StopRule) -> None:
        """Hand the stopping rule to the direction (its tolerance bounds the linear solves)."""
        self.direction.setup(stop)

    def init(self, problem: Problem, z0: torch.Tensor) -> KrylovTrustRegionState:
        """Evaluate g(z0); the starting radii; nothing solved yet."""
        g0 = problem.g(z0)
        self.direction.start(problem, z0, g0)
        batch = z0.shape[0]
        zeros = torch.zeros(batch, dtype=torch.int64, device=z0.device)
        flags = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        radius = self.factor * row_norms(z0)
        radius = torch.where(radius == 0, torch.full_like(radius, self.factor), radius)
        return KrylovTrustRegionState(
            z=z0,
            g=g0,
            radius=radius,
            ncsuc=zeros.clone(),
            ncfail=zeros.clone(),
            nslow1=zeros.clone(),
            nslow2=zeros.clone(),
            stuck=flags.clone(),
            why=zeros.clone(),
            newton=torch.zeros_like(z0),
            j_newton=torch.zeros_like(z0),
            grad=torch.zeros_like(z0),
            j_grad=torch.zeros_like(z0),
            solved=flags.clone(),
            cauchy=flags.clone(),
            linearisations=zeros.clone(),
        )

    def observe(self, state: KrylovTrustRegionState, active: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        """Samples hybrj's tests would stop: no further progress possible or made."""
        return state.stuck & active

    def step(self, problem: Problem, state: KrylovTrustRegionState) -> KrylovTrustRegionState:  # type: ignore[override]
        """One Krylov dogleg step per sample with hybrj's radius and acceptance rules."""
        s = state
        active = _running(s)
        tiny = torch.finfo(s.z.dtype).tiny
        # One linearisation of g at z serves every product of this step (all rows are at z).
        built: list[LinearOperator] = []

        def linearisation() -> LinearOperator:
            if not built:
                built.append(jacobian_operator(problem, s.z, counted=False))
            return built[0]

        solve = active & ~s.solved
        if bool(solve.any()):
            res = self.direction.solve(linearisation().with_active(solve), s.g, solve)
            # GMRES's products counted per sample: those each sample needed (alone, it would
            # have stopped at its own tolerance), not every batched product.
            for b, k in enumerate(res.products.tolist()):
                if k:
                    problem.counter.bump("jvp", rows=b, times=k)
            newton = res.x
            op = jacobian_products(problem, linearisation(), solve)
            keep = solve[:, None]
            s.newton = torch.where(keep, newton, s.newton)
            s.j_newton = torch.where(keep, op.matvec(newton), s.j_newton)
            s.solved = s.solved | solve
            s.linearisations = s.linearisations + solve.to(s.linearisations.dtype)
        usable = torch.isfinite(s.newton).all(dim=1) & torch.isfinite(s.j_newton).all(dim=1)
        outside = row_norms(s.newton) > s.radius
        need = active & ~s.cauchy & (outside | ~usable)
        if bool(need.any()):
            op = jacobian_products(problem, linearisation(), need)
            grad = op.rmatvec(s.g)
            keep = need[:, None]
            s.grad = torch.where(keep, grad, s.grad)
            s.j_grad = torch.where(keep, op.matvec(grad), s.j_grad)
            s.cauchy = s.cauchy | need
        # Without a finite Newton step the dogleg runs from the Cauchy point −(‖Jᵀg‖²/‖JJᵀg‖²)Jᵀg.
        lost = active & ~usable
        if bool(lost.any()):
            length = s.grad.square().sum(dim=1) / s.j_grad.square().sum(dim=1).clamp_min(tiny)
            length = torch.nan_to_num(length, nan=0.0, posinf=0.0)[:, None]
            s.newton = torch.where(lost[:, None], -length * s.grad, s.newton)
            s.j_newton = torch.where(lost[:, None], -length * s.j_grad, s.j_newton)

        path = dogleg_path(s.newton, s.grad, s.j_grad, torch.ones_like(s.z), s.radius)
        p = path.step
        j_p = path.along_newton[:, None] * s.j_newton + path.along_unit[:, None] * path.j_unit
        c_len = torch.minimum(path.cauchy_length, s.radius)[:, None]
        p_c, j_c = -c_len * path.unit, -c_len * path.j_unit
        cauchy_better = s.cauchy & (row_norms(s.g + j_c) < row_norms(s.g + j_p))
        p = torch.where(cauchy_better[:, None], p_c, p)
        j_p = torch.where(cauchy_better[:, None], j_c, j_p)
        p = torch.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0)
        pnorm = row_norms(p)
        newton_step = (path.along_newton == 1) & (path.along_unit == 0) & ~cauchy_better

        z_try = s.z + p
        g_try = problem.g(z_try)
        fnorm, fnorm1 = row_norms(s.g), row_norms(g_try)
        ratio, actred = _ratio(fnorm, fnorm1, row_norms(s.g + j_p))
        radius, ncsuc, ncfail = _next_radius(ratio, s.radius, pnorm, s.ncsuc, s.ncfail)
        # A failure halves min(Δ, ‖p‖), not Δ: the same p_N is re-used, so halving a Δ that
        # exceeds 2‖p‖ would try the very same point again (hybrj's model changes after every
        # step and its first step, an exact Newton step, sets Δ ≤ ‖p‖; an inexact first step
        # from a one-vector Krylov space is no measure of the distance to a root).
        radius = torch.where(ratio < POOR, 0.5 * torch.minimum(s.radius, pnorm), radius)
        accept = active & (ratio >= ACCEPT) & torch.isfinite(fnorm1)
        # hybrj's "five Jacobians without a 10 % fall" counts fresh linearisations whose own
        # Newton step was tried in full: a step cut to the ball says the radius, not the model,
        # limited the progress (the radius and 0.1 % tests still catch a real stall there).
        nslow1, nslow2 = _slow_counts(actred, solve & newton_step, s.nslow1, s.nslow2)

        keep = accept[:, None]
        z_new = torch.where(keep, z_try, s.z)
        g_new = torch.where(keep, g_try, s.g)
        why = _stop_reason(radius, pnorm, row_norms(z_new), nslow1, nslow2)
        newly = active & (why > 0) & ~s.stuck
        s.why = torch.where(newly, why, s.why)
        s.stuck = s.stuck | newly

        # η from ‖g‖ at the new point over ‖g‖ where p_N was solved for (rejected steps keep z).
        self.direction.force(s.g, g_new, accept)
        # A new point needs a new Newton step and new Cauchy data; a rejected step keeps both.
        s.solved = s.solved & ~accept
        s.cauchy = s.cauchy & ~accept
        _keep_radius_state(s, active, radius, ncsuc, ncfail, nslow1, nslow2)
        s.z, s.g = z_new, g_new
        s.res = torch.where(accept, fnorm1, fnorm)
        return s

    def finish(self, state: KrylovTrustRegionState, result: SolveResult) -> None:  # type: ignore[override]
        """GMRES solves per sample, hybrj's reason for the samples it stopped, and the shared
        preconditioner's factorisations."""
        _report_stops(result, state.why, state.radius, "linearisations", state.linearisations)
        _report_preconditioner(self.direction, result)


def _report_preconditioner(direction: Direction, result: SolveResult) -> None:
    """``extra["preconditioner"]`` where GMRES ran preconditioned: which, its LUs, and the
    GMRES products its solves gave in place of JVPs (batched products: each counts for every
    sample then running)."""
    if isinstance(direction, KrylovDirection) and direction.factorisations:
        result.extra["preconditioner"] = {
            "kind": "shared",
            "factorisations": direction.factorisations,
            "products_from_solves": direction.from_solves,
        }


# -- exact Jacobians × Levenberg–Marquardt --------------------------------------------------------


@dataclass
class LevenbergMarquardtState(State):
    """Per-sample Jacobian, its scaled SVD, scaling and damping."""

    jac: torch.Tensor  # (B, n, n)
    u: torch.Tensor
    sigma: torch.Tensor
    vh: torch.Tensor
    diag: torch.Tensor  # (B, n)
    lam: torch.Tensor  # (B,)
    nu: torch.Tensor  # (B,)
    refresh: torch.Tensor  # (B,)
    nslow: torch.Tensor  # (B,)
    stuck: torch.Tensor  # (B,)
    jacobians: torch.Tensor  # (B,)


class LevenbergMarquardtMethod(Method):
    """Levenberg–Marquardt on ½‖g‖², per sample, with Nielsen's damping update.

    The step minimises ‖g + J p‖² + λ‖D p‖²; it is computed from the SVD of J D⁻¹ (once per
    Jacobian; each λ then costs O(n²)), so a singular or rank-deficient J needs no special case:
    for square systems this is the robust fallback where Newton's J is singular. With
    ρ = (actual reduction)/(predicted reduction) of ½‖g‖²: ρ > 10⁻⁴ accepts the step (a fresh
    Jacobian follows) and λ ← λ·max(⅓, 1 − (2ρ − 1)³); otherwise λ ← λ·ν, ν ← 2ν (ν = 2 after each
    acceptance). λ₀ = ``damping``·σ_max(J D⁻¹)². D as in the trust region (``scaling``).
    A sample stops (stalled) when a rejected step is at rounding level relative to ‖D z‖, or
    after twenty accepted steps in a row that each reduced ‖g‖² by less than 0.1 %.
    """

    def init(self, problem: Problem, z0: torch.Tensor) -> LevenbergMarquardtState:
        """Residual, Jacobian, scaling, SVD and the first damping at z0."""
        o: Any = self.options
        problem.check_dense_fits()
        g0, jac = problem.jacobian(z0)
        diag = _initial_scaling(jac, o.scaling)
        fact = factor_scaled(jac, diag)
        top = fact.sigma[:, 0].square()
        lam = o.damping * torch.where(top > 0, top, torch.ones_like(top))
        batch = z0.shape[0]
        zeros = torch.zeros(batch, dtype=torch.int64, device=z0.device)
        flags = torch.zeros(batch, dtype=torch.bool, device=z0.device)
        return LevenbergMarquardtState(
            z=z0,
            g=g0,
            jac=jac,
            u=fact.u,
            sigma=fact.sigma,
            vh=fact.vh,
            diag=diag,
            lam=lam,
            nu=torch.full_like(lam, 2.0),
            refresh=flags.clone(),
            nslow=zeros.clone(),
            stuck=flags.clone(),
            jacobians=zeros + 1,
        )

    def observe(self, state: LevenbergMarquardtState, active: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        """Samples whose steps fell to rounding level, or that stopped making progress."""
        return state.stuck & active

    def step(self, problem: Problem, state: LevenbergMarquardtState) -> LevenbergMarquardtState:  # type: ignore[override]
        """One damped step per sample and the damping update."""
        o: Any = self.options
        s = state
        active = _running(s)
        eps = torch.finfo(s.z.dtype).eps
        tiny = torch.finfo(s.z.dtype).tiny
        fresh, jac = _refresh_rows(problem, s, o.scaling)
        if jac is not None:
            s.jac = torch.where(fresh[:, None, None], jac, s.jac)
            index = fresh.nonzero().flatten()
            part = factor_scaled(s.jac[index], s.diag[index])
            s.u[index], s.sigma[index], s.vh[index] = part.u, part.sigma, part.vh

        p = damped_step(Factored(s.u, s.sigma, s.vh), s.diag, s.g, s.lam)
        g_try = problem.g(s.z + p)
        phi0 = 0.5 * s.g.square().sum(dim=1)
        phi1 = 0.5 * g_try.square().sum(dim=1)
        j_p = matvec(s.jac, p)
        predicted = phi0 - 0.5 * (s.g + j_p).square().sum(dim=1)
        rho = (phi0 - phi1) / predicted.clamp_min(tiny)
        rho = torch.where(torch.isfinite(rho) & (predicted > 0), rho, torch.full_like(rho, -1.0))
        accept = (rho > ACCEPT) & torch.isfinite(phi1) & active

        shrink = torch.clamp_min(1 - (2 * rho - 1).pow(3), 1 / 3)
        lam = torch.where(accept, s.lam * shrink, s.lam * s.nu)
        nu = torch.where(accept, torch.full_like(s.nu, 2.0), 2 * s.nu)
        relative = (phi0 - phi1) / phi0.clamp_min(tiny)
        nslow = torch.where(
            accept & (relative < 1e-3), s.nslow + 1, torch.where(accept, 0, s.nslow)
        )
        z_new = torch.where(accept[:, None], s.z + p, s.z)
        tiny_step = ~accept & (POOR * row_norms(s.diag * p) <= eps * row_norms(s.diag * z_new))
        s.stuck = s.stuck | (active & (tiny_step | (nslow >= 20)))
        s.lam = torch.where(active, lam.clamp(max=torch.finfo(lam.dtype).max / 4), s.lam)
        s.nu = torch.where(active, nu.clamp(max=2.0**60), s.nu)
        s.nslow = torch.where(active, nslow, s.nslow)
        s.refresh = s.refresh | accept
        s.g = torch.where(accept[:, None], g_try, s.g)
        s.z = z_new
        return s

    def finish(self, state: LevenbergMarquardtState, result: SolveResult) -> None:  # type: ignore[override]
        """Jacobians and the final damping per sample."""
        result.extra["levenberg_marquardt"] = {
            "jacobians": state.jacobians.tolist(),
            "damping": state.lam.tolist(),
        }
