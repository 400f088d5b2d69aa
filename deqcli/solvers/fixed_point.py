"""Naive (Picard) iteration with optional damping: z ← (1−β) z + β f(z) = z − β g(z)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deqcli.solvers.base import Method, State, evaluate

if TYPE_CHECKING:
    from deqcli.problems.base import Problem
    from deqcli.solvers.options import FixedPoint


@dataclass
class FixedPointState(State):
    """Iterate and residual, plus f(z) = z − g so the undamped step needs no arithmetic, and ‖g‖
    (the undamped step's length next time: z_new − z = f − z = −g, exactly in floating point)."""

    f: torch.Tensor
    g_norm: torch.Tensor | None = None


class FixedPointMethod(Method):
    """Forward iteration. Converges linearly with rate ρ(I − β J_g) when that is below 1.

    ``beta`` in (0, 2): 1 is plain iteration, below 1 damps (breaks period-2 oscillations, tames
    maps whose Jacobian has eigenvalues below −1), above 1 over-relaxes.
    Cost per iteration: one evaluation of f and one or two vector operations; no extra memory.
    """

    options: FixedPoint

    def init(self, problem: Problem, z0: torch.Tensor) -> FixedPointState:
        """Evaluate the map at the start."""
        f0, g0 = evaluate(problem, z0)
        return FixedPointState(z=z0, g=g0, f=f0, g_norm=torch.linalg.vector_norm(g0, dim=1))

    def step(self, problem: Problem, state: FixedPointState) -> FixedPointState:  # type: ignore[override]
        """One (damped) forward step: one evaluation of f."""
        beta = self.options.beta
        z = state.f if beta == 1.0 else torch.add(state.z, state.g, alpha=-beta)
        f, g = evaluate(problem, z)
        # The driver's norms, from what the step holds: ‖f‖ directly instead of ‖z − g‖, and the
        # undamped step's length is the last ‖g‖.
        res = torch.linalg.vector_norm(g, dim=1)
        step = state.g_norm if beta == 1.0 else None
        return FixedPointState(
            z=z,
            g=g,
            f=f,
            g_norm=res,
            res=res,
            f_norm=torch.linalg.vector_norm(f, dim=1),
            step_norm=step,
        )
