"""Anderson acceleration in the Walker–Ni form, batched, with the least-squares problem kept as a QR.

Walker & Ni (2011): with ΔZ and ΔG the last min(m, k) differences of iterates and residuals
g = z − f(z),

    γ = argmin ‖g_k − ΔG γ‖,    z_{k+1} = z_k − ΔZ γ − β (g_k − ΔG γ).

The least-squares problem is solved from ΔG = Qᵀ R (Q's rows orthonormal, R upper triangular),
kept up to date as the window slides: a new column is appended by Gram–Schmidt against Q
(repeated once when the first pass cancels: "twice is enough"), the oldest is removed by the
orthogonal transformation that restores R's triangle (QR downdating). γ solves R γ = Q g. No
normal equations are formed: their condition number is the square of ΔG's, which loses all
accuracy in float32 long before ΔG itself is ill-conditioned.

Q is never rotated itself. It is kept as Q = Ω P: m stored rows P of length n and a small m × m
orthogonal Ω per sample. A downdate multiplies Ω alone (O(m³), nothing of length n is touched);
the row of Q it discards stays behind in P as a dead direction d = Ω[k] P, spread over all the
stored rows (so no single stored row can simply be overwritten). The next Gram–Schmidt vector u
takes its place with one rank-one update, P ← P + v (u − d)ᵀ with v = Ω[k]ᵀ: since Ω v = e_k,
row k of Ω P becomes u and every other row of Ω P is unchanged. A step thus reads the stored
rows twice (the Gram–Schmidt products; d comes with the second pass) and updates them once,
O(m·n) per sample, where rotating Q itself costs O(m²·n) per slide. Ω is re-orthogonalised
every few rotations (``_rotate``), so its rounding does not accumulate.
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
    q: torch.Tensor  # (B, m, n): stored rows P; the orthonormal rows spanning ΔG are Q = Ω P
    omega: torch.Tensor  # (B, m, m): Ω, orthogonal; row i of Ω holds logical row i of Q in P
    r: torch.Tensor  # (B, m, m): ΔG = Q[:count]ᵀ R, upper triangular, logical order
    qg: torch.Tensor  # (B, m): Q g for the current residual
    count: torch.Tensor  # (B,): columns in use
    head: torch.Tensor  # (B,): ring slot of the oldest column
    best: torch.Tensor  # (B,): smallest ‖g‖ since the sample's last restart
    mark: torch.Tensor  # (B,): ``best`` at the last stagnation check (inf after a restart)
    restarts: torch.Tensor  # (B,): memory cleared (residual growth)
    drops: torch.Tensor  # (B,): oldest columns dropped for conditioning
    recent: torch.Tensor  # (B, window): ½‖g‖² of the last iterations (line search reference)
    # While every sample holds the same number of columns from the same ring slot (no sample has
    # dropped or cleared its own), these are that count and slot, and how many stored rows (and
    # ΔF slots) are in use: beyond them Ω is the identity and P and ΔF are not yet written, so they
    # are neither read nor rewritten. The hot path then needs no per-row indexing or host
    # synchronisation. None once the samples differ (``_part``).
    shared: tuple[int, int, int] | None = (0, 0, 0)
    steps: int = 0  # steps taken (the stagnation check runs every ``patience`` of them)


# A Gram–Schmidt pass that leaves less than this fraction of the new difference gets a second.
REORTHOGONALISE = 2**-0.5


# Beyond this depth the shared path polishes Ω once every this many slides (see ``_rotate``).
POLISH_EVERY = 8


def _rotate(rot_t: torch.Tensor, omega: torch.Tensor, polish: bool = True) -> torch.Tensor:
    """rotᵀ Ω, brought back to orthogonality when ``polish``.

    Ω is a product of every rotation since the last reset; left alone, the rounding of each
    product would accumulate without bound (and with it the error of the rank-one updates, which
    rely on Ω v = e_k for v = Ω[k]ᵀ). One Newton–Schulz step towards the nearest orthogonal
    matrix, X ← X (3I − XᵀX)/2, removes the rounding gathered since the last one. It costs two
    more m × m products, as much as the rotation again: negligible for a small depth, where it
    follows every rotation, but not for m in the hundreds, where the shared path polishes once
    every ``POLISH_EVERY`` slides (a few rotations' rounding is harmless).
    """
    x = torch.bmm(rot_t, omega)
    if not polish:
        return x
    return torch.baddbmm(x, torch.bmm(x, x.transpose(1, 2)), x, beta=1.5, alpha=-0.5)


def condition_limit(cond_max: float, dtype: torch.dtype) -> float:
    """The largest cond(R) trusted in ``dtype``: cond_max, but never beyond 0.01/ε.

    Solving with R loses about log10(cond(R)) digits: in float32 (ε ≈ 1.2e-7) a limit of 1e9
    would let γ be pure noise, so the safeguard tightens itself to 8.4e4 there.
    """
    return min(cond_max, 0.01 / torch.finfo(dtype).eps)


class AndersonMethod(Method):
    """Anderson acceleration (Walker & Ni 2011) with depth ``m`` and mixing ``beta``.

    The first step is z₁ = z₀ − β g(z₀) (with β = 1: z₁ = f(z₀)). For a linear map and m ≥ n this
    is GMRES: the exact solution after at most n + 1 steps. The depth is min(m, n): more than n
    differences in Rⁿ are always dependent.

    Safeguards (``restart``): while cond(R), estimated by max|R_ii|/min|R_ii|, exceeds ``cond_max``
    (capped at 0.01/ε for the dtype) a sample drops its oldest column (Walker–Ni's conditioning control); when its residual exceeds
    ``growth`` times its best since the last restart, or its best has not improved over a check
    interval of ``patience`` steps (by default 2·m), its memory is cleared. ``lam`` > 0 adds a
    Tikhonov term relative to each column's norm, solved as the stacked least-squares problem
    [R; √λ·diag‖ΔG_i‖] γ ≈ [Qg; 0] (still no normal equations). ``globalisation: line-search``
    treats the Anderson step as a direction and backtracks along it (non-monotone over ``window``
    iterations) when the residual would grow.

    Cost per iteration: one evaluation of f, O(m·n) work per sample for the new column (two
    passes over the stored rows for the Gram–Schmidt products and, once the window has slid, a
    rank-one update of them), O(m³) when the window slides (a QR of the small factor, applied
    to Ω) and O(m²) for γ; memory 2·m·B·n numbers.
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
            # Left unwritten: the shared path reads only what it wrote (``_part`` zeroes the rest
            # before the per-row path reads every slot), and zeroing 2·m·B·n numbers costs about
            # as much as a step.
            df=torch.empty(batch, m, n, **opts),
            q=torch.empty(batch, m, n, **opts),
            omega=torch.eye(m, **opts).expand(batch, m, m).clone(),
            r=torch.zeros(batch, m, m, **opts),
            qg=torch.zeros(batch, m, **opts),
            count=torch.zeros(batch, **ints),
            head=torch.zeros(batch, **ints),
            best=torch.linalg.vector_norm(g0, dim=1),
            mark=torch.full((batch,), torch.inf, **opts),
            restarts=torch.zeros(batch, **ints),
            drops=torch.zeros(batch, **ints),
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
            z_new = search.z
            g_new = search.g
            f_new = z_new - g_new
        else:
            f_new, g_new = evaluate(problem, z_new)
            f_trial, g_trial = f_new, g_new
        res = self._record(s, f_trial, g_trial, g_new)
        if o.restart:
            self._safeguard(s, res, active)
        if o.globalisation == "line-search":
            if o.window > 1:
                s.recent = torch.roll(s.recent, 1, dims=1)
            s.recent[:, 0] = 0.5 * res.square()
        s.f_norm = torch.linalg.vector_norm(f_new, dim=1)
        s.z, s.g, s.f = z_new, g_new, f_new
        s.res = res
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
            # Every slot in use: γ in slot order, one pass over ΔF.
            gamma_slots = torch.roll(gamma, s.shared[1], dims=1) if s.shared[1] else gamma
            z_new = torch.baddbmm(z_new, gamma_slots.unsqueeze(1), s.df, alpha=-1)
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
            # z − βg − ΔZγ + βΔGγ = (f − ΔFγ) + (1 − β)(g − ΔGγ), and ΔGγ = Qᵀ(Rγ) = Pᵀ Ωᵀ(Rγ).
            used = s.shared[2] if s.shared is not None else m
            r_gamma = torch.bmm(s.r[:, :k, :k], gamma.unsqueeze(2)).transpose(1, 2)
            in_rows = torch.bmm(r_gamma, s.omega[:, :k, :used])
            dg_gamma = torch.bmm(in_rows, s.q[:, :used]).squeeze(1)
            z_new = z_new + (1 - o.beta) * (s.g - dg_gamma)
        return z_new

    def _gamma(self, s: AndersonState, k: int) -> torch.Tensor:
        """Solve the small triangular (or stacked Tikhonov) system per row, masked to its count."""
        full = k == s.r.shape[1]
        r = s.r if full else s.r[:, :k, :k]
        rhs = s.qg if full else s.qg[:, :k]
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
        return gamma if beyond is None else torch.where(beyond, 0.0, gamma)

    # -- the QR of ΔG ----------------------------------------------------------------------------
    def _record(
        self, s: AndersonState, f_trial: torch.Tensor, g_trial: torch.Tensor, g_new: torch.Tensor
    ) -> torch.Tensor:
        """Slide the window where it is full, append Δf and Δg, project g_new; return ‖g_new‖."""
        m = s.df.shape[1]
        # Rows Δg and g_new side by side: the Gram–Schmidt products take both in one pass over Q.
        pair = torch.stack((g_trial - s.g, g_new), dim=1)
        # ‖Δg‖², Δg·g_new and ‖g_new‖² in one pass over the two rows.
        gram = torch.bmm(pair, pair.transpose(1, 2))
        norms = torch.diagonal(gram, dim1=1, dim2=2).sqrt()
        if s.shared is not None:
            k = s.shared[0]
            if k >= m:
                self._slide(s)
            self._append_shared(s, f_trial, pair, norms[:, 0], gram[:, 0, 1])
            if k < m:  # (a full window stays full: one column out, one in)
                s.count = torch.full_like(s.count, k + 1)
        else:
            full = s.count >= m
            if bool(full.any()):
                self._drop_oldest(s, full)
            self._append_rows(s, f_trial, pair, norms[:, 0])
            s.count = s.count + 1
        return norms[:, 1]

    def _append_shared(
        self,
        s: AndersonState,
        f_trial: torch.Tensor,
        pair: torch.Tensor,
        dg_norm: torch.Tensor,
        dg_dot_g: torch.Tensor,
    ) -> None:
        """Append column k (the same k for every row): Gram–Schmidt against Q[:k] = Ω[:k] P."""
        assert s.shared is not None
        k, head, used = s.shared
        m = s.df.shape[1]
        dg, g_new = pair.unbind(1)
        torch.sub(f_trial, s.f, out=s.df[:, (head + k) % m])
        # Logical row k of Q is either stored row k, not yet written (Ω is the identity there:
        # u is written into it), or a direction a downdate discarded, spread over the stored rows
        # by Ω: u then replaces it by a rank-one update of P.
        fresh = k == used
        once = True  # one Gram–Schmidt pass sufficed
        if used:
            basis = s.q if used == m else s.q[:, :used]  # (B, used, n)
            # Fresh, no rotation has happened yet: Ω is the identity on the rows in use and
            # Q[:k] = P[:k]. Otherwise Ω[:k] gives Q's rows in stored-row coordinates.
            live = None if fresh else s.omega[:, :k, :used]
            # Rows (Δg, g_new) against the stored rows: (B, 2, n)·(B, n, used), the fast layout
            # for bmm; Ω takes the products to Q's rows.
            h = self._project(pair, basis, live)
            coeff, qg_old = h.unbind(1)  # Q Δg and Q g_new, (B, k) each
            back = h[:, :1] if live is None else torch.bmm(h[:, :1], live)  # Qᵀ(Q Δg), in P's
            if fresh:
                w = torch.baddbmm(dg.unsqueeze(1), back, basis, alpha=-1).squeeze(1)
            else:
                # In the same pass over P as Qᵀ(Q Δg): the content d = Ω[k] P of the row that u
                # replaces.
                v = s.omega[:, k : k + 1, :used]
                both = torch.bmm(torch.cat((back, v), dim=1), basis)
                w = dg - both[:, 0]
            rho = torch.linalg.vector_norm(w, dim=1)
            # Kahan–Parlett: one Gram–Schmidt pass is enough unless it cancelled more than a
            # factor √2 of ‖Δg‖; then a second pass restores orthogonality to working precision.
            once = not k or bool((rho >= REORTHOGONALISE * dg_norm).all())
            if not once:
                h2 = self._project(w.unsqueeze(1), basis, live)
                back2 = h2 if live is None else torch.bmm(h2, live)
                w2 = torch.baddbmm(w.unsqueeze(1), back2, basis, alpha=-1)
                w = w.copy_(w2.squeeze(1))
                coeff = coeff + h2[:, 0]
                rho = torch.linalg.vector_norm(w, dim=1)
        else:
            w, rho = dg, dg_norm
            coeff = qg_old = dg.new_zeros(dg.shape[0], 0)
        inv = rho.clamp_min(torch.finfo(w.dtype).tiny).reciprocal()
        if once:
            # u·g_new = (Δg·g_new − (QΔg)·(Qg_new))/ρ: with ρ ≥ ‖Δg‖/√2 nothing cancels.
            projection = (dg_dot_g - torch.linalg.vecdot(coeff, qg_old)) * inv
        else:
            projection = torch.linalg.vecdot(w, g_new) * inv  # u·g_new, u = w/ρ
        if fresh:
            torch.mul(w, inv[:, None], out=s.q[:, k])
            used += 1
        else:
            # P += vᵀ (u − d): Ω vᵀ = e_k, so only row k of Ω P changes (to u). Elementwise
            # (broadcast) rather than a batched product: one pass over P either way, and the
            # elementwise kernels stream it faster than a product with an inner dimension of 1.
            minus = torch.addcmul(both[:, 1], w, inv[:, None], value=-1.0)  # d − u
            basis.addcmul_(v.transpose(1, 2), minus.unsqueeze(1), value=-1.0)
        s.r[:, : k + 1, k] = torch.cat((coeff, rho.unsqueeze(1)), dim=1)
        if k + 1 == m:
            s.qg = torch.cat((qg_old, projection.unsqueeze(1)), dim=1)
        else:
            s.qg[:, : k + 1] = torch.cat((qg_old, projection.unsqueeze(1)), dim=1)
        s.shared = (k + 1, head, used)

    @staticmethod
    def _project(
        rows: torch.Tensor, basis: torch.Tensor, live: torch.Tensor | None
    ) -> torch.Tensor:
        """Q[:k] applied to each of ``rows``: (B, r, n) → (B, r, k), via P and Ω[:k] (None: P)."""
        h = torch.bmm(rows, basis.transpose(1, 2))
        return h if live is None else torch.bmm(h, live.transpose(1, 2))

    def _append_rows(
        self, s: AndersonState, f_trial: torch.Tensor, pair: torch.Tensor, dg_norm: torch.Tensor
    ) -> None:
        """Append each row's column at its own count (rows differ): the same steps with masks.

        Every stored row is read: beyond a row's own use P is zero and Ω the identity, so the
        rank-one update there writes u into the stored row itself, exactly.
        """
        batch, m = s.count.shape[0], s.df.shape[1]
        dg, g_new = pair[:, 0], pair[:, 1]
        index = torch.arange(batch, device=s.count.device)
        s.df[index, (s.head + s.count) % m] = f_trial - s.f
        live = torch.arange(m, device=s.count.device)[None, :] < s.count[:, None]  # (B, m)
        omega = s.omega
        h = torch.bmm(torch.bmm(pair, s.q.transpose(1, 2)), omega.transpose(1, 2))  # (B, 2, m)
        h = torch.where(live[:, None, :], h, 0.0)
        coeff, qg_old = h[:, 0], h[:, 1]
        v = omega[index, s.count]  # (B, m): logical row count of Q in stored-row coordinates
        rows = torch.stack((torch.bmm(h[:, :1], omega).squeeze(1), v), dim=1)
        both = torch.bmm(rows, s.q)
        w = dg - both[:, 0]
        rho = torch.linalg.vector_norm(w, dim=1)
        if not bool((rho >= REORTHOGONALISE * dg_norm).all()):
            h2 = torch.bmm(torch.bmm(w.unsqueeze(1), s.q.transpose(1, 2)), omega.transpose(1, 2))
            h2 = torch.where(live[:, None, :], h2, 0.0)
            w = w - torch.bmm(torch.bmm(h2, omega), s.q).squeeze(1)
            coeff = coeff + h2[:, 0]
            rho = torch.linalg.vector_norm(w, dim=1)
        unit = w / rho.clamp_min(torch.finfo(w.dtype).tiny)[:, None]
        projection = (unit * g_new).sum(dim=1)
        s.q = torch.baddbmm(s.q, v.unsqueeze(2), (unit - both[:, 1]).unsqueeze(1))
        col = torch.where(live, coeff, 0.0)
        col[index, s.count] = rho
        s.r[index, :, s.count] = col
        qg = torch.where(live, qg_old, 0.0)
        qg[index, s.count] = projection
        s.qg = qg

    def _slide(self, s: AndersonState) -> None:
        """Every row holds m columns (the shared path): remove the oldest, for the append next.

        Without column 0, R's other columns form an upper Hessenberg matrix H; the orthogonal G
        with G H upper triangular (what a sweep of Givens rotations builds; here one small QR of
        H per sample) turns Q into G Q, so ΔG = QᵀR still holds: only Ω ← G Ω changes, and
        nothing of length n. The last row of G Q then spans nothing that is kept: it is dead,
        and the column appended next takes its place. That append also writes R's last column
        and all of Q g anew (for the new residual), so neither is rotated or cleared here.
        """
        assert s.shared is not None
        m = s.r.shape[1]
        count, head, used = s.shared
        rot, tri = torch.linalg.qr(s.r[:, :, 1:], mode="complete")  # H = rot · tri
        polish = m <= POLISH_EVERY or (head + 1) % POLISH_EVERY == 0
        s.omega = _rotate(rot.transpose(1, 2), s.omega, polish=polish)
        s.r[:, :, : m - 1] = tri  # its last row is 0: the discarded direction holds nothing
        s.head = torch.full_like(s.head, (head + 1) % m)
        s.shared = (count - 1, (head + 1) % m, used)

    def _drop_oldest(self, s: AndersonState, rows: torch.Tensor) -> None:
        """Remove logical column 0 of the rows in ``rows`` and restore R (see ``_slide``).

        The rows may hold different counts (a conditioning drop, a row at its own count): R, Ω
        and Q g are rotated, and the discarded direction's row of R and entry of Q g cleared.
        """
        self._part(s)
        m = s.r.shape[1]
        k = s.count
        rot, tri = torch.linalg.qr(s.r[:, :, 1:], mode="complete")  # H = rot · tri
        rot_t = rot.transpose(1, 2)
        omega = _rotate(rot_t, s.omega)
        qg = torch.bmm(rot_t, s.qg.unsqueeze(2)).squeeze(2)
        new_r = torch.zeros_like(s.r)
        new_r[:, :, : m - 1] = tri
        last = torch.arange(m, device=k.device)[None, :] == (k - 1)[:, None]
        qg = torch.where(last, 0.0, qg)
        new_r = torch.where(last[:, :, None] | last[:, None, :], 0.0, new_r)
        s.omega = torch.where(rows[:, None, None], omega, s.omega)
        s.qg = torch.where(rows[:, None], qg, s.qg)
        s.r = torch.where(rows[:, None, None], new_r, s.r)
        s.head = torch.where(rows, (s.head + 1) % m, s.head)
        s.count = torch.where(rows, k - 1, k)

    def _part(self, s: AndersonState) -> None:
        """The samples part ways: leave the shared path, zeroing the stored rows and ΔF slots it
        never wrote (the per-row path reads all of them, with zero weights)."""
        if s.shared is None:
            return
        used = s.shared[2]
        if used < s.q.shape[1]:
            s.q[:, used:] = 0.0
            s.df[:, used:] = 0.0
        s.shared = None

    def _clear(self, s: AndersonState, rows: torch.Tensor) -> None:
        """Forget the stored differences of the rows in ``rows`` (their next step is z − βg)."""
        self._part(s)
        keep3 = ~rows[:, None, None]
        eye = torch.eye(s.omega.shape[1], dtype=s.omega.dtype, device=s.omega.device)
        s.q = torch.where(keep3, s.q, 0.0)
        s.omega = torch.where(keep3, s.omega, eye)
        s.r = torch.where(keep3, s.r, 0.0)
        s.df = torch.where(keep3, s.df, 0.0)
        s.qg = torch.where(rows[:, None], 0.0, s.qg)
        s.count = torch.where(rows, torch.zeros_like(s.count), s.count)
        s.head = torch.where(rows, torch.zeros_like(s.head), s.head)

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
            small, big = torch.aminmax(diag, dim=1)
            return big / small  # inf (or NaN) for a zero pivot
        used = torch.arange(k, device=s.count.device)[None, :] < s.count[:, None]
        big = torch.where(used, diag, 0.0).amax(dim=1)
        small = torch.where(used, diag, torch.inf).amin(dim=1)
        cond = big / small
        return torch.where(torch.isnan(cond), torch.full_like(cond, torch.inf), cond)

    def _safeguard(self, s: AndersonState, res: torch.Tensor, active: torch.Tensor) -> None:
        """Drop oldest columns while ill-conditioned; clear the memory after residual growth."""
        limit = condition_limit(self.options.cond_max, s.r.dtype)
        # Residual growth, or a residual that is not finite: ~(res ≤ ceiling) holds for NaN and
        # +inf alike (the ceiling is kept finite for that).
        ceiling = (self.options.growth * s.best).clamp_(max=torch.finfo(res.dtype).max)
        grew = ~(res <= ceiling)
        bad = self._ill_conditioned(s, limit)
        # One host synchronisation for both tests in the common case that neither fires.
        trouble = grew if bad is None else grew | bad
        if bool((trouble & active).any()):
            self._repair(s, res, active, grew & active, bad, limit)
        else:
            s.best = torch.minimum(s.best, res)
        s.steps += 1
        if s.steps % self.patience(s) == 0:
            self._stagnation(s, res, active)
        if s.shared is None:
            # Samples that dropped or cleared alike are in step again: back to the fast path.
            # Which stored rows the samples use is not tracked per row: all of them, from now on.
            count, head = int(s.count[0]), int(s.head[0])
            if bool(((s.count == count) & (s.head == head)).all()):
                s.shared = (count, head, s.q.shape[1])

    def _repair(
        self,
        s: AndersonState,
        res: torch.Tensor,
        active: torch.Tensor,
        grew: torch.Tensor,
        bad: torch.Tensor | None,
        limit: float,
    ) -> None:
        """Drop oldest columns of the ``bad`` rows while ill-conditioned, clear the ``grew`` rows."""
        any_grew = bool(grew.any())
        for _ in range(s.r.shape[1]):
            if bad is None:
                break
            bad = bad & active
            if not bool(bad.any()):
                break
            self._drop_oldest(s, bad)
            s.drops = s.drops + bad.to(s.drops.dtype)
            bad = self._ill_conditioned(s, limit)
        if any_grew:
            self._restart(s, res, grew)
        else:
            s.best = torch.minimum(s.best, res)

    def patience(self, s: AndersonState) -> int:
        """Steps between stagnation checks: the ``patience`` option, by default twice the depth."""
        return self.options.patience or 2 * s.r.shape[1]

    def _stagnation(self, s: AndersonState, res: torch.Tensor, active: torch.Tensor) -> None:
        """Clear the memory of running samples whose best residual has not improved since the
        last check, ``patience`` steps ago.

        Anderson's memory can keep proposing steps that neither converge nor grow: the residual
        wanders within a modest factor of its best for ever, while plain iteration (which the
        cleared memory falls back to, then builds on) would converge. Neither the growth test
        nor the conditioning test sees that; a best that stood for a whole check interval does.
        """
        stale = active & ~(s.best < s.mark)
        s.mark = s.best
        if bool(stale.any()):
            self._restart(s, res, stale)

    def _restart(self, s: AndersonState, res: torch.Tensor, rows: torch.Tensor) -> None:
        """Clear the memory of ``rows``, count it, and start their best (and check) afresh."""
        self._clear(s, rows)
        s.restarts = s.restarts + rows.to(s.restarts.dtype)
        s.best = torch.where(rows, res, torch.minimum(s.best, res))
        # The next stagnation check measures progress from here, not from the old best.
        s.mark = torch.where(rows, torch.inf, s.mark)

    def _ill_conditioned(self, s: AndersonState, limit: float) -> torch.Tensor | None:
        """(B,) mask of rows with at least two columns and cond(R) beyond ``limit`` (None: none can)."""
        if s.shared is not None:
            return None if s.shared[0] < 2 else ~(self._condition(s) <= limit)
        return (s.count > 1) & ~(self._condition(s) <= limit)

    def finish(self, state: AndersonState, result: SolveResult) -> None:  # type: ignore[override]
        """Report safeguard restarts and conditioning drops per sample."""
        if not self.options.restart:
            return
        restarts = [int(r) for r in state.restarts.cpu().tolist()]
        drops = [int(d) for d in state.drops.cpu().tolist()]
        result.extra["anderson"] = {"restarts": restarts, "drops": drops}
        if any(restarts):
            hit = [b for b, r in enumerate(restarts) if r]
            shown = ", ".join(map(str, hit[:8])) + (", …" if len(hit) > 8 else "")
            result.notes.append(
                f"anderson: the safeguard restarted the memory {sum(restarts)} time(s) "
                f"(samples {shown}): the residual grew, or stopped improving"
            )
