"""The commands that solve nothing (and import no torch): ``deq validate``, ``deq schema`` and
``deq list-solvers``."""

from __future__ import annotations

import difflib
import importlib.util
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from deqcli.cli import stderr, stdout, user_errors
from deqcli.cli.options import DebugOpt, SetOpt
from deqcli.errors import UsageError


def validate(
    configs: Annotated[
        list[Path], typer.Argument(help="One or more YAML config files.", show_default=False)
    ],
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Check configs without solving anything.

    Checks keys, types, expressions and solver options. Never imports a config's Python target; a config that names one is reported as needing consent.
    """
    from deqcli.config import check_files, load_config
    from deqcli.consent import notice
    from deqcli.solvers import make_solver

    for path in configs:
        with user_errors(debug):
            cfg = load_config(path, list(set_ or []))
            make_solver(cfg.solver.name, cfg.solver.options)
            check_files(cfg)
        line = Text.assemble(
            ("ok", "green"), f" {path}: {cfg.problem.kind}, solver {cfg.solver.name}"
        )
        code = notice(cfg.problem.kind, getattr(cfg.problem, "target", ""))
        if code is not None:  # never imported here: validate runs no user code
            line.append(f"; {code}")
        stdout.print(line, highlight=False)


def schema(
    output: Annotated[
        str | None,
        typer.Option(
            "--output",
            "-o",
            metavar="DOCUMENT",
            help="Which schema: config (the default), or the document a command writes with "
            "--json: solve, compare, sweep or gradcheck.",
        ),
    ] = None,
    file: Annotated[
        str | None,
        typer.Option("--file", "-f", metavar="PATH", help="Write the schema to PATH, not stdout."),
    ] = None,
) -> None:
    """Print the JSON Schema of the config or of an output.

    \b
    deq schema                  the config format (editors, CI linting)
    deq schema --output solve   what deq solve --json writes (or compare, sweep, gradcheck)
    deq schema --file PATH      write it to PATH
    """
    from deqcli.schemas import OUTPUTS

    documents = ("config", *OUTPUTS)
    if output == "-":  # the old spelling of "to stdout"
        output = None
    with user_errors():
        if output is not None and output not in documents:
            # --output used to take the file to write; a value that looks like a file (it has a
            # suffix or a folder) still means that, anything else is a misspelt document.
            if file is not None or not ("." in Path(output).name or "/" in output):
                close = difflib.get_close_matches(output, documents, n=1)
                hint = f"; did you mean '{close[0]}'?" if close else ""
                raise UsageError(
                    f"--output: unknown document '{output}'{hint} "
                    f"(documents: {', '.join(documents)}; write a file with --file PATH)"
                )
            stderr.print(
                f"note: writing the config schema to '{output}'; --output now names a document "
                f"({', '.join(documents)}), write files with --file PATH",
                highlight=False,
                markup=False,
                soft_wrap=True,
            )
            output, file = "config", output
        text = json.dumps(document_schema(output or "config"), indent=2) + "\n"
        if file is None or file == "-":
            sys.stdout.write(text)
            return
        from deqcli.render.files import check_output_path, emit_text

        target = check_output_path(file, protected=[], flag="--file")
        emit_text(text, target, flag="--file")  # None: '-' means stdout


def document_schema(name: str) -> dict[str, Any]:
    """The JSON Schema named ``name``: ``config`` or one of the output documents."""
    if name == "config":
        from deqcli.config import json_schema

        return json_schema()
    from deqcli.schemas import output_schema

    return output_schema(name)


def list_solvers() -> None:
    """List the solvers with one-line descriptions."""
    from deqcli.solvers import SOLVERS

    table = Table(box=None, header_style="bold", padding=(0, 2))
    table.add_column("name")
    table.add_column("from")
    table.add_column("what it is")
    for info in SOLVERS.values():
        available = info.family == "deq" or importlib.util.find_spec(info.family) is not None
        origin = info.family if available else f"{info.family} (not installed)"
        table.add_row(Text(info.name), Text(origin), Text(info.summary))
    stdout.print(table)
