"""Right preconditioners for the Newton systems the Krylov solvers meet.

``SharedLinearisation`` serves maps whose Jacobian is J_f = diag(s_b) W per sample b with one W
for the whole batch (the tanh layer z = tanh(W z + U x + b), s_b = 1 − f_b²). Every sample's
Newton system (I − diag(s_b) W) d = r differs from its neighbours' only in the row scales, so
the batch's mean scale s̄ gives one matrix M = I − diag(s̄) W that stands in for all of them:
one LU of an n × n matrix, and M⁻¹ applied to all B rows at once by two triangular solves.

Right-preconditioned GMRES runs on A M⁻¹ with A_b = M − diag(s_b − s̄) W, so

    A_b M⁻¹ = I − diag(s_b − s̄) W M⁻¹,

the identity plus a term as small as the rows' scales are close to their mean. That is where
the layers are hard: a near-isometry or a slow mode is slow because tanh′ ≈ 1 everywhere, so
the scales hardly differ, while GMRES on A alone faces eigenvalues of I − J_f on a ring around
1 − ρ (a Krylov method gains nothing there). On the hard family's layers GMRES then needs 1–17
steps per Newton step instead of running into its 40-step cap.
"""

from __future__ import annotations

import torch

from deqcli.linalg.operators import LinearOperator, RowScaledJacobian, ShiftedOperator

# Up to this n one LU of M (n³/3 multiply-adds, 0.05 s at n = 1024, 0.5 s at 2048 on one core)
# is worth its cost against GMRES steps of B·n² each; beyond, M's n² numbers and its
# factorisation grow past what a preconditioner should cost.
MAX_DIM = 4096
# M is factored again when the batch's mean row scale has moved by more than this (in any entry)
# since it was factored, or when a solve needed over half the Krylov steps. On the family's
# layers (n = 256–1024, B = 8–64) refactoring at every Newton step (5–10 LUs) cost more than the
# steps it saved; a rule by the steps alone (refactor beyond 4 + n/(9B) steps, the LU's cost
# in products) let stale factorisations lengthen the solves and the Newton runs (rot-slow: 13
# Newton steps and 112 products against 10 and 39), and was slower on all six. With 0.02 a solve
# takes 2–5 LUs.
REFACTOR_CHANGE = 0.02
# M is factored in a lower precision where there is one: the LU and every application of M⁻¹
# then read half the memory (an application cost two products with W at B = 8, n = 1024), and
# M⁻¹ is exact only to about κ(M)·1e-7. GMRES is flexible (it builds x from the vectors M⁻¹
# actually gave), so that costs steps, never accuracy; Newton–Krylov on the hard family became
# 15–20 % faster with the same number of products.
FACTOR_DTYPE = {torch.float64: torch.float32}


def shared_weight(op: LinearOperator) -> torch.Tensor | None:
    """W where ``op`` is a row-scaled Jacobian diag(s_b) W with W shared by the batch (else None:
    no shared linearisation to precondition with)."""
    if not isinstance(op, RowScaledJacobian) or op.weight.dim() != 2:
        return None
    return op.weight


class SharedLinearisation:
    """M⁻¹ for M = I − diag(s̄) W, factored once (in FACTOR_DTYPE; see the module docstring);
    callable on (B, n) rows as GMRES's right preconditioner, in the rows' own dtype."""

    def __init__(
        self, mean_scale: torch.Tensor, weight: torch.Tensor, low_weight: torch.Tensor | None = None
    ) -> None:
        self.mean_scale = mean_scale
        self.weight = weight
        low = FACTOR_DTYPE.get(weight.dtype, weight.dtype)
        # W in the factor dtype (``low_weight``: one kept from an earlier factoring of the same
        # W), from which M is built row by row in row-major order. What is factored is Mᵀ: in
        # column-major order (the layout LAPACK factors in place) Mᵀ is M's row-major storage,
        # so no transposed copy is made. Applying M⁻¹ is then a solve with the transpose of the
        # factored matrix, which MKL's triangular solves run faster than the plain solve.
        if low_weight is None:
            low_weight = weight.to(low).contiguous()
        self.low_weight = low_weight
        m = torch.eye(weight.shape[0], dtype=low, device=weight.device)
        m.addcmul_(low_weight, mean_scale[:, None].to(low), value=-1.0)
        self.lu, self.pivots = torch.linalg.lu_factor(m.mT)
        # s_b / s̄ for ``product``, and the scales s_b it was computed from.
        self._ratio: torch.Tensor | None = None
        self._ratio_of: torch.Tensor | None = None

    @classmethod
    def of(
        cls,
        op: LinearOperator,
        rows: torch.Tensor,
        earlier: SharedLinearisation | None = None,
        mean: torch.Tensor | None = None,
    ) -> SharedLinearisation | None:
        """M for the rows ``rows`` of ``op`` (None where op has no shared W); ``earlier``, a
        factoring of the same W, lends its low-precision W; ``mean``, s̄ over ``rows`` where the
        caller has it."""
        weight = shared_weight(op)
        if weight is None or not isinstance(op, RowScaledJacobian):
            return None
        kept = earlier.low_weight if earlier is not None and earlier.weight is weight else None
        return cls(cls.mean_scale(op, rows) if mean is None else mean, weight, kept)

    @staticmethod
    def mean_scale(op: RowScaledJacobian, rows: torch.Tensor) -> torch.Tensor:
        """s̄: the mean row scale over ``rows`` (every row where none is left)."""
        scale = op.scale[rows] if bool(rows.any()) else op.scale
        return scale.mean(dim=0)

    def fits(self, mean_scale: torch.Tensor) -> bool:
        """Whether this factorisation still stands for a batch whose mean scale is ``mean_scale``."""
        return float((mean_scale - self.mean_scale).abs().max()) <= REFACTOR_CHANGE

    def product(self, op: LinearOperator, v: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
        """A u for u = M⁻¹v as this factorisation gave it, with no product with W, where ``op``
        is J = diag(s_b) W for this W, I − J, or α I + β times either (``ShiftedOperator``);
        else None.

        M u = v with M = I − diag(s̄) W says diag(s̄) W u = u − v, so J u = (s_b / s̄)(u − v):
        the product a preconditioned Krylov step needs comes with the preconditioner's solve,
        for an elementwise product instead of a pass over W (where s̄ is 0, every row's scale
        is, and so is the term). It is exact only as far as the solve was: the float32
        factorisation's rounding, times ‖M⁻¹‖ and the ratios s_b / s̄ (the Krylov methods
        measure it before they rely on it).
        """
        alpha: float | torch.Tensor = 0.0
        beta: float | torch.Tensor = 1.0
        inner = op
        if isinstance(op, ShiftedOperator):
            alpha, beta, inner = op.alpha, op.beta, op.inner
        if not isinstance(inner, RowScaledJacobian) or inner.weight is not self.weight:
            return None
        if inner.residual:  # α I + β (I − J) = (α + β) I − β J
            alpha, beta = alpha + beta, -beta
        if self._ratio is None or self._ratio_of is not inner.scale:
            mean = self.mean_scale.to(inner.scale.dtype)
            ratio = inner.scale / mean.clamp_min(torch.finfo(mean.dtype).tiny)
            self._ratio = torch.where(mean > 0, ratio, 0.0)
            self._ratio_of = inner.scale
        out = alpha * u + beta * (self._ratio * (u - v))
        if op.active is not None:
            out = torch.where(op.active[:, None], out, 0.0)
        return out

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        # Row b of the result is M⁻¹ v_b = (Mᵀ)⁻ᵀ v_b: the rows, seen as the columns of an
        # n × B column-major matrix (no copy), solved with the transpose of the factored Mᵀ;
        # the solution comes back column-major, so its transpose is (B, n) rows again.
        low = v.to(self.lu.dtype)
        solved = torch.linalg.lu_solve(self.lu, self.pivots, low.mT, adjoint=True)
        return solved.mT.to(v.dtype).contiguous()  # no copy: already (B, n) in row order
