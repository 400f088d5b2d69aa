"""The options of our solvers: typed dataclass fields with defaults and ``check()``, torch-free.

``deq validate`` and ``deq list-solvers`` build these (and reject bad values with errors naming
the key) without importing torch. Each class names in ``method`` the module and class that does
the mathematics; ``Solver`` loads it on the first ``init``. docs/solvers.md describes every option.

A Newton-type step is a *direction* (how the step is found: Newton with the autodiff Jacobian,
Broyden's good or bad update, Newton–Krylov) times a *globalisation* (how its length is chosen:
a backtracking line search with the Armijo test on ½‖g‖², a dogleg trust region, or
Levenberg–Marquardt damping). The named solvers are presets of such pairs; ``globalisation``
selects another pairing where it is meaningful.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from deqcli.errors import UsageError
from deqcli.solvers.base import Solver

if TYPE_CHECKING:
    from deqcli.problems.base import Problem

Globalisation = Literal["line-search", "trust-region", "levenberg-marquardt", "none"]
# auto's lists: dense Jacobians affordable, or not (see solvers/auto.py for the evidence rules).
DENSE_STAGES = ("anderson", "newton", "trust-region", "levenberg-marquardt", "ptc")
LARGE_STAGES = ("anderson", "newton-krylov", "ptc")
Scaling = Literal["jacobian", "none"]


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name}: must be > 0, got {value}")


def _open_unit(name: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(f"{name}: must lie in (0, 1), got {value}")


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ValueError(f"{name}: must be ≥ {low}, got {value}")


def _choice(name: str, value: str, allowed: tuple[str, ...], solver: str) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: solver '{solver}' supports {', '.join(allowed)}, got {value!r}")


@dataclass
class FixedPoint(Solver):
    """Naive forward iteration z ← z − β g(z)."""

    name: ClassVar[str] = "fixed_point"
    summary: ClassVar[str] = "naive forward iteration with optional damping"
    method: ClassVar[str] = "deqcli.solvers.fixed_point:FixedPointMethod"
    beta: float = 1.0

    def check(self) -> None:
        """β must lie in (0, 2)."""
        if not 0.0 < self.beta < 2.0:
            raise ValueError(f"beta: must lie in (0, 2), got {self.beta}")


@dataclass
class Anderson(Solver):
    """Anderson acceleration (Walker–Ni) with a QR-updated least-squares problem."""

    name: ClassVar[str] = "anderson"
    summary: ClassVar[str] = "Anderson acceleration (Walker–Ni, QR updating), safeguards"
    method: ClassVar[str] = "deqcli.solvers.anderson:AndersonMethod"
    m: int = 5
    beta: float = 1.0
    lam: float = 0.0
    restart: bool = True
    cond_max: float = 1e9
    growth: float = 1e4
    stall: int = 20
    plain: int = 50
    globalisation: Literal["none", "line-search"] = "none"
    max_backtracks: int = 5
    window: int = 5

    def check(self) -> None:
        """Validate the depth, mixing, safeguard and line-search settings."""
        _at_least("m", self.m, 1)
        _at_least("stall", self.stall, 0)
        _at_least("plain", self.plain, 1)
        if not 0.0 < self.beta <= 2.0:
            raise ValueError(f"beta: must lie in (0, 2], got {self.beta}")
        if not 0.0 <= self.lam < 1.0:
            raise ValueError(f"lam: must lie in [0, 1), got {self.lam}")
        if self.cond_max <= 1.0:
            raise ValueError(f"cond_max: must be > 1, got {self.cond_max}")
        if self.growth <= 1.0:
            raise ValueError(f"growth: must be > 1, got {self.growth}")
        _at_least("max_backtracks", self.max_backtracks, 0)
        _at_least("window", self.window, 1)


@dataclass
class _LineSearchOptions(Solver):
    """The backtracking line search's settings, shared by the Newton-type presets."""

    line_search: bool = True
    max_backtracks: int = 20
    c: float = 1e-4
    step_max: float = 1e3

    def _check_line_search(self) -> None:
        _at_least("max_backtracks", self.max_backtracks, 0)
        _open_unit("c", self.c)
        _positive("step_max", self.step_max)

    def effective_globalisation(self) -> str:
        """The globalisation in force (``line_search: false`` turns the line search off)."""
        chosen = getattr(self, "globalisation", "line-search")
        return "none" if chosen == "line-search" and not self.line_search else chosen


@dataclass
class Newton(_LineSearchOptions):
    """Newton's method with autodiff Jacobians; line search by default."""

    name: ClassVar[str] = "newton"
    summary: ClassVar[str] = "Newton with autodiff Jacobians and a capped Armijo line search"
    method: ClassVar[str] = "deqcli.solvers.methods:NewtonMethod"
    globalisation: Globalisation = "line-search"
    factor: float = 100.0
    scaling: Scaling = "jacobian"
    damping: float = 1e-3

    def check(self) -> None:
        """Validate the line-search, trust-region and damping settings."""
        self._check_line_search()
        _positive("factor", self.factor)
        _positive("damping", self.damping)


@dataclass
class Broyden(_LineSearchOptions):
    """Broyden's method (good or bad update), limited memory, no Jacobians."""

    name: ClassVar[str] = "broyden"
    summary: ClassVar[str] = "Broyden's good/bad method, limited memory, capped line search"
    method: ClassVar[str] = "deqcli.solvers.methods:BroydenMethod"
    memory: int = 500
    when_full: Literal["restart", "slide"] = "restart"
    h0: float = 1.0
    update: Literal["auto", "good", "bad"] = "auto"
    globalisation: Globalisation = "line-search"
    max_backtracks: int = 6
    window: int = 100
    factor: float = 100.0

    def check(self) -> None:
        """Validate memory, update and line-search settings."""
        _at_least("memory", self.memory, 1)
        _choice("when_full", self.when_full, ("restart", "slide"), self.name)
        if self.h0 <= 0:
            raise ValueError(f"h0: must be > 0, got {self.h0}")
        self._check_line_search()
        _at_least("window", self.window, 1)
        _positive("factor", self.factor)
        _choice(
            "globalisation",
            self.globalisation,
            ("line-search", "trust-region", "none"),
            self.name,
        )


@dataclass
class NewtonKrylov(_LineSearchOptions):
    """Jacobian-free inexact Newton: GMRES on JVPs, Eisenstat–Walker forcing; line search by
    default, or a Krylov dogleg trust region (``globalisation: trust-region``)."""

    name: ClassVar[str] = "newton-krylov"
    summary: ClassVar[str] = "Jacobian-free Newton–Krylov (GMRES on JVPs)"
    method: ClassVar[str] = "deqcli.solvers.methods:NewtonKrylovMethod"
    krylov_dim: int = 40
    forcing: Literal["ew", "constant"] = "ew"
    eta: float = 0.5
    eta_max: float = 0.9
    globalisation: Globalisation = "line-search"
    factor: float = 100.0
    precondition: Literal["auto", "shared", "none"] = "auto"

    def check(self) -> None:
        """Validate the Krylov, forcing, line-search, trust-region and preconditioner settings."""
        _at_least("krylov_dim", self.krylov_dim, 1)
        _open_unit("eta", self.eta)
        _open_unit("eta_max", self.eta_max)
        self._check_line_search()
        _positive("factor", self.factor)
        _choice(
            "globalisation", self.globalisation, ("line-search", "trust-region", "none"), self.name
        )
        _choice("precondition", self.precondition, ("auto", "shared", "none"), self.name)


@dataclass
class TrustRegion(Solver):
    """Powell's hybrid dogleg method per sample, as MINPACK's hybrj does it."""

    name: ClassVar[str] = "trust-region"
    summary: ClassVar[str] = "Powell hybrid (hybrj) per sample: dogleg, scaling, Broyden updates"
    method: ClassVar[str] = "deqcli.solvers.methods:TrustRegionMethod"
    factor: float = 100.0
    scaling: Scaling = "jacobian"
    update: Literal["broyden", "exact"] = "broyden"
    memory: int = 50

    def check(self) -> None:
        """Validate the radius factor and the model's memory."""
        _positive("factor", self.factor)
        _at_least("memory", self.memory, 1)


@dataclass
class LevenbergMarquardt(Solver):
    """Levenberg–Marquardt on ½‖g‖² with adaptive damping and column scaling."""

    name: ClassVar[str] = "levenberg-marquardt"
    summary: ClassVar[str] = "Levenberg–Marquardt, adaptive damping; robust where J is singular"
    method: ClassVar[str] = "deqcli.solvers.methods:LevenbergMarquardtMethod"
    damping: float = 1e-3
    scaling: Scaling = "jacobian"

    def check(self) -> None:
        """The initial damping must be positive."""
        _positive("damping", self.damping)


@dataclass
class Ptc(Solver):
    """Pseudo-transient continuation (Ψtc) with switched evolution relaxation."""

    name: ClassVar[str] = "ptc"
    summary: ClassVar[str] = "pseudo-transient continuation (Ψtc): last resort far from a root"
    method: ClassVar[str] = "deqcli.solvers.ptc:PtcMethod"
    dt0: float = 1.0
    dt_max: float = 1e12
    growth: float = 10.0
    linear: Literal["auto", "dense", "krylov"] = "auto"
    krylov_dim: int = 40

    def check(self) -> None:
        """Validate the pseudo-time steps and the linear solver."""
        _positive("dt0", self.dt0)
        if self.dt_max < self.dt0:
            raise ValueError(f"dt_max: must be ≥ dt0 ({self.dt0}), got {self.dt_max}")
        if self.growth <= 1.0:
            raise ValueError(f"growth: must be > 1, got {self.growth}")
        _at_least("krylov_dim", self.krylov_dim, 1)


@dataclass
class Auto(Solver):
    """An ordered list of presets with the evidence that moves a run from one to the next."""

    name: ClassVar[str] = "auto"
    summary: ClassVar[str] = (
        "anderson, then newton, trust-region, levenberg-marquardt (or newton-krylov), then ptc"
    )
    method: ClassVar[str] = "deqcli.solvers.auto:AutoMethod"
    m: int = 5
    patience: int = 30
    newton_patience: int = 20
    progress: float = 0.5
    growth: float = 100.0
    dense_max: int = 1000
    stages: str = ""
    probe: bool = True

    def stage_list(self) -> list[str]:
        """The presets named in ``stages`` (empty: the default list for the problem)."""
        return [name.strip() for name in self.stages.split(",") if name.strip()]

    def stage_names(self, problem: Problem) -> list[str]:
        """The presets ``auto`` tries on ``problem``, in order (see ``solvers/auto.py``)."""
        chosen = self.stage_list()
        if chosen:
            return chosen
        dense = problem.dim <= self.dense_max
        if dense:
            try:
                problem.check_dense_fits()
            except UsageError:
                dense = False
        stages = list(DENSE_STAGES if dense else LARGE_STAGES)
        if problem.form == "residual":
            # Anderson accelerates a fixed-point map; a residual g has only the naive map
            # z − g(z), whose contraction nothing suggests (its scale is arbitrary).
            stages.remove("anderson")
        return stages

    def check(self) -> None:
        """Validate the switching rules and the stage list."""
        from deqcli.solvers import SOLVERS

        allowed = [n for n, info in SOLVERS.items() if info.family == "deq" and n != "auto"]
        for name in self.stage_list():
            if name not in allowed:
                raise ValueError(f"stages: unknown preset '{name}' (valid: {', '.join(allowed)})")
        _at_least("m", self.m, 1)
        _at_least("patience", self.patience, 1)
        _at_least("newton_patience", self.newton_patience, 1)
        _open_unit("progress", self.progress)
        if self.growth <= 1.0:
            raise ValueError(f"growth: must be > 1, got {self.growth}")
        _at_least("dense_max", self.dense_max, 1)
