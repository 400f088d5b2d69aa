"""Newton's method on g(z) = 0 with autodiff Jacobians and a per-sample backtracking line search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from deqcli.solvers.base import Solver, State

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem


@dataclass
class Newton(Solver):
    """Solve J_g(z) d = −g(z) with a dense batched LU, then backtrack on ‖g‖.

    Trial step lengths α = 1, ½, ¼, … are accepted per sample at the first α that satisfies the
    sufficient-decrease test ‖g(z + α d)‖ ≤ (1 − c α) ‖g(z)‖. When none passes within
    ``max_backtracks`` the smallest trial step is taken, so the iteration keeps moving and the
    diagnostics can see the stall. Singular Jacobians fall back to a least-squares step.
    Cost per iteration: one Jacobian (n JVPs), one LU of n×n, 1 + (backtracks) evaluations of g.
    """

    name: ClassVar[str] = "newton"
    summary: ClassVar[str] = "Newton with autodiff Jacobians and backtracking line search"
    line_search: bool = True
    max_backtracks: int = 20
    c: float = 1e-4

    def check(self) -> None:
        """Validate the line-search settings."""
        if self.max_backtracks < 0:
            raise ValueError(f"max_backtracks: must be ≥ 0, got {self.max_backtracks}")
        if not 0.0 < self.c < 1.0:
            raise ValueError(f"c: must lie in (0, 1), got {self.c}")

    def init(self, problem: Problem, z0: torch.Tensor) -> State:
        """Check dense Jacobians fit, then evaluate the residual at the start."""
        problem.check_dense_fits()
        return State(z=z0, g=problem.g(z0))

    def step(self, problem: Problem, state: State) -> State:
        """One Newton step with backtracking."""
        import torch

        _, jac = problem.jacobian(state.z)
        direction = -_solve(jac, state.g)
        z_new = state.z + direction
        g_new = problem.g(z_new)
        if not self.line_search:
            return State(z=z_new, g=g_new)

        norm0 = torch.linalg.vector_norm(state.g, dim=1)
        alpha = torch.ones_like(norm0)
        z_acc, g_acc = z_new, g_new
        for _ in range(self.max_backtracks):
            norm = torch.linalg.vector_norm(g_acc, dim=1)
            bad = ~(torch.isfinite(norm) & (norm <= (1 - self.c * alpha) * norm0))
            if not bool(bad.any()):
                break
            alpha = torch.where(bad, alpha / 2, alpha)
            z_try = state.z + alpha[:, None] * direction
            g_try = problem.g(z_try)
            z_acc = torch.where(bad[:, None], z_try, z_acc)
            g_acc = torch.where(bad[:, None], g_try, g_acc)
        return State(z=z_acc, g=g_acc)


def _solve(jac: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve jac @ x = rhs per sample; least squares where the Jacobian is singular."""
    import torch

    sol, info = torch.linalg.solve_ex(jac, rhs)
    singular = info != 0
    if bool(singular.any()) or not bool(torch.isfinite(sol).all()):
        lsq = torch.linalg.pinv(jac) @ rhs[..., None]
        bad = (singular | ~torch.isfinite(sol).all(dim=1))[:, None]
        sol = torch.where(bad, lsq[..., 0], sol)
    return sol
