"""The driver's per-iteration record, with memory bounded however long a run is.

Every iteration appends one row per series (‖g‖, ‖f(z)‖ and ‖Δz‖ per sample, and the time). While
a run has at most ``limit`` rows nothing is dropped, so short runs keep their exact history. When
the rows reach ``limit`` the record is compressed: the first quarter (from the start) and the
newest half stay exact and every other row of the middle is dropped. Each kept row remembers its
iteration number, so a long run keeps an exact start, an exact recent window (which the
diagnostics' rates, orders and growth tests read), a thinned middle, and the smallest residual
ever seen per sample. Compression is amortised O(1) per iteration.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Rows kept before the middle of the history is thinned (run.history_limit).
HISTORY_LIMIT = 10_000
# The smallest limit that leaves room for an exact start, a thinned middle and a recent window.
MIN_HISTORY_LIMIT = 64


@dataclass
class History:
    """Residual, f-norm, step and time rows with their iteration numbers; bounded by ``limit``."""

    limit: int = HISTORY_LIMIT
    residual: list[torch.Tensor] = field(default_factory=list)
    f_norm: list[torch.Tensor] = field(default_factory=list)
    step: list[torch.Tensor | None] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    iteration: list[int] = field(default_factory=list)
    dropped: int = 0
    best: torch.Tensor | None = None  # smallest residual per sample among dropped rows

    def append(
        self,
        k: int,
        res: torch.Tensor,
        f_norm: torch.Tensor,
        step: torch.Tensor | None,
        elapsed: float,
    ) -> None:
        """Record iteration ``k`` (``step`` is None for the start)."""
        self.iteration.append(k)
        self.residual.append(res)
        self.f_norm.append(f_norm)
        self.step.append(step)
        self.time.append(elapsed)
        if len(self.iteration) >= self.limit:
            self._compress()

    def replace(
        self, k: int, res: torch.Tensor, f_norm: torch.Tensor, frozen: torch.Tensor
    ) -> None:
        """Rewrite iteration ``k``'s row (one of the newest, which compression never drops) with
        these norms, and a zero step for the ``frozen`` samples."""
        import torch

        i = len(self.iteration) - 1
        while self.iteration[i] != k:
            i -= 1
        self.residual[i], self.f_norm[i] = res, f_norm
        step = self.step[i]
        if step is not None:
            self.step[i] = torch.where(frozen, 0.0, step)

    def truncate(self, k: int) -> None:
        """Drop the rows after iteration ``k`` (among the newest: compression never drops them)."""
        while self.iteration[-1] > k:
            for series in (self.residual, self.f_norm, self.step, self.time, self.iteration):
                series.pop()

    def _compress(self) -> None:
        import torch

        rows = len(self.iteration)
        head = self.limit // 4
        recent = self.limit // 2
        middle = range(head, rows - recent)
        drop = set(middle[1::2])
        if not drop:
            return
        dropped = torch.stack([self.residual[i] for i in sorted(drop)]).nan_to_num(nan=torch.inf)
        low = dropped.amin(dim=0)
        self.best = low if self.best is None else torch.minimum(self.best, low)
        for series in (self.residual, self.f_norm, self.step, self.time, self.iteration):
            series[:] = [v for i, v in enumerate(series) if i not in drop]  # type: ignore[index]
        self.dropped += len(drop)

    @property
    def decimated(self) -> bool:
        """True when rows of the middle were dropped."""
        return self.dropped > 0

    def export(self) -> dict[str, Any]:
        """Plain lists for a SolveResult: residual/relative/step rows, times and iteration numbers."""
        import torch

        residuals = torch.stack(self.residual)
        f_norms = torch.stack(self.f_norm)
        relative = residuals / f_norms.clamp_min(torch.finfo(residuals.dtype).tiny)
        steps = [s for s in self.step if s is not None]
        out: dict[str, Any] = {
            "residual_history": residuals.cpu().tolist(),
            "relative_history": relative.cpu().tolist(),
            "step_history": torch.stack(steps).cpu().tolist() if steps else [],
            "time_history": list(self.time),
            "history_iterations": list(self.iteration),
        }
        if self.decimated:
            kept = residuals.nan_to_num(nan=torch.inf).amin(dim=0)
            best = kept if self.best is None else torch.minimum(kept, self.best)
            out["history_summary"] = {
                "kept_rows": len(self.iteration),
                "dropped_rows": self.dropped,
                "min_residual": best.cpu().tolist(),
            }
        return out
