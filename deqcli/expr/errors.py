"""The expression language's error: one line naming the config key, the column and the token.

``ExpressionError`` pickles with all its fields, so worker processes can send it back; ``_UsageError``
is raised by function implementations and gets its key, column and token from the calling node.
"""

from __future__ import annotations

from typing import Any


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
