"""Jacobian-free Newton–Krylov: batched GMRES on autodiff JVPs, inexact-Newton forcing, line search."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

from deqcli.solvers.base import Solver, State
from deqcli.solvers.linesearch import backtrack

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem


@dataclass
class NewtonKrylovState(State):
    """Iterate, residual and the forcing term η of each sample."""

    eta: torch.Tensor  # (B,)
    inner: int = 0  # GMRES iterations in the last step (the most any sample needed)


@dataclass
class NewtonKrylov(Solver):
    """Inexact Newton: solve J_g(z) d = −g(z) by GMRES to ‖J d + g‖ ≤ η‖g‖, then backtrack.

    J_g is never formed: GMRES needs only products J v, which torch autodiff gives exactly (one
    forward-mode JVP each, counted in ``jvp``). The Krylov basis is orthogonalised by classical
    Gram–Schmidt with one re-orthogonalisation (two batched matrix products per inner step) and
    the small Hessenberg least-squares problem is solved per sample by QR. All samples run the
    inner loop together; it stops when every running sample met its tolerance or after
    ``krylov_dim`` inner steps (whatever reduction GMRES reached is used: it is still a descent
    direction for ‖g‖²).

    Forcing term (``forcing: ew``, Eisenstat–Walker choice 2): η_{k+1} = 0.9 (‖g_{k+1}‖/‖g_k‖)²,
    safeguarded by 0.9 η_k² when that exceeds 0.1, capped at ``eta_max``; it starts at ``eta``.
    Loose solves far from the root, tight ones near it give superlinear convergence without
    oversolving. ``forcing: constant`` keeps η = ``eta``.

    Cost per iteration: up to ``krylov_dim`` JVPs (each about two evaluations of f), O(k·n) work
    per sample and JVP, 1 + (backtracks) evaluations of f; memory (krylov_dim + 1)·B·n numbers.
    No dense Jacobian: this is the Newton method for large n.
    """

    name: ClassVar[str] = "newton-krylov"
    summary: ClassVar[str] = "Jacobian-free Newton–Krylov (GMRES on JVPs)"
    krylov_dim: int = 40
    forcing: Literal["ew", "constant"] = "ew"
    eta: float = 0.5
    eta_max: float = 0.9
    line_search: bool = True
    max_backtracks: int = 20
    c: float = 1e-4

    def check(self) -> None:
        """Validate the Krylov and forcing settings."""
        if self.krylov_dim < 1:
            raise ValueError(f"krylov_dim: must be ≥ 1, got {self.krylov_dim}")
        if not 0.0 < self.eta < 1.0:
            raise ValueError(f"eta: must lie in (0, 1), got {self.eta}")
        if not 0.0 < self.eta_max < 1.0:
            raise ValueError(f"eta_max: must lie in (0, 1), got {self.eta_max}")
        if self.max_backtracks < 0:
            raise ValueError(f"max_backtracks: must be ≥ 0, got {self.max_backtracks}")
        if not 0.0 < self.c < 1.0:
            raise ValueError(f"c: must lie in (0, 1), got {self.c}")

    def init(self, problem: Problem, z0: torch.Tensor) -> NewtonKrylovState:
        """Evaluate g(z0); every sample starts with forcing term ``eta``."""
        import torch

        g0 = problem.g(z0)
        eta = torch.full((z0.shape[0],), self.eta, dtype=z0.dtype, device=z0.device)
        return NewtonKrylovState(z=z0, g=g0, eta=eta)

    def step(self, problem: Problem, state: State) -> NewtonKrylovState:
        """One inexact Newton step."""
        import torch

        if not isinstance(state, NewtonKrylovState):
            raise TypeError("newton-krylov.step needs the state made by newton-krylov.init")
        s = state
        direction, inner = _gmres(problem, s.z, s.g, s.eta, self.krylov_dim, s.active)
        if self.line_search:
            z_new, g_new, _ = backtrack(
                problem,
                s.z,
                s.g,
                direction,
                c=self.c * (1 - s.eta),
                max_backtracks=self.max_backtracks,
                active=s.active,
            )
        else:
            z_new = s.z + direction
            g_new = problem.g(z_new)
        if self.forcing == "ew":
            old = torch.linalg.vector_norm(s.g, dim=1)
            new = torch.linalg.vector_norm(g_new, dim=1)
            ratio = new / old.clamp_min(torch.finfo(old.dtype).tiny)
            eta = 0.9 * ratio.square()
            floor = 0.9 * s.eta.square()
            eta = torch.where(floor > 0.1, torch.maximum(eta, floor), eta)
            eta = torch.nan_to_num(eta, nan=self.eta_max).clamp(max=self.eta_max)
            s.eta = eta
        s.z, s.g, s.inner = z_new, g_new, inner
        return s


def _gmres(
    problem: Problem,
    z: torch.Tensor,
    g: torch.Tensor,
    eta: torch.Tensor,
    kmax: int,
    active: torch.Tensor | None,
) -> tuple[torch.Tensor, int]:
    """Batched GMRES for J_g(z) d = −g from d = 0; returns (d, inner steps taken)."""
    import torch

    batch, n = g.shape
    opts = {"dtype": g.dtype, "device": g.device}
    tiny = torch.finfo(g.dtype).tiny
    beta0 = torch.linalg.vector_norm(g, dim=1)
    target = eta * beta0
    basis = torch.zeros(batch, kmax + 1, n, **opts)
    basis[:, 0] = -g / beta0.clamp_min(tiny)[:, None]
    hess = torch.zeros(batch, kmax + 1, kmax, **opts)
    coef = torch.zeros(batch, kmax, **opts)
    done = torch.zeros(batch, dtype=torch.bool, device=g.device)
    if active is not None:
        done |= ~active
    steps = 0
    for j in range(kmax):
        _, w = problem.jvp(z, basis[:, j])
        vj = basis[:, : j + 1]
        h = torch.bmm(vj, w.unsqueeze(2))
        w = torch.baddbmm(w.unsqueeze(2), vj.transpose(1, 2), h, alpha=-1)
        h2 = torch.bmm(vj, w)  # re-orthogonalise once (CGS2): keeps the basis orthonormal
        w = torch.baddbmm(w, vj.transpose(1, 2), h2, alpha=-1).squeeze(2)
        h = (h + h2).squeeze(2)
        h_next = torch.linalg.vector_norm(w, dim=1)
        hess[:, : j + 1, j] = h
        hess[:, j + 1, j] = h_next
        basis[:, j + 1] = w / h_next.clamp_min(tiny)[:, None]
        # Least squares min ‖β e₁ − H y‖ through a QR of the (j+2)×(j+1) Hessenberg matrix.
        q, r = torch.linalg.qr(hess[:, : j + 2, : j + 1], mode="complete")
        rhs = beta0[:, None] * q[:, 0, :]  # Qᵀ(β e₁)
        y = torch.linalg.solve_triangular(
            r[:, : j + 1, : j + 1], rhs[:, : j + 1, None], upper=True
        ).squeeze(2)
        y = torch.where(torch.isfinite(y), y, 0.0)
        coef[:, : j + 1] = torch.where(done[:, None], coef[:, : j + 1], y)
        steps = j + 1
        # Done: inner tolerance met, or breakdown (the Krylov space holds the exact solution).
        done |= (rhs[:, j + 1].abs() <= target) | (h_next <= 1e-14 * beta0)
        if bool(done.all()):
            break
    direction = torch.bmm(coef[:, None, :steps], basis[:, :steps]).squeeze(1)
    return direction, steps
