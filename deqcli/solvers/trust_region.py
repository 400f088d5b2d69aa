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
    """Iterate, residual, the Jacobian model and its inverse, and each sample's trust radius.

    The model is J = J₀ + Σ cᵢ sᵢᵀ and its inverse H = J₀⁻¹ + Σ aᵢ bᵢᵀ, with J₀ an exact Jacobian
    kept dense together with its LU factors, and the rank-one terms as rows of (B, k, n) tensors.
    """

    jac0: torch.Tensor  # (B, n, n)
    lu: torch.Tensor  # (B, n, n): LU factors of J₀ (shifted where J₀ is singular)
    pivots: torch.Tensor  # (B, n)
    terms: torch.Tensor  # (B, 4, memory, n): rows c, s (model) and a, b (inverse)
    hg: torch.Tensor  # (B, n): H g for the current g (minus the Newton step)
    radius: torch.Tensor  # (B,)
    fails: torch.Tensor  # (B,) consecutive poor steps (ρ < 0.1) since the last fresh Jacobian
    count: int = 0  # rank-one terms stored (the same for every sample)
    fresh: bool = True  # the model is an exact Jacobian at z
    jacobians: int = 1


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

    The model starts as the exact Jacobian J₀ from autodiff (one njev: n JVPs) with one batched LU;
    every step, accepted or not, adds a good-Broyden rank-one term to the model and the matching
    Sherman–Morrison term to its inverse, so a nearly linear problem needs one Jacobian and a few
    cheap steps. A fresh Jacobian is taken after two poor steps in a row (ρ < 0.1) of a running
    sample, or when ``memory`` terms have accumulated (``update: exact`` takes one every step).
    A singular J₀ is shifted by √ε·max|J₀| for its inverse only (the model stays exact). Δ starts
    at ``radius`` × max(‖z0‖, 1). A sample whose radius shrinks below machine precision relative
    to ‖z‖ cannot move any more and is reported as stalled.

    Cost per iteration: one evaluation of f, five passes over the dense J₀ or its LU factors and
    O(k·n) for the k rank-one terms, per sample; plus, when the model is refreshed, one Jacobian
    and an O(n³) LU per sample. Memory 2·B·n² + 4·memory·B·n numbers.
    """

    name: ClassVar[str] = "trust-region"
    summary: ClassVar[str] = "Powell dogleg trust region with autodiff Jacobians"
    radius: float = 1.0
    update: Literal["broyden", "exact"] = "broyden"
    memory: int = 50
    max_radius: float = 1e10

    def check(self) -> None:
        """Validate the radius and memory settings."""
        if self.radius <= 0:
            raise ValueError(f"radius: must be > 0, got {self.radius}")
        if self.max_radius < self.radius:
            raise ValueError(f"max_radius: must be ≥ radius ({self.radius}), got {self.max_radius}")
        if self.memory < 1:
            raise ValueError(f"memory: must be ≥ 1, got {self.memory}")

    def init(self, problem: Problem, z0: torch.Tensor) -> TrustRegionState:
        """Jacobian and residual at z0, its LU factors and the starting radii."""
        import torch

        problem.check_dense_fits()
        g0, jac = problem.jacobian(z0)
        jac = jac.contiguous()
        lu, pivots = _factor(jac)
        batch, n = z0.shape
        scale = torch.linalg.vector_norm(z0, dim=1).clamp_min(1.0)
        return TrustRegionState(
            z=z0,
            g=g0,
            jac0=jac,
            lu=lu,
            pivots=pivots,
            terms=torch.zeros(batch, 4, self.memory, n, dtype=z0.dtype, device=z0.device),
            hg=torch.linalg.lu_solve(lu, pivots, g0.unsqueeze(2)).squeeze(2),
            radius=self.radius * scale,
            fails=torch.zeros(batch, dtype=torch.int64, device=z0.device),
        )

    def observe(self, state: State, active: torch.Tensor) -> torch.Tensor | None:
        """Record the running samples; report those whose trust region has collapsed."""
        import torch

        if not isinstance(state, TrustRegionState):
            return None
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
        stale = self.update == "exact" or s.count == self.memory
        if not s.fresh and (stale or bool((running & (s.fails >= 2)).any())):
            self._refresh(problem, s)

        grad = _model_t(s, s.g)  # ∇ ½‖g‖² = Jᵀg
        j_grad = _model(s, grad)
        p = _dogleg(-s.hg, grad, j_grad, s.radius)
        z_try = s.z + p
        g_try = problem.g(z_try)
        j_p = _model(s, p)
        old = s.g.square().sum(dim=1)
        new = g_try.square().sum(dim=1)
        predicted = old - (s.g + j_p).square().sum(dim=1)
        rho = (old - new) / predicted.clamp_min(torch.finfo(old.dtype).tiny)
        rho = torch.where(torch.isfinite(rho), rho, torch.full_like(rho, -1.0))
        accept = (rho > 1e-4) & torch.isfinite(new)

        step_norm = torch.linalg.vector_norm(p, dim=1)
        radius = torch.where(rho < 0.25, 0.25 * step_norm, s.radius)
        grow = (rho > 0.75) & (step_norm >= 0.99 * s.radius)
        s.radius = torch.where(grow, 2 * s.radius, radius).clamp(max=self.max_radius)
        s.fails = torch.where(rho < 0.1, s.fails + 1, torch.zeros_like(s.fails))

        keep = accept[:, None]
        g_next = torch.where(keep, g_try, s.g)
        if self.update == "broyden":
            # Good-Broyden update with the secant pair (p, g_try − g): it holds new information
            # whether or not the step is accepted.
            h_try = _inverse(s, g_try)
            self._append(s, p, g_try - s.g, j_p, h_try - s.hg)
            a, b = s.terms[:, 2, s.count - 1], s.terms[:, 3, s.count - 1]
            h_next = torch.where(keep, h_try, s.hg)
            s.hg = h_next + a * (b * g_next).sum(dim=1, keepdim=True)
            s.fresh = False
        elif bool(accept.any()):
            s.fresh = False  # exact model: stale only where z moved
        s.z = torch.where(keep, z_try, s.z)
        s.g = g_next
        return s

    def _refresh(self, problem: Problem, s: TrustRegionState) -> None:
        """A fresh Jacobian at z: new J₀ and LU factors, no rank-one terms."""
        import torch

        _, jac = problem.jacobian(s.z)
        s.jac0 = jac.contiguous()
        s.lu, s.pivots = _factor(s.jac0)
        s.terms.zero_()
        s.count = 0
        s.hg = torch.linalg.lu_solve(s.lu, s.pivots, s.g.unsqueeze(2)).squeeze(2)
        s.fails = torch.zeros_like(s.fails)
        s.fresh = True
        s.jacobians += 1

    def _append(
        self,
        s: TrustRegionState,
        step: torch.Tensor,
        dg: torch.Tensor,
        j_step: torch.Tensor,
        h_dg: torch.Tensor,
    ) -> None:
        """J ← J + (y − J s)sᵀ/(sᵀs) and H ← H + (s − H y) sᵀH/(sᵀH y); zero where degenerate."""
        import torch

        ss = step.square().sum(dim=1)
        st_h = _inverse(s, step, transpose=True)  # Hᵀ s
        denom = (st_h * dg).sum(dim=1)
        scale = torch.linalg.vector_norm(st_h, dim=1) * torch.linalg.vector_norm(dg, dim=1)
        ok = (ss > 0) & (denom.abs() > 1e-12 * scale) & torch.isfinite(denom)
        ok &= torch.isfinite(dg).all(dim=1) & torch.isfinite(ss)
        one = torch.ones_like(ss)
        k = s.count
        keep = ok[:, None]
        s.terms[:, 0, k] = torch.where(keep, (dg - j_step) / torch.where(ok, ss, one)[:, None], 0.0)
        s.terms[:, 1, k] = torch.where(keep, step, 0.0)
        s.terms[:, 2, k] = torch.where(
            keep, (step - h_dg) / torch.where(ok, denom, one)[:, None], 0.0
        )
        s.terms[:, 3, k] = torch.where(keep, st_h, 0.0)
        s.count += 1


def _factor(jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LU factors per sample; a singular or non-finite Jacobian is shifted (or replaced by I)."""
    import torch

    lu, pivots, info = torch.linalg.lu_factor_ex(jac)
    bad = (info != 0) | ~torch.isfinite(lu).all(dim=(1, 2))
    if bool(bad.any()):
        finite = torch.isfinite(jac).all(dim=(1, 2))
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        size = jac.abs().amax(dim=(1, 2)).clamp_min(1.0)
        shift = (torch.finfo(jac.dtype).eps ** 0.5 * size)[:, None, None] * eye
        fixed = torch.where(finite[:, None, None], jac + shift, eye)
        lu2, pivots2, _ = torch.linalg.lu_factor_ex(fixed)
        lu = torch.where(bad[:, None, None], lu2, lu)
        pivots = torch.where(bad[:, None], pivots2, pivots)
    return lu, pivots


def _low_rank(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, k: int, out: torch.Tensor
) -> torch.Tensor:
    """out + Σᵢ leftᵢ (rightᵢ · x) over the first k terms."""
    import torch

    if k == 0:
        return out
    coef = torch.bmm(right[:, :k], x.unsqueeze(2))  # (B, k, 1)
    return torch.baddbmm(out.unsqueeze(1), coef.transpose(1, 2), left[:, :k]).squeeze(1)


def _model(s: TrustRegionState, x: torch.Tensor) -> torch.Tensor:
    """J x with J = J₀ + Σ cᵢ sᵢᵀ."""
    import torch

    dense = torch.bmm(s.jac0, x.unsqueeze(2)).squeeze(2)
    return _low_rank(x, s.terms[:, 0], s.terms[:, 1], s.count, dense)


def _model_t(s: TrustRegionState, x: torch.Tensor) -> torch.Tensor:
    """Jᵀ x."""
    import torch

    dense = torch.bmm(x.unsqueeze(1), s.jac0).squeeze(1)
    return _low_rank(x, s.terms[:, 1], s.terms[:, 0], s.count, dense)


def _inverse(s: TrustRegionState, x: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
    """H x (or Hᵀ x) with H = J₀⁻¹ + Σ aᵢ bᵢᵀ."""
    import torch

    dense = torch.linalg.lu_solve(s.lu, s.pivots, x.unsqueeze(2), adjoint=transpose).squeeze(2)
    if transpose:
        return _low_rank(x, s.terms[:, 3], s.terms[:, 2], s.count, dense)
    return _low_rank(x, s.terms[:, 2], s.terms[:, 3], s.count, dense)


def _dogleg(
    newton: torch.Tensor, grad: torch.Tensor, j_grad: torch.Tensor, radius: torch.Tensor
) -> torch.Tensor:
    """The dogleg step per sample for the model ‖g + J p‖ within ‖p‖ ≤ radius."""
    import torch

    tiny = torch.finfo(grad.dtype).tiny
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
