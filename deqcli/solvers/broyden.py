"""Broyden's good method on g(z) = 0: limited-memory inverse updates, batched, with a line search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from deqcli.solvers.base import Solver, State
from deqcli.solvers.linesearch import backtrack

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem


@dataclass
class BroydenState(State):
    """Iterate, residual and the rank-one terms of the inverse Jacobian estimate."""

    u: torch.Tensor  # (B, memory, n)
    v: torch.Tensor  # (B, memory, n): H = h0·I + Σ u_i v_iᵀ ≈ J_g⁻¹
    recent: torch.Tensor  # (B, window): the last residual norms, for the non-monotone search
    count: int = 0  # rank-one terms stored (the same for every sample)


@dataclass
class Broyden(Solver):
    """Broyden's "good" method with the inverse kept as h0·I plus at most ``memory`` rank-one terms.

    The step is d = −H g with H ≈ J_g(z)⁻¹; with g = z − f(z) and a contractive f, J_g is near the
    identity, so H starts as ``h0``·I (the first step is a damped fixed-point step). After a step
    s with residual change y, the good-Broyden update (Sherman–Morrison form)

        H ← H + (s − H y) sᵀH / (sᵀ H y)

    makes the implied Jacobian satisfy the secant equation while changing it least. Each sample
    backtracks (α = 1, ½, …, ``max_backtracks`` halvings) until ‖g‖ falls below (1 − cα) times the
    largest of its last ``window`` residual norms (a non-monotone search: Broyden steps may raise
    the residual for a while as the estimate learns; ``window: 1`` is monotone); without such a
    decrease it keeps the trial with the smallest residual. When the memory is full it is cleared
    (the "restart" reduction), which bounds memory at 2·memory·B·n numbers. Updates whose
    denominator vanishes are skipped for that sample.

    Cost per iteration: 1 + (backtracks) evaluations of f and O(memory·n) work per sample.
    For a linear map with unlimited memory it terminates in at most 2n steps.
    """

    name: ClassVar[str] = "broyden"
    summary: ClassVar[str] = "Broyden's good method, limited memory, line search"
    memory: int = 30
    h0: float = 1.0
    line_search: bool = True
    max_backtracks: int = 6
    c: float = 1e-4
    window: int = 5

    def check(self) -> None:
        """Validate memory and line-search settings."""
        if self.memory < 1:
            raise ValueError(f"memory: must be ≥ 1, got {self.memory}")
        if self.h0 <= 0:
            raise ValueError(f"h0: must be > 0, got {self.h0}")
        if self.max_backtracks < 0:
            raise ValueError(f"max_backtracks: must be ≥ 0, got {self.max_backtracks}")
        if not 0.0 < self.c < 1.0:
            raise ValueError(f"c: must lie in (0, 1), got {self.c}")
        if self.window < 1:
            raise ValueError(f"window: must be ≥ 1, got {self.window}")

    def init(self, problem: Problem, z0: torch.Tensor) -> BroydenState:
        """Evaluate g(z0) and allocate the rank-one memory."""
        import torch

        batch, n = z0.shape
        opts = {"dtype": z0.dtype, "device": z0.device}
        g0 = problem.g(z0)
        norm0 = torch.linalg.vector_norm(g0, dim=1)
        return BroydenState(
            z=z0,
            g=g0,
            u=torch.zeros(batch, self.memory, n, **opts),
            v=torch.zeros(batch, self.memory, n, **opts),
            recent=norm0[:, None].repeat(1, self.window),
        )

    def step(self, problem: Problem, state: State) -> BroydenState:
        """Quasi-Newton step, line search, then the rank-one update of H."""
        import torch

        if not isinstance(state, BroydenState):
            raise TypeError("broyden.step needs the state made by broyden.init")
        s = state
        direction = -self._apply(s, s.g)
        if self.line_search:
            z_new, g_new, _ = backtrack(
                problem,
                s.z,
                s.g,
                direction,
                c=self.c,
                max_backtracks=self.max_backtracks,
                keep="best",
                reference=s.recent.amax(dim=1),
                active=s.active,
            )
        else:
            z_new = s.z + direction
            g_new = problem.g(z_new)

        if s.count == self.memory:
            # Restart reduction: drop every stored term, keep H = h0·I.
            s.u.zero_()
            s.v.zero_()
            s.count = 0
        step = z_new - s.z
        dg = g_new - s.g
        h_dg = self._apply(s, dg)
        ht_step = self._apply(s, step, transpose=True)
        denom = (step * h_dg).sum(dim=1)
        # Skip the update where sᵀHy is (relatively) zero or the step produced non-finite values.
        scale = torch.linalg.vector_norm(step, dim=1) * torch.linalg.vector_norm(h_dg, dim=1)
        ok = (denom.abs() > 1e-12 * scale) & torch.isfinite(denom)
        safe = torch.where(ok, denom, torch.ones_like(denom))
        j = s.count
        s.u[:, j] = torch.where(ok[:, None], (step - h_dg) / safe[:, None], 0.0)
        s.v[:, j] = torch.where(ok[:, None], ht_step, 0.0)
        s.count += 1
        if self.window > 1:
            s.recent = torch.roll(s.recent, 1, dims=1)
        s.recent[:, 0] = torch.linalg.vector_norm(g_new, dim=1)
        s.z, s.g = z_new, g_new
        return s

    def _apply(self, s: BroydenState, x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        """H x (or Hᵀ x) for every sample: h0·x + Σ u_i (v_i · x)."""
        import torch

        k = s.count
        out = x * self.h0 if self.h0 != 1.0 else x
        if k == 0:
            return out
        left, right = (s.v, s.u) if transpose else (s.u, s.v)
        coef = torch.bmm(right[:, :k], x.unsqueeze(2))  # (B, k, 1)
        return torch.baddbmm(out.unsqueeze(1), coef.transpose(1, 2), left[:, :k]).squeeze(1)
