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
    try:
        from deqcli.cli import app

        app(prog_name="deq")
    except KeyboardInterrupt:  # pressed before the command line took over
        interrupt.announce()
        sys.exit(interrupt.EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
