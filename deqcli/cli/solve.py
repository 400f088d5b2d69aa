"""``deq solve``: one problem, solved, diagnosed and reported."""

from __future__ import annotations

from typing import Annotated

import typer

from deqcli.cli import EXIT_CONVERGED, EXIT_NOT_CONVERGED, stdout, user_errors
from deqcli.cli.options import (
    ConfigArg,
    DebugOpt,
    JsonOpt,
    QuietOpt,
    RunFlags,
    flag_overrides,
    run_flags,
)
from deqcli.consent import allowed


@run_flags()
def solve(
    config: ConfigArg,
    *,
    run: RunFlags,
    json_path: JsonOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
    explain: Annotated[
        bool,
        typer.Option("--explain", help="Print the diagnostics' reasoning at length, per sample."),
    ] = False,
    precheck: Annotated[
        bool,
        typer.Option(
            "--precheck", help="Before solving, estimate the Lipschitz constant of f around z0."
        ),
    ] = False,
    no_diagnostics: Annotated[
        bool,
        typer.Option("--no-diagnostics", help="Skip the convergence diagnostics (faster)."),
    ] = False,
    max_period: Annotated[
        int | None,
        typer.Option(
            "--max-period", min=2, help="Longest cycle period to look for (default 8; ≤ keep/3)."
        ),
    ] = None,
    sensitivity: Annotated[
        list[str] | None,
        typer.Option(
            "--sensitivity",
            help="Also compute dz*/dNAME at the solution (implicit function theorem); repeatable.",
        ),
    ] = None,
    save: Annotated[
        str | None,
        typer.Option(
            "--save",
            help="Write z* (batch, *state shape) to PATH: .pt (torch.save), .npy, or .npz "
            "(arrays z and converged).",
        ),
    ] = None,
    no_try: Annotated[
        bool,
        typer.Option(
            "--no-try",
            help="Do not run the candidate remedies of a failed or slow run (they stay suggestions).",
        ),
    ] = False,
    try_budget: Annotated[
        int | None,
        typer.Option(
            "--try-budget",
            min=1,
            help="Evaluations each remedy trial may spend (default: the run's own, at least 100).",
        ),
    ] = None,
) -> None:
    """Solve the problem in CONFIG and report how it went.

    Exit codes: 0 converged, 1 did not converge, 2 bad input.
    """
    from deqcli.analyses import jobs

    with user_errors(debug), allowed(run.trust_code):
        request = jobs.SolveRequest(
            config=config,
            overrides=flag_overrides(run),
            solver=run.solver,
            json_path=json_path,
            explain=explain,
            precheck=precheck,
            diagnostics=not no_diagnostics,
            max_period=max_period,
            sensitivity=list(sensitivity or []),
            save=save,
            try_remedies=not no_try,
            try_budget=try_budget,
        )
        outcome = jobs.solve(request)
    if not quiet and json_path != "-":
        from deqcli.render.report import render_explain, render_result

        render_result(outcome.result, stdout, description=outcome.description)
        if explain:
            render_explain(outcome.result, stdout)
        if outcome.sensitivities:
            from deqcli.render.analysis import render_sensitivity

            for item in outcome.sensitivities:
                render_sensitivity(item, stdout)
    raise typer.Exit(EXIT_CONVERGED if outcome.result.status.ok else EXIT_NOT_CONVERGED)
