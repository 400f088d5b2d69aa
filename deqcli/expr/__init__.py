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

The package, by role: ``errors`` (ExpressionError), ``functions`` (the function table and the runtime
implementations), ``compiler`` (ast -> closures), ``parser`` (``parse_expression`` and
``Expression``) and ``cost`` (the shapes, work and memory of one evaluation, worked out before it
runs). Import the public names from ``deqcli.expr``.
"""

from __future__ import annotations

from deqcli.expr.cost import Cost, format_bytes
from deqcli.expr.errors import ExpressionError
from deqcli.expr.functions import CONSTANTS, FUNCTION_SPECS, FUNCTIONS, MAX_ELEMENTS, FunctionSpec
from deqcli.expr.parser import MAX_DEPTH, MAX_TEXT_LENGTH, Expression, parse_expression

__all__ = [
    "CONSTANTS",
    "FUNCTIONS",
    "FUNCTION_SPECS",
    "MAX_DEPTH",
    "MAX_ELEMENTS",
    "MAX_TEXT_LENGTH",
    "Cost",
    "Expression",
    "ExpressionError",
    "FunctionSpec",
    "format_bytes",
    "parse_expression",
]
