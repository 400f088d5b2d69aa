"""The Jacobian J = ∂f/∂z of the fixed-point map: spectral radius, 2-norm, damping range, conditioning.

Everything here evaluates the problem through its *uncounted* ``raw_f``/``raw_g`` with plain
reverse-mode autograd, so the diagnostics never change a solve's nfev/JVP/VJP counts. (Not torch.func:
its first use can import torch._dynamo, which costs seconds, and diagnostics run after every solve.)

Small n (``dense_max_dim``): J is formed densely and analysed exactly (eigenvalues, singular values).
Larger n: ‖J‖₂ by Golub–Kahan bidiagonalisation (JVP + VJP per step) and ρ(J) by Arnoldi on J (JVP
per step), both from ``deqcli.linalg``; both are estimates, reported with their product counts.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from deqcli.diagnostics.settings import DiagnosticOptions
from deqcli.linalg.krylov import golub_kahan, random_start, ritz_values, sigma_max, sigma_min
from deqcli.linalg.operators import Linearisation, _grad, jacobian_operator

if TYPE_CHECKING:
    from deqcli.problems.base import Problem

# How many eigenvalues (largest modulus first) a sample's JSON lists.
EIGENVALUES_SHOWN = 6
# The largest damping the best-β search considers: the fixed_point solver needs β < 2.
BETA_CEILING = 1.99
# Step halvings per Newton step when locating a fixed point.
LOCATE_BACKTRACKS = 10
# Autodiff through a user's map can fail in many ways; these are reported, never raised.
AUTODIFF_ERRORS = (RuntimeError, ValueError, TypeError, NotImplementedError, IndexError)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row."""
    return torch.linalg.vector_norm(x, dim=-1)


def subset(problem: Problem, rows: list[int]) -> Problem:
    """The problem restricted to some samples, per-sample inputs with them (``Problem.subset``)."""
    return problem.subset(rows)


def dense_fits(problem: Problem, opts: DiagnosticOptions, batch: int | None = None) -> bool:
    """Whether the dense analysis is allowed for this size (n and batch·n²)."""
    n = problem.dim
    b = problem.batch if batch is None else batch
    return n <= opts.dense_max_dim and b * n * n <= opts.dense_max_elements


# The Jacobian at a point as a batched operator (VJPs by backward passes through one kept graph,
# JVPs by the double-backward trick): the one implementation in the linear-operator layer.
Linearised = Linearisation


def jacobian_f(problem: Problem, z: torch.Tensor) -> torch.Tensor:
    """Dense per-sample Jacobian of f at the rows of z, shape (batch, n, n), uncounted."""
    return Linearised(problem.raw_f, z).dense()


# -- damping analysis from a spectrum -----------------------------------------------------------


def damped_radius(eigs: np.ndarray, beta: float) -> float:
    """ρ of the damped iteration z ← z − β g(z): max |1 − β + β λ| over the eigenvalues λ of J."""
    return float(np.max(np.abs(1.0 - beta + beta * eigs))) if eigs.size else 0.0


def damping_range(eigs: np.ndarray) -> dict[str, Any]:
    """Which damping factors β make z ← z − β g(z) locally convergent, and the best one.

    With μ = 1 − λ the eigenvalues of J_g, the damped map has eigenvalues 1 − β μ; |1 − β μ| < 1 for
    all μ exactly when every Re μ > 0 and β < min 2 Re μ / |μ|². The best β minimises the convex
    function max |1 − β μ|, found by ternary search on (0, BETA_CEILING] (fixed_point needs β < 2).
    """
    if eigs.size == 0:
        return {"stabilisable": True, "beta_max": 2.0, "beta_best": 1.0, "rate_best": 0.0}
    mu = 1.0 - eigs
    if np.any(mu.real <= 0):
        worst = eigs[np.argmin(mu.real)]
        return {
            "stabilisable": False,
            "beta_max": None,
            "beta_best": None,
            "rate_best": None,
            "blocking_eigenvalue": _pair(worst),
        }
    beta_max = float(np.min(2.0 * mu.real / np.abs(mu) ** 2))
    lo, hi = 0.0, BETA_CEILING
    for _ in range(100):  # (2/3)^100 ≈ 2e-18 of the interval: converged
        a, b = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if damped_radius(eigs, a) <= damped_radius(eigs, b):
            hi = b
        else:
            lo = a
    best = (lo + hi) / 2
    return {
        "stabilisable": beta_max > 0,
        "beta_max": min(beta_max, 2.0),
        "beta_best": best,
        "rate_best": damped_radius(eigs, best),
    }


def _pair(value: complex) -> list[float]:
    return [float(np.real(value)), float(np.imag(value))]


def _spectrum_summary(eigs: np.ndarray, beta: float | None) -> dict[str, Any]:
    order = np.argsort(-np.abs(eigs), kind="stable")
    top = eigs[order[:EIGENVALUES_SHOWN]]
    out: dict[str, Any] = {
        "spectral_radius": float(np.max(np.abs(eigs))) if eigs.size else 0.0,
        "dominant_eigenvalue": _pair(top[0]) if top.size else None,
        "eigenvalues": [_pair(e) for e in top],
        "damping": damping_range(eigs),
    }
    if beta is not None:
        out["iteration_beta"] = beta
        out["iteration_spectral_radius"] = damped_radius(eigs, beta)
    return out


# -- analysis at given points ------------------------------------------------------------------


def analyse_points(
    problem: Problem,
    z: torch.Tensor,
    opts: DiagnosticOptions,
    *,
    beta: float | None = None,
    residual_jacobian: bool = True,
) -> list[dict[str, Any]]:
    """ρ(J), ‖J‖₂ and (dense only) cond(J_g) at row b of z for every sample b.

    ``beta`` (the fixed_point solver's damping) adds ρ(I − β J_g), the predicted linear rate.
    Rows with non-finite entries get ``{"error": ...}``.
    """
    finite = torch.isfinite(z).all(dim=1).tolist()
    safe = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    try:
        if dense_fits(problem, opts):
            out = _dense(problem, safe, beta, residual_jacobian)
        else:
            out = _matrix_free(problem, safe, opts, beta)
    except AUTODIFF_ERRORS as exc:
        reason = f"the Jacobian could not be computed: {str(exc).splitlines()[0]}"
        return [{"error": reason} for _ in finite]
    return [
        o if ok else {"error": "the point is not finite"} for o, ok in zip(out, finite, strict=True)
    ]


def _dense(
    problem: Problem, z: torch.Tensor, beta: float | None, residual_jacobian: bool
) -> list[dict[str, Any]]:
    jac = jacobian_f(problem, z).to("cpu", torch.float64).numpy()
    n = z.shape[1]
    out: list[dict[str, Any]] = []
    for b in range(z.shape[0]):
        J = jac[b]
        if not np.all(np.isfinite(J)):
            out.append({"error": "the Jacobian is not finite here"})
            continue
        eigs = np.linalg.eigvals(J)
        sv = np.linalg.svd(J, compute_uv=False)
        item: dict[str, Any] = {
            "method": "dense",
            "estimate": False,
            "norm2": float(sv[0]),
            **_spectrum_summary(eigs, beta),
        }
        if residual_jacobian:
            svg = np.linalg.svd(np.eye(n) - J, compute_uv=False)
            item["residual_jacobian"] = _conditioning(svg)
        out.append(item)
    return out


def _conditioning(sv: np.ndarray) -> dict[str, Any]:
    smax, smin = float(sv[0]), float(sv[-1])
    return {
        "sigma_max": smax,
        "sigma_min": smin,
        "cond": smax / smin if smin > 0 else math.inf,
    }


def power_norm(lin: Linearised, iterations: int, seed: int) -> tuple[torch.Tensor, int]:
    """‖J‖₂ per row; returns (estimates, products of each kind).

    Golub–Kahan bidiagonalisation with ``iterations`` + 1 steps (as many JVPs, one VJP fewer: the
    cost of ``iterations`` power steps on JᵀJ), whose largest Ritz singular value converges
    faster than power iteration's.
    """
    res = golub_kahan(lin, random_start(lin, seed), iterations + 1)
    sigma = torch.stack([s[0] for s in res.singular_values()])
    return sigma.to(lin.device, lin.dtype), iterations + 1


def arnoldi_ritz(lin: Linearised, steps: int, seed: int) -> np.ndarray:
    """Ritz values of J per row from ``steps`` Arnoldi steps (rows: samples); shape (batch, steps).

    On breakdown (an invariant subspace was found) the remaining basis vectors are zero, which only
    adds zero Ritz values, so the largest modulus is unaffected.
    """
    if lin.batch == 0:
        return np.zeros((0, min(steps, lin.dim)))
    return ritz_values(lin, steps, seed=seed + 1).numpy()


def _matrix_free(
    problem: Problem, z: torch.Tensor, opts: DiagnosticOptions, beta: float | None
) -> list[dict[str, Any]]:
    lin = Linearised(problem.raw_f, z)
    norms, power_products = power_norm(lin, opts.power_iterations, opts.seed)
    ritz = arnoldi_ritz(lin, opts.arnoldi_steps, opts.seed)
    out = []
    for b in range(z.shape[0]):
        eigs = ritz[b]
        if not np.all(np.isfinite(eigs)) or not math.isfinite(float(norms[b])):
            out.append({"error": "the Jacobian products are not finite here"})
            continue
        out.append(
            {
                "method": "matrix-free",
                "estimate": True,
                "norm2": float(norms[b]),
                "power_iterations": opts.power_iterations,
                "arnoldi_steps": int(ritz.shape[1]),
                "products": {"jvp": power_products + int(ritz.shape[1]), "vjp": power_products - 1},
                **_spectrum_summary(eigs, beta),
            }
        )
    return out


# -- σ_min(J_g) for the forward-error estimate --------------------------------------------------


def residual_sigma(
    problem: Problem, z: torch.Tensor, opts: DiagnosticOptions, *, smallest: bool = True
) -> list[dict[str, Any]]:
    """σ_min, σ_max and cond of the residual Jacobian J_g = I − J at each row of z, uncounted.

    Exact (dense SVD) while the dense analysis fits (``dense_max_dim``, ``dense_max_elements``);
    above that estimated matrix-free by the linear-operator layer: σ_max by Golub–Kahan and σ_min by
    inverse Lanczos on (J_gᵀJ_g)⁻¹ (``deqcli.linalg.sigma_min``), both with
    ``arnoldi_steps`` steps, for every row at once. Without ``smallest`` the matrix-free path
    estimates σ_max alone (σ_min's inner solves are most of the cost). Rows whose point or
    Jacobian is not finite get ``{"error": ...}``.
    """
    if not dense_fits(problem, opts, batch=z.shape[0]):
        return _residual_sigma_matrix_free(problem, z, opts, smallest)
    safe = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    jac = jacobian_f(problem, safe).to("cpu", torch.float64).numpy()
    eye = np.eye(z.shape[1])
    out: list[dict[str, Any]] = []
    for b in range(z.shape[0]):
        if not (np.all(np.isfinite(jac[b])) and bool(torch.isfinite(z[b]).all())):
            out.append({"error": "the Jacobian is not finite here"})
            continue
        out.append(
            {"method": "dense", **_conditioning(np.linalg.svd(eye - jac[b], compute_uv=False))}
        )
    return out


# Matvecs one inner GMRES solve of the inverse Lanczos may spend: a J_g so ill-conditioned that
# GMRES needs more is reported as such (its σ_min estimate is then an upper bound).
SIGMA_MIN_MATVECS = 400


def _residual_sigma_matrix_free(
    problem: Problem, z: torch.Tensor, opts: DiagnosticOptions, smallest: bool
) -> list[dict[str, Any]]:
    finite = torch.isfinite(z).all(dim=1)
    safe = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    op = jacobian_operator(problem, safe, of="g", counted=False)
    steps = opts.arnoldi_steps
    high = sigma_max(op, steps=steps, seed=opts.seed)
    if not smallest:
        return [
            {"method": "golub-kahan", "estimate": True, "sigma_max": float(value)}
            if bool(finite[b]) and math.isfinite(float(value))
            else {"error": "the Jacobian is not finite here"}
            for b, value in enumerate(high.value.tolist())
        ]
    low = sigma_min(op, steps=steps, max_matvecs=SIGMA_MIN_MATVECS, seed=opts.seed)
    products = {"jvp": low.matvecs + high.matvecs, "vjp": low.rmatvecs + high.rmatvecs}
    out: list[dict[str, Any]] = []
    for b in range(z.shape[0]):
        smin, smax = float(low.value[b]), float(high.value[b])
        if not (bool(finite[b]) and math.isfinite(smin) and math.isfinite(smax)):
            out.append({"error": "the Jacobian is not finite here"})
            continue
        # Both are Krylov estimates: σ_max from below, σ_min from above, so cond is a lower bound.
        sv = np.array([max(smax, smin), smin])
        out.append(
            {"method": low.method, "estimate": True, "products": products, **_conditioning(sv)}
        )
    return out


# -- locating a fixed point, cycles, conditioning along the iterates ----------------------------


def _lstsq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The least-squares solutions x of a x = b, batched, on the CPU, by the SVD (LAPACK's gelsd).

    Not torch's default driver gelsy (QR with column pivoting): with MKL, its pivots, and so the
    last bits of x, depend on where the matrix lies in memory. A located fixed point at exactly 0
    came out as 0.0 or -5.0e-92 from one solve to the next of the same problem in one process.
    """
    return torch.linalg.lstsq(a.cpu(), b.cpu()[..., None], driver="gelsd").solution[..., 0]


def locate_fixed_points(
    problem: Problem, starts: torch.Tensor, tol: torch.Tensor, opts: DiagnosticOptions
) -> tuple[torch.Tensor, list[bool], list[float]]:
    """Newton's method on g from each row of ``starts`` (dense J_g, backtracking), uncounted.

    Returns the points, whether each is a fixed point (‖g‖ ≤ ``tol``, one tolerance per row, fixed
    by the caller from the problem's own scale — never from the located point's norm, which may
    have run off to 1e21), and the residual there. Used to analyse the fixed point that a failed
    iteration missed.
    """
    usable = torch.isfinite(starts).all(dim=1, keepdim=True)
    z = torch.where(usable, starts, problem.z0).detach().clone()
    n = z.shape[1]
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    tol = tol.to(z.device, z.dtype)

    def tolerance(x: torch.Tensor) -> torch.Tensor:
        return tol

    g = problem.raw_g(z).detach()
    # Rows whose line search fails are given up on (e.g. a local minimum of ‖g‖ with no root).
    alive = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    for _ in range(opts.locate_max_iter):
        res = row_norms(g)
        todo = alive & torch.isfinite(res) & (res > tolerance(z))
        if not bool(todo.any()):
            break
        jac_g = eye - jacobian_f(problem, z)
        step = -_lstsq(jac_g, g).to(z.device)
        alpha = torch.ones_like(res)
        z_new = z + step
        g_new = problem.raw_g(z_new).detach()
        for _ in range(LOCATE_BACKTRACKS):
            bad = ~(row_norms(g_new) <= (1 - 1e-4 * alpha) * res)
            if not bool((bad & todo).any()):
                break
            alpha = torch.where(bad, alpha / 2, alpha)
            z_try = z + alpha[:, None] * step
            g_try = problem.raw_g(z_try).detach()
            z_new = torch.where(bad[:, None], z_try, z_new)
            g_new = torch.where(bad[:, None], g_try, g_new)
        decreased = row_norms(g_new) <= (1 - 1e-4 * alpha) * res
        alive &= decreased
        keep = (todo & decreased)[:, None]
        z = torch.where(keep, z_new, z)
        g = torch.where(keep, g_new, g)
    res = row_norms(g)
    ok = (torch.isfinite(res) & (res <= tolerance(z))).tolist()
    return z, ok, res.tolist()


def locate_minima(
    problem: Problem, starts: torch.Tensor, opts: DiagnosticOptions
) -> tuple[torch.Tensor, list[float], list[float]]:
    """Damped Newton's method on φ = ½‖g‖² from each row of ``starts`` (exact Hessian by autograd,
    dense), uncounted.

    Returns the points, the stationarity ratio ``stationarity`` reports there and ‖g‖ there. Used
    to confirm that a sample hovering at a nonzero ‖g‖ circles a local minimum of ‖g‖ (where
    J_gᵀg = 0 but g ≠ 0), not a root. The exact Hessian JᵀJ + Σ gᵢ∇²gᵢ matters: at a nonzero
    minimum the Gauss–Newton part alone can be singular, and then converges only slowly.
    """
    z = starts.detach().clone()
    n = z.shape[1]
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    mu = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
    phi = 0.5 * row_norms(problem.raw_g(z).detach()) ** 2
    for _ in range(opts.locate_max_iter):
        grad, hess = _phi_derivatives(problem, z)
        if not bool(torch.isfinite(hess).all()):
            break
        scale = hess.diagonal(dim1=1, dim2=2).abs().mean(dim=1).clamp_min(torch.finfo(z.dtype).tiny)
        step = -_lstsq(hess + (mu * scale)[:, None, None] * eye, grad).to(z.device)
        z_new = z + step
        phi_new = 0.5 * row_norms(problem.raw_g(z_new).detach()) ** 2
        better = phi_new < phi
        z = torch.where(better[:, None], z_new, z)
        phi = torch.where(better, phi_new, phi)
        mu = torch.where(better, mu / 10, torch.clamp_min(mu * 10, 1e-8)).clamp_max(1e12)
    return z, stationarity(problem, z, opts), torch.sqrt(2 * phi).tolist()


def _phi_derivatives(problem: Problem, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """∇φ and ∇²φ of φ = ½‖g‖² at each row of z: (B, n) and (B, n, n), by double backward."""
    batch, n = z.shape
    with torch.enable_grad():
        x = z.detach().requires_grad_(True)
        g = problem.raw_g(x)
        phi = 0.5 * (g * g).sum()  # rows are independent: the gradient of the sum is per row
        grad = _grad(phi, x, create_graph=True)
        if grad is None:
            zero = torch.zeros_like(z)
            return zero, torch.zeros(batch, n, n, dtype=z.dtype, device=z.device)
        rows = []
        for i in range(n):
            h = _grad(grad[:, i].sum(), x) if grad.requires_grad else None
            rows.append(torch.zeros_like(z) if h is None else h.detach())
    return grad.detach(), torch.stack(rows, dim=1)


def cycle_multipliers(problem: Problem, cycles: list[torch.Tensor]) -> list[float]:
    """ρ of J(c_p)···J(c_1) for each sample's cycle points (rows of ``cycles[b]``, shape (p_b, n)).

    Below 1 the cycle attracts nearby iterates (it is stable), above 1 it repels.
    """
    batch = len(cycles)
    longest = max(c.shape[0] for c in cycles)
    product = [np.eye(problem.dim) for _ in range(batch)]
    for i in range(longest):
        rows = torch.stack([c[min(i, c.shape[0] - 1)] for c in cycles])
        jac = jacobian_f(problem, rows.to(problem.device, problem.dtype))
        jac = jac.to("cpu", torch.float64).numpy()
        for b, c in enumerate(cycles):
            if i < c.shape[0]:
                product[b] = jac[b] @ product[b]
    return [float(np.max(np.abs(np.linalg.eigvals(p)))) for p in product]


def residual_conditioning(
    problem: Problem, points: torch.Tensor
) -> list[list[dict[str, Any] | None]]:
    """cond(J_g), σ_min, σ_max at points[t, b] for each kept iterate t and sample b (dense)."""
    n = problem.dim
    eye = np.eye(n)
    table: list[list[dict[str, Any] | None]] = []
    for t in range(points.shape[0]):
        z = points[t].to(problem.device, problem.dtype)
        row: list[dict[str, Any] | None] = []
        jac = jacobian_f(problem, torch.where(torch.isfinite(z), z, torch.zeros_like(z)))
        jac = jac.to("cpu", torch.float64).numpy()
        for b in range(z.shape[0]):
            J = jac[b]
            if not np.all(np.isfinite(J)) or not bool(torch.isfinite(z[b]).all()):
                row.append(None)
                continue
            row.append(_conditioning(np.linalg.svd(eye - J, compute_uv=False)))
        table.append(row)
    return table


def stationarity(problem: Problem, z: torch.Tensor, opts: DiagnosticOptions) -> list[float]:
    """‖J_gᵀ g‖ / (S ‖g‖) per row, S = max(‖J_g(z)‖₂, ‖J_g(z0)‖₂): near 0 at a stationary point of
    ½‖g‖² that is not a root. The reference ‖J_g(z0)‖₂ keeps the ratio meaningful where J_g
    itself vanishes (in one dimension ‖J_gᵀg‖/(‖J_g‖‖g‖) is 1 wherever J_g ≠ 0)."""
    safe = torch.where(torch.isfinite(z), z, torch.zeros_like(z))
    lin = Linearised(problem.raw_g, safe)
    g = lin.value
    grad = lin.vjp(g)
    steps = min(opts.power_iterations, 20)
    norm_g, _ = power_norm(lin, steps, opts.seed)
    norm_start, _ = power_norm(Linearised(problem.raw_g, problem.z0), steps, opts.seed)
    denom = torch.maximum(norm_g, norm_start) * row_norms(g)
    ratio = row_norms(grad) / denom.clamp_min(torch.finfo(z.dtype).tiny)
    return [float(r) for r in ratio.detach().cpu()]
