"""Words for the diagnostics: the short rows of the report's diagnostics panel and the long form of
``deq solve --explain``. Reads only the JSON-ready diagnostics dict (torch-free, rich-free).
"""

from __future__ import annotations

import math
from typing import Any

RHO_VS_NORM = (
    "ρ(J), the spectral radius of the Jacobian J = ∂f/∂z at the fixed point, decides local "
    "convergence of plain iteration: below 1 the errors eventually shrink by about ρ per step, above 1 "
    "they grow. ‖J‖₂ < 1 says more — f contracts every error in the 2-norm from the first step — and "
    "ρ(J) ≤ ‖J‖₂ always. When ‖J‖₂ > 1 > ρ(J) (a non-normal J) the error may grow for a while "
    "before the rate ρ takes over."
)


def num(value: Any, digits: int = 3) -> str:
    """A number in ``digits`` significant figures; strings (inf/nan) and None pass through."""
    if value is None:
        return "–"
    if isinstance(value, str):
        return value
    v = float(value)
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.{digits}g}"


def _count(value: Any) -> str:
    return "–" if value is None else f"{int(value):,}".replace(",", " ")


def headline(sample: dict[str, Any]) -> str:
    """'oscillating — period-2 cycle with amplitude 0.143'."""
    return f"{sample['classification']} — {sample['reason']}"


def spectrum_line(spec: dict[str, Any], solver: str = "fixed_point") -> str | None:
    """ρ(J) and ‖J‖₂ where they were measured, or None."""
    if not spec or "spectral_radius" not in spec:
        return f"not analysed: {spec.get('error')}" if spec and spec.get("error") else None
    how = (
        "exact (dense)"
        if spec.get("method") == "dense"
        else f"estimates ({spec.get('power_iterations')} power steps, {spec.get('arnoldi_steps')} Arnoldi steps)"
    )
    text = f"ρ(J) {num(spec['spectral_radius'])}, ‖J‖₂ {num(spec.get('norm2'))} at the {spec.get('point')}; {how}"
    if spec.get("iteration_beta") not in (None, 1.0):
        text += f"; ρ(I − βJ_g) {num(spec.get('iteration_spectral_radius'))} for β = {num(spec.get('iteration_beta'))}"
    if "fixed_point" not in solver:
        text += " (J of f = z − g: what plain iteration would face)"
    return text


def rate_line(sample: dict[str, Any]) -> str | None:
    """Observed rate and order against theory."""
    rates = sample.get("rates") or {}
    theory = sample.get("theory") or {}
    parts = []
    linear = rates.get("order_class") in (None, "linear")
    if (
        rates.get("step_rate") is not None
        and sample["classification"] in ("converged", "slow")
        and linear
    ):
        parts.append(f"observed rate {num(rates['step_rate'], 4)}")
        if theory.get("expected_rate") is not None:
            mark = "agrees" if theory.get("rate_agrees") else "differs"
            parts.append(f"predicted ρ(I − βJ_g) {num(theory['expected_rate'], 4)} ({mark})")
    if rates.get("order") is not None:
        text = f"order q ≈ {num(rates['order'])} ({rates['order_class']})"
        if theory.get("expected_order"):
            text += f"; theory: {theory['expected_order']}"
        parts.append(text)
    elif theory.get("note"):
        parts.append(theory["note"])
    return "; ".join(parts) or None


def banach_line(banach: dict[str, Any] | None) -> str | None:
    """A priori iterations and the error bound."""
    if not banach:
        return None
    kind = "certificate" if banach.get("rigorous") else "local ‖J‖₂, an estimate"
    text = f"L {num(banach['L'])} ({kind})"
    if banach.get("a_priori_iterations") is not None:
        text += f": a priori ≤ {_count(banach['a_priori_iterations'])} iterations for {banach.get('applies_to')}"
        if (
            banach.get("actual_iterations") is not None
            and banach.get("applies_to") == "this solver"
        ):
            text += f", actual {_count(banach['actual_iterations'])}"
    if banach.get("error_bound") is not None:
        text += f"; ‖z − z*‖ ≤ {num(banach['error_bound'])}"
    elif banach.get("error_estimate") is not None:
        text += f"; ‖z − z*‖ ≈ {num(banach['error_estimate'])} (estimate)"
    return text


def newton_line(newton: dict[str, Any] | None) -> str | None:
    """Conditioning of J_g for Newton-type solvers."""
    if not newton:
        return None
    parts = []
    if newton.get("cond_at_solution") is not None:
        parts.append(f"cond(J_g) {num(newton['cond_at_solution'])} at the solution")
    if newton.get("max_cond") is not None:
        parts.append(f"up to {num(newton['max_cond'])} along the iterates")
    if newton.get("sigma_min_decay") is not None and newton.get("near_singular"):
        parts.append(f"σ_min fell to {num(newton['sigma_min_decay'])}× the largest σ_max")
    if newton.get("near_singular"):
        parts.append("near singular")
    return ", ".join(parts) or None


def panel_rows(diag: dict[str, Any], sample: int) -> list[tuple[str, str]]:
    """(label, text) rows for the report's diagnostics panel about one sample."""
    rows: list[tuple[str, str]] = []
    cert = diag.get("certificate")
    if cert:
        rows.append(("certificate", cert["statement"]))
    s = diag["samples"][sample]
    if "classification" not in s:  # precheck only
        pre = s.get("precheck") or {}
        if pre.get("secant"):
            rows.append(("precheck", pre["secant"]["verdict"]))
        return rows
    rows.append(("outcome", headline(s)))
    for label, line in (
        ("spectrum", spectrum_line(s.get("spectral") or {}, diag.get("solver", ""))),
        ("rate", rate_line(s)),
        ("banach", banach_line(s.get("banach"))),
        ("newton", newton_line(s.get("newton"))),
    ):
        if line:
            rows.append((label, line))
    mult = (s.get("evidence") or {}).get("cycle_multiplier")
    if mult is not None:
        rows.append(
            ("cycle", f"multiplier {num(mult)} ({'attracting' if mult < 1 else 'repelling'})")
        )
    pre = s.get("precheck") or {}
    if pre.get("secant"):
        rows.append(("precheck", pre["secant"]["verdict"]))
    bound = error_line(s.get("error_bound"))
    if bound:
        rows.append(("error", bound))
    for label, text in remedy_rows(s):
        rows.append((label, text))
    return rows


# Panel labels of the remedy entries by kind: verified remedies are the remedies proper (their
# text keeps "tried: …", the fact that makes them remedies); the others drop the prefix their
# label repeats.
REMEDY_LABELS = {"verified": "remedy", "tried": "tried", "note": "note", "suggestion": "suggestion"}


def remedy_rows(sample: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) for the sample's remedies in their order: verified first, then the measured
    notes, the trials that did not work and the suggestions."""
    entries = sample.get("advice")
    if entries is None:  # diagnostics without trials' entries: plain strings
        return [("remedy", text) for text in sample.get("remedies", [])]
    return [
        (
            REMEDY_LABELS.get(e["kind"], e["kind"]),
            e["text"] if e["kind"] == "verified" else e.get("short", e["text"]),
        )
        for e in entries
    ]


def error_line(bound: dict[str, Any] | None) -> str | None:
    """The forward-error estimate ‖z − z*‖ ≲ ‖g‖/σ_min(J_g), with its near-singular warning."""
    if not bound:
        return None
    return bound.get("statement")


def explain_sections(diag: dict[str, Any], sample: int) -> list[tuple[str, list[str]]]:
    """The reasoning at length for one sample: (section title, paragraphs)."""
    s = diag["samples"][sample]
    sections: list[tuple[str, list[str]]] = []
    cert = diag.get("certificate")
    if cert:
        lines = [f"{cert['reason']}.", cert["statement"] + "."]
        if cert.get("damped_statement"):
            lines.append(cert["damped_statement"] + ".")
        gd = cert.get("gradient_descent")
        if gd:
            lines.append(
                f"Gradient descent with lr {num(gd['lr'])} on a quadratic with λ(H) in "
                f"[{num(gd['lambda_min'], 4)}, {num(gd['lambda_max'], 4)}]: it converges exactly when "
                f"lr < 2/λmax = {num(gd.get('lr_limit'), 4)}."
            )
        sections.append(("Certificate (from the problem's structure)", lines))
    pre = s.get("precheck") or {}
    if pre:
        lines = []
        sec = pre.get("secant") or {}
        if sec:
            lines.append(
                f"{sec['label']}: max {num(sec.get('estimate'))}, median {num(sec.get('median'))} over "
                f"{sec.get('pairs')} pairs within radius {num(sec.get('radius'))} of z0."
            )
            lines.append(sec["verdict"] + ".")
        start = spectrum_line(pre.get("jacobian_at_start") or {})
        if start:
            lines.append(f"At the start: {start}.")
        sections.append(("Before solving (--precheck)", lines))
    if "classification" not in s:
        return sections
    sections.append(
        (
            "What happened",
            [
                f"The driver stopped this sample as '{s['driver_status']}' after {_count(s['iterations'])} "
                f"iterations with ‖g‖ = {num(s['final_residual'])}.",
                f"Diagnosis: {headline(s)}."
                + (
                    f" Status refined to '{s['status']}'."
                    if s.get("status") and s["status"] != s["driver_status"]
                    else ""
                ),
            ],
        )
    )
    sections.append(("The evidence, test by test", [line + "." for line in s.get("reasoning", [])]))
    spec = s.get("spectral") or {}
    lines = []
    line = spectrum_line(spec, diag.get("solver", ""))
    if line:
        lines.append(line + ".")
    if spec.get("located_from"):
        lines.append(
            f"The run did not reach a fixed point; Newton's method started from the {spec['located_from']} "
            f"located one with ‖g‖ = {num(spec.get('point_residual'))}"
            + (
                f" at z* = ({', '.join(num(v, 6) for v in spec['fixed_point'])})"
                if spec.get("fixed_point")
                else ""
            )
            + "."
        )
    if spec.get("eigenvalues"):
        eig = ", ".join(
            f"{num(re, 4)}{'' if abs(im) < 1e-14 else f'{im:+.4g}i'}"
            for re, im in spec["eigenvalues"]
        )
        lines.append(f"Largest eigenvalues of J: {eig}.")
    damping = spec.get("damping") or {}
    if damping.get("stabilisable") and spec.get("spectral_radius") is not None:
        lines.append(
            f"Damped iteration z ← z − β g(z) has eigenvalues 1 − β(1 − λ): it converges locally for "
            f"β < {num(damping['beta_max'])}, fastest at β ≈ {num(damping['beta_best'])} (rate {num(damping['rate_best'])})."
        )
    elif damping and damping.get("stabilisable") is False:
        lines.append(
            "An eigenvalue of J has real part ≥ 1, so no damping β makes plain iteration converge "
            "here; Newton-type solvers do not need ρ(J) < 1."
        )
    if spec.get("residual_jacobian"):
        rj = spec["residual_jacobian"]
        lines.append(
            f"The residual Jacobian J_g = I − J has σ_max {num(rj['sigma_max'])}, σ_min {num(rj['sigma_min'])}, "
            f"cond {num(rj['cond'])}."
        )
    rho, norm = spec.get("spectral_radius"), spec.get("norm2")
    if isinstance(rho, float) and isinstance(norm, float) and norm > 1 > rho:
        growth = (s.get("rates") or {}).get("peak_growth")
        lines.append(
            f"Here ‖J‖₂ = {num(norm)} > 1 > ρ(J) = {num(rho)}: J is non-normal, so errors can grow for a "
            "while before they decay at the rate ρ"
            + (f" (‖g‖ grew ×{num(growth)} over its start in this run)" if growth else "")
            + "; that growth is transient, not divergence."
        )
    if lines:
        lines.append(RHO_VS_NORM)
        sections.append(("The map at the fixed point", lines))
    lines = []
    rates = s.get("rates") or {}
    line = rate_line(s)
    if line:
        lines.append(line + ".")
    if rates.get("step_rate") is not None and s["classification"] in ("converged", "slow"):
        lines.append(
            f"Rates are geometric means of the last {rates.get('ratios_used')} step ratios "
            f"‖z_t − z_(t−1)‖/‖z_(t−1) − z_(t−2)‖ above the noise floor {num(rates.get('noise_floor'))}; "
            f"residual rate {num(rates.get('residual_rate'), 4)}."
        )
    exp = rates.get("residual_to_step_exponent")
    if exp is not None and abs(exp - 1) > 0.2 and s["classification"] == "converged":
        lines.append(
            f"‖g‖ falls like the error to the power {num(exp)}: the root has multiplicity ≈ {num(exp, 2)}, "
            "so the error is far larger than ‖g‖."
        )
    theory = s.get("theory") or {}
    if theory.get("statement"):
        lines.append(f"Theory: {theory['statement']}.")
    if lines:
        sections.append(("Rates and order", lines))
    banach = s.get("banach")
    if banach:
        lines = [banach_line(banach) + "."]
        lines.append(
            "Banach: ‖g(z_t)‖ ≤ L_it^t ‖g(z_0)‖ for plain iteration (L_it = |1 − β| + βL), and any point z "
            "satisfies ‖z − z*‖ ≤ ‖g(z)‖/(1 − L)"
            + (
                ""
                if banach.get("rigorous")
                else "; here L is the local ‖J(z*)‖₂, so these are estimates"
            )
            + "."
        )
        if banach.get("a_posteriori_bound") is not None:
            lines.append(
                "A posteriori: ‖z_t − z*‖ ≤ L/(1 − L)·‖z_t − z_(t−1)‖ = "
                f"{num(banach['a_posteriori_bound'])}."
            )
        elif banach.get("a_posteriori_estimate") is not None:
            lines.append(
                "A posteriori (estimate): L/(1 − L)·‖z_t − z_(t−1)‖ = "
                f"{num(banach['a_posteriori_estimate'])}."
            )
        sections.append(("Banach bounds", lines))
    newton = newton_line(s.get("newton"))
    if newton:
        sections.append(("Conditioning of J_g (Newton-type solver)", [newton + "."]))
    bound = s.get("error_bound")
    if bound:
        lines = [bound["statement"] + "."]
        if "sigma_min" in bound:
            lines.append(
                "To first order z − z* ≈ J_g⁻¹g(z), so ‖z − z*‖ ≲ ‖g‖/σ_min(J_g) whichever solver found z; at a "
                "root of multiplicity m the true error is about m times this estimate."
            )
        sections.append(("Error bound", lines))
    record = diag.get("trials") or {}
    trials = [t for t in record.get("runs", []) if _concerns(t, sample)]
    if trials:
        why = {e["trial"]: e.get("why") for e in s.get("advice") or [] if "trial" in e}
        budget = (record.get("budget") or {}).get("evaluations", "–")
        lines = []
        for t in trials:
            start = "z0" if t.get("start") == "z0" else "the last iterate"
            head = f"{t['label']} (on {t.get('scope')}, from {start}"
            head += f"; tried because {why[t['index']]})" if why.get(t["index"]) else ")"
            if t.get("outcome") == "not run":
                lines.append(f"{head}: not run — {t.get('reason')}.")
                continue
            cost = (t.get("evaluations") or {}).get("cost", "–")
            outcome = t["text"].split(" → ", 1)[-1]
            lines.append(f"{head}: {outcome}; {cost} of a budget of {budget} evaluations.")
        sections.append(("Remedies tried (each run within a budget, on this problem)", lines))
    rows = remedy_rows(s)
    sections.append(
        (
            "What to do",
            [f"{'' if label == 'remedy' else label + ': '}{text}." for label, text in rows]
            or ["Nothing: this sample is fine."],
        )
    )
    return sections


def _concerns(trial: dict[str, Any], sample: int) -> bool:
    """A trial run on this sample, or on the whole batch."""
    return trial.get("scope") == "batch" or trial.get("sample") == sample


def summary_line(diag: dict[str, Any]) -> str:
    """'6 converged, 2 oscillating' over the batch."""
    tally = (diag.get("summary") or {}).get("classifications") or {}
    return ", ".join(f"{n} {name}" for name, n in tally.items())
