"""The Python API behind ``deq solve``: config in, SolveResult out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from deqcli.config import Config, load_config

if TYPE_CHECKING:
    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult
    from deqcli.solvers.base import StopRule


def as_config(config: Config | str | Path, overrides: list[str] | None = None) -> Config:
    """A validated Config from a path or an existing Config (overrides apply to paths only)."""
    if isinstance(config, Config):
        return config
    return load_config(config, overrides)


def load_problem(config: Config | str | Path, overrides: list[str] | None = None) -> Problem:
    """Build the Problem a config describes, on its device and dtype."""
    from deqcli.device import resolve_device, resolve_dtype
    from deqcli.problems import build_problem

    cfg = as_config(config, overrides)
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
    )


def solve(
    config: Config | str | Path,
    overrides: list[str] | None = None,
    *,
    problem: Problem | None = None,
    **solver_options: Any,
) -> SolveResult:
    """Solve the problem of ``config`` with its solver; ``problem`` reuses an already built one."""
    from deqcli.solvers import make_solver
    from deqcli.solvers.base import run

    cfg = as_config(config, overrides)
    built = problem if problem is not None else load_problem(cfg)
    solver = make_solver(cfg.solver.name, {**cfg.solver.options, **solver_options})
    return run(built, solver, stop_rule(cfg))
