"""Batched Krylov methods on ``LinearOperator``: GMRES, Arnoldi Ritz values, singular values.

Every row of a (B, n) batch is its own system with its own Krylov space: inner products, norms,
rotations and stopping decisions are per row, and one batched product advances every row.

- ``gmres``: restarted GMRES with Givens rotations, per-row convergence, an optional right
  preconditioner, and breakdown and stagnation tests that are relative (scale-invariant: a
  system multiplied by 10⁸ takes the same steps).
- ``arnoldi`` / ``ritz_values``: the Hessenberg matrix of A on a Krylov space; its eigenvalues
  estimate the extreme eigenvalues of A (a spectral radius, for instance).
- ``golub_kahan`` / ``sigma_max`` / ``sigma_min``: Golub–Kahan–Lanczos bidiagonalisation for the
  singular values of A; σ_min for n beyond the bidiagonalisation's reach by Lanczos on (AᵀA)⁻¹
  with GMRES solves.

Orthogonalisation is classical Gram–Schmidt applied twice ("twice is enough"): as orthogonal as
modified Gram–Schmidt in floating point, with two batched products instead of a loop.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from deqcli.linalg.dense import matvec
from deqcli.linalg.operators import LinearOperator

# A new Krylov vector whose norm after orthogonalisation is below this multiple of ε times its
# norm before (‖A v_j‖) lies in the space already built: a breakdown (exact in exact arithmetic).
BREAKDOWN = 100.0
# A preconditioner's own products (``product``: A M⁻¹v from the solve that gave M⁻¹v) are taken
# when their error, measured against a true product at a solve's first step, is this many times
# below every row's tolerance. On the hard family the float32 shared linearisation's products
# were 2e-7–3e-6 off, and GMRES's residual estimate then tracked the true residual to 2e-5.
FUSED_MARGIN = 100.0
# A restarted cycle ending with a true residual above this multiple of ε·(‖A‖‖x‖ + ‖b‖) can still
# improve; below it rounding in A x dominates and further cycles cannot help.
ATTAINABLE = 10.0


@dataclass
class KrylovResult:
    """What ``gmres`` returns: the solutions and, per row, how far each got."""

    x: torch.Tensor  # (B, n)
    residual: torch.Tensor  # (B,) true relative residual ‖b − A x‖/‖b‖ (0 where b = 0)
    converged: torch.Tensor  # (B,) met max(atol, rtol·‖b‖)
    stagnated: torch.Tensor  # (B,) stopped early: a cycle made no progress, or rounding level
    iterations: torch.Tensor  # (B,) Krylov steps each row took (int64)
    matvecs: int  # batched products with A used (each advances every row)
    # (B,) products each row needed (int64): its Krylov steps and the residuals recomputed while
    # it was open; what the row alone would have used, for counting per sample.
    products: torch.Tensor
    # Of the ``matvecs``, those the preconditioner's solves gave (``_Products``), not A.
    from_solves: int = 0


def _orthogonalise(
    basis: torch.Tensor, count: int, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonalise the rows of ``w`` (B, n) against basis[:, :count] (CGS2); (w ⊥, coefficients)."""
    # Row vectors (B, 1, n) against the basis rows: the layout torch's CPU bmm runs through
    # BLAS (see ``dense.matvec``), 4-7 times faster than column vectors (B, n, 1).
    vj = basis[:, :count]
    vt = vj.transpose(1, 2)
    h = torch.bmm(w.unsqueeze(1), vt)
    w2 = torch.baddbmm(w.unsqueeze(1), h, vj, alpha=-1)
    h2 = torch.bmm(w2, vt)
    w2 = torch.baddbmm(w2, h2, vj, alpha=-1)
    return w2.squeeze(1), (h + h2).squeeze(1)


def _norms(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=-1)


def gmres(
    op: LinearOperator,
    b: torch.Tensor,
    *,
    x0: torch.Tensor | None = None,
    rtol: float | torch.Tensor = 1e-8,
    atol: float = 0.0,
    restart: int = 30,
    max_matvecs: int | None = None,
    precond: Callable[[torch.Tensor], torch.Tensor] | None = None,
    active: torch.Tensor | None = None,
    true_residual: bool = True,
) -> KrylovResult:
    """Solve A x = b for every row by restarted GMRES(``restart``).

    A row stops when its true residual meets max(atol, rtol·‖b‖), when a whole restart cycle left
    its residual where it was (restarted GMRES then repeats itself exactly), when its residual is
    at the level rounding in A x allows (ε·(‖A‖‖x‖ + ‖b‖), ‖A‖ estimated from the products), or
    when it becomes non-finite. The run ends when no row is left or after ``max_matvecs``
    products (default 10·n), counting the residual recomputed after each cycle. ``precond`` M⁻¹
    (optional) preconditions from the right: GMRES runs on A M⁻¹ and the residual it minimises is
    the true one. The preconditioned vectors z_j = M⁻¹ v_j are kept and x is built from them
    (flexible GMRES), so A Z = V₊ H̄ holds for the vectors actually used: M⁻¹ may be inexact (a
    factorisation in lower precision) without costing the solution any accuracy. Rows outside ``active`` are not iterated (they return x0, or zeros). ``rtol``
    may be a (B,) tensor: one relative tolerance per row (an inexact Newton's forcing terms).
    ``true_residual: false`` skips the product that recomputes b − A x after the last cycle and
    reports the rotated estimate instead (an inexact Newton step needs the direction, not a
    certificate); restarts still use true residuals.
    """
    batch, n = b.shape
    dtype, device = b.dtype, b.device
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    budget = 10 * n if max_matvecs is None else max_matvecs
    m_max = max(1, min(restart, n))
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    bnorm = _norms(b)
    target = torch.clamp_min(rtol * bnorm, atol)
    used = 0
    products = torch.zeros(batch, dtype=torch.int64, device=device)
    if x0 is None:
        r = b.clone()
    else:
        r = b - op.matvec(x)
        used += 1
        products += 1 if active is None else active.to(torch.int64)
    beta = _norms(r)
    open_ = torch.isfinite(beta) & (beta > target)
    if active is not None:
        open_ &= active
    stagnated = torch.zeros(batch, dtype=torch.bool, device=device)
    steps = torch.zeros(batch, dtype=torch.int64, device=device)
    anorm = torch.zeros(batch, dtype=dtype, device=device)
    # A M⁻¹v for the steps; the preconditioner's own products where they are accurate enough for
    # the tolerance GMRES is asked (relative to the residual it starts from).
    products_of = _Products(op, precond, target / beta.clamp_min(tiny))
    reserve = 1 if true_residual else 0
    while bool(open_.any()) and used + reserve < budget:
        m = min(m_max, budget - used - reserve)
        # Only the rows written so far are ever read: no zeroing of the m + 1 rows, most of
        # which a preconditioned solve never uses.
        basis = torch.empty(batch, m + 1, n, dtype=dtype, device=device)
        basis[:, 0] = torch.where(open_[:, None], r / beta.clamp_min(tiny)[:, None], 0.0)
        # z_j = M⁻¹ v_j as used (see the docstring); without a preconditioner z_j = v_j.
        directions = (
            torch.empty(batch, m, n, dtype=dtype, device=device) if precond is not None else None
        )
        # Q accumulates the Givens rotations (so a new column is rotated by one product), R is
        # the rotated Hessenberg matrix, and Q e₁ β the rotated right-hand side.
        rot = torch.eye(m + 1, dtype=dtype, device=device).expand(batch, m + 1, m + 1).clone()
        upper = torch.zeros(batch, m, m, dtype=dtype, device=device)
        live = open_.clone()
        cols = torch.zeros(batch, dtype=torch.int64, device=device)
        for j in range(m):
            direction, w = products_of(basis[:, j], live)
            if directions is not None:
                directions[:, j] = direction
            used += 1
            products += live.to(torch.int64)
            size = _norms(w)
            # ‖A M⁻¹v‖/‖M⁻¹v‖ ≤ ‖A‖: the scale of rounding in A x, for the attainable accuracy.
            seen = torch.nan_to_num(size / _norms(direction).clamp_min(tiny))
            anorm = torch.where(live, torch.maximum(anorm, seen), anorm)
            w, h = _orthogonalise(basis, j + 1, w)
            h_next = _norms(w)
            broke = h_next <= BREAKDOWN * eps * size
            basis[:, j + 1] = torch.where(
                (live & ~broke)[:, None], w / h_next.clamp_min(tiny)[:, None], 0.0
            )
            column = torch.cat((h, torch.where(broke, 0.0, h_next)[:, None]), dim=1)
            c = matvec(rot[:, : j + 2, : j + 2], column)
            a, bb = c[:, j], c[:, j + 1]
            radius = torch.sqrt(a.square() + bb.square())
            safe = radius > tiny
            cs = torch.where(safe, a / radius.clamp_min(tiny), torch.ones_like(a))
            sn = torch.where(safe, bb / radius.clamp_min(tiny), torch.zeros_like(a))
            row_j, row_k = rot[:, j].clone(), rot[:, j + 1].clone()
            rot[:, j] = cs[:, None] * row_j + sn[:, None] * row_k
            rot[:, j + 1] = -sn[:, None] * row_j + cs[:, None] * row_k
            c[:, j] = torch.where(safe, radius, a)
            upper[:, : j + 1, j] = torch.where(live[:, None], c[:, : j + 1], upper[:, : j + 1, j])
            cols = torch.where(live, torch.full_like(cols, j + 1), cols)
            estimate = beta * rot[:, j + 1, 0].abs()
            finished = (estimate <= target) | broke | ~torch.isfinite(estimate)
            live &= ~finished
            if not bool(live.any()):
                break
        k = int(cols.max())
        if k == 0:
            break
        steps += cols
        rhs = beta[:, None] * rot[:, :k, 0]
        tri = upper[:, :k, :k]
        # Columns beyond a row's own count are made identity with a zero right-hand side; a zero
        # pivot (A singular on the Krylov space) gets a tiny stand-in relative to the row's scale,
        # and the true residual computed next reports the failure honestly.
        index = torch.arange(k, device=device)
        beyond = index[None, :] >= cols[:, None]
        diag = torch.diagonal(tri, dim1=1, dim2=2)
        scale = tri.abs().amax(dim=(1, 2)).clamp_min(tiny)
        small = diag.abs() <= eps * scale[:, None]
        fixed = torch.where(beyond, 1.0, torch.where(small, eps * scale[:, None], diag))
        tri = tri - torch.diag_embed(diag) + torch.diag_embed(fixed)
        tri = torch.where(beyond[:, None, :] | beyond[:, :, None], torch.diag_embed(fixed), tri)
        rhs = torch.where(beyond, 0.0, rhs)
        y = torch.linalg.solve_triangular(tri, rhs.unsqueeze(2), upper=True).squeeze(2)
        used_directions = basis[:, :k] if directions is None else directions[:, :k]
        update = torch.bmm(y.unsqueeze(1), used_directions).squeeze(1)
        update = torch.where(open_[:, None], torch.nan_to_num(update, nan=0.0), 0.0)
        x = x + update
        estimate = beta * rot[torch.arange(batch, device=device), cols, 0].abs()
        if not true_residual and (used >= budget or bool(((estimate <= target) | ~open_).all())):
            beta = torch.where(open_, estimate, beta)
            break
        r = b - op.matvec(x)
        used += 1
        # Alone, a row whose estimate met its target would have stopped before this product
        # (unless the true residual is asked for).
        products += (open_ & (true_residual | (estimate > target))).to(torch.int64)
        new_beta = _norms(r)
        floor = ATTAINABLE * eps * (anorm * _norms(x) + bnorm)
        stuck = open_ & ((new_beta >= beta) | (new_beta <= floor)) & (new_beta > target)
        stagnated |= stuck
        beta = torch.where(open_, new_beta, beta)
        open_ &= torch.isfinite(beta) & (beta > target) & ~stuck
    rel = torch.where(bnorm == 0, torch.zeros_like(beta), beta / bnorm.clamp_min(tiny))
    converged = beta <= target
    return KrylovResult(
        x, rel, converged, stagnated, steps, used, products, products_of.from_solves
    )


class _Products:
    """The products A M⁻¹v a Krylov method's steps need, as (M⁻¹v, A M⁻¹v) (M⁻¹ = I without a
    preconditioner).

    A preconditioner with a ``product`` (A M⁻¹v from the solve that gave M⁻¹v, no product with
    A: ``SharedLinearisation``) has it measured against A's own at the first step, and used for
    the later ones where it is FUSED_MARGIN times closer to A's than ``tolerance`` (B,), the
    relative residual each row is to reach, asks; else every step takes A's product."""

    def __init__(
        self,
        op: LinearOperator,
        precond: Callable[[torch.Tensor], torch.Tensor] | None,
        tolerance: torch.Tensor,
    ) -> None:
        self.op = op
        self.precond = precond
        self.tolerance = tolerance
        self.fused = getattr(precond, "product", None)
        self.trusted = False
        self.from_solves = 0  # products the preconditioner's solves gave

    def __call__(self, v: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(M⁻¹v, A M⁻¹v) for unit rows ``v``; ``rows`` are those still iterating."""
        u = v if self.precond is None else self.precond(v)
        if self.trusted:
            self.from_solves += 1
            return u, self.fused(self.op, v, u)
        w = self.op.matvec(u)
        if self.fused is not None:  # the first step: measure, and decide once
            fused = self.fused(self.op, v, u)
            self.trusted = (
                fused is not None
                and bool(rows.any())
                and bool((FUSED_MARGIN * _norms(fused - w)[rows] <= self.tolerance[rows]).all())
            )
            if not self.trusted:
                self.fused = None
        return u, w


# -- Arnoldi ----------------------------------------------------------------------------------


@dataclass
class ArnoldiResult:
    """An orthonormal Krylov basis V (B, m+1, n) and Hessenberg H (B, m+1, m): A V_m = V_{m+1} H."""

    basis: torch.Tensor
    hessenberg: torch.Tensor
    size: torch.Tensor  # (B,) steps before a breakdown (an invariant subspace), at most m


def arnoldi(
    op: LinearOperator,
    start: torch.Tensor,
    steps: int,
    *,
    precond: Callable[[torch.Tensor], torch.Tensor] | None = None,
    tolerance: float = 0.0,
) -> ArnoldiResult:
    """``steps`` Arnoldi steps from ``start`` (B, n) with per-row, scale-invariant breakdown, on
    A or, with a right preconditioner ``precond`` M⁻¹, on A M⁻¹.

    After a row's breakdown its further basis vectors and Hessenberg entries are zero.
    ``tolerance``: the relative residual to which GMRES's residual will be read off H; where the
    preconditioner's own products are FUSED_MARGIN times more accurate, they stand in for A's
    (see ``_Products``; 0: A's products throughout).
    """
    batch, n = start.shape
    m = max(1, min(steps, n))
    eps = torch.finfo(start.dtype).eps
    tiny = torch.finfo(start.dtype).tiny
    basis = torch.zeros(batch, m + 1, n, dtype=start.dtype, device=start.device)
    hess = torch.zeros(batch, m + 1, m, dtype=start.dtype, device=start.device)
    basis[:, 0] = start / _norms(start).clamp_min(tiny)[:, None]
    alive = torch.ones(batch, dtype=torch.bool, device=start.device)
    size = torch.zeros(batch, dtype=torch.int64, device=start.device)
    products_of = _Products(op, precond, torch.full_like(alive, tolerance, dtype=start.dtype))
    for j in range(m):
        _, w = products_of(basis[:, j], alive)
        scale = _norms(w)
        w, h = _orthogonalise(basis, j + 1, w)
        norm = _norms(w)
        hess[:, : j + 1, j] = torch.where(alive[:, None], h, 0.0)
        size = torch.where(alive, torch.full_like(size, j + 1), size)
        alive = alive & (norm > BREAKDOWN * eps * scale)
        hess[:, j + 1, j] = torch.where(alive, norm, 0.0)
        basis[:, j + 1] = torch.where(alive[:, None], w / norm.clamp_min(tiny)[:, None], 0.0)
        if not bool(alive.any()):
            break
    return ArnoldiResult(basis, hess, size)


def ritz_values(op: LinearOperator, steps: int, *, seed: int = 0) -> torch.Tensor:
    """Ritz values of A per row from ``steps`` Arnoldi steps, (B, m) complex128 on the CPU.

    The largest in modulus estimates ρ(A). A row that broke down early (its Krylov space is
    invariant, so its Ritz values are exact eigenvalues) is padded with zeros, which leave the
    largest modulus unchanged.
    """
    start = random_start(op, seed)
    res = arnoldi(op, start, steps)
    m = res.hessenberg.shape[2]
    square = res.hessenberg[:, :m, :m].to("cpu", torch.float64)
    return torch.linalg.eigvals(square)


def random_start(op: LinearOperator, seed: int) -> torch.Tensor:
    """Unit start vectors (B, n), drawn in float64 on the CPU from ``seed`` (reproducible)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    v = torch.randn(op.batch, op.dim, generator=gen, dtype=torch.float64)
    v = v.to(op.device, op.dtype)
    return v / _norms(v).clamp_min(torch.finfo(op.dtype).tiny)[:, None]


# -- singular values ------------------------------------------------------------------------------


@dataclass
class Bidiagonal:
    """Golub–Kahan bidiagonalisation A V = U B: diagonal α (B, k), superdiagonal β (B, k)."""

    alpha: torch.Tensor
    beta: torch.Tensor
    size: torch.Tensor  # (B,) steps before a breakdown, at most k
    matvecs: int
    rmatvecs: int

    def singular_values(self) -> list[torch.Tensor]:
        """Per row, the singular values of its k×k upper bidiagonal block (float64, descending)."""
        alpha = self.alpha.to("cpu", torch.float64)
        beta = self.beta.to("cpu", torch.float64)
        out: list[torch.Tensor] = [torch.zeros(0, dtype=torch.float64)] * alpha.shape[0]
        for k in sorted(set(self.size.tolist())):
            rows = (self.size.cpu() == k).nonzero().flatten()
            if k == 0:
                for r in rows.tolist():
                    out[r] = torch.zeros(1, dtype=torch.float64)
                continue
            mat = torch.diag_embed(alpha[rows, :k]) + torch.diag_embed(beta[rows, : k - 1], 1)
            values = torch.linalg.svdvals(mat)
            for i, r in enumerate(rows.tolist()):
                out[r] = values[i]
        return out


def golub_kahan(
    op: LinearOperator, start: torch.Tensor, steps: int, *, last_rmatvec: bool = False
) -> Bidiagonal:
    """``steps`` Golub–Kahan–Lanczos steps from ``start`` with full re-orthogonalisation.

    Full re-orthogonalisation keeps both bases orthonormal, so the bidiagonal's singular values are
    Ritz values of A's without spurious copies. The last step's Aᵀ product is only needed to go on;
    it is skipped unless ``last_rmatvec``.
    """
    batch, n = start.shape
    k = max(1, min(steps, n))
    eps = torch.finfo(start.dtype).eps
    tiny = torch.finfo(start.dtype).tiny
    opts = {"dtype": start.dtype, "device": start.device}
    right = torch.zeros(batch, k + 1, n, **opts)
    left = torch.zeros(batch, k, n, **opts)
    alpha = torch.zeros(batch, k, **opts)
    beta = torch.zeros(batch, k, **opts)
    right[:, 0] = start / _norms(start).clamp_min(tiny)[:, None]
    alive = torch.ones(batch, dtype=torch.bool, device=start.device)
    size = torch.zeros(batch, dtype=torch.int64, device=start.device)
    matvecs = rmatvecs = 0
    for j in range(k):
        u = op.matvec(right[:, j])
        matvecs += 1
        scale = _norms(u)
        if j:
            u, _ = _orthogonalise(left, j, u)
        a = _norms(u)
        ok = alive & (a > BREAKDOWN * eps * scale) & (scale > 0)
        # A zero α means A v_j = 0 on this space: σ = 0 is exact for it.
        alpha[:, j] = torch.where(alive, torch.where(ok, a, 0.0), 0.0)
        size = torch.where(alive, torch.full_like(size, j + 1), size)
        left[:, j] = torch.where(ok[:, None], u / a.clamp_min(tiny)[:, None], 0.0)
        alive = ok
        if j == k - 1 and not last_rmatvec:
            break
        v = op.rmatvec(left[:, j])
        rmatvecs += 1
        scale = _norms(v)
        v, _ = _orthogonalise(right, j + 1, v)
        bnorm = _norms(v)
        more = alive & (bnorm > BREAKDOWN * eps * scale)
        beta[:, j] = torch.where(more, bnorm, 0.0)
        right[:, j + 1] = torch.where(more[:, None], v / bnorm.clamp_min(tiny)[:, None], 0.0)
        alive = more
        if not bool(alive.any()):
            break
    return Bidiagonal(alpha, beta, size, matvecs, rmatvecs)


@dataclass
class SingularEstimate:
    """A singular value per row and how it was found."""

    value: torch.Tensor  # (B,) float64 on the CPU
    method: str  # "golub-kahan" or "inverse lanczos"
    exact: bool  # True when the Krylov space spanned Rⁿ (the value is exact up to rounding)
    matvecs: int  # products with A
    rmatvecs: int  # products with Aᵀ


def sigma_max(op: LinearOperator, *, steps: int = 30, seed: int = 0) -> SingularEstimate:
    """σ_max(A) per row from ``steps`` Golub–Kahan steps (a lower bound that converges fast)."""
    res = golub_kahan(op, random_start(op, seed), steps)
    values = torch.stack([s[0] for s in res.singular_values()])
    return SingularEstimate(values, "golub-kahan", steps >= op.dim, res.matvecs, res.rmatvecs)


def sigma_min(
    op: LinearOperator,
    *,
    steps: int = 30,
    method: Literal["auto", "golub-kahan", "inverse"] = "auto",
    rtol: float | None = None,
    restart: int = 50,
    max_matvecs: int | None = None,
    seed: int = 0,
) -> SingularEstimate:
    """σ_min(A) per row: exactly (up to rounding) when n ≤ ``steps``, else estimated.

    ``golub-kahan`` runs min(steps, n) bidiagonalisation steps: with n steps the bidiagonal has A's
    singular values; with fewer its smallest is an upper bound on σ_min that converges slowly.
    ``inverse`` runs ``steps`` Lanczos steps on (AᵀA)⁻¹, each applied as two GMRES solves (Aᵀ y = v,
    then A w = y, to ``rtol``, default √ε·10⁻³): the largest eigenvalue θ of its tridiagonal gives
    σ_min ≈ θ^(−1/2), from above, and converges fast when σ_min is separated from the rest.
    ``auto`` takes ``golub-kahan`` when n ≤ steps and ``inverse`` otherwise. A singular row gives 0
    (or the tiny value rounding leaves).
    """
    n = op.dim
    if method == "auto":
        method = "golub-kahan" if n <= steps else "inverse"
    if method == "golub-kahan":
        res = golub_kahan(op, random_start(op, seed), steps)
        values = torch.stack([s[-1] for s in res.singular_values()])
        return SingularEstimate(values, "golub-kahan", steps >= n, res.matvecs, res.rmatvecs)
    eps = torch.finfo(op.dtype).eps
    tol = math.sqrt(eps) * 1e-3 if rtol is None else rtol
    counts = {"matvecs": 0, "rmatvecs": 0}

    def inverse_normal(v: torch.Tensor) -> torch.Tensor:
        first = gmres(op.T, v, rtol=tol, restart=restart, max_matvecs=max_matvecs)
        second = gmres(op, first.x, rtol=tol, restart=restart, max_matvecs=max_matvecs)
        counts["rmatvecs"] += first.matvecs
        counts["matvecs"] += second.matvecs
        return second.x

    theta = _lanczos_largest(inverse_normal, random_start(op, seed), min(steps, n))
    values = 1.0 / torch.sqrt(theta.clamp_min(1e-300))
    values = torch.where(torch.isfinite(theta), values, torch.full_like(values, math.nan))
    return SingularEstimate(values, "inverse lanczos", False, counts["matvecs"], counts["rmatvecs"])


def _lanczos_largest(
    apply: Callable[[torch.Tensor], torch.Tensor], start: torch.Tensor, steps: int
) -> torch.Tensor:
    """The largest Ritz value per row of a symmetric operator after ``steps`` Lanczos steps."""
    batch, n = start.shape
    eps = torch.finfo(start.dtype).eps
    tiny = torch.finfo(start.dtype).tiny
    basis = torch.zeros(batch, steps + 1, n, dtype=start.dtype, device=start.device)
    tri = torch.zeros(batch, steps, steps, dtype=torch.float64)
    basis[:, 0] = start / _norms(start).clamp_min(tiny)[:, None]
    alive = torch.ones(batch, dtype=torch.bool, device=start.device)
    size = torch.zeros(batch, dtype=torch.int64)
    for j in range(steps):
        w = apply(basis[:, j])
        scale = _norms(w)
        # Full re-orthogonalisation: the coefficients beyond the tridiagonal are rounding noise.
        w, h = _orthogonalise(basis, j + 1, w)
        tri[:, j, j] = torch.where(alive, h[:, j], 0.0).to("cpu", torch.float64)
        size = torch.where(alive.cpu(), torch.full_like(size, j + 1), size)
        norm = _norms(w)
        alive = alive & (norm > BREAKDOWN * eps * scale)
        if j + 1 < steps:
            off = torch.where(alive, norm, 0.0).to("cpu", torch.float64)
            tri[:, j + 1, j] = off
            tri[:, j, j + 1] = off
        basis[:, j + 1] = torch.where(alive[:, None], w / norm.clamp_min(tiny)[:, None], 0.0)
        if not bool(alive.any()):
            break
    # Rows that broke down early have zero rows/columns beyond their size: zero eigenvalues,
    # which cannot be the largest of a positive definite operator's Ritz values.
    return torch.linalg.eigvalsh(tri)[:, -1]
