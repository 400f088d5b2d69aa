"""The solver registry: names, one-line summaries, and lazy loading of the implementing class.

The table is plain data so ``deq list-solvers`` can print it without importing torch.
"""

from __future__ import annotations

import difflib
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from deqcli.errors import UsageError

if TYPE_CHECKING:
    from deqcli.solvers.base import Solver


@dataclass(frozen=True)
class SolverInfo:
    """Where a solver lives and what it is for."""

    name: str
    target: str  # "module:Class"
    summary: str
    family: str = "deq"  # "deq" for ours, or the peer library's name

    def load(self) -> type[Solver]:
        """Import the implementing class (this may import torch and optional peers)."""
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)


_INFOS = [
    SolverInfo(
        "fixed_point",
        "deqcli.solvers.options:FixedPoint",
        "naive forward iteration z ← (1−β)z + βf(z); 1 f-eval per iteration",
    ),
    SolverInfo(
        "newton",
        "deqcli.solvers.options:Newton",
        "Newton with autodiff Jacobians, capped Armijo line search (or trust-region / LM)",
    ),
    SolverInfo(
        "anderson",
        "deqcli.solvers.options:Anderson",
        "Anderson acceleration (Walker–Ni, QR updating), depth m, conditioning safeguards",
    ),
    SolverInfo(
        "broyden",
        "deqcli.solvers.options:Broyden",
        "Broyden's good/bad method, limited memory, capped line search; no Jacobians",
    ),
    SolverInfo(
        "newton-krylov",
        "deqcli.solvers.options:NewtonKrylov",
        "Jacobian-free Newton: GMRES on autodiff JVPs, inexact forcing, line search (or trust "
        "region); large n",
    ),
    SolverInfo(
        "trust-region",
        "deqcli.solvers.options:TrustRegion",
        "Powell hybrid (MINPACK hybrj) per sample: dogleg, scaling, Broyden updates; hard systems",
    ),
    SolverInfo(
        "levenberg-marquardt",
        "deqcli.solvers.options:LevenbergMarquardt",
        "Levenberg–Marquardt with adaptive damping; robust where the Jacobian is singular",
    ),
    SolverInfo(
        "ptc",
        "deqcli.solvers.options:Ptc",
        "pseudo-transient continuation (Ψtc): the last resort far from a root",
    ),
    SolverInfo(
        "auto",
        "deqcli.solvers.options:Auto",
        "anderson, then newton, trust-region, levenberg-marquardt (or newton-krylov), then ptc",
    ),
    *(
        SolverInfo(
            f"scipy:{method}",
            f"deqcli.solvers.peers_scipy:{cls}",
            f"scipy.optimize.root(method='{method}'), one sample at a time on the CPU",
            family="scipy",
        )
        for method, cls in (
            ("hybr", "ScipyHybr"),
            ("lm", "ScipyLm"),
            ("krylov", "ScipyKrylov"),
            ("anderson", "ScipyAnderson"),
            ("df-sane", "ScipyDfSane"),
        )
    ),
    *(
        SolverInfo(
            f"torchdeq:{method}",
            f"deqcli.solvers.peers_torchdeq:{cls}",
            f"torchdeq's {method} solver (optional peer: pip install 'deqcli[peers]')",
            family="torchdeq",
        )
        for method, cls in (
            ("anderson", "TorchdeqAnderson"),
            ("broyden", "TorchdeqBroyden"),
            ("fixed_point_iter", "TorchdeqFixedPointIter"),
        )
    ),
]
SOLVERS: dict[str, SolverInfo] = {info.name: info for info in _INFOS}


def solver_info(name: str, *, key: str = "solver.name") -> SolverInfo:
    """The registry entry for ``name``, or a UsageError listing the valid names."""
    try:
        return SOLVERS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(SOLVERS), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise UsageError(
            f"{key}: unknown solver '{name}'{hint} (valid: {', '.join(SOLVERS)}; see deq list-solvers)"
        ) from None


def make_solver(name: str, options: dict[str, Any] | None = None, *, key: str = "solver") -> Solver:
    """Instantiate solver ``name`` with validated ``options``."""
    cls = solver_info(name, key=f"{key}.name").load()
    return cls.configure(dict(options or {}), key=key)
