"""``deq sweep``: one config solved along a grid of parameter values."""

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
    ConfigArg,
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


@run_flags()
def sweep(
    config: ConfigArg,
    param: Annotated[
        list[str],
        typer.Option(
            "--param",
            "-p",
            metavar="KEY=VALUES",
            help="KEY=START:STOP:COUNT (…:log for geometric), KEY=[v1,v2,...] or KEY=v1,v2; "
            "KEY is a dotted config key or a short name (problem.params.NAME, else problem.NAME). "
            "Twice for a 2-D grid.",
            show_default=False,
        ),
    ],
    warm_start: Annotated[
        bool,
        typer.Option(
            "--warm-start", help="Start each point from its converged neighbour's solution."
        ),
    ] = False,
    value: Annotated[
        str,
        typer.Option(
            "--value",
            metavar="WHAT",
            help="What to record of z*: auto, norm, mean, max, min or a component index.",
        ),
    ] = "auto",
    results: Annotated[
        Path | None,
        typer.Option(
            "--results",
            metavar="PATH",
            help="Append each finished point to PATH (JSON lines) as the sweep runs.",
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Skip the points already in --results and continue."),
    ] = False,
    *,
    run: RunFlags,
    json_path: JsonOpt = None,
    csv_path: Annotated[
        str | None,
        typer.Option(
            "--csv",
            metavar="PATH",
            help="Write one CSV row per point and sample to PATH ('-': stdout).",
        ),
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            metavar="PATH",
            help="Draw the sweep to PATH (.png/.svg/.pdf): z*, iterations and ρ(J) against the "
            "parameter, or a regime map for two parameters.",
        ),
    ] = None,
    no_diagnostics: Annotated[
        bool,
        typer.Option("--no-diagnostics", help="Skip classification and ρ(J) (faster)."),
    ] = False,
    workers: WorkersOpt = None,
    scheduler: SchedulerOpt = None,
    cluster: ClusterOpt = None,
    chunk: ChunkOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Solve CONFIG along a grid of parameter values.

    Every value of one or two parameters is solved and the regimes are summarised.

    Exit codes: 0 every point ran (whatever its status), 1 some points failed with an error,
    2 bad input, 130 interrupted (partial results are still written).
    """
    from deqcli.analyses import jobs
    from deqcli.render.analysis import report_sweep, sweep_progress

    with user_errors(debug), allowed(run.trust_code):
        request = jobs.SweepRequest(
            config=config,
            params=param,
            overrides=flag_overrides(run),
            solver=run.solver,
            warm_start=warm_start,
            value=value,
            results=results,
            resume=resume,
            json_path=json_path,
            csv_path=csv_path,
            plot=plot,
            diagnostics=not no_diagnostics,
            execution=ExecutionSettings(
                workers, scheduler, cluster, chunk, notice=notice_printer(quiet)
            ),
        )
        outcome = jobs.sweep(
            request,
            progress=lambda: sweep_progress(stderr, enabled=not quiet and stderr.is_terminal),
        )
    report_sweep(outcome, stdout, stderr, quiet=quiet)
    if outcome.sweep.interrupted:
        interrupt.mark_announced()  # the report's line says how far it got and how to resume
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_CONVERGED if outcome.sweep.ok else EXIT_NOT_CONVERGED)
