"""The Python API behind ``deq solve``: a config, or a callable / module with its start, in; SolveResult out."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deqcli.config import Config, load_config
from deqcli.deadline import bounded
from deqcli.limits import Limits, check_solve

if TYPE_CHECKING:
    import torch

    from deqcli.diagnostics.settings import DiagnosticOptions
    from deqcli.problems.base import Form, Problem
    from deqcli.result import SolveResult
    from deqcli.solvers.base import Monitor, StopRule
    from deqcli.solvers.convergence import StopMode


def as_config(config: Config | str | Path, overrides: list[str] | None = None) -> Config:
    """A validated Config from a path or an existing Config (overrides apply to paths only)."""
    if isinstance(config, Config):
        return config
    return load_config(config, overrides)


def load_problem(
    config: Config | str | Path, overrides: list[str] | None = None, *, trust_code: bool = False
) -> Problem:
    """Build the Problem a config describes, on its device and dtype.

    A config that runs Python code (``kind: python``) needs ``trust_code=True`` (or the
    environment variable DEQ_TRUST_CODE=1); otherwise a ConsentError is raised before any import.
    """
    from deqcli.consent import allowed
    from deqcli.device import resolve_device, resolve_dtype
    from deqcli.problems import build_problem

    cfg = as_config(config, overrides)
    with allowed(trust_code):
        return build_problem(cfg, resolve_device(cfg.run.device), resolve_dtype(cfg.run.dtype))


def stop_rule(cfg: Config) -> StopRule:
    """The stopping rule a config asks for."""
    from deqcli.solvers.base import StopRule

    return StopRule(
        atol=cfg.atol,
        rtol=cfg.run.rtol,
        max_iter=cfg.run.max_iter,
        timeout=cfg.run.timeout,
        divergence_factor=cfg.run.divergence_factor,
        keep_iterates=cfg.run.keep_iterates,
        stop_mode=cfg.run.stop_mode,
        history_limit=cfg.run.history_limit,
        check_every=cfg.run.check_every,
    )


def solve(target: Any, *args: Any, **kwargs: Any) -> SolveResult:
    """Solve a fixed-point problem: a config, or a callable / ``nn.Module`` with its start.

    Two forms, told apart by the first argument:

    - ``solve(config, overrides=None, *, problem=None, diagnostics=True, precheck=False,
      trust_code=False, **solver_options)``: a config path or ``Config`` (see ``solve_config``);
    - ``solve(f, z0=None, *, inputs=None, solver="auto", atol=None, rtol=0.0, max_iter=1000, ...)``:
      any callable or module ``f(z)`` or ``f(z, x)`` (see ``solve_map``).

    Both return the same ``SolveResult`` (with diagnostics) that ``deq solve`` reports.
    """
    if callable(target) and not isinstance(target, (str, Path, Config)):
        return solve_map(target, *args, **kwargs)
    return solve_config(target, *args, **kwargs)


def solve_config(
    config: Config | str | Path,
    overrides: list[str] | None = None,
    *,
    problem: Problem | None = None,
    diagnostics: bool | DiagnosticOptions = True,
    precheck: bool = False,
    trust_code: bool = False,
    monitor: Monitor | None = None,
    monitor_every: int = 1,
    **solver_options: Any,
) -> SolveResult:
    """Solve the problem of ``config`` with its solver; ``problem`` reuses an already built one.

    ``diagnostics`` (True, False or DiagnosticOptions) analyses the run afterwards, refines the
    per-sample status with the evidence and tries the planned remedies (unless the options say
    ``trials=False``); ``precheck`` estimates the Lipschitz constant near z0 first.
    ``trust_code`` allows a config that runs Python code (see ``load_problem``).
    ``monitor`` is called with an ``Iteration`` (k, ‖g‖ per sample, samples running, elapsed) at
    the start, every ``monitor_every`` iterations and at the end: live progress, ``--monitor``.
    """
    cfg = as_config(config, overrides)
    built = problem if problem is not None else load_problem(cfg, trust_code=trust_code)
    stop = stop_rule(cfg)
    stop.monitor_every = monitor_every
    return _solve(
        built,
        cfg.solver.name,
        {**cfg.solver.options, **solver_options},
        stop,
        diagnostics=diagnostics,
        precheck=precheck,
        monitor=monitor,
        limits=Limits.of(cfg.run),
    )


def solve_map(
    f: Callable[..., Any],
    z0: Any = None,
    *,
    inputs: Any = None,
    solver: str = "auto",
    atol: float | None = None,
    rtol: float = 0.0,
    max_iter: int = 1000,
    stop_mode: StopMode = "abs",
    timeout: float | None = None,
    form: Form = "fixed_point",
    state_shape: tuple[int, ...] | None = None,
    name: str | None = None,
    diagnostics: bool | DiagnosticOptions = True,
    precheck: bool = False,
    **solver_options: Any,
) -> SolveResult:
    """Solve z = f(z) (or f(z, x) with per-sample ``inputs``) for any callable or ``nn.Module``.

    ``z0`` is (batch, *state shape) — any shape, e.g. (B, C, H, W) — or one state of at most one
    dimension (used for every sample); without it the start is zeros in the shape ``f.init_state(x)``
    returns, else ``state_shape``, else that of one call ``f(zeros like x, x)``, on the device and in
    the dtype of x, else of the module's weights (lists and arrays given as ``z0`` or ``inputs`` are
    placed there too; tensors are taken as they are). ``inputs`` is x with
    the batch first: row b of x goes with sample b wherever rows are evaluated (peers, diagnostics,
    sensitivities). ``form="residual"`` means f returns g(z) and the problem is g(z) = 0. A module's
    parameters and floating buffers become the problem's parameters under their state_dict names.
    The tolerance ``atol`` defaults to the dtype's (1e-10 in float64, 1e-5 in float32);
    ``stop_mode``, ``rtol``, ``max_iter`` and ``timeout`` are those of ``run:`` in a config, and
    the remaining keyword arguments are options of ``solver``. ``result.z_star`` is the solution in
    the state's shape.
    """
    import torch

    from deqcli.device import default_atol
    from deqcli.problems.model import from_map, placement
    from deqcli.solvers.base import StopRule

    # Python data (lists, arrays) are placed where the map's own tensors are: a module's device
    # and dtype, or the inputs'. As torch's default CPU tensors they would meet a CUDA module's
    # weights. Tensors are taken as given.
    x = None
    if inputs is not None:
        x = inputs if isinstance(inputs, torch.Tensor) else _placed(inputs, *placement(f, None))
    start = None
    if z0 is not None:
        start = z0 if isinstance(z0, torch.Tensor) else _placed(z0, *placement(f, x), real=True)
    if start is not None and not start.is_floating_point():
        start = start.to(torch.get_default_dtype())
    label = name or getattr(f, "__name__", type(f).__name__)
    problem = from_map(
        f,
        start,
        x,
        name=label,
        kind="callable",
        key="f",
        what=f"f ({label})",
        form=form,
        state_shape=state_shape,
        description=f"{form} from {label}",
    )
    dtype_name = str(problem.dtype).removeprefix("torch.")
    stop = StopRule(
        atol=default_atol(dtype_name) if atol is None else atol,
        rtol=rtol,
        max_iter=max_iter,
        timeout=timeout,
        stop_mode=stop_mode,
    )
    return _solve(problem, solver, solver_options, stop, diagnostics=diagnostics, precheck=precheck)


def _placed(
    value: Any, dtype: torch.dtype | None, device: torch.device | None, *, real: bool = False
) -> torch.Tensor:
    """``value`` (numbers, lists, arrays) as a tensor on ``device`` with floating values in
    ``dtype``; with ``real`` (a start) integers become floating too."""
    import torch

    tensor = torch.as_tensor(value, device=device)
    if tensor.is_floating_point():
        return tensor if dtype is None else tensor.to(dtype)
    return tensor.to(dtype or torch.get_default_dtype()) if real else tensor


def _solve(
    problem: Problem,
    solver_name: str,
    options: dict[str, Any],
    stop: StopRule,
    *,
    diagnostics: bool | DiagnosticOptions,
    precheck: bool,
    monitor: Monitor | None = None,
    limits: Limits | None = None,
) -> SolveResult:
    """The one path of both forms: precheck, the driver (with ``monitor``, every
    ``stop.monitor_every`` iterations), notes, diagnostics, the state's shape.

    ``limits`` (run.max_memory, run.max_work; the defaults for a callable) bound the working set.
    """
    from deqcli.solvers import make_solver
    from deqcli.solvers.base import run

    solver = make_solver(solver_name, options)
    # Before anything runs: the solver's working set must fit run.max_memory.
    check_solve(
        problem.batch, problem.dim, problem.z0.element_size(), solver, stop, limits or Limits()
    )
    diag_options = None if isinstance(diagnostics, bool) else diagnostics
    pre = None
    cut: list[str] = []  # what run.timeout cut short before the solve
    if precheck:
        from deqcli.diagnostics import precheck as check_start

        with bounded(stop.timeout, "the precheck", cut):
            pre = check_start(problem, diag_options, solver=solver)
    result = run(problem, solver, stop, monitor=monitor)
    result.state_shape = list(problem.sample_shape)
    result.notes.extend(tolerance_notes(stop, problem) + cut)
    # The diagnostics and the remedy trials each get run.timeout again, and end with a note.
    if diagnostics is not False or pre is not None:
        from deqcli.diagnostics import attach

        with bounded(stop.timeout, "the diagnostics", result.notes):
            attach(problem, result, diag_options, pre=pre, analyse_result=diagnostics is not False)
    if diagnostics is not False:
        from deqcli.analyses.remedies import try_remedies

        # The planned remedies, run within their budget (DiagnosticOptions.trials, --no-try).
        with bounded(stop.timeout, "the remedy trials", result.notes):
            try_remedies(problem, result, diag_options)
    return result


def tolerance_notes(stop: StopRule, problem: Problem) -> list[str]:
    """Warn when the tolerance is finer than the precision can resolve at the iterates' scale.

    In ``rel`` mode the test is ‖g‖ ≤ atol + rtol·‖f(z)‖: rtol is what must be resolvable (relative
    to ‖f(z)‖ it is resolvable down to about ε), and atol is only a floor that may well be 0.
    """
    import torch

    eps = torch.finfo(problem.dtype).eps
    dtype = str(problem.dtype).removeprefix("torch.")
    if stop.stop_mode == "rel" and stop.rtol > 0:
        if stop.rtol < 4 * eps:
            return [
                f"rtol {stop.rtol:g} is below what {dtype} can resolve (about {4 * eps:.1e}); "
                "loosen --rtol or use float64"
            ]
        return []
    scale = max(1.0, float(torch.linalg.vector_norm(problem.z0, dim=1).max()))
    if stop.atol < 4 * eps * scale:
        return [
            f"atol {stop.atol:g} is below what {dtype} can resolve at this scale "
            f"(about {4 * eps * scale:.1e}); loosen --tol or use float64"
        ]
    return []
