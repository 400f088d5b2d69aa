"""Can the gradient through a fixed point be trusted? Three gradients of one loss, compared.

For a scalar loss ℓ(z*(a)) of the solution (default: the sum of squares over every sample):

1. the implicit-function-theorem gradient: one adjoint solve (I − ∂f/∂z)ᵀ w = ∇ℓ, then −wᵀ ∂g/∂a;
2. backpropagation through the unrolled forward iterations: the map applied, under autograd, as many
   times as the forward solve iterated (z ← z − β g(z), with the fixed_point solver's damping β);
3. central finite differences of ℓ along a few random unit directions in parameter space, each side
   re-solved tightly from the solution (warm start), so they are the reference.

A forward solve can converge while (1) is still wrong: the tolerance was too loose for the accuracy
asked of the gradient, ρ(∂f/∂z) is close to 1 (errors in z* are amplified by about 1/(1 − ρ)), or
I − ∂f/∂z is near singular. ``gradcheck`` flags that case and names the likely cause, testing the
first one directly: it re-solves the forward problem tightly and recomputes (1) there.

The autodiff Jacobian of the map itself is checked against finite differences as well: a map with a
non-differentiable step or a detached tensor gives wrong gradients whatever the solver does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.func import jvp, vmap

from deqcli.analyses.sensitivity import (
    Conditioning,
    LinearSolve,
    check_param,
    conditioning,
    differentiable_params,
    json_nested,
    loss_gradient,
)
from deqcli.config import Config
from deqcli.errors import UsageError
from deqcli.expr import ExpressionError, parse_expression
from deqcli.problems.base import Problem
from deqcli.result import SolveResult, _num
from deqcli.schemas import GRADCHECK_KIND, GRADCHECK_VERSION

DEFAULT_LOSS = "sum(z**2)"
# Spectral radius of ∂f/∂z from which errors in z* are amplified enough to call it "close to 1".
RHO_CLOSE_TO_ONE = 0.99
# The unrolled graph keeps every iterate; beyond this many stored scalars the unroll is cut short.
UNROLL_BUDGET = 50_000_000
# Components of z checked one by one (all basis directions) in the Jacobian check up to this n.
JACOBIAN_BASIS_LIMIT = 16


@dataclass
class GradcheckOptions:
    """What to check and how strictly. ``None`` means the dtype's default."""

    params: list[str] | None = None  # default: every differentiable parameter
    loss: str | None = None  # expression in z (one sample's vector) and n; default sum(z**2)
    directions: int = 3
    eps: float | None = None  # finite-difference step along a unit direction
    rtol: float | None = None  # agreement tolerance between the IFT and the finite differences
    fd_atol: float | None = None  # tolerance of the finite-difference re-solves
    unroll: int | None = None  # unrolled iterations (default: as many as the forward solve took)
    seed: int = 0


def defaults(dtype: torch.dtype) -> dict[str, float]:
    """Step, agreement tolerance and Jacobian-check tolerance suited to the precision."""
    if dtype == torch.float64:
        return {"eps": 1e-5, "rtol": 1e-5, "jac_rtol": 1e-6}
    return {"eps": 3e-3, "rtol": 2e-2, "jac_rtol": 2e-2}


# -- the loss -----------------------------------------------------------------------------------------


def make_loss(text: str | None, dim: int) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """The loss as (text, function of the (B, n) solution): the expression per sample, summed.

    The expression sees one sample's solution ``z`` (a vector of length n) and ``n``; it must give a
    scalar. It is parsed by the safe expression language (never eval).
    """
    text = text if text is not None else DEFAULT_LOSS
    expr = parse_expression(text, key="--loss", names={"z", "n"})

    def single(z: torch.Tensor) -> torch.Tensor:
        out = expr.evaluate({"z": z, "n": dim}, dtype=z.dtype, device=z.device)
        if out.numel() != 1:
            raise ExpressionError(
                "--loss", f"the loss must be a scalar, got shape {tuple(out.shape)}"
            )
        return out.reshape(())

    def loss(z: torch.Tensor) -> torch.Tensor:
        return vmap(single)(z).sum()

    return text, loss


# -- the report ---------------------------------------------------------------------------------------


@dataclass
class DirectionCheck:
    """One random direction d: the directional derivative dℓ/da·d three ways."""

    ift: float
    unrolled: float
    finite_difference: float
    error_ift: float  # |ift − fd| / scale
    error_unrolled: float
    resolves_converged: bool


@dataclass
class JacobianCheck:
    """Autodiff directional derivatives of g against central differences."""

    what: str  # "∂g/∂z" or "∂g/∂a"
    directions: int
    max_abs: float
    max_rel: float
    step: float
    ok: bool

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {
            "of": self.what,
            "directions": self.directions,
            "max_abs_discrepancy": _num(self.max_abs),
            "max_rel_discrepancy": _num(self.max_rel),
            "step": self.step,
            "ok": self.ok,
        }


@dataclass
class GradcheckReport:
    """Everything ``deq gradcheck`` found."""

    problem: str
    params: list[str]
    loss_text: str
    loss: float
    forward: SolveResult
    ift: dict[str, torch.Tensor]
    backward: LinearSolve
    unrolled: dict[str, torch.Tensor]
    unroll_steps: int
    unroll_residual: float
    directions: list[DirectionCheck]
    eps: float
    rtol: float
    fd_atol: float
    refined_error_ift: float  # IFT at the tightly re-solved z* against the finite differences
    fd_truncation: (
        float  # estimated relative truncation error of the finite differences (0: not needed)
    )
    solution_shift: float  # ‖z*_tight − z*‖∞
    conditioning: Conditioning
    jacobian_checks: list[JacobianCheck]
    causes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def error_ift(self) -> float:
        """Worst relative disagreement between the IFT gradient and finite differences."""
        return max((d.error_ift for d in self.directions), default=0.0)

    @property
    def error_unrolled(self) -> float:
        """Worst relative disagreement between the unrolled gradient and finite differences."""
        return max((d.error_unrolled for d in self.directions), default=0.0)

    @property
    def ift_vs_unrolled(self) -> float:
        """‖g_unrolled − g_ift‖ / ‖g_ift‖ over all checked parameters."""
        diff = math.sqrt(
            sum(float(((self.unrolled[k] - v) ** 2).sum()) for k, v in self.ift.items())
        )
        return diff / max(_gnorm(self.ift), torch.finfo(torch.float64).tiny)

    @property
    def agree(self) -> bool:
        """The IFT gradient matches the finite differences within ``rtol``."""
        return self.error_ift <= self.rtol

    @property
    def jacobian_ok(self) -> bool:
        """The map's autodiff derivatives match finite differences."""
        return all(c.ok for c in self.jacobian_checks)

    @property
    def silent_failure(self) -> bool:
        """The seed's warning: the forward solve converged, yet the IFT gradient is wrong."""
        return self.forward.status.ok and not self.agree

    @property
    def ok(self) -> bool:
        """Forward converged, gradients agree and the map's Jacobian checks out."""
        return self.forward.status.ok and self.agree and self.jacobian_ok

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready document (``kind: deq.gradcheck``)."""
        return {
            "kind": GRADCHECK_KIND,
            "schema_version": GRADCHECK_VERSION,
            "problem": self.problem,
            "ok": self.ok,
            "agree": self.agree,
            "silent_failure": self.silent_failure,
            "loss": {"expression": self.loss_text, "value": _num(self.loss)},
            "parameters": self.params,
            "forward": {
                "status": self.forward.status.value,
                "solver": self.forward.solver,
                "iterations": self.forward.nit,
                "residual": _num(max(self.forward.final_residuals(), default=0.0)),
                "atol": self.forward.atol,
            },
            "ift": {
                "gradient_norm": _num(_gnorm(self.ift)),
                "error_vs_fd": _num(self.error_ift),
                "at_refined_solution_error_vs_fd": _num(self.refined_error_ift),
                "backward_solve": self.backward.to_dict(),
                "gradient": {k: json_nested(v.detach().cpu().tolist()) for k, v in self.ift.items()}
                if sum(v.numel() for v in self.ift.values()) <= 10_000
                else "omitted (more than 10000 entries)",
            },
            "unrolled": {
                "steps": self.unroll_steps,
                "final_residual": _num(self.unroll_residual),
                "gradient_norm": _num(_gnorm(self.unrolled)),
                "error_vs_fd": _num(self.error_unrolled),
                "rel_diff_vs_ift": _num(self.ift_vs_unrolled),
            },
            "finite_differences": {
                "eps": self.eps,
                "rtol": self.rtol,
                "fd_atol": self.fd_atol,
                "solution_shift_when_tightened": _num(self.solution_shift),
                "truncation_estimate": _num(self.fd_truncation),
                "directions": [
                    {
                        "ift": _num(d.ift),
                        "unrolled": _num(d.unrolled),
                        "finite_difference": _num(d.finite_difference),
                        "error_ift": _num(d.error_ift),
                        "error_unrolled": _num(d.error_unrolled),
                        "resolves_converged": d.resolves_converged,
                    }
                    for d in self.directions
                ],
            },
            "jacobian_checks": [c.to_dict() for c in self.jacobian_checks],
            "conditioning": self.conditioning.to_dict(),
            "causes": self.causes,
            "notes": self.notes,
        }


# -- the check ----------------------------------------------------------------------------------------


def gradcheck(
    cfg: Config, options: GradcheckOptions | None = None, *, problem: Problem | None = None
) -> GradcheckReport:
    """Solve the config's problem and compare the three gradients of the loss (see the module doc)."""
    from deqcli.api import load_problem
    from deqcli.api import solve as api_solve

    options = options or GradcheckOptions()
    problem = problem if problem is not None else load_problem(cfg)
    names = _chosen(problem, options.params)
    loss_text, loss = make_loss(options.loss, problem.dim)
    _probe_loss(loss, problem.z0)
    dflt = defaults(problem.dtype)
    eps = options.eps if options.eps is not None else dflt["eps"]
    rtol = options.rtol if options.rtol is not None else dflt["rtol"]
    if options.directions < 1:
        raise UsageError("--directions: must be at least 1")
    if not (eps > 0 and math.isfinite(eps)):
        raise UsageError(f"--eps: must be a positive, finite step, got {eps}")
    if not (rtol > 0 and math.isfinite(rtol)):
        raise UsageError(f"--grad-rtol: must be a positive, finite tolerance, got {rtol}")

    # Only the forward solution matters here; the convergence diagnostics would add nothing.
    result = api_solve(cfg, problem=problem, diagnostics=False)
    z = result.solution.detach()
    notes: list[str] = []
    if not result.status.ok:
        notes.append(
            f"the forward solve did not converge ({result.status.value}): every gradient below is "
            "taken at the last iterate, which is not a fixed point"
        )
    fd_atol = _fd_atol(options.fd_atol, cfg, z)
    ift = loss_gradient(problem, z, loss, names)
    cond = conditioning(problem, z)

    steps, beta = _unroll_plan(problem, result, options.unroll, notes)
    unrolled, unroll_res = unrolled_gradient(problem, loss, names, steps, beta)

    # The reference: the same problem re-solved tightly, at the nominal and perturbed parameters.
    tight = _resolve(cfg, problem, {}, z, fd_atol)
    z_tight = tight.solution.detach()
    shift = float((z_tight - z).abs().max())
    refined = loss_gradient(problem, z_tight, loss, names)
    if not tight.status.ok:
        notes.append(
            f"the tight re-solve (atol {fd_atol:.2g}) ended {tight.status.value}; finite differences are "
            "less reliable than usual"
        )

    gen = torch.Generator(device="cpu").manual_seed(options.seed)
    checks = []
    refined_err = 0.0
    typical = _gnorm(ift.grads) / math.sqrt(sum(problem.params[k].numel() for k in names))
    directions = []
    for _ in range(options.directions):
        d = _direction(problem, names, gen)
        directions.append(d)
        plus = _resolve(cfg, problem, _shifted(problem, d, eps), z_tight, fd_atol)
        minus = _resolve(cfg, problem, _shifted(problem, d, -eps), z_tight, fd_atol)
        with torch.no_grad():
            fd = (float(loss(plus.solution)) - float(loss(minus.solution))) / (2 * eps)
        dd_ift = _dot(ift.grads, d)
        dd_unrolled = _dot(unrolled, d)
        # Relative to the directional derivative itself, floored by the typical size of a random
        # projection of the gradient, ‖∇ℓ‖/√P, so a direction nearly orthogonal to it cannot inflate it.
        scale = max(abs(fd), abs(dd_ift), typical, torch.finfo(torch.float64).tiny)
        refined_err = max(refined_err, abs(_dot(refined.grads, d) - fd) / scale)
        checks.append(
            DirectionCheck(
                ift=dd_ift,
                unrolled=dd_unrolled,
                finite_difference=fd,
                error_ift=abs(dd_ift - fd) / scale,
                error_unrolled=abs(dd_unrolled - fd) / scale,
                resolves_converged=plus.status.ok and minus.status.ok,
            )
        )

    # When the gradients disagree, is the reference itself accurate? Central differences err by
    # about c·eps²; the same difference at eps/2 measures that: fd(eps) − fd(eps/2) ≈ ¾ c·eps².
    truncation = 0.0
    if checks and max(c.error_ift for c in checks) > rtol:
        worst = max(range(len(checks)), key=lambda k: checks[k].error_ift)
        d = directions[worst]
        half = eps / 2
        plus = _resolve(cfg, problem, _shifted(problem, d, half), z_tight, fd_atol)
        minus = _resolve(cfg, problem, _shifted(problem, d, -half), z_tight, fd_atol)
        with torch.no_grad():
            fd_half = (float(loss(plus.solution)) - float(loss(minus.solution))) / (2 * half)
        fd = checks[worst].finite_difference
        scale = max(abs(fd), abs(checks[worst].ift), typical, torch.finfo(torch.float64).tiny)
        truncation = abs(fd - fd_half) * 4 / 3 / scale

    jac_checks = jacobian_checks(
        problem, z, names, gen, count=options.directions, rtol=dflt["jac_rtol"]
    )
    report = GradcheckReport(
        problem=problem.name,
        params=names,
        loss_text=loss_text,
        loss=ift.loss,
        forward=result,
        ift=ift.grads,
        backward=ift.solve,
        unrolled=unrolled,
        unroll_steps=steps,
        unroll_residual=unroll_res,
        directions=checks,
        eps=eps,
        rtol=rtol,
        fd_atol=fd_atol,
        refined_error_ift=refined_err,
        fd_truncation=truncation,
        solution_shift=shift,
        conditioning=cond,
        jacobian_checks=jac_checks,
        notes=notes,
    )
    report.causes = diagnose(report, cfg)
    return report


def _chosen(problem: Problem, wanted: list[str] | None) -> list[str]:
    usable = differentiable_params(problem)
    if wanted:
        for name in wanted:
            check_param(problem, name, flag="--param")
        return list(dict.fromkeys(wanted))
    if not usable:
        raise UsageError(
            f"problem '{problem.name}' has no differentiable parameters; give it params (expression "
            "problems), or use a tanh_layer or an nn.Module map"
        )
    return list(usable)


def _probe_loss(loss: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor) -> None:
    """Evaluate the loss once at z0: it must be a real number that depends on z."""
    try:
        with torch.enable_grad():
            z = z0.detach().clone().requires_grad_(True)
            value = loss(z)
    except ExpressionError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise UsageError(
            f"--loss: cannot be evaluated on the solution: {str(exc).splitlines()[0]}"
        ) from None
    if not value.is_floating_point():
        raise UsageError(
            f"--loss: must be a real number; this one gives {str(value.dtype).removeprefix('torch.')} "
            "values (a condition such as z > 0 has no gradient); e.g. sum(where(z > 0, z, 0))"
        )
    if not value.requires_grad:
        raise UsageError(
            "--loss: does not depend on z, so every gradient is zero; give a loss of the "
            "solution such as sum(z**2)"
        )
    if not bool(torch.isfinite(value)):
        raise UsageError("--loss: is not finite at the initial point; choose another loss")


def _fd_atol(given: float | None, cfg: Config, z: torch.Tensor) -> float:
    if given is not None:
        if not (given > 0 and math.isfinite(given)):
            raise UsageError(f"--fd-atol: must be a positive, finite tolerance, got {given}")
        return given
    # Tight, but not below what rounding lets a residual reach for a solution of this size.
    eps = torch.finfo(z.dtype).eps
    floor = 100 * eps * (1.0 + float(torch.linalg.vector_norm(z, dim=1).max()))
    wanted = 1e-13 if z.dtype == torch.float64 else 1e-6
    return max(min(cfg.atol, wanted), floor)


def _resolve(
    cfg: Config,
    problem: Problem,
    params: dict[str, torch.Tensor],
    start: torch.Tensor,
    atol: float,
) -> SolveResult:
    """The config's solver on (a copy of) the problem, from ``start``, to tolerance ``atol``."""
    from deqcli.api import stop_rule
    from deqcli.solvers import make_solver
    from deqcli.solvers.base import run

    variant = problem.with_params(**params).with_start(start.clone())
    stop = replace(stop_rule(cfg), atol=atol, rtol=0.0, max_iter=max(10 * cfg.run.max_iter, 1000))
    return run(variant, make_solver(cfg.solver.name, cfg.solver.options), stop)


def _direction(problem: Problem, names: list[str], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A random direction over all chosen parameters, of unit 2-norm overall."""
    d = {k: torch.randn(problem.params[k].shape, generator=gen, dtype=torch.float64) for k in names}
    total = math.sqrt(sum(float((v**2).sum()) for v in d.values()))
    like = problem.params
    return {k: (v / total).to(dtype=like[k].dtype, device=like[k].device) for k, v in d.items()}


def _shifted(problem: Problem, d: dict[str, torch.Tensor], step: float) -> dict[str, torch.Tensor]:
    return {k: problem.params[k] + step * v for k, v in d.items()}


def _dot(grads: dict[str, torch.Tensor], d: dict[str, torch.Tensor]) -> float:
    return sum(float((grads[k].to(torch.float64) * d[k].to(torch.float64)).sum()) for k in d)


def _gnorm(grads: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((v.to(torch.float64) ** 2).sum()) for v in grads.values()))


# -- the unrolled gradient ------------------------------------------------------------------------------


def _unroll_plan(
    problem: Problem, result: SolveResult, unroll: int | None, notes: list[str]
) -> tuple[int, float]:
    """How many unrolled steps, with which damping β."""
    beta = float(result.options.get("beta", 1.0)) if result.solver == "fixed_point" else 1.0
    if unroll is not None and unroll < 0:
        raise UsageError(f"--unroll: must be at least 0, got {unroll}")
    steps = result.nit if unroll is None else unroll
    if unroll is None and result.solver != "fixed_point":
        notes.append(
            f"the forward solve used {result.solver}; the unrolled gradient backpropagates through "
            f"{steps} plain iterations z ← f(z) from z0 instead (see its final residual; --unroll sets the count)"
        )
    limit = max(1, UNROLL_BUDGET // max(1, problem.batch * problem.dim))
    if steps > limit:
        notes.append(f"unrolling cut to {limit} iterations to keep the autograd graph in memory")
        steps = limit
    return steps, beta


def unrolled_gradient(
    problem: Problem,
    loss: Callable[[torch.Tensor], torch.Tensor],
    names: list[str],
    steps: int,
    beta: float = 1.0,
) -> tuple[dict[str, torch.Tensor], float]:
    """dℓ(z_T)/da by backpropagation through T damped iterations z ← z − β g(z) from z0.

    This differentiates the iteration, it does not solve anything: T is fixed in advance. Returns the
    gradients and the largest final residual ‖g(z_T)‖ (how close the unrolled path got to z*).
    """
    leaves = {k: problem.params[k].detach().clone().requires_grad_(True) for k in names}
    params = {**problem.params, **leaves}
    with torch.enable_grad():
        z = problem.z0.detach()
        for _ in range(steps):
            z = z - beta * problem.raw_g(z, params)
        value = loss(z)
        if value.requires_grad:
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        else:  # no iterations (--unroll 0): z_T = z0 does not depend on the parameters
            grads = (None,) * len(leaves)
    with torch.no_grad():
        residual = float(torch.linalg.vector_norm(problem.raw_g(z.detach()), dim=1).max())
    out = {
        k: (g.detach() if g is not None else torch.zeros_like(leaves[k]))
        for k, g in zip(names, grads, strict=True)
    }
    return out, residual


# -- the map's own Jacobian -----------------------------------------------------------------------------


def jacobian_checks(
    problem: Problem,
    z: torch.Tensor,
    names: list[str],
    gen: torch.Generator,
    *,
    count: int = 3,
    rtol: float = 1e-6,
) -> list[JacobianCheck]:
    """Autodiff ∂g/∂z and ∂g/∂a along directions against central differences of g.

    ∂g/∂z is checked on every basis vector for n ≤ 16, else on ``count`` random unit vectors; ∂g/∂a on
    ``count`` random unit directions over the chosen parameters. The step is ∛ε·max(1, ‖·‖∞), the
    usual balance of truncation against rounding for central differences.
    """
    z = z.detach()
    cube = torch.finfo(z.dtype).eps ** (1 / 3)
    n = problem.dim
    if n <= JACOBIAN_BASIS_LIMIT:
        dirs = list(torch.eye(n, dtype=z.dtype, device=z.device))
    else:
        dirs = []
        for _ in range(count):
            v = torch.randn(n, generator=gen, dtype=torch.float64)
            dirs.append((v / torch.linalg.vector_norm(v)).to(dtype=z.dtype, device=z.device))
    h = cube * max(1.0, float(z.abs().max()))
    worst_abs = worst_rel = 0.0
    with torch.no_grad():
        for v in dirs:
            tangent = v.expand_as(z)
            auto = jvp(problem.raw_g, (z,), (tangent,))[1]
            fd = (problem.raw_g(z + h * tangent) - problem.raw_g(z - h * tangent)) / (2 * h)
            a, r = _discrepancy(auto, fd)
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
    out = [JacobianCheck("∂g/∂z", len(dirs), worst_abs, worst_rel, h, worst_rel <= rtol)]

    params = dict(problem.params)
    scale = max(1.0, max(float(params[k].abs().max()) for k in names))
    hp = cube * scale
    worst_abs = worst_rel = 0.0
    with torch.no_grad():
        for _ in range(count):
            d = _direction(problem, names, gen)

            def g_of(*values: torch.Tensor) -> torch.Tensor:
                return problem.raw_g(z, {**params, **dict(zip(names, values, strict=True))})

            primals = tuple(params[k] for k in names)
            auto = jvp(g_of, primals, tuple(d[k] for k in names))[1]
            plus = g_of(*(params[k] + hp * d[k] for k in names))
            minus = g_of(*(params[k] - hp * d[k] for k in names))
            a, r = _discrepancy(auto, (plus - minus) / (2 * hp))
            worst_abs, worst_rel = max(worst_abs, a), max(worst_rel, r)
    out.append(JacobianCheck("∂g/∂a", count, worst_abs, worst_rel, hp, worst_rel <= rtol))
    return out


def _discrepancy(auto: torch.Tensor, fd: torch.Tensor) -> tuple[float, float]:
    """Largest absolute difference, and that relative to the larger of the two derivatives' sizes."""
    diff = float((auto - fd).abs().max())
    if math.isnan(diff):
        return math.inf, math.inf
    scale = max(float(auto.abs().max()), float(fd.abs().max()), 1e-300)
    return diff, diff / scale if scale > 1e-300 else 0.0


# -- why the gradients disagree ---------------------------------------------------------------------------


def diagnose(report: GradcheckReport, cfg: Config) -> list[str]:
    """Likely causes when the IFT gradient disagrees with the finite differences (empty when it agrees)."""
    causes: list[str] = []
    if not report.forward.status.ok:
        # Nothing else can be judged: every derivative was taken at a point that is not z*.
        return [
            f"the forward solve did not converge ({report.forward.status.value}); gradients at a "
            "non-fixed point are not gradients of z* (fix the forward solve first)"
        ]
    if not report.jacobian_ok:
        worst = max(report.jacobian_checks, key=lambda c: c.max_rel)
        causes.append(
            f"the map's autodiff derivative {worst.what} disagrees with finite differences "
            f"(largest relative discrepancy {worst.max_rel:.2g}): the map has a non-differentiable "
            "step or a detached tensor, so no gradient through it can be right"
        )
    if report.agree:
        return causes
    if report.refined_error_ift <= report.rtol or report.refined_error_ift < report.error_ift / 10:
        atol = report.forward.atol
        causes.append(
            f"forward tolerance too loose: re-solving to atol {report.fd_atol:.2g} moved z* by "
            f"{report.solution_shift:.2g} and the IFT gradient there disagrees with finite "
            f"differences by {report.refined_error_ift:.2g} instead of {report.error_ift:.2g}; "
            f"tighten run.atol (now {atol:g}) to about {_suggest_atol(report):g}"
        )
    rho = [r for r in report.conditioning.spectral_radius if r is not None]
    if rho and max(rho) >= RHO_CLOSE_TO_ONE:
        causes.append(
            f"ρ(∂f/∂z) = {max(rho):.4g} is close to 1: errors in z* are amplified by about "
            f"1/(1 − ρ) ≈ {1 / max(1e-16, 1 - min(max(rho), 1 - 1e-16)):.3g} in the gradient"
        )
    if any(report.conditioning.near_singular):
        causes.append(
            f"I − ∂f/∂z is near singular (σ_min = {min(report.conditioning.sigma_min):.3g}): the "
            "fixed point is close to where branches meet and its gradient is ill-conditioned"
        )
    if not report.backward.converged:
        causes.append(
            f"the backward linear solve stopped at relative residual {report.backward.residual:.3g} "
            f"after {report.backward.iterations} iterations (tolerance {report.backward.tol:g})"
        )
    if report.fd_truncation >= 0.3 * report.error_ift:
        causes.append(
            f"the finite differences themselves are inaccurate at --eps {report.eps:g}: halving the step "
            f"changes them by about {report.fd_truncation:.2g} (relative), a large part of the "
            "disagreement; z* depends strongly nonlinearly on the parameters here (try a smaller --eps)"
        )
    if not all(d.resolves_converged for d in report.directions):
        causes.append(
            f"finite-difference re-solves did not all reach atol {report.fd_atol:.2g}; the reference "
            "itself is uncertain (try --eps or --fd-atol)"
        )
    if not causes:
        causes.append(
            "no single cause identified: try float64, a tighter run.atol, or another --eps"
        )
    return causes


def _suggest_atol(report: GradcheckReport) -> float:
    # The IFT error scales with the forward error: shrink atol by the factor the error must drop.
    factor = report.rtol / max(report.error_ift, 1e-300) / 10
    return float(f"{max(report.fd_atol, report.forward.atol * factor):.0e}")
