"""Remedies: concrete advice, with numbers, for each diagnosed outcome.

The advice only names solvers that are registered (``deq list-solvers``), prefers the cheapest fix
(a damping factor or a learning rate computed from the spectrum) and says why it should work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from deqcli.diagnostics import dynamics as dyn

# Faster solvers to suggest, most preferred first, for linear-rate trouble and for unstable fixed points.
ACCELERATED = ("anderson", "newton_krylov", "newton-krylov", "broyden", "newton")
LOCALLY_FAST = ("newton", "newton_krylov", "newton-krylov", "broyden", "anderson")
# Above this many predicted iterations, "raise max_iter" is not offered as a remedy.
MAX_SENSIBLE_ITERATIONS = 10**7


@dataclass
class Context:
    """What the advice needs to know about the run."""

    solver: str
    beta: float | None  # the fixed_point solver's damping (None for other solvers)
    max_iter: int
    certificate: dict[str, Any] | None
    available: list[str] = field(default_factory=list)
    slow_rate: float = 0.95  # DiagnosticOptions.slow_rate


def suggest(ctx: Context, preference: tuple[str, ...], count: int = 2) -> str:
    """'a or b' from the registered solvers in preference order, excluding the current one."""
    names = [n for n in preference if n in ctx.available and n != ctx.solver][:count]
    if not names:
        names = [n for n in ("newton",) if n != ctx.solver] or ["another solver"]
    return " or ".join(names)


def remedies(sample: dict[str, Any], ctx: Context) -> list[str]:
    """Advice for one sample's diagnosis (empty when nothing needs fixing)."""
    cls = sample["classification"]
    ev = sample.get("evidence", {})
    out: list[str] = []
    gd = (ctx.certificate or {}).get("gradient_descent")
    plain = "fixed_point" in ctx.solver

    if cls == dyn.CONVERGED:
        return _converged(sample, ctx)

    if gd and cls != dyn.UNDETERMINED:
        out += _learning_rate(gd)

    if cls == dyn.NONFINITE:
        if ev.get("nonfinite") == "overflow":
            out.append(
                f"the residual overflowed after growing ×{ev.get('growth_rate', math.nan):.3g} per iteration: "
                "this is divergence (see below)"
            )
        elif ev.get("nonfinite") == "residual":
            out.append(
                "the map is undefined at the iterate (e.g. log or sqrt of a negative, a division by zero): "
                "start inside its domain, take smaller steps (fixed_point with beta < 1), or guard the map "
                "(clamp, abs)"
            )
        else:
            out.append(
                "the iterate overflowed: treat it as divergence (below), or run in float64 if this was float32"
            )
    if cls == dyn.GROWING and sample.get("transient"):
        need = sample.get("transient_iterations")
        out.append(
            f"‖J‖₂ = {spec_last(sample, 'norm2')} > 1 > ρ(J) = {spec_last(sample, 'spectral_radius')}: "
            "transient growth of a non-normal map, not divergence; it settles at the asymptotic rate ρ(J)"
            + (
                f" — raise max_iter to about {need}"
                if need is not None and need <= MAX_SENSIBLE_ITERATIONS
                else ""
            )
        )
        return out
    if cls == dyn.OSCILLATING:
        p = ev.get("period")
        amp = ev.get("amplitude")
        if p == 2:
            out.append(
                f"period-2 oscillation (amplitude {amp:.3g}): damping β ≈ 0.5 typically breaks it "
                "(solver: {name: fixed_point, beta: 0.5})"
            )
        else:
            out.append(
                f"period-{p} cycle (amplitude {amp:.3g}): damping alone rarely breaks longer cycles; "
                f"{suggest(ctx, LOCALLY_FAST)} converge(s) to the fixed point the cycle surrounds"
            )
        mult = ev.get("cycle_multiplier")
        if mult is not None and mult < 1:
            out.append(
                f"the cycle attracts (multiplier ρ = {mult:.3g} < 1): more iterations will not help"
            )
    if cls in (dyn.DIVERGED, dyn.GROWING, dyn.OSCILLATING, dyn.CHAOTIC, dyn.NONFINITE):
        out += _unstable(sample, ctx, plain)
    elif cls == dyn.STALLED:
        out += _stalled(sample, ctx)
    elif cls == dyn.SLOW:
        out += _slow(sample, ctx, plain)
    elif cls == dyn.UNDETERMINED and sample.get("iterations", 0) < 4:
        out.append("too few iterations to judge: raise max_iter")
    return _dedupe(out)


def near_one(x: float) -> str:
    """Rates and radii: 3 significant digits, or 6 within 1% of 1 (where 0.9999 ≠ 1 matters)."""
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return str(x)
    if abs(x) < 1e-12:
        return "0"  # a rate at rounding level: exact convergence in one step
    return f"{x:.6g}" if abs(x - 1) < 0.01 else f"{x:.3g}"


def spec_last(sample: dict[str, Any], key: str) -> str:
    """A number from the spectral analysis at the last iterate, formatted (or '?')."""
    value = (sample.get("spectral_last") or {}).get(key)
    return f"{value:.3g}" if isinstance(value, (int, float)) else "?"


def _learning_rate(gd: dict[str, Any]) -> list[str]:
    lr, limit = gd["lr"], gd.get("lr_limit")
    if limit is None or lr < limit:
        return []
    text = (
        f"gradient descent lr {lr:g} > 2/λmax = {limit:.4g} (λmax(H) = {gd['lambda_max']:.4g}): each step "
        f"multiplies the error along the top eigenvector by 1 − lr·λmax = {1 - lr * gd['lambda_max']:.4g}; "
        f"use lr < {limit:.4g}"
    )
    if "lr_best" in gd:
        text += f" — lr = 2/(λmin + λmax) = {gd['lr_best']:.4g} gives the best rate {gd['rate_best']:.4g}"
    return [text]


def _unstable(sample: dict[str, Any], ctx: Context, plain: bool) -> list[str]:
    """The fixed point (if located) and whether damping or another solver can reach it."""
    spec = sample.get("spectral") or {}
    where = spec.get("point")
    rho = spec.get("spectral_radius")
    fast = suggest(ctx, LOCALLY_FAST)
    if where not in ("solution", "located fixed point") or rho is None:
        return [
            "no fixed point was located near the iterates: check that one exists, try other initial "
            f"points (a batch of starts), or {fast} with a line search"
        ]
    if rho < 1:
        return [
            f"the fixed point found near the iterates attracts (ρ(J) = {near_one(rho)} < 1) but this run did not reach "
            f"it: start closer to it, damp (beta < 1), or use {fast}"
        ]
    damping = spec.get("damping") or {}
    relation = "> 1" if rho > 1 else "(neutral: |λ| = 1)"
    head = f"ρ(J) ≈ {near_one(rho)} {relation} at the fixed point: plain iteration cannot converge here"
    if damping.get("stabilisable"):
        bmax, best, rate = damping["beta_max"], damping["beta_best"], damping["rate_best"]
        text = (
            f"{head}; damping with β < {bmax:.3g} will (β ≈ {best:.2g} gives rate {near_one(rate)}: "
            f"solver: {{name: fixed_point, beta: {best:.2g}}})"
        )
        dom = spec.get("dominant_eigenvalue")
        if dom is not None and abs(dom[1]) < 1e-12 and dom[0] < 0:
            text += f"; for the dominant eigenvalue −ρ this is β < 2/(1 + ρ) = {2 / (1 + rho):.3g}"
        return [text + f", as will {fast}"]
    blocking = damping.get("blocking_eigenvalue")
    ev = f" (eigenvalue {blocking[0]:.3g}{blocking[1]:+.3g}i has real part ≥ 1)" if blocking else ""
    return [f"{head}, and no damping can fix it{ev}: use {fast}"]


def _stalled(sample: dict[str, Any], ctx: Context) -> list[str]:
    out = []
    stationary = sample.get("stationarity")
    r = sample.get("final_residual")
    if stationary is not None and stationary.get("stationary"):
        out.append(
            f"‖g‖ stalled at {r:.3g} where ∇(½‖g‖²) = J_gᵀg ≈ 0 (ratio {stationary['ratio']:.2g}): the solver has "
            "likely found a local minimum of ‖g‖, not a root; try other initial points, or check that a root exists"
        )
    newton = sample.get("newton") or {}
    if newton.get("near_singular"):
        out.append(
            f"J_g is near singular along the iterates (cond up to {newton.get('max_cond', math.inf):.3g}): the "
            "Newton direction is unreliable; a line search cannot fix that — regularise, or start elsewhere"
        )
    if not out:
        out.append(
            f"no progress with {ctx.solver}: try {suggest(ctx, LOCALLY_FAST)} or other initial points"
        )
    return out


def _slow(sample: dict[str, Any], ctx: Context, plain: bool) -> list[str]:
    ev = sample.get("evidence", {})
    rate, need = ev.get("rate"), ev.get("iterations_needed")
    count = "unboundedly many" if need is None else f"about {need:,}".replace(",", " ")
    text = f"rate {rate:.6g}: {count} iterations needed (max_iter {ctx.max_iter})"
    text += f"; use {suggest(ctx, ACCELERATED)}"
    if need is not None and need <= MAX_SENSIBLE_ITERATIONS:
        text += f", or raise max_iter to about {math.ceil(need * 1.1)}"
    out = [text]
    if ev.get("sublinear"):
        out.append(
            "the rate keeps creeping towards 1 (sublinear convergence, typical when ρ(J) = 1 at the "
            "fixed point): more iterations help little; Newton-type solvers do not suffer from this"
        )
    out += _better_damping(sample, ctx, plain, rate)
    return out


def _better_damping(
    sample: dict[str, Any], ctx: Context, plain: bool, rate: float | None
) -> list[str]:
    spec = sample.get("spectral") or {}
    damping = spec.get("damping") or {}
    if not plain or not damping.get("stabilisable") or rate is None:
        return []
    best, rbest = damping["beta_best"], damping["rate_best"]
    if rbest < 0.9 * rate and abs(best - (ctx.beta or 1.0)) > 0.05:
        return [
            f"damping β ≈ {best:.2g} would give rate {near_one(rbest)} instead of {near_one(rate)} "
            f"(solver: {{name: fixed_point, beta: {best:.2g}}})"
        ]
    return []


def _converged(sample: dict[str, Any], ctx: Context) -> list[str]:
    out = []
    theory = sample.get("theory") or {}
    rates = sample.get("rates") or {}
    newton = sample.get("newton") or {}
    if theory.get("linear_newton"):
        m = theory.get("multiplicity")
        rate = rates.get("step_rate")
        out.append(
            f"{ctx.solver} converged only linearly (rate {rate:.3g}): the root is likely multiple"
            + (f" (multiplicity ≈ {m:.2g})" if m else "")
            + " or J_g is singular there; the error is then much larger than ‖g‖ (about ‖g‖^(1/m));"
            " a modified step z ← z − m·J_g⁻¹g restores fast convergence"
        )
    if newton.get("near_singular") and not theory.get("linear_newton"):
        out.append(
            f"cond(J_g) = {newton.get('cond_at_solution', math.inf):.3g} at the solution: the root is "
            "ill-conditioned; the error can be as large as cond × ‖g‖ / ‖J_g‖"
        )
    plain = "fixed_point" in ctx.solver
    rate = rates.get("step_rate")
    if plain and rate is not None and rate > ctx.slow_rate:
        out.append(
            f"converged slowly (rate {rate:.4g}, {sample.get('iterations')} iterations): "
            f"{suggest(ctx, ACCELERATED)} would need far fewer"
        )
        out += _better_damping(sample, ctx, plain, rate)
    return out


def _dedupe(items: list[str]) -> list[str]:
    seen: set[str] = set()
    return [x for x in items if not (x in seen or seen.add(x))]
