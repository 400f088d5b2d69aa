"""Convergence diagnostics: what happened in a solve, why, and what to do about it.

``analyse(problem, result)`` reads the result's histories and kept iterates, and probes the map
(uncounted, through ``raw_f``/``raw_g``) for its Jacobian at the solution or at the fixed point an
unsuccessful run missed. It returns a JSON-ready dict: top-level ``settings`` and ``certificate`` and,
under ``samples``, one diagnosis per sample (classification with evidence, rates and order, spectrum,
Banach bounds, conditioning, remedies). ``attach`` stores it on the result and refines the driver's
per-sample status with the evidence. ``precheck(problem)`` estimates the Lipschitz constant around z0
before solving. docs/diagnostics.md documents every field, formula and limit.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

from deqcli.diagnostics.settings import DEFAULT_OPTIONS, DiagnosticOptions

if TYPE_CHECKING:
    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult
    from deqcli.solvers.base import Solver

__all__ = ["DEFAULT_OPTIONS", "DiagnosticOptions", "analyse", "attach", "precheck"]

# Located fixed points and cycle points are listed in the JSON up to this dimension.
POINT_SHOWN_DIM = 8
# Where the analysis looks when a sample stopped at its dtype's precision floor.
AT_FLOOR = "last iterate (at the precision floor)"
# Points whose distance to the root z* the forward-error estimate bounds.
ERROR_POINTS = ("solution", AT_FLOOR)
# The points analysed that are fixed points: only there does ρ(J) < 1 mean local attraction.
FIXED_POINTS = ("solution", "located fixed point", AT_FLOOR)


def precheck(
    problem: Problem, options: DiagnosticOptions | None = None, *, solver: Solver | None = None
) -> dict[str, Any]:
    """Before solving: the structural certificate, secant estimates of L near z0, and J at z0.

    Evaluates the map uncounted; the solve's counts are unaffected. With the fixed_point ``solver``
    its damping β enters the predicted rate ρ(I − βJ_g) at z0.
    """
    import torch

    from deqcli.diagnostics import lipschitz, spectral

    opts = options or DEFAULT_OPTIONS
    beta = solver_beta(solver.name, solver.options()) if solver is not None else None
    secants = lipschitz.secant_estimate(problem, opts)
    with torch.no_grad():
        at_start = spectral.analyse_points(problem, problem.z0, opts, beta=beta)
    for s in at_start:
        s["point"] = "start z0"
    return json_safe(
        {
            "certificate": lipschitz.certificate(problem, beta),
            "label": "estimates around the start z0, made before solving",
            "samples": [
                {"secant": sec, "jacobian_at_start": st}
                for sec, st in zip(secants, at_start, strict=True)
            ],
        }
    )


def solver_beta(name: str, options: dict[str, Any]) -> float | None:
    """The damping β of (damped) plain iteration, None for other solvers."""
    if "fixed_point" not in name:
        return None
    return float(options.get("beta", 1.0))


def attach(
    problem: Problem,
    result: SolveResult,
    options: DiagnosticOptions | None = None,
    *,
    pre: dict[str, Any] | None = None,
    analyse_result: bool = True,
) -> SolveResult:
    """Run the diagnostics, store them on ``result.diagnostics`` and refine ``result.sample_status``.

    A MAX_ITER or TIMEOUT sample the evidence shows oscillating, stalled or diverged gets that status,
    and so does a STALLED one shown diverged (a solver whose steps stopped changing z once z had
    run off to ±1e155); other statuses the driver decided (converged, diverged, non-finite) are kept.
    """
    from deqcli.diagnostics.dynamics import REFINED_STATUS
    from deqcli.result import Status

    if not analyse_result:
        if pre is not None:
            result.diagnostics = {
                "precheck": {k: v for k, v in pre.items() if k != "samples"},
                "samples": [{"precheck": s} for s in pre["samples"]],
            }
        return result
    diag = analyse(problem, result, options, pre=pre)
    for b, item in enumerate(diag["samples"]):
        status = result.sample_status[b]
        refined = REFINED_STATUS.get(item["classification"])
        open_ended = status in (Status.MAX_ITER, Status.TIMEOUT)
        escaped = status is Status.STALLED and refined is Status.DIVERGED
        if refined is not None and (open_ended or escaped):
            result.sample_status[b] = refined
        item["status"] = result.sample_status[b].value
    result.diagnostics = diag
    return result


def analyse(
    problem: Problem,
    result: SolveResult,
    options: DiagnosticOptions | None = None,
    *,
    pre: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The diagnostics of one solve as a JSON-ready dict (see docs/diagnostics.md for the layout)."""
    import numpy as np
    import torch

    # Huge or non-finite iterates are evidence to report, not errors to warn about.
    with torch.no_grad(), np.errstate(all="ignore"):
        out, plans = _analyse(problem, result, options or DEFAULT_OPTIONS, pre)
    for item, the_plan in zip(out["samples"], plans, strict=True):
        item["plan"] = the_plan.as_dict()
    compose_remedies(out, None)
    return json_safe(out)


def compose_remedies(diag: dict[str, Any], record: dict[str, Any] | None) -> None:
    """Write each sample's ``advice`` (entries with kind, text, trial) and ``remedies`` (the texts)
    from its ``plan`` and the trials ``record`` (None: nothing was tried, every candidate is a
    suggestion). Verified remedies come first; the batch trial is listed for every sample."""
    from deqcli.diagnostics import advice

    runs = (record or {}).get("runs", [])
    tried_sample = (record or {}).get("sample")
    skipped = (record or {}).get("skipped")
    batch_run = next((t for t in runs if t.get("scope") == "batch"), None)
    for b, item in enumerate(diag["samples"]):
        if "plan" not in item:
            continue
        the_plan = advice.Plan.from_dict(item["plan"])
        own = [t for t in runs if t.get("sample") == b and t.get("scope") != "batch"]
        if batch_run is not None and b != tried_sample:
            own = [*own, _batch_view(batch_run, b)]
        if skipped:
            why_not = skipped
        elif record is not None and b != tried_sample:
            why_not = f"the trials ran on sample {tried_sample}"
        else:
            why_not = None
        entries = advice.compose(the_plan, own, untried=why_not)
        if batch_run is not None and b == tried_sample:
            head = sum(e["kind"] == "verified" for e in entries)
            kind = "verified" if batch_run["verified"] else "tried"
            text = batch_run["text"]
            entries.insert(
                head,
                {
                    "kind": kind,
                    "text": text,
                    "short": text.removeprefix("tried "),
                    "trial": batch_run["index"],
                },
            )
        item["advice"] = entries
        item["remedies"] = [e["text"] for e in entries]


def _batch_view(run: dict[str, Any], b: int) -> dict[str, Any]:
    """What the batch trial did for sample b, as that sample's trial of the candidate."""
    status = run.get("statuses", [])[b] if run.get("statuses") else "error"
    ok = status == "converged"
    its = run["sample_iterations"][b] if ok else 0
    outcome = (
        f"this sample converged in {its} iteration{'' if its == 1 else 's'}"
        if ok
        else f"this sample did not converge ({(run.get('classifications') or ['?'] * (b + 1))[b]})"
    )
    return {
        "label": run["label"],
        "index": run["index"],
        "verified": ok,
        "outcome": status,
        "text": f"tried on the batch: {run['label']} → {outcome}",
    }


def _analyse(
    problem: Problem, result: SolveResult, opts: DiagnosticOptions, pre: dict[str, Any] | None
) -> tuple[dict[str, Any], list[Any]]:
    import torch

    from deqcli.diagnostics import advice, lipschitz, spectral
    from deqcli.diagnostics import dynamics as dyn
    from deqcli.result import Status
    from deqcli.solvers import SOLVERS

    solver = result.solver
    plain = "fixed_point" in solver
    beta = solver_beta(solver, result.options)
    newtonish = dyn.newton_like(solver)
    max_period = opts.effective_max_period(int(result.tail.shape[0]))
    z0_norms = torch.linalg.vector_norm(problem.z0, dim=1).tolist()
    trs = dyn.traces(result, z0_norms)
    batch, n = problem.batch, problem.dim
    dense = spectral.dense_fits(problem, opts)

    samples: list[dict[str, Any]] = []
    for tr in trs:
        item = dyn.classify(tr, opts, max_period)
        item = {
            "index": tr.index,
            "driver_status": tr.status.value,
            "iterations": tr.iterations,
            "final_residual": tr.residuals[-1],
            **item,
            "rates": dyn.rates(
                tr, opts, with_order=item["classification"] in (dyn.CONVERGED, dyn.SLOW)
            ),
        }
        samples.append(item)

    # -- where to look at the Jacobian: the solution, a located fixed point, or the last iterate --
    points = result.solution.detach().clone().to(problem.device, problem.dtype)
    where: list[str | None] = ["solution" if tr.status is Status.CONVERGED else None for tr in trs]
    for b, item in enumerate(samples):
        if item["classification"] == dyn.PRECISION_FLOOR:
            where[b] = AT_FLOOR  # the last iterate is the fixed point, to the dtype's precision
    located_from: list[str | None] = [None] * batch
    missing = [b for b in range(batch) if where[b] is None]
    if missing and dense:
        _locate(problem, result, trs, samples, missing, points, where, located_from, opts)
    for b in range(batch):
        if where[b] is None:
            last = torch.as_tensor(trs[b].last, dtype=problem.dtype, device=problem.device)
            if bool(torch.isfinite(last).all()):
                points[b] = last
                where[b] = "last iterate (not a fixed point)"
    spec = spectral.analyse_points(problem, points, opts, beta=beta)
    g_at = torch.linalg.vector_norm(problem.raw_g(points), dim=1).tolist()
    for b, item in enumerate(samples):
        if where[b] is None:
            item["spectral"] = {"error": "no finite point to analyse"}
            continue
        s = dict(spec[b])
        s["point"] = where[b]
        s["point_residual"] = g_at[b]
        if located_from[b]:
            s["located_from"] = located_from[b]
        if where[b] == "located fixed point" and n <= POINT_SHOWN_DIM:
            s["fixed_point"] = points[b].tolist()
        item["spectral"] = s

    _check_growth(problem, trs, samples, opts, beta)
    _error_bounds(problem, samples, points, opts)
    if dense:
        _cycles(problem, samples)
        if newtonish:
            _conditioning(problem, result, trs, samples, opts)
    _stationarity(problem, trs, samples, opts)
    if dense:
        _nonzero_minima(problem, trs, samples, opts)

    cert = lipschitz.certificate(problem, beta)
    ctx = advice.Context(
        solver=solver,
        beta=beta,
        max_iter=result.max_iter,
        certificate=cert,
        available=list(SOLVERS),
        slow_rate=opts.slow_rate,
        options=dict(result.options),
        dense=dense,
    )
    plans = []
    for b, (tr, item) in enumerate(zip(trs, samples, strict=True)):
        item["theory"] = _theory(tr, item, solver, result.options, plain, newtonish, opts)
        item["banach"] = _banach(tr, item, cert, beta, plain)
        if pre is not None:
            item["precheck"] = pre["samples"][b]
        plans.append(advice.plan(item, ctx))

    tally = Counter(item["classification"] for item in samples)
    out: dict[str, Any] = {
        "solver": solver,
        "settings": {**opts.as_dict(), "max_period_effective": max_period},
        "certificate": cert,
        "summary": {
            "classifications": dict(tally.most_common()),
            "analysis": "dense" if dense else "matrix-free",
        },
        "samples": samples,
    }
    if pre is not None:
        out["precheck"] = {k: v for k, v in pre.items() if k != "samples"}
    return out, plans


def _locate(
    problem: Problem,
    result: SolveResult,
    trs: list[Any],
    samples: list[dict[str, Any]],
    missing: list[int],
    points: Any,
    where: list[str | None],
    located_from: list[str | None],
    opts: DiagnosticOptions,
) -> None:
    """Find the fixed point each unsuccessful sample missed: Newton from the cycle's centre, the last
    iterate, then z0 (the first that lands on a fixed point wins)."""
    import numpy as np
    import torch

    from deqcli.diagnostics import spectral

    def centre(b: int) -> Any:
        ev = samples[b].get("evidence", {})
        if "centre" in ev:
            return np.asarray(ev["centre"])
        X = trs[b].iterates
        return X.mean(axis=0) if np.all(np.isfinite(X)) else None

    candidates = [
        ("centre of the kept iterates", centre),
        ("last iterate", lambda b: trs[b].last if np.all(np.isfinite(trs[b].last)) else None),
        ("start z0", lambda b: problem.z0[b].detach().cpu().numpy()),
    ]
    # Scale-aware acceptance: ‖g‖ within the run's own tolerance, or locate_rtol × the problem's
    # scale max(1, ‖z0‖, ‖f(z0)‖) — never relative to the located point, which may be huge.
    thresholds = result.thresholds()
    accept = {b: max(thresholds[b], opts.locate_rtol * trs[b].problem_scale) for b in missing}
    todo = list(missing)
    for label, pick in candidates:
        rows = [b for b in todo if pick(b) is not None]
        if not rows:
            continue
        sub = spectral.subset(problem, rows)
        starts = torch.as_tensor(
            np.stack([pick(b) for b in rows]), dtype=problem.dtype, device=problem.device
        )
        tol = torch.tensor([accept[b] for b in rows], dtype=torch.float64)
        try:
            z, ok, _ = spectral.locate_fixed_points(sub, starts, tol, opts)
        except spectral.AUTODIFF_ERRORS:
            return
        for i, b in enumerate(rows):
            if ok[i]:
                points[b] = z[i]
                where[b] = "located fixed point"
                located_from[b] = label
        todo = [b for b in todo if where[b] is None]
        if not todo:
            return


def _check_growth(
    problem: Problem,
    trs: list[Any],
    samples: list[dict[str, Any]],
    opts: DiagnosticOptions,
    beta: float | None,
) -> None:
    """A growing (or diverged-by-evidence) sample whose Jacobian at the last iterate has ρ < 1 grows
    only transiently (non-normal J with ‖J‖₂ > 1): it is not divergence."""
    import numpy as np
    import torch

    from deqcli.diagnostics import dynamics as dyn
    from deqcli.diagnostics import spectral

    rows = [
        b
        for b, item in enumerate(samples)
        if item["classification"] in (dyn.GROWING, dyn.DIVERGED)
        and item["driver_status"] != "diverged"
        and not item["evidence"].get("escaping")  # ‖g‖ bounded: not a residual growth
        and bool(np.all(np.isfinite(trs[b].last)))
    ]
    if not rows:
        return
    sub = spectral.subset(problem, rows)
    last = torch.as_tensor(
        np.stack([trs[b].last for b in rows]), dtype=problem.dtype, device=problem.device
    )
    spec = spectral.analyse_points(sub, last, opts, beta=beta, residual_jacobian=False)
    for i, b in enumerate(rows):
        item, s = samples[b], spec[i]
        item["spectral_last"] = s
        rho = s.get("iteration_spectral_radius", s.get("spectral_radius"))
        if rho is None or not rho < 1:
            continue
        at_fp = item.get("spectral") or {}
        rho_fp = at_fp.get("iteration_spectral_radius", at_fp.get("spectral_radius"))
        if at_fp.get("point") == "located fixed point" and not (
            isinstance(rho_fp, float) and rho_fp < 1
        ):
            continue  # the fixed point itself repels: growth there is real, whatever J is here
        tr = trs[b]
        need = dyn.predicted_iterations(tr.residuals[-1], tr.threshold, rho)
        item["transient"] = True
        item["transient_iterations"] = None if need is None else tr.iterations + need
        norm = dyn.near_one(s.get("norm2", math.nan))
        item["reasoning"].append(
            f"but ρ = {dyn.near_one(rho)} < 1 for the iteration's Jacobian at the last iterate (‖J‖₂ = {norm}): "
            "a non-normal map grows transiently before it contracts; not divergence"
        )
        item["classification"] = dyn.GROWING
        item["reason"] = (
            f"transient growth (‖J‖₂ = {norm}, ρ = {dyn.near_one(rho)} < 1), not divergence"
        )


def _error_bounds(
    problem: Problem, samples: list[dict[str, Any]], points: Any, opts: DiagnosticOptions
) -> None:
    """Every solver: σ_min(J_g) at the solution and the forward-error estimate ‖z − z*‖ ≲ ‖g‖/σ_min,
    with a near-singular warning (cond(J_g) ≥ cond_warn, or σ_min below jacobian_decay_warn × the
    larger σ_max(J_g) at the solution and at z0)."""
    from deqcli.diagnostics import spectral

    rows = [
        b
        for b, item in enumerate(samples)
        if (item.get("spectral") or {}).get("point") in ERROR_POINTS
    ]
    if not rows:
        return
    sub = spectral.subset(problem, rows)
    try:  # only σ_max is read at the start: the reference for a decaying σ_min
        at_start = spectral.residual_sigma(sub, sub.z0, opts, smallest=False)
    except spectral.AUTODIFF_ERRORS:
        at_start = [{} for _ in rows]
    # Rows beyond the dense analysis are estimated matrix-free, all in one batch: the Krylov
    # solves cost about as much for the batch as for one of its rows.
    free = [b for b in rows if samples[b]["spectral"].get("residual_jacobian") is None]
    estimated = {}
    if free:
        found = spectral.residual_sigma(spectral.subset(problem, free), points[free], opts)
        estimated = dict(zip(free, found, strict=True))
    for i, b in enumerate(rows):
        item = samples[b]
        spec = item["spectral"]
        at = spec.get("residual_jacobian")
        if at is None:
            at = estimated[b]
        item["error_bound"] = forward_error(
            spec["point"], spec["point_residual"], at, at_start[i], opts
        )
        if item["error_bound"].get("near_singular"):
            item["reasoning"].append(item["error_bound"]["statement"])


def forward_error(
    point: str,
    residual: float,
    at: dict[str, Any],
    at_start: dict[str, Any],
    opts: DiagnosticOptions,
) -> dict[str, Any]:
    """The first-order forward-error estimate ‖z − z*‖ ≲ ‖g(z)‖/σ_min(J_g) from σ's at the point
    (``at``) and at z0 (``at_start``, the reference for a decaying σ_min)."""
    out: dict[str, Any] = {"point": point, "residual": residual}
    if "sigma_min" not in at:
        out["method"] = at.get("method", "not estimated")
        out["reason"] = at.get("reason") or at.get("error") or "σ_min(J_g) unavailable"
        reason = out["reason"]
        out["statement"] = (
            f"‖z − z*‖ {reason}"
            if reason.startswith("not estimated")
            else f"‖z − z*‖ not estimated: {reason}"
        )
        return out
    smin, smax, cond = at["sigma_min"], at["sigma_max"], at["cond"]
    start_max = at_start.get("sigma_max")
    reference = max(v for v in (smax, start_max) if isinstance(v, float) and math.isfinite(v))
    # ‖g‖ = 0 exactly: z is a root of g as computed, whatever J_g is there.
    estimate = 0.0 if residual == 0 else (residual / smin if smin > 0 else math.inf)
    decayed = smin <= opts.jacobian_decay_warn * reference
    near = cond >= opts.cond_warn or decayed
    out.update(
        {
            "method": at.get("method", "dense"),
            "sigma_min": smin,
            "sigma_max": smax,
            "cond": cond,
            "sigma_max_at_start": start_max,
            "forward_error_estimate": estimate,
            "amplification": 1.0 / smin if smin > 0 else math.inf,
            "near_singular": near,
        }
    )
    text = f"‖z − z*‖ ≲ ‖g‖/σ_min(J_g) = {residual:.3g}/{smin:.3g} = {estimate:.3g} (first order)"
    if near:
        why = (
            f"cond(J_g) = {cond:.3g} ≥ cond_warn = {opts.cond_warn:g}"
            if cond >= opts.cond_warn
            else f"σ_min(J_g) = {smin:.3g} is {smin / reference:.3g} × the largest σ_max(J_g) {reference:.3g} "
            f"(≤ jacobian_decay_warn = {opts.jacobian_decay_warn:g})"
        )
        text += f"; J_g is near singular at the {point} ({why})" + (
            f": a residual of {residual:.3g} hides an error of about {estimate:.3g}"
            if residual > 0
            else ""
        )
    out["statement"] = text
    return out


def _cycles(problem: Problem, samples: list[dict[str, Any]]) -> None:
    """The multiplier ρ(J(c_p)···J(c_1)) of each detected cycle (dense only)."""
    import torch

    from deqcli.diagnostics import dynamics as dyn
    from deqcli.diagnostics import spectral

    rows = [b for b, item in enumerate(samples) if item["classification"] == dyn.OSCILLATING]
    if not rows:
        return
    sub = spectral.subset(problem, rows)
    cycles = [torch.as_tensor(samples[b]["evidence"]["points"], dtype=torch.float64) for b in rows]
    try:
        mults = spectral.cycle_multipliers(sub, cycles)
    except spectral.AUTODIFF_ERRORS:
        return
    for b, m in zip(rows, mults, strict=True):
        ev = samples[b]["evidence"]
        ev["cycle_multiplier"] = m
        samples[b]["reasoning"].append(
            f"cycle multiplier ρ(J(c_p)···J(c_1)) = {m:.3g}: the cycle "
            + ("attracts nearby iterates" if m < 1 else "repels; the iterates only pass near it")
        )
        if problem.dim > POINT_SHOWN_DIM:
            ev.pop("points", None)
            ev.pop("centre", None)


def _conditioning(
    problem: Problem,
    result: SolveResult,
    trs: list[Any],
    samples: list[dict[str, Any]],
    opts: DiagnosticOptions,
) -> None:
    """Newton-type solvers: cond(J_g) at up to cond_points kept iterates and at the solution."""
    import numpy

    from deqcli.diagnostics import spectral

    tail = result.tail
    kept = tail.shape[0]
    total = result.total_iterations
    idx = sorted(set(numpy.linspace(0, kept - 1, min(opts.cond_points, kept)).round().astype(int)))
    try:
        table = spectral.residual_conditioning(problem, tail[idx])
    except spectral.AUTODIFF_ERRORS:
        return
    for b, (tr, item) in enumerate(zip(trs, samples, strict=True)):
        along = []
        for row, t in zip(table, idx, strict=True):
            iteration = total - (kept - 1) + int(t)
            if iteration > tr.iterations or row[b] is None:
                continue
            along.append({"iteration": iteration, **row[b]})
        spec = item.get("spectral") or {}
        at_solution = spec.get("residual_jacobian") if spec.get("point") == "solution" else None
        conds = [a["cond"] for a in along] + ([at_solution["cond"]] if at_solution else [])
        smax = max([a["sigma_max"] for a in along], default=math.nan)
        info: dict[str, Any] = {"along_iterates": along}
        if conds:
            info["max_cond"] = max(conds)
        if at_solution:
            info["cond_at_solution"] = at_solution["cond"]
            info["sigma_min_at_solution"] = at_solution["sigma_min"]
            if smax > 0 and math.isfinite(smax):
                info["sigma_min_decay"] = at_solution["sigma_min"] / smax
        near = bool(conds) and max(conds) >= opts.cond_warn
        decay = info.get("sigma_min_decay")
        if decay is not None and decay < opts.jacobian_decay_warn:
            near = True
            item["reasoning"].append(
                f"σ_min(J_g) fell to {decay:.3g} × the largest σ_max(J_g) along the iterates "
                f"(< jacobian_decay_warn = {opts.jacobian_decay_warn:g}): J_g tends to singular at the root"
            )
        if conds and max(conds) >= opts.cond_warn:
            item["reasoning"].append(
                f"cond(J_g) reached {max(conds):.3g} (≥ cond_warn = {opts.cond_warn:g}): near singular"
            )
        info["near_singular"] = near
        item["newton"] = info


def _stationarity(
    problem: Problem, trs: list[Any], samples: list[dict[str, Any]], opts: DiagnosticOptions
) -> None:
    """Stalled samples: is the last iterate a stationary point of ½‖g‖² (a local minimum, not a root)?"""
    import numpy as np
    import torch

    from deqcli.diagnostics import dynamics as dyn
    from deqcli.diagnostics import spectral

    rows = [b for b, item in enumerate(samples) if item["classification"] == dyn.STALLED]
    if not rows:
        return
    sub = spectral.subset(problem, rows)
    last = torch.as_tensor(
        np.stack([trs[b].last for b in rows]), dtype=problem.dtype, device=problem.device
    )
    try:
        ratios = spectral.stationarity(sub, last, opts)
    except spectral.AUTODIFF_ERRORS:
        return
    for b, ratio in zip(rows, ratios, strict=True):
        stationary = ratio <= opts.stationary_rtol
        samples[b]["stationarity"] = {"ratio": ratio, "stationary": stationary}
        if stationary:
            samples[b]["reason"] += ": likely a local minimum of ‖g‖, not a root"
        samples[b]["reasoning"].append(
            f"‖J_gᵀg‖/(max(‖J_g‖₂, ‖J_g(z0)‖₂)·‖g‖) = {ratio:.3g} at the last iterate "
            + (
                f"(≤ stationary_rtol = {opts.stationary_rtol:g}): a stationary point of ‖g‖ — likely a "
                "local minimum of ‖g‖, not a root"
                if stationary
                else f"(> stationary_rtol = {opts.stationary_rtol:g}): not a stationary point of ‖g‖"
            )
        )


def _nonzero_minima(
    problem: Problem, trs: list[Any], samples: list[dict[str, Any]], opts: DiagnosticOptions
) -> None:
    """A sample that hovers without progress at a nonzero ‖g‖ (classified chaotic so far) is
    stalled at a nonzero local minimum of ‖g‖ when Levenberg–Marquardt on ½‖g‖² from its best kept
    iterate finds a stationary point with ‖g‖ no lower than the band it hovers in, near the
    iterates. A rotation also keeps ‖g‖ flat, but around a root: the minimum found there is 0."""
    import numpy as np
    import torch

    from deqcli.diagnostics import dynamics as dyn
    from deqcli.diagnostics import spectral

    rows = [
        b
        for b, item in enumerate(samples)
        if item["classification"] == dyn.CHAOTIC and item["evidence"].get("hovering")
    ]
    if not rows:
        return

    def best_kept(b: int) -> Any:
        X = trs[b].iterates
        r = np.asarray(trs[b].residuals[-X.shape[0] :], dtype=float)
        return X[int(np.nanargmin(r))] if r.size == X.shape[0] else X[-1]

    sub = spectral.subset(problem, rows)
    starts = torch.as_tensor(
        np.stack([best_kept(b) for b in rows]), dtype=problem.dtype, device=problem.device
    )
    try:
        z, ratios, residuals = spectral.locate_minima(sub, starts, opts)
    except spectral.AUTODIFF_ERRORS:
        return
    for i, b in enumerate(rows):
        item, ev = samples[b], samples[b]["evidence"]
        X = trs[b].iterates
        centre = X.mean(axis=0)
        reach = max(ev.get("spread", 0.0), opts.stall_spread_rtol * trs[b].scale) * 2
        point = z[i].detach().cpu().numpy()
        distance = float(np.linalg.norm(point - centre))
        level = ev["best_recent"]
        found = (
            ratios[i] <= opts.stationary_rtol
            and residuals[i] >= (1 - opts.stall_band) * level
            and distance <= reach
        )
        item["minimum"] = {
            "residual": residuals[i],
            "ratio": ratios[i],
            "distance_to_centre": distance,
            "stationary": found,
            **({"point": point.tolist()} if problem.dim <= POINT_SHOWN_DIM else {}),
        }
        if not found:
            continue
        item["classification"] = dyn.STALLED
        item["reason"] = (
            f"‖g‖ hovers at ≈ {level:.3g} without progress around a nonzero local minimum of ‖g‖ "
            f"(‖g‖ = {residuals[i]:.3g}, ∇½‖g‖² ≈ 0 there): not a root"
        )
        ev["nonzero_level"] = True
        item["stationarity"] = {"ratio": ratios[i], "stationary": True}
        item["reasoning"].append(
            f"minimum test: Levenberg–Marquardt on ½‖g‖² from the best kept iterate reaches a point "
            f"{distance:.3g} from the iterates' centre with ‖g‖ = {residuals[i]:.3g} and "
            f"‖J_gᵀg‖/(max(‖J_g‖₂, ‖J_g(z0)‖₂)·‖g‖) = {ratios[i]:.3g} (≤ stationary_rtol = "
            f"{opts.stationary_rtol:g}): the iterates circle a nonzero local minimum of ‖g‖, not a root"
        )


def _theory(
    tr: Any,
    item: dict[str, Any],
    solver: str,
    options: dict[str, Any],
    plain: bool,
    newtonish: bool,
    opts: DiagnosticOptions,
) -> dict[str, Any] | None:
    """The observed order and rate against what the solver's theory predicts (converged samples)."""
    from deqcli.diagnostics import dynamics as dyn

    if item["classification"] != dyn.CONVERGED:
        return None
    rates = item["rates"]
    known = dyn.theory_for(solver)
    out: dict[str, Any] = {
        "expected_order": known[0] if known else None,
        "statement": known[1] if known else f"no convergence theory recorded for '{solver}'",
        "observed_order": rates["order"],
        "observed_class": rates["order_class"],
    }
    if rates["order"] is None:
        out["note"] = (
            f"converged in {tr.iterations} iteration(s): too few steps above the noise floor to estimate an order"
        )
    spec = item.get("spectral") or {}
    if plain and "iteration_spectral_radius" in spec and rates["step_rate"] is not None:
        expected, observed = spec["iteration_spectral_radius"], rates["step_rate"]
        out["expected_rate"] = expected
        out["observed_rate"] = observed
        out["rate_agrees"] = (
            abs(observed - expected) <= opts.rate_match_atol + opts.rate_match_rtol * expected
        )
        item["reasoning"].append(
            f"observed rate {observed:.4g} vs ρ(I − βJ_g) = {expected:.4g} at the solution: "
            + (
                "agrees (linear convergence at the predicted rate)"
                if out["rate_agrees"]
                else "differs"
            )
        )
    if (
        newtonish
        and known is not None
        and known[0] in ("quadratic", "superlinear")
        and rates["order_class"] == "linear"
        and len(rates["estimates"]) >= 2
    ):
        out["linear_newton"] = True
        out.update(_multiplicity(item, solver, options))
        item["reasoning"].append(out["multiplicity_evidence"])
    elif rates["order"] is not None:
        item["reasoning"].append(
            f"order q ≈ {rates['order']:.3g} ({rates['order_class']})"
            + (f"; theory for {solver}: {known[0]}" if known else "")
        )
    return out


# A multiplicity above this is not claimed (the rate (m − 1)/m is then within 10% of 1).
MAX_MULTIPLICITY = 10.0


def _multiplicity(item: dict[str, Any], solver: str, options: dict[str, Any]) -> dict[str, Any]:
    """Whether a Newton-type solver's linear convergence is evidence of a multiple root.

    Only when theory and conditioning both support it: every step solved with the exact J_g
    (Newton; not a Broyden or secant model, not an inexact Krylov solve), J_g is near singular at
    the solution, the rate c gives m = 1/(1 − c) ≤ MAX_MULTIPLICITY, and ‖g‖ falls like the error
    to the power m (log(residual rate)/log(step rate) within 25% of m), as it does at a root of
    multiplicity m.
    """
    from deqcli.diagnostics import dynamics as dyn

    rates = item["rates"]
    rate = rates["step_rate"]
    exponent = rates.get("residual_to_step_exponent")
    eb = item.get("error_bound") or {}
    m = 1.0 / (1.0 - rate) if rate is not None and 0 < rate < 1 else None
    head = f"{solver} converged only linearly (q = {rates['order']:.3g}, rate {dyn.near_one(rate)})"
    if not dyn.exact_jacobian_steps(solver, options):
        why = (
            f"{head}, but {solver} does not solve with the exact J_g every step (a secant or Broyden model, or "
            "an inexact solve), so linear convergence is no evidence of a multiple root"
        )
    elif not eb.get("near_singular"):
        why = (
            f"{head}, but J_g is not near singular at the solution"
            + (
                f" (σ_min {eb['sigma_min']:.3g}, cond {eb['cond']:.3g})"
                if "sigma_min" in eb
                else ""
            )
            + ": not the signature of a multiple root"
        )
    elif m is None or m > MAX_MULTIPLICITY or exponent is None or abs(exponent - m) > 0.25 * m:
        why = (
            f"{head} where J_g is near singular, but ‖g‖ does not fall like error^m for m = 1/(1 − rate)"
            + (f" (exponent {exponent:.3g})" if exponent is not None else "")
            + ": no multiplicity is claimed"
        )
    else:
        return {
            "multiplicity": m,
            "multiplicity_evidence": (
                f"{head} with exact Jacobians, J_g near singular at the solution (σ_min {eb['sigma_min']:.3g}) and "
                f"‖g‖ ∝ error^{exponent:.3g}: a root of multiplicity ≈ {m:.2g} (Newton's rate there is (m − 1)/m)"
            ),
        }
    return {"multiplicity": None, "multiplicity_evidence": why}


def _banach(
    tr: Any,
    item: dict[str, Any],
    cert: dict[str, Any] | None,
    beta: float | None,
    plain: bool,
) -> dict[str, Any] | None:
    """Banach's bounds from the certificate (rigorous) or from ‖J(z*)‖₂ < 1 (a local estimate)."""
    from deqcli.diagnostics import lipschitz

    if cert is not None and cert["contraction"]:
        return lipschitz.banach(
            tr,
            cert["lipschitz_bound"],
            rigorous=True,
            source="certificate",
            beta=beta,
            plain_iteration=plain,
        )
    spec = item.get("spectral") or {}
    if spec.get("point") == "solution" and isinstance(spec.get("norm2"), float):
        return lipschitz.banach(
            tr,
            spec["norm2"],
            rigorous=False,
            source="‖J(z*)‖₂ at the solution (a local estimate, not a proof)",
            beta=beta,
            plain_iteration=plain,
        )
    return None


def json_safe(value: Any) -> Any:
    """Plain JSON types only: numpy scalars to Python, inf/NaN to strings (as in the result JSON)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    try:
        f = float(value)
    except (TypeError, ValueError):
        return str(value)
    if hasattr(value, "dtype") and "int" in str(value.dtype):
        return int(value)
    if math.isfinite(f):
        return f
    return "nan" if math.isnan(f) else ("inf" if f > 0 else "-inf")
