"""The `deq` command line: flags → config → run → render. Exceptions become exit codes only here.

Commands that solve nothing (--help, validate, schema, list-solvers) never import torch.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from deqcli import __version__
from deqcli.errors import DeqError
from deqcli.expr import ExpressionError

EXIT_CONVERGED = 0
EXIT_NOT_CONVERGED = 1
EXIT_BAD_INPUT = 2

EXIT_CODES_HELP = (
    "Exit codes: 0 converged (every sample), 1 ran but did not converge, "
    "2 bad input or usage (config error, unknown solver or option, unavailable device)."
)

app = typer.Typer(
    name="deq",
    help="Solve and analyse fixed points z = f(z) and roots g(z) = 0, from a YAML config.\n\n"
    + EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
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
        raise typer.Exit(130) from None


# -- shared flag definitions ------------------------------------------------------------------
ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.", show_default=False)]
SolverOpt = Annotated[
    str | None, typer.Option("--solver", "-s", help="Solver name (see deq list-solvers).")
]
TolOpt = Annotated[
    float | None, typer.Option("--tol", "--atol", help="Absolute tolerance on ‖f(z)−z‖.")
]
RtolOpt = Annotated[
    float | None, typer.Option("--rtol", help="Relative tolerance (times ‖f(z0)−z0‖).")
]
MaxIterOpt = Annotated[int | None, typer.Option("--max-iter", help="Iteration budget.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
DtypeOpt = Annotated[str | None, typer.Option("--dtype", help="float32 or float64 (default).")]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", help="Seed for random arrays in the config.")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key: key.path=value (repeatable)."),
]
JsonOpt = Annotated[
    str | None,
    typer.Option("--json", help="Write the JSON result to PATH, or '-' for stdout only."),
]
QuietOpt = Annotated[
    bool, typer.Option("--quiet", "-q", help="No report; only the exit code and errors.")
]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")]


def flag_overrides(
    *,
    tol: float | None,
    rtol: float | None,
    max_iter: int | None,
    device: str | None,
    dtype: str | None,
    seed: int | None,
    sets: list[str] | None,
) -> list[str]:
    """Translate the common flags into ``--set`` style overrides (flags first, then --set)."""
    items = []
    for key, value in (
        ("run.atol", tol),
        ("run.rtol", rtol),
        ("run.max_iter", max_iter),
        ("run.device", device),
        ("run.dtype", dtype),
        ("run.seed", seed),
    ):
        if value is not None:
            items.append(f"{key}={value}")
    return items + list(sets or [])


@app.command()
def solve(
    config: ConfigArg,
    solver: SolverOpt = None,
    tol: TolOpt = None,
    rtol: RtolOpt = None,
    max_iter: MaxIterOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    seed: SeedOpt = None,
    set_: SetOpt = None,
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
) -> None:
    """Solve the problem in CONFIG and report how it went.

    Exit codes: 0 converged, 1 did not converge, 2 bad input.
    """
    from deqcli.config import load_config
    from deqcli.render.files import check_output_path, emit_json

    with user_errors(debug):
        overrides = flag_overrides(
            tol=tol, rtol=rtol, max_iter=max_iter, device=device, dtype=dtype, seed=seed, sets=set_
        )
        cfg = load_config(config, overrides, solver=solver)
        target = (
            check_output_path(json_path, protected=[config], flag="--json") if json_path else None
        )
        from deqcli.api import load_problem
        from deqcli.api import solve as run_solve

        if explain and no_diagnostics:
            fail("--explain needs the diagnostics; drop --no-diagnostics")
        from deqcli.diagnostics.settings import DiagnosticOptions

        diagnostics = (
            False
            if no_diagnostics
            else DiagnosticOptions(**({"max_period": max_period} if max_period else {}))
        )
        problem = load_problem(cfg)
        if sensitivity:
            from deqcli.analyses.sensitivity import attach_sensitivities, check_names

            check_names(problem, sensitivity)
        result = run_solve(cfg, problem=problem, diagnostics=diagnostics, precheck=precheck)
        sens = attach_sensitivities(problem, result, sensitivity) if sensitivity else []
    if json_path is not None:
        emit_json(result.to_dict(), target)
    if not quiet and json_path != "-":
        from deqcli.render.report import render_explain, render_result

        render_result(result, stdout, description=problem.description)
        if explain:
            render_explain(result, stdout)
        if sens:
            from deqcli.render.analysis import render_sensitivity

            for item in sens:
                render_sensitivity(item, stdout)
    raise typer.Exit(EXIT_CONVERGED if result.status.ok else EXIT_NOT_CONVERGED)


@app.command()
def validate(
    configs: Annotated[
        list[Path], typer.Argument(help="One or more YAML config files.", show_default=False)
    ],
    set_: SetOpt = None,
    debug: DebugOpt = False,
) -> None:
    """Check configs (keys, types, expressions, solver options) without solving anything."""
    from deqcli.config import check_files, load_config
    from deqcli.solvers import make_solver

    for path in configs:
        with user_errors(debug):
            cfg = load_config(path, list(set_ or []))
            make_solver(cfg.solver.name, cfg.solver.options)
            check_files(cfg)
        stdout.print(
            f"[green]ok[/green] {path}: {cfg.problem.kind}, solver {cfg.solver.name}",
            highlight=False,
        )


@app.command()
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
        from deqcli.render.files import check_output_path, write_text_atomic

        with user_errors():
            target = check_output_path(str(output), protected=[], flag="--output")
        if target is None:  # '-' means stdout
            sys.stdout.write(text)
        else:
            write_text_atomic(target, text)


@app.command("list-solvers")
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


def command(func: Callable[..., Any]) -> Callable[..., Any]:
    """Register a command defined in another module (keeps this file a thin translator)."""
    return app.command()(func)


# -- compare-solvers ---------------------------------------------------------------------------
CsvOpt = Annotated[
    str | None,
    typer.Option(
        "--csv", help="Write one CSV row per problem and solver to PATH ('-' for stdout)."
    ),
]
MarkdownOpt = Annotated[
    str | None,
    typer.Option("--markdown", help="Write Markdown tables (README, PR comment) to PATH or '-'."),
]


@app.command("compare-solvers")
def compare_solvers(
    configs: Annotated[
        list[Path],
        typer.Argument(help="Config files, or folders of configs (a suite).", show_default=False),
    ],
    solvers: Annotated[
        str | None,
        typer.Option(
            "--solvers", help="Comma-separated solver names (default: every solver of deq's own)."
        ),
    ] = None,
    all_solvers: Annotated[
        bool,
        typer.Option("--all", help="Every registered solver, plus the installed peers' solvers."),
    ] = False,
    repeat: Annotated[
        int, typer.Option("--repeat", help="Timed runs per solver and problem (median shown).")
    ] = 3,
    warmup: Annotated[
        int, typer.Option("--warmup", help="Untimed runs per solver and problem before timing.")
    ] = 1,
    tol: TolOpt = None,
    rtol: RtolOpt = None,
    max_iter: MaxIterOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    seed: SeedOpt = None,
    set_: SetOpt = None,
    json_path: JsonOpt = None,
    csv_path: CsvOpt = None,
    markdown_path: MarkdownOpt = None,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            help="Residual vs iteration and vs time, one figure per problem: PATH.png or PATH.svg "
            "(PATH-<problem>.ext for several problems), or an existing folder.",
        ),
    ] = None,
    baseline: Annotated[
        Path | None,
        typer.Option("--baseline", help="Fail (exit 1) on regressions against this saved JSON."),
    ] = None,
    save_baseline: Annotated[
        str | None,
        typer.Option("--save-baseline", help="Write this run's JSON as a baseline to PATH."),
    ] = None,
    max_slowdown: Annotated[
        float,
        typer.Option(
            "--max-slowdown",
            help="With --baseline: a median time this many times slower regresses.",
        ),
    ] = 3.0,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Run several solvers on the same problems side by side: which one to use, and how much better.

    Exit codes: 0 every problem was solved by at least one solver and nothing regressed against
    --baseline; 1 some problem was solved by no solver, or a regression against --baseline;
    2 bad input (config error, unknown solver, missing file, bad flag).
    """
    from deqcli.analyses import compare
    from deqcli.errors import UsageError
    from deqcli.render import compare as render_compare
    from deqcli.render.files import check_output_path, emit_json, write_text_atomic

    with user_errors(debug):
        overrides = flag_overrides(
            tol=tol, rtol=rtol, max_iter=max_iter, device=device, dtype=dtype, seed=seed, sets=set_
        )
        files = compare.expand_configs(configs)
        names = compare.resolve_solvers(solvers, include_peers=all_solvers)
        compare.check_settings(repeat=repeat, warmup=warmup, max_slowdown=max_slowdown)
        protected = files + ([baseline] if baseline is not None else [])
        outputs = {"--json": json_path, "--csv": csv_path, "--markdown": markdown_path}
        if sum(value == "-" for value in outputs.values()) > 1:
            raise UsageError("only one of --json, --csv and --markdown can write to stdout ('-')")
        targets = {
            flag: check_output_path(value, protected=protected, flag=flag)
            for flag, value in outputs.items()
            if value is not None
        }
        if save_baseline == "-":
            raise UsageError("--save-baseline: give a file path (use --json - for stdout)")
        saved = (
            check_output_path(save_baseline, protected=files, flag="--save-baseline")
            if save_baseline is not None
            else None
        )
        plot_target = None
        if plot is not None:
            from deqcli.render.plots import check_plot_target

            plot_target = check_plot_target(plot)
        stored = compare.load_baseline(baseline) if baseline is not None else None
        runs = len(files) * len(names) * (warmup + repeat)
        with render_compare.progress_bar(
            stderr, runs, enabled=not quiet and stderr.is_terminal
        ) as step:
            doc = compare.compare(
                files,
                names,
                overrides=overrides,
                repeat=repeat,
                warmup=warmup,
                progress=step,
                debug=debug,
            )
        check = None
        if stored is not None:
            check = compare.check_baseline(
                doc, stored, max_slowdown=max_slowdown, path=str(baseline)
            )
            doc["baseline"] = check.to_dict()
        plots = []
        if plot_target is not None:
            from deqcli.render.plots import write_plots

            plots = write_plots(doc, plot_target)

    to_stdout = any(value == "-" for value in outputs.values())
    if "--json" in targets or json_path == "-":
        emit_json(doc, targets.get("--json"))
    if saved is not None:
        emit_json(doc, saved)
    for flag, text in (("--csv", csv_path), ("--markdown", markdown_path)):
        if text is None:
            continue
        rendered = (
            render_compare.to_csv(doc) if flag == "--csv" else render_compare.to_markdown(doc)
        )
        if targets[flag] is None:
            sys.stdout.write(rendered)
        else:
            write_text_atomic(targets[flag], rendered)
    if not quiet and not to_stdout:
        render_compare.render(doc, stdout)
    elif doc["summary"]["unsolved"]:
        unsolved = ", ".join(doc["summary"]["unsolved"])
        stderr.print(f"not solved by any solver: {unsolved}", highlight=False, soft_wrap=True)
    if not quiet:
        for path in plots:
            stderr.print(f"[dim]plot written: {path}[/dim]", highlight=False, soft_wrap=True)
    regressions = check.regressions if check is not None else []
    if check is not None:
        for regression in regressions:
            stderr.print(
                f"[bold red]regression:[/bold red] {regression.line()}",
                highlight=False,
                soft_wrap=True,
            )
        if not quiet:
            for note in check.notes:
                stderr.print(f"[dim]baseline note: {note}[/dim]", highlight=False, soft_wrap=True)
        if regressions or not quiet:
            verdict = f"{len(regressions)} regression(s)" if regressions else "no regressions"
            stderr.print(
                f"baseline: {verdict} in {check.compared} solver-problem pair(s) checked "
                f"against {baseline} (max slowdown {max_slowdown:g}×)",
                highlight=False,
                soft_wrap=True,
            )
    raise typer.Exit(compare.exit_code(doc, regressions))


# -- sweep -------------------------------------------------------------------------------------
EXIT_INTERRUPTED = 130


@app.command()
def sweep(
    config: ConfigArg,
    param: Annotated[
        list[str],
        typer.Option(
            "--param",
            "-p",
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
            "--value", help="What to record of z*: auto, norm, mean, max, min or a component index."
        ),
    ] = "auto",
    results: Annotated[
        Path | None,
        typer.Option(
            "--results", help="Append each finished point to PATH (JSON lines) as the sweep runs."
        ),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option("--resume", help="Skip the points already in --results and continue."),
    ] = False,
    solver: SolverOpt = None,
    tol: TolOpt = None,
    rtol: RtolOpt = None,
    max_iter: MaxIterOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    seed: SeedOpt = None,
    set_: SetOpt = None,
    json_path: JsonOpt = None,
    csv_path: Annotated[
        str | None,
        typer.Option("--csv", help="Write one CSV row per point and sample to PATH ('-': stdout)."),
    ] = None,
    plot: Annotated[
        str | None,
        typer.Option(
            "--plot",
            help="Draw the sweep to PATH (.png/.svg/.pdf): z*, iterations and ρ(J) against the "
            "parameter, or a regime map for two parameters.",
        ),
    ] = None,
    no_diagnostics: Annotated[
        bool,
        typer.Option("--no-diagnostics", help="Skip classification and ρ(J) (faster)."),
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Solve CONFIG at every value of one or two parameters and summarise the regimes.

    Exit codes: 0 every point ran (whatever its status), 1 some points failed with an error,
    2 bad input, 130 interrupted (partial results are still written).
    """
    from deqcli.analyses.sweep import PointOptions, SweepBase, check_value_spec, make_axes
    from deqcli.render.files import check_output_path, emit_json, write_text_atomic

    with user_errors(debug):
        overrides = flag_overrides(
            tol=tol, rtol=rtol, max_iter=max_iter, device=device, dtype=dtype, seed=seed, sets=set_
        )
        if sum(1 for t in (json_path, csv_path) if t == "-") > 1:
            fail("--json - and --csv - both want stdout; send one of them to a file")
        check_value_spec(value)
        base = SweepBase.from_path(config, overrides, solver)
        axes = make_axes(base, param)
        json_target = (
            check_output_path(json_path, protected=[config], flag="--json") if json_path else None
        )
        csv_target = (
            check_output_path(csv_path, protected=[config], flag="--csv") if csv_path else None
        )
        if results is not None:
            check_output_path(str(results), protected=[config], flag="--results")
        if resume and results is None:
            fail("--resume needs --results PATH (the file the interrupted sweep wrote)")
        plot_target = None
        if plot is not None:
            from deqcli.render.sweep_plots import check_target

            plot_target = check_target(plot)
            if len(axes) > 2:
                fail("--plot: sweeps of one or two keys can be plotted; this one has more")
        options = PointOptions(value=value, diagnostics=not no_diagnostics)
        done = _run_sweep(base, axes, options, warm_start, results, resume, quiet)

    to_stdout = json_path == "-" or csv_path == "-"
    if json_path is not None:
        emit_json(done.to_dict(), json_target)
    if csv_path is not None:
        from deqcli.analyses.sweep import to_csv

        text = to_csv(done)
        if csv_target is None:
            sys.stdout.write(text)
        else:
            write_text_atomic(csv_target, text)
    if plot_target is not None and done.points:
        from deqcli.render.sweep_plots import plot_sweep

        written = plot_sweep(done, plot_target)
        if not quiet:
            stderr.print(f"[dim]plot written: {written}[/dim]", highlight=False, soft_wrap=True)
    if not quiet and not to_stdout:
        from deqcli.render.analysis import render_sweep

        render_sweep(done, stdout)
    if done.interrupted:
        where = f"; --resume --results {results} continues" if results is not None else ""
        stderr.print(
            f"interrupted after {len(done.points)} of {done.total} points{where}",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(EXIT_INTERRUPTED)
    raise typer.Exit(EXIT_CONVERGED if done.ok else EXIT_NOT_CONVERGED)


def _run_sweep(
    base: Any,
    axes: Any,
    options: Any,
    warm_start: bool,
    results: Path | None,
    resume: bool,
    quiet: bool,
) -> Any:
    """Run the sweep under a progress bar on stderr (none with --quiet)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from deqcli.analyses.sweep import describe_point, run_sweep

    columns = (
        TextColumn("sweep"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=stderr, transient=True, disable=quiet) as bar:
        task = bar.add_task("", total=None)

        def step(count: int, total: int, point: dict[str, Any]) -> None:
            bar.update(task, completed=count, total=total, description=describe_point(point))

        return run_sweep(
            base,
            axes,
            options=options,
            warm_start=warm_start,
            results=results,
            resume=resume,
            on_point=step,
        )


# -- gradcheck ---------------------------------------------------------------------------------


@app.command()
def gradcheck(
    config: ConfigArg,
    param: Annotated[
        list[str] | None,
        typer.Option(
            "--param", "-p", help="Parameter to differentiate (repeatable; default: all of them)."
        ),
    ] = None,
    loss: Annotated[
        str | None,
        typer.Option(
            "--loss",
            help="Scalar loss of one sample's solution z (expression; summed over samples). "
            "Default: sum(z**2).",
        ),
    ] = None,
    directions: Annotated[
        int, typer.Option("--directions", min=1, help="Random directions for finite differences.")
    ] = 3,
    eps: Annotated[
        float | None,
        typer.Option("--eps", help="Finite-difference step (default 1e-5 float64, 3e-3 float32)."),
    ] = None,
    grad_rtol: Annotated[
        float | None,
        typer.Option(
            "--grad-rtol",
            help="Allowed relative error of the IFT gradient (default 1e-5 float64, 2e-2 float32).",
        ),
    ] = None,
    fd_atol: Annotated[
        float | None,
        typer.Option(
            "--fd-atol", help="Tolerance of the finite-difference re-solves (default about 1e-13)."
        ),
    ] = None,
    unroll: Annotated[
        int | None,
        typer.Option(
            "--unroll", help="Unrolled iterations (default: as many as the forward solve took)."
        ),
    ] = None,
    solver: SolverOpt = None,
    tol: TolOpt = None,
    rtol: RtolOpt = None,
    max_iter: MaxIterOpt = None,
    device: DeviceOpt = None,
    dtype: DtypeOpt = None,
    seed: SeedOpt = None,
    set_: SetOpt = None,
    json_path: JsonOpt = None,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compare the implicit, unrolled and finite-difference gradients of a loss of the fixed point.

    Exit codes: 0 the gradients agree (and the forward solve converged), 1 they do not, 2 bad input.
    """
    from deqcli.config import load_config
    from deqcli.render.files import check_output_path, emit_json

    with user_errors(debug):
        overrides = flag_overrides(
            tol=tol, rtol=rtol, max_iter=max_iter, device=device, dtype=dtype, seed=seed, sets=set_
        )
        cfg = load_config(config, overrides, solver=solver)
        target = (
            check_output_path(json_path, protected=[config], flag="--json") if json_path else None
        )
        from deqcli.analyses.gradcheck import GradcheckOptions
        from deqcli.analyses.gradcheck import gradcheck as run_gradcheck

        options = GradcheckOptions(
            params=list(param) if param else None,
            loss=loss,
            directions=directions,
            eps=eps,
            rtol=grad_rtol,
            fd_atol=fd_atol,
            unroll=unroll,
            seed=cfg.run.seed,
        )
        report = run_gradcheck(cfg, options)
    if json_path is not None:
        emit_json(report.to_dict(), target)
    if not quiet and json_path != "-":
        from deqcli.render.analysis import render_gradcheck

        render_gradcheck(report, stdout)
    raise typer.Exit(EXIT_CONVERGED if report.ok else EXIT_NOT_CONVERGED)
