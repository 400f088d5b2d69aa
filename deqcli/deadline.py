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

One evaluation that never returns (a model's ``forward`` waiting on something, a loop of the user's
that does not end) never reaches ``checkpoint()``. For that case a watchdog timer (SIGALRM, in the
main thread where the platform has ``setitimer``) fires shortly after the deadline: if the process
is then running the user's own code inside an evaluation (``user_code()``), ``DeadlineExceeded`` is
raised there, as if their code had raised it, and the run ends as at any other deadline. Anywhere
else (torch's own code, ours) it waits and looks again: an exception at an arbitrary bytecode of a
library can leave it half-way through a change.
"""

from __future__ import annotations

import math
import os
import signal
import threading
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
        _watch(chosen)  # inside: a failure here must not leave the deadline in force
        yield chosen
    finally:
        _current.reset(token)
        _watch(outer)


@contextmanager
def suspended() -> Iterator[None]:
    """Within the block no deadline applies (to finish a result after the deadline has passed)."""
    outer = _current.get()
    token = _current.set(None)
    _watch(None)
    try:
        yield
    finally:
        _current.reset(token)
        _watch(outer)


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


# -- the watchdog for an evaluation that never returns ---------------------------------------------

# How long after the deadline the watchdog looks (at most a second; a tenth of short limits): an
# evaluation in progress at the deadline normally returns first and checkpoint() stops the run.
WATCHDOG_GRACE = 1.0
# How soon it looks again when the process was not in the user's code (in torch, or in ours).
WATCHDOG_RETRY = 0.1
# The longest the timer is set for at once: setitimer refuses more than about 9e9 s (time_t in
# microseconds), and a longer deadline (run.timeout: 1.0e300) is still valid. Past this the
# alarm finds time left and sets the timer again (``_on_alarm``).
WATCHDOG_MAX = 86_400.0

_OURS = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH = f"{os.sep}torch{os.sep}"


class _UserCode(threading.local):
    """Context manager marking the user's code of an evaluation (see ``user_code``). ``depth``
    is per thread: the watchdog, which runs in the main thread, reads the main thread's only."""

    depth = 0

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1


_USER_CODE = _UserCode()


def user_code() -> _UserCode:
    """``with user_code():`` around a call of the config's own map (a module's forward, a Python
    callable): there the watchdog may stop an evaluation that overruns the deadline."""
    return _USER_CODE


def _watch(deadline: Deadline | None) -> None:
    """Set the watchdog for ``deadline`` (None: clear it); only in the main thread, where signals
    are delivered, and only where no one else handles SIGALRM."""
    if (
        not hasattr(signal, "setitimer")
        or threading.current_thread() is not threading.main_thread()
    ):
        return
    handler = signal.getsignal(signal.SIGALRM)
    if handler not in (signal.SIG_DFL, _on_alarm):
        return  # someone else's alarm (a test runner's timeout, the user's own): leave it alone
    if deadline is None:
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        return
    if handler is not _on_alarm:
        signal.signal(signal.SIGALRM, _on_alarm)
    grace = min(WATCHDOG_GRACE, 0.1 * deadline.seconds)
    signal.setitimer(signal.ITIMER_REAL, min(max(deadline.remaining() + grace, 1e-3), WATCHDOG_MAX))


def _on_alarm(signum: int, frame: object) -> None:
    deadline = _current.get()
    if deadline is None:
        return
    left = deadline.remaining()
    if left > 0:  # the deadline moved (a nested one ended): look again after it
        _watch(deadline)
        return
    if _USER_CODE.depth and not _in_library(frame):
        raise DeadlineExceeded(deadline.seconds, deadline.what)
    signal.setitimer(signal.ITIMER_REAL, WATCHDOG_RETRY)


def _in_library(frame: object) -> bool:
    """Whether the innermost frame is torch's, ours or the interpreter's import machinery."""
    code = getattr(frame, "f_code", None)
    if code is None:
        return True
    name = code.co_filename
    return name.startswith("<") or _TORCH in name or os.path.abspath(name).startswith(_OURS)
