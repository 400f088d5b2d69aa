"""Progress of one solve on stderr: ``--monitor`` lines, or a transient line on a terminal.

Both are monitors of the driver loop (``deqcli.solvers.base.run(..., monitor=...)``): callables that
receive an ``Iteration`` (k, every sample's ‖g‖, samples still running, elapsed seconds). ``‖g‖``
is the largest residual over the samples (stopped samples keep their last value), and the rate is
the average factor per iteration by which it fell since the previous line: about 0.3 for a linear
rate of 0.3, falling towards 0 for Newton's method. stdout is never touched, so ``--json -``
stays clean.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.text import Text

from deqcli.render.report import fmt, fmt_time

if TYPE_CHECKING:
    from deqcli.solvers.base import Iteration, Monitor

# A solve shorter than this shows no live line at all (no flicker for the common fast solve).
LIVE_DELAY = 0.5
# The live line is redrawn at most this often; the solve itself is not slowed by it.
LIVE_REFRESH = 0.1


def worst_residual(it: Iteration) -> float:
    """The largest ‖g‖ over the samples (NaN if any sample's is NaN)."""
    values = [float(v) for v in it.residual.detach().cpu().tolist()]
    if any(math.isnan(v) for v in values):
        return math.nan
    return max(values, default=0.0)


def rate(now: float, before: float, steps: int) -> float | None:
    """The average factor per iteration from ``before`` to ``now`` over ``steps`` iterations."""
    if steps <= 0 or not (math.isfinite(now) and math.isfinite(before)) or before <= 0:
        return None
    return (now / before) ** (1.0 / steps)


class MonitorLines:
    """``--monitor [K]``: a header, then a line each time the driver calls it (every K iterations
    and at the end).

    In the spirit of PETSc's ``-snes_monitor``: plain aligned columns, one line per report, so a
    log can be read by eye or by ``awk``.
    """

    HEADER = f"{'iter':>8}  {'‖g‖':>10}  {'rate':>10}  {'running':>9}  {'time':>9}"

    def __init__(self, console: Console) -> None:
        self.console = console
        self.last: tuple[int, float] | None = None

    def __call__(self, it: Iteration) -> None:
        """Print the line of iteration ``it.k``."""
        if self.last is None:
            self._print(self.HEADER)
        worst = worst_residual(it)
        factor = rate(worst, self.last[1], it.k - self.last[0]) if self.last else None
        batch = int(it.residual.shape[0])
        self._print(
            f"{it.k:>8}  {fmt(worst):>10}  {fmt(factor) if factor is not None else '–':>10}  "
            f"{f'{it.running}/{batch}':>9}  {fmt_time(it.elapsed):>9}"
        )
        self.last = (it.k, worst)

    def _print(self, line: str) -> None:
        # Plain text straight to the console's stream: a line per iteration must cost little.
        stream = self.console.file
        stream.write(line + "\n")
        stream.flush()


class LiveProgress:
    """A transient progress line for long solves on a terminal: iteration, ‖g‖, rate, samples.

    Nothing appears before ``LIVE_DELAY`` seconds; the line is redrawn at most every
    ``LIVE_REFRESH`` seconds and removed when the solve ends, so the report that follows is not
    mixed with it.
    """

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live: Any = None
        self.shown_at = -math.inf
        self.last: tuple[int, float] | None = None

    def __call__(self, it: Iteration) -> None:
        """Redraw the line if it is due (cheap otherwise: no tensor is read)."""
        now = time.monotonic()
        if it.elapsed < LIVE_DELAY or now - self.shown_at < LIVE_REFRESH or it.running == 0:
            return
        self.shown_at = now
        worst = worst_residual(it)
        factor = rate(worst, self.last[1], it.k - self.last[0]) if self.last else None
        self.last = (it.k, worst)
        batch = int(it.residual.shape[0])
        line = Text.assemble(
            ("solving  ", "bold"),
            f"iteration {it.k:,}  ‖g‖ {fmt(worst)}",
            f"  rate {factor:.3g}" if factor is not None else "",
            f"  {it.running}/{batch} samples running" if batch > 1 else "",
            (f"  {fmt_time(it.elapsed)}", "dim"),
        )
        if self.live is None:
            from rich.live import Live

            # No redirection: what the user's own code prints stays on the stream it chose, and
            # stdout (the report, --json -) is never routed through this stderr display.
            self.live = Live(
                line,
                console=self.console,
                transient=True,
                auto_refresh=False,
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self.live.start()
        self.live.update(line, refresh=True)

    def stop(self) -> None:
        """Remove the line (if it was ever shown)."""
        if self.live is not None:
            self.live.stop()
            self.live = None


@contextmanager
def solve_monitor(console: Console, *, every: int | None, live: bool) -> Iterator[Monitor | None]:
    """The monitor for one solve: ``--monitor`` lines when ``every`` is given (the driver calls it
    every that many iterations), else a live line when ``live`` (stderr is a terminal and the run
    is not quiet), else none."""
    if every is not None:
        yield MonitorLines(console)
        return
    if not live:
        yield None
        return
    progress = LiveProgress(console)
    try:
        yield progress
    finally:
        progress.stop()
