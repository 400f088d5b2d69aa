"""The flags several commands share, defined once.

Single flags are ``Annotated`` aliases (``ConfigArg``, ``JsonOpt``, ``QuietOpt``, ``DebugOpt``, …). The
flags of a run (--solver, --tol/--atol, --rtol, --max-iter, --device, --dtype, --seed, --set,
--trust-code) come as
one ``RunFlags`` value: a command declares a keyword-only parameter ``run: RunFlags`` and the
``run_flags`` decorator puts the flags in its place, so ``--help`` lists them where ``run`` stands.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

ConfigArg = Annotated[Path, typer.Argument(help="YAML config file.", show_default=False)]
SolverOpt = Annotated[
    str | None, typer.Option("--solver", "-s", help="Solver name (see deq list-solvers).")
]
TolOpt = Annotated[
    float | None, typer.Option("--tol", "--atol", help="Absolute tolerance on ‖f(z)−z‖.")
]
RtolOpt = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        help="Relative tolerance: times ‖f(z0)−z0‖ (run.stop_mode abs) or ‖f(z)‖ (rel).",
    ),
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
# Where the tasks of sweep and compare-solvers run (default: in this process); see docs/scale-out.md.
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers",
        help="Run the tasks on a local Dask cluster of N worker processes, one thread each "
        "(pip install 'deqcli[distributed]').",
        show_default=False,
    ),
]
SchedulerOpt = Annotated[
    str | None,
    typer.Option(
        "--scheduler",
        help="Run the tasks on the Dask scheduler at ADDRESS (e.g. tcp://10.0.0.5:8786).",
        show_default=False,
    ),
]
ClusterOpt = Annotated[
    Path | None,
    typer.Option(
        "--cluster",
        help="Start a Slurm/PBS/SGE/LSF/HTCondor cluster described by this YAML file "
        "(dask-jobqueue) and run the tasks there.",
        show_default=False,
    ),
]
TrustCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-code",
        help="Allow a config to import and run the Python code it names (kind: python or module); "
        "same as DEQ_TRUST_CODE=1.",
    ),
]


@dataclass(frozen=True)
class RunFlags:
    """The flags of a run: the solver, the stopping rule, device and dtype, the seed and --set."""

    solver: str | None = None
    tol: float | None = None
    rtol: float | None = None
    max_iter: int | None = None
    device: str | None = None
    dtype: str | None = None
    seed: int | None = None
    sets: list[str] | None = None
    trust_code: bool = False


# RunFlags field -> (command parameter, its option); the parameter names are the commands' own.
RUN_OPTIONS: dict[str, tuple[str, Any]] = {
    "solver": ("solver", SolverOpt),
    "tol": ("tol", TolOpt),
    "rtol": ("rtol", RtolOpt),
    "max_iter": ("max_iter", MaxIterOpt),
    "device": ("device", DeviceOpt),
    "dtype": ("dtype", DtypeOpt),
    "seed": ("seed", SeedOpt),
    "sets": ("set_", SetOpt),
    "trust_code": ("trust_code", TrustCodeOpt),
}

Command = TypeVar("Command", bound=Callable[..., Any])


def run_flags(*, solver: bool = True) -> Callable[[Command], Command]:
    """Replace a command's ``run: RunFlags`` parameter by the run flags (without --solver if asked).

    Typer reads a command's options from its signature (``inspect.signature``, which honours
    ``__signature__``) and calls it with keyword arguments; the wrapper collects the run flags into
    one RunFlags and calls the command with it.
    """
    fields = [name for name in RUN_OPTIONS if solver or name != "solver"]

    def decorate(command: Command) -> Command:
        signature = inspect.signature(command, eval_str=True)
        slot = signature.parameters["run"]
        params: list[inspect.Parameter] = []
        for param in signature.parameters.values():
            if param is not slot:
                params.append(param)
                continue
            for name in fields:
                arg, annotation = RUN_OPTIONS[name]
                default = False if name == "trust_code" else None
                params.append(
                    inspect.Parameter(arg, slot.kind, default=default, annotation=annotation)
                )

        @functools.wraps(command)
        def with_run_flags(**kwargs: Any) -> Any:
            flags = RunFlags(**{name: kwargs.pop(RUN_OPTIONS[name][0]) for name in fields})
            return command(**kwargs, run=flags)

        with_run_flags.__signature__ = signature.replace(parameters=params)  # type: ignore[attr-defined]
        with_run_flags.__annotations__ = {p.name: p.annotation for p in params}
        return with_run_flags  # type: ignore[return-value]

    return decorate


def flag_overrides(run: RunFlags) -> list[str]:
    """Translate the run flags into ``--set`` style overrides (flags first, then --set)."""
    items = []
    for key, value in (
        ("run.atol", run.tol),
        ("run.rtol", run.rtol),
        ("run.max_iter", run.max_iter),
        ("run.device", run.device),
        ("run.dtype", run.dtype),
        ("run.seed", run.seed),
    ):
        if value is not None:
            items.append(f"{key}={value}")
    return items + list(run.sets or [])
