"""Trajectory classification per sample: converged (with rate and order), diverged (the residual,
or the iterates escaping while ‖g‖ stays bounded), growing, precision floor, oscillating with
period p, slow, stalled (no progress, or ‖g‖ levelling off at a nonzero value), chaotic — from the
residual and step histories and the kept iterates.

Pure arithmetic on the recorded history (numpy on a few dozen iterates); no evaluations of the map.
Every threshold comes from ``DiagnosticOptions`` and is documented in docs/diagnostics.md.
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from dataclasses import dataclass, field
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
PRECISION_FLOOR = "precision_floor"
TIMEOUT = "timeout"
UNDETERMINED = "undetermined"

# The Status a driver MAX_ITER/TIMEOUT sample is refined to, per classification (others keep theirs).
# At the precision floor no further iteration can help, which is what "stalled" says.
REFINED_STATUS = {
    OSCILLATING: Status.OSCILLATING,
    STALLED: Status.STALLED,
    DIVERGED: Status.DIVERGED,
    PRECISION_FLOOR: Status.STALLED,
}

# What theory says about each solver family's local convergence, matched by substring of the name
# (first match wins). ``None`` for the rate means "no closed-form prediction".
THEORY: list[tuple[str, str, str]] = [
    ("krylov", "superlinear", "inexact Newton (Krylov) converges superlinearly near a simple root"),
    ("broyden", "superlinear", "Broyden's method converges superlinearly near a simple root"),
    ("hybr", "superlinear", "Powell's hybrid method converges superlinearly near a simple root"),
    ("trust", "quadratic", "trust-region Newton converges quadratically near a simple root"),
    (
        "scipy:lm",
        "quadratic",
        "Levenberg–Marquardt with exact Jacobians converges quadratically near a simple zero-residual root",
    ),
    (
        "levenberg",
        "quadratic",
        "Levenberg–Marquardt with exact Jacobians converges quadratically near a simple zero-residual root",
    ),
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


def exact_jacobian_steps(solver: str, options: dict[str, Any]) -> bool:
    """True when every step solves with the exact J_g at the current iterate (Newton's theory holds).

    Quasi-Newton models (Broyden updates, secant methods, MINPACK's hybrid), inexact Krylov solves
    and solvers this table does not know are False: their linear convergence says nothing about the
    root's multiplicity.
    """
    name = solver.lower()
    if "broyden" in name or "krylov" in name or "hybr" in name or "anderson" in name:
        return False
    if options.get("update", "exact") != "exact":  # a trust region on a Broyden-updated model
        return False
    known = theory_for(solver)
    return known is not None and known[0] == "quadratic"


def near_one(x: float) -> str:
    """Rates and radii: 3 significant digits, or 6 within 1% of 1 (where 0.9999 ≠ 1 matters)."""
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return str(x)
    if abs(x) < 1e-12:
        return "0"  # a rate at rounding level: exact convergence in one step
    return f"{x:.6g}" if abs(x - 1) < 0.01 else f"{x:.3g}"


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
    rows: list[int] = field(default_factory=list)  # iteration number of each residual entry
    f0_norm: float = math.nan  # ‖f(z0)‖

    @property
    def problem_scale(self) -> float:
        """max(1, ‖z0‖, ‖f(z0)‖): the problem's own scale, fixed by its start (not by where the
        iterates wandered), for scale-aware tests of points and residuals."""
        return max(1.0, *(v for v in (self.z0_norm, self.f0_norm) if math.isfinite(v)))

    @property
    def last(self) -> np.ndarray:
        """The final iterate."""
        return self.iterates[-1]

    @property
    def scale(self) -> float:
        """max(1, ‖z_k‖): the scale that relative tests use."""
        norm = float(safe_norms(self.last[None])[0])
        return max(1.0, norm) if math.isfinite(norm) else 1.0


def safe_norms(X: np.ndarray) -> np.ndarray:
    """Row norms without overflow: ‖x‖ = m·‖x/m‖ with m = max|xᵢ| (‖(1e200, 1e200)‖ is finite)."""
    m = np.max(np.abs(X), axis=1)
    safe = np.where(m > 0, m, 1.0)
    with np.errstate(invalid="ignore"):
        return np.where(m > 0, safe * np.linalg.norm(X / safe[:, None], axis=1), 0.0)


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
        rows, residuals, steps = result.sample_history(b)
        r0 = result.residual_history[0][b]
        rel0 = result.relative_history[0][b] if result.relative_history else math.nan
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
                rows=rows,
                f0_norm=r0 / rel0 if rel0 and math.isfinite(rel0) and rel0 > 0 else math.nan,
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
                f"over the last iterations ‖g‖ grew ×{near_one(growth['rate'])} per iteration"
            )
        return _result(
            DIVERGED,
            f"residual grew by ×{factor:.3g} (beyond run.divergence_factor)"
            + (f", ×{near_one(growth['rate'])} per iteration" if growth else ""),
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

    # MAX_ITER, TIMEOUT, STALLED (a solver that gave up): read the evidence.
    overflow = _iterate_overflow(tr, reasoning)
    if overflow is not None:
        return overflow
    # A solver that stopped because none of its steps lowers ‖g‖, after ‖g‖ only ever fell, says
    # what happened however few its iterations (Newton lands on the minimum of z² + 1 in one).
    gave_up = tr.status is Status.STALLED and _never_rose(tr)
    if k < opts.min_iterations and not gave_up:
        reasoning.append(
            f"only {k} iterations (< min_iterations = {opts.min_iterations}): too little evidence"
        )
        return _result(UNDETERMINED, f"only {k} iterations: too few to classify", {}, reasoning)

    progress = _progress(tr, opts)
    if growth and growth["steady"] and growth["rate"] >= opts.growth_rate:
        return _growing(tr, opts, growth, reasoning)
    if growth:
        reasoning.append(
            f"growth test: the largest ‖g‖ changed ×{near_one(growth['rate'])} per iteration between windows"
            + (
                f" (< growth_rate = {opts.growth_rate:g})"
                if growth["rate"] < opts.growth_rate
                else " but not steadily (the largest and smallest ‖g‖ do not both rise in proportion, "
                "with a record in each window, over three windows and half the run, or ‖g‖ is below its start)"
            )
            + ": not growing"
        )

    escape = _escape(tr, opts, progress, reasoning)
    if escape is not None:
        return escape
    # After the escape test: the floor is ε at the iterate's scale, meaningless for an iterate
    # that ran off to infinity.
    floor = _precision_floor(tr, opts, progress, reasoning)
    if floor is not None:
        return floor

    cycle = find_cycle(tr, opts, max_period, reasoning)
    if cycle is not None and progress["settled"]:
        # A "cycle" inside the stall band (‖g‖ flat, iterates within stall_spread_rtol of their
        # mean) is a solver dithering at a nonzero minimum by rounding-sized steps: a stall.
        reasoning.append(
            f"the period-{cycle['period']} pattern has amplitude {cycle['amplitude']:.3g} ≤ "
            f"stall_spread_rtol·max(1, ‖z‖) with ‖g‖ flat: dithering in place, not a cycle"
        )
        cycle = None
    if cycle is not None:
        p, amp = cycle["period"], cycle["amplitude"]
        return _result(
            OSCILLATING,
            f"period-{p} cycle with amplitude {amp:.3g}"
            + (" (sign-alternating steps)" if p == 2 else ""),
            cycle,
            reasoning,
        )

    reasoning.append(progress["text"])
    evidence = {k2: progress[k2] for k2 in _PROGRESS_KEYS}
    if progress["levels_off"]:
        return _result(
            STALLED,
            f"‖g‖ levels off at ≈ {progress['level']:.3g}, above the tolerance {tr.threshold:.3g}: "
            "stalled at a nonzero level",
            {**evidence, "nonzero_level": True},
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
        return _result(STALLED, why, {**evidence, "nonzero_level": progress["flat"]}, reasoning)
    if progress["converging"]:
        return _slow(tr, progress, reasoning)
    if progress["hovering"]:
        evidence["hovering"] = True  # a nonzero minimum of ‖g‖, if the Jacobian confirms one
    if gave_up:
        # A descent method (a trust region, a line search) that gave up after ‖g‖ only ever fell:
        # it reached the bottom of what it could find, however unevenly it got there. Not chaos.
        reasoning.append(
            f"‖g‖ never rose over the run, from {r[0]:.3g} to {rk:.3g}, and the solver stopped: "
            "its steps could no longer reduce ‖g‖"
        )
        return _result(
            STALLED,
            f"‖g‖ fell to {rk:.3g} > tolerance {tr.threshold:.3g} and no step reduces it further: "
            "stalled at a nonzero level",
            {**evidence, "nonzero_level": True, "monotone": True},
            reasoning,
        )
    if _bounded(tr):
        reasoning.append(
            f"bounded: ‖z‖ ≤ {float(np.max(np.linalg.norm(tr.iterates, axis=1))):.3g} over the kept "
            f"iterates and ‖g‖ shows no steady growth; no period ≤ {max_period}, not converging: "
            "chaotic or quasi-periodic"
        )
        return _result(
            CHAOTIC,
            f"bounded, aperiodic (no period ≤ {max_period}), not converging",
            evidence,
            reasoning,
        )
    return _result(UNDETERMINED, "the evidence fits no class", {}, reasoning)


_PROGRESS_KEYS = (
    "window",
    "best_before",
    "best_recent",
    "relative_variation",
    "median_step",
    "relative_step",
    "spread",
    "level",
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


def _slow(tr: Trace, progress: dict[str, Any], reasoning: list[str]) -> dict[str, Any]:
    rk, k = tr.residuals[-1], tr.iterations
    rate, earlier = progress["rate"], progress["earlier_rate"]
    more = predicted_iterations(rk, tr.threshold, rate)
    need = None if more is None else k + more
    # Sublinear: over [k/4, k/2] and [k/2, k] a geometric decay keeps its per-iteration rate, a
    # power law t^(−p) halves log(rate) (twice the iterations for the same factor 2^(−p)).
    pairs = _finite_pairs(tr)
    early, late = _rate_between(pairs, k / 4, k / 2), _rate_between(pairs, k / 2, k)
    sublinear = (
        early is not None
        and late is not None
        and 0 < early < 1
        and 0 < late < 1
        and math.log(late) / math.log(early) <= 0.75
    )
    evidence = {
        "rate": rate,
        "earlier_rate": earlier,
        "early_rate": early,
        "late_rate": late,
        "iterations_needed": need,
        "additional_iterations": more,
        "sublinear": sublinear,
        "level": progress["level"],
    }
    reasoning.append(
        f"slow test: ‖g‖ decreasing steadily at ×{rate:.6g} per iteration towards 0 (it does not level "
        f"off); reaching {tr.threshold:.3g} from {rk:.3g} needs about {_count(need)} iterations in all"
    )
    if sublinear:
        reasoning.append(
            f"the rate per iteration rose from {early:.6g} over iterations k/4..k/2 to {late:.6g} over k/2..k: "
            "convergence is slowing (sublinear, like a power of t); the prediction is optimistic"
        )
    budget = "the budget ran out" if tr.status is Status.MAX_ITER else "the run stopped"
    if tr.status is Status.TIMEOUT:
        budget = "time ran out"
    return _result(
        SLOW,
        f"converging at rate {rate:.6g}, {budget}; about {_count(need)} iterations needed",
        evidence,
        reasoning,
    )


def _growing(
    tr: Trace, opts: DiagnosticOptions, growth: dict[str, Any], reasoning: list[str]
) -> dict[str, Any]:
    """Steady growth of ‖g‖: diverged once far beyond the start, growing before that."""
    r = tr.residuals
    rk = r[-1]
    factor = rk / max(r[0], tr.atol)
    z_growth = _iterate_growth(tr)
    reasoning.append(
        f"growth test: over the last {growth['rising_windows']} windows of {growth['ratios_used']} iterations the "
        f"largest and the smallest ‖g‖ both rose in proportion, each largest a record; ×{near_one(growth['rate'])} per iteration "
        f"(≥ growth_rate = {opts.growth_rate:g}); ‖g‖/max(‖g(z0)‖, atol) = {factor:.3g}"
    )
    evidence = {"growth_rate": growth["rate"], "growth_factor": factor, "iterate_growth": z_growth}
    if factor >= opts.divergence_growth or (
        z_growth is not None and z_growth >= opts.divergence_growth
    ):
        which = "residual" if factor >= opts.divergence_growth else "iterate"
        reasoning.append(
            f"the {which} is beyond divergence_growth = {opts.divergence_growth:g} × its start: diverged"
        )
        return _result(
            DIVERGED,
            f"{which} grew ×{max(factor, z_growth or 0):.3g}, still ×{near_one(growth['rate'])} per iteration",
            evidence,
            reasoning,
        )
    reasoning.append(
        f"not yet beyond divergence_growth = {opts.divergence_growth:g}: growing, not (yet) diverged"
    )
    return _result(
        GROWING,
        f"residual growing ×{near_one(growth['rate'])} per iteration (×{factor:.3g} so far)",
        evidence,
        reasoning,
    )


def _growth(tr: Trace, opts: DiagnosticOptions) -> dict[str, Any] | None:
    """Per-iteration growth of the residual's running size: (M₁/M₂)^(1/W) where M₁, M₂, … are the
    largest ‖g‖ in consecutive windows of W = min(rate_window, k/3) iterations, newest first, on the
    finite part of the history.

    Window maxima make the rate blind to periodic residuals. ``steady`` asks for growth that a
    bounded (chaotic, quasi-periodic) orbit does not show: the largest *and* the smallest ‖g‖ rise
    from window to window over at least three windows and over the newest half of the run, by
    factors whose logarithms agree within a factor 3 (growth scales the whole oscillation), each newer window's maximum a record over everything before it, and ‖g‖ above
    its start. (A bounded orbit's window extremes can rise for a few windows by chance, but not
    with a record in each, not in proportion, and never for half of a long run.)
    """
    pairs = _finite_pairs(tr)
    if len(pairs) < 4:
        return None
    first, k = pairs[0][0], pairs[-1][0]
    W = min(opts.rate_window, (k - first) // 3)
    if W < 1:
        return None
    windows = []  # newest first, by iteration number (a long run's thinned middle has fewer rows)
    for i in range((k - first) // W):
        w = _between(pairs, k - (i + 1) * W, k - i * W)
        if not w:
            break
        windows.append(w)
    count = len(windows)
    if count < 2:
        return None
    tops = [max(w) for w in windows]
    lows = [min(w) for w in windows]
    if tops[1] <= 0 or tops[0] <= 0:
        return None
    # Running maxima of everything before each window: a growing sequence sets a record in each.
    before = [
        max((v for t, v in pairs if t <= k - (i + 1) * W), default=-math.inf) for i in range(count)
    ]
    rising = 0
    while (
        rising + 1 < count
        and tops[rising] > before[rising]
        and tops[rising] > tops[rising + 1]
        and lows[rising] > lows[rising + 1]
    ):
        rising += 1
    r = [v for _, v in pairs]
    # Growth scales the whole oscillation: the smallest ‖g‖ per window grows like the largest.
    # A bounded orbit whose minima climb from rounding level (0.001 → 0.07) while its maxima
    # creep (0.64 → 0.68) is not growing.
    rate = (tops[0] / tops[1]) ** (1.0 / W)
    steady = (
        rising + 1 >= max(3, (count + 1) // 2)
        and proportional(tops[0], tops[rising], lows[0], lows[rising])
        # ‖g‖ is above its start by at least what the rate gives over half the rising windows.
        and r[-1] >= max(r[0], tr.atol) * rate ** (rising * W / 2)
    )
    return {
        "rate": rate,
        "ratios_used": W,
        "rising_windows": rising + 1,
        "steady": steady,
    }


def _finite_pairs(tr: Trace) -> list[tuple[int, float]]:
    """(iteration, ‖g‖) for every recorded row with a finite residual."""
    return [(t, v) for t, v in zip(tr.rows, tr.residuals, strict=False) if math.isfinite(v)]


def _between(pairs: list[tuple[int, float]], lo: float, hi: float) -> list[float]:
    """The values recorded at iterations t with lo < t ≤ hi."""
    return [v for t, v in pairs if lo < t <= hi]


def _at(pairs: list[tuple[int, float]], t: float) -> tuple[int, float] | None:
    """The last recorded (iteration, value) at or before iteration t."""
    i = bisect.bisect_right([p[0] for p in pairs], t) - 1
    return pairs[i] if i >= 0 else None


def _rate_between(pairs: list[tuple[int, float]], lo: float, hi: float) -> float | None:
    """(‖g‖ at hi / ‖g‖ at lo)^(1/iterations between them): the mean linear rate over [lo, hi]."""
    a, b = _at(pairs, lo), _at(pairs, hi)
    if a is None or b is None or b[0] <= a[0] or a[1] <= 0 or b[1] <= 0:
        return None
    return (b[1] / a[1]) ** (1.0 / (b[0] - a[0]))


def _iterate_growth(tr: Trace) -> float | None:
    if not math.isfinite(tr.z0_norm):
        return None
    last = float(np.linalg.norm(tr.last))
    return last / max(1.0, tr.z0_norm) if math.isfinite(last) else None


def _iterate_overflow(tr: Trace, reasoning: list[str]) -> dict[str, Any] | None:
    """The iterate overflowed (inf/NaN) while ‖g‖ stayed finite: a saturating residual (arctan,
    sigmoid, tanh) lets the driver's residual checks pass while z runs off to infinity."""
    rk = tr.residuals[-1]
    if bool(np.all(np.isfinite(tr.last))) or not math.isfinite(rk):
        return None
    finite = [v for v in tr.residuals if math.isfinite(v)]
    top = max(finite, default=rk)
    reasoning.append(
        f"at iteration {tr.iterations} the iterate is not finite while ‖g‖ = {rk:.3g} is (‖g‖ ≤ {top:.3g} "
        "throughout): the residual saturates while z runs off to infinity"
    )
    return _result(
        DIVERGED,
        f"the iterates escaped to infinity (z overflowed) while ‖g‖ stayed bounded (≤ {top:.3g})",
        {"escaping": True, "iterate_norm": math.inf, "residual_max": top, "residual_last": rk},
        reasoning,
    )


def _escape(
    tr: Trace, opts: DiagnosticOptions, progress: dict[str, Any], reasoning: list[str]
) -> dict[str, Any] | None:
    """Iterates running off to infinity while ‖g‖ stays bounded (it does not head to zero).

    Evidence: ‖z‖ has reached escape_growth × the problem's scale S = max(1, ‖z0‖, ‖f(z0)‖) and
    either rises steadily over the kept iterates (the mean norm of each third of them rises, every
    norm of the last third exceeds every norm of the first, the newest is the largest) or lies
    beyond S/ε, numerically at infinity; meanwhile ‖g‖ is not falling steadily towards zero (it
    levels off, or makes no steady progress) and, over the kept iterates, its largest value in
    the newest third is at most twice that of the oldest third (‖g‖ bounded; a growing ‖g‖ is the
    growth test's). A slow convergence towards a distant fixed point has ‖g‖ falling steadily
    towards zero instead.
    """
    X = tr.iterates
    T = X.shape[0]
    if T < 6 or not bool(np.all(np.isfinite(X))):
        return None
    if progress["converging"] and not progress["levels_off"]:
        return None  # ‖g‖ heads to zero: a slow approach, not an escape
    norms = safe_norms(X)
    third = T // 3
    first, middle, last = norms[:third], norms[third : T - third], norms[T - third :]
    coherent = (
        float(first.max()) < float(last.min())
        and float(first.mean()) < float(middle.mean()) < float(last.mean())
        and float(norms[-1]) >= float(norms.max())
    )
    # ‖g‖ bounded over the kept window: it did not grow with the iterates.
    kept_r = np.asarray(tr.residuals[-T:], dtype=float)
    if not np.all(np.isfinite(kept_r)) or kept_r[-third:].max() > 2 * kept_r[:third].max():
        return None
    growth = float(norms[-1]) / tr.problem_scale
    # Beyond S/ε a step of the problem's own size no longer changes z: numerically at infinity
    # (a saturated residual's Jacobian underflows there and the iterate stops moving).
    at_infinity = growth >= 1.0 / tr.eps
    if not (coherent or at_infinity) or growth < opts.escape_growth:
        return None
    finite = [v for v in tr.residuals if math.isfinite(v)]
    low, top = min(finite), max(finite)
    steps = [v for v in tr.steps[-(T - 1) :] if math.isfinite(v)]
    speed = statistics.median(steps) if steps else math.nan
    how = (
        f"rose steadily over the last {T} kept iterates"
        if coherent
        else f"reached a point beyond S/ε = {tr.problem_scale / tr.eps:.3g}, where a step of the problem's own "
        "size no longer changes z,"
    )
    reasoning.append(
        f"escape test: ‖z‖ {how} to {norms[-1]:.3g} = {growth:.3g} × the problem's scale S = max(1, ‖z0‖, "
        f"‖f(z0)‖) = {tr.problem_scale:.3g} (≥ escape_growth = {opts.escape_growth:g}), median step {speed:.3g}, "
        f"while ‖g‖ stayed within [{low:.3g}, {top:.3g}] and does not head to zero: the iterates run off to infinity"
    )
    return _result(
        DIVERGED,
        f"the iterates escape to infinity (‖z‖ {norms[-1]:.3g}, ×{growth:.3g} the problem's scale) while ‖g‖ "
        f"stays bounded in [{low:.3g}, {top:.3g}]",
        {
            "escaping": True,
            "iterate_norm": float(norms[-1]),
            "iterate_growth": growth,
            "problem_scale": tr.problem_scale,
            "median_step": speed,
            "residual_min": low,
            "residual_max": top,
            "level": progress["level"],
        },
        reasoning,
    )


DTYPE_BY_EPS = {2.220446049250313e-16: "float64", 1.1920928955078125e-07: "float32"}


def dtype_name(eps: float) -> str:
    """float64/float32 from the machine epsilon (other dtypes by their ε)."""
    return DTYPE_BY_EPS.get(eps, f"a dtype with ε = {eps:.3g}")


def _precision_floor(
    tr: Trace, opts: DiagnosticOptions, progress: dict[str, Any], reasoning: list[str]
) -> dict[str, Any] | None:
    """The tolerance lies below what the dtype can resolve at the iterate's scale, and ‖g‖ has
    reached that floor: rounding, not a missing fixed point, stops the run.

    The floor is the noise floor noise_factor·ε·max(1, ‖z‖) (evaluating g = z − f(z) at ‖z‖ loses
    about ε‖z‖ to rounding, more through f). It applies when the tolerance is below it, the best
    ‖g‖ of the last stall_window iterations is at or below it, and ‖g‖ is not falling steadily
    towards zero (it levels off, or makes no steady progress).
    """
    floor = noise_floor(tr, opts)
    best = progress["best_recent"]
    heading_to_zero = progress["converging"] and not progress["levels_off"]
    if not (tr.threshold < floor and best <= floor) or heading_to_zero:
        return None
    r = [v for v in tr.residuals if math.isfinite(v)]
    recent = r[-progress["window"] :]
    # A tolerance the run met: twice the typical recent ‖g‖, rounded up to one significant figure.
    reachable = _round_up(2.0 * statistics.median(recent))
    first = next((t for t, v in zip(tr.rows, tr.residuals, strict=False) if v <= reachable), None)
    name = dtype_name(tr.eps)
    scale = tr.scale
    reasoning.append(
        f"precision test: the tolerance {tr.threshold:.3g} is below the noise floor noise_factor·ε·max(1, ‖z‖) = "
        f"{opts.noise_factor:g}·{tr.eps:.3g}·{scale:.3g} = {floor:.3g} of {name} at this scale, and ‖g‖ reached "
        f"it (best {best:.3g} in the last {progress['window']} iterations) without falling further steadily"
    )
    evidence = {
        "floor": floor,
        "eps": tr.eps,
        "dtype": name,
        "scale": scale,
        "best_residual": best,
        "threshold": tr.threshold,
        "reachable_tolerance": reachable,
        "reached_at": first,
        "float64_floor": opts.noise_factor * float(np.finfo(np.float64).eps) * scale,
    }
    evidence["resolution"] = tr.eps * scale
    return _result(
        PRECISION_FLOOR,
        f"precision floor reached: {name} resolves z only to about ε‖z‖ = {tr.eps * scale:.3g} at ‖z‖ ≈ "
        f"{scale:.3g}; ‖g‖ stays near {statistics.median(recent):.3g}, above the tolerance {tr.threshold:.3g}",
        evidence,
        reasoning,
    )


def _round_up(x: float) -> float:
    """x rounded up to one significant figure (6.1e-4 → 7e-4)."""
    if not x > 0 or not math.isfinite(x):
        return x
    exp = math.floor(math.log10(x))
    return math.ceil(x / 10**exp) * 10**exp


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
      within stall_spread_rtol·max(1, ‖z‖) of their mean (a rotation keeps ‖g‖ flat but moves);
    - ``level``: where ‖g‖ is heading, by Aitken's Δ² extrapolation of ‖g‖ at iterations k/4, k/2
      and k (log-spaced, so a power-law decay towards zero extrapolates to about zero, while a
      decay towards a nonzero value extrapolates to that value); ``levels_off`` when it is at least
      level_fraction × ‖g_k‖ (or ‖g‖ has settled): ‖g‖ is not heading to zero.

    Positions count from the end of the history: a long run's thinned middle has fewer rows
    than iterations, while the recent window is always exact.
    """
    r = tr.residuals
    pairs = _finite_pairs(tr)
    k = tr.rows[-1] if tr.rows else tr.iterations
    W = min(opts.stall_window, k)
    before = [v for t, v in pairs if t <= k - W]
    recent = _between(pairs, k - W, k)
    best_before = min(before) if before else math.inf
    best_recent = min(recent) if recent else math.inf
    progress = best_recent < (1 - opts.stall_decrease) * best_before
    window = _between(pairs, k - W - 1, k)  # the W + 1 values that span W iterations
    top = max(window) if window else math.nan
    variation = (top - min(window)) / top if window and top > 0 else math.nan
    flat = math.isfinite(variation) and variation <= opts.stall_flat_rtol
    step_pairs = zip(tr.rows[1:], tr.steps, strict=False)
    steps = [v for t, v in step_pairs if t > k - W and math.isfinite(v)]
    median_step = statistics.median(steps) if steps else math.nan
    stuck = math.isfinite(median_step) and median_step <= opts.stall_step_rtol * tr.scale
    X = tr.iterates[-(W + 1) :]
    spread = (
        float(np.max(np.linalg.norm(X - X.mean(axis=0), axis=1)))
        if np.all(np.isfinite(X))
        else math.inf
    )
    settled = flat and spread <= opts.stall_spread_rtol * tr.scale
    # No progress while ‖g‖ stays in a narrow band: a solver circling a minimum of ‖g‖ (or a
    # rotation, whose ‖g‖ is flat too — the diagnostics tell them apart at the Jacobian).
    hovering = (
        not progress
        and math.isfinite(variation)
        and variation <= opts.stall_band
        and best_recent > tr.threshold
    )
    rate = _rate_between(pairs, k - W, k) if math.isfinite(r[-1]) else None
    earlier = _rate_between(pairs, k - 2 * W, k - W) if k - W >= W else None
    envelope = _envelope_falls(pairs, k, min(opts.stall_window, k // 3))
    converging = rate is not None and rate < 1 and (earlier is None or earlier < 1) and envelope
    rk = r[-1]
    # A solver that stopped because no step of its lowers ‖g‖ (a line search that fails at the
    # same point every time, a collapsed trust region) leaves ‖g‖ at ‖g_k‖, however steadily it
    # was falling before (Newton near a precision floor falls fast, then not at all).
    level = rk if tr.status is Status.STALLED and math.isfinite(rk) else _level(tr, opts)
    levels_off = (
        math.isfinite(rk)
        and rk > tr.threshold
        and (settled or (converging and level is not None and level >= opts.level_fraction * rk))
    )
    if settled and level is None:
        level = rk  # settled: ‖g‖ is where it stays
    if levels_off:
        text = (
            f"level test: ‖g‖ is heading to ≈ {level:.3g}, not to zero "
            f"(Aitken's Δ² on ‖g‖ at iterations k/4, k/2, k = {tr.iterations}"
            + (f"; ‖g‖ varied by {variation:.3g} over the last {W}" if flat else "")
            + f"); median step {median_step:.3g} = {median_step / tr.scale:.3g} × max(1, ‖z‖)"
        )
    elif converging:
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
        "levels_off": levels_off,
        "hovering": hovering,
        "level": level,
        "window": W,
        "best_before": best_before,
        "best_recent": best_recent,
        "relative_variation": variation,
        "median_step": median_step,
        "relative_step": median_step / tr.scale if math.isfinite(median_step) else math.nan,
        "spread": spread,
        "rate": rate,
        "earlier_rate": earlier,
        "text": text,
    }


def _level(tr: Trace, opts: DiagnosticOptions) -> float | None:
    """Aitken's Δ² limit of ‖g‖ from its values at iterations ≈ k/4, k/2, k; None when ‖g‖ is not
    decreasing and decelerating there (no limit to extrapolate)."""
    rows, r = tr.rows, tr.residuals
    k = rows[-1] if rows else 0
    if k < 8 or len(rows) != len(r):
        return None

    def at(t: int) -> float:
        return r[min(bisect.bisect_left(rows, t), len(r) - 1)]

    a, b, c = at(k // 4), at(k // 2), r[-1]
    if not all(math.isfinite(v) and v > 0 for v in (a, b, c)):
        return None
    d1, d2 = b - a, c - b
    if not (d1 < 0 and d2 < 0) or a - c <= opts.stall_flat_rtol * a:
        return None  # not a real decrease over the run
    q = d2 / d1
    if not 0 < q < 1:
        return None  # the decrease is not slowing down (geometric decay towards zero, say)
    return c + d2 * q / (1 - q)


def _envelope_falls(pairs: list[tuple[int, float]], k: int, W: int) -> bool:
    """Largest and smallest ‖g‖ of the last three (or two) windows of W iterations both strictly
    fall, in proportion (a chaotic orbit's window minima can fall to near zero by chance while its
    maxima barely move; a converging sequence scales down as a whole)."""
    if W < 2:
        return True  # too short to see an envelope: the window rates alone decide
    count = 3 if k + 1 >= 3 * W else 2
    windows = [_between(pairs, k - (i + 1) * W, k - i * W) for i in range(count)]  # newest first
    if any(not w for w in windows):
        return False
    tops = [max(w) for w in windows]
    lows = [min(w) for w in windows]
    falling = all(tops[i] < tops[i + 1] and lows[i] < lows[i + 1] for i in range(count - 1))
    return falling and proportional(tops[-1], tops[0], lows[-1], lows[0])


def proportional(top_new: float, top_old: float, low_new: float, low_old: float) -> bool:
    """The window maxima and minima changed by factors whose logarithms agree within a factor 3:
    the whole sequence scaled (growth or decay, geometric or polynomial), rather than a bounded
    orbit whose extremes drift independently. Each pair is (newer, older) for growth, (older,
    newer) for decay."""
    if min(top_new, top_old, low_new, low_old) <= 0:
        return False
    a, b = math.log(top_new / top_old), math.log(low_new / low_old)
    return a > 0 and b > 0 and min(a, b) >= max(a, b) / 3


def _never_rose(tr: Trace) -> bool:
    """‖g‖ did not increase from one kept row to the next (beyond rounding)."""
    r = np.asarray(tr.residuals, dtype=float)
    return bool(np.all(np.isfinite(r)) and np.all(r[1:] <= r[:-1] * (1 + 4 * tr.eps)))


def _bounded(tr: Trace) -> bool:
    return bool(np.all(np.isfinite(tr.iterates)))
