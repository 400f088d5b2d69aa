"""Batched linear operators: one n×n linear map per row of a (B, n) batch, applied row by row.

Everything that needs "multiply by a Jacobian" — Newton–Krylov, the sensitivities and adjoint
solves, the spectral estimates — asks an operator from this module, and the Krylov methods in
``krylov.py`` take any of them. An operator maps a (B, n) tensor to a (B, n) tensor, row b by
row b's own matrix; ``matvec`` is A v and ``rmatvec`` is Aᵀ u.

Operators:

- ``DenseOperator``: a stored (B, n, n) tensor.
- ``Linearisation``: the Jacobian of a row-wise map at a point, from autodiff. The graph of one
  evaluation is kept, so a VJP is one backward pass and a JVP one backward pass through the
  graph of the VJP (Jv = ∂/∂u ⟨Jᵀu, v⟩, exact because Jᵀu is linear in u). Neither imports
  torch.func (whose first use imports torch._dynamo) nor seeds autograd with a tensor
  ``grad_outputs`` (whose first use imports sympy): both cost seconds in a fresh process.
- ``RowScaledJacobian``: J_f = diag(s) W per row, or J_g = I − J_f, for maps that say their
  Jacobian has that form (an activation of an affine map, such as the tanh layer): each product
  is one matmul, with no graph kept.
- ``FunctionOperator``: any pair of callables.
- ``ShiftedOperator``: α·I + β·A; ``NormalOperator``: AᵀA.

Per-row masks: ``with_active(mask)`` returns the operator with a (B,) mask of the rows that still
matter; the products of the other rows are returned as zeros (a frozen, non-finite row cannot
poison a batched Krylov iteration) and the Krylov methods treat them as finished.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TYPE_CHECKING, Literal

import torch

from deqcli.linalg.dense import matvec

if TYPE_CHECKING:
    from deqcli.problems.base import Problem

RowMap = Callable[[torch.Tensor], torch.Tensor]


class LinearOperator:
    """A batch of B linear maps of Rⁿ, one per row. Subclasses implement ``_matvec``/``_rmatvec``."""

    def __init__(
        self, batch: int, dim: int, dtype: torch.dtype, device: torch.device | str
    ) -> None:
        self.batch = batch
        self.dim = dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.active: torch.Tensor | None = None

    # -- products ------------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """A v for every row of ``v`` (B, n); rows outside ``active`` give zeros."""
        return self._masked(self._matvec(v))

    def rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        """Aᵀ u for every row of ``u`` (B, n); rows outside ``active`` give zeros."""
        return self._masked(self._rmatvec(u))

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no transpose products")

    def _masked(self, out: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return out
        return torch.where(self.active[:, None], out, torch.zeros_like(out))

    # -- views -----------------------------------------------------------------------------------
    def with_active(self, active: torch.Tensor | None) -> LinearOperator:
        """The same operator with a (B,) mask of the rows that still need products."""
        out = copy.copy(self)
        out.active = active
        return out

    @property
    def T(self) -> LinearOperator:
        """The transposed operator (its matvec is this one's rmatvec)."""
        return TransposedOperator(self)

    def dense(self) -> torch.Tensor:
        """The (B, n, n) matrices, from n products with the unit vectors (for tests and small n)."""
        eye = torch.eye(self.dim, dtype=self.dtype, device=self.device)
        cols = [self.matvec(eye[i].expand(self.batch, self.dim)) for i in range(self.dim)]
        return torch.stack(cols, dim=2)


class DenseOperator(LinearOperator):
    """A stored (B, n, n) tensor."""

    def __init__(self, matrix: torch.Tensor) -> None:
        if matrix.dim() != 3 or matrix.shape[1] != matrix.shape[2]:
            raise ValueError(f"a dense operator needs shape (B, n, n), got {tuple(matrix.shape)}")
        super().__init__(matrix.shape[0], matrix.shape[1], matrix.dtype, matrix.device)
        self.matrix = matrix

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return matvec(self.matrix, v)

    def _rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        return torch.bmm(u.unsqueeze(1), self.matrix).squeeze(1)

    def dense(self) -> torch.Tensor:
        """The stored matrices (masked rows zeroed)."""
        if self.active is None:
            return self.matrix
        return torch.where(self.active[:, None, None], self.matrix, 0.0)


class RowScaledJacobian(LinearOperator):
    """J_f = diag(s) W per row (s of shape (B, n), W (n, n) shared), or J_g = I − J_f with
    ``residual``; ``value`` is the map's value at the point, as a Linearisation's is."""

    def __init__(
        self,
        value: torch.Tensor,
        scale: torch.Tensor,
        weight: torch.Tensor,
        *,
        residual: bool,
        on_product: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(value.shape[0], value.shape[1], value.dtype, value.device)
        self.value = value
        self.scale = scale
        self.weight = weight
        self.residual = residual
        self._on_product = on_product

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        if self._on_product is not None:
            self._on_product("jvp")
        jv = self.scale * (v @ self.weight.mT)
        return v - jv if self.residual else jv

    def _rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        if self._on_product is not None:
            self._on_product("vjp")
        ju = (u * self.scale) @ self.weight
        return u - ju if self.residual else ju

    def dense(self) -> torch.Tensor:
        """diag(s) W (or I − diag(s) W) for every row (masked rows zeroed)."""
        mat = self.scale[:, :, None] * self.weight
        if self.residual:
            mat = torch.eye(self.dim, dtype=self.dtype, device=self.device) - mat
        if self.active is None:
            return mat
        return torch.where(self.active[:, None, None], mat, 0.0)


class FunctionOperator(LinearOperator):
    """Products given as callables on (B, n) tensors."""

    def __init__(
        self,
        matvec: RowMap,
        like: torch.Tensor,
        rmatvec: RowMap | None = None,
    ) -> None:
        super().__init__(like.shape[0], like.shape[1], like.dtype, like.device)
        self._mv = matvec
        self._rmv = rmatvec

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self._mv(v)

    def _rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        if self._rmv is None:
            raise NotImplementedError("this operator has no transpose products")
        return self._rmv(u)


class TransposedOperator(LinearOperator):
    """Aᵀ of another operator."""

    def __init__(self, inner: LinearOperator) -> None:
        super().__init__(inner.batch, inner.dim, inner.dtype, inner.device)
        self.inner = inner
        self.active = inner.active

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.inner._rmatvec(v)

    def _rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        return self.inner._matvec(u)

    @property
    def T(self) -> LinearOperator:
        """The original operator."""
        return self.inner.with_active(self.active)


class ShiftedOperator(LinearOperator):
    """α·I + β·A (for example I − J_f from J_f, or a pseudo-transient shift)."""

    def __init__(
        self, inner: LinearOperator, alpha: float | torch.Tensor, beta: float | torch.Tensor = 1.0
    ) -> None:
        super().__init__(inner.batch, inner.dim, inner.dtype, inner.device)
        self.inner = inner
        self.alpha = _per_row(alpha)
        self.beta = _per_row(beta)
        self.active = inner.active

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.alpha * v + self.beta * self.inner._matvec(v)

    def _rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        return self.alpha * u + self.beta * self.inner._rmatvec(u)


class NormalOperator(LinearOperator):
    """AᵀA: symmetric positive semi-definite, its eigenvalues the squared singular values of A."""

    def __init__(self, inner: LinearOperator) -> None:
        super().__init__(inner.batch, inner.dim, inner.dtype, inner.device)
        self.inner = inner
        self.active = inner.active

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.inner._rmatvec(self.inner._matvec(v))

    _rmatvec = _matvec


def _per_row(value: float | torch.Tensor) -> float | torch.Tensor:
    """A scalar stays a scalar; a (B,) tensor becomes (B, 1) so it scales each row."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value[:, None]
    return value


class Linearisation(LinearOperator):
    """The Jacobian of a row-wise map ``fn`` at ``z`` by reverse-mode autodiff, one graph for all.

    ``value`` is fn(z). ``on_product`` (optional) is called with "jvp" or "vjp" once per product,
    which is how a problem's counter sees products made for a solver.
    """

    def __init__(
        self,
        fn: RowMap,
        z: torch.Tensor,
        *,
        on_product: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(z.shape[0], z.shape[1], z.dtype, z.device)
        with torch.enable_grad():
            self.x = z.detach().requires_grad_(True)
            self.y = fn(self.x)
        self.value = self.y.detach()
        self._on_product = on_product
        self._u: torch.Tensor | None = None
        self._vjp_of_u: torch.Tensor | None = None

    def _zeros(self) -> torch.Tensor:
        return torch.zeros_like(self.value)

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """uᵀJ per row (unmasked)."""
        if self._on_product is not None:
            self._on_product("vjp")
        if not self.y.requires_grad:
            return self._zeros()  # fn does not depend on z: J = 0
        with torch.enable_grad():
            g = _grad((self.y * u).sum(), self.x)
        return self._zeros() if g is None else g.detach()

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """J v per row (unmasked)."""
        if self._on_product is not None:
            self._on_product("jvp")
        if not self.y.requires_grad:
            return self._zeros()
        with torch.enable_grad():
            if self._u is None:
                self._u = torch.zeros_like(self.y, requires_grad=True)
                self._vjp_of_u = _grad((self.y * self._u).sum(), self.x, create_graph=True)
            if self._vjp_of_u is None or not self._vjp_of_u.requires_grad:
                return self._zeros()  # Jᵀu does not depend on u: J = 0
            jv = _grad((self._vjp_of_u * v).sum(), self._u)
        return self._zeros() if jv is None else jv.detach()

    def _matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.jvp(v)

    def _rmatvec(self, u: torch.Tensor) -> torch.Tensor:
        return self.vjp(u)

    def dense(self) -> torch.Tensor:
        """J for every row, (B, n, n): n backward passes, one per output coordinate."""
        batch, n = self.x.shape
        rows = []
        for i in range(n):
            e = torch.zeros((batch, n), dtype=self.x.dtype, device=self.x.device)
            e[:, i] = 1
            rows.append(self.vjp(e))
        return self._masked_matrix(torch.stack(rows, dim=1))

    def _masked_matrix(self, mat: torch.Tensor) -> torch.Tensor:
        if self.active is None:
            return mat
        return torch.where(self.active[:, None, None], mat, 0.0)


def _grad(
    scalar: torch.Tensor, wrt: torch.Tensor, *, create_graph: bool = False
) -> torch.Tensor | None:
    """d scalar / d wrt, keeping the graph for more products.

    A scalar with the default seed rather than explicit grad_outputs: the latter's first use imports
    torch's symbolic-shape machinery (sympy), a second-long cost a solve should not pay.
    """
    (g,) = torch.autograd.grad(
        scalar, wrt, retain_graph=True, create_graph=create_graph, allow_unused=True
    )
    return g


def jacobian_operator(
    problem: Problem,
    z: torch.Tensor,
    *,
    of: Literal["g", "f"] = "g",
    counted: bool = True,
    params: dict[str, torch.Tensor] | None = None,
) -> Linearisation | RowScaledJacobian:
    """The Jacobian of the problem's residual g (or map f) at ``z`` as an operator.

    ``counted``: every product bumps the problem's ``jvp``/``vjp`` counter (a solver's products);
    analyses pass False so a solve's counts stay the solver's own. ``params`` replaces the
    problem's parameters (for tiled copies of a batch). A problem that gives its Jacobian in
    closed form (``row_scaled_jacobian``) gets that, else autodiff's linearisation.
    """
    bump = (lambda kind: problem.counter.bump(kind)) if counted else None
    if problem.row_scaled_jacobian is not None:
        f, scale, weight = problem.closed_form_jacobian(z, params)
        value = f if of == "f" else z - f
        return RowScaledJacobian(value, scale, weight, residual=of == "g", on_product=bump)
    raw = problem.raw_g if of == "g" else problem.raw_f

    def fn(x: torch.Tensor) -> torch.Tensor:
        return raw(x, params)

    return Linearisation(fn, z, on_product=bump)
