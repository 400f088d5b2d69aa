"""How a Newton-type step's direction is found, per sample.

- ``NewtonDirection``: d = −J_g(z)⁻¹ g(z) with the exact autodiff Jacobian of every running sample.
- ``BroydenDirection``: d = −H g with H ≈ J_g⁻¹ updated by Broyden's good or bad rank-one formula.
- ``KrylovDirection``: d solves J_g d = −g by GMRES on JVPs to a relative residual η (inexact
  Newton, Eisenstat–Walker forcing).

Each returns the direction and the slope gᵀJ_g d of ½‖g‖² along it (exact, or the bound the
method guarantees), which the line search's Armijo test needs. ``JacobianModel`` is the per-sample
Jacobian model (dense or identity start, low-rank Broyden terms, and its inverse) that the trust
region and Broyden's method share. Everything here is per sample: no sample's state depends on
another's, so a batch follows the same path as its samples solved one by one.

``KrylovDirection.solve`` (the GMRES alone, on an operator the caller built) and
``jacobian_products`` (products counted per sample) serve the matrix-free trust region too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from deqcli.errors import UsageError
from deqcli.linalg import (
    FunctionOperator,
    KrylovResult,
    LinearOperator,
    RowScaledJacobian,
    gmres,
    jacobian_operator,
)
from deqcli.linalg.dense import finite_matrices, lu_factor_ex, matvec, solve_ex
from deqcli.linalg.preconditioners import MAX_DIM, SharedLinearisation, shared_weight

if TYPE_CHECKING:
    from deqcli.problems.base import Problem
    from deqcli.solvers.base import StopRule


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norm of each row."""
    return torch.linalg.vector_norm(x, dim=-1)


# -- Jacobians of some rows ---------------------------------------------------------------------


def jacobian_rows(problem: Problem, z: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """J_g at the rows of ``z`` selected by the (B,) mask ``rows``; zeros elsewhere; (B, n, n).

    Only the selected samples are evaluated and counted (one njev each), so a sample's Jacobian
    count does not depend on what the other samples of its batch need.
    """
    if bool(rows.all()):
        _, jac = problem.jacobian(z)
        return jac
    batch, n = z.shape
    out = torch.zeros(batch, n, n, dtype=z.dtype, device=z.device)
    index = rows.nonzero().flatten()
    if index.numel():
        out[index] = jacobians_at(problem, z, index)
    return out


def jacobians_at(problem: Problem, z: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """J_g at the samples ``index`` of ``z`` alone: (len(index), n, n), one njev each."""
    if index.numel() == z.shape[0]:
        _, jac = problem.jacobian(z)
        return jac
    part = dataclasses.replace(
        problem, z0=z.index_select(0, index), params=problem.params_at(index)
    )
    _, jac = part.jacobian(part.z0)
    for b in index.tolist():
        problem.counter.bump("njev", rows=b)
    return jac


def jacobian_products(problem: Problem, op: LinearOperator, rows: torch.Tensor) -> LinearOperator:
    """``op`` (an uncounted linearisation of the problem) for the rows in ``rows`` alone, counted.

    As ``jacobian_rows`` does for dense Jacobians: a JVP or VJP is counted only for the samples it
    is made for (the other rows' products are zeros), so a sample's counts do not depend on what
    the other samples of its batch need.
    """
    inner = op.with_active(rows)
    index = rows.nonzero().flatten().tolist()

    def counted(
        kind: str, product: Callable[[torch.Tensor], torch.Tensor]
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        def apply(v: torch.Tensor) -> torch.Tensor:
            for b in index:
                problem.counter.bump(kind, rows=b)
            return product(v)

        return apply

    like = torch.empty(op.batch, op.dim, dtype=op.dtype, device=op.device)
    out = FunctionOperator(counted("jvp", inner.matvec), like, counted("vjp", inner.rmatvec))
    return out.with_active(rows)


def solve_newton(jac: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve jac @ x = rhs per sample; the minimum-norm least-squares step where jac is singular.

    Samples whose Jacobian or right-hand side is not finite get a zero step instead of poisoning
    the pseudo-inverse.
    """
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
    finite = finite_matrices(jac) & torch.isfinite(rhs).all(dim=1)
    if not bool(finite.all()):
        # Before the LU, not after: multi-threaded MKL factors a NaN matrix into invalid pivots,
        # and the solve then raises instead of returning NaN.
        jac = torch.where(finite[:, None, None], jac, eye)
        rhs = torch.where(finite[:, None], rhs, 0.0)
    sol, info = solve_ex(jac, rhs)
    bad = (info != 0) | ~torch.isfinite(sol).all(dim=1)
    if bool(bad.any()):
        # The pseudo-inverse (an SVD) only for the samples that need it.
        index = bad.nonzero().flatten()
        sol = sol.clone()
        sol[index] = (torch.linalg.pinv(jac[index]) @ rhs[index][..., None])[..., 0]
    return sol


def cap_steps(
    z: torch.Tensor, d: torch.Tensor, step_max: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shorten each row's step to at most step_max·max(‖z‖, √n); returns (step, scale ≤ 1).

    A nearly singular J gives a Newton step of any length; the cap keeps one step from throwing
    the iterate to 1e30 (where g overflows) before the line search has a chance to look.
    """
    limit = step_max * torch.clamp_min(row_norms(z), math.sqrt(z.shape[1]))
    length = row_norms(d)
    scale = torch.where(length > limit, limit / length.clamp_min(torch.finfo(z.dtype).tiny), 1.0)
    scale = torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))
    return torch.nan_to_num(d * scale[:, None], nan=0.0, posinf=0.0, neginf=0.0), scale


# -- the Jacobian model ---------------------------------------------------------------------------


def factor(jac: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LU factors per sample; a singular or non-finite matrix is shifted (or replaced by I)."""
    lu, pivots, info = lu_factor_ex(jac)
    bad = (info != 0) | ~finite_matrices(lu)
    if bool(bad.any()):
        finite = finite_matrices(jac)
        eye = torch.eye(jac.shape[-1], dtype=jac.dtype, device=jac.device)
        size = jac.abs().amax(dim=(1, 2)).clamp_min(1.0)
        shift = (torch.finfo(jac.dtype).eps ** 0.5 * size)[:, None, None] * eye
        fixed = torch.where(finite[:, None, None], jac + shift, eye)
        lu2, pivots2, _ = lu_factor_ex(fixed)
        lu = torch.where(bad[:, None, None], lu2, lu)
        pivots = torch.where(bad[:, None], pivots2, pivots)
    return lu, pivots


def _low_rank(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, k: int, out: torch.Tensor
) -> torch.Tensor:
    """out + Σᵢ leftᵢ (rightᵢ · x) over the first k terms (unused terms are zero)."""
    if k == 0:
        return out
    coef = torch.bmm(right[:, :k], x.unsqueeze(2))  # (B, k, 1)
    return torch.baddbmm(out.unsqueeze(1), coef.transpose(1, 2), left[:, :k]).squeeze(1)


class JacobianModel:
    """Per-sample J ≈ J₀ + Σ cᵢ sᵢᵀ and its inverse H = J₀⁻¹ + Σ aᵢ bᵢᵀ, updated by Broyden.

    J₀ is an exact Jacobian kept dense with its LU factors (``dense``), or I/h0 (Broyden's start,
    no Jacobian at all). The rank-one terms are rows of (B, k, n) tensors with a per-sample count,
    so each sample adds, drops and refreshes its own terms. When a sample's ``memory`` terms are
    used up, a dense model folds them into J₀ (one O(n³) refactorisation, the model unchanged);
    an identity model clears them (Broyden's restart), or with ``slide`` its next term overwrites
    its oldest (a sliding window: the sum of terms does not depend on their order, so the slots
    form a ring and nothing is moved). ``inverse_only`` keeps H alone (a line search needs nothing
    else), halving the memory.
    """

    def __init__(
        self,
        z: torch.Tensor,
        memory: int,
        *,
        dense: bool,
        h0: float = 1.0,
        inverse_only: bool = False,
        slide: bool = False,
    ) -> None:
        batch, n = z.shape
        self.memory = memory
        self.dense = dense
        self.slide = slide
        self.h0 = h0
        self.inverse_only = inverse_only
        self.jac0: torch.Tensor | None = None
        self.lu: torch.Tensor | None = None
        self.pivots: torch.Tensor | None = None
        kinds = 2 if inverse_only else 4
        # Slots are allocated as they fill (doubling), so a large memory costs nothing up front
        # to a run that converges in a few iterations.
        capacity = min(memory, 32)
        self.terms = torch.zeros(batch, kinds, capacity, n, dtype=z.dtype, device=z.device)
        self.count = torch.zeros(batch, dtype=torch.int64, device=z.device)
        # Terms written since each row's last clear: the next one goes to slot written % memory.
        self.written = torch.zeros(batch, dtype=torch.int64, device=z.device)
        self.kmax = 0  # an upper bound on every count (terms beyond a row's count are zero)
        self.uniform = True  # every row holds exactly kmax terms and has written ``pos``
        self.pos = 0

    # -- rows of terms: c, s (model) and a, b (inverse) ----------------------------------------
    def _rows(self, kind: Literal["c", "s", "a", "b"]) -> torch.Tensor:
        offset = {"a": 0, "b": 1} if self.inverse_only else {"c": 0, "s": 1, "a": 2, "b": 3}
        return self.terms[:, offset[kind]]

    # -- products ------------------------------------------------------------------------------
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """J x."""
        base = self._j0(x, transpose=False)
        return _low_rank(x, self._rows("c"), self._rows("s"), self.kmax, base)

    def apply_t(self, x: torch.Tensor) -> torch.Tensor:
        """Jᵀ x."""
        base = self._j0(x, transpose=True)
        return _low_rank(x, self._rows("s"), self._rows("c"), self.kmax, base)

    def solve(self, x: torch.Tensor) -> torch.Tensor:
        """H x ≈ J⁻¹ x."""
        return _low_rank(x, self._rows("a"), self._rows("b"), self.kmax, self._h0(x, False))

    def solve_t(self, x: torch.Tensor) -> torch.Tensor:
        """Hᵀ x."""
        return _low_rank(x, self._rows("b"), self._rows("a"), self.kmax, self._h0(x, True))

    def matrix(self) -> torch.Tensor:
        """J as a dense (B, n, n) tensor (for Levenberg–Marquardt and scaling)."""
        batch, _, _, n = self.terms.shape
        if self.jac0 is not None:
            base = self.jac0
        else:
            eye = torch.eye(n, dtype=self.terms.dtype, device=self.terms.device)
            base = (eye / self.h0).expand(batch, n, n)
        k = self.kmax
        if k == 0:
            return base
        return torch.baddbmm(base, self._rows("c")[:, :k].transpose(1, 2), self._rows("s")[:, :k])

    def _j0(self, x: torch.Tensor, *, transpose: bool) -> torch.Tensor:
        if self.jac0 is None:
            return x / self.h0
        if transpose:
            return torch.bmm(x.unsqueeze(1), self.jac0).squeeze(1)
        return matvec(self.jac0, x)

    def _h0(self, x: torch.Tensor, transpose: bool) -> torch.Tensor:
        if self.lu is None or self.pivots is None:
            return x * self.h0 if self.h0 != 1.0 else x
        rhs = x.unsqueeze(2)
        return torch.linalg.lu_solve(self.lu, self.pivots, rhs, adjoint=transpose).squeeze(2)

    # -- changes -------------------------------------------------------------------------------
    def set_jacobian(self, rows: torch.Tensor, jac: torch.Tensor) -> None:
        """Exact Jacobians for the rows in ``rows`` (taken from ``jac``); their terms are dropped."""
        if bool(rows.all()) or self.jac0 is None:
            base = (
                jac.contiguous()
                if self.jac0 is None
                else torch.where(rows[:, None, None], jac, self.jac0)
            )
            self.jac0 = base.contiguous()
            self.lu, self.pivots = factor(self.jac0)
        else:
            index = rows.nonzero().flatten()
            self.jac0[index] = jac[index]
            lu, pivots = factor(self.jac0[index])
            self.lu[index] = lu  # type: ignore[index]
            self.pivots[index] = pivots  # type: ignore[index]
        self.clear(rows)

    def clear(self, rows: torch.Tensor) -> None:
        """Drop every rank-one term of the rows in ``rows``."""
        if bool(rows.all()):
            self.terms.zero_()
            self.count.zero_()
            self.written.zero_()
            self.kmax = 0
            self.pos = 0
            self.uniform = True
            return
        self.terms[rows.nonzero().flatten()] = 0.0
        self.count = torch.where(rows, torch.zeros_like(self.count), self.count)
        self.written = torch.where(rows, torch.zeros_like(self.written), self.written)
        self.uniform = False

    def append(self, rows: torch.Tensor, **vectors: torch.Tensor) -> None:
        """Add one rank-one term (c, s, a, b as the model keeps) to each row in ``rows``."""
        order = ("a", "b") if self.inverse_only else ("c", "s", "a", "b")
        new = torch.stack([vectors[k] for k in order], dim=1)  # (B, kinds, n)
        capacity = self.terms.shape[2]
        if capacity < self.memory and self.kmax >= capacity:
            more = torch.zeros_like(self.terms[:, :, : min(capacity, self.memory - capacity)])
            self.terms = torch.cat([self.terms, more], dim=2)
        if self.uniform and bool(rows.all()):
            self.terms[:, :, self.pos % self.memory] = new
            self.pos += 1
            self.written += 1
            self.kmax = min(self.pos, self.memory)
            self.count.fill_(self.kmax)
        else:
            # Write only the new terms (a torch.where over the whole memory would read and
            # rewrite all of it each time, once any sample has stopped or skipped an update).
            index = rows.nonzero().flatten()
            slot = (self.written % self.memory).index_select(0, index)
            self.terms[index, :, slot] = new.index_select(0, index)
            self.written = self.written + rows.to(self.written.dtype)
            self.count = self.written.clamp(max=self.memory)
            self.kmax = int(self.count.max())
            self.uniform = False
        if self.slide:
            return
        full = self.count >= self.memory
        if self.kmax >= self.memory and bool(full.any()):
            self._fold(full)

    def _fold(self, rows: torch.Tensor) -> None:
        """Rows whose memory is full: fold the terms into a dense J₀, or clear them."""
        if self.dense and self.jac0 is not None and not self.inverse_only:
            k = self.memory
            folded = torch.baddbmm(
                self.jac0, self._rows("c")[:, :k].transpose(1, 2), self._rows("s")[:, :k]
            )
            self.set_jacobian(rows, folded)
        else:
            self.clear(rows)


# -- line-search directions ---------------------------------------------------------------------


@dataclass
class Proposal:
    """A direction per sample and the slope gᵀJ_g d of ½‖g‖² along it."""

    direction: torch.Tensor  # (B, n)
    slope: torch.Tensor  # (B,), negative for a descent direction


class Direction:
    """How a step direction is found: ``start`` once, then ``propose`` and ``learn`` each step."""

    # Whether the direction is a function of z (and g = g(z)) alone, not of what it learned: the
    # line search then stops a sample that returns to an earlier iterate with the same direction.
    function_of_z = False

    def setup(self, stop: StopRule) -> None:
        """The stopping rule in force, before ``start`` (see ``Method.setup``)."""

    def start(self, problem: Problem, z: torch.Tensor, g: torch.Tensor) -> None:
        """Allocate what the direction keeps per sample."""

    def propose(
        self, problem: Problem, z: torch.Tensor, g: torch.Tensor, active: torch.Tensor
    ) -> Proposal:
        """The direction and its slope for every sample (rows outside ``active`` are ignored)."""
        raise NotImplementedError

    def learn(
        self,
        z: torch.Tensor,
        g: torch.Tensor,
        step: torch.Tensor,
        g_new: torch.Tensor,
        accepted: torch.Tensor,
        active: torch.Tensor,
    ) -> None:
        """Take in the last trial: ``step`` from z and g there (``accepted`` or not)."""

    def stuck(self) -> torch.Tensor | None:
        """Samples this direction gave up on, or None."""
        return None


class NewtonDirection(Direction):
    """d = −J_g⁻¹ g with a fresh autodiff Jacobian of every running sample, each iteration."""

    function_of_z = True

    def start(self, problem: Problem, z: torch.Tensor, g: torch.Tensor) -> None:
        """Dense Jacobians must fit; nothing else to keep."""
        problem.check_dense_fits()

    def propose(
        self, problem: Problem, z: torch.Tensor, g: torch.Tensor, active: torch.Tensor
    ) -> Proposal:
        """Solve J d = −g (least squares where J is singular); the slope is gᵀ(J d), exactly.

        Only the running samples are factored: finished ones get a zero step and slope (an LU
        of n = 512 costs as much whether or not its sample still needs it).
        """
        d = torch.zeros_like(z)
        slope = torch.zeros(z.shape[0], dtype=z.dtype, device=z.device)
        index = active.nonzero().flatten()
        if index.numel() == 0:
            return Proposal(d, slope)
        everyone = index.numel() == z.shape[0]
        g_run = g if everyone else g.index_select(0, index)
        jac = jacobians_at(problem, z, index)
        d_run = -solve_newton(jac, g_run)
        slope_run = (g_run * matvec(jac, d_run)).sum(dim=1)
        if everyone:
            return Proposal(d_run, slope_run)
        d[index], slope[index] = d_run, slope_run
        return Proposal(d, slope)


def resolve_update(update: str, form: str) -> str:
    """Broyden's update for ``update: auto``: bad on a fixed-point problem, good on a root problem.

    For g = z − f(z), J_g = I − J_f and H = I is already the plain step; the bad update changes
    that inverse least, and its multisecant form is Anderson's (Fang & Saad 2009). On the hard
    layer family it took 1.1–2.2 times fewer iterations than the good update and, reading its
    memory once per product instead of twice, 2–5 times less time. The good update is the
    classical choice for a general system (it changes the Jacobian least), whose J_g need not be
    near the identity.
    """
    if update != "auto":
        return update
    return "bad" if form == "fixed_point" else "good"


class BroydenDirection(Direction):
    """d = −H g with H ≈ J_g⁻¹ = h0·I plus at most ``memory`` rank-one terms per sample.

    After a trial step s with residual change y (accepted or not: both carry information):

    - good:  H ← H + (s − H y) sᵀH / (sᵀ H y)   (the Jacobian changes least, secant Js = y)
    - bad:   H ← H + (s − H y) yᵀ / (yᵀ y)        (the inverse changes least)

    ``auto`` takes the bad update for a fixed-point problem and the good one for a root problem
    (``resolve_update``).

    An update whose denominator vanishes (relative to its factors) is skipped for that sample.
    A full memory is cleared (the restart reduction), or with ``slide`` drops its oldest term for
    the new one (torchdeq's limited memory; measured worse once it slides, see docs/solvers.md).
    Two line searches in a row without an acceptable step mean the model points the wrong way:
    the sample's terms are cleared (H = h0·I again); a sample that fails twice more after that is
    reported as stuck.
    """

    def __init__(self, memory: int, h0: float, update: str, *, slide: bool = False) -> None:
        self.memory = memory
        self.h0 = h0
        self.requested = update  # as configured; ``update`` is what ``start`` resolved it to
        self.update = update
        self.slide = slide
        self.model: JacobianModel | None = None
        self.fails: torch.Tensor | None = None
        # H g at the g of the last proposal, and H g for the two residuals the next proposal can
        # start from (the trial's, where it was taken, or the old one), so that each iteration
        # reads the memory twice instead of three times (it is the bulk of the work once the
        # memory holds hundreds of terms).
        self._hg: tuple[torch.Tensor, torch.Tensor] | None = None
        self._next: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def start(self, problem: Problem, z: torch.Tensor, g: torch.Tensor) -> None:
        """An empty inverse model per sample; ``auto`` becomes the update for the problem's form."""
        self.update = resolve_update(self.requested, problem.form)
        self.model = JacobianModel(
            z, self.memory, dense=False, h0=self.h0, inverse_only=True, slide=self.slide
        )
        self.fails = torch.zeros(z.shape[0], dtype=torch.int64, device=z.device)
        self._hg = self._next = None

    def propose(
        self, problem: Problem, z: torch.Tensor, g: torch.Tensor, active: torch.Tensor
    ) -> Proposal:
        """d = −H g; the model's own slope is −‖g‖² (gᵀ J_model d with J_model = H⁻¹)."""
        if self.model is None:
            raise RuntimeError("BroydenDirection.start was not called")
        hg = self._known_product(g, active)
        if hg is None:
            hg = self.model.solve(g)
        self._hg = (g, hg)
        return Proposal(-hg, -(g * g).sum(dim=1))

    def _known_product(self, g: torch.Tensor, active: torch.Tensor) -> torch.Tensor | None:
        """H g from the last update where every running row's g is one of the two it prepared."""
        if self._next is None:
            return None
        g_trial, hg_trial, g_old, hg_old = self._next
        self._next = None
        if g.shape != g_trial.shape:
            return None
        same_trial = (g == g_trial).all(dim=1)
        same_old = (g == g_old).all(dim=1)
        if not bool((same_trial | same_old | ~active).all()):
            return None
        return torch.where(same_trial[:, None], hg_trial, hg_old)

    def learn(
        self,
        z: torch.Tensor,
        g: torch.Tensor,
        step: torch.Tensor,
        g_new: torch.Tensor,
        accepted: torch.Tensor,
        active: torch.Tensor,
    ) -> None:
        """Rank-one update from the last trial (step, g_new − g); reset after repeated failures."""
        model, fails = self.model, self.fails
        if model is None or fails is None:
            raise RuntimeError("BroydenDirection.start was not called")
        dg = g_new - g
        known = self._hg is not None and self._hg[0] is g
        if known and self._hg is not None:
            # H(g_new − g) = H g_new − H g: the product at g is the proposal's.
            h_gnew = model.solve(g_new)
            h_g = self._hg[1]
            h_dg = h_gnew - h_g
        else:
            h_dg = model.solve(dg)
        if self.update == "good":
            b = model.solve_t(step)
            denom = (b * dg).sum(dim=1)
            scale = row_norms(b) * row_norms(dg)
        else:
            b = dg
            denom = (dg * dg).sum(dim=1)
            scale = denom
        ok = (denom.abs() > 1e-12 * scale) & torch.isfinite(denom) & (scale > 0)
        ok &= torch.isfinite(dg).all(dim=1) & active
        safe = torch.where(ok, denom, torch.ones_like(denom))
        a = (step - h_dg) / safe[:, None]
        fails = torch.where(accepted, torch.zeros_like(fails), fails + active.to(fails.dtype))
        reset = fails == 2
        added = ok & ~reset
        slides = model.slide and model.kmax >= model.memory
        model.append(added, a=a, b=b)
        if bool(reset.any()):
            model.clear(reset)
        self.fails = fails
        self._hg = self._next = None
        if known and not slides:
            # The updated H x = H x + a (b·x) on rows that took the term; h0·x on rows whose
            # memory was just cleared (count 0). A sliding row dropped a term as well: no shortcut.
            cleared = (model.count == 0)[:, None]
            take = torch.where(added[:, None], a, 0.0)

            def updated(x: torch.Tensor, hx: torch.Tensor) -> torch.Tensor:
                hx = hx + take * (b * x).sum(dim=1, keepdim=True)
                return torch.where(cleared, x * self.h0, hx)

            self._next = (g_new, updated(g_new, h_gnew), g, updated(g, h_g))

    def stuck(self) -> torch.Tensor | None:
        """Samples whose reset model failed twice more."""
        return None if self.fails is None else self.fails >= 4


# The forcing term's floor OVERSOLVE·atol/‖g‖: the linear residual a Newton step must reach to
# meet the tolerance, with a margin for the step's own nonlinearity (Kelley's 0.5).
OVERSOLVE = 0.5


class KrylovDirection(Direction):
    """Inexact Newton: GMRES on J_g d = −g to ‖J_g d + g‖ ≤ η‖g‖, with JVPs only.

    Forcing (``ew``, Eisenstat–Walker choice 2): η_{k+1} = 0.9 (‖g_{k+1}‖/‖g_k‖)², safeguarded by
    0.9 η_k² when that exceeds 0.1, and never below OVERSOLVE·atol/‖g_{k+1}‖ (Kelley's guard
    against solving beyond what the run's tolerance asks), capped at ``eta_max``; ``constant``
    keeps η = ``eta``.

    ``precondition``: ``shared`` preconditions GMRES from the right with the batch's shared
    linearisation I − diag(s̄) W (``deqcli.linalg.preconditioners``), factored again only when
    the mean scale has moved; ``auto`` does so where the Jacobian has that form (the tanh layer,
    n ≤ 4096), ``none`` never.
    """

    # Of z and η: at an earlier iterate with the same direction as then, η no longer matters.
    function_of_z = True

    def __init__(
        self, krylov_dim: int, forcing: str, eta: float, eta_max: float, precondition: str = "none"
    ) -> None:
        self.krylov_dim = krylov_dim
        self.forcing = forcing
        self.eta0 = eta
        self.eta_max = eta_max
        self.precondition = precondition
        self.eta: torch.Tensor | None = None
        self.inner = 0
        self.shared: SharedLinearisation | None = None
        self.factorisations = 0  # LUs of the shared linearisation
        self.from_solves = 0  # GMRES products its solves gave instead of JVPs
        self.atol = 0.0  # the run's absolute tolerance (``setup``): the floor of the forcing term
        # (B,) the forcing term is that floor (Eisenstat–Walker asked for less): the step that
        # solves the next system is expected to end the sample's run.
        self.last: torch.Tensor | None = None

    def setup(self, stop: StopRule) -> None:
        """The run's absolute tolerance bounds how accurately each Newton system is solved."""
        self.atol = stop.atol

    def start(self, problem: Problem, z: torch.Tensor, g: torch.Tensor) -> None:
        """Every sample starts with forcing term ``eta``."""
        if self.precondition == "shared" and problem.row_scaled_jacobian is None:
            raise UsageError(
                "solver.precondition: 'shared' needs a map whose Jacobian is diag(s)·W with one W "
                "for the batch (kind: tanh_layer); use auto or none"
            )
        self.eta = torch.full((z.shape[0],), self.eta0, dtype=z.dtype, device=z.device)
        self.last = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)

    def propose(
        self, problem: Problem, z: torch.Tensor, g: torch.Tensor, active: torch.Tensor
    ) -> Proposal:
        """One GMRES cycle of at most ``krylov_dim`` JVPs (counted), from d = 0.

        The slope bound: gᵀJd = −‖g‖² + gᵀr ≤ −(1 − ρ)‖g‖² with ρ = ‖J d + g‖/‖g‖ reached.
        """
        op = jacobian_operator(problem, z).with_active(active)
        res = self.solve(op, g, active)
        reached = torch.clamp(res.residual, max=1.0)
        slope = -(1 - reached) * (g * g).sum(dim=1)
        return Proposal(res.x, slope)

    def solve(self, op: LinearOperator, g: torch.Tensor, active: torch.Tensor) -> KrylovResult:
        """GMRES on ``op`` d = −g for the rows in ``active``, to each row's forcing term."""
        if self.eta is None:
            raise RuntimeError("KrylovDirection.start was not called")
        res = gmres(
            op,
            -g,
            rtol=self.eta,
            restart=self.krylov_dim,
            max_matvecs=self.krylov_dim,
            precond=self._preconditioner(op, active),
            active=active,
            true_residual=False,
        )
        self.inner = int(res.iterations.max()) if res.iterations.numel() else 0
        self.from_solves += res.from_solves
        return res

    def _preconditioner(
        self, op: LinearOperator, active: torch.Tensor
    ) -> SharedLinearisation | None:
        """The shared linearisation for this solve (refactored where the batch's mean scale
        moved, or where the last solve used over half the Krylov steps, unless this solve is
        expected to be the run's last), or None."""
        if self.precondition == "none" or not isinstance(op, RowScaledJacobian):
            return None
        if shared_weight(op) is None or (self.precondition == "auto" and op.dim > MAX_DIM):
            return None
        if self.shared is not None and self.last is not None and bool((self.last | ~active).all()):
            # The step expected to end the run (see ``last``): a stale M costs only GMRES steps
            # there (the step is taken whole in the quadratic regime, and GMRES reaches η
            # whatever M is), fewer than an LU's worth (at n = 1024, B = 8, ten preconditioned
            # steps). The mean scale also moves most there, once the samples that converged
            # leave it: on rot-slow the last two running samples' mean was 0.065 from the
            # batch's, and the LU that refactored it for a 2–3 step solve was a tenth of
            # `auto`'s time.
            return self.shared
        mean = SharedLinearisation.mean_scale(op, active)
        if self.shared is None or not self.shared.fits(mean) or 2 * self.inner > self.krylov_dim:
            self.shared = SharedLinearisation.of(op, active, self.shared, mean)
            self.factorisations += 1
        return self.shared

    def learn(
        self,
        z: torch.Tensor,
        g: torch.Tensor,
        step: torch.Tensor,
        g_new: torch.Tensor,
        accepted: torch.Tensor,
        active: torch.Tensor,
    ) -> None:
        """Update the forcing term from the residual reduction of this iteration."""
        if self.forcing != "ew" or self.eta is None:
            return
        # A rejected step leaves z where it was: a tighter solve gives a truer Newton direction.
        tighter = torch.clamp_min(0.1 * self.eta, torch.finfo(self.eta.dtype).eps)
        eta, floored = self._next_eta(g, g_new)
        self.eta = torch.where(accepted, eta, tighter)
        self.last = accepted & floored

    def force(self, g: torch.Tensor, g_new: torch.Tensor, rows: torch.Tensor) -> None:
        """The Eisenstat–Walker update for the rows in ``rows`` only (the others keep theirs)."""
        if self.forcing != "ew" or self.eta is None:
            return
        eta, floored = self._next_eta(g, g_new)
        self.eta = torch.where(rows, eta, self.eta)
        if self.last is not None:
            self.last = torch.where(rows, floored, self.last)

    def _next_eta(self, g: torch.Tensor, g_new: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The next forcing term per row, and whether the tolerance's floor set it."""
        if self.eta is None:
            raise RuntimeError("KrylovDirection.start was not called")
        old = row_norms(g)
        ratio = row_norms(g_new) / old.clamp_min(torch.finfo(old.dtype).tiny)
        eta = 0.9 * ratio.square()
        floor = 0.9 * self.eta.square()
        eta = torch.where(floor > 0.1, torch.maximum(eta, floor), eta)
        # A step whose linear residual is below OVERSOLVE·atol ends the run whatever more GMRES
        # steps would add: at 6e-8 with atol 1e-8, EW's η of 5.6e-7 cost 13 steps where η = 0.08
        # (three steps) reached the tolerance too (Kelley 2003, nsoli).
        floored = torch.zeros_like(eta, dtype=torch.bool)
        if self.atol > 0:
            tiny = torch.finfo(eta.dtype).tiny
            tolerance = OVERSOLVE * self.atol / row_norms(g_new).clamp_min(tiny)
            floored = tolerance >= eta
            eta = torch.maximum(eta, tolerance)
        return torch.nan_to_num(eta, nan=self.eta_max).clamp(max=self.eta_max), floored
