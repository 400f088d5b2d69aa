"""The one convergence test: when a sample has converged, diverged, gone non-finite or stalled.

The driver, ``auto``, the peers' early stop and the diagnostics all ask this object, so the rule
a report states is the rule the run applied. Two stopping modes:

- ``abs`` (the default): ‖g(z_k)‖ ≤ atol + rtol·‖g(z_0)‖, a per-sample threshold fixed at the
  start (scipy's and PETSc's absolute/relative-to-start pair);
- ``rel``: ‖g(z_k)‖ ≤ atol + rtol·‖f(z_k)‖, i.e. the relative residual ‖f(z) − z‖/‖f(z)‖ that
  torchdeq's ``stop_mode='rel'`` tests, with atol as a floor for solutions near zero.

"Relative residual" in reports and JSON always means ‖f(z) − z‖/‖f(z)‖.

The definitions stay torch-free at import time so ``deq validate`` stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

StopMode = Literal["abs", "rel"]
STOP_MODES: tuple[str, ...] = ("abs", "rel")

# A sample whose residual exceeds this multiple of its starting residual is declared diverged.
# Generous on purpose: non-normal maps can grow transiently by orders of magnitude and still converge.
DIVERGENCE_FACTOR = 1e8


@dataclass(frozen=True)
class ConvergenceTest:
    """Per-sample verdicts from residual norms: converged, failed (diverged or non-finite)."""

    atol: float = 1e-10
    rtol: float = 0.0
    mode: StopMode = "abs"
    divergence_factor: float = DIVERGENCE_FACTOR

    def describe(self) -> str:
        """The rule in words, as reports and docs state it."""
        if self.mode == "rel":
            return "‖g‖ ≤ atol + rtol·‖f(z)‖"
        return "‖g‖ ≤ atol + rtol·‖g(z0)‖"

    def start(self, res0: torch.Tensor) -> Limits:
        """The per-sample limits of a run that starts with residual norms ``res0``."""
        import torch

        base = self.atol + (self.rtol * res0 if self.mode == "abs" else torch.zeros_like(res0))
        ceiling = self.divergence_factor * torch.clamp_min(res0, self.atol)
        return Limits(base=base, ceiling=ceiling, rtol=self.rtol if self.mode == "rel" else 0.0)

    def threshold(self, limits: Limits, f_norm: torch.Tensor | None = None) -> torch.Tensor:
        """The tolerance each sample must meet now (depends on ‖f(z)‖ in ``rel`` mode)."""
        if limits.rtol and f_norm is not None:
            return limits.base + limits.rtol * f_norm
        return limits.base

    def converged(
        self, res: torch.Tensor, limits: Limits, f_norm: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B,) mask: the residual meets the tolerance (False for NaN)."""
        return res <= self.threshold(limits, f_norm)

    def failed(self, res: torch.Tensor, limits: Limits) -> torch.Tensor:
        """(B,) mask: the residual is beyond the divergence ceiling or not finite."""
        return ~(res <= limits.ceiling)

    def met(self, res: float, res0: float, f_norm: float) -> bool:
        """The same test for one sample's plain numbers (peers, diagnostics)."""
        extra = self.rtol * (f_norm if self.mode == "rel" else res0)
        return res <= self.atol + extra

    def scalar_threshold(self, res0: float, f_norm: float) -> float:
        """One sample's tolerance as a number (for reports)."""
        return self.atol + self.rtol * (f_norm if self.mode == "rel" else res0)


@dataclass
class Limits:
    """What a run fixes at its start: the tolerance base, the divergence ceiling and rtol for ``rel``."""

    base: torch.Tensor  # (B,)
    ceiling: torch.Tensor  # (B,)
    rtol: float = 0.0


@dataclass
class StallWatch:
    """Progress bookkeeping: a sample stalls when ‖g‖ has not fallen below ``progress`` × its level at
    the last sufficient decrease for ``patience`` consecutive updates.

    Also tracks each sample's best residual, so growth relative to it can be judged.
    """

    progress: float = 0.5
    patience: int = 30

    def start(self, res: torch.Tensor) -> StallState:
        """Bookkeeping for residual norms ``res`` at the start."""
        import torch

        return StallState(
            best=res.clone(), mark=res.clone(), since=torch.zeros_like(res, dtype=torch.int64)
        )

    def update(self, state: StallState, res: torch.Tensor) -> torch.Tensor:
        """Record new residual norms; return the (B,) mask of samples that have stalled."""
        import torch

        # fmin: a NaN residual leaves the best as it was (this runs every iteration of auto,
        # so it is kept to a handful of operations).
        state.best = torch.fmin(state.best, res)
        decreased = res <= self.progress * state.mark
        state.mark = torch.where(decreased, res, state.mark)
        state.since = torch.where(decreased, 0, state.since + 1)
        return state.since >= self.patience


@dataclass
class StallState:
    """Per-sample best residual, the level at the last sufficient decrease, and updates since."""

    best: torch.Tensor
    mark: torch.Tensor
    since: torch.Tensor
