"""The `deq` command line: flags → request → run → render. Exceptions become exit codes only here.

One module per command (solve, info for validate/schema/list-solvers, compare, sweep, gradcheck);
the flags they share are defined in ``options``. A command builds a request from its flags, hands it
to ``deqcli.analyses.jobs``, renders the outcome through ``deqcli.render`` and maps it to an exit code.
Commands that solve nothing (--help, validate, schema, list-solvers) never import torch: every heavy
import sits inside a command's function.
"""

from __future__ import annotations

import sys
import traceback
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.text import Text
from typer.core import TyperGroup

from deqcli import __version__, interrupt
from deqcli.errors import DeqError
from deqcli.expr import ExpressionError

EXIT_CONVERGED = 0
EXIT_NOT_CONVERGED = 1
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = interrupt.EXIT_INTERRUPTED

# Click's exceptions as this Typer raises them (recent Typer versions carry their own copy of Click).
_click = sys.modules[typer.BadParameter.__module__]
ClickException: type[Exception] = _click.ClickException
ClickUsageError: type[Exception] = _click.UsageError
NoArgsIsHelpError: type[Exception] | None = getattr(_click, "NoArgsIsHelpError", None)
ClickAbort: tuple[type[BaseException], ...] = (typer.Abort, getattr(_click, "Abort", typer.Abort))

EXIT_CODES_HELP = (
    "Exit codes: 0 converged (every sample), 1 ran but did not converge, "
    "2 bad input or usage (config error, unknown solver or option, unavailable device), "
    "130 interrupted (Ctrl-C)."
)


class DeqGroup(TyperGroup):
    """The ``deq`` command group, run so that whatever happens ends as one stderr line and an exit code.

    Click's and Typer's own endings (a ``Usage:`` block, a boxed error panel, a pretty traceback,
    a silent 130) are replaced: usage errors (unknown flag, missing argument, bad flag value) are
    one line and exit 2; Ctrl-C is one line and exit 130; any other exception is one line, exit 2
    when it came from the config's own Python code and 1 otherwise (``--debug`` adds the
    traceback). Third-party warnings are silenced unless ``--debug``.
    """

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run a command line; exit with its code (``standalone_mode``) or return it."""
        argv = list(sys.argv[1:] if args is None else args)
        code = run_guarded(
            lambda: super(DeqGroup, self).main(
                argv, prog_name, complete_var, standalone_mode=False, **extra
            ),
            debug="--debug" in argv,
        )
        if standalone_mode:
            sys.exit(code)
        return code


def run_guarded(call: Callable[[], Any], *, debug: bool) -> int:
    """Call the command line with ``standalone_mode=False`` and turn every ending into an exit code."""
    with warnings.catch_warnings():
        if not debug:
            # torch's and scipy's notices are not the user's business; --debug shows them.
            warnings.simplefilter("ignore")
        try:
            result = call()
        except ClickException as exc:
            if NoArgsIsHelpError is not None and isinstance(exc, NoArgsIsHelpError):
                typer.echo(exc.ctx.get_help())  # type: ignore[attr-defined]
                return EXIT_BAD_INPUT
            return _usage_error(exc)
        except ClickAbort:
            _line("aborted (end of input)")
            return EXIT_NOT_CONVERGED
        except KeyboardInterrupt:
            interrupt.announce()
            return EXIT_INTERRUPTED
        except (SystemExit, GeneratorExit):
            raise
        except BaseException as exc:  # Exception, or a BaseException of the config's own code
            return _unexpected(exc, debug)
    if result == EXIT_INTERRUPTED:
        interrupt.announce()
    return result if isinstance(result, int) else EXIT_CONVERGED


def _line(message: str) -> None:
    """One ``error:`` line on stderr, the message taken as plain text: brackets such as [lo, hi],
    'deqcli[peers]' or a file called '[red]x.yaml' are never rich markup."""
    text = " ".join(message.split())
    stderr.print(Text.assemble(("error:", "bold red"), " ", text), highlight=False, soft_wrap=True)


def _usage_error(exc: Exception) -> int:
    """A Click usage error as one line naming the command's help, exit 2."""
    message = exc.format_message()  # type: ignore[attr-defined]
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, ClickUsageError) and ctx is not None:
        message = f"{message.rstrip('.')}; see '{ctx.command_path} --help'"
    _line(message)
    code = getattr(exc, "exit_code", EXIT_BAD_INPUT)
    return code if code in (EXIT_NOT_CONVERGED, EXIT_BAD_INPUT) else EXIT_BAD_INPUT


def _unexpected(exc: BaseException, debug: bool) -> int:
    """An exception nothing else caught: one line (the traceback with --debug), exit 1 or 2."""
    from deqcli.consent import user_code_site

    if debug:
        traceback.print_exception(exc)
    site = user_code_site(exc)
    what = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if site is not None:
        _line(f"the config's Python code failed at {site}: {what}")
        return EXIT_BAD_INPUT
    if isinstance(exc, MemoryError):
        _line("out of memory; make the problem smaller (problem.dim, problem.batch)")
        return EXIT_NOT_CONVERGED
    hint = "" if debug else " (rerun with --debug for the traceback)"
    _line(f"unexpected {what}{hint}")
    return EXIT_NOT_CONVERGED


app = typer.Typer(
    cls=DeqGroup,
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
# Text from configs and paths (a problem named "[/]", a file called "[red]x.yaml", a loss such
# as sum(w**2)) is printed as written: these consoles never read rich markup or :emoji: codes in
# strings, so the renderers style with Text objects only.
stdout = Console(markup=False, emoji=False)
stderr = Console(stderr=True, markup=False, emoji=False)


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


def notice_printer(quiet: bool) -> Callable[[str], None] | None:
    """What a command says on stderr while it waits ("note: …"); nothing with --quiet."""
    if quiet:
        return None

    def say(text: str) -> None:
        stderr.print(f"note: {text}", style="yellow", soft_wrap=True)

    return say


def fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    """Print one error line on stderr and exit."""
    _line(message)
    raise typer.Exit(code)


@contextmanager
def user_errors(debug: bool = False) -> Iterator[None]:
    """Turn what can go wrong inside a command into one stderr line and an exit code.

    Bad input (``DeqError``, ``ExpressionError``) is exit 2; Ctrl-C is exit 130; anything else is
    one line too (exit 2 when it escaped from the config's own Python code, else 1). ``--debug``
    adds the traceback.
    """
    try:
        yield
    except (DeqError, ExpressionError) as exc:
        if debug:
            traceback.print_exc()
        fail(str(exc))
    except KeyboardInterrupt:
        interrupt.announce()
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except typer.Exit:
        raise
    except SystemExit as exc:
        # Commands end through typer.Exit; a SystemExit here came from the config's own code.
        if debug:
            traceback.print_exc()
        fail(f"the config's Python code called sys.exit({exc.code!r})")
    except Exception as exc:
        raise typer.Exit(_unexpected(exc, debug)) from None


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
