"""Trajectory classification per sample: converged (with rate and order), diverged, oscillating with
period p, stalled, slow, chaotic — from the residual and step histories and the kept iterates.

Pure arithmetic on the recorded history (numpy on a few dozen iterates); no evaluations of the map.
Every threshold comes from ``DiagnosticOptions`` and is documented in docs/diagnostics.md.
"""

from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np

from deqcli.diagnostics.settings import DiagnosticOptions
from deqcli.result import SolveResult, Status

# Names of the classifications, in the JSON as ``classification``.
CONVERGED = "converged"
DIVERGED = "diverged"
NONFINITE = "nonfinite"
OSCILLATING = "oscillating"
STALLED = "stalled"
SLOW = "slow"
GROWING = "growing"
CHAOTIC = "chaotic"
TIMEOUT = "timeout"
UNDETERMINED = "undetermined"

# The Status a driver MAX_ITER/TIMEOUT sample is refined to, per classification (others keep theirs).
REFINED_STATUS = {
    OSCILLATING: Status.OSCILLATING,
    STALLED: Status.STALLED,
    DIVERGED: Status.DIVERGED,
}

# What theory says about each solver family's local convergence, matched by substring of the name
# (first match wins). ``None`` for the rate means "no closed-form prediction".
THEORY: list[tuple[str, str, str]] = [
    ("krylov", "superlinear", "inexact Newton (Krylov) converges superlinearly near a simple root"),
    ("broyden", "superlinear", "Broyden's method converges superlinearly near a simple root"),
    ("hybr", "superlinear", "Powell's hybrid method converges superlinearly near a simple root"),
    ("trust", "quadratic", "trust-region Newton converges quadratically near a simple root"),
    ("newton", "quadratic", "Newton's method converges quadratically near a simple root"),
    ("anderson", "linear", "Anderson acceleration converges linearly, faster than plain iteration"),
    (
        "fixed_point",
        "linear",
        "plain iteration converges linearly with rate ρ(I − βJ_g) = ρ(J) for β = 1",
    ),
    ("picard", "linear", "plain iteration converges linearly with rate ρ(J)"),
]
# Solvers whose steps solve with the residual Jacobian J_g (so its conditioning matters).
NEWTON_LIKE = ("newton", "broyden", "krylov", "hybr", "trust", "scipy:lm")


def theory_for(solver: str) -> tuple[str, str] | None:
    """(expected order class, statement) for a solver name, or None when unknown."""
    name = solver.lower()
    for key, order, statement in THEORY:
        if key in name:
            return order, statement
    return None


def newton_like(solver: str) -> bool:
    """True for solvers that solve with J_g (Newton, quasi-Newton, Newton–Krylov)."""
    name = solver.lower()
    return any(key in name for key in NEWTON_LIKE)


@dataclass
class Trace:
    """One sample's recorded history, cut at the iteration where it stopped."""

    index: int
    status: Status
    iterations: int
    residuals: list[float]  # ‖g(z_t)‖, t = 0..k (a long run's thinned middle has fewer rows)
    steps: list[float]  # ‖z_t − z_{t−1}‖, t = 1..k
    iterates: np.ndarray  # (T, n) float64: kept iterates up to iteration k, oldest first
    first_kept: int  # iteration number of iterates[0]
    threshold: float  # the tolerance the sample had to meet (run.stop_mode's rule)
    atol: float
    eps: float  # machine epsilon of the solve's dtype
    z0_norm: float

    @property
    def last(self) -> np.ndarray:
        """The final iterate."""
        return self.iterates[-1]

    @property
    def scale(self) -> float:
        """max(1, ‖z_k‖): the scale that relative tests use."""
        norm = float(np.linalg.norm(self.last))
        return max(1.0, norm) if math.isfinite(norm) else 1.0


def noise_floor(tr: Trace, opts: DiagnosticOptions) -> float:
    """noise_factor·ε·max(1, ‖z‖): steps and residuals below this are rounding noise."""
    return opts.noise_factor * tr.eps * tr.scale


def traces(result: SolveResult, z0_norms: list[float] | None = None) -> list[Trace]:
    """Per-sample traces of a result (tail iterates sliced to each sample's stopping iteration).

    ``z0_norms`` (‖z_0‖ per sample) enables the iterate-growth test when z_0 left the kept tail.
    """
    import torch

    total = result.total_iterations
    tail = result.tail.detach().to("cpu", torch.float64).numpy()
    kept = tail.shape[0]
    eps = float(torch.finfo(result.tail.dtype).eps)
    thresholds = result.thresholds()
    out = []
    for b in range(result.batch):
        k = result.iterations[b]
        last = kept - 1 - (total - k)  # tail index of iteration k
        if last < 0:
            # Frozen rows are restored every iteration, so the final entry is z_k itself.
            iterates, first = tail[-1:, b], k
        else:
            iterates, first = tail[: last + 1, b], k - last
        _, residuals, steps = result.sample_history(b)
        out.append(
            Trace(
                index=b,
                status=result.sample_status[b],
                iterations=k,
                residuals=residuals,
                steps=steps,
                iterates=iterates,
                first_kept=first,
                threshold=thresholds[b],
                atol=result.atol,
                eps=eps,
                z0_norm=z0_norms[b]
                if z0_norms is not None
                else (float(np.linalg.norm(tail[0, b])) if first == 0 else math.nan),
            )
        )
    return out


# -- rates and orders --------------------------------------------------------------------------


def ratios(values: list[float], floor: float) -> list[float]:
    """v_t / v_{t−1} for consecutive entries that are finite and above ``floor``."""
    out = []
    for prev, cur in itertools.pairwise(values):
        if all(math.isfinite(v) and v > floor for v in (prev, cur)):
            out.append(cur / prev)
    return out


def geometric_rate(values: list[float], window: int, floor: float) -> dict[str, Any] | None:
    """Geometric mean and median of the last ``window`` usable ratios v_t/v_{t−1}, or None."""
    rs = ratios(values, floor)[-window:]
    if not rs:
        return None
    return {
        "rate": math.exp(sum(math.log(r) for r in rs) / len(rs)),
        "median": statistics.median(rs),
        "ratios_used": len(rs),
    }


def order_estimate(values: list[float], floor: float, opts: DiagnosticOptions) -> dict[str, Any]:
    """Order q from three-point estimates log(e_{k+1}/e_k) / log(e_k/e_{k−1}) on a decreasing sequence.

    Linear convergence gives q → 1, quadratic q → 2. Pairs whose log-ratio is below
    ``min_log_ratio`` in size are skipped (0/0); the reported q is the median of the last
    ``order_window`` estimates.
    """
    estimates = []
    for a, b, c in zip(values, values[1:], values[2:], strict=False):
        if not all(math.isfinite(v) and v > floor for v in (a, b, c)):
            continue
        l1, l2 = math.log(b / a), math.log(c / b)
        if l1 > -opts.min_log_ratio or l2 > -opts.min_log_ratio:
            continue  # not decreasing in both steps: no order to read off
        estimates.append(l2 / l1)
    if not estimates:
        return {"order": None, "order_class": None, "estimates": []}
    q = statistics.median(estimates[-opts.order_window :])
    return {"order": q, "order_class": order_class(q, opts), "estimates": estimates[-8:]}


def order_class(q: float, opts: DiagnosticOptions) -> str:
    """'quadratic', 'superlinear' or 'linear' by the documented thresholds on q."""
    if q >= opts.quadratic_order:
        return "quadratic"
    if q >= opts.superlinear_order:
        return "superlinear"
    return "linear"


def rates(tr: Trace, opts: DiagnosticOptions, *, with_order: bool = True) -> dict[str, Any]:
    """Observed rates (steps and residuals), the order of convergence, and how it was measured.

    ``with_order=False`` (samples that are not converging) leaves the order out: three-point
    estimates of a cycle or a chaotic orbit are meaningless.
    """
    floor = noise_floor(tr, opts)
    step = geometric_rate(tr.steps, opts.rate_window, floor)
    res = geometric_rate(tr.residuals, opts.rate_window, floor)
    out: dict[str, Any] = {
        "step_rate": step["rate"] if step else None,
        "step_rate_median": step["median"] if step else None,
        "residual_rate": res["rate"] if res else None,
        "ratios_used": step["ratios_used"] if step else 0,
        "noise_floor": floor,
        **(
            order_estimate(tr.steps, floor, opts)
            if with_order
            else {"order": None, "order_class": None, "estimates": []}
        ),
    }
    finite = [v for v in tr.residuals if math.isfinite(v)]
    if finite and finite[0] > 0 and max(finite) > finite[0]:
        out["peak_growth"] = max(finite) / finite[0]  # transient growth before any decrease
    sr, rr = out["step_rate"], out["residual_rate"]
    if sr is not None and rr is not None and 0 < sr < 1 and 0 < rr < 1:
        # ‖g‖ ∝ ‖e‖^m near a root of multiplicity m: log(residual rate)/log(error rate) ≈ m.
        out["residual_to_step_exponent"] = math.log(rr) / math.log(sr)
    return out


# -- classification ----------------------------------------------------------------------------


def classify(tr: Trace, opts: DiagnosticOptions, max_period: int) -> dict[str, Any]:
    """The evidence-based class of one sample, with a one-line reason and the reasoning steps."""
    with np.errstate(all="ignore"):  # huge or non-finite iterates are evidence, not errors
        return _classify(tr, opts, max_period)


def _classify(tr: Trace, opts: DiagnosticOptions, max_period: int) -> dict[str, Any]:
    reasoning: list[str] = []
    r = tr.residuals
    k = tr.iterations
    rk = r[-1]
    growth = _growth(tr, opts)

    if tr.status is Status.NONFINITE:
        return _nonfinite(tr, growth, reasoning)
    if tr.status is Status.DIVERGED:
        factor = rk / max(r[0], tr.atol)
        reasoning.append(
            f"the driver stopped it: ‖g‖ = {rk:.3g} is {factor:.3g} × max(‖g(z0)‖, atol), beyond run.divergence_factor"
        )
        if growth:
            reasoning.append(
                f"over the last iterations ‖g‖ grew ×{growth['rate']:.4g} per iteration"
            )
        return _result(
            DIVERGED,
            f"residual grew by ×{factor:.3g} (beyond run.divergence_factor)"
            + (f", ×{growth['rate']:.3g} per iteration" if growth else ""),
            {"growth_factor": factor, "growth_rate": growth["rate"] if growth else None},
            reasoning,
        )
    if tr.status is Status.CONVERGED:
        reasoning.append(
            f"‖g‖ = {rk:.3g} ≤ {tr.threshold:.3g} (the run's tolerance) after {k} iterations"
        )
        return _result(
            CONVERGED, f"‖g‖ {rk:.3g} met the tolerance in {k} iterations", {}, reasoning
        )

    # MAX_ITER, TIMEOUT (or a status some future driver already refined): read the evidence.
    if k < opts.min_iterations:
        reasoning.append(
            f"only {k} iterations (< min_iterations = {opts.min_iterations}): too little evidence"
        )
        return _result(UNDETERMINED, f"only {k} iterations: too few to classify", {}, reasoning)

    if growth and growth["steady"] and growth["rate"] >= opts.growth_rate:
        factor = rk / max(r[0], tr.atol)
        z_growth = _iterate_growth(tr)
        reasoning.append(
            f"growth test: the largest ‖g‖ grew ×{growth['rate']:.4g} per iteration between the last two windows of {growth['ratios_used']} "
            f"(≥ growth_rate = {opts.growth_rate:g}); ‖g‖/max(‖g(z0)‖, atol) = {factor:.3g}"
        )
        evidence = {
            "growth_rate": growth["rate"],
            "growth_factor": factor,
            "iterate_growth": z_growth,
        }
        if factor >= opts.divergence_growth or (
            z_growth is not None and z_growth >= opts.divergence_growth
        ):
            which = "residual" if factor >= opts.divergence_growth else "iterate"
            reasoning.append(
                f"the {which} is beyond divergence_growth = {opts.divergence_growth:g} × its start: diverged"
            )
            return _result(
                DIVERGED,
                f"{which} grew ×{max(factor, z_growth or 0):.3g}, still ×{growth['rate']:.3g} per iteration",
                evidence,
                reasoning,
            )
        reasoning.append(
            f"not yet beyond divergence_growth = {opts.divergence_growth:g}: growing, not (yet) diverged"
        )
        return _result(
            GROWING, f"residual growing ×{growth['rate']:.3g} per iteration", evidence, reasoning
        )
    if growth:
        reasoning.append(
            f"growth test: the largest ‖g‖ changed ×{growth['rate']:.4g} per iteration between windows"
            + (
                f" (< growth_rate = {opts.growth_rate:g})"
                if growth["rate"] < opts.growth_rate
                else " but not steadily (no new record, or not over three windows)"
            )
            + ": not growing"
        )

    cycle = find_cycle(tr, opts, max_period, reasoning)
    if cycle is not None:
        p, amp = cycle["period"], cycle["amplitude"]
        return _result(
            OSCILLATING,
            f"period-{p} cycle with amplitude {amp:.3g}"
            + (" (sign-alternating steps)" if p == 2 else ""),
            cycle,
            reasoning,
        )

    progress = _progress(tr, opts)
    reasoning.append(progress["text"])
    rate = progress["rate"]
    earlier = progress["earlier_rate"]
    if progress["converging"]:
        more = predicted_iterations(rk, tr.threshold, rate)
        need = None if more is None else k + more
        evidence = {
            "rate": rate,
            "earlier_rate": earlier,
            "iterations_needed": need,
            "additional_iterations": more,
            "sublinear": earlier is not None and rate > earlier + 0.5 * (1 - earlier),
        }
        reasoning.append(
            f"slow test: ‖g‖ decreasing steadily at ×{rate:.6g} per iteration; reaching {tr.threshold:.3g} "
            f"from {rk:.3g} needs about {_count(need)} iterations in all"
        )
        if evidence["sublinear"]:
            reasoning.append(
                f"the rate rose from {earlier:.6g} to {rate:.6g}: convergence is slowing (sublinear); "
                "the prediction is optimistic"
            )
        tail = "the budget ran out" if tr.status is Status.MAX_ITER else "time ran out"
        return _result(
            SLOW,
            f"converging at rate {rate:.6g}, {tail}; about {_count(need)} iterations needed",
            evidence,
            reasoning,
        )
    if not progress["progress"] and (progress["settled"] or progress["stuck"]):
        why = (
            f"‖g‖ has settled at {rk:.3g} > tolerance {tr.threshold:.3g}"
            if progress["flat"]
            else ""
        )
        if progress["stuck"]:
            why += ("; " if why else "") + "the iterate stopped moving"
        return _result(STALLED, why, {k2: progress[k2] for k2 in _PROGRESS_KEYS}, reasoning)
    if _bounded(tr):
        reasoning.append(
            f"bounded (‖z‖ ≤ {float(np.max(np.linalg.norm(tr.iterates, axis=1))):.3g} over the kept "
            f"iterates), no period ≤ {max_period}, not converging: chaotic or quasi-periodic"
        )
        return _result(
            CHAOTIC,
            f"bounded, aperiodic (no period ≤ {max_period}), not converging",
            {k2: progress[k2] for k2 in _PROGRESS_KEYS},
            reasoning,
        )
    return _result(UNDETERMINED, "the evidence fits no class", {}, reasoning)


_PROGRESS_KEYS = (
    "window",
    "best_before",
    "best_recent",
    "relative_variation",
    "median_step",
    "spread",
)


def _result(
    name: str, reason: str, evidence: dict[str, Any], reasoning: list[str]
) -> dict[str, Any]:
    return {"classification": name, "reason": reason, "evidence": evidence, "reasoning": reasoning}


def _count(n: int | None) -> str:
    if n is None:
        return "unboundedly many"
    return f"{n:,}".replace(",", " ")


def predicted_iterations(current: float, target: float, rate: float) -> int | None:
    """Iterations to bring ``current`` down to ``target`` at a linear ``rate`` (None if never)."""
    if current <= target:
        return 0
    if not 0 < rate < 1 or target <= 0:
        return None
    return math.ceil(math.log(target / current) / math.log(rate))


def _growth(tr: Trace, opts: DiagnosticOptions) -> dict[str, Any] | None:
    """Per-iteration growth of the residual's running size: (M₁/M₂)^(1/W) where M₁, M₂, M₃ are the
    largest ‖g‖ in the last three windows of W = min(rate_window, k/2) iterations (newest first), on
    the finite part of the history.

    Window maxima make the rate blind to periodic residuals. ``steady`` asks for growth that a
    bounded (e.g. chaotic) orbit does not show: M₁ > M₂ (> M₃ when there are three windows) and M₁
    a new record over the whole history.
    """
    r = [v for v in tr.residuals if math.isfinite(v)]
    k = len(r) - 1
    W = min(opts.rate_window, k // 2)
    if W < 1:
        return None
    m1, m2 = max(r[k - W + 1 :]), max(r[k - 2 * W + 1 : k - W + 1])
    if m2 <= 0 or m1 <= 0:
        return None
    steady = m1 > m2 and m1 >= max(r[: k - W + 1])
    if k >= 3 * W:
        steady = steady and m2 > max(r[k - 3 * W + 1 : k - 2 * W + 1])
    return {"rate": (m1 / m2) ** (1.0 / W), "ratios_used": W, "steady": steady}


def _iterate_growth(tr: Trace) -> float | None:
    if not math.isfinite(tr.z0_norm):
        return None
    last = float(np.linalg.norm(tr.last))
    return last / max(1.0, tr.z0_norm) if math.isfinite(last) else None


def _nonfinite(tr: Trace, growth: dict[str, Any] | None, reasoning: list[str]) -> dict[str, Any]:
    z_finite = bool(np.all(np.isfinite(tr.last)))
    finite_r = [v for v in tr.residuals if math.isfinite(v)]
    last_finite = finite_r[-1] if finite_r else None
    if growth and growth["steady"] and growth["rate"] > 1:
        which = "overflow"
        text = f"the residual overflowed after growing ×{growth['rate']:.4g} per iteration" + (
            "" if z_finite else " (the iterate too)"
        )
    elif z_finite:
        which = "residual"
        text = (
            "the residual g(z) became non-finite while the iterate z is finite: "
            "the map is undefined or overflows there (e.g. log or sqrt of a negative, a division by zero)"
        )
    else:
        which = "iterate"
        text = "the iterate z itself became non-finite (inf or NaN)"
    reasoning.append(f"at iteration {tr.iterations}: {text}")
    if last_finite is not None and growth:
        reasoning.append(
            f"before that ‖g‖ was {last_finite:.3g}, changing ×{growth['rate']:.4g} per iteration"
        )
    return _result(
        NONFINITE,
        f"the {'residual' if which == 'overflow' else which} became inf/NaN at iteration {tr.iterations}"
        + (" after steady growth" if which == "overflow" else ""),
        {
            "nonfinite": which,
            "last_finite_residual": last_finite,
            "growth_rate": growth["rate"] if growth else None,
        },
        reasoning,
    )


def find_cycle(
    tr: Trace, opts: DiagnosticOptions, max_period: int, reasoning: list[str]
) -> dict[str, Any] | None:
    """The smallest period p in 2..max_period that the kept iterates repeat with, or None.

    A period-p cycle needs, over the last ``period_cycles`` periods, every return ‖z_t − z_{t−p}‖ below
    ``period_rtol`` times the amplitude (the largest distance of the last p iterates from their
    centre). A sequence converging with a sign-alternating (or rotating) error returns almost exactly
    too, but its returns shrink at nearly the rate of its amplitude: extrapolating the returns'
    geometric decay must leave at least (1 − amplitude_decay) of the amplitude.
    """
    X = tr.iterates
    if not np.all(np.isfinite(X)):
        return None
    T = X.shape[0]
    floor = opts.noise_factor * tr.eps * max(1.0, float(np.max(np.linalg.norm(X, axis=1))))
    checked = []
    for p in range(2, max_period + 1):
        if (opts.period_cycles + 1) * p > T:
            break
        checked.append(p)
        returns = np.linalg.norm(
            X[T - opts.period_cycles * p :] - X[T - (opts.period_cycles + 1) * p : T - p], axis=1
        )
        points = X[T - p :]
        centre = points.mean(axis=0)
        amplitude = float(np.max(np.linalg.norm(points - centre, axis=1)))
        if amplitude <= floor or float(np.max(returns)) > opts.period_rtol * amplitude:
            continue
        now, before = float(np.max(returns[-p:])), float(np.max(returns[-2 * p : -p]))
        if now > floor:
            decay = now / before if before > 0 else math.inf
            loss = now * decay / (1 - decay) if decay < 1 else math.inf
            if loss > opts.amplitude_decay * amplitude:
                reasoning.append(
                    f"period {p}: returns ≤ {opts.period_rtol:g}·amplitude, but they shrink ×{decay:.4g} per period "
                    f"like the amplitude itself: a converging sequence with alternating/rotating error, not a cycle"
                )
                continue
        reasoning.append(
            f"period test: z_t ≈ z_(t−{p}) over the last {opts.period_cycles} periods "
            f"(largest return {float(np.max(returns)):.3g} ≤ {opts.period_rtol:g} × amplitude {amplitude:.3g}); "
            f"no smaller period fits"
        )
        return {
            "period": p,
            "amplitude": amplitude,
            "peak_to_peak": float(max(np.linalg.norm(a - b) for a in points for b in points)),
            "max_return": float(np.max(returns)),
            "centre": centre.tolist(),
            "points": points.tolist(),
        }
    if checked:
        reasoning.append(
            f"period test: no period in {checked[0]}..{checked[-1]} repeats within {opts.period_rtol:g}·amplitude"
        )
    else:
        reasoning.append(
            f"period test skipped: {T} kept iterates are too few for period 2 "
            f"({opts.period_cycles + 1} periods needed)"
        )
    return None


def _progress(tr: Trace, opts: DiagnosticOptions) -> dict[str, Any]:
    """Evidence about progress over the last stall_window iterations.

    - ``progress``: the best ‖g‖ in the window beat the best before it by stall_decrease;
    - ``converging``: a steady decrease — the window rate (‖g_k‖/‖g_(k−W)‖)^(1/W) and the one before
      are below 1, and both the largest and the smallest ‖g‖ of consecutive windows fall (a bounded
      chaotic orbit's window extremes do not keep falling);
    - ``stuck``: the median step is below stall_step_rtol·max(1, ‖z‖);
    - ``settled``: ‖g‖ varied by at most stall_flat_rtol and the kept iterates of the window lie
      within stall_spread_rtol·max(1, ‖z‖) of their mean (a rotation keeps ‖g‖ flat but moves).
    """
    r = tr.residuals
    k = tr.iterations
    W = min(opts.stall_window, k)
    before = [v for v in r[: k - W + 1] if math.isfinite(v)]
    recent = [v for v in r[k - W + 1 :] if math.isfinite(v)]
    best_before = min(before) if before else math.inf
    best_recent = min(recent) if recent else math.inf
    progress = best_recent < (1 - opts.stall_decrease) * best_before
    window = [v for v in r[k - W :] if math.isfinite(v)]
    top = max(window) if window else math.nan
    variation = (top - min(window)) / top if window and top > 0 else math.nan
    flat = math.isfinite(variation) and variation <= opts.stall_flat_rtol
    steps = [v for v in tr.steps[-W:] if math.isfinite(v)]
    median_step = statistics.median(steps) if steps else math.nan
    stuck = math.isfinite(median_step) and median_step <= opts.stall_step_rtol * tr.scale
    X = tr.iterates[-(W + 1) :]
    spread = (
        float(np.max(np.linalg.norm(X - X.mean(axis=0), axis=1)))
        if np.all(np.isfinite(X))
        else math.inf
    )
    settled = flat and spread <= opts.stall_spread_rtol * tr.scale
    rate = _window_rate(r, k, W)
    earlier = _window_rate(r, k - W, W) if k - W >= W else None
    envelope = _envelope_falls(r, k, min(opts.stall_window, k // 2))
    converging = rate is not None and rate < 1 and (earlier is None or earlier < 1) and envelope
    if converging:
        text = (
            f"progress test: ‖g‖ falls steadily (×{rate:.6g} per iteration over the last {W}; the largest "
            "and smallest ‖g‖ of consecutive windows both fall)"
        )
    elif progress:
        text = (
            f"progress test: best ‖g‖ in the last {W} iterations {best_recent:.3g} < "
            f"(1 − {opts.stall_decrease:g}) × best before {best_before:.3g}, but not a steady decrease"
        )
    else:
        text = (
            f"progress test: no progress over the last {W} iterations (best {best_recent:.3g} vs "
            f"{best_before:.3g} before); ‖g‖ varied by {variation:.3g} (flat if ≤ {opts.stall_flat_rtol:g}); "
            f"median step {median_step:.3g} (stuck if ≤ {opts.stall_step_rtol:g}·max(1, ‖z‖)); "
            f"iterates within {spread:.3g} of their mean (settled if ≤ {opts.stall_spread_rtol:g}·max(1, ‖z‖))"
        )
    return {
        "progress": progress,
        "converging": converging,
        "flat": flat,
        "stuck": stuck,
        "settled": settled,
        "window": W,
        "best_before": best_before,
        "best_recent": best_recent,
        "relative_variation": variation,
        "median_step": median_step,
        "spread": spread,
        "rate": rate,
        "earlier_rate": earlier,
        "text": text,
    }


def _envelope_falls(r: list[float], k: int, W: int) -> bool:
    """Largest and smallest ‖g‖ of the last three (or two) windows of W iterations both strictly fall."""
    if W < 2:
        return True  # too short to see an envelope: the window rates alone decide
    count = 3 if k + 1 >= 3 * W else 2
    windows = [r[k + 1 - (i + 1) * W : k + 1 - i * W] for i in range(count)]  # newest first
    if any(not all(math.isfinite(v) for v in w) for w in windows):
        return False
    tops = [max(w) for w in windows]
    lows = [min(w) for w in windows]
    return all(tops[i] < tops[i + 1] and lows[i] < lows[i + 1] for i in range(count - 1))


def _window_rate(r: list[float], end: int, W: int) -> float | None:
    """(r_end / r_{end−W})^{1/W}: the mean linear rate over a window of the residual history."""
    if W <= 0 or end - W < 0:
        return None
    a, b = r[end - W], r[end]
    if not (math.isfinite(a) and math.isfinite(b)) or a <= 0 or b <= 0:
        return None
    return (b / a) ** (1.0 / W)


def _bounded(tr: Trace) -> bool:
    return bool(np.all(np.isfinite(tr.iterates)))
