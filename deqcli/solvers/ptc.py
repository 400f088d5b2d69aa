"""Pseudo-transient continuation (Ψtc): follow dz/dt = −g(z) with growing implicit-Euler steps.

Kelley & Keyes (1998): each iteration is one linearised implicit-Euler step of the flow,

    (I/δ_k + J_g(z_k)) d_k = −g(z_k),    z_{k+1} = z_k + d_k,

with the pseudo-time step δ grown by switched evolution relaxation, δ_{k+1} = δ_k ‖g_{k−1}‖/‖g_k‖.
Small δ follows the flow (robust far from a root, where local methods stall at a minimum of
‖g‖ or a singular J); as ‖g‖ falls δ grows without bound and the step becomes Newton's, with its
fast local convergence. The residual is not required to decrease (the flow may climb out of a
valley a merit function would trap it in); a step whose residual is non-finite or grows beyond
``growth`` times the current one is refused and δ quartered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deqcli.errors import UsageError
from deqcli.linalg import ShiftedOperator, gmres, jacobian_operator
from deqcli.solvers.base import Method, State
from deqcli.solvers.directions import jacobians_at, row_norms, solve_newton

if TYPE_CHECKING:
    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult
    from deqcli.solvers.options import Ptc

# Refused steps in a row after which a sample is reported as stuck.
MAX_REFUSALS = 30
# A dense Jacobian is used (linear: auto) up to this n.
DENSE_MAX = 1000


@dataclass
class PtcState(State):
    """Iterate, residual and each sample's pseudo-time step."""

    dt: torch.Tensor  # (B,)
    refusals: torch.Tensor  # (B,) consecutive refused steps
    dense: bool = True


class PtcMethod(Method):
    """Ψtc per sample; dense LU for the shifted system, or GMRES on JVPs for large n.

    δ₀ = ``dt0``·max(‖z₀‖, √n)/‖g(z₀)‖, so the first step moves z by about dt0 of its own size
    whatever the scale of g; δ ≤ ``dt_max``. ``linear: auto`` uses a dense Jacobian when n ≤ 1000
    and it fits, else GMRES (``krylov_dim`` JVPs at most, relative tolerance 10⁻²) on
    I/δ + J_g, which is well conditioned while δ is small.
    """

    options: Ptc

    def init(self, problem: Problem, z0: torch.Tensor) -> PtcState:
        """g(z0), the linear-solver choice and the first pseudo-time step."""
        o = self.options
        g0 = problem.g(z0)
        dense = o.linear == "dense" or (o.linear == "auto" and problem.dim <= DENSE_MAX)
        if dense:
            try:
                problem.check_dense_fits()
            except UsageError:
                if o.linear == "dense":
                    raise
                dense = False
        scale = torch.clamp_min(row_norms(z0), math.sqrt(z0.shape[1]))
        gnorm = row_norms(g0)
        dt = o.dt0 * scale / gnorm.clamp_min(torch.finfo(z0.dtype).tiny)
        dt = torch.where(torch.isfinite(dt) & (gnorm > 0), dt, torch.full_like(dt, o.dt0))
        dt = dt.clamp(max=o.dt_max)
        refusals = torch.zeros(z0.shape[0], dtype=torch.int64, device=z0.device)
        return PtcState(z=z0, g=g0, dt=dt, refusals=refusals, dense=dense)

    def step(self, problem: Problem, state: PtcState) -> PtcState:  # type: ignore[override]
        """One implicit-Euler step per sample and the SER update of δ."""
        o = self.options
        s = state
        active = s.active if s.active is not None else torch.ones_like(s.refusals, dtype=torch.bool)
        shift = 1.0 / s.dt
        if s.dense:
            # Only the running samples are factored; the others' steps stay zero.
            d = torch.zeros_like(s.z)
            index = active.nonzero().flatten()
            if index.numel():
                jac = jacobians_at(problem, s.z, index)
                jac.diagonal(dim1=-2, dim2=-1).add_(shift.index_select(0, index)[:, None])
                d[index] = -solve_newton(jac, s.g.index_select(0, index))
        else:
            op = ShiftedOperator(jacobian_operator(problem, s.z), shift)
            res = gmres(
                op.with_active(active),
                -s.g,
                rtol=1e-2,
                restart=o.krylov_dim,
                max_matvecs=o.krylov_dim + 1,
                active=active,
            )
            d = res.x
        z_try = s.z + d
        g_try = problem.g(z_try)
        old, new = row_norms(s.g), row_norms(g_try)
        take = active & torch.isfinite(new) & (new <= o.growth * old)
        grown = s.dt * old / new.clamp_min(torch.finfo(new.dtype).tiny)
        dt = torch.where(take, torch.nan_to_num(grown, posinf=o.dt_max), s.dt / 4)
        s.dt = torch.where(active, dt.clamp(max=o.dt_max), s.dt)
        s.refusals = torch.where(take, torch.zeros_like(s.refusals), s.refusals + active.long())
        keep = take[:, None]
        s.z = torch.where(keep, z_try, s.z)
        s.g = torch.where(keep, g_try, s.g)
        return s

    def observe(self, state: PtcState, active: torch.Tensor) -> torch.Tensor | None:  # type: ignore[override]
        """Samples whose steps were refused MAX_REFUSALS times in a row."""
        return active & (state.refusals >= MAX_REFUSALS)

    def finish(self, state: PtcState, result: SolveResult) -> None:  # type: ignore[override]
        """The final pseudo-time step per sample."""
        result.extra["ptc"] = {
            "dt": state.dt.tolist(),
            "linear": "dense" if state.dense else "gmres",
        }
