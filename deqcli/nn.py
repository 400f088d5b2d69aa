"""``DEQLayer``: a training-ready equilibrium layer whose forward is any ``deq`` solver.

The forward pass solves z* = f(z*, x) with a ``deq`` solver under ``torch.no_grad`` (no autograd
graph through the iterations, so memory does not grow with them) and returns z* in the state's
shape. The backward pass is the implicit function theorem: for a loss ℓ(z*) the layer solves the
adjoint system (I − ∂f/∂z)ᵀ w = ∂ℓ/∂z* at z*, matrix-free (restarted GMRES on vector–Jacobian
products, the Krylov code the sensitivities use), and hands w to one application of f with
autograd, which gives dℓ/dθ = wᵀ ∂f/∂θ for every parameter θ of f and for x.

``backward="jfb"`` skips the adjoint solve (w = ∂ℓ/∂z*: the Jacobian-free, one-step gradient DEQ
training sometimes uses to save time); ``backward="implicit"`` is the exact gradient.

The statistics of the last call (forward iterations, evaluations, residual, status; backward
GMRES iterations and residual) are in ``layer.stats`` for logging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from deqcli.errors import UsageError
from deqcli.problems.base import Problem
from deqcli.problems.model import from_map
from deqcli.result import SolveResult
from deqcli.solvers import make_solver
from deqcli.solvers.base import StopRule, run
from deqcli.solvers.convergence import StopMode

Backward = Literal["implicit", "jfb"]


@dataclass
class LayerStats:
    """What the last forward (and backward) pass of a DEQLayer did."""

    solver: str
    status: str  # overall: converged only when every sample did
    converged_samples: int
    batch: int
    iterations: int  # of the slowest sample
    nfev: int  # evaluations of f (the slowest sample's; the batched calls)
    residual: float  # largest final ‖f(z) − z‖ over the samples
    relative_residual: float  # largest final ‖f(z) − z‖ / ‖f(z)‖
    backward_iterations: int | None = None  # GMRES matrix–vector products of the adjoint solve
    backward_residual: float | None = None  # its largest relative residual
    backward_converged: bool | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers, for a logger."""
        return asdict(self)


class DEQLayer(torch.nn.Module):
    """z* = f(z*, x) as a layer: any ``deq`` solver forward, the implicit function theorem backward.

    ``f`` is a callable or an ``nn.Module`` (registered as a submodule, so its parameters train and
    save with the layer) called as ``f(z, x)``, or ``f(z)`` when the layer is called without x. z
    may have any shape with the batch first, e.g. (B, C, H, W); the start is ``z0`` if given, else
    zeros in the shape ``f.init_state(x)`` returns, else ``state_shape``, else that of ``f(0, x)``.
    ``solver`` and ``solver_options`` name any solver of ``deq list-solvers``; ``atol``, ``rtol``,
    ``stop_mode`` and ``max_iter`` are the stopping rule of ``run:`` in a config (``atol`` defaults
    to the dtype's). ``backward_tol`` and ``backward_max_iter`` bound the adjoint solve.
    """

    def __init__(
        self,
        f: Callable[..., torch.Tensor],
        *,
        solver: str = "anderson",
        backward: Backward = "implicit",
        atol: float | None = None,
        rtol: float = 0.0,
        stop_mode: StopMode = "abs",
        max_iter: int = 100,
        backward_tol: float | None = None,
        backward_max_iter: int = 200,
        state_shape: tuple[int, ...] | None = None,
        solver_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if backward not in ("implicit", "jfb"):
            raise UsageError(f"backward: must be implicit or jfb, got {backward!r}")
        self.f = f
        self.solver = solver
        self.solver_options = dict(solver_options or {})
        make_solver(
            solver, self.solver_options
        )  # unknown names and options fail here, not mid-epoch
        self.backward = backward
        self.atol = atol
        self.rtol = rtol
        self.stop_mode = stop_mode
        self.max_iter = max_iter
        self.backward_tol = backward_tol
        self.backward_max_iter = backward_max_iter
        self.state_shape = state_shape
        # Shapes of z found by one call of f, by the shape of one input: not searched again.
        self._found: dict[tuple[int, ...] | None, tuple[int, ...]] = {}
        self.stats: LayerStats | None = None
        self.last_result: SolveResult | None = None

    def forward(
        self, x: torch.Tensor | None = None, z0: torch.Tensor | None = None
    ) -> torch.Tensor:
        """z* for the batch x (rows are samples), in the state's shape, differentiable by the IFT."""
        per_input = None if x is None else tuple(x.shape[1:])
        with torch.no_grad():
            problem = from_map(
                self.f,
                None if z0 is None else z0.detach(),
                None if x is None else x.detach(),
                name=type(self.f).__name__,
                kind="layer",
                key="DEQLayer.f",
                what="f",
                state_shape=self.state_shape or self._found.get(per_input),
                check=False,
            )
            self._found[per_input] = problem.sample_shape
            result = run(
                problem, make_solver(self.solver, self.solver_options), self._stop(problem)
            )
        result.state_shape = list(problem.sample_shape)
        self.last_result = result
        self.stats = _stats(result)
        z_star = result.z_star
        if not torch.is_grad_enabled():
            return z_star
        # One application of f with autograd carries the gradient to θ and x; the value stays z*.
        once = self.f(z_star, x) if x is not None else self.f(z_star)
        if not once.requires_grad:
            return z_star
        if self.backward == "implicit":
            once.register_hook(lambda grad: self._adjoint(problem, result.solution, grad))
        return z_star + (once - once.detach())

    def _stop(self, problem: Problem) -> StopRule:
        from deqcli.device import default_atol

        dtype = str(problem.dtype).removeprefix("torch.")
        return StopRule(
            atol=default_atol(dtype) if self.atol is None else self.atol,
            rtol=self.rtol,
            max_iter=self.max_iter,
            stop_mode=self.stop_mode,
        )

    def _adjoint(self, problem: Problem, z: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """w with (I − ∂f/∂z)ᵀ w = grad at z*: the backward pass of the implicit function theorem."""
        w, info = adjoint_solve(
            problem,
            z,
            grad.detach().reshape(z.shape),
            tol=self.backward_tol,
            max_iter=self.backward_max_iter,
        )
        if self.stats is not None:
            self.stats.backward_iterations = info.iterations
            self.stats.backward_residual = info.residual
            self.stats.backward_converged = info.converged
        return w.reshape(grad.shape).to(grad.dtype)


def adjoint_solve(
    problem: Problem,
    z: torch.Tensor,
    rhs: torch.Tensor,
    *,
    tol: float | None,
    max_iter: int,
) -> tuple[torch.Tensor, Any]:
    """Solve (∂g/∂z)ᵀ w = rhs per sample at z (both (B, n)) with the sensitivities' batched GMRES."""
    from deqcli.analyses.sensitivity import solve_linear

    w, info = solve_linear(problem, z, rhs[None], transpose=True, tol=tol, max_iter=max_iter)
    return w[0], info


def _stats(result: SolveResult) -> LayerStats:
    return LayerStats(
        solver=result.solver,
        status=result.status.value,
        converged_samples=sum(s.ok for s in result.sample_status),
        batch=result.batch,
        iterations=result.nit,
        nfev=result.counts.totals()["nfev"],
        residual=max(result.final_residuals(), default=0.0),
        relative_residual=max(result.final_relative(), default=0.0),
    )
