"""LU factors of a batch of dense matrices, factored one matrix at a time from moderate sizes on.

torch's batched LU on the CPU (``torch.linalg.lu_factor_ex``, and ``solve``/``solve_ex`` through
it) can return pivots outside 1…n once the process has called ``torch.set_num_threads(k)`` with
k > 1 — a user's script, or a test that restores its thread count. The solve that follows then
raises ("Pivots given to lu_solve must all be …"). Measured with torch 2.13.0 and 2 threads on an
AMD EPYC machine: 21 of 60 batches of random 128…512-wide matrices; never for one matrix at a
time, and never with the thread count left as torch set it. One matrix at a time costs nothing
that shows beside an LU of that size (a Python loop over at most a few hundred matrices of at least
LOOP_FROM rows), so from LOOP_FROM rows on the batch is factored that way; the solves stay batched.
"""

from __future__ import annotations

import torch

# Rows from which a CPU batch is factored one matrix at a time (the failures began at 256).
LOOP_FROM = 128


def lu_factor_ex(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.lu_factor_ex`` of a (B, n, n) batch: (LU, pivots, info), safely batched."""
    if a.device.type != "cpu" or a.shape[-1] < LOOP_FROM or a.shape[0] <= 1:
        return torch.linalg.lu_factor_ex(a)
    parts = [torch.linalg.lu_factor_ex(matrix) for matrix in a]
    return tuple(torch.stack([part[i] for part in parts]) for i in range(3))  # type: ignore[return-value]


def solve_ex(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.solve_ex(a, b)`` for a (B, n, n) batch and (B, n) or (B, n, k) right-hand
    sides: (solution, info), info ≠ 0 where a matrix is singular (its solution is then inf/NaN)."""
    lu, pivots, info = lu_factor_ex(a)
    vector = b.dim() == a.dim() - 1
    x = torch.linalg.lu_solve(lu, pivots, b.unsqueeze(-1) if vector else b)
    return (x.squeeze(-1) if vector else x), info
