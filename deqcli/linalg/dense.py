"""LU factors of a batch of dense matrices, factored one matrix at a time from moderate sizes on.

torch's batched LU on the CPU (``torch.linalg.lu_factor_ex``, and ``solve``/``solve_ex`` through
it) can return pivots outside 1…n once the process has called ``torch.set_num_threads(k)`` with
k > 1 — a user's script, or a test that restores its thread count. The solve that follows then
raises ("Pivots given to lu_solve must all be …"). Measured with torch 2.13.0 and 2 threads on an
AMD EPYC machine: 21 of 60 batches of random 128…512-wide matrices; never for one matrix at a
time, and never with the thread count left as torch set it. One matrix at a time costs nothing
that shows beside an LU of that size (a Python loop over at most a few hundred matrices of at least
LOOP_FROM rows), so from LOOP_FROM rows on the batch is factored that way; the solves stay batched.

Each factor is written straight into its slot of one batch laid out as torch lays out LU factors
(column-major matrices). Stacking the factors instead costs a copy of the batch, and a row-major
batch costs ``lu_solve`` another: at n = 512, B = 32 (64 MB) the two took 34 + 53 ms of a Newton
step whose LU takes 110 ms.

Looping over the matrices also lets ``run.timeout`` and Ctrl-C in between (``checkpoint``): the
SVDs of Levenberg–Marquardt, slow at these sizes, are taken the same way.
"""

from __future__ import annotations

import torch

from deqcli.deadline import checkpoint

# Rows from which a CPU batch is factored one matrix at a time (the failures began at 256).
LOOP_FROM = 128


def lu_factor_ex(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.lu_factor_ex`` of a (B, n, n) batch: (LU, pivots, info), safely batched."""
    if a.device.type != "cpu" or a.shape[-1] < LOOP_FROM or a.shape[0] <= 1:
        return torch.linalg.lu_factor_ex(a)
    batch, n = a.shape[0], a.shape[-1]
    lu = torch.empty(batch, n, n, dtype=a.dtype).transpose(-2, -1)  # column-major matrices
    pivots = torch.empty(batch, n, dtype=torch.int32)
    info = torch.empty(batch, dtype=torch.int32)
    for b, matrix in enumerate(a):
        checkpoint()  # run.timeout and Ctrl-C between factors, not only between steps
        torch.linalg.lu_factor_ex(matrix, out=(lu[b], pivots[b], info[b]))
    return lu, pivots, info


def svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD (U, σ, Vᴴ) of a (B, n, n) batch, from LOOP_FROM rows on one matrix at a time
    with the deadline checked between them.

    An SVD is slow beside an LU (0.5 s against 0.02 s at n = 1100 on one core): a batch of 16
    taken in one call held ``run.timeout`` off for 17 s past a 20 s limit. Checked between
    matrices, a timeout or Ctrl-C waits for one SVD at most.
    """
    if a.shape[-1] < LOOP_FROM or a.shape[0] <= 1:
        checkpoint()
        return torch.linalg.svd(a, full_matrices=False)
    batch, n = a.shape[0], a.shape[-1]
    u = torch.empty(batch, n, n, dtype=a.dtype, device=a.device)
    sigma = torch.empty(batch, n, dtype=a.real.dtype, device=a.device)
    vh = torch.empty(batch, n, n, dtype=a.dtype, device=a.device)
    for b, matrix in enumerate(a):
        checkpoint()
        torch.linalg.svd(matrix, full_matrices=False, out=(u[b], sigma[b], vh[b]))
    return u, sigma, vh


def matvec(a: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a @ x per row for a (B, r, c) batch and (B, c) vectors: (B, r).

    Computed as the row-vector product xᵀaᵀ. torch's CPU ``bmm`` with a (B, c, 1) right operand
    does not reach the BLAS matrix–vector kernel: at B = 16, n = 1024 with 20 rows (a Krylov basis)
    it took 220 µs where the row form takes 50, at B = 32, n = 512 (a batch of Jacobians) 7.1 ms
    where the row form takes 3.0, and far worse when ``a`` is a transposed view. On CUDA both
    forms are one cuBLAS call.
    """
    return torch.bmm(x.unsqueeze(1), a.transpose(1, 2)).squeeze(1)


def finite_matrices(a: torch.Tensor) -> torch.Tensor:
    """(B,) mask: which matrices of a (B, n, n) batch hold only finite numbers.

    A sum is finite exactly when every term is, unless the sum overflows; so one reduction settles
    the common case and the element-wise test runs only for the matrices whose sum is not finite.
    On a 64 MB batch the sum reads it once (2 ms), where ``isfinite(a).all()`` writes and reads a
    mask as large as a quarter of it (55 ms on the same machine).
    """
    finite = torch.isfinite(a.sum(dim=(-2, -1)))
    if not bool(finite.all()):
        doubtful = (~finite).nonzero().flatten()
        finite[doubtful] = torch.isfinite(a[doubtful]).flatten(1).all(dim=1)
    return finite


def solve_ex(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.linalg.solve_ex(a, b)`` for a (B, n, n) batch and (B, n) or (B, n, k) right-hand
    sides: (solution, info), info ≠ 0 where a matrix is singular (its solution is then inf/NaN)."""
    lu, pivots, info = lu_factor_ex(a)
    vector = b.dim() == a.dim() - 1
    x = torch.linalg.lu_solve(lu, pivots, b.unsqueeze(-1) if vector else b)
    return (x.squeeze(-1) if vector else x), info
