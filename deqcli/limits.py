"""Resource limits: estimate what a config will need before anything is allocated, and refuse
with the estimate and the key that raises the limit.

Two limits, both config keys of the ``run`` section:

- ``run.max_memory`` (default 4 GiB): the problem's arrays (W, U, x, the start, the parameters),
  a solver's working set (iterates, histories, stored vectors, dense Jacobians) and the
  intermediate values of one evaluation of an expression;
- ``run.max_work`` (default 1e8 operations): one evaluation of an expression for the whole batch,
  worked out from its text and the shapes (``deqcli.expr.cost``).

The estimates are made from what the config fixes (``deq validate`` refuses a ``dim`` of 10⁹
without importing torch), again with the actual shapes when the problem is built, and for the
solver before the solve starts. Nothing here imports torch.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deqcli.errors import ConfigError
from deqcli.expr import Expression, format_bytes

if TYPE_CHECKING:
    from deqcli.solvers.base import Solver, StopRule

DEFAULT_MAX_MEMORY = 4 * 2**30
DEFAULT_MAX_WORK = 1e8

# Solvers that form dense n×n Jacobians per sample (with working copies: about 3 matrices).
DENSE_SOLVERS = frozenset(
    {"newton", "trust-region", "levenberg-marquardt", "scipy:hybr", "scipy:lm"}
)
# Options that set how many n-vectors a solver stores per sample, and how many per unit.
VECTOR_OPTIONS = {"m": 2, "memory": 2, "krylov_dim": 1}
# Of those, the ones allocated as they fill (Broyden's terms), at most one unit per iteration.
GROWING_OPTIONS = frozenset({"memory"})
# Iterates, residuals, trial points and temporaries every solver keeps per sample.
BASE_VECTORS = 8

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}
_MEMORY = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: Any) -> int:
    """Bytes from a number or a text such as ``8GiB``, ``512 MB`` or ``2g``; ValueError if not."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 4GiB or 512MB, got a boolean")
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        match = _MEMORY.match(value)
        unit = match.group(2).lower() if match else ""
        if match is None or unit not in _UNITS:
            raise ValueError(
                f"expected a size such as 4GiB, 512MB or a number of bytes, got {value!r}"
            )
        number = float(match.group(1)) * _UNITS[unit]
    else:
        raise ValueError(f"expected a size such as 4GiB or 512MB, got {value!r}")
    if not math.isfinite(number) or number <= 0:
        raise ValueError(f"must be a positive, finite size, got {value!r}")
    return int(min(number, 2**62))


@dataclass(frozen=True)
class Limits:
    """The limits in force for one config."""

    max_memory: float = DEFAULT_MAX_MEMORY
    max_work: float = DEFAULT_MAX_WORK

    @classmethod
    def of(cls, run: Any) -> Limits:
        """The limits of a config's ``run`` section."""
        return cls(max_memory=run.max_memory, max_work=run.max_work)

    def check_bytes(
        self,
        need: float,
        what: str,
        *,
        key: str = "run.max_memory",
        fix: str = "make the problem smaller",
    ) -> None:
        """Refuse when ``need`` bytes exceed run.max_memory, naming what needs them and the fix."""
        if need > self.max_memory:
            raise ConfigError(
                key,
                f"{what} need about {format_bytes(need)}, more than run.max_memory = "
                f"{format_bytes(self.max_memory)}; {fix} or raise run.max_memory",
            )

    def check_expression(
        self,
        expr: Expression,
        variables: Mapping[str, Any],
        *,
        batch: int = 1,
        itemsize: int = 8,
        factor: float = 1.0,
    ) -> None:
        """Refuse an expression whose evaluation for ``batch`` samples exceeds either limit.

        ``variables`` maps names to numbers, array shapes, None, or actual tensors (their shape).
        """
        known = {name: known_of(value) for name, value in variables.items()}
        expr.cost(known).check(
            expr.key,
            batch=batch,
            itemsize=itemsize,
            max_work=self.max_work,
            max_memory=self.max_memory,
            factor=factor,
        )


def known_of(value: Any) -> Any:
    """What the cost model knows of a value: a number, an array's shape, or None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, tuple):
        return value
    shape = getattr(value, "shape", None)
    if shape is not None:
        dims = tuple(int(d) for d in shape)
        if not dims and hasattr(value, "item"):
            try:
                return float(value.item())  # a 0-d parameter: its value can size a builder
            except (RuntimeError, ValueError):
                return ()
        return dims
    return None


def solve_bytes(batch: int, n: int, itemsize: int, solver: Solver, stop: StopRule) -> float:
    """The working set of a solve: iterates, stored vectors, dense Jacobians, histories."""
    # The kept iterates never outnumber the iterations.
    vectors = BASE_VECTORS + min(stop.keep_iterates, stop.max_iter + 1)
    for _option, per, count in _stored_vectors(solver, stop):
        vectors += per * count
    if solver.name.startswith("torchdeq:"):
        from deqcli.solvers.peers_torchdeq import DEFAULT_MEMORY_CAP, passed_max_iter

        budget = passed_max_iter(stop.max_iter)
        vectors += 2 * budget  # the recorded iterates and residuals, replayed by the driver
        if solver.name == "torchdeq:broyden" and getattr(solver, "memory", None) is None:
            vectors += 2 * min(budget, DEFAULT_MEMORY_CAP)  # its update vectors
    dense = solver.name in DENSE_SOLVERS or (
        solver.name == "auto" and n <= getattr(solver, "dense_max", 0)
    )
    if dense:
        vectors += 3 * n
    rows = min(stop.max_iter + 1, stop.history_limit)
    history = rows * batch * 4 * 8  # residual, ‖f‖, step and time per kept row, in float64
    return float(vectors) * batch * n * itemsize + history


def _stored_vectors(solver: Solver, stop: StopRule) -> list[tuple[str, int, int]]:
    """(option, vectors per unit, units) for each option that sets how many vectors are stored.

    Broyden's terms are allocated as they fill, at most one per iteration, so a memory beyond
    max_iter costs nothing; the others are allocated whole.
    """
    out = []
    for option, per in VECTOR_OPTIONS.items():
        count = getattr(solver, option, None)
        if isinstance(count, int) and not isinstance(count, bool):
            if option in GROWING_OPTIONS:
                count = min(count, stop.max_iter)
            out.append((option, per, count))
    return out


def check_solve(
    batch: int, n: int, itemsize: int, solver: Solver, stop: StopRule, limits: Limits
) -> None:
    """Refuse a solve whose working set exceeds run.max_memory, before it starts.

    When one option's stored vectors are most of it, the message names that option as the
    first thing to lower (Broyden's ``memory``, Anderson's ``m``).
    """
    need = solve_bytes(batch, n, itemsize, solver, stop)
    what = f"solver {solver.name} on batch {batch} × n {n}: its working arrays"
    stored = _stored_vectors(solver, stop)
    option, per, count = max(stored, key=lambda item: item[1] * item[2], default=("", 0, 0))
    if per * count * batch * n * itemsize > need / 2:
        limits.check_bytes(
            need,
            what,
            key=f"solver.{option}",
            fix=f"most of it the {count} stored terms of solver.{option}; lower solver.{option}",
        )
    limits.check_bytes(need, what)
