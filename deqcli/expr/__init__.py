"""The safe expression language used in configs.

Configs define maps, residuals, losses, starting points and parameters as text such as
``tanh(W @ z + x)`` or ``outer(arange(1, n + 1), ones(n)) / (2 * n)``.  The text is parsed with
:mod:`ast` in ``eval`` mode, every node is checked against a whitelist and a fixed function table,
and the tree is compiled into nested closures that call torch.  Nothing is ever handed to
``eval``/``exec``/``compile``, there is no attribute access, and no name outside the table and the
declared variables can be reached.

Parsing never imports torch (``deq validate`` and ``deq --help`` stay light); torch is imported the
first time an expression is evaluated.  Because evaluation is plain torch code, autodiff,
``torch.func.vmap``, devices and dtypes work as they do for hand-written torch functions.
"""

from __future__ import annotations

import ast
import difflib
import math
import operator
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONSTANTS",
    "FUNCTIONS",
    "FUNCTION_SPECS",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "MAX_TEXT_LENGTH",
    "Expression",
    "ExpressionError",
    "FunctionSpec",
    "parse_expression",
]

#: Longest accepted expression text, in characters.
MAX_TEXT_LENGTH = 4000
#: Deepest accepted nesting of operators, calls and subscripts (a flat chain a + b + c is one level).
MAX_DEPTH = 64
#: Largest number of elements a builder (arange, linspace, ones, zeros, eye, diag, outer) may create.
MAX_ELEMENTS = 10_000_000

#: Named constants.  A variable of the same name takes precedence.
CONSTANTS: dict[str, float] = {"pi": math.pi, "e": math.e}

# Python ints are kept exact while they fit in int64, as torch would store them; beyond that they
# become floats, which also stops texts such as 9**9**9 from building enormous integers.
_INT_LIMIT = 2**63


# --------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------


class ExpressionError(ValueError):
    """A one-line, user-facing problem with an expression.

    Attributes:
        key: the config key path the expression came from, e.g. ``problem.fixed_point``.
        message: what is wrong, without the key or the location.
        column: 1-based column of the offending token in its line, or None.
        token: the offending token as written, or None.
        suggestion: how to fix it (e.g. ``did you mean 'cos'?``), or None.
        detail: further explanation that follows the location (e.g. torch's own message), or None.
        line: 1-based line number for multi-line texts, or None for single-line texts.

    ``str(err)`` is one line: ``key: message at column C: detail; suggestion``.
    """

    def __init__(
        self,
        key: str,
        message: str,
        *,
        column: int | None = None,
        token: str | None = None,
        suggestion: str | None = None,
        detail: str | None = None,
        line: int | None = None,
    ) -> None:
        self.key = key
        self.message = message
        self.column = column
        self.token = token
        self.suggestion = suggestion
        self.detail = detail
        self.line = line
        super().__init__(self._render())

    def _render(self) -> str:
        text = f"{self.key}: {self.message}"
        if self.column is not None:
            if self.line is not None:
                text += f" at line {self.line}, column {self.column}"
            else:
                text += f" at column {self.column}"
        if self.detail:
            text += f": {self.detail}"
        if self.suggestion:
            text += f"; {self.suggestion}"
        # The contract is one line, whatever torch or the user's text put into the parts.
        return " ".join(text.split())

    def __str__(self) -> str:
        return self._render()

    def __reduce__(self) -> tuple[Any, ...]:
        state = {
            "column": self.column,
            "token": self.token,
            "suggestion": self.suggestion,
            "detail": self.detail,
            "line": self.line,
        }
        return (_restore_error, (self.key, self.message, state))


def _restore_error(key: str, message: str, state: dict[str, Any]) -> ExpressionError:
    """Rebuild an ExpressionError after pickling (keyword-only fields need this)."""
    return ExpressionError(key, message, **state)


class _UsageError(Exception):
    """Raised by function implementations; the calling node adds key, column and token."""


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


Closure = Callable[[_Context], Any]
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

_BINOP_SYMBOLS: dict[type, str] = {
    ast.Add: "+",
    ast.Sub: "-",
    ast.Mult: "*",
    ast.Div: "/",
    ast.FloorDiv: "//",
    ast.Mod: "%",
    ast.Pow: "**",
    ast.MatMult: "@",
    ast.BitAnd: "&",
    ast.BitOr: "|",
}
_FORBIDDEN_BINOPS: dict[type, tuple[str, str | None]] = {
    ast.BitXor: ("^", "use ** for powers"),
    ast.LShift: ("<<", None),
    ast.RShift: (">>", None),
}
_COMPARE_SYMBOLS: dict[type, str] = {
    ast.Lt: "<",
    ast.LtE: "<=",
    ast.Gt: ">",
    ast.GtE: ">=",
    ast.Eq: "==",
    ast.NotEq: "!=",
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


# --------------------------------------------------------------------------------------------
# The compiler: ast -> validated closures
# --------------------------------------------------------------------------------------------

_RUNTIME_ERRORS = (
    _UsageError,
    RuntimeError,
    TypeError,
    ValueError,
    IndexError,
    ZeroDivisionError,
    OverflowError,
)

_ATTRIBUTE_HINTS = {"T": "transpose", "mT": "transpose", "t": "transpose", "transpose": "transpose"}
_MODULE_NAMES = frozenset({"torch", "math", "np", "numpy", "F", "scipy"})


@dataclass(frozen=True)
class _Site:
    """Where a runtime operation sits in the text, for its error messages."""

    key: str
    what: str
    token: str | None
    column: int | None
    line: int | None
    # Function messages read "ones(): size must ..."; operator messages already name the symbol.
    prefix: bool = False

    def fail(self, exc: BaseException) -> ExpressionError:
        if isinstance(exc, _UsageError):
            return ExpressionError(
                self.key,
                f"{self.what}: {exc}" if self.prefix else str(exc),
                column=self.column,
                token=self.token,
                line=self.line,
            )
        return ExpressionError(
            self.key,
            f"cannot evaluate {self.what}",
            column=self.column,
            token=self.token,
            line=self.line,
            detail=_first_line(exc),
        )


def _split_lines(text: str) -> list[str]:
    # The tokenizer's own notion of a line break (not str.splitlines, which knows many more).
    return re.split(r"\r\n|\r|\n", text)


class _Compiler:
    def __init__(self, text: str, key: str, names: frozenset[str], line_shift: int, col_shift: int):
        self.text = text
        self.key = key
        self.names = names
        self.lines = _split_lines(text)
        self.multiline = len(self.lines) > 1 or line_shift > 0
        self.line_shift = line_shift
        self.col_shift = col_shift
        self.used: set[str] = set()

    # ---- locations and errors ------------------------------------------------------------

    def _location(self, lineno: int, char_col: int) -> tuple[int | None, int]:
        column = char_col + 1 + (self.col_shift if lineno == 1 else 0)
        line = lineno + self.line_shift if self.multiline else None
        return line, column

    def _char_col(self, lineno: int, byte_col: int) -> int:
        # ast columns are UTF-8 byte offsets; users count characters.
        if 1 <= lineno <= len(self.lines):
            return len(self.lines[lineno - 1].encode("utf-8")[:byte_col].decode("utf-8", "replace"))
        return byte_col

    def _node_location(self, node: ast.AST) -> tuple[int | None, int | None]:
        lineno = getattr(node, "lineno", None)
        col = getattr(node, "col_offset", None)
        if lineno is None or col is None:
            return None, None
        return self._location(lineno, self._char_col(lineno, col))

    def _segment(self, node: ast.AST) -> str:
        try:
            segment = ast.get_source_segment(self.text, node)
        except (ValueError, IndexError, TypeError):
            segment = None
        return segment if segment else "x"

    def error(
        self,
        node: ast.AST | None,
        message: str,
        *,
        token: str | None = None,
        suggestion: str | None = None,
        at: tuple[int | None, int | None] | None = None,
    ) -> ExpressionError:
        line, column = at if at is not None else self._node_location(node) if node else (None, None)
        return ExpressionError(
            self.key, message, column=column, token=token, suggestion=suggestion, line=line
        )

    def site(self, node: ast.AST, what: str, token: str | None) -> _Site:
        line, column = self._node_location(node)
        return _Site(self.key, what, token, column, line)

    def _find_symbol(
        self, symbol: str, after: ast.AST, before: ast.AST
    ) -> tuple[int | None, int | None]:
        """Location of an operator written between two operands on one line, else the left one."""
        lineno = getattr(after, "end_lineno", None)
        if lineno is not None and lineno == getattr(before, "lineno", None):
            line_text = self.lines[lineno - 1] if lineno <= len(self.lines) else ""
            start = self._char_col(lineno, after.end_col_offset or 0)
            stop = self._char_col(lineno, before.col_offset)
            index = line_text.find(symbol, start, stop)
            if index >= 0:
                return self._location(lineno, index)
        return self._node_location(after)

    def _suggest(self, word: str, pool: Iterable[str]) -> str | None:
        candidates = sorted(pool)
        # Case slips (w for W) are the commonest typo; difflib alone scores them poorly.
        for candidate in candidates:
            if candidate.lower() == word.lower():
                return candidate
        # So are swapped letters (tahn for tanh), which difflib ranks below shorter names (tan).
        for candidate in candidates:
            if len(candidate) > 2 and sorted(candidate) == sorted(word):
                return candidate
        matches = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
        return matches[0] if matches else None

    def _known_names(self) -> str:
        visible = sorted(n for n in self.names if n.isidentifier() and not n.startswith("__"))
        if not visible:
            return "no variables are available here"
        shown = ", ".join(visible[:20]) + (", ..." if len(visible) > 20 else "")
        return f"known names: {shown}"

    # ---- dispatch ------------------------------------------------------------------------

    def compile(self, node: ast.AST) -> Closure:
        handler = self._HANDLERS.get(type(node))
        if handler is None:
            raise self._forbidden(node)
        return handler(self, node)

    def _forbidden(self, node: ast.AST) -> ExpressionError:
        if isinstance(node, ast.Attribute):
            return self._attribute_error(node)
        messages: dict[type, tuple[str, str | None]] = {
            ast.Lambda: ("lambda is not allowed", None),
            ast.ListComp: ("comprehensions are not allowed", "use sum(), stack() or concat()"),
            ast.SetComp: ("comprehensions are not allowed", None),
            ast.DictComp: ("comprehensions are not allowed", None),
            ast.GeneratorExp: ("generator expressions are not allowed", None),
            ast.JoinedStr: ("f-strings are not allowed", None),
            ast.FormattedValue: ("f-strings are not allowed", None),
            ast.NamedExpr: ("assignment expressions (':=') are not allowed", None),
            ast.IfExp: ("conditional expressions are not allowed", "use where(cond, a, b)"),
            ast.BoolOp: (
                "'and' / 'or' are not allowed",
                "use & or | between parenthesized comparisons, e.g. (z > 0) & (z < 1)",
            ),
            ast.List: (
                "list literals are not allowed",
                "use stack(a, b, ...) or concat(a, b, ...)",
            ),
            ast.Tuple: ("tuples are not allowed outside indexing", None),
            ast.Dict: ("dict literals are not allowed", None),
            ast.Set: ("set literals are not allowed", None),
            ast.Starred: ("starred arguments ('*') are not allowed", None),
            ast.Await: ("'await' is not allowed", None),
            ast.Yield: ("'yield' is not allowed", None),
            ast.YieldFrom: ("'yield' is not allowed", None),
            ast.Slice: ("slices are only allowed inside [ ]", None),
        }
        message, suggestion = messages.get(
            type(node), (f"{type(node).__name__} expressions are not allowed", None)
        )
        return self.error(node, message, suggestion=suggestion)

    def _attribute_error(self, node: ast.Attribute) -> ExpressionError:
        # Point at the dot itself ("A.T" -> column 2), falling back to the start of the value.
        at = self._node_location(node.value)
        lineno = node.value.end_lineno
        if lineno is not None and lineno <= len(self.lines):
            start = self._char_col(lineno, node.value.end_col_offset or 0)
            index = self.lines[lineno - 1].find(".", start)
            if index >= 0:
                at = self._location(lineno, index)
        attr = node.attr
        base = self._segment(node.value)
        if attr.startswith("__"):
            suggestion = "names starting with '__' are not allowed"
        elif attr in _ATTRIBUTE_HINTS:
            suggestion = f"use transpose({base})"
        elif attr in FUNCTIONS:
            if isinstance(node.value, ast.Name) and node.value.id in _MODULE_NAMES:
                suggestion = f"use {attr}(...) directly"
            else:
                suggestion = f"use {attr}({base})"
        else:
            suggestion = "only the functions in the table can be used"
        return self.error(
            node,
            f"attribute access '.{attr}' is not allowed",
            token=f".{attr}",
            suggestion=suggestion,
            at=at,
        )

    # ---- leaves --------------------------------------------------------------------------

    def _constant(self, node: ast.Constant) -> Closure:
        value = node.value
        if isinstance(value, bool):
            raise self.error(
                node,
                f"{value} is not supported",
                token=str(value),
                suggestion="use a comparison such as z > 0",
            )
        if isinstance(value, (int, float)):
            number = _tidy(value)
            return lambda ctx: number
        if isinstance(value, str):
            raise self.error(node, "strings are not allowed", token=repr(value)[:40])
        if isinstance(value, bytes):
            raise self.error(node, "byte strings are not allowed")
        if isinstance(value, complex):
            raise self.error(node, "complex numbers are not supported", token=repr(value))
        if value is None:
            raise self.error(node, "None is not allowed", token="None")
        if value is Ellipsis:
            raise self.error(node, "'...' is not allowed", token="...")
        raise self.error(node, f"{type(value).__name__} literals are not allowed")

    def _name(self, node: ast.Name) -> Closure:
        name = node.id
        if name.startswith("__"):
            raise self.error(
                node,
                f"name '{name}' is not allowed (names starting with '__' are reserved)",
                token=name,
            )
        if name in self.names:
            self.used.add(name)
            return self._variable(node, name)
        if name in CONSTANTS:
            value = CONSTANTS[name]
            return lambda ctx: value
        if name in FUNCTIONS:
            raise self.error(
                node,
                f"function '{name}' must be called",
                token=name,
                suggestion=f"write {FUNCTION_SPECS[name].usage.split(' / ')[0]}",
            )
        pool = set(self.names) | set(FUNCTIONS) | set(CONSTANTS)
        match = self._suggest(name, pool)
        known = self._known_names()
        suggestion = f"did you mean '{match}'? ({known})" if match else known
        raise self.error(node, f"unknown name '{name}'", token=name, suggestion=suggestion)

    def _variable(self, node: ast.Name, name: str) -> Closure:
        line, column = self._node_location(node)
        key = self.key

        def run(ctx: _Context) -> Any:
            try:
                value = ctx.env[name]
            except KeyError:
                raise ExpressionError(
                    key, f"no value was given for '{name}'", column=column, token=name, line=line
                ) from None
            if isinstance(value, (int, float, ctx.torch.Tensor)):
                return value
            try:
                tensor = ctx.torch.as_tensor(value, device=ctx.device)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ExpressionError(
                    key,
                    f"value of '{name}' is not a number or an array",
                    column=column,
                    token=name,
                    line=line,
                    detail=_first_line(exc),
                ) from exc
            return tensor.to(ctx.dtype) if tensor.is_floating_point() else tensor

        return run

    # ---- operators -----------------------------------------------------------------------

    def _binop(self, node: ast.BinOp) -> Closure:
        # Flatten the left spine so a long sum a + b + c + ... compiles to one loop instead of
        # a deep tower of closures (and counts as one nesting level).
        chain: list[ast.BinOp] = []
        base: ast.AST = node
        while isinstance(base, ast.BinOp):
            chain.append(base)
            base = base.left
        chain.reverse()
        first = self.compile(base)
        steps: list[tuple[Callable[[_Context, Any, Any], Any], Closure, _Site]] = []
        for link in chain:
            op_type = type(link.op)
            if op_type in _FORBIDDEN_BINOPS:
                symbol, hint = _FORBIDDEN_BINOPS[op_type]
                at = self._find_symbol(symbol, link.left, link.right)
                raise self.error(
                    link,
                    f"operator '{symbol}' is not allowed",
                    token=symbol,
                    suggestion=hint,
                    at=at,
                )
            symbol = _BINOP_SYMBOLS[op_type]
            line, column = self._find_symbol(symbol, link.left, link.right)
            right = self.compile(link.right)
            site = _Site(self.key, f"'{symbol}'", symbol, column, line)
            steps.append((_BINARY[symbol], right, site))

        def run(ctx: _Context) -> Any:
            acc = first(ctx)
            for apply, right, site in steps:
                value = right(ctx)
                try:
                    acc = apply(ctx, acc, value)
                except ExpressionError:
                    raise
                except _RUNTIME_ERRORS as exc:
                    raise site.fail(exc) from exc
            return acc

        return run

    def _unaryop(self, node: ast.UnaryOp) -> Closure:
        if isinstance(node.op, ast.Not):
            raise self.error(
                node, "'not' is not allowed", token="not", suggestion="use ~(condition)"
            )
        symbol, apply = {
            ast.USub: ("-", _negate),
            ast.UAdd: ("+", _positive),
            ast.Invert: ("~", _invert),
        }[type(node.op)]
        operand = self.compile(node.operand)
        site = self.site(node, f"'{symbol}'", symbol)

        def run(ctx: _Context) -> Any:
            value = operand(ctx)
            try:
                return apply(ctx, value)
            except ExpressionError:
                raise
            except _RUNTIME_ERRORS as exc:
                raise site.fail(exc) from exc

        return run

    def _compare(self, node: ast.Compare) -> Closure:
        for op in node.ops:
            if type(op) not in _COMPARE_SYMBOLS:
                word = {ast.Is: "is", ast.IsNot: "is not", ast.In: "in", ast.NotIn: "not in"}[
                    type(op)
                ]
                raise self.error(
                    node, f"'{word}' is not allowed", token=word, suggestion="use == or !="
                )
        if len(node.ops) > 1:
            first = _COMPARE_SYMBOLS[type(node.ops[0])]
            second = _COMPARE_SYMBOLS[type(node.ops[1])]
            at = self._find_symbol(second, node.comparators[0], node.comparators[1])
            raise self.error(
                node,
                "chained comparisons are not supported",
                token=second,
                suggestion=f"write (a {first} b) & (b {second} c)",
                at=at,
            )
        symbol = _COMPARE_SYMBOLS[type(node.ops[0])]
        left = self.compile(node.left)
        line, column = self._find_symbol(symbol, node.left, node.comparators[0])
        right = self.compile(node.comparators[0])
        site = _Site(self.key, f"'{symbol}'", symbol, column, line)
        apply = _BINARY[symbol]

        def run(ctx: _Context) -> Any:
            a = left(ctx)
            b = right(ctx)
            try:
                return apply(ctx, a, b)
            except ExpressionError:
                raise
            except _RUNTIME_ERRORS as exc:
                raise site.fail(exc) from exc

        return run

    # ---- calls ---------------------------------------------------------------------------

    def _call(self, node: ast.Call) -> Closure:
        func = node.func
        if isinstance(func, ast.Attribute):
            raise self._attribute_error(func)
        if not isinstance(func, ast.Name):
            raise self.error(
                node,
                "only functions from the table can be called",
                suggestion="call a function from the table by name, e.g. cos(z)",
            )
        name = func.id
        if name.startswith("__"):
            raise self.error(
                func,
                f"name '{name}' is not allowed (names starting with '__' are reserved)",
                token=name,
            )
        if name not in FUNCTIONS:
            if name in self.names or name in CONSTANTS:
                raise self.error(
                    func,
                    f"'{name}' is a value, not a function",
                    token=name,
                    suggestion=f"write {name} * (...) or {name} @ (...) for a product",
                )
            match = self._suggest(name, FUNCTIONS) or self._suggest(
                name, set(FUNCTIONS) | set(self.names) | set(CONSTANTS)
            )
            suggestion = (
                f"did you mean '{match}'?"
                if match
                else "see docs/expressions.md for the function table"
            )
            raise self.error(func, f"unknown function '{name}'", token=name, suggestion=suggestion)
        spec = FUNCTION_SPECS[name]
        for keyword in node.keywords:
            if keyword.arg is None:
                raise self.error(keyword, "'**' arguments are not allowed", token="**")
            raise self.error(
                keyword,
                f"keyword argument '{keyword.arg}=' is not allowed",
                token=keyword.arg,
                suggestion=f"pass arguments by position: {spec.usage}",
            )
        for arg in node.args:
            if isinstance(arg, ast.Starred):
                raise self.error(arg, "starred arguments ('*') are not allowed", token="*")
        count = len(node.args)
        if count < spec.min_args or (spec.max_args is not None and count > spec.max_args):
            raise self.error(node, f"{name}() takes {spec.arity_text()}, got {count}", token=name)
        arg_fns = [self.compile(arg) for arg in node.args]
        line, column = self._node_location(node)
        site = _Site(self.key, f"{name}()", name, column, line, prefix=True)
        impl = spec.impl

        def run(ctx: _Context) -> Any:
            values = [fn(ctx) for fn in arg_fns]
            try:
                return impl(ctx, values)
            except ExpressionError:
                raise
            except _RUNTIME_ERRORS as exc:
                raise site.fail(exc) from exc

        return run

    # ---- indexing ------------------------------------------------------------------------

    def _index_part(self, node: ast.AST | None) -> Closure | None:
        if node is None:
            return None
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, float)
            and not node.value.is_integer()
        ):
            raise self.error(
                node,
                f"index must be a whole number, got {node.value!r}",
                token=repr(node.value),
            )
        if isinstance(node, ast.Starred):
            raise self.error(node, "starred arguments ('*') are not allowed", token="*")
        return self.compile(node)

    def _subscript(self, node: ast.Subscript) -> Closure:
        value_fn = self.compile(node.value)
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        # One entry per axis: (is_slice, closures); a slice has three optional closures.
        parts: list[tuple[bool, tuple[Closure | None, ...]]] = []
        for item in items:
            if isinstance(item, ast.Slice):
                bounds = (item.lower, item.upper, item.step)
                parts.append((True, tuple(self._index_part(bound) for bound in bounds)))
            else:
                parts.append((False, (self._index_part(item),)))
        line, column = self._find_symbol("[", node.value, node.slice)
        site = _Site(self.key, "indexing", "[", column, line, prefix=True)

        def run(ctx: _Context) -> Any:
            x = value_fn(ctx)
            resolved = [
                (is_slice, tuple(None if fn is None else fn(ctx) for fn in fns))
                for is_slice, fns in parts
            ]
            try:
                return _apply_index(ctx, x, resolved)
            except ExpressionError:
                raise
            except _RUNTIME_ERRORS as exc:
                raise site.fail(exc) from exc

        return run

    _HANDLERS: ClassVar[dict[type, Callable[[_Compiler, Any], Closure]]] = {
        ast.Constant: _constant,
        ast.Name: _name,
        ast.BinOp: _binop,
        ast.UnaryOp: _unaryop,
        ast.Compare: _compare,
        ast.Call: _call,
        ast.Subscript: _subscript,
    }


def _apply_index(ctx: _Context, x: Any, resolved: list[tuple[bool, tuple[Any, ...]]]) -> Any:
    """Integer indices and slices, one dimension after another.

    Negative steps are done with flip, which torch slicing lacks; indices are checked against the
    sizes explicitly so the message names the dimension.
    """
    torch = ctx.torch
    if not isinstance(x, torch.Tensor):
        raise _UsageError("only arrays can be indexed, got a number")
    if len(resolved) > x.dim():
        raise _UsageError(f"too many indices ({len(resolved)}) for {_describe(ctx, x)}")
    dim = 0
    for is_slice, item in resolved:
        size = x.shape[dim]
        if not is_slice:
            index = _whole(ctx, item[0], "an index")
            if not -size <= index < size:
                raise _UsageError(f"index {index} is out of range for axis {dim} of size {size}")
            x = x.select(dim, index)
            continue
        lower, upper, step = (
            None if part is None else _whole(ctx, part, "a slice bound") for part in item
        )
        if step == 0:
            raise _UsageError("slice step must not be zero")
        picked = range(size)[slice(lower, upper, step)]
        count = len(picked)
        lead = (slice(None),) * dim
        if count == 0:
            x = x.narrow(dim, 0, 0)
        elif picked.step > 0:
            x = x[
                (
                    *lead,
                    slice(picked.start, picked.start + (count - 1) * picked.step + 1, picked.step),
                )
            ]
        else:
            stride = -picked.step
            start = size - 1 - picked.start
            x = x.flip(dim)[(*lead, slice(start, start + (count - 1) * stride + 1, stride))]
        dim += 1
    return x


def _depth_error(compiler: _Compiler, tree: ast.AST) -> ExpressionError | None:
    """Nesting depth, counted iteratively; a left-leaning chain a + b + c is one level."""
    stack: list[tuple[ast.AST, int]] = [(tree, 0)]
    while stack:
        node, level = stack.pop()
        if level > MAX_DEPTH:
            return compiler.error(
                node,
                f"expression is nested too deeply (more than {MAX_DEPTH} levels)",
                suggestion="split it into parameters",
            )
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.expr_context, ast.operator, ast.cmpop, ast.unaryop)):
                continue
            same_chain = (
                isinstance(node, ast.BinOp) and isinstance(child, ast.BinOp) and child is node.left
            )
            stack.append((child, level if same_chain else level + 1))
    return None


def _bracket_depth(text: str) -> int:
    depth = deepest = 0
    for char in text:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth -= 1
    return deepest


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


class Expression:
    """A parsed, validated expression, ready to evaluate with torch."""

    __slots__ = ("_names", "_root", "key", "text")

    def __init__(self, text: str, key: str, names: frozenset[str], root: Closure) -> None:
        self.text = text
        self.key = key
        self._names = names
        self._root = root

    @property
    def names(self) -> frozenset[str]:
        """Free variable names the expression uses (functions and constants excluded)."""
        return self._names

    def evaluate(
        self, env: Mapping[str, Any], *, dtype: torch.dtype, device: torch.device | str
    ) -> torch.Tensor:
        """Evaluate with torch and return a tensor.

        ``env`` maps variable names to torch tensors or Python numbers (ints such as the dimension
        ``n`` stay exact, so they can size builders and index arrays).  Builders create tensors of
        ``dtype`` on ``device``; a result that is a plain number becomes a 0-d tensor of ``dtype``.
        Runtime problems (shape mismatches, oversized builders, sizes that depend on the iterate)
        raise ExpressionError naming the key and the column.
        """
        import torch

        ctx = _Context(env, dtype, device, torch)
        value = self._root(ctx)
        if isinstance(value, torch.Tensor):
            return value
        if isinstance(value, bool):
            return torch.tensor(value, device=device)
        return torch.tensor(value, dtype=dtype, device=device)

    def __repr__(self) -> str:
        return f"Expression({self.text!r}, key={self.key!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Closures do not pickle; re-parsing the text does (for worker processes).
        return (_reparse, (self.text, self.key, tuple(sorted(self._names))))


def _reparse(text: str, key: str, names: tuple[str, ...]) -> Expression:
    return parse_expression(text, key=key, names=names)


def _syntax_error(
    key: str, exc: SyntaxError, stripped: str, line_shift: int, col_shift: int
) -> ExpressionError:
    msg = (exc.msg or "invalid syntax").strip()
    lines = _split_lines(stripped)
    lineno = exc.lineno or 1
    offset = exc.offset or 0
    line_text = lines[lineno - 1] if 1 <= lineno <= len(lines) else ""
    multiline = len(lines) > 1 or line_shift > 0
    token: str | None = None
    if 1 <= offset <= len(line_text):
        end = exc.end_offset or 0
        if getattr(exc, "end_lineno", lineno) == lineno and end > offset:
            token = line_text[offset - 1 : end - 1].strip() or None
        token = token or line_text[offset - 1]
    if msg.startswith("invalid syntax") or msg.startswith("unmatched"):
        detail = f"unexpected token {token!r}" if token else "unexpected end of expression"
    elif "EOF" in msg:
        detail = "unexpected end of expression"
    else:
        detail = msg
    if not 1 <= offset <= len(line_text) + 1:
        offset = len(line_text) + 1  # "unexpected end": point just past the text
    column = offset + (col_shift if lineno == 1 else 0)
    return ExpressionError(
        key,
        "syntax error",
        column=column,
        token=token,
        detail=detail,
        line=lineno + line_shift if multiline else None,
    )


def _statement_error(compiler: _Compiler, stripped: str) -> ExpressionError | None:
    """Name statements (assignments, imports) that eval mode only reports as bad syntax."""
    try:
        module = ast.parse(stripped, mode="exec")
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError):
        return None
    if len(module.body) != 1:
        return None
    stmt = module.body[0]
    if isinstance(stmt, ast.Assign):
        return compiler.error(
            stmt,
            "assignment is not allowed",
            token="=",
            suggestion="write only the right-hand side; the config key names the value",
            at=compiler._find_symbol("=", stmt.targets[-1], stmt.value),
        )
    if isinstance(stmt, (ast.AugAssign, ast.AnnAssign)):
        return compiler.error(
            stmt,
            "assignment is not allowed",
            suggestion="write only the right-hand side; the config key names the value",
        )
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return compiler.error(stmt, "import is not allowed", token="import")
    kind = type(stmt).__name__.lower()
    return compiler.error(
        stmt, f"statements ('{kind}') are not allowed", suggestion="write a single expression"
    )


def parse_expression(text: str, *, key: str, names: Iterable[str]) -> Expression:
    """Parse and statically validate an expression (torch is not imported).

    ``names`` are the variables that will be in the environment at evaluation (e.g. ``z``, ``n``
    and the problem's parameters); variables shadow the constants ``pi`` and ``e``.  Raises
    ExpressionError for syntax errors, disallowed constructs, unknown names or functions (with the
    nearest valid name suggested), wrong argument counts and exceeded limits.
    """
    if not isinstance(text, str):
        raise ExpressionError(key, f"expression must be text, got {type(text).__name__}")
    if len(text) > MAX_TEXT_LENGTH:
        raise ExpressionError(
            key,
            f"expression is {len(text)} characters long; the limit is {MAX_TEXT_LENGTH}",
            suggestion="split it into parameters",
        )
    stripped = text.strip()
    if not stripped:
        raise ExpressionError(key, "expression is empty")
    # Leading whitespace would be an indentation error; drop it but keep columns honest.
    lead = text[: len(text) - len(text.lstrip())]
    line_shift = len(_split_lines(lead)) - 1
    col_shift = len(_split_lines(lead)[-1])
    if _bracket_depth(stripped) > MAX_DEPTH:
        raise ExpressionError(
            key,
            f"expression is nested too deeply (more than {MAX_DEPTH} levels)",
            suggestion="split it into parameters",
        )
    try:
        with warnings.catch_warnings():
            # SyntaxWarnings (e.g. "'int' object is not callable") would leak to stderr.
            warnings.simplefilter("ignore")
            tree = ast.parse(stripped, mode="eval")
    except SyntaxError as exc:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            statement = _statement_error(
                _Compiler(stripped, key, frozenset(), line_shift, col_shift), stripped
            )
        raise (statement or _syntax_error(key, exc, stripped, line_shift, col_shift)) from None
    except (RecursionError, MemoryError):
        raise ExpressionError(
            key,
            "expression is nested too deeply",
            suggestion="split it into parameters",
        ) from None
    except (ValueError, OverflowError) as exc:
        raise ExpressionError(key, "syntax error", detail=_first_line(exc)) from None

    name_set = frozenset(names)
    compiler = _Compiler(stripped, key, name_set, line_shift, col_shift)
    depth_error = _depth_error(compiler, tree.body)
    if depth_error is not None:
        raise depth_error
    root = compiler.compile(tree.body)
    return Expression(text, key, frozenset(compiler.used), root)
