"""The compiler: a parsed ``ast`` tree, checked node by node against the whitelist, becomes nested
closures that call torch when evaluated. Errors name the key, the line, the column and the token, and
suggest the nearest valid name; runtime failures of an operation are reported at its place in the text.
"""

from __future__ import annotations

import ast
import difflib
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from deqcli.expr.errors import ExpressionError, _UsageError
from deqcli.expr.functions import (
    _BINARY,
    CONSTANTS,
    FUNCTION_SPECS,
    FUNCTIONS,
    _Context,
    _describe,
    _first_line,
    _invert,
    _negate,
    _positive,
    _tidy,
    _whole,
)

#: A compiled (sub)expression: called with the evaluation context, returns its value.
Closure = Callable[[_Context], Any]

# ast operator types -> the symbols that key the runtime implementations in functions._BINARY
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
