"""Anderson acceleration in the Walker–Ni form, batched, with the least-squares problem kept as a QR.

Walker & Ni (2011): with ΔZ and ΔG the last min(m, k) differences of iterates and residuals
g = z − f(z),

    γ = argmin ‖g_k − ΔG γ‖,    z_{k+1} = z_k − ΔZ γ − β (g_k − ΔG γ).

The least-squares problem is solved from ΔG = Q R, kept up to date as the window slides: a new
column is appended by Gram–Schmidt against Q (repeated once when the first pass cancels: "twice is
enough"), the oldest is removed by the orthogonal transformation that restores R's triangle (QR
downdating). γ solves R γ = Qᵀg. No normal
equations are formed: their condition number is the square of ΔG's, which loses all accuracy in
float32 long before ΔG itself is ill-conditioned.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from deqcli.solvers.base import Method, State, evaluate
from deqcli.solvers.globalisation import line_search

if TYPE_CHECKING:
    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult
    from deqcli.solvers.options import Anderson


@dataclass
class AndersonState(State):
    """Iterate, residual, f(z) and the QR factors of the residual differences, per sample."""

    f: torch.Tensor  # (B, n): f(z) = z − g
    df: torch.Tensor  # (B, m, n): differences of f in ring slots (logical column i at head + i)
    q: torch.Tensor  # (B, m, n): orthonormal rows spanning ΔG, logical order
    r: torch.Tensor  # (B, m, m): ΔG = Qᵀ R (rows of q), upper triangular
    qg: torch.Tensor  # (B, m): Q g for the current residual
    count: torch.Tensor  # (B,): columns in use
    head: torch.Tensor  # (B,): ring slot of the oldest column
    best: torch.Tensor  # (B,): smallest ‖g‖ since the sample's last restart
    restarts: torch.Tensor  # (B,): memory cleared (residual growth)
    drops: torch.Tensor  # (B,): oldest columns dropped for conditioning
    since: torch.Tensor  # (B,): iterations since ‖g‖ last fell below ``best``
    plain: torch.Tensor  # (B,): plain steps left after a stall (0: mixing)
    stalls: torch.Tensor  # (B,): stalls that turned the sample to plain steps
    patience: torch.Tensor  # (B,): iterations without a smaller residual that make a stall
    recent: torch.Tensor  # (B, window): ½‖g‖² of the last iterations (line search reference)
    # While every sample holds the same number of columns from the same ring slot (no sample has
    # dropped or cleared its own), these are that count and slot, and the hot path needs no
    # per-row indexing or host synchronisation. None once the samples differ.
    shared: tuple[int, int] | None = (0, 0)
    # Some sample is taking plain steps (``plain`` > 0): only then does the step read ``plain``.
    plain_any: bool = False


# A Gram–Schmidt pass that leaves less than this fraction of the new difference gets a second.
REORTHOGONALISE = 2**-0.5
# Plain steps after a stall end early once the residual exceeds this × the sample's best.
PLAIN_RISE = 10.0
# The patience of a sample whose plain steps diverged: it never stalls into them again.
NEVER = 2**40


def condition_limit(cond_max: float, dtype: torch.dtype) -> float:
    """The largest cond(R) trusted in ``dtype``: cond_max, but never beyond 0.01/ε.

    Solving with R loses about log10(cond(R)) digits: in float32 (ε ≈ 1.2e-7) a limit of 1e9
    would let γ be pure noise, so the safeguard tightens itself to 8.4e4 there.
    """
    return min(cond_max, 0.01 / torch.finfo(dtype).eps)


def _second_pass(
    w: torch.Tensor, basis: torch.Tensor, coeff: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gram–Schmidt's second pass ("twice is enough"): w (B, 1, n) against the rows of ``basis``
    once more, and the coefficients it adds to ``coeff``."""
    h2 = torch.bmm(w, basis.transpose(1, 2))  # (B, 1, k)
    return torch.baddbmm(w, h2, basis, alpha=-1), coeff + h2[:, 0]


class AndersonMethod(Method):
    """Anderson acceleration (Walker & Ni 2011) with depth ``m`` and mixing ``beta``.

    The first step is z₁ = z₀ − β g(z₀) (with β = 1: z₁ = f(z₀)). For a linear map and m ≥ n this
    is GMRES: the exact solution after at most n + 1 steps. The depth is min(m, n): more than n
    differences in Rⁿ are always dependent.

    Safeguards (``restart``): while cond(R), estimated by max|R_ii|/min|R_ii|, exceeds ``cond_max``
    (capped at 0.01/ε for the dtype) a sample drops its oldest column (Walker–Ni's conditioning control); when its residual exceeds
    ``growth`` times its best since the last restart, its memory is cleared. On a fixed-point
    problem, a sample whose residual has not reached a new smallest value for ``stall``
    iterations takes ``plain`` plain steps z − βg before it mixes again; its differences are
    still recorded, so it resumes with a memory of those steps. Plain steps that find nothing
    smaller within the sample's patience end early and double it; one that raises the residual
    tenfold above the best ends them for good. ``lam`` > 0 adds a
    Tikhonov term relative to each column's norm, solved as the stacked least-squares problem
    [R; √λ·diag‖ΔG_i‖] γ ≈ [Qg; 0] (still no normal equations). ``globalisation: line-search``
    treats the Anderson step as a direction and backtracks along it (non-monotone over ``window``
    iterations) when the residual would grow.

    Cost per iteration: one evaluation of f, O(m·n) work per sample for the new column, O(m²·n + m³)
    when the window slides (a rotation of Q, a QR of the small factor) and O(m²) for γ; memory
    2·m·B·n numbers.
    """

    options: Anderson

    def init(self, problem: Problem, z0: torch.Tensor) -> AndersonState:
        """Evaluate g(z0) and allocate the memory."""
        o = self.options
        f0, g0 = evaluate(problem, z0)
        batch, n = z0.shape
        m = min(o.m, n)
        opts = {"dtype": z0.dtype, "device": z0.device}
        ints = {"dtype": torch.int64, "device": z0.device}
        phi0 = 0.5 * g0.square().sum(dim=1)
        return AndersonState(
            z=z0,
            g=g0,
            f=f0,
            df=torch.zeros(batch, m, n, **opts),
            q=torch.zeros(batch, m, n, **opts),
            r=torch.zeros(batch, m, m, **opts),
            qg=torch.zeros(batch, m, **opts),
            count=torch.zeros(batch, **ints),
            head=torch.zeros(batch, **ints),
            best=torch.linalg.vector_norm(g0, dim=1),
            restarts=torch.zeros(batch, **ints),
            drops=torch.zeros(batch, **ints),
            since=torch.zeros(batch, **ints),
            plain=torch.zeros(batch, **ints),
            stalls=torch.zeros(batch, **ints),
            patience=torch.full((batch,), o.stall, **ints),
            recent=phi0[:, None].repeat(1, o.window),
        )

    # -- the step ------------------------------------------------------------------------------
    def step(self, problem: Problem, state: AndersonState) -> AndersonState:  # type: ignore[override]
        """Mix, evaluate once (or backtrack), then update the QR with the new difference."""
        o = self.options
        s = state
        active = s.active if s.active is not None else torch.ones_like(s.count, dtype=torch.bool)
        z_new = self._mix(s)
        if o.globalisation == "line-search":
            d = z_new - s.z
            slope = -(s.g * s.g).sum(dim=1)
            search = line_search(
                problem,
                s.z,
                s.g,
                d,
                slope,
                c=1e-4,
                max_backtracks=o.max_backtracks,
                active=active,
                reference=s.recent.amax(dim=1),
            )
            z_trial = s.z + search.step
            g_trial = search.g_trial
            f_trial = z_trial - g_trial
            # A rejected trial is not taken, but its difference still informs the next mix
            # (Anderson's secant conditions hold for any pair of points, not only successive ones).
            z_new, g_new = search.z, search.g
            f_new = z_new - g_new
        else:
            f_new, g_new = evaluate(problem, z_new)
            f_trial, g_trial = f_new, g_new
        if s.shared is not None and s.shared[0] == s.df.shape[1]:
            self._slide(s, s.shared[1], f_trial, g_trial, g_new)
        else:
            self._record(s, f_trial - s.f, g_trial - s.g, g_new)
        res = torch.linalg.vector_norm(g_new, dim=1)
        if o.restart:
            self._safeguard(s, res, active, stalls=o.stall > 0 and problem.form == "fixed_point")
        if o.globalisation == "line-search":
            if o.window > 1:
                s.recent = torch.roll(s.recent, 1, dims=1)
            s.recent[:, 0] = 0.5 * res.square()
        s.z, s.g, s.f = z_new, g_new, f_new
        # The driver's norms from what the step holds: ‖f‖ directly instead of ‖z − g‖.
        s.res, s.f_norm = res, torch.linalg.vector_norm(f_new, dim=1)
        return s

    def _mix(self, s: AndersonState) -> torch.Tensor:
        """z − βg − ΔZγ + βΔGγ with γ from R γ = Q g (or its Tikhonov form)."""
        o = self.options
        k = s.shared[0] if s.shared is not None else int(s.count.max())
        if k == 0:
            return s.z - o.beta * s.g
        gamma = self._gamma(s, k)  # (B, k), logical order, zero beyond each row's count
        m = s.df.shape[1]
        # ΔF is stored in ring slots: logical column i of row b sits in slot (head_b + i) mod m.
        # Only the slots in use are read: at most two contiguous runs when the samples agree.
        z_new = s.f.unsqueeze(1)
        if s.shared is not None and k == m:
            # A full window uses every slot: one product with γ rolled into slot order.
            slots = torch.roll(gamma, s.shared[1], dims=1) if s.shared[1] else gamma
            z_new = torch.baddbmm(z_new, slots.unsqueeze(1), s.df, alpha=-1)
        elif s.shared is not None:
            head = s.shared[1]
            first = min(k, m - head)
            z_new = torch.baddbmm(
                z_new, gamma[:, None, :first], s.df[:, head : head + first], alpha=-1
            )
            if first < k:
                z_new = torch.baddbmm(z_new, gamma[:, None, first:], s.df[:, : k - first], alpha=-1)
        else:
            padded = torch.nn.functional.pad(gamma, (0, m - k)) if k < m else gamma
            slots = (torch.arange(m, device=s.head.device)[None, :] - s.head[:, None]) % m
            z_new = torch.baddbmm(z_new, padded.gather(1, slots).unsqueeze(1), s.df, alpha=-1)
        z_new = z_new.squeeze(1)
        if o.beta != 1.0:
            # z − βg − ΔZγ + βΔGγ = (f − ΔFγ) + (1 − β)(g − ΔGγ), and ΔGγ = Qᵀ(Rγ).
            r_gamma = torch.bmm(s.r[:, :k, :k], gamma.unsqueeze(2)).transpose(1, 2)
            dg_gamma = torch.bmm(r_gamma, s.q[:, :k]).squeeze(1)
            z_new = z_new + (1 - o.beta) * (s.g - dg_gamma)
        return z_new

    def _gamma(self, s: AndersonState, k: int) -> torch.Tensor:
        """Solve the small triangular (or stacked Tikhonov) system per row, masked to its count."""
        r = s.r[:, :k, :k]
        rhs = s.qg[:, :k]
        beyond = None
        if s.shared is None:
            index = torch.arange(k, device=s.count.device)
            beyond = index[None, :] >= s.count[:, None]
            eye = torch.eye(k, dtype=r.dtype, device=r.device).expand_as(r)
            mask2 = beyond[:, None, :] | beyond[:, :, None]
            r = torch.where(mask2, eye, r)
            rhs = torch.where(beyond, 0.0, rhs)
        if self.options.lam > 0:
            # Column norms of ΔG = those of R; the stacked problem [R; √λ D] γ ≈ [Qg; 0].
            weight = (self.options.lam**0.5) * torch.linalg.vector_norm(r, dim=1)
            stacked = torch.cat((r, torch.diag_embed(weight)), dim=1)
            target = torch.cat((rhs, torch.zeros_like(rhs)), dim=1)
            qq, rr = torch.linalg.qr(stacked)
            rhs = torch.bmm(qq.transpose(1, 2), target.unsqueeze(2)).squeeze(2)
            r = rr
        gamma = torch.linalg.solve_triangular(r, rhs.unsqueeze(2), upper=True).squeeze(2)
        gamma = torch.nan_to_num(gamma, nan=0.0, posinf=0.0, neginf=0.0)
        if s.plain_any:
            # γ = 0 is the plain step z − βg.
            beyond = (s.plain > 0)[:, None] if beyond is None else beyond | (s.plain > 0)[:, None]
        return gamma if beyond is None else torch.where(beyond, 0.0, gamma)

    # -- the QR of ΔG ----------------------------------------------------------------------------
    def _record(
        self, s: AndersonState, df: torch.Tensor, dg: torch.Tensor, g_new: torch.Tensor
    ) -> None:
        """Slide the window where it is full, append the new difference, project g_new."""
        m = s.df.shape[1]
        if s.shared is not None:
            if s.shared[0] >= m:
                self._drop_oldest(s, None)
        else:
            full = s.count >= m
            if bool(full.any()):
                self._drop_oldest(s, full)
        k = s.shared[0] if s.shared is not None else int(s.count.max())
        if k:
            basis = s.q[:, :k]
            # Rows (Δg, g_new) against the basis: (B, 2, n)·(B, n, k), the fast layout for bmm.
            pair = torch.stack((dg, g_new), dim=1)
            h = torch.bmm(pair, basis.transpose(1, 2))  # (B, 2, k): Q dg and Q g_new
            w = torch.baddbmm(dg.unsqueeze(1), h[:, :1], basis, alpha=-1)
            coeff = h[:, 0]
            qg_old = h[:, 1]
            rho = torch.linalg.vector_norm(w, dim=2).squeeze(1)
            # Kahan–Parlett: one Gram–Schmidt pass is enough unless it cancelled more than a
            # factor √2 of ‖Δg‖; then a second pass restores orthogonality to working precision.
            if not bool((rho >= REORTHOGONALISE * torch.linalg.vector_norm(dg, dim=1)).all()):
                w, coeff = _second_pass(w, basis, coeff)
                rho = torch.linalg.vector_norm(w, dim=2).squeeze(1)
            w = w.squeeze(1)
        else:
            w = dg
            coeff = dg.new_zeros(dg.shape[0], 0)
            qg_old = coeff
            rho = torch.linalg.vector_norm(w, dim=1)
        unit = w / rho.clamp_min(torch.finfo(w.dtype).tiny)[:, None]
        projection = (unit * g_new).sum(dim=1)
        if s.shared is not None:
            head = s.shared[1]
            s.q[:, k] = unit
            s.r[:, :k, k] = coeff
            s.r[:, k, k] = rho
            s.qg[:, :k] = qg_old
            s.qg[:, k] = projection
            s.df[:, (head + k) % m] = df
            s.shared = (k + 1, head)
        else:
            # Rows hold different counts: write each row's column at its own index.
            batch = s.count.shape[0]
            rows = torch.arange(batch, device=s.count.device)
            slot_new = s.count
            held = torch.arange(k, device=w.device)[None, :] < s.count[:, None]
            s.q[rows, slot_new] = unit
            col = torch.zeros(batch, m, dtype=w.dtype, device=w.device)
            col[:, :k] = torch.where(held, coeff, 0.0)
            col[rows, slot_new] = rho
            s.r[rows, :, slot_new] = col
            qg = torch.zeros_like(s.qg)
            qg[:, :k] = torch.where(held, qg_old, 0.0)
            qg[rows, slot_new] = projection
            s.qg = qg
            s.df[rows, (s.head + s.count) % m] = df
        s.count = s.count + 1

    def _slide(
        self,
        s: AndersonState,
        head: int,
        f_trial: torch.Tensor,
        g_trial: torch.Tensor,
        g_new: torch.Tensor,
    ) -> None:
        """Drop the oldest column and append the new difference with one pass over Q.

        The hot path of a long run: every sample holds m columns from slot ``head`` on. What
        ``_drop_oldest`` then ``_record`` compute, reordered so that Q is read twice, not four
        times. The drop's rotation G acts on Q; the new difference is orthogonalised against
        the rotated rows, Δg − (GQ)ᵀc with c = G(QΔg) from the projections on the old Q. As
        (GQ)ᵀc = Qᵀ(Gᵀc), one batched product of the m × m matrix [G's first m − 1 rows; (Gᵀc)ᵀ]
        with Q yields the rotated basis and the subtrahend together. Where that Gram–Schmidt
        pass leaves at least Δg/√2, ‖w‖² = ‖Δg‖² − ‖c‖² loses at most a bit and w·g is
        Δg·g − c·(GQ)g, so neither needs another pass over n; otherwise w is measured and
        orthogonalised once more, as in ``_record``. (f_trial, g_trial) is the point the
        difference is taken at, g_new the accepted residual (they differ after a rejected trial).
        """
        m = s.q.shape[1]
        pair = torch.empty(
            (g_new.shape[0], 2, g_new.shape[1]), dtype=g_new.dtype, device=g_new.device
        )
        torch.sub(g_trial, s.g, out=pair[:, 0])
        pair[:, 1] = g_new
        dg = pair[:, 0]
        # The oldest column's ring slot becomes the newest: ΔF is written in place.
        torch.sub(f_trial, s.f, out=s.df[:, head])
        rot, tri = torch.linalg.qr(s.r[:, :, 1:], mode="complete")  # H = rot · tri
        rot_t = rot.transpose(1, 2)
        h = torch.bmm(pair, s.q.transpose(1, 2))  # (B, 2, m): QΔg and Qg on the old basis
        dots = torch.bmm(pair[:, :1], pair.transpose(1, 2))[:, 0]  # (B, 2): Δg·Δg, Δg·g
        rotated = torch.bmm(h, rot)[:, :, : m - 1]  # (G Q Δg, G Q g) without the dropped row
        coeff, qg_kept = rotated[:, 0], rotated[:, 1]
        mixing = torch.cat((rot_t[:, : m - 1], torch.bmm(coeff.unsqueeze(1), rot_t[:, : m - 1])), 1)
        q = torch.bmm(mixing, s.q)  # rows: the rotated basis, then ((GQ)ᵀc)ᵀ
        w = q[:, m - 1]
        torch.sub(dg, w, out=w)
        tiny = torch.finfo(w.dtype).tiny
        rho_sq = dots[:, 0] - coeff.square().sum(dim=1)
        if bool((rho_sq >= REORTHOGONALISE**2 * dots[:, 0]).all()):
            rho = rho_sq.sqrt()
            scale = rho.clamp_min(tiny)
            w.div_(scale[:, None])
            projection = (dots[:, 1] - (coeff * qg_kept).sum(dim=1)) / scale
        else:
            again, coeff = _second_pass(w.unsqueeze(1), q[:, : m - 1], coeff)
            w.copy_(again.squeeze(1))
            rho = torch.linalg.vector_norm(w, dim=1)
            w.div_(rho.clamp_min(tiny)[:, None])
            projection = (w * g_new).sum(dim=1)
        s.q = q
        s.r[:, :, : m - 1] = tri
        s.r[:, : m - 1, m - 1] = coeff
        s.r[:, m - 1, m - 1] = rho
        s.qg = torch.cat((qg_kept, projection.unsqueeze(1)), dim=1)
        s.head = (s.head + 1) % m
        s.shared = (m, (head + 1) % m)

    def _drop_oldest(self, s: AndersonState, rows: torch.Tensor | None) -> None:
        """Remove logical column 0 of the rows in ``rows`` (None: every row) and restore R.

        Without column 0, R's other columns form an upper Hessenberg matrix H; the orthogonal G
        with G H upper triangular (what a sweep of Givens rotations builds; here one small QR of
        H per sample) is applied to Q as well, so ΔG = QᵀR still holds. The last row of the
        rotated Q then spans nothing that is kept and is cleared.
        """
        m = s.r.shape[1]
        k = s.count
        rot, tri = torch.linalg.qr(s.r[:, :, 1:], mode="complete")  # H = rot · tri
        rot_t = rot.transpose(1, 2)
        q = torch.bmm(rot_t, s.q)
        qg = torch.bmm(rot_t, s.qg.unsqueeze(2)).squeeze(2)
        if rows is None:
            # Every row held m columns: row m − 1 is the discarded direction (tri's last row is 0).
            q[:, m - 1] = 0.0
            qg[:, m - 1] = 0.0
            s.r[:, :, : m - 1] = tri
            s.r[:, :, m - 1] = 0.0
            s.q, s.qg = q, qg
            s.head = (s.head + 1) % m
            s.count = k - 1
            if s.shared is not None:
                s.shared = (s.shared[0] - 1, (s.shared[1] + 1) % m)
            return
        new_r = torch.zeros_like(s.r)
        new_r[:, :, : m - 1] = tri
        last = torch.arange(m, device=k.device)[None, :] == (k - 1)[:, None]
        q = torch.where(last[:, :, None], 0.0, q)
        qg = torch.where(last, 0.0, qg)
        new_r = torch.where(last[:, :, None] | last[:, None, :], 0.0, new_r)
        s.q = torch.where(rows[:, None, None], q, s.q)
        s.qg = torch.where(rows[:, None], qg, s.qg)
        s.r = torch.where(rows[:, None, None], new_r, s.r)
        s.head = torch.where(rows, (s.head + 1) % m, s.head)
        s.count = torch.where(rows, k - 1, k)
        s.shared = None

    def _clear(self, s: AndersonState, rows: torch.Tensor) -> None:
        """Forget the stored differences of the rows in ``rows`` (their next step is z − βg)."""
        keep3 = ~rows[:, None, None]
        s.q = torch.where(keep3, s.q, 0.0)
        s.r = torch.where(keep3, s.r, 0.0)
        s.df = torch.where(keep3, s.df, 0.0)
        s.qg = torch.where(rows[:, None], 0.0, s.qg)
        s.count = torch.where(rows, torch.zeros_like(s.count), s.count)
        s.head = torch.where(rows, torch.zeros_like(s.head), s.head)
        s.shared = None

    def _condition(self, s: AndersonState) -> torch.Tensor:
        """max|R_ii| / min|R_ii| over each row's own columns: O(m), a lower bound on cond(R).

        For the R of a Gram–Schmidt QR it tracks cond(R) closely; an exact SVD per step would cost
        O(m³), which dominates for the large m that hard problems need.
        """
        k = s.shared[0] if s.shared is not None else int(s.count.max())
        if k < 2:
            return torch.ones_like(s.best)
        diag = torch.diagonal(s.r[:, :k, :k], dim1=1, dim2=2).abs()
        if s.shared is not None:
            return diag.amax(dim=1) / diag.amin(dim=1)  # inf (or NaN) for a zero pivot
        used = torch.arange(k, device=s.count.device)[None, :] < s.count[:, None]
        big = torch.where(used, diag, 0.0).amax(dim=1)
        small = torch.where(used, diag, torch.inf).amin(dim=1)
        cond = big / small
        return torch.where(torch.isnan(cond), torch.full_like(cond, torch.inf), cond)

    def _safeguard(
        self, s: AndersonState, res: torch.Tensor, active: torch.Tensor, *, stalls: bool
    ) -> None:
        """Drop oldest columns while ill-conditioned; clear the memory after residual growth;
        turn a stalled sample to plain steps (``stalls``: a fixed-point problem)."""
        o = self.options
        limit = condition_limit(o.cond_max, s.r.dtype)
        grew = active & ((res > o.growth * s.best) | ~torch.isfinite(res))
        bad = active & (s.count > 1) & ~(self._condition(s) <= limit)
        flags = bad | grew
        if stalls:
            s.since = torch.where(res < s.best, 0, s.since + 1)
            if s.plain_any:
                # Plain steps end early where they find no smaller residual within the patience
                # either (the sample then waits twice as long before its next stall), or raise
                # it tenfold above the best: plain iteration diverges there, and the sample
                # never takes plain steps again.
                plain = s.plain > 0
                rose = plain & (res > PLAIN_RISE * s.best)
                failed = plain & (s.since >= s.patience)
                s.patience = torch.where(failed, 2 * s.patience, s.patience)
                s.patience = torch.where(rose, NEVER, s.patience)
                s.plain = torch.where(failed | rose, 0, (s.plain - 1).clamp_min(0))
            stalled = active & (s.since >= s.patience) & (s.plain == 0)
            flags = flags | stalled
        # One host synchronisation for all the tests in the common case that none fires.
        any_bad = any_grew = any_stalled = False
        if bool(flags.any()):
            any_bad, any_grew = bool(bad.any()), bool(grew.any())
            any_stalled = stalls and bool(stalled.any())
        if any_stalled:
            # A mixed step that has found no smaller residual for ``stall`` iterations is
            # wandering (on a strongly non-normal map Anderson(5) sat near 1e-2 for 4,000
            # iterations where plain iteration converged in 911); plain steps from there are
            # the user's own map, and the differences they record give the next mixing a
            # memory of a convergent iteration.
            s.plain = torch.where(stalled, o.plain, s.plain)
            s.since = torch.where(stalled, 0, s.since)
            s.stalls = s.stalls + stalled.to(s.stalls.dtype)
        if stalls and (any_stalled or s.plain_any):
            s.plain_any = bool((s.plain > 0).any())
        for _ in range(s.r.shape[1]):
            if not any_bad:
                break
            self._drop_oldest(s, bad)
            s.drops = s.drops + bad.to(s.drops.dtype)
            bad = active & (s.count > 1) & ~(self._condition(s) <= limit)
            any_bad = bool(bad.any())
        if any_grew:
            self._clear(s, grew)
            s.restarts = s.restarts + grew.to(s.restarts.dtype)
            s.best = torch.where(grew, res, torch.minimum(s.best, res))
        else:
            s.best = torch.minimum(s.best, res)
        if s.shared is None:
            # Samples that dropped or cleared alike are in step again: back to the fast path.
            count, head = int(s.count[0]), int(s.head[0])
            if bool(((s.count == count) & (s.head == head)).all()):
                s.shared = (count, head)

    def finish(self, state: AndersonState, result: SolveResult) -> None:  # type: ignore[override]
        """Report safeguard restarts, conditioning drops and stalls per sample."""
        if not self.options.restart:
            return
        restarts = [int(r) for r in state.restarts.cpu().tolist()]
        drops = [int(d) for d in state.drops.cpu().tolist()]
        stalls = [int(n) for n in state.stalls.cpu().tolist()]
        result.extra["anderson"] = {"restarts": restarts, "drops": drops, "stalls": stalls}
        if any(stalls):
            result.notes.append(
                f"anderson: {sum(n > 0 for n in stalls)} sample(s) found no smaller residual for "
                f"{self.options.stall} iterations and took plain steps ({sum(stalls)} time(s); "
                f"samples {_which(stalls)})"
            )
        if any(restarts):
            result.notes.append(
                f"anderson: the safeguard restarted the memory {sum(restarts)} time(s) "
                f"(samples {_which(restarts)}): the residual grew"
            )


def _which(counts: list[int]) -> str:
    """The samples with a nonzero count, the first eight of them, for a note."""
    hit = [b for b, n in enumerate(counts) if n]
    return ", ".join(map(str, hit[:8])) + (", …" if len(hit) > 8 else "")
