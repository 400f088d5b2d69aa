"""torchdeq's solvers as peers (optional: ``pip install 'deqcli[peers]'``).

torchdeq's solvers take a batched map and run their own loop on the whole batch. The adapter
passes them the problem's counted ``f`` and records every point they evaluate it at: for these
three solvers (Anderson, Broyden without line search, forward iteration) each evaluation is at
the next iterate, so one evaluation is one replayed iteration. They get the shared tolerance in
torchdeq's matching stop mode (abs: tol = atol; rel: tol = rtol) and the iteration budget; the run is also ended as soon
as every sample has met the shared rule ‖g‖ ≤ atol + rtol·‖g(z0)‖ once. Options default to
torchdeq's own defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from deqcli import deadline
from deqcli.solvers.peers import (
    EARLY_STOPS,
    PeerSolver,
    PeerStop,
    Recording,
    SharedRule,
    stop_message,
    unavailable,
)

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem
    from deqcli.solvers.base import StopRule


# torchdeq sizes some buffers by max_iter up front (broyden_solver's default memory is max_iter;
# on its own convergence every solver pads its trace to max_iter entries), so the budget passed
# to it is capped; our driver still stops the run at run.max_iter.
TORCHDEQ_MAX_ITER = 100_000


# broyden_solver's memory when none is given (torchdeq's own default, max_iter, could be 10⁹).
DEFAULT_MEMORY_CAP = 1_000


def passed_max_iter(max_iter: int) -> int:
    """The iteration budget torchdeq is given for ``run.max_iter`` (capped, see above)."""
    return min(max_iter + 1, TORCHDEQ_MAX_ITER)


@dataclass
class TorchdeqSolver(PeerSolver):
    """Base adapter for a torchdeq solver function."""

    package: ClassVar[str] = "torchdeq"
    function: ClassVar[str] = ""

    def torchdeq_options(self) -> dict[str, Any]:
        """Solver-specific keyword arguments."""
        return {}

    def record(self, problem: Problem, z0: torch.Tensor, stop: StopRule) -> Recording:
        """Run the torchdeq solver on the whole batch, recording each evaluation point."""
        import torch

        try:
            from torchdeq import solver as td_solver
        except ImportError:
            raise unavailable("torchdeq") from None
        solve = getattr(td_solver, self.function)
        zs: list[torch.Tensor] = []
        gs: list[torch.Tensor] = []
        met = torch.zeros(problem.batch, dtype=torch.bool, device=z0.device)
        rule = SharedRule(stop)

        own: list[BaseException] = []  # failures of our own evaluation, not of torchdeq

        def func(x: torch.Tensor) -> torch.Tensor:
            try:
                fx = problem.f(x)
            except BaseException as exc:
                own.append(exc)
                raise
            z = x.detach().clone()  # torchdeq may hand us a view of its own buffer
            g = z - fx.detach()
            zs.append(z)
            gs.append(g)
            now = rule.met(z, g)
            if len(zs) > 1:
                met.logical_or_(now)
                if bool(met.all()) or len(zs) > stop.max_iter:
                    raise PeerStop
            return fx

        message = "torchdeq returned (its own tolerance or budget)"
        try:
            with torch.no_grad():
                solve(
                    func,
                    z0,
                    max_iter=passed_max_iter(stop.max_iter),
                    tol=stop.rtol if stop.stop_mode == "rel" else stop.atol,
                    stop_mode=stop.stop_mode,
                    **self.torchdeq_options(),
                )
        except EARLY_STOPS as stop_:
            message = stop_message(stop_)
        except (RuntimeError, ValueError, ArithmeticError) as exc:
            if own and exc is own[-1]:
                raise  # the map itself failed: that is the problem's error, not the peer's
            # torchdeq failed inside its own loop (a singular system, say): keep what it visited.
            message = f"torchdeq raised {type(exc).__name__}: {exc}".splitlines()[0]
        if not zs:  # the deadline passed before torchdeq evaluated anything
            with deadline.suspended():
                zs.append(z0.detach().clone())
                gs.append(problem.g(z0).detach())
        steps = len(zs) - 1
        limit = deadline.current()
        cut = limit is not None and limit.expired()
        return Recording(
            zs=torch.stack(zs, dim=1),
            gs=torch.stack(gs, dim=1),
            lengths=[steps] * problem.batch,
            messages=[message] * problem.batch,
            timed_out=[cut] * problem.batch,
        )


@dataclass
class TorchdeqAnderson(TorchdeqSolver):
    """torchdeq.solver.anderson_solver: depth m, absolute regularisation lam, damping tau."""

    name: ClassVar[str] = "torchdeq:anderson"
    summary: ClassVar[str] = "torchdeq anderson_solver"
    function: ClassVar[str] = "anderson_solver"
    m: int = 6
    lam: float = 1e-4
    tau: float = 1.0

    def check(self) -> None:
        """torchdeq needs at least two stored iterates."""
        super().check()
        if self.m < 2:
            raise ValueError(f"m: must be ≥ 2, got {self.m}")

    def torchdeq_options(self) -> dict[str, Any]:
        """m, lam and tau as torchdeq names them."""
        return {"m": self.m, "lam": self.lam, "tau": self.tau}


@dataclass
class TorchdeqBroyden(TorchdeqSolver):
    """torchdeq.solver.broyden_solver; ``memory`` is its LBFGS_thres (None: max_iter + 1, at most
    ``DEFAULT_MEMORY_CAP``, since torchdeq allocates that many update vectors up front)."""

    name: ClassVar[str] = "torchdeq:broyden"
    summary: ClassVar[str] = "torchdeq broyden_solver"
    function: ClassVar[str] = "broyden_solver"
    memory: int | None = None

    def check(self) -> None:
        """Memory must be positive when given."""
        super().check()
        if self.memory is not None and self.memory < 1:
            raise ValueError(f"memory: must be ≥ 1, got {self.memory}")

    def torchdeq_options(self) -> dict[str, Any]:
        """No line search (torchdeq's default, which keeps one evaluation per iteration)."""
        memory = self.memory
        if memory is None:
            memory = min(passed_max_iter(self._stop.max_iter), DEFAULT_MEMORY_CAP)
        return {"LBFGS_thres": memory, "ls": False}


@dataclass
class TorchdeqFixedPointIter(TorchdeqSolver):
    """torchdeq.solver.fixed_point_iter with damping tau."""

    name: ClassVar[str] = "torchdeq:fixed_point_iter"
    summary: ClassVar[str] = "torchdeq fixed_point_iter"
    function: ClassVar[str] = "fixed_point_iter"
    tau: float = 1.0

    def check(self) -> None:
        """Damping must lie in (0, 2)."""
        super().check()
        if not 0.0 < self.tau < 2.0:
            raise ValueError(f"tau: must lie in (0, 2), got {self.tau}")

    def torchdeq_options(self) -> dict[str, Any]:
        """tau as torchdeq names it."""
        return {"tau": self.tau}
