"""Ctrl-C: exit code 130 and one line on stderr, whenever it is pressed.

The ``deq`` entry point installs the handler here before anything heavy is imported, so a Ctrl-C
during start-up ends the same way as one during a solve. The first press raises
``KeyboardInterrupt`` in Python, except while the main thread runs inside torch: torch's C++ code
calls back into Python during its imports and its transforms, and an exception raised at an
arbitrary bytecode there can leave torch half-initialised or abort the process. There the press is
held and raised at the next safe point, ``checkpoint()``, which every evaluation of a problem passes
(``deqcli.deadline.checkpoint``). A second press leaves at once with the same line: the user has
asked twice.

The commands catch the ``KeyboardInterrupt``, write what they have finished (a sweep's points, a
comparison marked partial), print the line with ``announce()`` and exit with ``EXIT_INTERRUPTED``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from types import FrameType
from typing import NoReturn

EXIT_INTERRUPTED = 130
LINE = "interrupted"

_presses = 0
_pending = False
_announced = False
_cleanups: list[Callable[[], None]] = []


def install() -> None:
    """Handle SIGINT as described above (main thread only; elsewhere nothing changes)."""
    with contextlib.suppress(ValueError):  # not the main thread: leave Python's handler
        signal.signal(signal.SIGINT, _on_sigint)


def ignore() -> None:
    """Ignore SIGINT from now on (the exit code is decided; the process is shutting down)."""
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def leave(code: int = EXIT_INTERRUPTED) -> NoReturn:
    """End an interrupted run with ``code`` now: flush the streams, run the exit handlers, leave.

    Python's own shutdown after a KeyboardInterrupt that was raised inside some of its C paths
    (and then handled) ends the process by re-sending SIGINT to itself, so the exit code would be
    the signal's instead of 130; leaving directly keeps it.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    os._exit(code)


def checkpoint() -> None:
    """Raise a held Ctrl-C here, at a safe point."""
    global _pending
    if _pending:
        _pending = False
        raise KeyboardInterrupt


def announce(message: str = LINE) -> None:
    """Print the interrupt line on stderr, once per process however often it is asked for."""
    global _announced
    if _announced:
        return
    _announced = True
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # stderr closed: the exit code still says it
        pass


def announced() -> bool:
    """Whether the interrupt line (or a command's own interrupt message) has been printed."""
    return _announced


def mark_announced() -> None:
    """A command printed its own interrupt message (e.g. how to resume); print no other."""
    global _announced
    _announced = True


def at_hard_exit(cleanup: Callable[[], None]) -> None:
    """Run ``cleanup`` before a second Ctrl-C ends the process (e.g. remove temporary files)."""
    if cleanup not in _cleanups:
        _cleanups.append(cleanup)


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _presses, _pending
    _presses += 1
    if _presses > 1:
        _hard_exit()
    if _inside_torch(frame):
        _pending = True
        return
    raise KeyboardInterrupt


def _hard_exit() -> None:
    """Leave now: clean up, one line (written straight to the descriptor: we are in a handler)."""
    for cleanup in _cleanups:
        with contextlib.suppress(Exception):  # leaving anyway
            cleanup()
    if not _announced:
        with contextlib.suppress(OSError):
            os.write(2, (LINE + "\n").encode())
    os._exit(EXIT_INTERRUPTED)


def _inside_torch(frame: FrameType | None) -> bool:
    """Whether any frame of the interrupted stack belongs to torch (its imports or transforms)."""
    marker = f"{os.sep}torch{os.sep}"
    while frame is not None:
        if marker in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False
