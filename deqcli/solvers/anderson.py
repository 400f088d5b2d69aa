"""Anderson acceleration in the Walker–Ni form, batched, with a scaled Tikhonov term and restarts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from deqcli.solvers.base import Solver, State

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult


@dataclass
class AndersonState(State):
    """Iterate and residual plus the last ``m`` differences, kept in a ring of slots."""

    f: torch.Tensor  # (B, n): f(z) = z − g
    diffs: torch.Tensor  # (B, 2m, n): rows 0..m−1 hold f_{i+1} − f_i, rows m..2m−1 g_{i+1} − g_i
    gram: torch.Tensor  # (B, m, m): Δg_i · Δg_j
    chol: torch.Tensor  # (B, m, m): lower Cholesky factor of gram + λ·diag(gram), slot order
    rhs: torch.Tensor  # (B, m, 1): Δg_i · g for the current residual g
    best: torch.Tensor  # (B,): smallest ‖g‖ since the sample's last restart
    restarts: torch.Tensor  # (B,): restarts per sample (int64)
    count: int = 0  # differences written so far (the same for every sample)


@dataclass
class Anderson(Solver):
    """Anderson acceleration (Walker & Ni 2011) with depth ``m`` and mixing ``beta``.

    The first step is z₁ = z₀ − β g(z₀) (with β = 1: z₁ = f(z₀)). Then, with ΔZ and ΔG the last
    min(m, k) differences of iterates and residuals g = z − f(z),

        γ = argmin ‖g_k − ΔG γ‖ (+ λ‖diag(ΔGᵀΔG)^½ γ‖²),    z_{k+1} = z_k − ΔZ γ − β (g_k − ΔG γ).

    For a linear map and m ≥ n this is GMRES: the exact solution after at most n + 1 steps.

    The small least-squares problem is solved per sample through its m×m Gram matrix, updated by one
    new row per step and factorised by Cholesky (appended incrementally until the memory is full).
    The Tikhonov term is relative (λ times each column's own squared norm), so it scales with the
    problem: torchdeq's absolute λ = 1e-4 swamps the Gram matrix once residuals fall below ~1e-2,
    which is why its Anderson stalls on small-residual problems.

    Safeguard (``restart``): a sample's memory is cleared when its Gram system becomes
    ill-conditioned (a new difference is, up to 1/``cond_max``, a combination of the stored ones)
    or its residual grows beyond ``growth`` times the best since its last restart.

    The depth is min(m, n): more than n differences in Rⁿ are always dependent.

    Cost per iteration: one evaluation of f, O(m·n) work per sample and an m×m solve;
    memory 2·m·B·n numbers (no Jacobians). The differences of f = z − g are stored instead of those
    of z (ΔZ = ΔF + ΔG), so with β = 1 the new iterate f − ΔFγ reads only half of them.
    """

    name: ClassVar[str] = "anderson"
    summary: ClassVar[str] = "Anderson acceleration (Walker–Ni), relative Tikhonov term, restarts"
    m: int = 5
    beta: float = 1.0
    lam: float = 1e-10
    restart: bool = True
    cond_max: float = 1e9
    growth: float = 1e4

    def check(self) -> None:
        """Validate the depth, mixing and safeguard settings."""
        if self.m < 1:
            raise ValueError(f"m: must be ≥ 1, got {self.m}")
        if not 0.0 < self.beta <= 2.0:
            raise ValueError(f"beta: must lie in (0, 2], got {self.beta}")
        if not 0.0 <= self.lam < 1.0:
            raise ValueError(f"lam: must lie in [0, 1), got {self.lam}")
        if self.cond_max <= 1.0:
            raise ValueError(f"cond_max: must be > 1, got {self.cond_max}")
        if self.growth <= 1.0:
            raise ValueError(f"growth: must be > 1, got {self.growth}")

    def init(self, problem: Problem, z0: torch.Tensor) -> AndersonState:
        """Evaluate g(z0) and allocate the difference memory."""
        import torch

        g0 = problem.g(z0)
        batch, n = z0.shape
        opts = {"dtype": z0.dtype, "device": z0.device}
        # More than n differences in R^n are linearly dependent: the depth never exceeds n.
        m = min(self.m, n)
        eye = torch.eye(m, **opts).expand(batch, m, m).clone()
        return AndersonState(
            z=z0,
            g=g0,
            f=z0 - g0,
            # Slots are read only once written (or cleared), so no need to zero them.
            diffs=torch.empty(batch, 2 * m, n, **opts),
            gram=torch.zeros(batch, m, m, **opts),
            chol=eye,
            rhs=torch.zeros(batch, m, 1, **opts),
            best=torch.linalg.vector_norm(g0, dim=1),
            restarts=torch.zeros(batch, dtype=torch.int64, device=z0.device),
        )

    def step(self, problem: Problem, state: State) -> AndersonState:
        """Mix the stored differences, evaluate once, record the new difference, refactorise."""
        import torch

        if not isinstance(state, AndersonState):
            raise TypeError("anderson.step needs the state made by anderson.init")
        s = state
        m = s.gram.shape[1]
        k = min(s.count, m)  # slots 0..k−1 hold differences
        if k == 0:
            z_new = s.z - self.beta * s.g
        else:
            gamma = torch.cholesky_solve(s.rhs[:, :k], s.chol[:, :k, :k]).transpose(1, 2)
            # With ΔZ = ΔF + ΔG: z − βg − ΔZγ + βΔGγ = (z − βg) − ΔFγ − (1 − β)ΔGγ; for β = 1
            # that is f − ΔFγ, one pass over half the stored differences.
            if self.beta == 1.0:
                z_new = torch.baddbmm(s.f.unsqueeze(1), gamma, s.diffs[:, :k], alpha=-1)
            else:
                base = torch.add(s.z, s.g, alpha=-self.beta).unsqueeze(1)
                z_new = torch.baddbmm(base, gamma, s.diffs[:, :k], alpha=-1)
                z_new = torch.baddbmm(z_new, gamma, s.diffs[:, m : m + k], alpha=self.beta - 1)
            z_new = z_new.squeeze(1)
        f_new = problem.f(z_new)
        g_new = z_new - f_new

        # Record the new differences in slot j; one pass over ΔG gives the new Gram row and the
        # next right-hand side ΔGᵀ g_new together.
        j = s.count % m
        filled = min(s.count + 1, m)
        torch.sub(f_new, s.f, out=s.diffs[:, j])
        torch.sub(g_new, s.g, out=s.diffs[:, m + j])
        pair = torch.stack((s.diffs[:, m + j], g_new), dim=1)  # (B, 2, n)
        prod = torch.bmm(s.diffs[:, m : m + filled], pair.transpose(1, 2))  # (B, filled, 2)
        row = prod[:, :, 0]
        s.rhs[:, :filled] = prod[:, :, 1:]
        s.gram[:, j, :filled] = row
        s.gram[:, :filled, j] = row
        pivot = self._factorise(s, j)
        s.count += 1

        res = torch.linalg.vector_norm(g_new, dim=1)
        if self.restart:
            # pivot: the share of the newest (or worst) column outside the span of the others.
            bad = (pivot * self.cond_max < 1) | (res > self.growth * s.best)
            if s.active is not None:
                bad &= s.active
            if bool(bad.any()):
                self._clear(s, bad)
                s.best = torch.where(bad, res, torch.minimum(s.best, res))
            else:
                s.best = torch.minimum(s.best, res)
        s.z, s.g, s.f = z_new, g_new, f_new
        return s

    def _factorise(self, s: AndersonState, j: int) -> torch.Tensor:
        """Update the Cholesky factor after slot j changed; return the per-sample pivot ratio."""
        import torch

        tiny = torch.finfo(s.gram.dtype).tiny
        lam = max(self.lam, 10 * torch.finfo(s.gram.dtype).eps)
        m = s.gram.shape[1]
        if s.count < m:
            # Appending column j = count to slots 0..j−1: one triangular solve, O(j²) per sample.
            a_jj = s.gram[:, j, j] * (1 + lam) + tiny
            if j == 0:
                d2 = a_jj
            else:
                col = torch.linalg.solve_triangular(
                    s.chol[:, :j, :j], s.gram[:, :j, j : j + 1], upper=False
                )
                s.chol[:, j, :j] = col.squeeze(2)
                d2 = a_jj - col.square().sum(dim=(1, 2))
            s.chol[:, j, j] = torch.sqrt(torch.clamp_min(d2, lam * a_jj))
            return d2 / a_jj
        # Memory full: a slot was overwritten, so refactorise the whole m×m system.
        a = s.gram.clone()
        diag = a.diagonal(dim1=1, dim2=2)
        diag.mul_(1 + lam).add_(tiny)
        chol, info = torch.linalg.cholesky_ex(a)
        s.chol = chol
        ratio = (chol.diagonal(dim1=1, dim2=2).square() / diag).amin(dim=1)
        # A failed factorisation (info > 0, or NaN rows) reads as a zero pivot: restart.
        return torch.where(info == 0, ratio, torch.zeros_like(ratio))

    def _clear(self, s: AndersonState, bad: torch.Tensor) -> None:
        """Forget the stored differences of the samples in ``bad`` (their next step is z − βg)."""
        import torch

        keep3 = ~bad[:, None, None]
        s.diffs = torch.where(keep3, s.diffs, 0.0)
        s.gram = torch.where(keep3, s.gram, 0.0)
        s.rhs = torch.where(keep3, s.rhs, 0.0)
        eye = torch.eye(s.gram.shape[1], dtype=s.chol.dtype, device=s.chol.device)
        s.chol = torch.where(keep3, s.chol, eye)
        s.restarts = s.restarts + bad.to(s.restarts.dtype)

    def finish(self, state: State, result: SolveResult) -> None:
        """Report safeguard restarts per sample."""
        if not isinstance(state, AndersonState) or not self.restart:
            return
        restarts = [int(r) for r in state.restarts.cpu().tolist()]
        result.extra["anderson"] = {"restarts": restarts}
        if any(restarts):
            hit = [b for b, r in enumerate(restarts) if r]
            shown = ", ".join(map(str, hit[:8])) + (", …" if len(hit) > 8 else "")
            result.notes.append(
                f"anderson: the safeguard restarted the memory {sum(restarts)} time(s) "
                f"(samples {shown}): ill-conditioned least squares or a growing residual"
            )
