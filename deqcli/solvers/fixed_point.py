"""Naive (Picard) iteration with optional damping: z ← (1−β) z + β f(z) = z − β g(z)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from deqcli.solvers.base import Solver, State

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem


@dataclass
class FixedPointState(State):
    """Iterate and residual, plus f(z) = z − g so the undamped step needs no arithmetic."""

    f: torch.Tensor


@dataclass
class FixedPoint(Solver):
    """Forward iteration. Converges linearly with rate ρ(I − β J_g) when that is below 1.

    ``beta`` in (0, 2): 1 is plain iteration, below 1 damps (breaks period-2 oscillations, tames
    maps whose Jacobian has eigenvalues below −1), above 1 over-relaxes.
    Cost per iteration: one evaluation of f and one or two vector operations; no extra memory.
    """

    name: ClassVar[str] = "fixed_point"
    summary: ClassVar[str] = "naive forward iteration with optional damping"
    beta: float = 1.0

    def check(self) -> None:
        """β must lie in (0, 2)."""
        if not 0.0 < self.beta < 2.0:
            raise ValueError(f"beta: must lie in (0, 2), got {self.beta}")

    def init(self, problem: Problem, z0: torch.Tensor) -> FixedPointState:
        """Evaluate the map at the start."""
        f0 = problem.f(z0)
        return FixedPointState(z=z0, g=z0 - f0, f=f0)

    def step(self, problem: Problem, state: State) -> FixedPointState:
        """One (damped) forward step: one evaluation of f."""
        import torch

        if self.beta == 1.0 and isinstance(state, FixedPointState):
            z = state.f
        else:
            z = torch.add(state.z, state.g, alpha=-self.beta)
        f = problem.f(z)
        return FixedPointState(z=z, g=z - f, f=f)
