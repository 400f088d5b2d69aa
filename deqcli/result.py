"""Outcomes of a solve: the Status enum and the SolveResult record with its JSON encoding.

This module must stay importable without torch: tensors are converted lazily in ``to_dict``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

SCHEMA_VERSION = "1"


class Status(str, Enum):
    """Why a sample (or a whole solve) stopped. Each member carries a one-line message."""

    CONVERGED = "converged"
    MAX_ITER = "max_iter"
    DIVERGED = "diverged"
    NONFINITE = "nonfinite"
    OSCILLATING = "oscillating"
    STALLED = "stalled"
    TIMEOUT = "timeout"

    @property
    def message(self) -> str:
        """A one-line human explanation of the status."""
        return _MESSAGES[self]

    @property
    def ok(self) -> bool:
        """True only for CONVERGED."""
        return self is Status.CONVERGED


_MESSAGES = {
    Status.CONVERGED: "the residual met the tolerance",
    Status.MAX_ITER: "the iteration budget (max_iter) ran out before the tolerance was met",
    Status.DIVERGED: "the residual grew far beyond its starting value",
    Status.NONFINITE: "the iterate or residual became inf or NaN",
    Status.OSCILLATING: "the iterates cycle instead of settling",
    Status.STALLED: "no progress over many iterations while the residual is above tolerance",
    Status.TIMEOUT: "the wall-clock limit (timeout) ran out",
}

# When several samples failed, the overall status names the most severe failure.
_SEVERITY = [
    Status.NONFINITE,
    Status.DIVERGED,
    Status.OSCILLATING,
    Status.STALLED,
    Status.TIMEOUT,
    Status.MAX_ITER,
    Status.CONVERGED,
]


def overall_status(statuses: list[Status]) -> Status:
    """CONVERGED only when every sample converged, else the most severe failure among the samples."""
    present = set(statuses)
    return next(s for s in _SEVERITY if s in present)


@dataclass
class Counts:
    """Per-sample evaluation counts, maintained by the problem's counting wrapper.

    A batched call of the map counts once for every sample still running when it is made, so a
    sample's counts are what solving it alone costs (comparable with per-sample peers); ``totals``
    reports the largest per-sample count, which is the number of batched calls.
    """

    nfev: list[int]
    njev: list[int]
    jvp: list[int]
    vjp: list[int]

    def totals(self) -> dict[str, int]:
        """The maximum count over samples for each kind of evaluation."""
        return {k: max(getattr(self, k), default=0) for k in ("nfev", "njev", "jvp", "vjp")}


@dataclass
class SolveResult:
    """Everything a solve produced. Tensors live on the solve's device until encoded."""

    problem: str
    solver: str
    options: dict[str, Any]
    solution: Any  # torch.Tensor (batch, n)
    sample_status: list[Status]
    iterations: list[int]  # per sample: iterations taken when it stopped
    counts: Counts
    residual_history: list[list[float]]  # [row][sample] absolute ‖f(z)−z‖
    relative_history: list[list[float]]  # [row][sample] relative residual ‖f(z)−z‖ / ‖f(z)‖
    step_history: list[list[float]]  # [row-1][sample] ‖z_k − z_{k−1}‖
    time_history: list[float]  # seconds since start at each recorded iteration
    tail_iterates: list[Any]  # the last iterates, (batch, n) tensors, oldest first
    wall_time: float
    device: str
    dtype: str
    atol: float
    rtol: float
    max_iter: int
    stop_mode: str = "abs"
    # Iteration number of each history row: 0..K unless a long run's middle was thinned.
    history_iterations: list[int] | None = None
    history_summary: dict[str, Any] | None = None
    # One sample's state shape when it is not a vector (an image (C, H, W), a sequence (T, d)).
    state_shape: list[int] | None = None
    notes: list[str] = field(default_factory=list)
    diagnostics: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    _tail: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def tail(self) -> Any:
        """The last iterates as one (k, batch, n) tensor, oldest first (for cycle detection).

        Stacked on first use rather than by the driver, so a solve whose diagnostics are off
        never pays for the copy.
        """
        if self._tail is None:
            import torch

            self._tail = torch.stack(self.tail_iterates)
        return self._tail

    @property
    def z_star(self) -> Any:
        """The solution in the state's shape: (batch, *state_shape), (batch, n) for vectors."""
        shape = self.state_shape or [self.solution.shape[1]]
        return self.solution.reshape(self.solution.shape[0], *shape)

    @property
    def status(self) -> Status:
        """The overall status: converged only when every sample converged."""
        return overall_status(self.sample_status)

    @property
    def batch(self) -> int:
        """Number of samples solved together."""
        return len(self.sample_status)

    @property
    def nit(self) -> int:
        """Iterations taken by the slowest sample."""
        return max(self.iterations, default=0)

    @property
    def rows(self) -> list[int]:
        """The iteration number of each history row (0, 1, …, K unless the middle was thinned)."""
        if self.history_iterations is None:
            return list(range(len(self.residual_history)))
        return self.history_iterations

    @property
    def total_iterations(self) -> int:
        """Iterations the driver ran (the last history row's iteration)."""
        return self.rows[-1] if self.residual_history else 0

    def sample_history(self, b: int) -> tuple[list[int], list[float], list[float]]:
        """Sample b's kept history up to the iteration it stopped at: (iterations, ‖g‖, ‖Δz‖).

        The driver freezes a stopped sample, so its rows after that iteration repeat the last one
        and are cut off here. Steps are aligned with the iterations after the first.
        """
        stop = self.iterations[b]
        rows = self.rows
        end = next((i for i, k in enumerate(rows) if k > stop), len(rows))
        iters = rows[:end]
        residuals = [self.residual_history[i][b] for i in range(end)]
        steps = [self.step_history[i - 1][b] for i in range(1, end)]
        if iters[-1] != stop:  # the stopping row was thinned away: its values are the last row's
            iters.append(stop)
            residuals.append(self.residual_history[-1][b])
            steps.append(self.step_history[-1][b] if self.step_history else 0.0)
        return iters, residuals, steps

    def thresholds(self) -> list[float]:
        """The tolerance each sample had to meet at its last iterate (see ``stop_mode``)."""
        from deqcli.solvers.convergence import ConvergenceTest

        test = ConvergenceTest(atol=self.atol, rtol=self.rtol, mode=self.stop_mode)  # type: ignore[arg-type]
        r0 = self.residual_history[0] if self.residual_history else []
        out = []
        for b, (res, rel) in enumerate(
            zip(self.final_residuals(), self.final_relative(), strict=True)
        ):
            f_norm = res / rel if rel and math.isfinite(rel) and rel > 0 else 0.0
            out.append(test.scalar_threshold(r0[b], f_norm))
        return out

    def final_residuals(self) -> list[float]:
        """Absolute residual ‖f(z)−z‖ of each sample at its last iterate.

        A stopped sample is frozen by the driver, so its final value is the last row's.
        """
        return list(self.residual_history[-1]) if self.residual_history else []

    def final_relative(self) -> list[float]:
        """Relative residual ‖f(z)−z‖/‖f(z)‖ of each sample at its last iterate."""
        return list(self.relative_history[-1]) if self.relative_history else []

    def to_dict(self, *, history: bool = True) -> dict[str, Any]:
        """A JSON-ready document; its layout is versioned by ``schema_version``."""
        finals = self.final_residuals()
        rels = self.final_relative()
        states = self.z_star
        samples = []
        for b in range(self.batch):
            sample: dict[str, Any] = {
                "index": b,
                "status": self.sample_status[b].value,
                "message": self.sample_status[b].message,
                "iterations": self.iterations[b],
                "nfev": self.counts.nfev[b],
                "njev": self.counts.njev[b],
                "jvp": self.counts.jvp[b],
                "vjp": self.counts.vjp[b],
                "residual": _num(finals[b]),
                "relative_residual": _num(rels[b]),
                "solution": json_nested(states[b].detach().cpu().tolist()),
            }
            if self.diagnostics is not None and "samples" in self.diagnostics:
                sample["diagnostics"] = self.diagnostics["samples"][b]
            samples.append(sample)
        doc: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "problem": self.problem,
            "solver": self.solver,
            "options": self.options,
            "status": self.status.value,
            "message": self.status.message,
            "converged": self.status.ok,
            "batch": self.batch,
            "converged_samples": sum(s.ok for s in self.sample_status),
            "iterations": self.nit,
            **self.counts.totals(),
            "residual": _num(max(finals, default=0.0)),
            "relative_residual": _num(max(rels, default=0.0)),
            "wall_time": self.wall_time,
            "state_shape": list(states.shape[1:]),
            "device": self.device,
            "dtype": self.dtype,
            "tolerance": {
                "stop_mode": self.stop_mode,
                "rule": _RULES.get(self.stop_mode, ""),
                "atol": self.atol,
                "rtol": self.rtol,
                "max_iter": self.max_iter,
            },
            "notes": self.notes,
            "samples": samples,
        }
        if self.diagnostics is not None:
            doc["diagnostics"] = {k: v for k, v in self.diagnostics.items() if k != "samples"}
        if self.extra:
            doc.update(self.extra)
        if history:
            doc["history"] = {
                "iterations": self.rows,
                "residual": [[_num(v) for v in row] for row in self.residual_history],
                "relative_residual": [[_num(v) for v in row] for row in self.relative_history],
                "step": [[_num(v) for v in row] for row in self.step_history],
                "time": self.time_history,
            }
            if self.history_summary is not None:
                doc["history"]["summary"] = {
                    k: [_num(v) for v in val] if isinstance(val, list) else val
                    for k, val in self.history_summary.items()
                }
        return doc


# The stopping rules by mode, as the JSON states them (see solvers/convergence.py).
_RULES = {"abs": "‖g‖ ≤ atol + rtol·‖g(z0)‖", "rel": "‖g‖ ≤ atol + rtol·‖f(z)‖"}


def json_nested(value: Any) -> Any:
    """Nested lists of floats with inf/NaN encoded as strings, for JSON."""
    if isinstance(value, list):
        return [json_nested(v) for v in value]
    return _num(value)


def _num(value: float) -> float | str | None:
    """JSON has no inf/NaN: encode them as strings so documents stay strictly valid."""
    if value is None:
        return None
    v = float(value)
    if math.isfinite(v):
        return v
    return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
