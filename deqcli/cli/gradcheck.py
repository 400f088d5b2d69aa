"""``deq gradcheck``: can the gradient through the fixed point be trusted?"""

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
def gradcheck(
    config: ConfigArg,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            "-p",
            metavar="NAME",
            help="Parameter to differentiate (repeatable; default: all of them).",
        ),
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(
            "--loss",
            metavar="EXPR",
            help="Scalar loss of one sample's solution z (expression; summed over samples). "
            "Default: sum(z**2).",
        ),
    ] = None,
    directions: Annotated[
        int,
        typer.Option(
            "--directions",
            min=1,
            max=1000,
            metavar="N",
            help="Random directions for finite differences.",
        ),
    ] = 3,
    eps: Annotated[
        float | None,
        typer.Option(
            "--eps",
            metavar="X",
            help="Finite-difference step (default 1e-5 float64, 3e-3 float32).",
        ),
    ] = None,
    grad_rtol: Annotated[
        float | None,
        typer.Option(
            "--grad-rtol",
            metavar="X",
            help="Allowed relative error of the IFT gradient (default 1e-5 float64, 2e-2 float32).",
        ),
    ] = None,
    fd_atol: Annotated[
        float | None,
        typer.Option(
            "--fd-atol",
            metavar="X",
            help="Tolerance of the finite-difference re-solves (default about 1e-13).",
        ),
    ] = None,
    unroll: Annotated[
        int | None,
        typer.Option(
            "--unroll",
            metavar="N",
            help="Unrolled iterations (default: as many as the forward solve took).",
        ),
    ] = None,
    *,
    run: RunFlags,
    json_path: JsonOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Check the gradient through the fixed point.

    Compares the implicit, unrolled and finite-difference gradients of a loss of the solution.

    Exit codes: 0 the gradients agree (and the forward solve converged), 1 they do not, 2 bad input.
    """
    from deqcli.analyses import jobs

    with user_errors(debug), allowed(run.trust_code):
        request = jobs.GradcheckRequest(
            config=config,
            overrides=flag_overrides(run),
            solver=run.solver,
            params=param,
            loss=loss,
            directions=directions,
            eps=eps,
            grad_rtol=grad_rtol,
            fd_atol=fd_atol,
            unroll=unroll,
            json_path=json_path,
        )
        report = jobs.gradcheck(request)
    if not quiet and json_path != "-":
        from deqcli.render.analysis import render_gradcheck

        render_gradcheck(report, stdout)
    raise typer.Exit(EXIT_CONVERGED if report.ok else EXIT_NOT_CONVERGED)
