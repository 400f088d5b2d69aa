"""Per-sample backtracking on the residual norm, shared by the Newton-type and quasi-Newton solvers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem


def backtrack(
    problem: Problem,
    z: torch.Tensor,
    g: torch.Tensor,
    direction: torch.Tensor,
    *,
    c: float | torch.Tensor = 1e-4,
    max_backtracks: int = 20,
    keep: Literal["last", "best"] = "last",
    reference: torch.Tensor | None = None,
    active: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Step from ``z`` along ``direction`` with a per-sample step length α = 1, ½, ¼, ….

    A sample accepts the first α with ‖g(z + α d)‖ ≤ (1 − c α)·r, where r = ‖g(z)‖ or, for a
    non-monotone search, the per-sample ``reference`` (e.g. the largest of the last few residual
    norms); ``c`` may be a per-sample tensor (e.g. scaled by an inexact-Newton forcing term). A sample that passes no test within
    ``max_backtracks`` halvings takes the smallest trial (``keep='last'``) or the trial with the
    smallest residual (``keep='best'``), so the iteration keeps moving and the driver's history
    shows the stall. Only the samples in ``active`` (default: all) need to pass: the driver has
    stopped the others, and waiting on them would waste evaluations. Every trial is one batched
    evaluation of g (all rows, counted as such).

    Returns (z_new, g_new, alpha) with alpha of shape (batch,).
    """
    import torch

    norm0 = torch.linalg.vector_norm(g, dim=1) if reference is None else reference
    alpha = torch.ones_like(norm0)
    z_acc = z + direction
    g_acc = problem.g(z_acc)
    norm = torch.linalg.vector_norm(g_acc, dim=1)
    best_z, best_g, best_norm, best_alpha = z_acc, g_acc, norm, alpha
    for _ in range(max_backtracks):
        bad = ~(norm <= (1 - c * alpha) * norm0)  # also true for NaN
        if active is not None:
            bad &= active
        if not bool(bad.any()):
            return z_acc, g_acc, alpha
        alpha = torch.where(bad, alpha / 2, alpha)
        z_try = z + alpha[:, None] * direction
        g_try = problem.g(z_try)
        norm_try = torch.linalg.vector_norm(g_try, dim=1)
        z_acc = torch.where(bad[:, None], z_try, z_acc)
        g_acc = torch.where(bad[:, None], g_try, g_acc)
        norm = torch.where(bad, norm_try, norm)
        if keep == "best":
            better = norm_try < best_norm
            best_z = torch.where(better[:, None], z_try, best_z)
            best_g = torch.where(better[:, None], g_try, best_g)
            best_norm = torch.where(better, norm_try, best_norm)
            best_alpha = torch.where(better, alpha, best_alpha)
    if keep == "best":
        bad = ~(norm <= (1 - c * alpha) * norm0)
        z_acc = torch.where(bad[:, None], best_z, z_acc)
        g_acc = torch.where(bad[:, None], best_g, g_acc)
        alpha = torch.where(bad, best_alpha, alpha)
    return z_acc, g_acc, alpha
