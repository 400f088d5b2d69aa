"""The `deq` command line: flags → request → run → render. Exceptions become exit codes only here.

One module per command (solve, info for validate/schema/list-solvers, compare, sweep, gradcheck);
the flags they share are defined in ``options``. A command builds a request from its flags, hands it
to ``deqcli.analyses.jobs``, renders the outcome through ``deqcli.render`` and maps it to an exit code.
Commands that solve nothing (--help, validate, schema, list-solvers) never import torch: every heavy
import sits inside a command's function.
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.text import Text

from deqcli import __version__
from deqcli.errors import DeqError
from deqcli.expr import ExpressionError

EXIT_CONVERGED = 0
EXIT_NOT_CONVERGED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

EXIT_CODES_HELP = (
    "Exit codes: 0 converged (every sample), 1 ran but did not converge, "
    "2 bad input or usage (config error, unknown solver or option, unavailable device)."
)

app = typer.Typer(
    name="deq",
    help="Solve and analyse fixed points z = f(z) and roots g(z) = 0, from a YAML config.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    # --install-completion / --show-completion for bash, zsh, fish and PowerShell.
    add_completion=True,
    # Plain help: text such as KEY=[v1,v2,...] is shown as written, never read as markup.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
stdout = Console()
stderr = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"deq {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """deq: fixed points and roots, solved and explained."""


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print one error line on stderr and exit."""
    # The message is plain text: brackets such as [lo, hi] or 'deqcli[peers]' must not be markup.
    stderr.print(
        Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True
    )
    raise typer.Exit(code)


@contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    """Turn user-facing exceptions into one stderr line and exit code 2 (a traceback with --debug)."""
    try:
        yield
    except (DeqError, ExpressionError) as exc:
        if debug:
            traceback.print_exc()
        fail(str(exc))
    except KeyboardInterrupt:
        stderr.print("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None


# The commands, registered in the order `deq --help` lists them. Their modules import the names above.
from deqcli.cli import compare, gradcheck, info, solve, sweep  # noqa: E402
from deqcli.cli.options import DeqCommand  # noqa: E402

app.command(cls=DeqCommand)(solve.solve)
app.command(cls=DeqCommand)(info.validate)
app.command(cls=DeqCommand)(info.schema)
app.command("list-solvers", cls=DeqCommand)(info.list_solvers)
app.command("compare-solvers", cls=DeqCommand)(compare.compare_solvers)
app.command(cls=DeqCommand)(sweep.sweep)
app.command(cls=DeqCommand)(gradcheck.gradcheck)
