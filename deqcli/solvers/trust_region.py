"""Powell's hybrid (dogleg) trust-region method, batched, with autodiff Jacobians and Broyden updates."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from deqcli.solvers.base import Solver, State

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem


@dataclass
class TrustRegionState(State):
    """Iterate, residual, the Jacobian model (and its inverse) and each sample's trust radius."""

    jac: torch.Tensor  # (B, n, n): model of J_g at z
    inv: torch.Tensor  # (B, n, n): its inverse
    radius: torch.Tensor  # (B,)
    fails: torch.Tensor  # (B,) consecutive poor steps (ρ < 0.1) since the last fresh Jacobian
    fresh: bool = True  # the model is an exact Jacobian at z
    jacobians: int = 1
    active: torch.Tensor | None = None


@dataclass
class TrustRegion(Solver):
    """Powell's dogleg method on ½‖g‖² (the MINPACK ``hybrj`` strategy), for hard small systems.

    Each step minimises the linear model ‖g + J p‖ inside a ball of radius Δ along the dogleg
    path: the Newton step −J⁻¹g when it fits, otherwise the steepest-descent (Cauchy) step, or the
    point where the segment between them leaves the ball. The ratio ρ of actual to predicted
    reduction of ½‖g‖² decides per sample: accept when ρ > 1e-4; shrink Δ to ¼‖p‖ when ρ < ¼;
    double it when ρ > ¾ and the step reached the boundary. Unlike a line search along a fixed
    Newton direction, the step turns towards steepest descent as Δ shrinks, so it makes progress
    where J is nearly singular or the Newton step points the wrong way.

    The Jacobian comes from autodiff (one njev: n JVPs), its inverse from one batched LU; between
    fresh Jacobians the model and its inverse take good-Broyden rank-one updates (Sherman–Morrison),
    so a nearly linear problem needs one Jacobian and a few cheap steps. A fresh Jacobian is taken
    after two poor steps in a row (ρ < 0.1) of a running sample (``update: exact`` takes one every
    step). Δ starts at ``radius`` × max(‖z0‖, 1). A sample whose radius shrinks below machine
    precision relative to ‖z‖ cannot move any more and is reported as stalled.

    Cost per iteration: one evaluation of f and O(n²) per sample; plus, when the model is
    refreshed, one Jacobian and an O(n³) inverse per sample. Memory 2·B·n² numbers.
    """

    name: ClassVar[str] = "trust-region"
    summary: ClassVar[str] = "Powell dogleg trust region with autodiff Jacobians"
    radius: float = 1.0
    update: Literal["broyden", "exact"] = "broyden"
    max_radius: float = 1e10

    def check(self) -> None:
        """Validate the radius settings."""
        if self.radius <= 0:
            raise ValueError(f"radius: must be > 0, got {self.radius}")
        if self.max_radius < self.radius:
            raise ValueError(f"max_radius: must be ≥ radius ({self.radius}), got {self.max_radius}")

    def init(self, problem: Problem, z0: torch.Tensor) -> TrustRegionState:
        """Jacobian and residual at z0, the model's inverse and the starting radii."""
        import torch

        problem.check_dense_fits()
        g0, jac = problem.jacobian(z0)
        scale = torch.linalg.vector_norm(z0, dim=1).clamp_min(1.0)
        return TrustRegionState(
            z=z0,
            g=g0,
            jac=jac,
            inv=_inverse(jac),
            radius=self.radius * scale,
            fails=torch.zeros(z0.shape[0], dtype=torch.int64, device=z0.device),
        )

    def observe(self, state: State, active: torch.Tensor) -> torch.Tensor | None:
        """Record the running samples; report those whose trust region has collapsed."""
        import torch

        if not isinstance(state, TrustRegionState):
            return None
        state.active = active
        eps = torch.finfo(state.z.dtype).eps
        size = torch.linalg.vector_norm(state.z, dim=1) + eps
        return state.radius <= eps * size

    def step(self, problem: Problem, state: State) -> TrustRegionState:
        """One dogleg step, the ratio test, the radius update and the model update."""
        import torch

        if not isinstance(state, TrustRegionState):
            raise TypeError("trust-region.step needs the state made by trust-region.init")
        s = state
        running = s.active if s.active is not None else torch.ones_like(s.fails, dtype=torch.bool)
        if not s.fresh and (self.update == "exact" or bool((running & (s.fails >= 2)).any())):
            _, s.jac = problem.jacobian(s.z)
            s.inv = _inverse(s.jac)
            s.fails = torch.zeros_like(s.fails)
            s.fresh = True
            s.jacobians += 1

        p = _dogleg(s.jac, s.inv, s.g, s.radius)
        z_try = s.z + p
        g_try = problem.g(z_try)
        old = s.g.square().sum(dim=1)
        new = g_try.square().sum(dim=1)
        model = s.g + torch.bmm(s.jac, p.unsqueeze(2)).squeeze(2)
        predicted = old - model.square().sum(dim=1)
        actual = old - new
        rho = actual / predicted.clamp_min(torch.finfo(old.dtype).tiny)
        rho = torch.where(torch.isfinite(rho), rho, torch.full_like(rho, -1.0))
        accept = (rho > 1e-4) & torch.isfinite(new)

        step_norm = torch.linalg.vector_norm(p, dim=1)
        radius = torch.where(rho < 0.25, 0.25 * step_norm, s.radius)
        grow = (rho > 0.75) & (step_norm >= 0.99 * s.radius)
        s.radius = torch.where(grow, 2 * s.radius, radius).clamp(max=self.max_radius)
        s.fails = torch.where(rho < 0.1, s.fails + 1, torch.zeros_like(s.fails))

        # Broyden (good) update of the model with the secant pair (p, g_try − g): it holds new
        # information whether or not the step is accepted.
        if self.update == "broyden":
            _broyden_update(s, p, g_try - s.g)
            s.fresh = False
        elif bool(accept.any()):
            s.fresh = False  # exact model: stale only where z moved
        keep = accept[:, None]
        s.z = torch.where(keep, z_try, s.z)
        s.g = torch.where(keep, g_try, s.g)
        return s


def _inverse(jac: torch.Tensor) -> torch.Tensor:
    """Per-sample inverse; the pseudo-inverse where the Jacobian is singular or not finite."""
    import torch

    inv, info = torch.linalg.inv_ex(jac)
    bad = (info != 0) | ~torch.isfinite(inv).all(dim=(1, 2))
    if bool(bad.any()):
        finite = torch.isfinite(jac).all(dim=(1, 2))
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        pinv = torch.linalg.pinv(torch.where(finite[:, None, None], jac, eye))
        inv = torch.where(bad[:, None, None], pinv, inv)
    return inv


def _dogleg(
    jac: torch.Tensor, inv: torch.Tensor, g: torch.Tensor, radius: torch.Tensor
) -> torch.Tensor:
    """The dogleg step per sample for the model ‖g + J p‖ within ‖p‖ ≤ radius."""
    import torch

    tiny = torch.finfo(g.dtype).tiny
    newton = -torch.bmm(inv, g.unsqueeze(2)).squeeze(2)
    grad = torch.bmm(jac.transpose(1, 2), g.unsqueeze(2)).squeeze(2)  # ∇ ½‖g‖² = Jᵀg
    j_grad = torch.bmm(jac, grad.unsqueeze(2)).squeeze(2)
    grad2 = grad.square().sum(dim=1)
    cauchy = -(grad2 / j_grad.square().sum(dim=1).clamp_min(tiny))[:, None] * grad
    n_newton = torch.linalg.vector_norm(newton, dim=1)
    n_cauchy = torch.linalg.vector_norm(cauchy, dim=1)
    # Where the segment cauchy → newton crosses the sphere: ‖c + τ(n − c)‖ = Δ, τ in [0, 1].
    diff = newton - cauchy
    a = diff.square().sum(dim=1)
    b = 2 * (cauchy * diff).sum(dim=1)
    c = n_cauchy.square() - radius.square()
    tau = (-b + torch.sqrt((b.square() - 4 * a * c).clamp_min(0))) / (2 * a).clamp_min(tiny)
    blend = cauchy + tau.clamp(0, 1)[:, None] * diff
    steepest = -(radius / grad2.sqrt().clamp_min(tiny))[:, None] * grad
    step = torch.where((n_cauchy >= radius)[:, None], steepest, blend)
    newton_ok = (n_newton <= radius) & torch.isfinite(n_newton)
    return torch.where(newton_ok[:, None], newton, step)


def _broyden_update(s: TrustRegionState, step: torch.Tensor, dg: torch.Tensor) -> None:
    """J ← J + (y − J s)sᵀ/(sᵀs), and its inverse by Sherman–Morrison; skipped where degenerate."""
    import torch

    ss = step.square().sum(dim=1)
    j_step = torch.bmm(s.jac, step.unsqueeze(2)).squeeze(2)
    inv_dg = torch.bmm(s.inv, dg.unsqueeze(2)).squeeze(2)
    st_inv = torch.bmm(step.unsqueeze(1), s.inv).squeeze(1)  # sᵀ J⁻¹
    denom = (st_inv * dg).sum(dim=1)
    scale = torch.linalg.vector_norm(st_inv, dim=1) * torch.linalg.vector_norm(dg, dim=1)
    ok = (ss > 0) & (denom.abs() > 1e-12 * scale) & torch.isfinite(denom) & torch.isfinite(ss)
    ok &= torch.isfinite(dg).all(dim=1)
    one = torch.ones_like(ss)
    u = torch.where(ok[:, None], (dg - j_step) / torch.where(ok, ss, one)[:, None], 0.0)
    s.jac = torch.baddbmm(s.jac, u.unsqueeze(2), step.unsqueeze(1))
    w = torch.where(ok[:, None], (step - inv_dg) / torch.where(ok, denom, one)[:, None], 0.0)
    s.inv = torch.baddbmm(s.inv, w.unsqueeze(2), st_inv.unsqueeze(1))
