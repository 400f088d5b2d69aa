"""Lipschitz constants: the structural certificate, Banach's a-priori and a-posteriori bounds, and the
empirical secant estimate around z0 (``--precheck``).

Banach's theorem for a map T with Lipschitz constant L < 1 (in the 2-norm):
- the fixed point exists and is unique, and z_{t+1} = T(z_t) converges from any start;
- a priori, ‖z_{t+1} − z_t‖ ≤ L^t ‖z_1 − z_0‖; for plain iteration the residual is the next step,
  so ‖g(z_t)‖ ≤ L^t ‖g(z_0)‖ and t ≥ log(τ/‖g(z_0)‖)/log L iterations reach a tolerance τ;
- a posteriori, ‖z_t − z*‖ ≤ L/(1 − L)·‖z_t − z_{t−1}‖, and for any point z (whatever solver found it)
  ‖z − z*‖ ≤ ‖g(z)‖/(1 − L).
The damped map z − β g(z) = (1 − β) z + β f(z) has Lipschitz constant at most |1 − β| + β L.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from deqcli.diagnostics.dynamics import Trace, predicted_iterations
from deqcli.diagnostics.settings import DiagnosticOptions

if TYPE_CHECKING:
    from deqcli.problems.base import Problem


def iteration_lipschitz(L: float, beta: float | None) -> float:
    """Lipschitz bound of the damped iteration map z − β g(z) given Lipschitz bound L of f."""
    b = 1.0 if beta is None else beta
    return abs(1.0 - b) + b * L


def certificate(problem: Problem, beta: float | None) -> dict[str, Any] | None:
    """The global Lipschitz statement the problem's structure proves, or None when it proves none.

    For the tanh layer L ≤ ‖W‖₂·sup|tanh′| = ‖W‖₂; for gradient descent on a quadratic loss the map
    is affine with symmetric Jacobian I − ηH, so L = max|1 − η λᵢ(H)| exactly.
    """
    import torch

    s = problem.structure
    if s.lipschitz_bound is None:
        return None
    L = float(s.lipschitz_bound)
    exact = s.hessian is not None
    out: dict[str, Any] = {
        "lipschitz_bound": L,
        "exact": exact,
        "reason": s.lipschitz_reason,
        "contraction": L < 1,
    }
    if L < 1:
        out["statement"] = (
            f"L {'=' if exact else '≤'} {L:.4g} < 1: f is a contraction in the 2-norm, so the fixed point "
            "exists and is unique, plain iteration converges from any start, and Banach's bounds hold"
        )
    elif exact:
        out["statement"] = (
            f"L = {L:.4g} ≥ 1 exactly: not a contraction; plain iteration does not converge from a "
            "generic start"
        )
    else:
        out["statement"] = (
            f"the bound L ≤ {L:.4g} is ≥ 1, so it proves nothing: the map may still converge "
            "(see ρ(J) at the solution)"
        )
    if beta is not None and beta != 1.0:
        Lb = iteration_lipschitz(L, beta)
        out["damped_bound"] = Lb
        out["damped_statement"] = (
            f"with damping β = {beta:g} the iteration map has L ≤ |1 − β| + β·L = {Lb:.4g}"
        )
    if s.hessian is not None and s.lr is not None:
        eig = torch.linalg.eigvalsh(s.hessian.detach().to("cpu", torch.float64))
        lo, hi = float(eig[0]), float(eig[-1])
        gd: dict[str, Any] = {"lr": float(s.lr), "lambda_min": lo, "lambda_max": hi}
        if hi > 0:
            gd["lr_limit"] = 2.0 / hi
            gd["top_multiplier"] = abs(1.0 - s.lr * hi)
        if lo > 0:
            gd["lr_best"] = 2.0 / (lo + hi)
            gd["rate_best"] = (hi - lo) / (hi + lo)
        out["gradient_descent"] = gd
    return out


def banach(
    tr: Trace,
    L: float | None,
    *,
    rigorous: bool,
    source: str,
    beta: float | None,
    plain_iteration: bool,
) -> dict[str, Any] | None:
    """Banach's predictions for one sample with Lipschitz constant L of f (None unless L < 1).

    ``plain_iteration``: the solver was (damped) fixed-point iteration, so the a-priori count is a
    prediction of its iterations and the step form of the a-posteriori bound applies.
    """
    if L is None or not math.isfinite(L) or L >= 1:
        return None
    Lit = iteration_lipschitz(L, beta if plain_iteration else None)
    r = tr.residuals
    out: dict[str, Any] = {
        "L": L,
        "source": source,
        "rigorous": rigorous,
        "iteration_L": Lit,
        "a_priori_iterations": predicted_iterations(r[0], tr.threshold, Lit) if Lit < 1 else None,
        "actual_iterations": tr.iterations if tr.status.ok else None,
        "applies_to": "this solver" if plain_iteration else "plain iteration (for comparison)",
    }
    # With a proven L these are bounds; with a local ‖J(z*)‖₂ they are only estimates (and named so).
    kind = "bound" if rigorous else "estimate"
    final = r[-1]
    if math.isfinite(final):
        # Valid for any point: ‖z − z*‖ ≤ ‖z − f(z)‖ + ‖f(z) − f(z*)‖ ≤ ‖g(z)‖ + L‖z − z*‖.
        out[f"error_{kind}"] = final / (1 - L)
    if (
        plain_iteration
        and (beta is None or beta == 1.0)
        and tr.steps
        and math.isfinite(tr.steps[-1])
    ):
        out[f"a_posteriori_{kind}"] = L / (1 - L) * tr.steps[-1]
    return out


def secant_estimate(problem: Problem, opts: DiagnosticOptions) -> list[dict[str, Any]]:
    """Empirical Lipschitz estimate of f near z0 per sample: max ‖f(u) − f(v)‖/‖u − v‖ over sampled pairs.

    Half the pairs are spread over the ball of radius precheck_radius·max(1, ‖z0‖) around z0, half are
    close pairs (1e-3 of the radius apart) that probe the local derivative. The maximum is a lower
    bound on the true Lipschitz constant on that ball: an estimate, never a proof.
    """
    import torch

    z0 = problem.z0
    batch, n = z0.shape
    gen = torch.Generator(device="cpu").manual_seed(opts.seed)
    radius = opts.precheck_radius * torch.linalg.vector_norm(z0, dim=1).clamp_min(1.0)

    def unit() -> torch.Tensor:
        v = torch.randn((batch, n), generator=gen, dtype=torch.float64)
        return (v / torch.linalg.vector_norm(v, dim=1, keepdim=True)).to(z0.device, z0.dtype)

    def scalar() -> torch.Tensor:
        return torch.rand((batch, 1), generator=gen, dtype=torch.float64).to(z0.device, z0.dtype)

    found: list[list[float]] = [[] for _ in range(batch)]
    skipped = [0] * batch
    with torch.no_grad():
        for i in range(opts.precheck_pairs):
            u = z0 + radius[:, None] * scalar() * unit()
            if i % 2 == 0:
                v = z0 + radius[:, None] * scalar() * unit()
            else:
                v = u + 1e-3 * radius[:, None] * unit()
            fu, fv = problem.raw_f(u), problem.raw_f(v)
            num = torch.linalg.vector_norm(fu - fv, dim=1)
            den = torch.linalg.vector_norm(u - v, dim=1)
            ratio = (num / den).cpu().tolist()
            for b, q in enumerate(ratio):
                if math.isfinite(q):
                    found[b].append(q)
                else:
                    skipped[b] += 1
    out = []
    for b in range(batch):
        qs = sorted(found[b])
        est = qs[-1] if qs else None
        out.append(
            {
                "estimate": est,
                "median": qs[len(qs) // 2] if qs else None,
                "pairs": len(qs),
                "nonfinite_pairs": skipped[b],
                "radius": float(radius[b]),
                "label": "empirical estimate from sampled secants (a lower bound on L near z0, not a proof)",
                "verdict": _verdict(est),
            }
        )
    return out


def _verdict(est: float | None) -> str:
    if est is None:
        return "no finite secant: the map is not finite near z0"
    if est < 1:
        return f"secants up to {est:.3g} < 1: f looks contractive near z0 (an estimate)"
    return f"secants up to {est:.3g} ≥ 1: f expands somewhere near z0; plain iteration may fail from here"
