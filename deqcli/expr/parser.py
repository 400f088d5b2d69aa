"""``parse_expression()``: text limits, syntax, statement and nesting-depth errors, then compilation
into an ``Expression``, the parsed text ready to evaluate with torch.
"""

from __future__ import annotations

import ast
import warnings
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from deqcli.expr.compiler import Closure, _Compiler, _split_lines
from deqcli.expr.cost import Cost, Known, estimate
from deqcli.expr.errors import ExpressionError
from deqcli.expr.functions import _Context, _first_line

if TYPE_CHECKING:
    import torch

#: Longest accepted expression text, in characters.
MAX_TEXT_LENGTH = 4000
#: Deepest accepted nesting of operators, calls and subscripts (a flat chain a + b + c is one level).
MAX_DEPTH = 64


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

    __slots__ = ("_names", "_root", "_tree", "key", "text")

    def __init__(
        self, text: str, key: str, names: frozenset[str], root: Closure, tree: ast.AST
    ) -> None:
        self.text = text
        self.key = key
        self._names = names
        self._root = root
        self._tree = tree

    @property
    def names(self) -> frozenset[str]:
        """Free variable names the expression uses (functions and constants excluded)."""
        return self._names

    def cost(self, variables: Mapping[str, Known]) -> Cost:
        """What one evaluation costs for one sample, from what is known of the variables: a
        number's value, an array's shape, or None (see ``deqcli.expr.cost``); no torch needed."""
        return estimate(self._tree, self.text.strip(), variables)

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
    return Expression(text, key, frozenset(compiler.used), root, tree.body)
