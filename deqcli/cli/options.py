"""The flags several commands share, defined once, and how every command shows its flags.

Single flags are ``Annotated`` aliases (``ConfigArg``, ``JsonOpt``, ``QuietOpt``, ``DebugOpt``, …). The
flags of a run (--solver, --tol/--atol, --rtol, --max-iter, --device, --dtype, --seed, --set,
--trust-code) come as
one ``RunFlags`` value: a command declares a keyword-only parameter ``run: RunFlags`` and the
``run_flags`` decorator puts the flags in its place, so ``--help`` lists them where ``run`` stands.

Every command is a ``DeqCommand``: its help names values by what they are (``PATH``, ``N``,
``KEY=VALUE``), never by Python types, and options in ``OPTIONAL_VALUES`` may be given without a
value (``--monitor`` or ``--monitor 10``).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from typer.core import TyperArgument, TyperCommand, TyperOption

# Click's exceptions as this Typer raises them (recent Typer versions carry their own copy of Click).
_click = sys.modules[typer.BadParameter.__module__]

ConfigArg = Annotated[
    Path,
    typer.Argument(
        metavar="CONFIG", help="YAML config file ('-': read it from stdin).", show_default=False
    ),
]
SolverOpt = Annotated[
    str | None,
    typer.Option("--solver", "-s", metavar="NAME", help="Solver name (see deq list-solvers)."),
]
TolOpt = Annotated[
    float | None,
    typer.Option("--tol", "--atol", metavar="X", help="Absolute tolerance on ‖g(z)‖ = ‖f(z)−z‖."),
]
RtolOpt = Annotated[
    float | None,
    typer.Option(
        "--rtol",
        metavar="X",
        help="Relative tolerance: times ‖g(z0)‖ (run.stop_mode abs) or ‖f(z)‖ (rel).",
    ),
]
MaxIterOpt = Annotated[
    int | None, typer.Option("--max-iter", metavar="N", help="Iteration budget.")
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", metavar="DEVICE", help="auto, cpu, cuda, cuda:N or mps."),
]
DtypeOpt = Annotated[
    str | None,
    typer.Option("--dtype", metavar="DTYPE", help="float32 or float64 (default)."),
]
SeedOpt = Annotated[
    int | None,
    typer.Option("--seed", metavar="N", help="Seed for random arrays in the config."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--set", metavar="KEY=VALUE", help="Override a config key: key.path=value (repeatable)."
    ),
]
JsonOpt = Annotated[
    str | None,
    typer.Option(
        "--json", metavar="PATH", help="Write the JSON result to PATH, or '-' for stdout only."
    ),
]
MonitorOpt = Annotated[
    int | None,
    typer.Option(
        "--monitor",
        min=1,
        metavar="[K]",
        help="Print one line per iteration (or every K-th) on stderr: ‖g‖, rate, samples running.",
    ),
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
ChunkOpt = Annotated[
    str | None,
    typer.Option(
        "--chunk",
        metavar="N|auto",
        help="How many tasks travel to Dask together: auto (the default) groups short ones so a "
        "group takes about 0.25 s; 1 sends each alone.",
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


# Options that may be given without a value, and the value they then take.
OPTIONAL_VALUES = {"--monitor": "1"}
# Names for values whose option declares no metavar, so help never shows a Python type.
_TYPE_METAVARS = {"int": "N", "float": "X", "Path": "PATH"}


class DeqArgument(TyperArgument):
    """An argument shown by its metavar alone: ``CONFIG`` in the usage line and the help."""

    def display_type_rich(self, ctx: Any) -> str | None:
        """No type placeholder: the metavar says what the argument is."""
        return None

    def _usage_display_name(self) -> str:
        name = self.display_name_raw + ("..." if self.nargs != 1 else "")
        return name if self.required else f"[{name}]"


class DeqCommand(TyperCommand):
    """A deq command: help without Python type names, and options whose value is optional."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if isinstance(param, TyperArgument):
                # Typer builds its own argument class; this one only changes how it is shown.
                param.__class__ = DeqArgument
                param.metavar = param.metavar or (param.name or "ARG").upper()
            elif isinstance(param, TyperOption) and not param.is_flag and param.metavar is None:
                param.metavar = _TYPE_METAVARS.get(
                    param.bare_type().removeprefix("list[").removesuffix("]"), "TEXT"
                )

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Give a bare ``--monitor`` (no number after it) its default value before parsing, and
        refuse an option whose value is another of the command's options."""
        args = optional_values(args)
        found = option_as_value(self.get_params(ctx), args)
        if found is not None:
            flag, value, long = found
            # Click would take the option as the value: `--json --no-diagnostics` writes a file
            # named --no-diagnostics and runs the diagnostics it was asked to skip.
            raise _click.BadOptionUsage(
                flag,
                f"{flag}: expected a value, got the option {value}; give {flag} a value "
                f"(or write {long}={value} if that is the value you mean)",
                ctx=ctx,
            )
        return super().parse_args(ctx, args)


def option_as_value(params: list[Any], args: list[str]) -> tuple[str, str, str] | None:
    """The first option that takes a value but is followed by one of the command's own option
    names: (the option as written, that name, the option's long name), or None."""
    names = {
        name for p in params if isinstance(p, TyperOption) for name in p.opts + p.secondary_opts
    }
    valued = {
        name: max(p.opts, key=len)
        for p in params
        if isinstance(p, TyperOption) and not p.is_flag and not p.count
        for name in p.opts
    }
    for arg, following in itertools.pairwise(args):
        if arg == "--":
            break
        if arg in valued and following in names:
            return arg, following, valued[arg]
    return None


def optional_values(args: list[str]) -> list[str]:
    """``--monitor`` not followed by a number becomes ``--monitor=1`` (see ``OPTIONAL_VALUES``)."""
    out: list[str] = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + args[i:]
        following = args[i + 1] if i + 1 < len(args) else ""
        if arg in OPTIONAL_VALUES and not following.isdigit():
            arg = f"{arg}={OPTIONAL_VALUES[arg]}"
        out.append(arg)
    return out


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
    from deqcli.errors import UsageError
    from deqcli.yaml_reader import INT_LIMIT

    items = []
    for flag, key, value in (
        ("--atol", "run.atol", run.tol),
        ("--rtol", "run.rtol", run.rtol),
        ("--max-iter", "run.max_iter", run.max_iter),
        ("--device", "run.device", run.device),
        ("--dtype", "run.dtype", run.dtype),
        ("--seed", "run.seed", run.seed),
    ):
        if isinstance(value, int) and not -INT_LIMIT <= value < INT_LIMIT:  # as --set allows
            # Named here under the flag given; as the --set it becomes, the error would say --set.
            raise UsageError(f"{flag}: {value} is out of range; give an integer with |n| < 2**63")
        if value is not None:
            items.append(f"{key}={value}")
    return items + list(run.sets or [])
