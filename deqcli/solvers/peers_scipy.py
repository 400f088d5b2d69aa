"""scipy.optimize.root as peer solvers: one sample at a time, on the CPU, through the counted problem.

Every evaluation goes through the sample's counted ``g`` (and, for ``hybr`` and ``lm``, its
autodiff ``jacobian``: the same exact Jacobian our ``trust-region`` and ``newton`` get, instead of
n finite-difference evaluations). The counts of each sample are added to that sample's row of the
problem's counter.

What counts as one iteration in the replay (an accepted iterate, never a rejected trial point):

- ``krylov``, ``anderson``, ``df-sane``: one call of scipy's iteration callback;
- ``hybr``, ``lm`` (MINPACK has no callback): one evaluation at a point whose ‖g‖ is below every
  earlier one. MINPACK accepts a step only when it lowers ‖g‖, so a trial point it rejects (its
  residual did not fall) is counted as an evaluation but is not an iterate; a huge residual at a
  rejected trial no longer reads as divergence. (MINPACK may also decline a decrease smaller than
  10⁻⁴ of the predicted one; the replay then counts that point, the best one seen so far.)

Tolerances: the run stops as soon as an iterate meets the shared rule (``ConvergenceTest``, 2-norm).
scipy's own criteria are set so they cannot fire first where they measure the same thing
(``krylov``/``anderson``: fatol = atol in the 2-norm; ``df-sane``: fatol = atol, ftol = rtol) and to
about machine precision where they measure something else (``hybr``/``lm`` only have step-size
tests). The budget is max_iter iterations as defined above; ``hybr``/``lm`` also stop after
``MINPACK_EVALUATIONS_PER_ITERATION``·(max_iter + 1) evaluations, rejected trials included.

Arrays handed to scipy are copies, and so are the arrays scipy hands back: MINPACK and scipy's
nonlin reuse their work arrays in place, which would otherwise rewrite the recorded history.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from deqcli import deadline
from deqcli.solvers.peers import (
    EARLY_STOPS,
    PeerSolver,
    PeerStop,
    Recording,
    SharedRule,
    pad_stack,
    stop_message,
)

if TYPE_CHECKING:
    import numpy as np
    import torch

    from deqcli.problems.base import Problem
    from deqcli.solvers.base import StopRule

# Step tolerance for hybr/lm: about machine precision, so only the shared rule (or a genuine
# failure to progress) ends their run.
_MINPACK_XTOL = 1e-15
# hybr/lm evaluate rejected trial points too: their evaluation budget per allowed iteration.
MINPACK_EVALUATIONS_PER_ITERATION = 10
# MINPACK counts evaluations in a C int; a larger budget would overflow it.
_C_INT_MAX = 2**31 - 1


@dataclass
class ScipyRoot(PeerSolver):
    """Base adapter for ``scipy.optimize.root`` methods."""

    package: ClassVar[str] = "scipy"
    method: ClassVar[str] = ""
    uses_callback: ClassVar[bool] = True
    uses_jacobian: ClassVar[bool] = False

    def scipy_options(self, stop: StopRule) -> dict[str, Any]:
        """The method's options for scipy."""
        raise NotImplementedError

    def record(self, problem: Problem, z0: torch.Tensor, stop: StopRule) -> Recording:
        """Run scipy once per sample and collect what it visited."""
        zs: list[list[torch.Tensor]] = []
        gs: list[list[torch.Tensor]] = []
        messages: list[str] = []
        timed_out: list[bool] = []
        for b in range(problem.batch):
            z_rows, g_rows, message = self._run_sample(problem, z0, b, stop)
            zs.append(z_rows)
            gs.append(g_rows)
            messages.append(message)
            limit = deadline.current()
            timed_out.append(limit is not None and limit.expired())
        return Recording(
            zs=pad_stack(zs),
            gs=pad_stack(gs),
            lengths=[len(z) - 1 for z in zs],
            messages=messages,
            timed_out=timed_out,
        )

    def _run_sample(
        self, problem: Problem, z0: torch.Tensor, b: int, stop: StopRule
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
        import numpy as np
        import torch
        from scipy.optimize import root

        sample = problem.select(b)
        n = problem.dim
        x0 = z0[b].detach().cpu().to(torch.float64).numpy()
        z_rows: list[torch.Tensor] = []
        g_rows: list[torch.Tensor] = []
        rule = SharedRule(stop)  # the shared convergence test, fixed once g(z0) is known

        def as_tensor(x: np.ndarray) -> torch.Tensor:
            # A copy: MINPACK and scipy's nonlin reuse their work arrays in place.
            return torch.tensor(x, dtype=problem.dtype, device=problem.device).reshape(1, n)

        def keep(z: torch.Tensor, g: torch.Tensor) -> None:
            z_rows.append(z)
            g_rows.append(g)
            met = bool(rule.met(z, g))
            if len(z_rows) > 1 and (met or len(z_rows) > stop.max_iter):
                raise PeerStop

        best = [math.inf]  # the smallest ‖g‖ recorded so far (hybr/lm acceptance)

        def fun(x: np.ndarray) -> np.ndarray:
            z = as_tensor(x)
            g = sample.g(z)[0]
            norm = float(torch.linalg.vector_norm(g))
            if not z_rows:
                best[0] = norm
                keep(z[0], g)  # scipy evaluates the start first: that is the replay's start
            elif not self.uses_callback and norm < best[0]:
                best[0] = norm
                keep(z[0], g)  # an accepted MINPACK step; rejected trials are not iterates
            # A copy: scipy may overwrite the returned array, and g is kept in the recording.
            return g.detach().cpu().to(torch.float64).numpy().copy()

        def callback(x: np.ndarray, fx: np.ndarray) -> None:
            if len(z_rows) == 1 and np.array_equal(x, x0):
                return  # df-sane reports the start as its iteration 0
            z = as_tensor(x)[0]
            keep(z, torch.tensor(fx, dtype=problem.dtype, device=problem.device))

        def jac(x: np.ndarray) -> np.ndarray:
            _, j = sample.jacobian(as_tensor(x))
            return j[0].detach().cpu().to(torch.float64).numpy().copy()

        kwargs: dict[str, Any] = {"method": self.method, "options": self.scipy_options(stop)}
        if self.uses_callback:
            kwargs["callback"] = callback
        if self.uses_jacobian:
            kwargs["jac"] = jac
        try:
            sol = root(fun, x0, **kwargs)
            message = str(sol.message)
        except EARLY_STOPS as stop_:
            message = stop_message(stop_)
        except (ValueError, np.linalg.LinAlgError, ArithmeticError) as exc:
            message = f"scipy raised {type(exc).__name__}: {exc}".splitlines()[0]
        if not z_rows:  # the method failed (or the deadline passed) before evaluating anything
            with deadline.suspended():
                g0 = sample.g(z0[b : b + 1])[0]
            z_rows.append(z0[b])
            g_rows.append(g0)
        _merge_counts(problem, sample, b)
        return z_rows, g_rows, message


def _merge_counts(problem: Problem, sample: Problem, b: int) -> None:
    """Add the per-sample problem's counts to row b of the batch problem's counter."""
    for kind in ("nfev", "njev", "jvp", "vjp"):
        times = getattr(sample.counter, kind)[0]
        if times:
            problem.counter.bump(kind, rows=b, times=times)


def _two_norm() -> Callable[[np.ndarray], float]:
    import numpy as np

    return lambda v: float(np.linalg.norm(v))


@dataclass
class ScipyHybr(ScipyRoot):
    """MINPACK's hybrd/hybrj (Powell's hybrid method) with our autodiff Jacobian."""

    name: ClassVar[str] = "scipy:hybr"
    summary: ClassVar[str] = "scipy.optimize.root(method='hybr')"
    method: ClassVar[str] = "hybr"
    uses_callback: ClassVar[bool] = False
    uses_jacobian: ClassVar[bool] = True
    factor: float = 100.0
    """Initial step bound: factor·‖diag·z0‖ (or factor itself when that is zero); MINPACK's default."""
    diag: list[float] | None = None
    """Positive per-unknown scales (fixed for the run); None: MINPACK scales by the Jacobian's
    column norms and updates them."""

    def check(self) -> None:
        """factor must be positive; diag, when given, a list of positive numbers."""
        super().check()
        if not self.factor > 0:
            raise ValueError(
                f"factor: must be > 0 (MINPACK suggests 0.1 to 100), got {self.factor}"
            )
        if self.diag is not None:
            values = self.diag if isinstance(self.diag, list) else [self.diag]
            if not values or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values
            ):
                raise ValueError(f"diag: must be a list of positive numbers, got {self.diag!r}")
            self.diag = [float(v) for v in values]

    def record(self, problem: Problem, z0: torch.Tensor, stop: StopRule) -> Recording:
        """Check diag's length against the problem, then run as every scipy peer does."""
        if self.diag is not None and len(self.diag) != problem.dim:
            from deqcli.errors import UsageError

            raise UsageError(
                f"solver.diag: needs one positive scale per unknown ({problem.dim}), got {len(self.diag)}"
            )
        return super().record(problem, z0, stop)

    def scipy_options(self, stop: StopRule) -> dict[str, Any]:
        """Step tolerance at machine precision; the budget in evaluations; the scaling options."""
        options: dict[str, Any] = {
            "xtol": _MINPACK_XTOL,
            "maxfev": min(MINPACK_EVALUATIONS_PER_ITERATION * (stop.max_iter + 1), _C_INT_MAX),
            "factor": self.factor,
        }
        if self.diag is not None:
            import numpy as np

            options["diag"] = np.asarray(self.diag, dtype=np.float64)
        return options


@dataclass
class ScipyLm(ScipyRoot):
    """MINPACK's Levenberg–Marquardt (lmder) on ½‖g‖² with our autodiff Jacobian."""

    name: ClassVar[str] = "scipy:lm"
    summary: ClassVar[str] = "scipy.optimize.root(method='lm')"
    method: ClassVar[str] = "lm"
    uses_callback: ClassVar[bool] = False
    uses_jacobian: ClassVar[bool] = True

    def scipy_options(self, stop: StopRule) -> dict[str, Any]:
        """Step and reduction tolerances at machine precision; the budget in evaluations
        (``maxiter`` is lmder's maxfev)."""
        return {
            "xtol": _MINPACK_XTOL,
            "ftol": _MINPACK_XTOL,
            "gtol": 0.0,
            "maxiter": min(MINPACK_EVALUATIONS_PER_ITERATION * (stop.max_iter + 1), _C_INT_MAX),
        }


@dataclass
class ScipyKrylov(ScipyRoot):
    """scipy's Newton–Krylov (LGMRES on finite-difference Jacobian-vector products)."""

    name: ClassVar[str] = "scipy:krylov"
    summary: ClassVar[str] = "scipy.optimize.root(method='krylov')"
    method: ClassVar[str] = "krylov"

    def scipy_options(self, stop: StopRule) -> dict[str, Any]:
        """Absolute residual tolerance in the 2-norm, max_iter iterations."""
        return {"fatol": stop.atol, "tol_norm": _two_norm(), "maxiter": stop.max_iter}


@dataclass
class ScipyAnderson(ScipyRoot):
    """scipy's Anderson mixing (Eyert's form) with memory ``m``."""

    name: ClassVar[str] = "scipy:anderson"
    summary: ClassVar[str] = "scipy.optimize.root(method='anderson')"
    method: ClassVar[str] = "anderson"
    m: int = 5

    def check(self) -> None:
        """Memory must be positive."""
        super().check()
        if self.m < 1:
            raise ValueError(f"m: must be ≥ 1, got {self.m}")

    def scipy_options(self, stop: StopRule) -> dict[str, Any]:
        """Absolute residual tolerance in the 2-norm, max_iter iterations, memory m."""
        return {
            "fatol": stop.atol,
            "tol_norm": _two_norm(),
            "maxiter": stop.max_iter,
            "jac_options": {"M": self.m},
        }


@dataclass
class ScipyDfSane(ScipyRoot):
    """scipy's DF-SANE (derivative-free spectral residual method)."""

    name: ClassVar[str] = "scipy:df-sane"
    summary: ClassVar[str] = "scipy.optimize.root(method='df-sane')"
    method: ClassVar[str] = "df-sane"

    def scipy_options(self, stop: StopRule) -> dict[str, Any]:
        """The shared rule in df-sane's own terms (2-norm): fatol = atol, ftol = rtol."""
        return {
            "fatol": stop.atol,
            "ftol": stop.rtol,
            "maxfev": 10 * (stop.max_iter + 1),
        }
