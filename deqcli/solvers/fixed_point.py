"""Naive (Picard) iteration with optional damping: z ← (1−β) z + β f(z) = z − β g(z)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from deqcli.solvers.base import Solver, State

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem


@dataclass
class FixedPoint(Solver):
    """Forward iteration. Converges linearly with rate ρ(I − β J_g) when that is below 1.

    ``beta`` in (0, 2): 1 is plain iteration, below 1 damps (breaks period-2 oscillations, tames
    maps whose Jacobian has eigenvalues below −1), above 1 over-relaxes.
    """

    name: ClassVar[str] = "fixed_point"
    summary: ClassVar[str] = "naive forward iteration with optional damping"
    beta: float = 1.0

    def check(self) -> None:
        """β must lie in (0, 2)."""
        if not 0.0 < self.beta < 2.0:
            raise ValueError(f"beta: must lie in (0, 2), got {self.beta}")

    def init(self, problem: Problem, z0: torch.Tensor) -> State:
        """Evaluate the residual at the start."""
        return State(z=z0, g=problem.g(z0))

    def step(self, problem: Problem, state: State) -> State:
        """One (damped) forward step: one evaluation of f."""
        z = state.z - self.beta * state.g
        return State(z=z, g=problem.g(z))
