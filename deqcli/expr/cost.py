"""What one evaluation of an expression costs, worked out from the tree before anything runs.

Given the shapes of the variables (``z`` and the parameters as one sample sees them, ``n`` and other
numbers by value), ``estimate`` walks the parsed tree once and infers the shape of every
intermediate value, as torch would compute it: broadcasting, ``@`` (2·m·k·n operations for an
m×k by k×n product), reductions, indexing and the builders (``ones(r, c)``, ``outer(a, b)``, …,
whose sizes are known when their arguments are constants or known numbers such as ``n``). It adds
up the work (one operation per element an elementwise step produces or a reduction reads) and the
elements of every intermediate, and keeps the most expensive place of each for the message.

Unknown shapes (a parameter read from a file, a value that depends on the iterate) contribute
nothing, so the estimate is a lower bound: a refusal is always deserved. ``check`` compares the
estimate, for the batch and element size at hand, with ``run.max_work`` and ``run.max_memory``.
Nothing here imports torch; ``deq validate`` runs it where the config fixes the shapes.
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from deqcli.expr.compiler import _BINOP_SYMBOLS
from deqcli.expr.errors import ExpressionError
from deqcli.expr.functions import _BINARY, CONSTANTS, FUNCTION_SPECS

Dims = tuple[int | None, ...]

#: What a variable is known to be: a number (its value, or None when unknown), an array shape
#: (dimensions may be None), or None when nothing is known.
Known = int | float | tuple[int | None, ...] | None


@dataclass(frozen=True)
class _Num:
    """A Python number, with its value when it is known before evaluation."""

    value: int | float | None = None


@dataclass(frozen=True)
class _Arr:
    """A tensor; ``dims`` is None when even its rank is unknown."""

    dims: Dims | None = None

    @property
    def size(self) -> float | None:
        """Elements, as a float: absurd sizes (1e308 × 1e308) become inf rather than overflow."""
        if self.dims is None or any(d is None for d in self.dims):
            return None
        return math.prod(float(d) for d in self.dims if d is not None)


_Value = _Num | _Arr
_SCALAR = _Arr(())


@dataclass
class Cost:
    """One evaluation of an expression for one sample: operations and elements created."""

    work: float = 0.0  # operations
    elements: float = 0.0  # elements of every intermediate, added up
    largest: float = 0.0  # elements of the largest intermediate
    work_site: str = ""  # where the most work happens, e.g. "'@' at column 5 (3000×3000, …)"
    largest_site: str = ""
    result: Known = None  # what is known of the value: a number, a shape, or None
    _top_work: float = field(default=0.0, repr=False)

    def add(self, work: float, elements: float, site: str) -> None:
        """Count one step."""
        self.work += work
        self.elements += elements
        if work > self._top_work:
            self._top_work, self.work_site = work, site
        if elements > self.largest:
            self.largest, self.largest_site = elements, site

    def check(
        self,
        key: str,
        *,
        batch: int,
        itemsize: int,
        max_work: float,
        max_memory: float,
        factor: float = 1.0,
    ) -> None:
        """Refuse (ExpressionError naming the key) when the batch's evaluation exceeds a limit.

        ``factor`` scales the work (3 for a loss that is differentiated as well as evaluated).
        """
        work = self.work * batch * factor
        for_batch = f" for a batch of {batch}" if batch > 1 else ""
        if work > max_work:
            raise ExpressionError(
                key,
                f"one evaluation needs {_about(format_count(work), work)} operations{for_batch}"
                + (f", most of them in {self.work_site}" if self.work_site else ""),
                suggestion=f"the limit is run.max_work = {format_count(max_work)}; make the "
                "arrays smaller or raise run.max_work",
            )
        memory = self.elements * batch * itemsize
        if memory > max_memory:
            raise ExpressionError(
                key,
                f"one evaluation creates {_about(format_bytes(memory), memory)} of intermediate "
                f"values{for_batch}"
                + (f", the largest in {self.largest_site}" if self.largest_site else ""),
                suggestion=f"the limit is run.max_memory = {format_bytes(max_memory)}; make the "
                "arrays smaller or raise run.max_memory",
            )


def _about(text: str, value: float) -> str:
    return f"about {text}" if math.isfinite(value) else "more than 1e308"


def format_count(value: float) -> str:
    """8e8, 5.4e10, 2e4, 350: two significant digits, no exponent padding."""
    if not math.isfinite(value):
        return "1e308+"
    if value < 1e4:
        return f"{value:.3g}"
    mantissa, _, exponent = f"{value:.2g}".partition("e")
    return f"{mantissa}e{int(exponent)}"


def format_bytes(count: float) -> str:
    """1.5 GiB, 200 MiB, 12 KiB, 100 B."""
    if not math.isfinite(count):
        return "1e308+ B"
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count:.0f} B"


def estimate(tree: ast.AST, text: str, variables: Mapping[str, Known]) -> Cost:
    """The cost of one evaluation of the parsed expression ``tree`` (its ``ast.Expression`` body).

    ``variables`` gives what is known of each name: a number's value, an array's shape, or None.
    """
    walker = _Walker(text, variables)
    out = walker.value(tree)
    walker.cost.result = out.value if isinstance(out, _Num) else out.dims
    return walker.cost


class _Walker:
    def __init__(self, text: str, variables: Mapping[str, Known]) -> None:
        self.text = text
        self.variables = variables
        self.cost = Cost()

    # -- places, for messages ------------------------------------------------------------
    def site(self, node: ast.AST, what: str, inputs: list[_Value], out: _Value) -> str:
        """``'*' at column 5 (20000×1, 1×20000 → 20000×20000)``."""
        col = getattr(node, "col_offset", None)
        where = f" at column {col + 1}" if col is not None and "\n" not in self.text else ""
        given = [_describe(v) for v in inputs if isinstance(v, _Arr) and v.dims]
        made = _describe(out) if isinstance(out, _Arr) and out.dims is not None else "?"
        return (
            f"{what}{where} ({', '.join(given)} → {made})" if given else f"{what}{where} (→ {made})"
        )

    def step(
        self, node: ast.AST, what: str, out: _Value, inputs: list[_Value], work: float | None
    ) -> None:
        size = out.size if isinstance(out, _Arr) else None
        if work is None:
            work = size or 0
        self.cost.add(float(work), float(size or 0), self.site(node, what, inputs, out))

    # -- the walk ----------------------------------------------------------------------
    def value(self, node: ast.AST) -> _Value:
        method = getattr(self, f"_{type(node).__name__.lower()}", None)
        if method is None:
            for child in ast.iter_child_nodes(node):
                self.value(child)
            return _Arr(None)
        return method(node)

    def _constant(self, node: ast.Constant) -> _Value:
        value = node.value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return _Num(value)
        return _Num(None)

    def _name(self, node: ast.Name) -> _Value:
        if node.id in self.variables:
            known = self.variables[node.id]
            if isinstance(known, tuple):
                return _Arr(known)
            if isinstance(known, (int, float)):
                return _Num(known)
            return _Arr(None)
        if node.id in CONSTANTS:
            return _Num(CONSTANTS[node.id])
        return _Arr(None)

    def _binop(self, node: ast.BinOp) -> _Value:
        left = self.value(node.left)
        right = self.value(node.right)
        symbol = _BINOP_SYMBOLS.get(type(node.op), "?")
        if isinstance(left, _Num) and isinstance(right, _Num):
            return _Num(_fold(symbol, left.value, right.value))
        if symbol == "@":
            out, work = _matmul(left, right)
            self.step(node, "'@'", out, [left, right], work)
            return out
        out = _broadcast(left, right)
        self.step(node, f"'{symbol}'", out, [left, right], None)
        return out

    def _unaryop(self, node: ast.UnaryOp) -> _Value:
        operand = self.value(node.operand)
        if isinstance(operand, _Num):
            if isinstance(node.op, ast.USub) and operand.value is not None:
                return _Num(-operand.value)
            return _Num(None) if not isinstance(node.op, ast.UAdd) else operand
        self.step(node, "a sign", operand, [operand], None)
        return operand

    def _compare(self, node: ast.Compare) -> _Value:
        left = self.value(node.left)
        right = self.value(node.comparators[0]) if node.comparators else _Num(None)
        if isinstance(left, _Num) and isinstance(right, _Num):
            return _Num(None)
        out = _broadcast(left, right)
        self.step(node, "a comparison", out, [left, right], None)
        return out

    def _subscript(self, node: ast.Subscript) -> _Value:
        base = self.value(node.value)
        items = node.slice.elts if isinstance(node.slice, ast.Tuple) else [node.slice]
        parts: list[Any] = []
        for item in items:
            if isinstance(item, ast.Slice):
                bounds = [
                    None if b is None else self.value(b)
                    for b in (item.lower, item.upper, item.step)
                ]
                parts.append(("slice", bounds))
            else:
                self.value(item)
                parts.append(("index", None))
        if not isinstance(base, _Arr) or base.dims is None:
            return _Arr(None)
        dims = list(base.dims)
        out: list[int | None] = []
        for axis, (kind, bounds) in enumerate(parts):
            if axis >= len(dims):
                return _Arr(None)
            if kind == "index":
                continue
            out.append(_slice_length(dims[axis], bounds))
        out.extend(dims[len(parts) :])
        return _Arr(tuple(out))

    def _call(self, node: ast.Call) -> _Value:
        name = node.func.id if isinstance(node.func, ast.Name) else ""
        args = [self.value(arg) for arg in node.args]
        spec = FUNCTION_SPECS.get(name)
        if spec is None:
            return _Arr(None)
        what = f"{name}()"
        if spec.category == "elementwise":
            out = _as_array(args[0]) if args else _Arr(None)
            self.step(node, what, out, args, None)
            return out
        handler = _CALLS.get(name)
        if handler is None:
            return _Arr(None)
        out, work = handler(args)
        self.step(node, what, out, args, work)
        return out


# -- shape rules --------------------------------------------------------------------------------


def _fold(symbol: str, a: int | float | None, b: int | float | None) -> int | float | None:
    """Arithmetic on known numbers, as the evaluator does it (IEEE results, exact small ints)."""
    if a is None or b is None or symbol not in _BINARY or symbol in ("&", "|", "@"):
        return None
    try:
        value = _BINARY[symbol](None, a, b)  # type: ignore[arg-type]  # numbers need no context
    except (ArithmeticError, ValueError, TypeError):
        return None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _as_array(value: _Value) -> _Arr:
    return value if isinstance(value, _Arr) else _SCALAR


def _describe(value: _Arr) -> str:
    dims = value.dims or ()
    shown = ["?" if d is None else str(d) if d < 10**12 else f"{float(d):.0e}" for d in dims]
    return "×".join(shown) if dims else "a number"


def _broadcast(*values: _Value) -> _Arr:
    shapes = [_as_array(v).dims for v in values]
    if any(s is None for s in shapes):
        return _Arr(None)
    rank = max(len(s) for s in shapes)  # type: ignore[arg-type]
    out: list[int | None] = []
    for axis in range(rank):
        dims = [s[len(s) - rank + axis] for s in shapes if len(s) - rank + axis >= 0]  # type: ignore[arg-type]
        if any(d is None for d in dims):
            known = [d for d in dims if d is not None and d != 1]
            out.append(max(known) if known else None)
        else:
            out.append(max(dims))  # type: ignore[type-var]  # mismatches fail at evaluation
    return _Arr(tuple(out))


def _matmul(a: _Value, b: _Value) -> tuple[_Arr, float | None]:
    """torch.matmul's result shape and 2·m·k·n operations (batch dimensions multiply)."""
    da, db = _as_array(a).dims, _as_array(b).dims
    if da is None or db is None or not da or not db:
        return _Arr(None), 0.0
    k = da[-1]
    if len(da) == 1 and len(db) == 1:
        out: Dims = ()
    elif len(db) == 1:
        out = tuple(da[:-1])
    elif len(da) == 1:
        out = (*db[:-2], db[-1])
    else:
        batch = _broadcast(_Arr(tuple(da[:-2])), _Arr(tuple(db[:-2]))).dims or ()
        out = (*batch, da[-2], db[-1])
    result = _Arr(out)
    size = result.size if out else 1
    if size is None or k is None:
        return result, 0.0
    return result, 2.0 * size * k


def _slice_length(size: int | None, bounds: list[_Value | None]) -> int | None:
    if size is None:
        return None
    values: list[int | None] = []
    for bound in bounds:
        if bound is None:
            values.append(None)
        elif isinstance(bound, _Num) and isinstance(bound.value, (int, float)):
            number = bound.value
            if not math.isfinite(number) or not float(number).is_integer():
                return None
            values.append(int(number))
        else:
            return None
    if values[2] == 0:
        return None
    # len(range(...)) cannot count beyond a C ssize_t; the arithmetic can.
    start, stop, step = slice(*values).indices(size)
    count = (stop - start + step - (1 if step > 0 else -1)) // step
    return max(0, count)


def _count(value: _Value) -> int | None:
    """A whole number known before evaluation (a size argument), else None."""
    if isinstance(value, _Num) and isinstance(value.value, (int, float)):
        number = value.value
        if math.isfinite(number) and float(number).is_integer() and number >= 0:
            return int(number)
    return None


Rule = Any  # (args) -> (result, work or None)


def _reduce(args: list[_Value]) -> tuple[_Value, float | None]:
    return _SCALAR, float(_as_array(args[0]).size or 0) if args else 0.0


def _same(args: list[_Value]) -> tuple[_Value, float | None]:
    out = _as_array(args[0]) if args else _Arr(None)
    return out, None


def _extreme(args: list[_Value]) -> tuple[_Value, float | None]:
    return _reduce(args) if len(args) == 1 else (_broadcast(*args), None)


def _arange(args: list[_Value]) -> tuple[_Value, float | None]:
    numbers = [a.value if isinstance(a, _Num) else None for a in args]
    if any(n is None for n in numbers):
        return _Arr((None,)), None
    start, stop, step = (
        (0, numbers[0], 1) if len(numbers) == 1 else (*numbers[:2], *(numbers[2:] or [1]))
    )
    try:
        count = max(0, math.ceil((stop - start) / step))  # type: ignore[operator]
    except (ZeroDivisionError, OverflowError, ValueError, TypeError):
        return _Arr((None,)), None
    return _Arr((count,)), None


def _linspace(args: list[_Value]) -> tuple[_Value, float | None]:
    return _Arr((_count(args[2]),)) if len(args) == 3 else _Arr(None), None


def _filled(square: bool) -> Rule:
    def rule(args: list[_Value]) -> tuple[_Value, float | None]:
        sizes = [_count(a) for a in args]
        if square and len(sizes) == 1:
            sizes = sizes * 2
        return _Arr(tuple(sizes)), None

    return rule


def _diag(args: list[_Value]) -> tuple[_Value, float | None]:
    dims = _as_array(args[0]).dims
    if dims is None:
        return _Arr(None), None
    if len(dims) == 1:
        return _Arr((dims[0], dims[0])), None
    if len(dims) == 2:
        known = [d for d in dims if d is not None]
        return _Arr((min(known) if len(known) == 2 else None,)), None
    return _Arr(None), None


def _outer(args: list[_Value]) -> tuple[_Value, float | None]:
    sizes = [_as_array(a).size for a in args]
    return _Arr(tuple(int(s) if s is not None and math.isfinite(s) else None for s in sizes)), None


def _concat(args: list[_Value]) -> tuple[_Value, float | None]:
    dims = [_as_array(a).dims for a in args]
    if any(d is None for d in dims):
        return _Arr(None), None
    heads = [d[0] if d else 1 for d in dims]  # type: ignore[index]
    first = dims[0] or (1,)
    total = None if any(h is None for h in heads) else sum(heads)  # type: ignore[arg-type]
    return _Arr((total, *first[1:])), None


def _stack(args: list[_Value]) -> tuple[_Value, float | None]:
    first = _as_array(args[0]).dims if args else None
    return (_Arr((len(args), *first)) if first is not None else _Arr(None)), None


def _dot(args: list[_Value]) -> tuple[_Value, float | None]:
    return _SCALAR, 2.0 * float(_as_array(args[0]).size or 0)


def _transpose(args: list[_Value]) -> tuple[_Value, float | None]:
    dims = _as_array(args[0]).dims
    return (_Arr(tuple(reversed(dims))) if dims is not None else _Arr(None)), 0.0


def _softmax(args: list[_Value]) -> tuple[_Value, float | None]:
    out = _as_array(args[0])
    return out, 3.0 * float(out.size or 0)


_CALLS: dict[str, Rule] = {
    "sum": _reduce,
    "prod": _reduce,
    "mean": _reduce,
    "norm": _reduce,
    "logsumexp": _reduce,
    "max": _extreme,
    "min": _extreme,
    "cumsum": _same,
    "cumprod": _same,
    "softmax": _softmax,
    "arange": _arange,
    "linspace": _linspace,
    "ones": _filled(square=False),
    "zeros": _filled(square=False),
    "eye": _filled(square=True),
    "diag": _diag,
    "outer": _outer,
    "where": lambda args: (_broadcast(*args), None),
    "clamp": lambda args: (_broadcast(*args), None),
    "atan2": lambda args: (_broadcast(*args), None),
    "pow": lambda args: (_broadcast(*args), None),
    "roll": _same,
    "concat": _concat,
    "stack": _stack,
    "dot": _dot,
    "transpose": _transpose,
}
