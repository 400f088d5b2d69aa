"""What each solving command does, end to end, without the command line.

A command turns its flags into a plain request; the job here checks the inputs and every output path
before any solving starts, runs the work, writes the requested files in a fixed order (``-`` means
stdout for the one output that asks for it) and returns an outcome. Bad input raises ``DeqError`` or
``ExpressionError``. Terminal reports are left to ``deqcli.render``; exit codes to ``deqcli.cli``.

Nothing heavy is imported at module level, so the commands that solve nothing stay free of torch.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deqcli.analyses.compare import DEFAULT_MAX_SLOWDOWN, DEFAULT_REPEAT, DEFAULT_WARMUP
from deqcli.errors import UsageError
from deqcli.execution import ExecutionSettings

if TYPE_CHECKING:
    from deqcli.analyses.compare import BaselineCheck, ProgressCallback, Regression
    from deqcli.analyses.gradcheck import GradcheckReport
    from deqcli.analyses.sensitivity import Sensitivity
    from deqcli.analyses.sweep import SweepResult
    from deqcli.config import Config
    from deqcli.result import SolveResult
    from deqcli.solvers.base import Monitor

# -- deq solve ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SolveRequest:
    """``deq solve``: one config, solved; optionally explained, prechecked and differentiated."""

    config: Path
    overrides: list[str] = field(default_factory=list)
    solver: str | None = None
    json_path: str | None = None
    explain: bool = False
    precheck: bool = False
    diagnostics: bool = True
    max_period: int | None = None
    sensitivity: list[str] = field(default_factory=list)
    save: str | None = None
    try_remedies: bool = True
    try_budget: int | None = None
    monitor_every: int = 1


@dataclass
class SolveOutcome:
    """The solve, the problem's description and the sensitivities asked for."""

    result: SolveResult
    description: str
    sensitivities: list[Sensitivity]


def solve(request: SolveRequest, monitor: Monitor | None = None) -> SolveOutcome:
    """Load, check the --json and --save paths and the sensitivity names, solve (``monitor`` sees
    every ``request.monitor_every``-th iteration), write --json and z*."""
    from deqcli.api import load_problem
    from deqcli.api import solve as api_solve
    from deqcli.config import load_config
    from deqcli.render.files import Outputs, check_distinct, emit_json

    cfg = load_config(request.config, request.overrides, solver=request.solver)
    inputs = _inputs(request.config, cfg)
    target = _output(request.json_path, inputs, "--json")
    saved = None
    if request.save is not None:
        from deqcli.render.files import check_solution_path

        saved = check_solution_path(request.save, protected=inputs)
    check_distinct({"--json": target, "--save": saved})
    if request.explain and not request.diagnostics:
        raise UsageError("--explain needs the diagnostics; drop --no-diagnostics")
    if request.try_budget is not None and not request.try_remedies:
        raise UsageError("--try-budget sets the budget of the remedy trials; drop --no-try")
    from deqcli.diagnostics.settings import DiagnosticOptions

    settings: dict[str, Any] = {"trials": request.try_remedies, "try_budget": request.try_budget}
    if request.max_period:
        settings["max_period"] = request.max_period
    diagnostics = DiagnosticOptions(**settings) if request.diagnostics else False
    problem = load_problem(cfg)
    if request.sensitivity:
        from deqcli.analyses.sensitivity import attach_sensitivities, check_names

        check_names(problem, request.sensitivity)
    result = api_solve(
        cfg,
        problem=problem,
        diagnostics=diagnostics,
        precheck=request.precheck,
        monitor=monitor,
        monitor_every=request.monitor_every,
    )
    sens = attach_sensitivities(problem, result, request.sensitivity) if request.sensitivity else []
    out = Outputs()
    if request.json_path is not None:
        out.write("--json", lambda: emit_json(result.to_dict(), target))
    if saved is not None:
        from deqcli.render.files import save_solution

        out.write(
            "--save",
            lambda: save_solution(result.z_star, [s.ok for s in result.sample_status], saved),
        )
    out.finish()
    return SolveOutcome(result, problem.description, sens)


def _output(path: str | None, inputs: list[Path], flag: str) -> Path | None:
    """The checked output file of a one-config command's ``flag`` (None: stdout, or not asked for);
    none of ``inputs`` may be it."""
    from deqcli.render.files import check_output_path

    return check_output_path(path, protected=inputs, flag=flag) if path is not None else None


def _inputs(config: Path, cfg: Config) -> list[Path]:
    """The files a run reads, which no output may replace: the config and every file it names
    (arrays, checkpoints, a Python target)."""
    from deqcli.config import config_files

    return [config, *(ref.path(cfg.base_dir) for ref in config_files(cfg))]


# -- deq compare-solvers --------------------------------------------------------------------------


@dataclass(frozen=True)
class CompareRequest:
    """``deq compare-solvers``: solvers side by side on configs, optionally against a baseline."""

    configs: list[Path]
    solvers: str | None = None
    all_solvers: bool = False
    repeat: int = DEFAULT_REPEAT
    warmup: int = DEFAULT_WARMUP
    overrides: list[str] = field(default_factory=list)
    json_path: str | None = None
    csv_path: str | None = None
    markdown_path: str | None = None
    plot: str | None = None
    baseline: Path | None = None
    save_baseline: str | None = None
    max_slowdown: float = DEFAULT_MAX_SLOWDOWN
    debug: bool = False
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)


@dataclass
class CompareOutcome:
    """The comparison document, the baseline check (with --baseline) and the plots written."""

    doc: dict[str, Any]
    check: BaselineCheck | None
    plots: list[Path]
    to_stdout: bool  # one of --json, --csv and --markdown went to stdout

    @property
    def regressions(self) -> list[Regression]:
        """What got worse than the baseline (none without --baseline)."""
        return self.check.regressions if self.check is not None else []

    @property
    def ok(self) -> bool:
        """Every problem was solved by some solver and nothing regressed."""
        return not self.doc["summary"]["unsolved"] and not self.regressions

    @property
    def interrupted(self) -> bool:
        """Ctrl-C stopped the comparison; the document holds the problems finished before it."""
        return bool(self.doc.get("interrupted"))


# A progress bar for this many solves, entered around the solving; it yields the per-solve callback.
CompareProgress = Callable[[int], AbstractContextManager["ProgressCallback"]]


def compare(request: CompareRequest, progress: CompareProgress | None = None) -> CompareOutcome:
    """Check configs, solvers, settings and every output; solve; check the baseline; write --json,
    --save-baseline, --csv, --markdown and the plots, in that order (a failed one is kept
    elsewhere and reported after the others were written)."""
    from deqcli.analyses import compare as analysis
    from deqcli.execution import open_executor
    from deqcli.render.compare import to_csv, to_markdown
    from deqcli.render.files import Outputs, check_distinct, check_output_path, emit_json, emit_text

    files = analysis.expand_configs(request.configs)
    names = analysis.resolve_solvers(request.solvers, include_peers=request.all_solvers)
    analysis.check_settings(
        repeat=request.repeat, warmup=request.warmup, max_slowdown=request.max_slowdown
    )
    baseline = request.baseline
    configs = analysis.load_configs(files, request.overrides)
    inputs = [path for file, cfg in zip(files, configs, strict=True) for path in _inputs(file, cfg)]
    protected = inputs + ([baseline] if baseline is not None else [])
    outputs = {
        "--json": request.json_path,
        "--csv": request.csv_path,
        "--markdown": request.markdown_path,
    }
    if sum(value == "-" for value in outputs.values()) > 1:
        raise UsageError("only one of --json, --csv and --markdown can write to stdout ('-')")
    targets = {
        flag: check_output_path(value, protected=protected, flag=flag)
        for flag, value in outputs.items()
        if value is not None
    }
    if request.save_baseline == "-":
        raise UsageError("--save-baseline: give a file path (use --json - for stdout)")
    saved = (
        check_output_path(request.save_baseline, protected=inputs, flag="--save-baseline")
        if request.save_baseline is not None
        else None
    )
    # --save-baseline writes the --json document, so those two may name one file.
    check_distinct(
        {**targets, "--save-baseline": saved if saved != targets.get("--json") else None}
    )
    plot_target = None
    if request.plot is not None:
        from deqcli.render.plots import check_plot_target

        plot_target = check_plot_target(request.plot)
    stored = analysis.load_baseline(baseline) if baseline is not None else None
    runs = len(files) * len(names) * (request.warmup + request.repeat)
    executor = open_executor(request.execution)
    with executor, progress(runs) if progress is not None else nullcontext(None) as step:
        doc = analysis.compare(
            files,
            names,
            overrides=request.overrides,
            repeat=request.repeat,
            warmup=request.warmup,
            progress=step,
            debug=request.debug,
            executor=executor,
            configs=configs,
        )
    check = None
    if stored is not None:
        check = analysis.check_baseline(
            doc, stored, max_slowdown=request.max_slowdown, path=str(baseline)
        )
        doc["baseline"] = check.to_dict()
    out = Outputs()
    if "--json" in targets or request.json_path == "-":
        out.write("--json", lambda: emit_json(doc, targets.get("--json")))
    if saved is not None:
        out.write("--save-baseline", lambda: emit_json(doc, saved, flag="--save-baseline"))
    for flag, text in (("--csv", request.csv_path), ("--markdown", request.markdown_path)):
        if text is None:
            continue
        rendered = to_csv(doc) if flag == "--csv" else to_markdown(doc)
        out.write(
            flag, lambda rendered=rendered, flag=flag: emit_text(rendered, targets[flag], flag=flag)
        )
    plots: list[Path] = []
    if plot_target is not None:
        # Last: a plot that cannot be drawn or saved must not cost the documents above.
        from deqcli.render.plots import write_plots

        plots = out.write("--plot", lambda: write_plots(doc, plot_target)) or []
    out.finish()
    to_stdout = any(value == "-" for value in outputs.values())
    return CompareOutcome(doc, check, plots, to_stdout)


# -- deq sweep ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SweepRequest:
    """``deq sweep``: one config solved at every point of a grid of one or more config keys."""

    config: Path
    params: list[str]
    overrides: list[str] = field(default_factory=list)
    solver: str | None = None
    warm_start: bool = False
    value: str = "auto"
    results: Path | None = None
    resume: bool = False
    json_path: str | None = None
    csv_path: str | None = None
    plot: str | None = None
    diagnostics: bool = True
    execution: ExecutionSettings = field(default_factory=ExecutionSettings)


@dataclass
class SweepOutcome:
    """The sweep (possibly interrupted) and the plot written, if any."""

    sweep: SweepResult
    plot: Path | None
    to_stdout: bool  # --json - or --csv -


# A progress display entered around the sweep; it yields the per-point callback of run_sweep.
PointCallback = Callable[[int, int, dict[str, Any]], None]
SweepProgress = Callable[[], AbstractContextManager[PointCallback | None]]


def sweep(request: SweepRequest, progress: SweepProgress | None = None) -> SweepOutcome:
    """Check the grid and every output; run the sweep (an interrupt returns what is done); write
    --json, --csv and the plot, in that order."""
    from deqcli.analyses.sweep import (
        PointOptions,
        SweepBase,
        check_value_spec,
        make_axes,
        run_sweep,
        to_csv,
    )
    from deqcli.consent import require_all
    from deqcli.execution import open_executor
    from deqcli.render.files import Outputs, check_distinct, check_output_path, emit_json, emit_text

    config = request.config
    if sum(1 for t in (request.json_path, request.csv_path) if t == "-") > 1:
        raise UsageError("--json - and --csv - both want stdout; send one of them to a file")
    check_value_spec(request.value)
    base = SweepBase.from_path(config, request.overrides, request.solver)
    axes = make_axes(base, request.params)
    inputs = _inputs(config, base.config())
    json_target = _output(request.json_path, inputs, "--json")
    csv_target = _output(request.csv_path, inputs, "--csv")
    results = None
    if request.results is not None:
        results = check_output_path(str(request.results), protected=inputs, flag="--results")
    check_distinct({"--json": json_target, "--csv": csv_target, "--results": results})
    if request.resume and request.results is None:
        raise UsageError("--resume needs --results PATH (the file the interrupted sweep wrote)")
    plot_target = None
    if request.plot is not None:
        from deqcli.render.sweep_plots import check_target

        plot_target = check_target(request.plot)
        if len(axes) > 2:
            raise UsageError("--plot: sweeps of one or two keys can be plotted; this one has more")
    options = PointOptions(value=request.value, diagnostics=request.diagnostics)
    require_all([base.config().problem])
    executor = open_executor(request.execution)
    with executor, progress() if progress is not None else nullcontext(None) as on_point:
        done = run_sweep(
            base,
            axes,
            options=options,
            warm_start=request.warm_start,
            results=request.results,
            resume=request.resume,
            on_point=on_point,
            executor=executor,
        )

    out = Outputs()
    if request.json_path is not None:
        out.write("--json", lambda: emit_json(done.to_dict(), json_target))
    if request.csv_path is not None:
        out.write("--csv", lambda: emit_text(to_csv(done), csv_target, flag="--csv"))
    written = None
    if plot_target is not None and done.points:
        from deqcli.render.sweep_plots import plot_sweep

        written = out.write("--plot", lambda: plot_sweep(done, plot_target))
    out.finish()
    to_stdout = request.json_path == "-" or request.csv_path == "-"
    return SweepOutcome(done, written, to_stdout)


# -- deq gradcheck --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GradcheckRequest:
    """``deq gradcheck``: the implicit, unrolled and finite-difference gradients of a loss."""

    config: Path
    overrides: list[str] = field(default_factory=list)
    solver: str | None = None
    params: list[str] | None = None
    loss: str | None = None
    directions: int = 3
    eps: float | None = None
    grad_rtol: float | None = None
    fd_atol: float | None = None
    unroll: int | None = None
    json_path: str | None = None


def gradcheck(request: GradcheckRequest) -> GradcheckReport:
    """Load, check the --json path, compare the gradients, write --json."""
    from deqcli.analyses.gradcheck import GradcheckOptions
    from deqcli.analyses.gradcheck import gradcheck as run_gradcheck
    from deqcli.config import load_config
    from deqcli.render.files import emit_json

    cfg = load_config(request.config, request.overrides, solver=request.solver)
    target = _output(request.json_path, _inputs(request.config, cfg), "--json")
    options = GradcheckOptions(
        params=list(request.params) if request.params else None,
        loss=request.loss,
        directions=request.directions,
        eps=request.eps,
        rtol=request.grad_rtol,
        fd_atol=request.fd_atol,
        unroll=request.unroll,
        seed=cfg.run.seed,
    )
    report = run_gradcheck(cfg, options)
    if request.json_path is not None:
        emit_json(report.to_dict(), target)
    return report
