"""The linear-operator layer: operators against dense algebra, GMRES against scipy, Krylov spectra
against exact eigenvalues and singular values."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import scipy.sparse.linalg as sla
import torch

from deqcli.linalg import (
    DenseOperator,
    FunctionOperator,
    Linearisation,
    NormalOperator,
    RowScaledJacobian,
    ShiftedOperator,
    arnoldi,
    gmres,
    jacobian_operator,
    ritz_values,
    sigma_max,
    sigma_min,
)
from deqcli.problems.base import Problem
from deqcli.problems.tanh_layer import tanh_layer_map

F64 = torch.float64


def _random(rows: int, n: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(rows, n, n, generator=gen, dtype=F64)


# -- ill-conditioned test systems (condition 1e4 – 1e6) --------------------------------------------


def _convection_diffusion(n: int, eps: float) -> np.ndarray:
    """Upwind 1-D convection–diffusion: non-symmetric, condition ~1e4 for these sizes."""
    h = 1.0 / (n + 1)
    main = (2 * eps / h**2 + 1 / h) * np.ones(n)
    lower = (-eps / h**2 - 1 / h) * np.ones(n - 1)
    upper = (-eps / h**2) * np.ones(n - 1)
    return np.diag(main) + np.diag(lower, -1) + np.diag(upper, 1)


def _laplacian(n: int) -> np.ndarray:
    return 2 * np.eye(n) - np.eye(n, k=1) - np.eye(n, k=-1)


def _graded(n: int, cond: float, seed: int) -> np.ndarray:
    """S D S⁻¹: eigenvalues log-spaced in [1/cond, 1], a mildly non-normal eigenbasis S."""
    rng = np.random.default_rng(seed)
    s = np.eye(n) + 0.1 * rng.standard_normal((n, n)) / math.sqrt(n)
    d = np.logspace(0, -math.log10(cond), n)
    return s @ np.diag(d) @ np.linalg.inv(s)


SYSTEMS = {
    "convection-diffusion": _convection_diffusion(300, 0.1),
    "laplacian": _laplacian(200),
    "graded-1e5": _graded(120, 1e5, 0),
    "graded-1e6": _graded(120, 1e6, 1),
}


@pytest.mark.parametrize("name", list(SYSTEMS))
@pytest.mark.parametrize(("restart", "cycles"), [(20, 5), (30, 10), (60, 20)])
def test_gmres_reaches_what_scipy_reaches_with_the_same_restart_and_budget(
    name: str, restart: int, cycles: int
) -> None:
    a = SYSTEMS[name]
    cond = np.linalg.cond(a)
    assert 1e4 <= cond <= 1e7
    n = a.shape[0]
    b = np.random.default_rng(7).standard_normal(n)
    calls = [0]

    def counted(v: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return a @ v

    op = sla.LinearOperator((n, n), matvec=counted, dtype=float)
    x_ref, _ = sla.gmres(op, b, rtol=1e-12, atol=0.0, restart=restart, maxiter=cycles)
    theirs = np.linalg.norm(b - a @ x_ref) / np.linalg.norm(b)
    # What rounding alone moves scipy's own answer by: its runs with one entry of b moved by one
    # ulp. Where restarted GMRES stagnates (graded-1e6 with restart 60: 1200 products at a
    # residual of 4e-3) that spread is 3e-4 relative, and which BLAS rounds the products decides
    # where in it a run lands; elsewhere it is 1e-13 or less.
    reach = theirs
    for i in range(1, 5):
        nudged = b.copy()
        nudged[i] = np.nextafter(nudged[i], np.inf)
        x_i, _ = sla.gmres(a, nudged, rtol=1e-12, atol=0.0, restart=restart, maxiter=cycles)
        reach = max(reach, np.linalg.norm(nudged - a @ x_i) / np.linalg.norm(nudged))
    res = gmres(
        DenseOperator(torch.tensor(a)[None]),
        torch.tensor(b)[None],
        rtol=1e-12,
        restart=restart,
        max_matvecs=calls[0],
    )
    ours = np.linalg.norm(b - a @ res.x[0].numpy()) / np.linalg.norm(b)
    assert res.matvecs <= calls[0]
    # Both run the same algorithm; rounding may put ours anywhere in scipy's own spread.
    assert ours <= reach * (1 + 1e-6) + 1e-15
    # The reported residual is the true one, up to the rounding in b − A x (ε·‖A‖‖x‖).
    rounding = 64 * np.finfo(float).eps * np.linalg.norm(a, 2) * np.linalg.norm(x_ref)
    assert float(res.residual[0]) == pytest.approx(ours, rel=1e-8, abs=rounding / np.linalg.norm(b))


def test_gmres_converges_on_an_ill_conditioned_system_where_halving_per_cycle_fails() -> None:
    # The 1-D Laplacian (n = 100, condition 4.1e3) with GMRES(20): the second restart cycle
    # reduces the residual by far less than half (a rule that gives up there stops at 0.64),
    # yet continuing reaches 1e-8.
    a = torch.tensor(_laplacian(100))[None]
    b = torch.ones(1, 100, dtype=F64)
    op = DenseOperator(a)
    first = gmres(op, b, rtol=1e-8, restart=20, max_matvecs=21)
    second = gmres(op, b, x0=first.x, rtol=1e-8, restart=20, max_matvecs=21)
    assert float(second.residual[0]) > 0.5 * float(first.residual[0])
    res = gmres(op, b, rtol=1e-8, restart=20, max_matvecs=5000)
    assert bool(res.converged[0]) and not bool(res.stagnated[0])
    true = torch.linalg.vector_norm(b - (a @ res.x[..., None])[..., 0]) / torch.linalg.vector_norm(
        b
    )
    assert float(true) <= 1e-8


def test_gmres_rows_are_independent_and_converge_on_their_own() -> None:
    n = 12
    mats = torch.eye(n, dtype=F64) + 0.4 * _random(5, n, 0) / math.sqrt(n)
    mats[1] = torch.eye(n, dtype=F64)  # converges in one step
    rhs = torch.randn(5, n, generator=torch.Generator().manual_seed(1), dtype=F64)
    rhs[2] = 0.0  # a zero right-hand side has the zero solution
    res = gmres(DenseOperator(mats), rhs, rtol=1e-12, restart=50)
    torch.testing.assert_close(res.x, torch.linalg.solve(mats, rhs), rtol=1e-9, atol=1e-10)
    assert res.iterations.tolist()[1] == 1 and res.iterations.tolist()[2] == 0
    assert bool(res.converged.all())
    for r in range(5):
        alone = gmres(DenseOperator(mats[r : r + 1]), rhs[r : r + 1], rtol=1e-12, restart=50)
        torch.testing.assert_close(alone.x[0], res.x[r], rtol=1e-10, atol=1e-12)
        assert int(alone.iterations[0]) == int(res.iterations[r])


def test_gmres_is_scale_invariant() -> None:
    # The same system scaled by 1e-8 or 1e8 takes the same steps: every test is relative.
    a = torch.eye(30, dtype=F64) + 0.3 * _random(1, 30, 2) / math.sqrt(30)
    b = torch.randn(1, 30, generator=torch.Generator().manual_seed(3), dtype=F64)
    runs = [gmres(DenseOperator(s * a), b, rtol=1e-10, restart=8) for s in (1e-8, 1.0, 1e8)]
    steps = {int(r.iterations[0]) for r in runs}
    assert len(steps) == 1
    for s, r in zip((1e-8, 1.0, 1e8), runs, strict=True):
        torch.testing.assert_close(r.x * s, runs[1].x, rtol=1e-7, atol=0.0)


def test_gmres_breakdown_on_an_invariant_subspace_is_exact() -> None:
    # b lies in a 3-dimensional invariant subspace of A: GMRES finishes in 3 steps, exactly.
    q, _ = torch.linalg.qr(_random(1, 10, 4)[0])
    a = q @ torch.diag(torch.linspace(1, 10, 10, dtype=F64)) @ q.T
    b = (q[:, :3] @ torch.tensor([1.0, -2.0, 0.5], dtype=F64))[None]
    res = gmres(DenseOperator(a[None]), b, rtol=1e-14, restart=10)
    assert int(res.iterations[0]) == 3
    torch.testing.assert_close(res.x[0], torch.linalg.solve(a, b[0]), rtol=1e-12, atol=1e-13)


def test_gmres_right_preconditioner_cuts_the_iterations() -> None:
    # Diagonal scaling of a badly scaled system: Jacobi as a right preconditioner.
    n = 40
    d = torch.logspace(0, 6, n, dtype=F64)
    a = torch.diag(d) + 0.01 * _random(1, n, 5)[0] * d[None, :]
    b = torch.ones(1, n, dtype=F64)
    plain = gmres(DenseOperator(a[None]), b, rtol=1e-10, restart=n, max_matvecs=200)
    pre = gmres(
        DenseOperator(a[None]), b, rtol=1e-10, restart=n, max_matvecs=200, precond=lambda v: v / d
    )
    assert bool(pre.converged[0])
    assert int(pre.iterations[0]) < int(plain.iterations[0])
    torch.testing.assert_close(pre.x[0], torch.linalg.solve(a, b[0]), rtol=1e-8, atol=0.0)


def test_gmres_leaves_inactive_and_non_finite_rows_alone() -> None:
    a = torch.eye(4, dtype=F64).expand(3, 4, 4).clone() * 2
    b = torch.ones(3, 4, dtype=F64)
    b[2, 0] = math.nan
    active = torch.tensor([True, False, True])
    res = gmres(DenseOperator(a), b, rtol=1e-12, active=active)
    torch.testing.assert_close(res.x[0], b[0] / 2)
    assert float(res.x[1].abs().max()) == 0.0  # not iterated
    assert not math.isfinite(float(res.residual[2])) and res.matvecs < 10


def test_gmres_per_row_tolerances() -> None:
    a = torch.eye(20, dtype=F64) + 0.5 * _random(2, 20, 6) / math.sqrt(20)
    b = torch.ones(2, 20, dtype=F64)
    res = gmres(DenseOperator(a), b, rtol=torch.tensor([1e-2, 1e-10], dtype=F64), restart=20)
    assert res.residual.tolist()[0] <= 1e-2 and res.residual.tolist()[1] <= 1e-10
    assert int(res.iterations[0]) < int(res.iterations[1])


def test_gmres_counts_the_products_each_row_needed_alone() -> None:
    # Rows that converge at different steps share every batched product, but each row's
    # ``products`` is what it uses solved alone (its steps and its residual recomputations), with
    # and without the final true residual and across restarts.
    n = 12
    mats = torch.eye(n, dtype=F64) + 0.4 * _random(4, n, 0) / math.sqrt(n)
    mats[1] = torch.eye(n, dtype=F64)  # one step
    rhs = torch.randn(4, n, generator=torch.Generator().manual_seed(1), dtype=F64)
    rhs[2] = 0.0  # no step at all
    for options in (
        {"true_residual": False, "restart": 50},
        {"true_residual": True, "restart": 50},
        {"true_residual": True, "restart": 4},
    ):
        res = gmres(DenseOperator(mats), rhs, rtol=1e-10, **options)
        assert res.products.tolist()[2] == 0 and int(res.products.max()) <= res.matvecs
        for r in range(4):
            alone = gmres(DenseOperator(mats[r : r + 1]), rhs[r : r + 1], rtol=1e-10, **options)
            assert int(res.products[r]) == int(alone.products[0]) == alone.matvecs, (options, r)


# -- operators -------------------------------------------------------------------------------------


def test_operators_match_dense_algebra() -> None:
    mats = _random(2, 5, 8)
    v = torch.randn(2, 5, generator=torch.Generator().manual_seed(9), dtype=F64)
    dense = DenseOperator(mats)
    torch.testing.assert_close(dense.matvec(v), (mats @ v[..., None])[..., 0])
    torch.testing.assert_close(dense.rmatvec(v), (mats.transpose(1, 2) @ v[..., None])[..., 0])
    torch.testing.assert_close(dense.T.dense(), mats.transpose(1, 2))
    shift = torch.tensor([2.0, -1.0], dtype=F64)
    shifted = ShiftedOperator(dense, shift, 3.0)
    expected = shift[:, None, None] * torch.eye(5, dtype=F64) + 3.0 * mats
    torch.testing.assert_close(shifted.dense(), expected)
    torch.testing.assert_close(NormalOperator(dense).dense(), mats.transpose(1, 2) @ mats)
    fn = FunctionOperator(dense.matvec, v, dense.rmatvec)
    torch.testing.assert_close(fn.dense(), mats)
    masked = dense.with_active(torch.tensor([False, True]))
    out = masked.matvec(v)
    assert float(out[0].abs().max()) == 0.0 and torch.equal(out[1], dense.matvec(v)[1])


def test_linearisation_gives_the_analytic_jacobian_of_a_tanh_layer() -> None:
    # f(z) = tanh(W z + x): J = diag(1 − f²) W, per row.
    gen = torch.Generator().manual_seed(10)
    w = torch.randn(6, 6, generator=gen, dtype=F64) / 3
    x = torch.randn(3, 6, generator=gen, dtype=F64)
    z = torch.randn(3, 6, generator=gen, dtype=F64)
    lin = Linearisation(lambda y: tanh_layer_map(y, {"W": w, "x": x}), z)
    f = torch.tanh(z @ w.T + x)
    exact = (1 - f**2)[:, :, None] * w[None]
    torch.testing.assert_close(lin.value, f)
    torch.testing.assert_close(lin.dense(), exact)
    v = torch.randn(3, 6, generator=gen, dtype=F64)
    torch.testing.assert_close(lin.matvec(v), (exact @ v[..., None])[..., 0])
    torch.testing.assert_close(lin.rmatvec(v), (exact.transpose(1, 2) @ v[..., None])[..., 0])


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_tanh_layer_gives_its_jacobian_in_closed_form(dtype: str) -> None:
    import dataclasses

    from deqcli.api import load_problem
    from deqcli.config import parse_config

    text = (
        "problem:\n  kind: tanh_layer\n  dim: 7\n  input_dim: 4\n  batch: 3\n"
        "  W: {random: normal, seed: 0, spectral_norm: 0.9}\n  U: {random: normal, seed: 1}\n"
        "  b: {random: normal, seed: 2}\n  x: {random: normal, seed: 3}\n"
        "  initial: {random: normal, seed: 4}\n"
        f"solver: newton\nrun: {{dtype: {dtype}}}\n"
    )
    problem = load_problem(parse_config(text))
    assert problem.row_scaled_jacobian is not None
    by_autograd = dataclasses.replace(problem, row_scaled_jacobian=None)
    z = problem.z0
    v = torch.randn(z.shape, generator=torch.Generator().manual_seed(5)).to(z.dtype)
    for of in ("g", "f"):
        value, jac = problem.jacobian(z, of=of)
        expected_value, expected = by_autograd.jacobian(z, of=of)
        torch.testing.assert_close(value, expected_value)
        torch.testing.assert_close(jac, expected)
        # The operator: products without a graph, the same as autodiff's linearisation.
        op = jacobian_operator(problem, z, of=of)
        lin = jacobian_operator(by_autograd, z, of=of)
        assert isinstance(op, RowScaledJacobian) and isinstance(lin, Linearisation)
        torch.testing.assert_close(op.value, lin.value)
        torch.testing.assert_close(op.matvec(v), lin.matvec(v))
        torch.testing.assert_close(op.rmatvec(v), lin.rmatvec(v))
        torch.testing.assert_close(op.dense(), expected)
        active = torch.tensor([True, False, True])
        torch.testing.assert_close(
            op.with_active(active).matvec(v)[1], torch.zeros(7, dtype=z.dtype)
        )
    # J_g = I − diag(1 − f²) W, from f = tanh(W z + U x + b) written out here.
    p = problem.params
    f = torch.tanh(z @ p["W"].T + p["x"] @ p["U"].T + p["b"])
    eye = torch.eye(7, dtype=z.dtype)
    torch.testing.assert_close(problem.jacobian(z)[1], eye - (1 - f**2)[:, :, None] * p["W"])
    assert problem.counter.njev == [3, 3, 3]  # counted like the autograd Jacobian
    assert problem.counter.jvp == [4, 4, 4] and problem.counter.vjp == [2, 2, 2]


def test_jacobian_operator_counts_products_for_solvers_only() -> None:
    problem = Problem(
        name="sq",
        kind="test",
        form="residual",
        func=lambda z, p: z**2 - 2,
        z0=torch.ones(2, 3, dtype=F64),
    )
    v = torch.ones(2, 3, dtype=F64)
    op = jacobian_operator(problem, problem.z0)
    torch.testing.assert_close(op.matvec(v), 2 * v)  # J_g = 2 diag(z)
    op.rmatvec(v)
    assert problem.counter.jvp == [1, 1] and problem.counter.vjp == [1, 1]
    quiet = jacobian_operator(problem, problem.z0, counted=False)
    quiet.matvec(v)
    assert problem.counter.jvp == [1, 1]


def test_a_jvp_in_a_fresh_process_imports_neither_dynamo_nor_sympy() -> None:
    # torch.func.jvp and torch.autograd.forward_ad import torch._dynamo and sympy on first use
    # (seconds); the linearisation's double-backward JVP needs neither.
    code = (
        "import sys, torch\n"
        "from deqcli.linalg import Linearisation\n"
        "z = torch.ones(2, 3, dtype=torch.float64)\n"
        "Linearisation(lambda y: torch.tanh(y) * y, z).matvec(z)\n"
        "print(any(m in sys.modules for m in ('torch._dynamo', 'sympy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- spectra ---------------------------------------------------------------------------------------


def test_arnoldi_ritz_values_of_a_normal_matrix_converge_to_its_extreme_eigenvalues() -> None:
    # A symmetric matrix with a separated dominant eigenvalue −0.9: 20 steps find it.
    n = 60
    q, _ = torch.linalg.qr(_random(1, n, 11)[0])
    eig = torch.linspace(-0.5, 0.5, n, dtype=F64)
    eig[0] = -0.9
    a = q @ torch.diag(eig) @ q.T
    ritz = ritz_values(DenseOperator(a[None]), 20, seed=0)
    assert float(ritz.abs().max()) == pytest.approx(0.9, rel=1e-8)
    res = arnoldi(DenseOperator(a[None]), torch.ones(1, n, dtype=F64), 20)
    basis = res.basis[0, :21]
    torch.testing.assert_close(basis @ basis.T, torch.eye(21, dtype=F64), atol=1e-12, rtol=0)


def test_arnoldi_stops_at_an_invariant_subspace() -> None:
    a = torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=F64))[None]
    start = torch.tensor([[1.0, 1.0, 0.0, 0.0]], dtype=F64)  # spans a 2-dimensional invariant space
    res = arnoldi(DenseOperator(a), start, 4)
    assert int(res.size[0]) == 2
    eig = torch.linalg.eigvals(res.hessenberg[0, :2, :2]).real.sort().values
    torch.testing.assert_close(eig, torch.tensor([2.0, 3.0], dtype=F64))


@pytest.mark.parametrize("n", [8, 20])
def test_sigma_min_and_sigma_max_match_exact_svds(n: int) -> None:
    # Non-normal matrices with condition numbers up to about 1e4, a batch of three.
    gen = torch.Generator().manual_seed(12)
    u, _ = torch.linalg.qr(torch.randn(3, n, n, generator=gen, dtype=F64))
    v, _ = torch.linalg.qr(torch.randn(3, n, n, generator=gen, dtype=F64))
    s = torch.stack([torch.logspace(0, -k, n, dtype=F64) for k in (1, 2, 4)])
    a = u @ torch.diag_embed(s) @ v.transpose(1, 2)
    exact = torch.linalg.svdvals(a)
    op = DenseOperator(a)
    small = sigma_min(op, steps=n)
    assert small.method == "golub-kahan" and small.exact
    torch.testing.assert_close(small.value, exact[:, -1], rtol=1e-8, atol=0.0)
    big = sigma_max(op, steps=min(n, 12))
    torch.testing.assert_close(big.value, exact[:, 0], rtol=1e-8, atol=0.0)
    inverse = sigma_min(op, steps=min(n, 8), method="inverse")
    assert inverse.method == "inverse lanczos" and not inverse.exact
    torch.testing.assert_close(inverse.value, exact[:, -1], rtol=1e-6, atol=0.0)


def test_sigma_min_of_a_singular_matrix_is_zero() -> None:
    a = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=F64))[None]
    assert float(sigma_min(DenseOperator(a)).value[0]) <= 1e-14


def test_sigma_min_of_the_jacobian_of_a_map_without_forming_it() -> None:
    # g(z) = z − A z − c has J_g = I − A exactly; compare with the SVD of I − A.
    n = 16
    a = 0.9 * _random(1, n, 13)[0] / math.sqrt(n)
    problem = Problem(
        name="affine",
        kind="test",
        form="fixed_point",
        func=lambda z, p: z @ a.T + 1.0,
        z0=torch.zeros(2, n, dtype=F64),
    )
    op = jacobian_operator(problem, problem.z0, counted=False)
    exact = torch.linalg.svdvals(torch.eye(n, dtype=F64) - a)
    est = sigma_min(op, steps=6, method="inverse")
    torch.testing.assert_close(est.value, exact[-1].repeat(2), rtol=1e-6, atol=0.0)
    assert problem.counter.jvp == [0, 0]


def test_dense_lu_solves_a_batch_after_the_thread_count_was_set() -> None:
    # torch's batched CPU LU can return invalid pivots once torch.set_num_threads(k > 1) has been
    # called (seen with 2 threads: the solve then raises); deqcli.linalg.dense factors such a
    # batch one matrix at a time. x is known: b = A x.
    from deqcli.linalg.dense import lu_factor_ex, solve_ex

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        for batch, n in ((2, 256), (8, 256), (4, 512)):
            a = torch.randn(batch, n, n, generator=gen, dtype=torch.float64)
            x = torch.randn(batch, n, generator=gen, dtype=torch.float64)
            b = (a @ x[..., None])[..., 0]
            lu, pivots, info = lu_factor_ex(a)
            assert bool(((pivots >= 1) & (pivots <= n)).all()) and not bool(info.any())
            solution, info = solve_ex(a, b)
            torch.testing.assert_close(solution, x, rtol=0, atol=1e-8)
            transposed = torch.linalg.lu_solve(lu, pivots, b[..., None], adjoint=True)[..., 0]
            torch.testing.assert_close(
                a.mT @ transposed[..., None], b[..., None], rtol=0, atol=1e-8
            )
    finally:
        torch.set_num_threads(before)


def test_dense_lu_factors_are_torch_s_own_in_its_layout() -> None:
    # The factors written one matrix at a time into one batch are the ones torch gives each
    # matrix, laid out as torch lays out LU factors (column-major), which lu_solve reads as is.
    from deqcli.linalg.dense import lu_factor_ex

    gen = torch.Generator().manual_seed(1)
    a = torch.randn(3, 200, 200, generator=gen, dtype=torch.float64)
    lu, pivots, info = lu_factor_ex(a)
    assert lu.mT.is_contiguous() and lu.shape == a.shape
    for matrix, lu_b, pivots_b in zip(a, lu, pivots, strict=True):
        own, own_pivots = torch.linalg.lu_factor(matrix)
        assert torch.equal(lu_b, own) and torch.equal(pivots_b, own_pivots)
    singular = a.clone()
    singular[1, :, 7] = 0.0  # a zero column: U has a zero on its diagonal
    assert info.tolist() == [0, 0, 0] and lu_factor_ex(singular)[2].tolist()[1] > 0


@pytest.mark.parametrize("layout", ["row-major", "column-major", "rows of a wider batch"])
def test_matvec_is_the_batched_product_for_every_layout(layout: str) -> None:
    """dense.matvec computes a @ x per row whatever the strides of a (a Krylov basis is a slice,
    LU factors and Uᵀ are column-major): the exact products of integer matrices."""
    from deqcli.linalg.dense import matvec

    gen = torch.Generator().manual_seed(3)
    a = torch.randint(-9, 10, (4, 6, 5), generator=gen).to(torch.float64)
    if layout == "column-major":
        a = a.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "rows of a wider batch":
        a = torch.cat((a, torch.ones(4, 3, 5, dtype=torch.float64)), dim=1)[:, :6]
    x = torch.randint(-9, 10, (4, 5), generator=gen).to(torch.float64)
    expected = [(a[b].numpy() @ x[b].numpy()).tolist() for b in range(4)]
    assert torch.equal(matvec(a, x), torch.tensor(expected, dtype=torch.float64))
    assert matvec(a, x).shape == (4, 6)


def test_svd_takes_large_batches_one_matrix_at_a_time_between_deadline_checks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """dense.svd factors each matrix of a wide batch on its own, checking run.timeout before each
    (a batched call held a 20 s timeout off for 17 s), and gives the batched call's answer."""
    from deqcli import deadline
    from deqcli.linalg import dense

    gen = torch.Generator().manual_seed(4)
    a = torch.randn(3, dense.LOOP_FROM, dense.LOOP_FROM, generator=gen, dtype=torch.float64)
    checks: list[int] = []
    with monkeypatch.context() as patched:
        patched.setattr(dense, "checkpoint", lambda: checks.append(1))
        u, sigma, vh = dense.svd(a)
    assert len(checks) == 3
    torch.testing.assert_close(sigma, torch.linalg.svdvals(a), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(u @ torch.diag_embed(sigma) @ vh, a, rtol=0, atol=1e-11)
    with deadline.armed(0.0), pytest.raises(deadline.DeadlineExceeded):
        dense.svd(a)


def test_finite_matrices_flags_exactly_the_matrices_with_a_non_finite_entry() -> None:
    from deqcli.linalg.dense import finite_matrices

    a = torch.ones(5, 4, 4, dtype=torch.float64)
    a[1, 2, 3] = math.nan
    a[2, 0, 0] = math.inf
    a[3, 1, 1], a[3, 2, 2] = math.inf, -math.inf  # their sum is NaN, not a cancellation
    a[4] = 1e308  # finite entries whose sum overflows: still a finite matrix
    assert finite_matrices(a).tolist() == [True, False, False, False, True]


# -- the shared preconditioner ------------------------------------------------------------------


def test_shared_linearisation_applies_the_inverse_of_the_mean_scaled_matrix() -> None:
    from deqcli.linalg.preconditioners import SharedLinearisation, shared_weight

    gen = torch.Generator().manual_seed(4)
    n, batch = 30, 5
    weight = torch.randn(n, n, generator=gen, dtype=torch.float64) / n**0.5
    scale = torch.rand(batch, n, generator=gen, dtype=torch.float64)
    value = torch.zeros(batch, n, dtype=torch.float64)
    op = RowScaledJacobian(value, scale, weight, residual=True)
    rows = torch.tensor([True, False, True, True, False])
    mean = SharedLinearisation.mean_scale(op, rows)
    torch.testing.assert_close(mean, scale[rows].mean(dim=0))
    assert shared_weight(op) is weight
    m = torch.eye(n, dtype=torch.float64) - mean[:, None] * weight
    v = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    applied = SharedLinearisation(mean, weight)(v)
    # Row b is M⁻¹ v_b, from a float32 factorisation: to about κ(M)·ε₃₂, in float64 out.
    assert applied.dtype == torch.float64
    exact = torch.linalg.solve(m, v.T).T
    bound = float(torch.linalg.cond(m)) * torch.finfo(torch.float32).eps
    assert float((applied - exact).norm() / exact.norm()) <= bound
    # What is factored is Mᵀ (float32; M⁻¹ is applied as a transposed solve), and a later
    # factoring of the same W reuses the float32 W it made; the rows' op gives the same M.
    pre = SharedLinearisation.of(op, rows)
    assert pre is not None
    m32 = torch.eye(n, dtype=torch.float32)
    m32.addcmul_(mean[:, None].float(), weight.float(), value=-1.0)  # M, formed in float32
    lu, pivots = torch.linalg.lu_factor(m32.mT)
    assert torch.equal(pre.lu, lu) and torch.equal(pre.pivots, pivots)
    assert pre(v).is_contiguous()
    again = SharedLinearisation.of(op, ~rows, pre)
    assert again is not None and again.low_weight is pre.low_weight
    torch.testing.assert_close(again.mean_scale, scale[~rows].mean(dim=0))
    # It stands for a mean scale within 0.02 in every entry, and is factored again beyond.
    assert pre.fits(mean + 0.019) and not pre.fits(
        mean + torch.where(torch.arange(n) == 3, 0.03, 0)
    )
    # Batched weights, or an autodiff linearisation, have no shared matrix.
    assert (
        shared_weight(RowScaledJacobian(value, scale, weight.expand(batch, n, n), residual=True))
        is None
    )


def test_gmres_keeps_its_accuracy_with_an_inexact_preconditioner() -> None:
    # A right preconditioner factored in float32 is M⁻¹ only to about 1e-7. GMRES keeps the
    # preconditioned vectors it used (flexible GMRES), so A Z = V₊ H̄ holds for them and the
    # true residual reaches 1e-12 all the same; rebuilding x as M⁻¹(V y) would stop near 1e-7.
    gen = torch.Generator().manual_seed(5)
    n, batch = 80, 3
    a = torch.eye(n, dtype=torch.float64) - 0.9 * _haar_matrix(n, gen)
    low = torch.linalg.inv(a).to(torch.float32)

    def precond(v: torch.Tensor) -> torch.Tensor:
        return (v.to(torch.float32) @ low.T).to(torch.float64)

    b = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    op = DenseOperator(a.expand(batch, n, n))
    # One cycle and no closing product, as Newton–Krylov calls it: no restart to mend x.
    res = gmres(op, b, rtol=1e-12, restart=40, max_matvecs=40, precond=precond, true_residual=False)
    true = torch.linalg.vector_norm(b - res.x @ a.T, dim=1) / torch.linalg.vector_norm(b, dim=1)
    assert float(true.max()) <= 1e-11
    assert int(res.iterations.max()) <= 6  # A M̃⁻¹ = I + O(1e-6): a few steps


def _row_scaled_layer(
    n: int, batch: int, seed: int, spread: float
) -> tuple[RowScaledJacobian, torch.Tensor]:
    """J_g = I − diag(s_b) W with W = 0.99·(Haar orthogonal), scales 1 − spread·U(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    weight = 0.99 * _haar_matrix(n, gen)
    scale = 1 - spread * torch.rand(batch, n, generator=gen, dtype=torch.float64)
    value = torch.zeros(batch, n, dtype=torch.float64)
    v = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    return RowScaledJacobian(value, scale, weight, residual=True), v


def test_shared_linearisation_gives_the_preconditioned_product_from_its_own_solve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # M u = v with M = I − diag(s̄) W gives W u = (u − v)/s̄, so A u = u − (s_b/s̄)(u − v) with
    # no product with W: exact as far as the solve is (float64 factors: to rounding).
    from deqcli.linalg import preconditioners
    from deqcli.linalg.preconditioners import SharedLinearisation

    op, v = _row_scaled_layer(40, 4, 6, spread=0.5)
    rows = torch.tensor([True, True, False, True])
    monkeypatch.setitem(preconditioners.FACTOR_DTYPE, torch.float64, torch.float64)
    exact = SharedLinearisation.of(op, rows)
    assert exact is not None and exact.lu.dtype == torch.float64
    u = exact(v)
    torch.testing.assert_close(exact.product(op, v, u), op.matvec(u), rtol=0, atol=1e-12)
    # J_f = diag(s_b) W itself, and the rows an operator leaves out (zeros, as its matvec).
    f_op = RowScaledJacobian(op.value, op.scale, op.weight, residual=False).with_active(rows)
    product = exact.product(f_op, v, u)
    torch.testing.assert_close(product, f_op.matvec(u), rtol=0, atol=1e-12)
    assert not bool(product[2].any())
    # Where the batch's mean scale is 0 in an entry every row's is: that term is 0, not NaN.
    saturated = op.scale.clone()
    saturated[:, 7] = 0.0
    flat = RowScaledJacobian(op.value, saturated, op.weight, residual=True)
    shared = SharedLinearisation.of(flat, rows)
    assert shared is not None
    torch.testing.assert_close(shared.product(flat, v, shared(v)), flat.matvec(shared(v)))
    # Another W (or an operator without one) has no such product.
    other = RowScaledJacobian(op.value, op.scale, op.weight.clone(), residual=True)
    assert exact.product(other, v, u) is None
    assert exact.product(DenseOperator(op.dense()), v, u) is None
    monkeypatch.undo()
    # With the float32 factors it is exact to the float32 solve's accuracy.
    low = SharedLinearisation.of(op, rows)
    assert low is not None and low.lu.dtype == torch.float32
    u = low(v)
    error = torch.linalg.vector_norm(low.product(op, v, u) - op.matvec(u), dim=1)
    assert float(error.max()) <= 1e-4 * float(torch.linalg.vector_norm(u, dim=1).max())


def test_gmres_takes_the_preconditioners_products_only_where_they_are_accurate_enough() -> None:
    # The first step compares the preconditioner's product with A's (one JVP); within
    # 1/FUSED_MARGIN of the tolerance the other steps use it, and the true residual still meets
    # the tolerance. A tolerance the float32 products cannot vouch for takes A's every step.
    from deqcli.linalg.krylov import FUSED_MARGIN
    from deqcli.linalg.preconditioners import SharedLinearisation

    op, b = _row_scaled_layer(200, 3, 7, spread=0.05)
    shared = SharedLinearisation.of(op, torch.ones(3, dtype=torch.bool))
    assert shared is not None
    jvps: list[int] = []
    counted = RowScaledJacobian(
        op.value, op.scale, op.weight, residual=True, on_product=lambda kind: jvps.append(1)
    )
    norm = torch.linalg.vector_norm(b, dim=1)
    for rtol, fused in ((1e-3, True), (1e-12, False)):
        jvps.clear()
        res = gmres(counted, b, rtol=rtol, restart=40, max_matvecs=40, precond=shared)
        true = torch.linalg.vector_norm(b - op.matvec(res.x), dim=1) / norm
        assert bool(res.converged.all()) and float(true.max()) <= rtol
        steps = int(res.iterations.max())
        assert steps >= 3
        # Fused: the first step's check and the closing true residual; else one per step too.
        assert len(jvps) == (2 if fused else steps + 1)
    assert 1e-12 * FUSED_MARGIN < 1e-6  # the tight solve asked beyond the products' accuracy


def _haar_matrix(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))
