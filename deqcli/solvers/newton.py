"""Newton's method on g(z) = 0 with autodiff Jacobians and a per-sample backtracking line search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from deqcli.solvers.base import Solver, State
from deqcli.solvers.linesearch import backtrack

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem


@dataclass
class NewtonState(State):
    """Iterate and residual, plus the samples still running (from the driver)."""


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

    def init(self, problem: Problem, z0: torch.Tensor) -> NewtonState:
        """Check dense Jacobians fit, then evaluate the residual at the start."""
        problem.check_dense_fits()
        return NewtonState(z=z0, g=problem.g(z0))

    def step(self, problem: Problem, state: State) -> NewtonState:
        """One Newton step with backtracking."""
        active = state.active if isinstance(state, NewtonState) else None
        _, jac = problem.jacobian(state.z)
        direction = -_solve(jac, state.g)
        if not self.line_search:
            z_new = state.z + direction
            return NewtonState(z=z_new, g=problem.g(z_new), active=active)
        z_new, g_new, _ = backtrack(
            problem,
            state.z,
            state.g,
            direction,
            c=self.c,
            max_backtracks=self.max_backtracks,
            active=active,
        )
        return NewtonState(z=z_new, g=g_new, active=active)


def _solve(jac: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve jac @ x = rhs per sample; least squares where the Jacobian is singular.

    Samples whose Jacobian or right-hand side is not finite (a sample the driver already stopped
    as non-finite keeps its last rows) get a zero step instead of poisoning the pseudo-inverse.
    """
    import torch

    sol, info = torch.linalg.solve_ex(jac, rhs)
    singular = info != 0
    if bool(singular.any()) or not bool(torch.isfinite(sol).all()):
        finite = torch.isfinite(jac).all(dim=(1, 2)) & torch.isfinite(rhs).all(dim=1)
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        safe_jac = torch.where(finite[:, None, None], jac, eye)
        safe_rhs = torch.where(finite[:, None], rhs, 0.0)
        lsq = (torch.linalg.pinv(safe_jac) @ safe_rhs[..., None])[..., 0]
        bad = (singular | ~torch.isfinite(sol).all(dim=1))[:, None]
        sol = torch.where(bad, lsq, sol)
    return sol
