"""YAML configuration → validated spec objects, ``--set`` overrides, and the JSON Schema.

Loaded with PyYAML's safe loader only, capped in size, depth and alias expansion
(``deqcli.yaml_reader``); validated strictly by pydantic (unknown keys, wrong types and
out-of-range values are errors that name the dotted key path and the YAML line). Expressions are
parsed here too, so ``deq validate`` catches them without importing torch.
"""

from __future__ import annotations

import difflib
import re
import sys
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from deqcli.errors import ConfigError, DeqError
from deqcli.expr import ExpressionError, parse_expression
from deqcli.limits import DEFAULT_MAX_MEMORY, DEFAULT_MAX_WORK, parse_memory
from deqcli.yaml_reader import INT_LIMIT, YamlSyntaxError, load_document, read_capped

# -- array specifications ------------------------------------------------------------------

RANDOM_KINDS = ("normal", "uniform", "orthogonal", "symmetric")
ARRAY_FILE_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")
# Checkpoints a module's weights may come from (torch.save files under any of the usual names).
WEIGHTS_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors", ".npz")


class FileArray(BaseModel):
    """An array read from a file (path relative to the config file).

    ``key`` picks one array from a file that holds several: an entry of a .npz archive, of a
    .safetensors file, or of a dict saved with torch.save (dotted for nested dicts).
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    file: str
    key: str | None = None

    @field_validator("file")
    @classmethod
    def _format(cls, value: str) -> str:
        # Checked here, as the build checks it, so that deq validate and deq solve accept the
        # same files.
        if Path(value).suffix not in ARRAY_FILE_SUFFIXES:
            raise ValueError(f"'{value}' must be one of {', '.join(ARRAY_FILE_SUFFIXES)}")
        return value


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans(cls, data: Any) -> Any:
        # Pydantic reads true as 1 for a number; YAML reads yes/no/on/off as booleans too, so
        # `atol: yes` would silently be a tolerance of 1.0 and `max_iter: on` one iteration.
        if not isinstance(data, dict):
            return data
        errors = [
            InitErrorDetails(type=_BOOLEAN_NUMBER, loc=(name,), input=value)
            for name, value in data.items()
            if isinstance(name, str)
            and name in cls.model_fields
            and _numeric(cls.model_fields[name].annotation)
            and _has_boolean(value)
        ]
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return data


_BOOLEAN_NUMBER = PydanticCustomError(
    "boolean_number", "expected a number; YAML reads true/false, yes/no and on/off as booleans"
)


def _numeric(annotation: Any) -> bool:
    """Whether a field's type is a number (or a list or tuple of numbers), and never a boolean."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _numeric(get_args(annotation)[0])
    if origin is not None:  # Optional, unions, list[...] and tuple[...]
        args = [a for a in get_args(annotation) if a is not type(None) and a is not Ellipsis]
        return any(_numeric(a) for a in args) and bool not in args
    return annotation in (int, float)


def _has_boolean(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return any(_has_boolean(v) for v in value)
    return isinstance(value, bool)


class RandomArray(_Spec):
    """A seeded random array.

    ``normal``/``uniform`` fill the shape with N(0, 1) or U(−1, 1) draws times ``scale``;
    ``spectral_norm`` then rescales a matrix to that 2-norm. ``orthogonal`` is ``scale``·Q for a
    Haar-random orthogonal Q. ``symmetric`` has eigenvalues evenly spaced over ``eigenvalues``
    [lo, hi] in a random orthonormal basis.
    """

    random: Literal["normal", "uniform", "orthogonal", "symmetric"]
    shape: list[Annotated[int, Field(gt=0)]] | None = Field(
        default=None, description="the array's shape, where the key does not imply one"
    )
    seed: int | None = None
    scale: float = 1.0
    spectral_norm: Annotated[float, Field(gt=0)] | None = None
    eigenvalues: tuple[float, float] | None = None

    @model_validator(mode="after")
    def _check(self) -> RandomArray:
        if self.random == "symmetric" and self.eigenvalues is None:
            raise ValueError("random: symmetric needs eigenvalues: [lo, hi]")
        if self.eigenvalues is not None and self.random != "symmetric":
            raise ValueError("eigenvalues applies only to random: symmetric")
        if self.spectral_norm is not None and self.random not in ("normal", "uniform"):
            raise ValueError("spectral_norm applies to random: normal or uniform")
        return self


def _parse_array(value: Any) -> Any:
    """Accept a number, a rectangular nested list of numbers, an expression string, {file} or {random}."""
    if isinstance(value, bool):
        raise ValueError(
            "expected a number, list, expression, {file: ...} or {random: ...}, got a boolean"
        )
    if isinstance(value, (int, float, str)):
        return value
    if isinstance(value, list):
        _check_rectangular(value)
        return value
    if isinstance(value, dict):
        model = FileArray if "file" in value else RandomArray if "random" in value else None
        if model is None:
            raise ValueError(
                f"a mapping here needs a 'file' or 'random' key, got keys {sorted(value)}"
            )
        try:
            return model.model_validate(value)
        except ValidationError as exc:
            raise ValueError(_brief(exc, model)) from None
    if isinstance(value, (FileArray, RandomArray)):
        return value
    raise ValueError(
        f"expected a number, list, expression, {{file: ...}} or {{random: ...}}, got {value!r}"
    )


def _check_rectangular(value: list[Any]) -> tuple[int, ...]:
    if not value:
        raise ValueError("empty list")
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return (len(value),)
    if all(isinstance(v, list) for v in value):
        shapes = {_check_rectangular(v) for v in value}
        if len(shapes) != 1:
            raise ValueError("nested lists must be rectangular (all rows the same length)")
        return (len(value), *shapes.pop())
    text = next((v for v in value if isinstance(v, str) and NUMBER.match(v.strip())), None)
    if text is not None:
        # YAML 1.1, which deq reads, takes 1e-3 (no decimal point) for a string, not a number.
        raise ValueError(
            f"lists must hold only numbers, and '{text}' is text here: write numbers unquoted "
            "and with a decimal point (1.0e-3, not 1e-3)"
        )
    raise ValueError("lists must hold only numbers (or lists of numbers)")


def _brief(exc: ValidationError, model: type[BaseModel]) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key '{where}' (valid keys: {', '.join(model.model_fields)})"
    return f"{where}: {msg}" if where else msg


_ARRAY_SCHEMA = {
    "description": "number, nested list, expression text, {file: path} or {random: kind, ...}",
    "anyOf": [
        {"type": "number"},
        {"type": "array"},
        {"type": "string", "description": "an expression (see docs/expressions.md)"},
        FileArray.model_json_schema(),
        RandomArray.model_json_schema(),
    ],
}
ArraySpec = Annotated[Any, BeforeValidator(_parse_array), WithJsonSchema(_ARRAY_SCHEMA)]

# -- problems ------------------------------------------------------------------------------


class TanhLayerSpec(_Spec):
    """z = tanh(W z + U x + b): the equilibrium layer of a deep equilibrium model."""

    kind: Literal["tanh_layer"]
    name: str | None = None
    dim: Annotated[int, Field(gt=0, description="n, the size of z")]
    input_dim: Annotated[int, Field(gt=0, description="size of x (default: dim)")] | None = None
    batch: (
        Annotated[
            int,
            Field(
                gt=0,
                description="number of inputs x solved together (default: the rows of x, else 1)",
            ),
        ]
        | None
    ) = None
    W: ArraySpec
    U: ArraySpec | None = None
    b: ArraySpec | None = None
    x: ArraySpec = Field(default_factory=lambda: RandomArray(random="normal"))
    initial: ArraySpec = 0.0


class ExpressionSpec(_Spec):
    """A scalar or vector problem given as text: ``fixed_point: f(z)`` or ``residual: g(z)``."""

    kind: Literal["expression"]
    name: str | None = None
    fixed_point: str | None = None
    residual: str | None = None
    dim: Annotated[int, Field(gt=0)] | None = None
    batch: Annotated[int, Field(gt=0)] | None = None
    initial: ArraySpec = 0.0
    params: dict[str, ArraySpec] = Field(default_factory=dict)
    batch_params: dict[str, ArraySpec] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_form(self) -> ExpressionSpec:
        if (self.fixed_point is None) == (self.residual is None):
            raise ValueError("give exactly one of fixed_point (z = f(z)) or residual (g(z) = 0)")
        return self


class GradientDescentSpec(_Spec):
    """w ← w − lr·∇L(w) with the loss L given as an expression in w (gradient by autodiff)."""

    kind: Literal["gradient_descent"]
    name: str | None = None
    loss: str
    lr: Annotated[float, Field(gt=0)]
    dim: Annotated[int, Field(gt=0)] | None = None
    batch: Annotated[int, Field(gt=0)] | None = None
    initial: ArraySpec = 0.0
    params: dict[str, ArraySpec] = Field(default_factory=dict)
    batch_params: dict[str, ArraySpec] = Field(default_factory=dict)


def _check_target(value: str) -> str:
    if not re.match(r"^[^:]+:[A-Za-z_][A-Za-z0-9_]*$", value):
        raise ValueError("target must look like path/to/file.py:factory or module:factory")
    return value


Target = Annotated[
    str,
    Field(description="path/to/file.py:factory or package.module:factory"),
    AfterValidator(_check_target),
]


class PythonSpec(_Spec):
    """A map from the user's own Python code. This runs that code: only use files you trust."""

    kind: Literal["python"]
    name: str | None = None
    target: Target
    args: dict[str, Any] = Field(default_factory=dict)
    form: Literal["fixed_point", "residual"] = "fixed_point"


class WeightsSpec(_Spec):
    """A checkpoint for a module: a state_dict, or the sub-tree of one that ``key`` names."""

    file: str
    key: str | None = Field(
        default=None,
        description="dotted path of the sub-tree to load (e.g. model.cell for the keys model.cell.*)",
    )


def _flat_names(value: Any) -> Any:
    """``{cell: {scale: 2}}`` (as ``--set problem.params.cell.scale=2`` writes it) → ``{cell.scale: 2}``."""
    if not isinstance(value, dict):
        return value
    flat: dict[str, Any] = {}

    def walk(node: dict[str, Any], prefix: str) -> None:
        for k, v in node.items():
            name = f"{prefix}{k}"
            if isinstance(v, dict) and "file" not in v and "random" not in v:
                walk(v, f"{name}.")
            else:
                flat[name] = v

    walk(value, "")
    return flat


class ModuleSpec(_Spec):
    """An nn.Module from the user's own code whose forward(z, x) is the map. This runs that code."""

    kind: Literal["module"]
    name: str | None = None
    target: Target
    args: dict[str, Any] = Field(default_factory=dict)
    weights: WeightsSpec | None = None
    strict: bool = Field(
        default=True, description="the checkpoint's keys must match the module's exactly"
    )
    mode: Literal["eval", "train"] = "eval"
    inputs: ArraySpec | None = Field(
        default=None, description="the batch x, shape (batch, ...): one input per sample"
    )
    batch: (
        Annotated[
            int,
            Field(
                gt=0,
                description="use the first batch rows of the inputs (or: samples without inputs)",
            ),
        ]
        | None
    ) = None
    state_shape: list[Annotated[int, Field(gt=0)]] | None = Field(
        default=None, description="one sample's z shape, when neither init_state nor a call tells"
    )
    initial: ArraySpec = 0.0
    params: Annotated[dict[str, ArraySpec], BeforeValidator(_flat_names)] = Field(
        default_factory=dict,
        description="new values for parameters or buffers, by state_dict name (a number fills one)",
    )
    form: Literal["fixed_point", "residual"] = "fixed_point"


ProblemSpec = Annotated[
    TanhLayerSpec | ExpressionSpec | GradientDescentSpec | PythonSpec | ModuleSpec,
    Field(discriminator="kind"),
]
PROBLEM_MODELS: dict[str, type[BaseModel]] = {
    "tanh_layer": TanhLayerSpec,
    "expression": ExpressionSpec,
    "gradient_descent": GradientDescentSpec,
    "python": PythonSpec,
    "module": ModuleSpec,
}

# -- solver and run --------------------------------------------------------------------------


# The solver a config gets when it names none. A residual g(z) = 0 is a root-finding problem: its
# naive map z − g(z) contracts only by luck (for z² − 2 near √2 its slope is 1 − 2z ≈ −1.8), so
# it gets Newton's method; a fixed-point map z = f(z) gets plain iteration.
DEFAULT_SOLVER = "fixed_point"
DEFAULT_ROOT_SOLVER = "newton"


def default_solver(problem: Any) -> str:
    """The solver for a raw ``problem`` mapping that names none: newton for a residual, else fixed_point."""
    if isinstance(problem, dict) and (
        problem.get("residual") is not None or problem.get("form") == "residual"
    ):
        return DEFAULT_ROOT_SOLVER
    return DEFAULT_SOLVER


class SolverSpec(BaseModel):
    """The solver's name and its options (every other key is an option of that solver)."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(
        default=DEFAULT_SOLVER,
        description="default: newton for a problem given as a residual, else fixed_point",
    )

    @property
    def options(self) -> dict[str, Any]:
        """Solver options: every key other than ``name``."""
        return dict(self.model_extra or {})


def _memory_size(value: Any) -> int:
    return parse_memory(value)


class RunSpec(_Spec):
    """Tolerances, budgets, device and precision."""

    atol: Annotated[float, Field(ge=0)] | None = Field(
        default=None,
        description="absolute tolerance on ‖f(z)−z‖ (default 1e-10 float64, 1e-5 float32)",
    )
    rtol: Annotated[float, Field(ge=0)] = Field(
        default=0.0,
        description="times ‖g(z0)‖ (stop_mode abs) or times ‖f(z)‖ (stop_mode rel), added to atol",
    )
    stop_mode: Literal["abs", "rel"] = Field(
        default="abs",
        description="abs: ‖g‖ ≤ atol + rtol·‖g(z0)‖; rel: ‖g‖ ≤ atol + rtol·‖f(z)‖ (torchdeq's relative residual)",
    )
    max_iter: Annotated[int, Field(ge=0)] = 1000
    timeout: Annotated[float, Field(gt=0, description="wall-clock limit in seconds")] | None = None
    device: str = "cpu"
    dtype: Literal["float32", "float64"] = "float64"
    seed: int = 0
    keep_iterates: Annotated[int, Field(ge=4)] = 32
    check_every: (
        Annotated[
            int,
            Field(
                ge=1,
                le=32,
                description="iterations between stopping tests (default: 1 on the CPU, 8 on a "
                "GPU); a sample still stops at the first iteration that met the test",
            ),
        ]
        | None
    ) = None
    divergence_factor: Annotated[float, Field(gt=1)] = 1e8
    history_limit: Annotated[
        int,
        Field(ge=64, description="history rows kept before a long run's middle is thinned"),
    ] = 10_000
    max_memory: Annotated[
        int,
        BeforeValidator(_memory_size),
        WithJsonSchema(
            {
                "description": "most memory the problem's arrays, the solver's working set and "
                "one evaluation of an expression may need: bytes, or a size such as 8GiB or "
                "512MB (default 4GiB)",
                "anyOf": [{"type": "integer", "exclusiveMinimum": 0}, {"type": "string"}],
            }
        ),
    ] = DEFAULT_MAX_MEMORY
    max_work: Annotated[
        float,
        Field(
            gt=0,
            description="most operations one evaluation of an expression may take for the "
            "whole batch (default 1e8)",
        ),
    ] = DEFAULT_MAX_WORK

    @field_validator("device")
    @classmethod
    def _device_name(cls, value: str) -> str:
        from deqcli.device import DEVICE_PATTERN

        if not DEVICE_PATTERN.match(value):
            raise ValueError("unknown device; use auto, cpu, cuda, cuda:N or mps")
        return value


def _solver_shorthand(value: Any) -> Any:
    return {"name": value} if isinstance(value, str) else value


class Config(_Spec):
    """A whole deq configuration file."""

    problem: ProblemSpec
    solver: Annotated[
        SolverSpec,
        BeforeValidator(_solver_shorthand),
        WithJsonSchema(
            {
                "description": "a solver name, or {name: ..., <option>: ...}",
                "anyOf": [{"type": "string"}, SolverSpec.model_json_schema()],
            }
        ),
    ] = Field(default_factory=SolverSpec)
    run: RunSpec = Field(default_factory=RunSpec)
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _source: str = PrivateAttr(default="<config>")

    @model_validator(mode="before")
    @classmethod
    def _default_solver(cls, data: Any) -> Any:
        """Name the problem's default solver (see ``default_solver``) when the config names none."""
        if not isinstance(data, dict) or data.get("solver", {}) is None:
            return data
        current = _solver_shorthand(data.get("solver", {}))
        if isinstance(current, dict) and "name" not in current:
            data = {**data, "solver": {"name": default_solver(data.get("problem")), **current}}
        return data

    @property
    def base_dir(self) -> Path:
        """Directory that relative file paths in the config are resolved against."""
        return self._base_dir

    @property
    def source(self) -> str:
        """Where the config came from (a path, for messages)."""
        return self._source

    @property
    def problem_name(self) -> str:
        """The problem's name, or the config file's stem."""
        return self.problem.name or Path(self._source).stem

    @property
    def atol(self) -> float:
        """The absolute tolerance in effect (explicit, or the dtype's default)."""
        from deqcli.device import default_atol

        return self.run.atol if self.run.atol is not None else default_atol(self.run.dtype)

    def random_seed(self, key: str) -> int:
        """A seed for the random array at ``key``: run.seed mixed with the key so arrays differ."""
        return (self.run.seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


# -- loading -----------------------------------------------------------------------------------


def load_config(
    path: str | Path, overrides: list[str] | None = None, *, solver: str | None = None
) -> Config:
    """Read, override and validate a YAML config file (``-`` reads it from standard input).

    ``solver`` replaces the file's solver; the file's solver options are dropped when it names a
    different solver (they belong to that one), while ``--set solver.x=…`` overrides still apply.
    """
    text, base_dir = read_config_text(path)
    source = STDIN if str(path) == "-" else str(path)
    return parse_config(text, base_dir=base_dir, source=source, overrides=overrides, solver=solver)


# How a config read from standard input is named in messages (and, without a name, the problem).
STDIN = "stdin"


def read_config_text(path: str | Path) -> tuple[str, Path]:
    """A config file's text and the directory its relative paths are resolved against.

    ``-`` reads standard input; its relative paths then resolve against the current directory.
    """
    if str(path) == "-":
        try:
            # The same cap as for files: a pipe that never ends is refused, not read into memory.
            return read_capped(sys.stdin.buffer, "standard input"), Path.cwd()
        except OSError as exc:
            raise ConfigError("", f"cannot read the config from standard input: {exc}") from None
    p = Path(path)
    if not p.exists():
        raise ConfigError("", f"config file '{path}' does not exist")
    if p.is_dir():
        raise ConfigError("", f"'{path}' is a directory, not a config file")
    try:
        # Capped: a FIFO, /dev/zero or a huge file is refused without filling the memory.
        with p.open("rb") as fh:
            text = read_capped(fh, f"'{path}'")
    except OSError as exc:
        raise ConfigError("", f"cannot read '{path}': {exc.strerror or exc}") from None
    return text, p.resolve().parent


def parse_config(
    text: str,
    *,
    base_dir: Path | None = None,
    source: str = "<config>",
    overrides: list[str] | None = None,
    solver: str | None = None,
) -> Config:
    """Validate YAML text as a Config; errors name the key path and the YAML line."""
    # Bounded in depth, aliases and integer range; the key lines come from the same pass.
    raw, lines = load_document(text, source)
    if not isinstance(raw, dict):
        raise ConfigError("", f"{source}: expected a mapping with a 'problem' key at the top level")
    if solver is not None:
        current = _solver_shorthand(raw.get("solver", {}))
        named = (
            current.get("name", default_solver(raw.get("problem")))
            if isinstance(current, dict)
            else None
        )
        same = named == solver
        raw["solver"] = current if same else {"name": solver}
    for item in overrides or []:
        apply_override(raw, item)
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as exc:
        raise _config_error(exc, raw, lines) from None
    cfg._base_dir = base_dir or Path.cwd()
    cfg._source = source
    check_expressions(cfg, lines)
    return cfg


def load_yaml(text: str, source: str) -> Any:
    """A YAML document's value, read safely (``deqcli.yaml_reader``: bounded in depth, aliases
    and integers); malformed or refused YAML is a ConfigError naming the line."""
    return load_document(text, source)[0]


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in the YAML document to its 1-based line number ({} if it is not YAML)."""
    try:
        return load_document(text)[1]
    except ConfigError:
        return {}


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Apply ``a.b.c=value`` to the raw mapping; the value is read as a YAML scalar."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError("--set", f"expected key.path=value, got {item!r}")
    parsed = _scalar(value)
    if isinstance(raw.get("solver"), str):
        raw["solver"] = {"name": raw["solver"]}
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        elif not isinstance(nxt, dict):
            raise ConfigError(
                key, f"cannot set a key inside '{'.'.join(parts[: i + 1])}', which is not a mapping"
            )
        node = nxt
    node[parts[-1]] = parsed


NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _scalar(text: str) -> Any:
    """Parse a flag value as YAML, reading 1e-8 as a number (YAML 1.1 would keep it a string)."""
    if NUMBER.match(text.strip()):
        if any(c in text for c in ".eE"):
            return float(text)
        digits = text.strip().lstrip("+-")
        if len(digits) > 19 or not -INT_LIMIT <= int(digits) < INT_LIMIT:
            shown = text if len(text) <= 24 else f"{text[:12]}… ({len(digits)} digits)"
            raise ConfigError(
                "--set",
                f"integer {shown} is out of range (|n| < 2**63); write a large value as a float "
                "such as 1.0e30",
            )
        return int(text)
    try:
        value, _ = load_document(text, "--set value")
    except YamlSyntaxError:
        return text  # not YAML: the text itself (validation says whether a string fits)
    except ConfigError as exc:  # YAML, but refused for its shape (depth, aliases, range)
        raise ConfigError("--set", exc.message) from None
    return value


def _line_for(
    path: tuple[str, ...], lines: dict[tuple[str, ...], int], *, exact: bool = True
) -> int | None:
    """The YAML line of ``path``; with ``exact=False`` the nearest enclosing key's line.

    Exact by default: a value that came from a flag or ``--set`` has no line of its own, and the
    line of its section would point the user at the wrong place.
    """
    while path:
        if path in lines:
            return lines[path]
        if exact:
            return None
        path = path[:-1]
    return None


def _model_at(
    path: tuple[str, ...], raw: dict[str, Any], root: type[BaseModel] = Config
) -> type[BaseModel] | None:
    if not path:
        return root
    if path == ("run",):
        return RunSpec
    if path == ("problem",):
        kind = (
            (raw.get("problem") or {}).get("kind") if isinstance(raw.get("problem"), dict) else None
        )
        return PROBLEM_MODELS.get(kind) if isinstance(kind, str) else None
    return None


def _config_error(
    exc: ValidationError,
    raw: dict[str, Any],
    lines: dict[tuple[str, ...], int],
    root: type[BaseModel] = Config,
) -> ConfigError:
    """The first validation error as one line: the key, its YAML line, the fix (``root``: the
    model of the whole file)."""
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    if len(loc) >= 2 and loc[0] == "problem" and loc[1] in PROBLEM_MODELS:
        loc = (loc[0], *loc[2:])  # drop pydantic's discriminator tag
    loc = tuple(p for p in loc if not p.startswith("function-"))
    key = ".".join(loc)
    kind = err["type"]
    line = _line_for(loc, lines, exact=kind not in ("missing", "union_tag_not_found"))
    if kind == "extra_forbidden":
        parent, name = loc[:-1], loc[-1]
        model = _model_at(parent, raw, root)
        valid = list(model.model_fields) if model else []
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        listing = f" (valid keys: {', '.join(valid)})" if valid else ""
        return ConfigError(key, f"unknown key{hint}{listing}", line=line)
    if kind == "missing":
        return ConfigError(key, "required key is missing", line=line)
    if kind in ("union_tag_invalid", "union_tag_not_found"):
        return ConfigError(
            "problem.kind",
            f"unknown or missing problem kind; use one of {', '.join(PROBLEM_MODELS)}",
            line=_line_for(("problem", "kind"), lines),
        )
    msg = err["msg"].removeprefix("Value error, ")
    given = err.get("input")
    shown = "" if isinstance(given, (dict, list)) or given is None else f", got {given!r}"
    if shown and repr(given) in msg:
        shown = ""
    return ConfigError(key or "config", f"{msg}{shown}", line=line)


# -- static checks of expressions ------------------------------------------------------------


def check_expressions(cfg: Config, lines: dict[tuple[str, ...], int] | None = None) -> None:
    """Parse every expression in the config against the names it may use, and refuse problems
    whose arrays or expressions exceed run.max_memory / run.max_work where the config fixes the
    shapes (no torch needed; the build checks again with the actual shapes)."""
    from deqcli.limits import Limits

    spec = cfg.problem
    lines = lines or {}
    limits = Limits.of(cfg.run)
    itemsize = 4 if cfg.run.dtype == "float32" else 8

    def parse(
        text: str,
        path: tuple[str, ...],
        known: dict[str, Any],
        *,
        batch: int = 1,
        factor: float = 1.0,
    ) -> Any:
        """Parse, check the cost of one evaluation, and return what is known of its value."""
        key = ".".join(path)
        try:
            expr = parse_expression(text, key=key, names=set(known))
            cost = expr.cost(known)
            limits.check_expression(expr, known, batch=batch, itemsize=itemsize, factor=factor)
        except ExpressionError as exc:
            detail = str(exc).removeprefix(f"{key}: ")
            raise ConfigError(key, detail, line=_line_for(path, lines)) from None
        return cost.result

    if isinstance(spec, TanhLayerSpec):
        n, m, batch = spec.dim, spec.input_dim or spec.dim, _layer_batch(spec)
        _check_layer_size(spec, limits, itemsize, lines)
        known: dict[str, Any] = {"n": n, "m": m, "batch": batch}
        shapes = {"W": (n, n), "U": (n, m), "b": (n,), "x": (batch, m), "initial": (batch, n)}
        for field in ("W", "U", "b", "x", "initial"):
            value = getattr(spec, field)
            if isinstance(value, str):
                parse(value, ("problem", field), known)
            if value is not None:
                known[field] = shapes[field]
        return
    if isinstance(spec, PythonSpec):
        return
    if isinstance(spec, ModuleSpec):
        # Inputs, start and parameter values are data: expressions there use builders only.
        for field in ("inputs", "initial"):
            value = getattr(spec, field)
            if isinstance(value, str):
                parse(value, ("problem", field), {})
        for name, value in spec.params.items():
            if isinstance(value, str):
                parse(value, ("problem", "params", name), {})
        return
    dim = spec.dim or _static_dim(spec.initial)
    known = {"n": dim}
    shared: dict[str, Any] = {}
    batch = spec.batch or _static_rows(spec.initial)
    var = "w" if isinstance(spec, GradientDescentSpec) else "z"
    for group in ("params", "batch_params"):
        for name, value in getattr(spec, group).items():
            key, line = f"problem.{group}.{name}", _line_for(("problem", group, name), lines)
            if not name.isidentifier() or name.startswith("_"):
                message = "parameter names must be identifiers not starting with _"
                raise ConfigError(key, message, line=line)
            # The formula's own names would silently win over (z, w) or replace (n) the
            # parameter, and a name in both groups would keep only the per-sample value.
            if name in (var, "n"):
                meaning = "the unknown" if name == var else "the dimension of the unknown"
                message = f"'{name}' is {meaning} in the formulas; rename the parameter"
                raise ConfigError(key, message, line=line)
            if group == "batch_params" and name in spec.params:
                message = f"'{name}' is also in problem.params; keep it in one of them"
                raise ConfigError(key, message, line=line)
            if isinstance(value, str):
                result = parse(value, ("problem", group, name), known)
            else:
                result = _static_known(value)
            if group == "batch_params" and isinstance(result, tuple) and result:
                batch = batch or result[0]
                result = result[1:]  # one sample's row, as the map sees it
            known[name] = result
        if group == "params":
            shared = dict(known)
    batch = batch or 1
    if dim is not None:
        limits.check_bytes(
            2.0 * batch * dim * itemsize,
            f"a start of batch {batch} × n {dim} and its copies",
            key="problem.dim" if spec.dim else "problem.initial",
        )
    if isinstance(spec.initial, str):
        # The start is built before per-sample parameters are spread over the batch.
        parse(spec.initial, ("problem", "initial"), shared)
    known[var] = (dim,) if dim is not None else None
    if isinstance(spec, GradientDescentSpec):
        # The map evaluates the loss and its gradient: about three evaluations' work.
        parse(spec.loss, ("problem", "loss"), known, batch=batch, factor=3.0)
    else:
        field = "fixed_point" if spec.fixed_point is not None else "residual"
        parse(getattr(spec, field), ("problem", field), known, batch=batch)


def _static_known(value: Any) -> Any:
    """What the config itself fixes of an array spec: a number's value or a list's shape."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, list):
        try:
            return _check_rectangular(value)
        except ValueError:
            return None
    if isinstance(value, RandomArray) and value.shape is not None:
        return tuple(value.shape)
    return None


def _static_dim(initial: Any) -> int | None:
    """n as the build infers it from ``initial`` when ``dim`` is not given (None: unknown)."""
    known = _static_known(initial)
    if isinstance(known, tuple):
        return known[-1] if known else 1
    return 1 if known is not None else None


def _static_rows(initial: Any) -> int | None:
    known = _static_known(initial)
    return known[0] if isinstance(known, tuple) and len(known) == 2 else None


def _layer_batch(spec: TanhLayerSpec) -> int:
    """The layer's batch as the build infers it: ``batch``, else the rows of a (batch, m) x."""
    if spec.batch is not None:
        return spec.batch
    known = _static_known(spec.x)
    m = spec.input_dim or spec.dim
    return known[0] if isinstance(known, tuple) and len(known) == 2 and known[1] == m else 1


def _check_layer_size(
    spec: TanhLayerSpec, limits: Any, itemsize: int, lines: dict[tuple[str, ...], int]
) -> None:
    """The layer's arrays (W, U, b, x, the start), random draws made in float64, and the SVD
    behind ‖W‖₂, against run.max_memory."""
    n, m, batch = spec.dim, spec.input_dim or spec.dim, _layer_batch(spec)
    sizes = {"W": n * n, "U": n * m if spec.U is not None else 0, "b": n, "x": batch * m}
    sizes["initial"] = batch * n
    need = sum(sizes.values()) * itemsize + 3 * n * n * 8
    for field, count in sizes.items():
        if isinstance(getattr(spec, field), RandomArray):
            need += count * 8
    key = "problem.dim" if n * n >= batch * max(n, m) else "problem.batch"
    try:
        limits.check_bytes(
            need, f"dim {n}, input_dim {m}, batch {batch}: the layer's arrays", key=key
        )
    except ConfigError as exc:
        raise ConfigError(key, exc.message, line=_line_for(tuple(key.split(".")), lines)) from None


@dataclass(frozen=True)
class FileRef:
    """A file a config names: where (the dotted key) and the path as written in the config."""

    key: str  # e.g. problem.W, problem.params.A, problem.target
    name: str  # relative to the config's folder unless absolute

    def path(self, base_dir: Path) -> Path:
        """The file on this machine: ``name`` resolved against the config's folder."""
        path = Path(self.name)
        return path if path.is_absolute() else base_dir / path


def _file_slots(cfg: Config) -> Iterator[tuple[str, BaseModel, str]]:
    """Every (key, model, field) of the problem section whose value names a file.

    Any sub-model with a ``file`` field (an array file, a checkpoint) holds a path, and so does a
    code target written as ``path/to/file.py:factory``. New file-bearing keys are found here without
    a list to keep up to date, as long as they keep to those two forms.
    """
    spec = cfg.problem
    target = getattr(spec, "target", None)
    if isinstance(target, str) and target.rpartition(":")[0].endswith(".py"):
        yield "problem.target", spec, "target"

    def walk(value: Any, key: str) -> Iterator[tuple[str, BaseModel, str]]:
        if isinstance(value, BaseModel):
            if isinstance(getattr(value, "file", None), str) and "file" in type(value).model_fields:
                # An array given as {file: ...} is named by its own key; a checkpoint by its file.
                yield (key if isinstance(value, FileArray) else f"{key}.file"), value, "file"
                return
            for name in type(value).model_fields:
                yield from walk(getattr(value, name), f"{key}.{name}")
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(v, f"{key}.{k}")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from walk(v, f"{key}.{i}")

    for name in type(spec).model_fields:
        yield from walk(getattr(spec, name), f"problem.{name}")


def config_files(cfg: Config) -> list[FileRef]:
    """Every file the config names (arrays, checkpoints, a Python target), in config order.

    Files that the user's own code opens by itself are not listed: only the config knows its keys.
    """
    refs = []
    for key, model, field in _file_slots(cfg):
        value = getattr(model, field)
        refs.append(FileRef(key, value.rpartition(":")[0] if field == "target" else value))
    return refs


def relocate_files(cfg: Config, paths: Mapping[str, str]) -> Config:
    """A copy of ``cfg`` whose file names are replaced by ``paths[name]`` where given.

    Used where a config's files were copied to another place (a worker's file store): the copy
    reads the same bytes without the original folder.
    """
    moved = cfg.model_copy(deep=True)
    for _key, model, field in _file_slots(moved):
        value = getattr(model, field)
        if field == "target":
            where, _, attr = value.rpartition(":")
            if where in paths:
                setattr(model, field, f"{paths[where]}:{attr}")
        elif value in paths:
            setattr(model, field, paths[value])
    return moved


def check_files(cfg: Config) -> None:
    """Files the config names (arrays, a python target, weights) must exist; checked without loading them."""
    for ref in config_files(cfg):
        check_readable(ref.path(cfg.base_dir), ref.name, ref.key)


def check_readable(path: Path, name: str, key: str) -> None:
    """Raise a ConfigError under ``key`` unless the file a config names at ``path`` (written as
    ``name``) is a regular file.

    A directory fails to read anyway; a FIFO or a device would block the read (a FIFO with no
    writer waits forever) or never end, so only regular files are read.
    """
    if not path.exists():
        raise ConfigError(key, f"file '{name}' does not exist (looked in {path.parent})")
    if path.is_dir():
        raise ConfigError(key, f"'{name}' is a directory; name a file")
    if not path.is_file():
        raise ConfigError(key, f"'{name}' is not a regular file (a FIFO or a device?); name a file")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the config format, for editors."""
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "deq configuration"
    return schema


__all__ = [
    "Config",
    "ConfigError",
    "DeqError",
    "ExpressionSpec",
    "FileRef",
    "GradientDescentSpec",
    "ModuleSpec",
    "PythonSpec",
    "RunSpec",
    "SolverSpec",
    "TanhLayerSpec",
    "WeightsSpec",
    "apply_override",
    "check_files",
    "config_files",
    "default_solver",
    "json_schema",
    "load_config",
    "load_yaml",
    "parse_config",
    "read_config_text",
    "relocate_files",
]
