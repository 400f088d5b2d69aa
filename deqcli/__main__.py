"""The ``deq`` entry point (also ``python -m deqcli``).

Ctrl-C is handled from the first instant: the handler is installed before the command line (typer,
rich, torch) is imported, so an interrupt during start-up also ends with exit code 130 and one line.
"""

from __future__ import annotations

import sys

from deqcli import interrupt


def main() -> None:
    """Run ``deq`` with the process's arguments and exit with its code."""
    interrupt.install()
    code: int | str | None = 0
    try:
        from deqcli.cli import app

        app(prog_name="deq")
    except KeyboardInterrupt:  # pressed before the command line took over
        interrupt.announce()
        code = interrupt.EXIT_INTERRUPTED
    except SystemExit as exc:
        code = exc.code
    finally:
        # The outcome is decided: a press from now on (while the interpreter shuts down, when
        # Python would restore the default handler and die of the signal) changes nothing.
        interrupt.ignore()
    if code == interrupt.EXIT_INTERRUPTED:
        interrupt.leave()  # not through Python's shutdown, which may die of the signal itself
    sys.exit(code)


if __name__ == "__main__":
    main()
