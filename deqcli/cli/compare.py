"""``deq compare-solvers``: several solvers on the same problems, side by side."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from deqcli import interrupt
from deqcli.cli import (
    EXIT_CONVERGED,
    EXIT_INTERRUPTED,
    EXIT_NOT_CONVERGED,
    notice_printer,
    stderr,
    stdout,
    user_errors,
)
from deqcli.cli.options import (
    ChunkOpt,
    ClusterOpt,
    DebugOpt,
    JsonOpt,
    QuietOpt,
    RunFlags,
    SchedulerOpt,
    WorkersOpt,
    flag_overrides,
    run_flags,
)
from deqcli.consent import allowed
from deqcli.execution import ExecutionSettings

CsvOpt = Annotated[
    str | None,
    typer.Option(
        "--csv",
        metavar="PATH",
        help="Write one CSV row per problem and solver to PATH ('-' for stdout).",
    ),
]
MarkdownOpt = Annotated[
    str | None,
    typer.Option(
        "--markdown",
        metavar="PATH",
        help="Write Markdown tables (README, PR comment) to PATH or '-'.",
    ),
]


@run_flags(solver=False)
def compare_solvers(
    configs: Annotated[
        list[Path],
        typer.Argument(
            metavar="CONFIGS",
            help="Config files, or folders of configs (a suite).",
            show_default=False,
        ),
    ],
    solvers: Annotated[
        str | None,
        typer.Option(
            "--solvers",
            metavar="NAMES",
            help="Comma-separated solver names (default: every solver of deq's own).",
        ),
    ] = None,
    all_solvers: Annotated[
        bool,
        typer.Option("--all", help="Every registered solver, plus the installed peers' solvers."),
    ] = False,
    repeat: Annotated[
        int,
        typer.Option(
            "--repeat", metavar="N", help="Timed runs per solver and problem (median shown)."
        ),
    ] = 3,
    warmup: Annotated[
        int,
        typer.Option(
            "--warmup", metavar="N", help="Untimed runs per solver and problem before timing."
        ),
    ] = 1,
    *,
    run: RunFlags,
    json_path: JsonOpt = None,
    csv_path: CsvOpt = None,
    markdown_path: MarkdownOpt = None,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            metavar="PATH",
            help="Residual vs iteration and vs time, one figure per problem: PATH.png, .svg or "
            ".pdf (PATH-<problem>.ext for several problems), or an existing folder (PNGs).",
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option(
            "--baseline",
            metavar="PATH",
            help="Fail (exit 1) on regressions against this saved JSON.",
        ),
    ] = None,
    save_baseline: Annotated[
        str | None,
        typer.Option(
            "--save-baseline", metavar="PATH", help="Write this run's JSON as a baseline to PATH."
        ),
    ] = None,
    max_slowdown: Annotated[
        float,
        typer.Option(
            "--max-slowdown",
            metavar="X",
            help="With --baseline: a median time this many times slower regresses.",
        ),
    ] = 3.0,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    cluster: ClusterOpt = None,
    chunk: ChunkOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run several solvers on the same problems, side by side.

    Which solver to use, and by how much it is better.

    Exit codes: 0 every problem was solved by at least one solver and nothing regressed against
    --baseline; 1 some problem was solved by no solver, or a regression against --baseline;
    2 bad input (config error, unknown solver, missing file, bad flag).
    """
    from deqcli.analyses import jobs
    from deqcli.render.compare import progress_bar, report

    with user_errors(debug), allowed(run.trust_code):
        request = jobs.CompareRequest(
            configs=configs,
            solvers=solvers,
            all_solvers=all_solvers,
            repeat=repeat,
            warmup=warmup,
            overrides=flag_overrides(run),
            json_path=json_path,
            csv_path=csv_path,
            markdown_path=markdown_path,
            plot=plot,
            baseline=baseline,
            save_baseline=save_baseline,
            max_slowdown=max_slowdown,
            debug=debug,
            execution=ExecutionSettings(
                workers, scheduler, cluster, chunk, notice=notice_printer(quiet)
            ),
        )
        outcome = jobs.compare(
            request,
            progress=lambda runs: progress_bar(
                stderr, runs, enabled=not quiet and stderr.is_terminal
            ),
        )
    report(outcome, stdout, stderr, quiet=quiet)
    if outcome.interrupted:
        done = len(outcome.doc["problems"])
        interrupt.announce(
            f"interrupted: the comparison is partial ({done} problem(s) finished; the files "
            "written hold those, marked interrupted)"
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_CONVERGED if outcome.ok else EXIT_NOT_CONVERGED)
