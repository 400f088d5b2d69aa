"""How a Newton-type step's length is chosen, per sample.

- ``line_search``: backtracking along a direction d with the Armijo test on φ = ½‖g‖²,
  φ(z + αd) ≤ φ_ref + c·α·∇φᵀd, trial lengths from a safeguarded quadratic model of φ(α).
- ``dogleg``: the minimiser of the linear model ‖g + J p‖ on the dogleg path inside the scaled
  ball ‖D p‖ ≤ Δ (Powell's hybrid method, as MINPACK's hybrj computes it); ``dogleg_path`` also
  says how the step combines the Newton step and the gradient (for the matrix-free model).
- ``damped_step``: the Levenberg–Marquardt step (JᵀJ + λD²) p = −Jᵀg from an SVD of J D⁻¹, so
  every λ costs O(n²) once J is factored, and no normal equations are formed.

The trust-region and Levenberg–Marquardt iterations that use the last two live in ``methods.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deqcli.linalg.dense import finite_matrices, svd

if TYPE_CHECKING:
    from deqcli.problems.base import Problem


def _half_square(g: torch.Tensor) -> torch.Tensor:
    return 0.5 * g.square().sum(dim=1)


@dataclass
class Search:
    """What a line search did per sample."""

    z: torch.Tensor  # (B, n) the new iterate (the old one where nothing was accepted)
    g: torch.Tensor  # (B, n)
    accepted: torch.Tensor  # (B,) a step length passed the test
    alpha: torch.Tensor  # (B,) the accepted (or last tried) step length
    step: torch.Tensor  # (B, n) the last trial step α d (accepted or not)
    g_trial: torch.Tensor  # (B, n) g at the last trial point


def line_search(
    problem: Problem,
    z: torch.Tensor,
    g: torch.Tensor,
    d: torch.Tensor,
    slope: torch.Tensor,
    *,
    c: float,
    max_backtracks: int,
    active: torch.Tensor,
    reference: torch.Tensor | None = None,
) -> Search:
    """Backtrack per sample from α = 1 until φ(z + αd) ≤ φ_ref + c·α·slope (Armijo on ½‖g‖²).

    ``slope`` is ∇φᵀd = gᵀJ_g d (negative for a descent direction); ``reference`` is φ_ref, by
    default φ(z) (monotone); a non-monotone search passes the largest φ of the last few
    iterations. The next trial length minimises the quadratic through φ(0), φ'(0) and φ(α),
    kept within [α/10, α/2] (a non-finite φ(α) gives α/10). A sample with no acceptable α after
    ``max_backtracks`` reductions stays where it was (``accepted`` False): an unaccepted step is
    never taken, so the residual never grows past the reference and never overflows. Samples
    outside ``active`` are not waited for. Every trial is one batched evaluation of g.
    """
    phi0 = _half_square(g)
    ref = phi0 if reference is None else reference
    alpha = torch.ones_like(phi0)
    z_try = z + d
    g_try = problem.g(z_try)
    phi = _half_square(g_try)
    ok = torch.isfinite(phi) & (phi <= ref + c * alpha * slope)
    for _ in range(max_backtracks):
        todo = ~ok & active
        if not bool(todo.any()):
            break
        curvature = 2 * (phi - phi0 - slope * alpha)
        model = -slope * alpha.square() / curvature
        usable = torch.isfinite(model) & (curvature > 0) & torch.isfinite(phi)
        shorter = torch.where(usable, torch.clamp(model, 0.1 * alpha, 0.5 * alpha), 0.1 * alpha)
        alpha = torch.where(todo, shorter, alpha)
        z_t = z + alpha[:, None] * d
        g_t = problem.g(z_t)
        phi_t = _half_square(g_t)
        keep = todo[:, None]
        z_try = torch.where(keep, z_t, z_try)
        g_try = torch.where(keep, g_t, g_try)
        phi = torch.where(todo, phi_t, phi)
        ok = ok | (todo & torch.isfinite(phi_t) & (phi_t <= ref + c * alpha * slope))
    accepted = ok & active
    keep = accepted[:, None]
    return Search(
        z=torch.where(keep, z_try, z),
        g=torch.where(keep, g_try, g),
        accepted=accepted,
        alpha=alpha,
        step=z_try - z,
        g_trial=g_try,
    )


@dataclass
class DoglegPath:
    """The dogleg step per sample and how it is made of the Newton step and the gradient.

    ``step`` = ``along_newton``·newton + ``along_unit``·unit, so J·step is the same combination of
    J·newton and ``j_unit`` = J·unit: a caller that knows J·newton (a matrix-free method: one
    product per Newton step) gets the model's value at the step without another product.
    """

    step: torch.Tensor  # (B, n)
    along_newton: torch.Tensor  # (B,)
    along_unit: torch.Tensor  # (B,)
    unit: torch.Tensor  # (B, n) D⁻²Jᵀg/‖D⁻¹Jᵀg‖, so ‖D unit‖ = 1 (zero where Jᵀg = 0)
    j_unit: torch.Tensor  # (B, n) J·unit
    cauchy_length: torch.Tensor  # (B,) σ: the Cauchy point is −σ·unit


def dogleg(
    newton: torch.Tensor,
    grad: torch.Tensor,
    j_dir: torch.Tensor,
    diag: torch.Tensor,
    radius: torch.Tensor,
) -> torch.Tensor:
    """The dogleg step per sample for min ‖g + J p‖ subject to ‖D p‖ ≤ Δ (see ``dogleg_path``)."""
    return dogleg_path(newton, grad, j_dir, diag, radius).step


def dogleg_path(
    newton: torch.Tensor,
    grad: torch.Tensor,
    j_dir: torch.Tensor,
    diag: torch.Tensor,
    radius: torch.Tensor,
) -> DoglegPath:
    """The dogleg step per sample for min ‖g + J p‖ subject to ‖D p‖ ≤ Δ, with its make-up.

    ``newton`` is the (Gauss–)Newton step −J⁻¹g, ``grad`` = Jᵀg, ``diag`` the scaling D and
    ``j_dir`` = J D⁻² Jᵀg. In the scaled variable q = D p the steepest-descent direction is
    −D⁻¹Jᵀg; the model's minimiser along it (the Cauchy point) lies at scaled length
    σ = ‖D⁻¹Jᵀg‖³/‖J D⁻²Jᵀg‖². Then: the Newton step when ‖D p_N‖ ≤ Δ; the steepest-descent
    step of scaled length Δ when σ ≥ Δ; otherwise the point where the segment from the Cauchy
    point to the Newton step leaves the ball. A zero gradient leaves the Newton step shortened
    to the boundary.
    """
    tiny = torch.finfo(grad.dtype).tiny
    qnorm = torch.linalg.vector_norm(diag * newton, dim=1)
    scaled_grad = grad / diag
    gnorm = torch.linalg.vector_norm(scaled_grad, dim=1)
    unit = scaled_grad / (gnorm.clamp_min(tiny)[:, None] * diag)  # ‖D unit‖ = 1
    j_unit = j_dir / gnorm.clamp_min(tiny)[:, None]  # J·unit
    sgnorm = gnorm / j_unit.square().sum(dim=1).clamp_min(tiny)
    cauchy = -sgnorm[:, None] * unit
    # ‖D(c + τ(N − c))‖ = Δ for τ in [0, 1], in the cancellation-free form of the quadratic's root.
    diff = diag * (newton - cauchy)
    dc = diag * cauchy
    a = diff.square().sum(dim=1)
    b = 2 * (dc * diff).sum(dim=1)
    cc = dc.square().sum(dim=1) - radius.square()
    disc = torch.sqrt((b.square() - 4 * a * cc).clamp_min(0))
    tau = torch.where(
        b >= 0, -2 * cc / (b + disc).clamp_min(tiny), (disc - b) / (2 * a).clamp_min(tiny)
    ).clamp(0, 1)
    blend = cauchy + tau[:, None] * (newton - cauchy)
    steepest = -radius[:, None] * unit
    step = torch.where((sgnorm >= radius)[:, None], steepest, blend)
    along_newton = torch.where(sgnorm >= radius, 0.0, tau)
    along_unit = torch.where(sgnorm >= radius, -radius, -(1 - tau) * sgnorm)
    shrink = radius / qnorm.clamp_min(tiny)
    flat = gnorm == 0
    step = torch.where(flat[:, None], shrink[:, None] * newton, step)
    along_newton = torch.where(flat, shrink, along_newton)
    along_unit = torch.where(flat, 0.0, along_unit)
    inside = (qnorm <= radius) & torch.isfinite(qnorm)
    step = torch.where(inside[:, None], newton, step)
    along_newton = torch.where(inside, 1.0, along_newton)
    along_unit = torch.where(inside, 0.0, along_unit)
    return DoglegPath(step, along_newton, along_unit, unit, j_unit, sgnorm)


@dataclass
class Factored:
    """J D⁻¹ = U diag(σ) Vᵀ per sample, for Levenberg–Marquardt steps at any damping."""

    u: torch.Tensor  # (B, n, n)
    sigma: torch.Tensor  # (B, n)
    vh: torch.Tensor  # (B, n, n)


def factor_scaled(jac: torch.Tensor, diag: torch.Tensor) -> Factored:
    """The SVD of J D⁻¹ (a non-finite J is replaced by zero: it then gives zero steps)."""
    finite = finite_matrices(jac)
    safe = torch.where(finite[:, None, None], jac, 0.0) / diag[:, None, :]
    u, s, vh = svd(safe)
    return Factored(u, s, vh)


def damped_step(
    f: Factored, diag: torch.Tensor, g: torch.Tensor, lam: torch.Tensor
) -> torch.Tensor:
    """p = −D⁻¹ V diag(σ/(σ² + λ)) Uᵀ g: the minimiser of ‖g + J p‖² + λ‖D p‖²."""
    # Uᵀg and V(w·Uᵀg) as row-vector products (gᵀU, (w·Uᵀg)ᵀVᵀ): see ``dense.matvec``.
    ug = torch.bmm(g.unsqueeze(1), f.u).squeeze(1)
    weights = f.sigma / (f.sigma.square() + lam[:, None]).clamp_min(torch.finfo(g.dtype).tiny)
    q = torch.bmm((weights * ug).unsqueeze(1), f.vh).squeeze(1)
    return -q / diag
