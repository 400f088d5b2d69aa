"""The commands that solve nothing (and import no torch): ``deq validate``, ``deq schema`` and
``deq list-solvers``."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from deqcli.cli import stdout, user_errors
from deqcli.cli.options import DebugOpt, SetOpt


def validate(
    configs: Annotated[
        list[Path], typer.Argument(help="One or more YAML config files.", show_default=False)
    ],
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Check configs (keys, types, expressions, solver options) without solving anything.

    Never imports a config's Python target; a config that names one is reported as needing consent.
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
        Path | None, typer.Option("--output", "-o", help="Write to a file instead of stdout.")
    ] = None,
) -> None:
    """Print the JSON Schema of the config format (for editors and CI linting)."""
    from deqcli.config import json_schema

    text = json.dumps(json_schema(), indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
    else:
        from deqcli.render.files import check_output_path, emit_text

        with user_errors():
            target = check_output_path(str(output), protected=[], flag="--output")
            emit_text(text, target, flag="--output")  # '-' (None) means stdout


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
