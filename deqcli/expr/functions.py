"""The function table and everything that runs at evaluation time.

The evaluation context, value helpers (numbers, tensors, sizes known before evaluation), arithmetic
on Python numbers with IEEE results, the operator implementations, and the table of functions
(``FunctionSpec`` with its arity, usage, meaning and implementation). torch is reached only through
the evaluation context, so importing this module does not import torch.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from deqcli.expr.errors import _UsageError

#: Largest number of elements a builder (arange, linspace, ones, zeros, eye, diag, outer) may create.
MAX_ELEMENTS = 10_000_000

#: Named constants.  A variable of the same name takes precedence.
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}

# Python ints are kept exact while they fit in int64, as torch would store them; beyond that they
# become floats, which also stops texts such as 9**9**9 from building enormous integers.
_INT_LIMIT = 2**63


# --------------------------------------------------------------------------------------------
# Evaluation context and value helpers
# --------------------------------------------------------------------------------------------


class _Context:
    """Everything a compiled closure needs at evaluation time."""

    __slots__ = ("device", "dtype", "env", "torch")

    def __init__(self, env: Mapping[str, Any], dtype: Any, device: Any, torch_module: Any) -> None:
        self.env = env
        self.dtype = dtype
        self.device = device
        self.torch = torch_module


Impl = Callable[[_Context, list[Any]], Any]

_TORCH_ATTRS: dict[str, Any] = {}


def _torch_attr(ctx: _Context, path: str) -> Any:
    """Resolve a dotted torch attribute such as ``nn.functional.softplus`` once and cache it."""
    fn = _TORCH_ATTRS.get(path)
    if fn is None:
        fn = ctx.torch
        for part in path.split("."):
            fn = getattr(fn, part)
        _TORCH_ATTRS[path] = fn
    return fn


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float))


def _describe(ctx: _Context, value: Any) -> str:
    if isinstance(value, bool):
        return "a condition"
    if _is_number(value):
        return "a number"
    if isinstance(value, ctx.torch.Tensor):
        if value.dim() == 0:
            return "a single number"
        return f"an array of shape {tuple(value.shape)}"
    return type(value).__name__


def _as_tensor(ctx: _Context, value: Any, dtype: Any = None) -> Any:
    """Python numbers become 0-d tensors of the evaluation dtype (bools stay bool)."""
    torch = ctx.torch
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, bool):
        return torch.tensor(value, device=ctx.device)
    return torch.tensor(value, dtype=dtype or ctx.dtype, device=ctx.device)


def _float_tensor(ctx: _Context, value: Any) -> Any:
    """A floating tensor: numbers, bools and integer tensors are converted to the dtype."""
    tensor = _as_tensor(ctx, value)
    if not (tensor.is_floating_point() or tensor.is_complex()):
        tensor = tensor.to(ctx.dtype)
    return tensor


def _first_float_dtype(ctx: _Context, values: list[Any]) -> Any:
    """The dtype numbers should take when joined with these values (concat, stack)."""
    for value in values:
        if isinstance(value, ctx.torch.Tensor) and value.is_floating_point():
            return value.dtype
    return ctx.dtype


def _static_number(ctx: _Context, value: Any, what: str) -> int | float:
    """A Python number known before evaluation: a constant, a parameter or a 0-d tensor.

    Sizes, shifts and builder bounds decide shapes, so they cannot depend on the iterate (under
    vmap that would be a data-dependent shape); ``item()`` fails there and we say why.
    """
    if isinstance(value, bool):
        raise _UsageError(f"{what} must be a number, got a condition")
    if _is_number(value):
        return value
    if isinstance(value, ctx.torch.Tensor):
        if value.dim() != 0:
            raise _UsageError(f"{what} must be a single number, got {_describe(ctx, value)}")
        try:
            item = value.item()
        except RuntimeError:
            raise _UsageError(
                f"{what} must be known before evaluation (a constant or a shared parameter such "
                "as n); it cannot depend on the iterate or on per-sample parameters"
            ) from None
        return _static_number(ctx, item, what)
    raise _UsageError(f"{what} must be a number, got {_describe(ctx, value)}")


def _whole(ctx: _Context, value: Any, what: str) -> int:
    """A whole number known before evaluation (integral floats such as n / 2 are accepted)."""
    number = _static_number(ctx, value, what)
    if isinstance(number, int):
        return number
    if number.is_integer():
        return int(number)
    raise _UsageError(f"{what} must be a whole number, got {number!r}")


def _check_elements(count: int) -> None:
    """Refuse oversized builders before anything is allocated."""
    if count > MAX_ELEMENTS:
        raise _UsageError(f"would create {count} elements; the limit is {MAX_ELEMENTS}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    line = text.splitlines()[0]
    return line if len(line) <= 240 else line[:237] + "..."


# --------------------------------------------------------------------------------------------
# Arithmetic on Python numbers (IEEE results instead of Python exceptions, as torch would give)
# --------------------------------------------------------------------------------------------


def _tidy(value: Any) -> Any:
    if isinstance(value, int) and not -_INT_LIMIT <= value < _INT_LIMIT:
        try:
            return float(value)
        except OverflowError:
            return math.inf if value > 0 else -math.inf
    if isinstance(value, complex):
        return math.nan
    return value


def _divided_by_zero(a: float, b: float) -> float:
    if a == 0 or math.isnan(a):
        return math.nan
    return math.copysign(math.inf, a) * math.copysign(1.0, b)


def _py_div(a: Any, b: Any) -> Any:
    try:
        return _tidy(a / b)
    except ZeroDivisionError:
        return _divided_by_zero(a, b)


def _py_floordiv(a: Any, b: Any) -> Any:
    try:
        return _tidy(a // b)
    except ZeroDivisionError:
        return _divided_by_zero(a, b)


def _py_mod(a: Any, b: Any) -> Any:
    try:
        return _tidy(a % b)
    except ZeroDivisionError:
        return math.nan


def _py_pow(a: Any, b: Any) -> Any:
    # Exact integer powers only while the result can fit in int64.
    if (
        isinstance(a, int)
        and isinstance(b, int)
        and b >= 0
        and (abs(a) <= 1 or b * math.log2(abs(a)) < 64)
    ):
        return _tidy(a**b)
    x, y = float(a), float(b)
    odd = y.is_integer() and y % 2 == 1
    try:
        result = x**y
    except ZeroDivisionError:  # 0.0 ** negative
        return -math.inf if odd and math.copysign(1.0, x) < 0 else math.inf
    except OverflowError:
        return -math.inf if odd and x < 0 else math.inf
    return _tidy(result)


def _check_condition(ctx: _Context, value: Any, symbol: str) -> None:
    if isinstance(value, bool):
        return
    if isinstance(value, ctx.torch.Tensor) and value.dtype == ctx.torch.bool:
        return
    raise _UsageError(
        f"'{symbol}' combines conditions such as (z > 0) {symbol} (z < 1), "
        f"got {_describe(ctx, value)}"
    )


def _matmul(ctx: _Context, a: Any, b: Any) -> Any:
    torch = ctx.torch
    for side, value in (("left", a), ("right", b)):
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            raise _UsageError(f"'@' needs a vector or matrix on the {side}, got a number")
    return a @ b


def _logical(symbol: str) -> Callable[[_Context, Any, Any], Any]:
    def combine(ctx: _Context, a: Any, b: Any) -> Any:
        _check_condition(ctx, a, symbol)
        _check_condition(ctx, b, symbol)
        if isinstance(a, bool) and isinstance(b, bool):
            return (a and b) if symbol == "&" else (a or b)
        return (a & b) if symbol == "&" else (a | b)

    return combine


def _arith(
    py: Callable[[Any, Any], Any], tensor_op: Callable[[Any, Any], Any]
) -> Callable[[_Context, Any, Any], Any]:
    def apply(ctx: _Context, a: Any, b: Any) -> Any:
        if _is_number(a) and _is_number(b):
            return py(a, b)
        return tensor_op(a, b)

    return apply


# symbol -> implementation taking (ctx, left, right)
_BINARY: dict[str, Callable[[_Context, Any, Any], Any]] = {
    "+": _arith(lambda a, b: _tidy(a + b), operator.add),
    "-": _arith(lambda a, b: _tidy(a - b), operator.sub),
    "*": _arith(lambda a, b: _tidy(a * b), operator.mul),
    "/": _arith(_py_div, operator.truediv),
    "//": _arith(_py_floordiv, operator.floordiv),
    "%": _arith(_py_mod, operator.mod),
    "**": _arith(_py_pow, operator.pow),
    "@": _matmul,
    "&": _logical("&"),
    "|": _logical("|"),
    "<": _arith(operator.lt, operator.lt),
    "<=": _arith(operator.le, operator.le),
    ">": _arith(operator.gt, operator.gt),
    ">=": _arith(operator.ge, operator.ge),
    "==": _arith(operator.eq, operator.eq),
    "!=": _arith(operator.ne, operator.ne),
}


def _negate(ctx: _Context, value: Any) -> Any:
    return _tidy(-value) if _is_number(value) else -value


def _positive(ctx: _Context, value: Any) -> Any:
    return +value


def _invert(ctx: _Context, value: Any) -> Any:
    is_bool_tensor = isinstance(value, ctx.torch.Tensor) and value.dtype == ctx.torch.bool
    if not (isinstance(value, bool) or is_bool_tensor):
        raise _UsageError(f"'~' negates a condition such as ~(z > 0), got {_describe(ctx, value)}")
    if isinstance(value, bool):
        return not value
    return ctx.torch.logical_not(value)


# --------------------------------------------------------------------------------------------
# The function table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FunctionSpec:
    """One entry of the function table: arity, usage and a one-line meaning."""

    name: str
    min_args: int
    max_args: int | None  # None: any number of arguments from min_args up
    usage: str
    summary: str
    category: str
    impl: Impl = field(repr=False, compare=False)

    def arity_text(self) -> str:
        """'1 argument', '1 or 2 arguments', 'from 1 to 3 arguments', 'at least 1 argument'."""

        def plural(k: int) -> str:
            return f"{k} argument" if k == 1 else f"{k} arguments"

        if self.max_args is None:
            return f"at least {plural(self.min_args)}"
        if self.min_args == self.max_args:
            return plural(self.min_args)
        if self.max_args == self.min_args + 1:
            return f"{self.min_args} or {plural(self.max_args)}"
        return f"from {self.min_args} to {plural(self.max_args)}"


def _elementwise(path: str) -> Impl:
    def impl(ctx: _Context, args: list[Any]) -> Any:
        return _torch_attr(ctx, path)(_float_tensor(ctx, args[0]))

    return impl


def _reduction(path: str) -> Impl:
    def impl(ctx: _Context, args: list[Any]) -> Any:
        # No dim argument: reduce over every element of the (per-sample, under vmap) argument.
        return _torch_attr(ctx, path)(_float_tensor(ctx, args[0]))

    return impl


def _cumulative(path: str) -> Impl:
    def impl(ctx: _Context, args: list[Any]) -> Any:
        return _torch_attr(ctx, path)(_float_tensor(ctx, args[0]), 0)

    return impl


def _extreme(reduce_path: str, pair_path: str) -> Impl:
    def impl(ctx: _Context, args: list[Any]) -> Any:
        if len(args) == 1:
            return _torch_attr(ctx, reduce_path)(_float_tensor(ctx, args[0]))
        return _torch_attr(ctx, pair_path)(_float_tensor(ctx, args[0]), _float_tensor(ctx, args[1]))

    return impl


def _norm(ctx: _Context, args: list[Any]) -> Any:
    order: int | float = 2
    if len(args) == 2:
        order = _static_number(ctx, args[1], "the order")
        if math.isnan(order):
            raise _UsageError("the order must be a number, got nan")
    return ctx.torch.linalg.vector_norm(_float_tensor(ctx, args[0]), order)


def _finite_bound(ctx: _Context, value: Any, what: str) -> int | float:
    number = _static_number(ctx, value, what)
    if not math.isfinite(number):
        raise _UsageError(f"{what} must be finite, got {number!r}")
    return number


def _arange(ctx: _Context, args: list[Any]) -> Any:
    if len(args) == 1:
        start: int | float = 0
        stop = _finite_bound(ctx, args[0], "stop")
        step: int | float = 1
    else:
        start = _finite_bound(ctx, args[0], "start")
        stop = _finite_bound(ctx, args[1], "stop")
        step = _finite_bound(ctx, args[2], "step") if len(args) == 3 else 1
    if step == 0:
        raise _UsageError("step must not be zero")
    span = (stop - start) / step
    if span > MAX_ELEMENTS:
        raise _UsageError(
            f"would create more than {MAX_ELEMENTS} elements; the limit is {MAX_ELEMENTS}"
        )
    count = math.ceil(span)
    if count < 0:
        raise _UsageError(
            f"stop {stop!r} cannot be reached from start {start!r} with step {step!r}"
        )
    _check_elements(count)
    return ctx.torch.arange(start, stop, step, dtype=ctx.dtype, device=ctx.device)


def _linspace(ctx: _Context, args: list[Any]) -> Any:
    start = _finite_bound(ctx, args[0], "start")
    stop = _finite_bound(ctx, args[1], "stop")
    count = _whole(ctx, args[2], "count")
    if count < 0:
        raise _UsageError(f"count must not be negative, got {count}")
    _check_elements(count)
    return ctx.torch.linspace(start, stop, count, dtype=ctx.dtype, device=ctx.device)


def _sizes(ctx: _Context, args: list[Any]) -> list[int]:
    labels = ["size"] if len(args) == 1 else ["rows", "columns"]
    sizes = [_whole(ctx, value, label) for value, label in zip(args, labels, strict=True)]
    for size, label in zip(sizes, labels, strict=True):
        if size < 0:
            raise _UsageError(f"{label} must not be negative, got {size}")
    _check_elements(math.prod(sizes))
    return sizes


def _filled(path: str, square: bool = False) -> Impl:
    def impl(ctx: _Context, args: list[Any]) -> Any:
        # eye(k) is k x k; ones(k) and zeros(k) are vectors.
        sizes = _sizes(ctx, args * 2 if square and len(args) == 1 else args)
        return _torch_attr(ctx, path)(*sizes, dtype=ctx.dtype, device=ctx.device)

    return impl


def _diag(ctx: _Context, args: list[Any]) -> Any:
    x = _as_tensor(ctx, args[0])
    if x.dim() == 1:
        _check_elements(x.shape[0] * x.shape[0])
        # diag_embed/diagonal rather than torch.diag: they batch cleanly under vmap.
        return ctx.torch.diag_embed(x)
    if x.dim() == 2:
        return ctx.torch.diagonal(x)
    raise _UsageError(f"takes a vector or a matrix, got {_describe(ctx, x)}")


def _outer(ctx: _Context, args: list[Any]) -> Any:
    a = _float_tensor(ctx, args[0]).reshape(-1)
    b = _float_tensor(ctx, args[1]).reshape(-1)
    _check_elements(a.shape[0] * b.shape[0])
    return a.unsqueeze(1) * b.unsqueeze(0)


def _where(ctx: _Context, args: list[Any]) -> Any:
    torch = ctx.torch
    cond, a, b = args
    if _is_number(cond):
        cond = torch.tensor(bool(cond), device=ctx.device)
    elif cond.dtype != torch.bool:
        cond = cond != 0
    dtype = _first_float_dtype(ctx, [a, b])
    return torch.where(cond, _as_tensor(ctx, a, dtype), _as_tensor(ctx, b, dtype))


def _clamp(ctx: _Context, args: list[Any]) -> Any:
    x = _float_tensor(ctx, args[0])
    lo = _as_tensor(ctx, args[1], x.dtype)
    hi = _as_tensor(ctx, args[2], x.dtype)
    return ctx.torch.clamp(x, lo, hi)


def _roll(ctx: _Context, args: list[Any]) -> Any:
    x = _as_tensor(ctx, args[0])
    shift = _whole(ctx, args[1], "shift")
    if x.dim() == 0:
        return x
    return ctx.torch.roll(x, shift, 0)


def _join(ctx: _Context, args: list[Any], stack: bool) -> Any:
    dtype = _first_float_dtype(ctx, args)
    tensors = [_as_tensor(ctx, value, dtype) for value in args]
    if stack:
        return ctx.torch.stack(tensors, 0)
    # Single numbers join as one-element vectors, so concat(z, 0) appends a zero.
    tensors = [t.reshape(1) if t.dim() == 0 else t for t in tensors]
    return ctx.torch.cat(tensors, 0)


def _dot(ctx: _Context, args: list[Any]) -> Any:
    a = _float_tensor(ctx, args[0])
    b = _float_tensor(ctx, args[1])
    if a.dim() != 1 or b.dim() != 1:
        raise _UsageError(f"takes two vectors, got {_describe(ctx, a)} and {_describe(ctx, b)}")
    if a.shape != b.shape:
        raise _UsageError(f"vectors have different lengths {a.shape[0]} and {b.shape[0]}")
    return (a * b).sum()


def _transpose(ctx: _Context, args: list[Any]) -> Any:
    x = _as_tensor(ctx, args[0])
    if x.dim() > 2:
        raise _UsageError(f"takes a vector or a matrix, got {_describe(ctx, x)}")
    return ctx.torch.t(x)


def _atan2(ctx: _Context, args: list[Any]) -> Any:
    return ctx.torch.atan2(_float_tensor(ctx, args[0]), _float_tensor(ctx, args[1]))


def _pow(ctx: _Context, args: list[Any]) -> Any:
    return _BINARY["**"](ctx, args[0], args[1])


def _logsumexp(ctx: _Context, args: list[Any]) -> Any:
    x = _float_tensor(ctx, args[0])
    return ctx.torch.logsumexp(x.reshape(-1), 0)


def _softmax(ctx: _Context, args: list[Any]) -> Any:
    x = _float_tensor(ctx, args[0])
    return ctx.torch.softmax(x.reshape(-1), 0).reshape(x.shape)


def _concat(ctx: _Context, args: list[Any]) -> Any:
    return _join(ctx, args, stack=False)


def _stack(ctx: _Context, args: list[Any]) -> Any:
    return _join(ctx, args, stack=True)


# (name, arity, usage, one-line meaning, implementation); arity "a-b" is a range, "a+" open-ended.
_ELEMENTWISE: list[tuple[str, str, str]] = [
    ("sin", "sin", "sine"),
    ("cos", "cos", "cosine"),
    ("tan", "tan", "tangent"),
    ("asin", "asin", "inverse sine"),
    ("acos", "acos", "inverse cosine"),
    ("atan", "atan", "inverse tangent"),
    ("sinh", "sinh", "hyperbolic sine"),
    ("cosh", "cosh", "hyperbolic cosine"),
    ("tanh", "tanh", "hyperbolic tangent"),
    ("exp", "exp", "exponential"),
    ("expm1", "expm1", "exp(x) - 1, accurate for small x"),
    ("log", "log", "natural logarithm"),
    ("log1p", "log1p", "log(1 + x), accurate for small x"),
    ("log2", "log2", "base-2 logarithm"),
    ("log10", "log10", "base-10 logarithm"),
    ("sqrt", "sqrt", "square root"),
    ("abs", "abs", "absolute value"),
    ("sign", "sign", "-1, 0 or 1 by the sign of x"),
    ("sigmoid", "sigmoid", "logistic function 1 / (1 + exp(-x))"),
    ("relu", "relu", "max(x, 0)"),
    ("softplus", "nn.functional.softplus", "log(1 + exp(x)), a smooth relu"),
    ("erf", "erf", "error function"),
    ("floor", "floor", "largest whole number <= x"),
    ("ceil", "ceil", "smallest whole number >= x"),
    ("square", "square", "x * x"),
    ("reciprocal", "reciprocal", "1 / x"),
]
_REDUCTIONS: list[tuple[str, str, str, str, Impl]] = [
    ("sum", "1", "sum(x)", "sum of all elements", _reduction("sum")),
    ("prod", "1", "prod(x)", "product of all elements", _reduction("prod")),
    ("mean", "1", "mean(x)", "mean of all elements", _reduction("mean")),
    ("norm", "1-2", "norm(x) / norm(x, ord)", "2-norm of all elements, or the ord-norm", _norm),
    (
        "max",
        "1-2",
        "max(x) / max(a, b)",
        "largest element / elementwise maximum",
        _extreme("max", "maximum"),
    ),
    (
        "min",
        "1-2",
        "min(x) / min(a, b)",
        "smallest element / elementwise minimum",
        _extreme("min", "minimum"),
    ),
    ("cumsum", "1", "cumsum(x)", "running sum along the first axis", _cumulative("cumsum")),
    ("cumprod", "1", "cumprod(x)", "running product along the first axis", _cumulative("cumprod")),
]
_BUILDERS: list[tuple[str, str, str, str, Impl]] = [
    (
        "arange",
        "1-3",
        "arange(stop) / arange(start, stop[, step])",
        "start, start + step, ... below stop",
        _arange,
    ),
    (
        "linspace",
        "3",
        "linspace(start, stop, count)",
        "count values from start to stop inclusive",
        _linspace,
    ),
    ("ones", "1-2", "ones(k) / ones(r, c)", "vector or matrix of ones", _filled("ones")),
    (
        "zeros",
        "1-2",
        "zeros(k) / zeros(r, c)",
        "vector or matrix of zeros",
        _filled("zeros"),
    ),
    ("eye", "1-2", "eye(k) / eye(r, c)", "identity matrix", _filled("eye", square=True)),
    ("diag", "1", "diag(v)", "vector -> diagonal matrix; matrix -> its diagonal", _diag),
    ("outer", "2", "outer(a, b)", "outer product a_i * b_j (arguments flattened)", _outer),
]
_OTHERS: list[tuple[str, str, str, str, Impl]] = [
    ("where", "3", "where(cond, a, b)", "a where cond holds, else b (elementwise)", _where),
    ("clamp", "3", "clamp(x, lo, hi)", "x limited to the interval [lo, hi]", _clamp),
    ("roll", "2", "roll(x, shift)", "rotate along the first axis by a whole number", _roll),
    ("concat", "1+", "concat(a, b, ...)", "join along the first axis", _concat),
    ("stack", "1+", "stack(a, b, ...)", "stack equal shapes along a new first axis", _stack),
    ("dot", "2", "dot(a, b)", "inner product of two vectors of equal length", _dot),
    ("transpose", "1", "transpose(A)", "matrix transpose (vectors unchanged)", _transpose),
    ("atan2", "2", "atan2(a, b)", "angle of the point (b, a), elementwise", _atan2),
    ("pow", "2", "pow(a, b)", "a ** b", _pow),
    ("logsumexp", "1", "logsumexp(x)", "log(sum(exp(x))) over all elements, stably", _logsumexp),
    ("softmax", "1", "softmax(x)", "exp(x) / sum(exp(x)) over all elements, stably", _softmax),
]


def _arity(text: str) -> tuple[int, int | None]:
    if text.endswith("+"):
        return int(text[:-1]), None
    low, _, high = text.partition("-")
    return int(low), int(high or low)


def _specs() -> dict[str, FunctionSpec]:
    specs: dict[str, FunctionSpec] = {}
    for name, path, summary in _ELEMENTWISE:
        specs[name] = FunctionSpec(
            name, 1, 1, f"{name}(x)", summary, "elementwise", _elementwise(path)
        )
    groups = (("reduction", _REDUCTIONS), ("builder", _BUILDERS), ("other", _OTHERS))
    for category, rows in groups:
        for name, arity, usage, summary, impl in rows:
            low, high = _arity(arity)
            specs[name] = FunctionSpec(name, low, high, usage, summary, category, impl)
    return specs


#: The function table by name (read-only).
FUNCTION_SPECS: Mapping[str, FunctionSpec] = MappingProxyType(_specs())
#: Names of all callable functions.
FUNCTIONS: frozenset[str] = frozenset(FUNCTION_SPECS)
