"""Wall-clock deadlines that hold wherever the map is evaluated.

``run.timeout`` must stop our solvers, the peers' own loops (scipy, torchdeq), the diagnostics and
remedy trials alike. All of them evaluate the problem through ``Problem.raw_f``/``raw_g``, which call
``checkpoint()``: past the deadline in force it raises ``DeadlineExceeded``. That is an internal stop,
not an error: the driver loop turns it into the ``timeout`` status with the last finished iterate,
the peer adapters catch it like their other early stops, and other work with a deadline of its
own (the diagnostics, a precheck, remedy trials) runs inside ``bounded``, which stops it and notes
what was cut short.

Deadlines nest: an inner one never extends an outer one. ``checkpoint()`` is also the safe point
where a held Ctrl-C is raised (``deqcli.interrupt``). Nothing here imports torch.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from deqcli import interrupt


class DeadlineExceeded(Exception):
    """The deadline in force has passed; raised from inside an evaluation.

    The peer adapters catch it with their own ``PeerStop`` (``solvers.peers.EARLY_STOPS``).
    """

    def __init__(self, seconds: float | None = None, what: str = "run.timeout") -> None:
        self.seconds = seconds
        self.what = what
        limit = f" of {seconds:g} s" if seconds is not None else ""
        super().__init__(f"stopped by {what}{limit}")


@dataclass(frozen=True)
class Deadline:
    """A point in time (``time.perf_counter``) after which work stops; ``seconds`` is for messages."""

    at: float
    seconds: float
    what: str = "run.timeout"

    @classmethod
    def after(cls, seconds: float, what: str = "run.timeout") -> Deadline:
        """The deadline ``seconds`` from now."""
        return cls(time.perf_counter() + seconds, seconds, what)

    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return time.perf_counter() > self.at

    def remaining(self) -> float:
        """Seconds left (negative once passed)."""
        return self.at - time.perf_counter()

    def check(self) -> None:
        """Raise DeadlineExceeded once the deadline has passed."""
        if time.perf_counter() > self.at:
            raise DeadlineExceeded(self.seconds, self.what)


_current: ContextVar[Deadline | None] = ContextVar("deq_deadline", default=None)


def current() -> Deadline | None:
    """The deadline in force here, if any."""
    return _current.get()


@contextmanager
def armed(seconds: float | None, what: str = "run.timeout") -> Iterator[Deadline | None]:
    """Within the block, evaluations stop ``seconds`` from now (None or inf: no new limit).

    An enclosing deadline that comes sooner stays in force.
    """
    outer = _current.get()
    mine = None
    if seconds is not None and math.isfinite(seconds):
        mine = Deadline.after(max(seconds, 0.0), what)
    chosen = mine if outer is None or (mine is not None and mine.at < outer.at) else outer
    token = _current.set(chosen)
    try:
        yield chosen
    finally:
        _current.reset(token)


@contextmanager
def suspended() -> Iterator[None]:
    """Within the block no deadline applies (to finish a result after the deadline has passed)."""
    token = _current.set(None)
    try:
        yield
    finally:
        _current.reset(token)


@contextmanager
def bounded(seconds: float | None, what: str, notes: list[str]) -> Iterator[None]:
    """Run ``what`` (the diagnostics, a precheck, remedy trials) under a deadline of its own
    (run.timeout); past it, stop it and append a note to ``notes`` instead of failing."""
    try:
        with armed(seconds):
            yield
    except DeadlineExceeded as exc:
        notes.append(
            f"{what} stopped after run.timeout ({exc.seconds:g} s); raise run.timeout for them"
        )


def checkpoint() -> None:
    """The safe point every evaluation passes: a held Ctrl-C, then the deadline in force."""
    interrupt.checkpoint()
    deadline = _current.get()
    if deadline is not None:
        deadline.check()
