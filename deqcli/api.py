"""The Python API behind ``deq solve``: config in, SolveResult out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from deqcli.config import Config, load_config
from deqcli.deadline import bounded
from deqcli.limits import Limits, check_solve

if TYPE_CHECKING:
    from deqcli.diagnostics.settings import DiagnosticOptions
    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult
    from deqcli.solvers.base import StopRule


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
    )


def solve(
    config: Config | str | Path,
    overrides: list[str] | None = None,
    *,
    problem: Problem | None = None,
    diagnostics: bool | DiagnosticOptions = True,
    precheck: bool = False,
    trust_code: bool = False,
    **solver_options: Any,
) -> SolveResult:
    """Solve the problem of ``config`` with its solver; ``problem`` reuses an already built one.

    ``diagnostics`` (True, False or DiagnosticOptions) analyses the run afterwards and refines the
    per-sample status with the evidence; ``precheck`` estimates the Lipschitz constant near z0 first.
    ``trust_code`` allows a config that runs Python code (see ``load_problem``).
    """
    from deqcli.solvers import make_solver
    from deqcli.solvers.base import run

    cfg = as_config(config, overrides)
    built = problem if problem is not None else load_problem(cfg, trust_code=trust_code)
    solver = make_solver(cfg.solver.name, {**cfg.solver.options, **solver_options})
    stop = stop_rule(cfg)
    # Before anything runs: the solver's working set must fit run.max_memory.
    check_solve(built.batch, built.dim, built.z0.element_size(), solver, stop, Limits.of(cfg.run))
    diag_options = None if isinstance(diagnostics, bool) else diagnostics
    pre = None
    cut: list[str] = []  # what run.timeout cut short before the solve
    if precheck:
        from deqcli.diagnostics import precheck as check_start

        with bounded(cfg.run.timeout, "the precheck", cut):
            pre = check_start(built, diag_options, solver=solver)
    result = run(built, solver, stop)
    result.notes.extend(tolerance_notes(cfg, built) + cut)
    if diagnostics is not False or pre is not None:
        from deqcli.diagnostics import attach

        with bounded(cfg.run.timeout, "the diagnostics", result.notes):
            attach(built, result, diag_options, pre=pre, analyse_result=diagnostics is not False)
    return result


def tolerance_notes(cfg: Config, problem: Problem) -> list[str]:
    """Warn when the absolute tolerance is finer than the precision can resolve at the iterates' scale."""
    import torch

    eps = torch.finfo(problem.dtype).eps
    scale = max(1.0, float(torch.linalg.vector_norm(problem.z0, dim=1).max()))
    if cfg.atol < 4 * eps * scale:
        return [
            f"atol {cfg.atol:g} is below what {cfg.run.dtype} can resolve at this scale "
            f"(about {4 * eps * scale:.1e}); loosen --tol or use float64"
        ]
    return []
