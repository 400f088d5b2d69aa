"""Remedies: what the evidence says to do, as measured facts and runnable candidates.

``plan(sample, ctx)`` turns one sample's diagnosis into a ``Plan``:

- ``notes``: facts the diagnostics measured or the problem's structure proves (an exact learning-rate
  limit, an attracting cycle, an eigenvalue no damping can move), stated as facts;
- ``candidates``: remedies that can be *run* — a registered solver with options, from z0 or from the
  last iterate — each with the measured reason to try it and never a predicted outcome. The trials
  (``deqcli.analyses.remedies``) run them and report what happened;
- ``suggestions``: advice no trial can check (other initial points, float64, a larger budget).

``compose`` orders the final list: verified remedies first (stated as facts), then the notes, then
remedies tried without success, then untried candidates and suggestions, labelled as suggestions.
The plan is kept in the diagnostics document (``plan``), so the trials (``deqcli.analyses.remedies``,
run by ``deq solve`` and ``deqcli.solve``) can run its candidates and compose the list again.
Candidates name only registered solvers and options that solver has (read from ``SOLVERS``), so
solvers added later are used as soon as they are registered.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from deqcli.diagnostics import dynamics as dyn
from deqcli.diagnostics.dynamics import near_one

# Faster solvers to try, most preferred first, for linear-rate trouble and for unstable fixed points;
# the dense-Jacobian ones only while a dense Jacobian is affordable (Context.dense).
ACCELERATED = ("anderson", "newton", "trust-region", "newton-krylov", "broyden")
LOCALLY_FAST = ("newton", "trust-region", "broyden", "newton-krylov", "anderson")
DENSE_ONLY = ("newton", "trust-region")
# How many other solvers one plan proposes.
OTHER_SOLVERS = 2
# Above this many predicted iterations, "raise max_iter" is not offered as a remedy.
MAX_SENSIBLE_ITERATIONS = 10**7
# The trial-only Newton step with a multiplicity factor (no registered solver takes it).
MULTIPLICITY_STEP = "newton-multiplicity"
# Classes whose remedies are about an unstable or missed fixed point.
UNSTABLE = (dyn.DIVERGED, dyn.GROWING, dyn.OSCILLATING, dyn.CHAOTIC, dyn.NONFINITE)


@dataclass
class Context:
    """What the advice needs to know about the run."""

    solver: str
    beta: float | None  # the fixed_point solver's damping (None for other solvers)
    max_iter: int
    certificate: dict[str, Any] | None
    available: list[str] = field(default_factory=list)
    slow_rate: float = 0.95  # DiagnosticOptions.slow_rate
    options: dict[str, Any] = field(default_factory=dict)  # the run's solver options
    dense: bool = True  # a dense Jacobian is affordable (n within the dense analysis' limits)


@dataclass
class Candidate:
    """A remedy that can be run: ``solver`` with ``options`` from z0 or from the last iterate."""

    label: str  # what it is: "fixed_point beta=0.45", "newton with line search"
    why: str  # the measured reason to try it (never a predicted outcome)
    solver: str
    options: dict[str, Any] = field(default_factory=dict)
    start: Literal["z0", "last"] = "z0"
    max_iter: int | None = None  # None: the run's max_iter
    kind: str = "solver"  # solver | line_search | damping | learning_rate | continue | multiplicity

    def key(self) -> tuple[str, str, str]:
        """Identity for de-duplication (options rounded as the label shows them)."""
        return self.solver, self.start, self.label

    def as_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


@dataclass
class Plan:
    """Facts, runnable candidates and untestable suggestions for one sample."""

    notes: list[str] = field(default_factory=list)
    candidates: list[Candidate] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    # Doubts (does a root exist? other starts?) that a verified remedy answers: shown only when
    # no candidate worked.
    fallbacks: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """JSON form (stored in the diagnostics document, so the trials can run it later)."""
        return {
            "notes": list(self.notes),
            "candidates": [c.as_dict() for c in self.candidates],
            "suggestions": list(self.suggestions),
            "fallbacks": list(self.fallbacks),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Plan:
        """The plan ``as_dict`` wrote."""
        return cls(
            notes=list(data.get("notes", [])),
            candidates=[Candidate(**c) for c in data.get("candidates", [])],
            suggestions=list(data.get("suggestions", [])),
            fallbacks=list(data.get("fallbacks", [])),
        )

    def add(self, candidate: Candidate | None) -> None:
        """Append a candidate unless an equivalent one is already planned (the same solver from
        the same start with the same options, dampings within 0.05 of each other included)."""
        if candidate is not None and not any(same(c, candidate) for c in self.candidates):
            self.candidates.append(candidate)


def same(a: Candidate, b: Candidate) -> bool:
    """Equivalent candidates: same label, or the same solver and start with options that differ
    at most in a damping β by 0.05."""
    if a.key() == b.key():
        return True
    if (a.solver, a.start) != (b.solver, b.start) or set(a.options) != set(b.options):
        return False
    for key, value in a.options.items():
        other = b.options[key]
        if key == "beta" and isinstance(value, (int, float)) and isinstance(other, (int, float)):
            if abs(value - other) > 0.05:
                return False
        elif value != other:
            return False
    return True


def describe(solver: str, options: dict[str, Any]) -> str:
    """'anderson m=10', 'newton with line search', 'fixed_point beta=0.45'."""
    parts = []
    for key, value in options.items():
        if key == "line_search" and value is True:
            return f"{solver} with line search" + (f" ({', '.join(parts)})" if parts else "")
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return f"{solver} {' '.join(parts)}".strip()


def has_option(name: str, option: str) -> bool:
    """Whether registered solver ``name`` takes ``option`` (False for unknown or broken entries)."""
    from deqcli.solvers import SOLVERS

    info = SOLVERS.get(name)
    if info is None:
        return False
    try:
        return option in info.load().option_fields()
    except (ImportError, AttributeError):
        return False


def other_solvers(ctx: Context, preference: tuple[str, ...], why: str) -> list[Candidate]:
    """Up to OTHER_SOLVERS registered solvers from ``preference``, not the one that ran."""
    names = [
        n
        for n in preference
        if n in ctx.available and n != ctx.solver and (ctx.dense or n not in DENSE_ONLY)
    ][:OTHER_SOLVERS]
    out = []
    for name in names:
        options = {"line_search": True} if has_option(name, "line_search") else {}
        out.append(Candidate(describe(name, options), why, name, options))
    return out


def plan(sample: dict[str, Any], ctx: Context) -> Plan:
    """The facts, candidates and suggestions for one sample's diagnosis."""
    out = Plan()
    cls = sample["classification"]
    ev = sample.get("evidence", {})
    if cls == dyn.CONVERGED:
        _converged(sample, ctx, out)
        return out
    if cls == dyn.UNDETERMINED:
        if sample.get("iterations", 0) < 4:
            why = f"only {sample.get('iterations', 0)} iterations: too few to judge"
            out.add(_more_iterations(ctx, max(ctx.max_iter, 50), why))
        return out
    if ctx.options.get("line_search") is False and cls in (*UNSTABLE, dyn.STALLED):
        options = {**_run_options(ctx), "line_search": True}
        out.add(
            Candidate(
                describe(ctx.solver, {"line_search": True}),
                f"{ctx.solver} ran without its line search and {cls}: a backtracking line search accepts only "
                "steps that lower ‖g‖",
                ctx.solver,
                options,
                kind="line_search",
            )
        )
    gd = (ctx.certificate or {}).get("gradient_descent")
    if gd:
        _learning_rate(gd, ctx, out)
    if cls == dyn.PRECISION_FLOOR:
        _precision_floor(ev, out)
        return out
    if cls == dyn.NONFINITE:
        _nonfinite(ev, out)
    if cls == dyn.GROWING and sample.get("transient"):
        _transient(sample, ctx, out)
        return out
    if cls == dyn.OSCILLATING:
        _oscillating(sample, ctx, out)
    if cls in UNSTABLE:
        _unstable(sample, ctx, out)
    elif cls == dyn.STALLED:
        _stalled(sample, ctx, out)
    elif cls == dyn.SLOW:
        _slow(sample, ctx, out)
    return out


def _run_options(ctx: Context) -> dict[str, Any]:
    """The run's own options (a continuation or a switch of line search keeps the rest)."""
    return dict(ctx.options)


def _more_iterations(ctx: Context, more: int, why: str) -> Candidate:
    """The same solver, with its options, continued from the last iterate for ``more`` iterations."""
    return Candidate(
        f"{more} more iterations of {describe(ctx.solver, {})} from the last iterate",
        why,
        ctx.solver,
        _run_options(ctx),
        start="last",
        max_iter=more,
        kind="continue",
    )


def _learning_rate(gd: dict[str, Any], ctx: Context, out: Plan) -> None:
    lr, limit = gd["lr"], gd.get("lr_limit")
    if limit is None or lr < limit:
        return
    text = (
        f"gradient descent lr {lr:g} > 2/λmax = {limit:.4g} (λmax(H) = {gd['lambda_max']:.4g}): each step "
        f"multiplies the error along the top eigenvector by 1 − lr·λmax = {1 - lr * gd['lambda_max']:.4g}; "
        f"it converges exactly when lr < {limit:.4g}"
    )
    if "lr_best" in gd:
        text += (
            f", fastest at lr = 2/(λmin + λmax) = {gd['lr_best']:.4g} (rate {gd['rate_best']:.4g})"
        )
    out.notes.append(text)
    if "fixed_point" in ctx.solver and "lr_best" in gd:
        # Damping the gradient step w ← w − β·lr·∇L is gradient descent with learning rate β·lr.
        beta = gd["lr_best"] / lr
        out.add(
            Candidate(
                f"fixed_point beta={beta:.3g} (learning rate β·lr = {gd['lr_best']:.4g})",
                "damping the gradient step by β scales the learning rate by β",
                "fixed_point",
                {"beta": beta},
                kind="learning_rate",
            )
        )
    else:
        out.suggestions.append(f"set the learning rate below {limit:.4g}")


def _precision_floor(ev: dict[str, Any], out: Plan) -> None:
    reachable, at = ev.get("reachable_tolerance"), ev.get("reached_at")
    out.notes.append(
        f"{ev.get('dtype')} resolves z only to about ε‖z‖ = {ev.get('resolution', math.nan):.3g} at ‖z‖ ≈ "
        f"{ev.get('scale', math.nan):.3g}: no solver can push ‖g‖ much below that in this precision"
    )
    if reachable is not None and at is not None:
        out.notes.append(
            f"‖g‖ first fell to {reachable:.3g} or below at iteration {at}: atol {reachable:.1g} would have stopped "
            "the run there"
        )
    out.suggestions.append(
        f"loosen atol to about {reachable:.1g}, or run in float64 (--dtype float64), whose floor at this "
        f"scale is about {ev.get('float64_floor', math.nan):.1g}"
    )


def _nonfinite(ev: dict[str, Any], out: Plan) -> None:
    kind = ev.get("nonfinite")
    if kind == "overflow":
        out.notes.append(
            f"the residual overflowed after growing ×{near_one(ev.get('growth_rate', math.nan))} per iteration: "
            "divergence"
        )
    elif kind == "residual":
        out.notes.append(
            "the map is undefined at the last iterate (g is inf/NaN while z is finite: log or sqrt of a "
            "negative, a division by zero)"
        )
        out.suggestions.append(
            "start inside the map's domain, take smaller steps (fixed_point with beta < 1), or guard the map "
            "(clamp, abs)"
        )
    else:
        out.suggestions.append("run in float64 if this was float32")


def _transient(sample: dict[str, Any], ctx: Context, out: Plan) -> None:
    last = sample.get("spectral_last") or {}
    out.notes.append(
        f"‖J‖₂ = {_num(last.get('norm2'))} > 1 > ρ(J) = {_num(last.get('spectral_radius'))} at the last iterate: "
        "transient growth of a non-normal map, not divergence"
    )
    for cand in other_solvers(
        ctx,
        ACCELERATED,
        "a solver that does not iterate f itself is not slowed by its transient growth",
    ):
        out.add(cand)
    need = sample.get("transient_iterations")
    done = sample.get("iterations", 0)
    if need is not None and need <= MAX_SENSIBLE_ITERATIONS:
        why = (
            f"at the rate ρ(J) = {_num(last.get('spectral_radius'))} the tolerance needs about {need} "
            "iterations in all"
        )
        out.add(_more_iterations(ctx, max(1, math.ceil(1.1 * (need - done))), why))


def _oscillating(sample: dict[str, Any], ctx: Context, out: Plan) -> None:
    ev = sample.get("evidence", {})
    mult = ev.get("cycle_multiplier")
    if mult is not None and mult < 1:
        out.notes.append(
            f"the period-{ev.get('period')} cycle attracts (multiplier ρ = {mult:.3g} < 1): more iterations of "
            f"{ctx.solver} stay on it"
        )
    spec = sample.get("spectral") or {}
    located = spec.get("point") in ("solution", "located fixed point") and spec.get("damping")
    if ev.get("period") == 2 and not located and "fixed_point" in ctx.solver:
        out.add(
            Candidate(
                "fixed_point beta=0.5",
                f"the iterates alternate between two points {ev.get('peak_to_peak', math.nan):.3g} apart; "
                "β = 0.5 steps to their midpoint",
                "fixed_point",
                {"beta": 0.5},
                kind="damping",
            )
        )


def _unstable(sample: dict[str, Any], ctx: Context, out: Plan) -> None:
    """The fixed point (if located) and what can reach it: damping, other solvers."""
    ev = sample.get("evidence", {})
    spec = sample.get("spectral") or {}
    where = spec.get("point")
    rho = spec.get("spectral_radius")
    plain = "fixed_point" in ctx.solver
    if ev.get("escaping"):
        out.notes.append(
            f"the iterates run off to infinity while ‖g‖ stays between {ev.get('residual_min', math.nan):.3g} "
            f"and {ev.get('residual_max', math.nan):.3g}: along this path ‖g‖ does not approach zero"
        )
        out.fallbacks.append("check that a root exists, and try other initial points")
        for cand in other_solvers(
            ctx, LOCALLY_FAST, "a method that only accepts steps lowering ‖g‖"
        ):
            out.add(cand)
        return
    if where not in ("solution", "located fixed point") or rho is None:
        out.notes.append(
            "no fixed point was located near the iterates (Newton's method from their centre, the last "
            "iterate and z0 found none within the problem's scale)"
        )
        out.fallbacks.append(
            "check that a fixed point exists, or try other initial points (a batch of starts)"
        )
        for cand in other_solvers(
            ctx, LOCALLY_FAST, "a globalised Newton-type method searches for a root"
        ):
            out.add(cand)
        return
    damping = spec.get("damping") or {}
    if rho < 1:
        out.notes.append(
            f"the fixed point located near the iterates attracts plain iteration (ρ(J) = {near_one(rho)} < 1), "
            "but this run did not reach it"
        )
    else:
        relation = "> 1" if rho > 1 else "= 1 (neutral)"
        out.notes.append(
            f"ρ(J) ≈ {near_one(rho)} {relation} at the fixed point located near the iterates: plain iteration "
            "does not converge to it"
        )
    if damping.get("stabilisable") and plain:
        out.add(_damping(spec, ctx))
    elif damping and not damping.get("stabilisable"):
        blocking = damping.get("blocking_eigenvalue")
        ev_text = f" ({blocking[0]:.3g}{blocking[1]:+.3g}i)" if blocking else ""
        out.notes.append(
            f"an eigenvalue of J there has real part ≥ 1{ev_text}: no damping β makes plain iteration converge"
        )
    for cand in other_solvers(
        ctx, LOCALLY_FAST, "Newton-type methods do not need ρ(J) < 1 at the fixed point"
    ):
        out.add(cand)


def _damping(spec: dict[str, Any], ctx: Context) -> Candidate | None:
    damping = spec.get("damping") or {}
    best, bmax, rate = damping.get("beta_best"), damping.get("beta_max"), damping.get("rate_best")
    if best is None or abs(best - (ctx.beta or 1.0)) <= 0.05:
        return None
    why = (
        f"at the fixed point ρ(I − βJ_g) = {near_one(rate)} for β = {best:.2g}, below 1 for every β < {bmax:.3g} "
        "(local analysis)"
    )
    dom = spec.get("dominant_eigenvalue")
    rho = spec.get("spectral_radius")
    if dom is not None and abs(dom[1]) < 1e-12 and dom[0] < 0 and rho is not None:
        why += f"; for the dominant eigenvalue −ρ that is β < 2/(1 + ρ) = {2 / (1 + rho):.3g}"
    return Candidate(
        f"fixed_point beta={best:.2g}", why, "fixed_point", {"beta": round(best, 2)}, kind="damping"
    )


def _stalled(sample: dict[str, Any], ctx: Context, out: Plan) -> None:
    stationary = sample.get("stationarity")
    r = sample.get("final_residual")
    if stationary is not None and stationary.get("stationary"):
        out.notes.append(
            f"‖g‖ stalled at {r:.3g} where ∇(½‖g‖²) = J_gᵀg ≈ 0 (ratio {stationary['ratio']:.2g}): a nonzero "
            "local minimum of ‖g‖, not a root"
        )
        out.suggestions.append("try other initial points, or check that a root exists")
    else:
        if stationary is not None:
            out.notes.append(
                f"‖g‖ stalled at {r:.3g} where ∇(½‖g‖²) is not small (ratio {stationary['ratio']:.2g}): "
                f"{ctx.solver} stopped making progress, not the problem"
            )
        for cand in other_solvers(ctx, LOCALLY_FAST, f"{ctx.solver} made no progress here"):
            out.add(cand)
    newton = sample.get("newton") or {}
    if newton.get("near_singular"):
        out.notes.append(
            f"J_g is near singular along the iterates (cond up to {newton.get('max_cond', math.inf):.3g}): "
            "Newton directions there are unreliable"
        )


def _slow(sample: dict[str, Any], ctx: Context, out: Plan) -> None:
    ev = sample.get("evidence", {})
    rate, need = ev.get("rate"), ev.get("iterations_needed")
    more = ev.get("additional_iterations")
    if ev.get("sublinear"):
        out.notes.append(
            f"the rate crept from {near_one(ev.get('early_rate'))} (iterations k/4..k/2) to "
            f"{near_one(ev.get('late_rate'))} (k/2..k): sublinear convergence (typical when ρ(J) = 1 at "
            "the fixed point)"
        )
    for cand in other_solvers(ctx, ACCELERATED, f"linear rate {near_one(rate)} with {ctx.solver}"):
        out.add(cand)
    plain = "fixed_point" in ctx.solver
    out.add(_better_damping(sample, ctx, plain, rate))
    if more is not None and need is not None and need <= MAX_SENSIBLE_ITERATIONS:
        why = (
            f"at the rate {near_one(rate)} the tolerance needs about {need} iterations in all "
            f"(max_iter {ctx.max_iter})"
        )
        out.add(_more_iterations(ctx, max(1, math.ceil(1.1 * more)), why))
        out.suggestions.append(f"raise max_iter to about {math.ceil(need * 1.1)}")


def _better_damping(
    sample: dict[str, Any], ctx: Context, plain: bool, rate: float | None
) -> Candidate | None:
    spec = sample.get("spectral") or {}
    damping = spec.get("damping") or {}
    if not plain or not damping.get("stabilisable") or rate is None:
        return None
    if damping["rate_best"] < 0.9 * rate:
        return _damping(spec, ctx)
    return None


def _converged(sample: dict[str, Any], ctx: Context, out: Plan) -> None:
    theory = sample.get("theory") or {}
    rates = sample.get("rates") or {}
    m = theory.get("multiplicity")
    if theory.get("linear_newton"):
        out.notes.append(theory["multiplicity_evidence"])
    if m:
        step = round(m)
        out.add(
            Candidate(
                f"newton with the multiplicity step z ← z − {step}·J_g⁻¹g",
                f"Newton's step scaled by the multiplicity m ≈ {m:.2g} restores its fast convergence at a root of "
                "multiplicity m",
                MULTIPLICITY_STEP,
                {"m": float(step)},
                kind="multiplicity",
            )
        )
    plain = "fixed_point" in ctx.solver
    rate = rates.get("step_rate")
    if plain and rate is not None and rate > ctx.slow_rate:
        for cand in other_solvers(
            ctx,
            ACCELERATED,
            f"converged slowly (rate {near_one(rate)}, {sample.get('iterations')} iterations)",
        ):
            out.add(cand)
        out.add(_better_damping(sample, ctx, plain, rate))


# -- the final list ----------------------------------------------------------------------------


def compose(
    the_plan: Plan, trials: list[dict[str, Any]], *, untried: str | None = None
) -> list[dict[str, Any]]:
    """The remedies of one sample in the order shown: verified (facts), notes, tried without
    success, then suggestions (untried candidates and untestable advice), each labelled.

    ``trials`` are the trial records of this sample's candidates (matched by label); ``untried``
    says why candidates without a trial were not run (trials off, another sample tried). Each
    entry has ``kind`` (verified, note, tried, suggestion), ``text`` (self-labelled: "tried: …",
    "suggestion: …") and ``short`` (the text without the label its kind repeats).
    """
    by_label = {t["label"]: t for t in trials}
    verified: list[dict[str, Any]] = []
    failed: list[dict[str, Any]] = []
    not_run: list[dict[str, Any]] = []
    for cand in the_plan.candidates:
        trial = by_label.get(cand.label)
        entry: dict[str, Any] = {
            "label": cand.label,
            "solver": cand.solver,
            "options": cand.options,
            "start": cand.start,
            "why": cand.why,
        }
        if trial is None or trial.get("outcome") == "not run":
            why_not = trial.get("reason") if trial is not None else untried
            short = f"{cand.label} — {cand.why} (not tried{f': {why_not}' if why_not else ''})"
            not_run.append(
                {**entry, "kind": "suggestion", "text": f"suggestion: {short}", "short": short}
            )
            continue
        entry["trial"] = trial["index"]
        short = trial["text"].removeprefix("tried: ")
        kind = "verified" if trial["verified"] else "tried"
        (verified if trial["verified"] else failed).append(
            {**entry, "kind": kind, "text": trial["text"], "short": short}
        )
    notes = [{"kind": "note", "text": text, "short": text} for text in the_plan.notes]
    doubts = [] if verified else the_plan.fallbacks
    plain = [
        {"kind": "suggestion", "text": f"suggestion: {text}", "short": text}
        for text in [*the_plan.suggestions, *doubts]
    ]
    return _dedupe(verified + notes + failed + not_run + plain)


def _dedupe(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for item in items:
        if item["text"] not in seen:
            seen.add(item["text"])
            out.append(item)
    return out


def _num(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, (int, float)) else "?"
