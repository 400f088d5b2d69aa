"""How a fixed point moves with its parameters: the implicit function theorem, matrix-free.

At a solution z* of g(z, a) = z − f(z, a) = 0 with ∂g/∂z = I − ∂f/∂z invertible,

    dz*/da = −(∂g/∂z)⁻¹ ∂g/∂a = (I − ∂f/∂z)⁻¹ ∂f/∂a,

and for a scalar loss ℓ(z*) the gradient is dℓ/da = −wᵀ ∂g/∂a with the adjoint w solving
(∂g/∂z)ᵀ w = ∇ℓ(z*). Nothing here forms an inverse: every linear system is solved by the restarted
GMRES of ``deqcli.linalg``, whose matrix–vector products are JVPs (forward mode) or VJPs (adjoint
mode) of the linearisation of the problem's uncounted ``raw_g`` (these are differentiations, not
solver evaluations).

Samples of a batch are independent systems, and so are the columns of a Jacobian: GMRES here runs
on a stack of rows, each its own system with its own Krylov space, so one batched JVP advances every
right-hand side of every sample at once.

When ∂g/∂z is near singular the sensitivity blows up: that is where branches of fixed points meet
(fold and transcritical bifurcations, where an eigenvalue of ∂f/∂z crosses +1). ``conditioning``
estimates σ_min(I − ∂f/∂z) so reports can say so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import jvp, vjp, vmap

from deqcli import linalg
from deqcli.errors import UsageError
from deqcli.problems.base import Problem
from deqcli.result import SolveResult, _num

# Below this σ_min(I − ∂f/∂z), dz*/da is amplified more than a thousandfold: call it near singular.
NEAR_SINGULAR = 1e-3
# Dense per-sample Jacobians (for exact singular values and the spectral radius) up to this n.
DENSE_LIMIT = 256
# GMRES works on at most this many scalars at once (rows × n × Krylov vectors); more rows are chunked.
WORK_BUDGET = 20_000_000
# Full dz*/da tensors beyond this many entries (over the batch) are refused with a pointer to gradcheck.
MAX_ENTRIES = 20_000_000
# The largest entries listed for a big sensitivity.
TOP_K = 5


# -- parameters ------------------------------------------------------------------------------


def differentiable_params(problem: Problem) -> dict[str, torch.Tensor]:
    """The problem's parameters that autodiff can differentiate: floating-point tensors."""
    return {
        k: v
        for k, v in problem.params.items()
        if isinstance(v, torch.Tensor) and v.is_floating_point()
    }


def check_param(problem: Problem, name: str, *, flag: str = "--sensitivity") -> torch.Tensor:
    """The tensor of parameter ``name``, or a UsageError naming it and the differentiable ones."""
    usable = differentiable_params(problem)
    if name in usable:
        return usable[name]
    listing = ", ".join(usable) or "none"
    if name in problem.params:
        value = problem.params[name]
        why = (
            f"is the number {value!r}, not a tensor" if not isinstance(value, torch.Tensor) else ""
        )
        why = why or f"has non-floating dtype {value.dtype}"
        raise UsageError(
            f"{flag}: parameter '{name}' {why} and cannot be differentiated (differentiable parameters: {listing})"
        )
    raise UsageError(
        f"{flag}: problem '{problem.name}' has no parameter '{name}' (differentiable parameters: {listing})"
    )


def per_sample_shape(problem: Problem, name: str) -> tuple[int, ...]:
    """The shape of one sample's copy of a parameter (batched parameters drop their leading axis)."""
    shape = tuple(problem.params[name].shape)
    return shape[1:] if name in problem.batched_params else shape


# -- restarted GMRES on a stack of independent systems ---------------------------------------------


@dataclass
class LinearSolve:
    """How a (stack of) linear solves went: GMRES on JVPs or VJPs."""

    method: str  # "gmres (JVP)" or "gmres (VJP)"
    residual: float  # largest relative residual ‖b − A x‖ / ‖b‖ over all right-hand sides
    iterations: int  # most GMRES iterations any chunk needed (one matvec each)
    matvecs: int  # batched JVPs/VJPs used, all chunks together
    converged: bool
    tol: float
    systems: int  # right-hand sides per sample

    def merge(self, other: LinearSolve) -> LinearSolve:
        """Combine the records of two chunks of the same solve."""
        return LinearSolve(
            method=self.method,
            residual=max(self.residual, other.residual),
            iterations=max(self.iterations, other.iterations),
            matvecs=self.matvecs + other.matvecs,
            converged=self.converged and other.converged,
            tol=self.tol,
            systems=self.systems,
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "method": self.method,
            "residual": _num(self.residual),
            "iterations": self.iterations,
            "matvecs": self.matvecs,
            "converged": self.converged,
            "tol": self.tol,
            "systems": self.systems,
        }


def gmres(
    matvec: Callable[[torch.Tensor], torch.Tensor],
    rhs: torch.Tensor,
    *,
    tol: float,
    restart: int = 50,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Solve A x = b for every row of ``rhs`` (R, n); row r is its own system A_r x_r = b_r.

    The one batched GMRES of ``deqcli.linalg`` (per-row Arnoldi and Givens rotations, relative
    breakdown and stagnation tests) on ``matvec``; it stops when every row's true relative residual
    is at most ``tol``, after ``max_iter`` matvecs, or when a row can improve no further (a restart
    cycle that left its residual where it was, or the level rounding in A x allows). Returns
    (x, relative residuals (R,), matvecs used).
    """
    res = linalg.gmres(
        linalg.FunctionOperator(matvec, rhs), rhs, rtol=tol, restart=restart, max_matvecs=max_iter
    )
    return res.x, res.residual, res.matvecs


def default_tol(dtype: torch.dtype) -> float:
    """Relative tolerance of the linear solves: near what each precision can resolve."""
    return 1e-11 if dtype == torch.float64 else 1e-5


# -- the operators -----------------------------------------------------------------------------------


def _tiled(problem: Problem, z: torch.Tensor, copies: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """``copies`` stacked copies of the batch (row c·B + b is sample b): more independent rows."""
    params = {
        k: (v.repeat(copies, *([1] * (v.dim() - 1))) if k in problem.batched_params else v)
        for k, v in problem.params.items()
    }
    return z.repeat(copies, 1), params


def _chunk_size(problem: Problem, per_rhs_rows: int, restart: int) -> int:
    per = max(1, per_rhs_rows * problem.dim * (min(restart, problem.dim) + 4))
    return max(1, WORK_BUDGET // per)


def solve_linear(
    problem: Problem,
    z: torch.Tensor,
    rhs: torch.Tensor,
    *,
    transpose: bool,
    tol: float | None = None,
    restart: int = 50,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, LinearSolve]:
    """Solve (∂g/∂z) x = b, or its transpose, at z for K right-hand sides per sample.

    ``rhs`` is (K, B, n): right-hand side k of sample b. The operator is the linearisation of
    ``raw_g`` at K stacked copies of the batch (uncounted: an analysis, not a solve); its products
    are JVPs, or VJPs for the transpose. The K·B systems are solved together in chunks that fit
    memory, by the one GMRES of ``deqcli.linalg``.
    """
    count = rhs.shape[0]
    tol = default_tol(problem.dtype) if tol is None else tol
    method = "gmres (VJP)" if transpose else "gmres (JVP)"
    info = LinearSolve(method, 0.0, 0, 0, True, tol, count)
    out = torch.empty_like(rhs)
    chunk = _chunk_size(problem, problem.batch, restart)
    for start in range(0, count, chunk):
        block = rhs[start : start + chunk]
        copies = block.shape[0]
        zt, params = _tiled(problem, z, copies)
        op = linalg.jacobian_operator(problem, zt, counted=False, params=params)
        with torch.no_grad():
            res = linalg.gmres(
                op.T if transpose else op,
                block.reshape(-1, problem.dim),
                rtol=tol,
                restart=restart,
                max_matvecs=max_iter,
            )
        out[start : start + copies] = res.x.reshape(copies, problem.batch, problem.dim)
        worst = float(res.residual.max()) if res.residual.numel() else 0.0
        part = LinearSolve(method, worst, res.matvecs, res.matvecs, worst <= tol * 10, tol, count)
        info = info.merge(part) if start else part
    return out, info


def _param_jvp(
    problem: Problem, z: torch.Tensor, name: str, tangents: torch.Tensor
) -> torch.Tensor:
    """∂g/∂a · t for a stack of tangents t of the parameter's full shape: (K, B, n)."""
    params = dict(problem.params)
    a = params[name]

    def g_of(value: torch.Tensor) -> torch.Tensor:
        return problem.raw_g(z, {**params, name: value})

    def one(t: torch.Tensor) -> torch.Tensor:
        return jvp(g_of, (a,), (t,))[1]

    return vmap(one)(tangents)


def _param_vjp(
    problem: Problem, z: torch.Tensor, names: list[str], cotangents: torch.Tensor
) -> dict[str, torch.Tensor]:
    """uᵀ ∂g/∂a for a stack of cotangents u (K, B, n), for each named parameter: (K, *a.shape)."""
    params = dict(problem.params)
    chosen = tuple(params[n] for n in names)

    def g_of(*values: torch.Tensor) -> torch.Tensor:
        return problem.raw_g(z, {**params, **dict(zip(names, values, strict=True))})

    _, pullback = vjp(g_of, *chosen)
    grads = vmap(pullback)(cotangents)
    return dict(zip(names, grads, strict=True))


# -- conditioning of I − ∂f/∂z ---------------------------------------------------------------------


@dataclass
class Conditioning:
    """How close ∂g/∂z = I − ∂f/∂z is to singular at the solution, per sample."""

    sigma_min: list[float]  # smallest singular value of I − ∂f/∂z
    sigma_max: list[float]
    spectral_radius: list[float | None]  # ρ(∂f/∂z) (dense path only)
    nearest_to_one: list[float | None]  # min |1 − λ| over eigenvalues λ of ∂f/∂z (dense only)
    method: str  # "dense" or "inverse lanczos"
    threshold: float = NEAR_SINGULAR

    @property
    def near_singular(self) -> list[bool]:
        """Samples whose σ_min(I − ∂f/∂z) is below the threshold (NaN, from a non-finite point: no)."""
        return [s <= self.threshold for s in self.sigma_min]

    @property
    def amplification(self) -> list[float]:
        """‖(I − ∂f/∂z)⁻¹‖₂ = 1/σ_min: how much a perturbation of the map can move z*."""
        return [1.0 / s if s > 0 else math.inf for s in self.sigma_min]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "method": self.method,
            "sigma_min": [_num(s) for s in self.sigma_min],
            "sigma_max": [_num(s) for s in self.sigma_max],
            "amplification": [_num(a) for a in self.amplification],
            "spectral_radius": [_num(r) for r in self.spectral_radius],
            "nearest_eigenvalue_distance_to_one": [_num(r) for r in self.nearest_to_one],
            "near_singular": self.near_singular,
            "threshold": self.threshold,
        }


def dense_jacobian_g(problem: Problem, z: torch.Tensor) -> torch.Tensor:
    """∂g/∂z per sample, (B, n, n), from n batched JVPs (uncounted: an analysis, not a solve)."""
    problem.check_dense_fits()
    n = problem.dim
    basis = torch.eye(n, dtype=z.dtype, device=z.device)[:, None, :].expand(n, z.shape[0], n)

    def column(v: torch.Tensor) -> torch.Tensor:
        return jvp(problem.raw_g, (z,), (v,))[1]

    return vmap(column)(basis).permute(1, 2, 0)


def conditioning(
    problem: Problem, z: torch.Tensor, *, threshold: float = NEAR_SINGULAR, tol: float | None = None
) -> Conditioning:
    """σ_min and σ_max of I − ∂f/∂z per sample: exactly for n ≤ DENSE_LIMIT, else estimated.

    The estimate runs a few Lanczos steps on (AᵀA)⁻¹ (each step two GMRES solves) for σ_min and
    Golub–Kahan bidiagonalisation for σ_max (``deqcli.linalg.sigma_min``/``sigma_max``).
    """
    with torch.no_grad():
        if problem.dim <= DENSE_LIMIT:
            jg = dense_jacobian_g(problem, z).to(torch.float64)
            sv = torch.linalg.svdvals(jg)
            eig = torch.linalg.eigvals(
                torch.eye(problem.dim, dtype=jg.dtype, device=jg.device) - jg
            )
            return Conditioning(
                sigma_min=sv[:, -1].tolist(),
                sigma_max=sv[:, 0].tolist(),
                spectral_radius=eig.abs().max(dim=1).values.tolist(),
                nearest_to_one=(1 - eig).abs().min(dim=1).values.tolist(),
                method="dense",
                threshold=threshold,
            )
        return _iterative_conditioning(problem, z, threshold, tol)


def _iterative_conditioning(
    problem: Problem, z: torch.Tensor, threshold: float, tol: float | None
) -> Conditioning:
    """σ_min by Lanczos on (AᵀA)⁻¹ (GMRES solves) and σ_max by Golub–Kahan, A = ∂g/∂z."""
    op = linalg.jacobian_operator(problem, z, counted=False)
    with torch.no_grad():
        small = linalg.sigma_min(op, steps=6, method="inverse", rtol=tol, max_matvecs=300)
        big = linalg.sigma_max(op, steps=20)
    return Conditioning(
        sigma_min=small.value.tolist(),
        sigma_max=big.value.tolist(),
        spectral_radius=[None] * problem.batch,
        nearest_to_one=[None] * problem.batch,
        method="inverse lanczos",
        threshold=threshold,
    )


# -- dz*/da ------------------------------------------------------------------------------------------


@dataclass
class Sensitivity:
    """dz*/da for one parameter: per sample a tensor of shape (n, *a's per-sample shape)."""

    name: str
    shape: tuple[int, ...]  # per-sample parameter shape
    jacobian: torch.Tensor  # (B, n, *shape)
    mode: str  # "forward" (one solve per parameter entry) or "adjoint" (one per component of z)
    solve: LinearSolve
    conditioning: Conditioning
    converged: list[bool]  # whether each sample's forward solve converged (z* is a fixed point)
    notes: list[str] = field(default_factory=list)

    @property
    def norms(self) -> list[float]:
        """Frobenius norm of dz*/da per sample."""
        flat = self.jacobian.reshape(self.jacobian.shape[0], -1)
        return torch.linalg.vector_norm(flat, dim=1).tolist()

    def largest(self, k: int = TOP_K) -> list[list[tuple[tuple[int, ...], float]]]:
        """Per sample, the k entries of largest magnitude as ((i, *param index), value)."""
        out = []
        full = (self.jacobian.shape[1], *self.shape)
        for b in range(self.jacobian.shape[0]):
            flat = self.jacobian[b].reshape(-1)
            top = torch.topk(flat.abs(), min(k, flat.numel())).indices.tolist()
            out.append([(_unravel(i, full), float(flat[i])) for i in top])
        return out

    def to_dict(self, *, max_entries: int = 100_000) -> dict[str, Any]:
        """JSON-ready fields; the full tensor is included up to ``max_entries`` entries."""
        doc: dict[str, Any] = {
            "parameter": self.name,
            "parameter_shape": list(self.shape),
            "shape": list(self.jacobian.shape[1:]),
            "mode": self.mode,
            "norm": [_num(v) for v in self.norms],
            "largest": [
                [{"index": list(i), "value": _num(v)} for i, v in sample]
                for sample in self.largest()
            ],
            "linear_solve": self.solve.to_dict(),
            "conditioning": self.conditioning.to_dict(),
            "near_singular": any(self.conditioning.near_singular),
            "forward_converged": self.converged,
            "notes": self.notes,
        }
        if self.jacobian.numel() <= max_entries:
            doc["jacobian"] = json_nested(self.jacobian.detach().cpu().tolist())
        else:
            doc["jacobian_omitted"] = f"{self.jacobian.numel()} entries (limit {max_entries})"
        return doc


def sensitivity(
    problem: Problem,
    z: torch.Tensor,
    name: str,
    *,
    mode: str = "auto",
    tol: float | None = None,
    restart: int = 50,
    max_iter: int = 1000,
    converged: list[bool] | None = None,
    threshold: float = NEAR_SINGULAR,
) -> Sensitivity:
    """dz*/da at the solution ``z`` (B, n) for parameter ``name``, by the implicit function theorem.

    ``forward`` mode solves (I − ∂f/∂z) s = ∂f/∂a·e_j for each entry j of a (JVPs); ``adjoint`` solves
    (I − ∂f/∂z)ᵀ w_i = e_i for each component i of z (VJPs) and reads row i as w_iᵀ ∂f/∂a. ``auto``
    takes whichever needs fewer solves.
    """
    a = check_param(problem, name)
    shape = per_sample_shape(problem, name)
    entries = math.prod(shape)
    batch, n = problem.batch, problem.dim
    if batch * n * entries > MAX_ENTRIES:
        raise UsageError(
            f"--sensitivity: dz*/d{name} has {batch * n * entries:,} entries (batch {batch} × n {n} × {entries}); "
            f"that is too large to form. Use `deq gradcheck --param {name}` for the gradient of a scalar loss"
        )
    if mode == "auto":
        mode = "forward" if entries <= n else "adjoint"
    if mode not in ("forward", "adjoint"):
        raise UsageError(f"sensitivity mode must be auto, forward or adjoint, got {mode!r}")
    z = z.detach()
    notes: list[str] = []
    converged = list(converged) if converged is not None else [True] * batch
    nonfinite = [b for b in range(batch) if not bool(torch.isfinite(z[b]).all())]
    if nonfinite:
        notes.append(
            f"sample(s) {_list(nonfinite)} ended with a non-finite iterate: there is no point to "
            f"differentiate at, and dz*/d{name} there is meaningless"
        )
    bad = [b for b, ok in enumerate(converged) if not ok and b not in nonfinite]
    if bad:
        notes.append(
            f"sample(s) {_list(bad)} did not converge: dz*/d{name} there is evaluated at the last "
            "iterate, which is not a fixed point, and means little"
        )
    if mode == "forward":
        jac, info = _forward(problem, z, name, a, shape, entries, tol, restart, max_iter)
    else:
        jac, info = _adjoint(problem, z, name, shape, tol, restart, max_iter)
    cond = conditioning(problem, z, threshold=threshold, tol=tol)
    singular = [b for b, flag in enumerate(cond.near_singular) if flag]
    if singular:
        worst = min(cond.sigma_min[b] for b in singular)
        notes.append(
            f"I − ∂f/∂z is near singular at the solution (σ_min = {worst:.3g} for sample(s) {_list(singular)}): "
            f"dz*/d{name} blows up here, which is where branches of fixed points meet; small changes of "
            f"{name} can move, merge or destroy this fixed point"
        )
    if not info.converged:
        notes.append(
            f"the linear solve reached a relative residual of {info.residual:.3g} only (tolerance {info.tol:g}); "
            "the sensitivity is inaccurate"
        )
    return Sensitivity(name, shape, jac, mode, info, cond, converged, notes)


def _forward(
    problem: Problem,
    z: torch.Tensor,
    name: str,
    a: torch.Tensor,
    shape: tuple[int, ...],
    entries: int,
    tol: float | None,
    restart: int,
    max_iter: int,
) -> tuple[torch.Tensor, LinearSolve]:
    batch, n = problem.batch, problem.dim
    eye = torch.eye(entries, dtype=a.dtype, device=a.device)
    cols = []
    info: LinearSolve | None = None
    chunk = _chunk_size(problem, batch, restart)
    for start in range(0, entries, chunk):
        basis = eye[start : start + chunk].reshape(-1, *shape)
        if name in problem.batched_params:
            # Entry j of every sample's own copy at once: the tangent is e_j in every row.
            basis = basis[:, None].expand(basis.shape[0], batch, *shape)
        with torch.no_grad():
            rhs = -_param_jvp(problem, z, name, basis)  # −∂g/∂a e_j = ∂f/∂a e_j
        x, part = solve_linear(
            problem, z, rhs, transpose=False, tol=tol, restart=restart, max_iter=max_iter
        )
        cols.append(x)
        info = part if info is None else info.merge(part)
    if info is None:  # no entries: nothing to solve
        info = LinearSolve("gmres (JVP)", 0.0, 0, 0, True, default_tol(z.dtype), 0)
    info.systems = entries
    jac = torch.cat(cols).permute(1, 2, 0).reshape(batch, n, *shape)
    return jac, info


def _adjoint(
    problem: Problem,
    z: torch.Tensor,
    name: str,
    shape: tuple[int, ...],
    tol: float | None,
    restart: int,
    max_iter: int,
) -> tuple[torch.Tensor, LinearSolve]:
    batch, n = problem.batch, problem.dim
    eye = torch.eye(n, dtype=z.dtype, device=z.device)
    rows = []
    info: LinearSolve | None = None
    batched = name in problem.batched_params
    chunk = _chunk_size(problem, batch, restart)
    if not batched:
        # The one-hot cotangents of a shared parameter take B² n scalars per component.
        chunk = min(chunk, max(1, WORK_BUDGET // (batch * batch * n + batch * math.prod(shape))))
    for start in range(0, n, chunk):
        rhs = eye[start : start + chunk, None, :].expand(-1, batch, n)
        w, part = solve_linear(
            problem, z, rhs, transpose=True, tol=tol, restart=restart, max_iter=max_iter
        )
        info = part if info is None else info.merge(part)
        # Row i of dz_b*/da is −w_{i,b}ᵀ ∂g_b/∂a.
        with torch.no_grad():
            if batched:
                # Each sample owns its row of a batched parameter: one VJP separates them.
                grads = -_param_vjp(problem, z, [name], w)[name]  # (k, B, *shape)
                grads = grads.transpose(0, 1)
            else:
                # A shared parameter's VJP sums over samples, so each sample's adjoint goes in as
                # its own cotangent, zero in the other rows.
                k = w.shape[0]
                onehot = torch.eye(batch, dtype=z.dtype, device=z.device)
                cot = w.permute(1, 0, 2)[:, :, None, :] * onehot[:, None, :, None]
                grads = -_param_vjp(problem, z, [name], cot.reshape(batch * k, batch, n))[name]
                grads = grads.reshape(batch, k, *shape)
        rows.append(grads)
    if info is None:  # n = 0: nothing to solve
        info = LinearSolve("gmres (VJP)", 0.0, 0, 0, True, default_tol(z.dtype), 0)
    info.systems = n
    return torch.cat(rows, dim=1).reshape(batch, n, *shape), info


# -- the gradient of a scalar loss (adjoint form) ----------------------------------------------------


@dataclass
class LossGradient:
    """dℓ/da for a scalar loss ℓ(z*) by the adjoint method, for the named parameters."""

    loss: float
    grads: dict[str, torch.Tensor]
    solve: LinearSolve
    adjoint: torch.Tensor  # w (B, n) with (I − ∂f/∂z)ᵀ w = ∇ℓ(z*)


def loss_gradient(
    problem: Problem,
    z: torch.Tensor,
    loss: Callable[[torch.Tensor], torch.Tensor],
    names: list[str],
    *,
    tol: float | None = None,
    restart: int = 50,
    max_iter: int = 1000,
) -> LossGradient:
    """dℓ(z*)/da = −wᵀ ∂g/∂a with (∂g/∂z)ᵀ w = ∇ℓ(z*): one adjoint solve for all parameters.

    ``loss`` maps the whole (B, n) solution to a scalar (a sum over samples for batches), so a shared
    parameter's gradient adds every sample's contribution, as training a batch would.
    """
    for name in names:
        check_param(problem, name, flag="--param")
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        value = loss(z)
        (dl_dz,) = torch.autograd.grad(value, z)
    z = z.detach()
    w, info = solve_linear(
        problem, z, dl_dz[None], transpose=True, tol=tol, restart=restart, max_iter=max_iter
    )
    with torch.no_grad():
        grads = _param_vjp(problem, z, names, w)
    return LossGradient(
        loss=float(value.detach()),
        grads={k: -v[0] for k, v in grads.items()},
        solve=info,
        adjoint=w[0],
    )


# -- small helpers -----------------------------------------------------------------------------------


def _unravel(index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    out = []
    for size in reversed(shape):
        out.append(index % size)
        index //= size
    return tuple(reversed(out))


def json_nested(value: Any) -> Any:
    """Nested lists of floats with inf/NaN encoded as strings, for JSON."""
    if isinstance(value, list):
        return [json_nested(v) for v in value]
    return _num(value)


def _list(items: list[int], limit: int = 6) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    return shown + (f" … ({len(items)} in all)" if len(items) > limit else "")


# -- for `deq solve --sensitivity` -------------------------------------------------------------------


def check_names(problem: Problem, names: list[str]) -> None:
    """Fail before solving when a requested parameter is missing or not differentiable."""
    for name in names:
        check_param(problem, name)


def attach_sensitivities(
    problem: Problem, result: SolveResult, names: list[str]
) -> list[Sensitivity]:
    """dz*/da at the result's solution for each name; stored under ``sensitivity`` in the JSON."""
    converged = [s.ok for s in result.sample_status]
    out = [sensitivity(problem, result.solution, name, converged=converged) for name in names]
    result.extra["sensitivity"] = {s.name: s.to_dict() for s in out}
    return out
