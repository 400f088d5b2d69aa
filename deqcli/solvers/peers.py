"""Running another library's solver under the one driver loop: record, then replay.

A peer (scipy.optimize.root, torchdeq) runs its own loop, so it cannot be stepped by our driver.
Instead ``init`` runs the peer to completion through the problem's counted methods (so nfev, njev
and friends are honest) while recording the iterates it visits; ``step`` then hands those
iterates to the driver one per iteration. The driver applies the same stopping rule, history and
status to them as to our own solvers. The peer is stopped early, through its callback, once every
sample has met that rule (or the iteration budget is used up), so it does no work the driver would
throw away. A sample whose recording ends before the driver stopped it is reported as stalled,
with the peer's own message in the notes.

Wall time is honest (it includes the peer's whole run); the per-iteration time history is not
(the run happens before the first replayed iteration).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

from deqcli.deadline import DeadlineExceeded
from deqcli.errors import PeerUnavailableError
from deqcli.result import Status
from deqcli.solvers.base import Solver, State, StopRule

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult
    from deqcli.solvers.convergence import Limits


class PeerStop(Exception):
    """Raised from inside a peer's function or callback to end its run early."""


# What ends a peer's run early from inside its loop: our own stop, or run.timeout passing
# during an evaluation (deqcli.deadline). The adapters catch both and keep what was recorded.
EARLY_STOPS = (PeerStop, DeadlineExceeded)


def stop_message(stop: Exception) -> str:
    """The peer's message for a run ended early by ``stop``."""
    if isinstance(stop, DeadlineExceeded):
        return str(stop)
    return "stopped by the shared stopping rule or iteration budget"


INSTALL = {"torchdeq": "pip install 'deqcli[peers]'", "scipy": "pip install scipy"}


def unavailable(module: str) -> PeerUnavailableError:
    """The error for a missing peer library, with the command that installs it."""
    return PeerUnavailableError(
        f"{module} is not installed; {INSTALL.get(module, 'pip install ' + module)}"
    )


def require(module: str) -> None:
    """Raise PeerUnavailableError when ``module`` cannot be found (without importing it)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module set to None in sys.modules, a broken parent
        found = False
    if not found:
        raise unavailable(module)


@dataclass
class ReplayState(State):
    """The recorded run: iterates and residuals of every sample, index 0 being the start."""

    zs: torch.Tensor  # (B, L + 1, n)
    gs: torch.Tensor  # (B, L + 1, n)
    lengths: torch.Tensor  # (B,) recorded steps per sample (shorter ones are padded)
    k: int = 0
    messages: list[str] = field(default_factory=list)
    timed_out: list[bool] = field(default_factory=list)


@dataclass
class Recording:
    """What a peer visited: iterates and residuals (B, L + 1, n), start first, padded by repeating
    each sample's last entry; ``lengths`` are the recorded steps per sample; one message each."""

    zs: torch.Tensor
    gs: torch.Tensor
    lengths: list[int]
    messages: list[str]
    timed_out: list[bool] = field(default_factory=list)  # run.timeout ended the sample's run


@dataclass
class PeerSolver(Solver):
    """Base class of peer adapters: subclasses implement ``record``."""

    package: ClassVar[str] = ""
    replays: ClassVar[bool] = True

    def __post_init__(self) -> None:
        self._stop = StopRule()

    def check(self) -> None:
        """A peer whose library is missing is an error before anything runs."""
        require(self.package)

    def setup(self, stop: StopRule) -> None:
        """Keep the stopping rule: the peer gets the same tolerance and budget."""
        self._stop = stop

    def record(self, problem: Problem, z0: torch.Tensor, stop: StopRule) -> Recording:
        """Run the peer from z0 and return what it visited."""
        raise NotImplementedError

    def init(self, problem: Problem, z0: torch.Tensor) -> ReplayState:
        """Run the peer to the end; the replay starts at its first recorded point."""
        import torch

        rec = self.record(problem, z0, self._stop)
        return ReplayState(
            z=rec.zs[:, 0],
            g=rec.gs[:, 0],
            zs=rec.zs,
            gs=rec.gs,
            lengths=torch.tensor(rec.lengths, device=rec.zs.device),
            messages=rec.messages,
            timed_out=rec.timed_out or [False] * len(rec.lengths),
        )

    def observe(self, state: State, active: torch.Tensor) -> torch.Tensor | None:
        """Samples whose recording has no further iterate are stuck."""
        if not isinstance(state, ReplayState):
            return None
        return state.lengths <= state.k

    def step(self, problem: Problem, state: State) -> ReplayState:
        """Hand the next recorded iterate of every sample to the driver (no evaluation)."""
        import torch

        if not isinstance(state, ReplayState):
            raise TypeError(f"{self.name}.step needs the state made by {self.name}.init")
        state.k += 1
        index = torch.clamp(state.lengths, max=state.k)
        rows = torch.arange(state.zs.shape[0], device=state.zs.device)
        state.z = state.zs[rows, index]
        state.g = state.gs[rows, index]
        return state

    def finish(self, state: State, result: SolveResult) -> None:
        """Attach the peer's own messages to the result."""
        if not isinstance(state, ReplayState):
            return
        result.extra["peer"] = {"library": self.package, "messages": state.messages}
        for b, cut in enumerate(state.timed_out):
            if cut and result.sample_status[b] is Status.STALLED:
                # The recording ended because run.timeout passed, not because the peer gave up.
                result.sample_status[b] = Status.TIMEOUT
        failed = [b for b, s in enumerate(result.sample_status) if not s.ok]
        for b in failed[:3]:
            result.notes.append(f"{self.name}: sample {b}: {state.messages[b]}")
        if len(failed) > 3:
            result.notes.append(f"{self.name}: {len(failed) - 3} more samples did not converge")


def pad_stack(rows: list[list[torch.Tensor]]) -> torch.Tensor:
    """Stack per-sample lists of (n,) tensors into (B, L + 1, n), repeating each last entry."""
    import torch

    longest = max(len(r) for r in rows)
    return torch.stack([torch.stack(r + [r[-1]] * (longest - len(r))) for r in rows])


class SharedRule:
    """The shared convergence test applied to a peer's points as they arrive (for its early stop)."""

    def __init__(self, stop: StopRule) -> None:
        self.test = stop.test
        self.limits: Limits | None = None

    def met(self, z: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per-row mask: the point meets the rule (the first point seen fixes the limits)."""
        import torch

        res = torch.linalg.vector_norm(g, dim=-1)
        if self.limits is None:
            self.limits = self.test.start(res)
        f_norm = torch.linalg.vector_norm(z - g, dim=-1)
        return self.test.converged(res, self.limits, f_norm)
