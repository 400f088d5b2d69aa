"""The driver loop, the Problem wrapper and the first two solvers, on problems with known answers."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from deqcli.errors import UsageError
from deqcli.problems import base as problem_base
from deqcli.problems.base import Problem
from deqcli.result import Status
from deqcli.solvers import base as solver_base
from deqcli.solvers import make_solver
from deqcli.solvers.base import StopRule, run

DOTTIE = 0.7390851332151607


def scalar_problem(form: str, fn, z0: float | list[float]) -> Problem:
    """A batch of scalar problems (one row per start) with an elementwise map or residual."""
    start = torch.tensor(z0 if isinstance(z0, list) else [z0], dtype=torch.float64)[:, None]
    return Problem(name="scalar", kind="test", form=form, func=lambda z, p: fn(z), z0=start)


def affine_problem(A: np.ndarray, c: np.ndarray, batch: int = 1) -> Problem:
    At = torch.tensor(A)
    ct = torch.tensor(c)
    z0 = torch.zeros(batch, len(c), dtype=torch.float64)
    return Problem(
        name="affine",
        kind="test",
        form="fixed_point",
        func=lambda z, p: z @ p["A"].T + p["c"],
        z0=z0,
        params={"A": At, "c": ct},
    )


def test_newton_finds_sqrt2_quadratically() -> None:
    problem = scalar_problem("residual", lambda z: z**2 - 2, 1.0)
    result = run(problem, make_solver("newton"), StopRule(atol=1e-12, max_iter=50))
    assert result.status is Status.CONVERGED
    assert result.iterations[0] <= 6
    assert float(result.solution[0, 0]) == pytest.approx(math.sqrt(2), abs=1e-14)
    # Quadratic convergence: e_{k+1} / e_k² tends to |g''/(2g')| = 1/(2√2) at the root.
    errors = [
        abs(r[0]) / (2 * math.sqrt(2)) for r in result.residual_history
    ]  # |z²−2| ≈ 2√2·|z−√2|
    ratios = [errors[k + 1] / errors[k] ** 2 for k in range(1, len(errors) - 2) if errors[k] > 1e-7]
    assert ratios and all(0.2 < q < 0.6 for q in ratios)


def test_fixed_point_finds_dottie_number_with_honest_counts() -> None:
    problem = scalar_problem("fixed_point", torch.cos, 1.0)
    result = run(problem, make_solver("fixed_point"), StopRule(atol=1e-12, max_iter=500))
    assert result.status is Status.CONVERGED
    assert float(result.solution[0, 0]) == pytest.approx(DOTTIE, abs=1e-11)
    # One evaluation at the start plus one per iteration, no Jacobians.
    assert result.counts.nfev[0] == result.iterations[0] + 1
    assert result.counts.njev[0] == 0
    # Linear convergence with rate |cos'(z*)| = sin(z*) ≈ 0.6736.
    res = [r[0] for r in result.residual_history]
    assert res[-2] / res[-3] == pytest.approx(math.sin(DOTTIE), rel=1e-2)


def test_damping_keeps_the_fixed_point() -> None:
    problem = scalar_problem("fixed_point", torch.cos, 1.0)
    result = run(
        problem, make_solver("fixed_point", {"beta": 0.5}), StopRule(atol=1e-12, max_iter=500)
    )
    assert result.status is Status.CONVERGED
    assert float(result.solution[0, 0]) == pytest.approx(DOTTIE, abs=1e-11)


def test_exact_linear_fixed_point() -> None:
    rng = np.random.default_rng(0)
    A = rng.standard_normal((6, 6))
    A *= 0.6 / np.linalg.norm(A, 2)
    c = rng.standard_normal(6)
    exact = np.linalg.solve(np.eye(6) - A, c)
    for name in ("fixed_point", "newton"):
        result = run(affine_problem(A, c), make_solver(name), StopRule(atol=1e-12, max_iter=500))
        assert result.status is Status.CONVERGED
        np.testing.assert_allclose(result.solution[0].numpy(), exact, atol=1e-11)
    # Newton is exact on an affine residual after one step.
    newton = run(affine_problem(A, c), make_solver("newton"), StopRule(atol=1e-12))
    assert newton.iterations[0] == 1


def test_contractive_tanh_layer_satisfies_its_equation() -> None:
    gen = torch.Generator().manual_seed(3)
    n, batch = 16, 5
    W = torch.randn(n, n, generator=gen, dtype=torch.float64)
    W *= 0.8 / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    problem = Problem(
        name="tanh",
        kind="test",
        form="fixed_point",
        func=lambda z, p: torch.tanh(z @ p["W"].T + p["x"]),
        z0=torch.zeros(batch, n, dtype=torch.float64),
        params={"W": W, "x": x},
        batched_params=frozenset({"x"}),
    )
    result = run(problem, make_solver("fixed_point"), StopRule(atol=1e-10, max_iter=500))
    assert result.status is Status.CONVERGED
    z = result.solution.numpy()
    residual = z - np.tanh(z @ W.numpy().T + x.numpy())
    assert np.linalg.norm(residual, axis=1).max() <= 1e-10


def test_jacobian_matches_analytic_tanh_derivative() -> None:
    gen = torch.Generator().manual_seed(1)
    W = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    problem = Problem(
        name="tanh",
        kind="test",
        form="fixed_point",
        func=lambda z, p: torch.tanh(z @ p["W"].T + p["x"]),
        z0=z,
        params={"W": W, "x": x},
    )
    _, jac = problem.jacobian(z)
    for b in range(3):
        s = 1 - torch.tanh(W @ z[b] + x[b]) ** 2
        expected = torch.eye(4, dtype=torch.float64) - s[:, None] * W
        torch.testing.assert_close(jac[b], expected)
    assert problem.counter.njev == [1, 1, 1]


def test_large_jacobian_uses_the_vectorised_path_and_stays_exact() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 24  # above the row-by-row limit
    W = torch.randn(n, n, generator=gen, dtype=torch.float64)
    z = torch.randn(2, n, generator=gen, dtype=torch.float64)
    problem = Problem(
        name="tanh",
        kind="test",
        form="fixed_point",
        func=lambda z, p: torch.tanh(z @ p["W"].T),
        z0=z,
        params={"W": W},
    )
    _, jac = problem.jacobian(z, of="f")
    for b in range(2):
        s = 1 - torch.tanh(W @ z[b]) ** 2
        torch.testing.assert_close(jac[b], s[:, None] * W)
    u = torch.randn(2, n, generator=gen, dtype=torch.float64)
    _, pulled = problem.vjp(z, u, of="f")
    torch.testing.assert_close(pulled, torch.einsum("bi,bij->bj", u, jac))
    _, pushed = problem.jvp(z, u, of="f")
    torch.testing.assert_close(pushed, torch.einsum("bij,bj->bi", jac, u))


def test_a_dense_jacobian_in_a_fresh_process_imports_neither_dynamo_nor_sympy() -> None:
    # autograd.grad's check of tensor grad_outputs imports sympy (about a second, paid by the
    # first Newton or trust-region solve of every `deq solve`); the vectorised path avoids it.
    code = (
        "import sys, torch\n"
        "from deqcli.problems.base import Problem\n"
        "n = 24\n"
        "W = torch.eye(n, dtype=torch.float64) * 0.5\n"
        "p = Problem(name='t', kind='test', form='fixed_point',\n"
        "            func=lambda z, q: torch.tanh(z @ q['W'].T), z0=torch.ones(2, n,\n"
        "            dtype=torch.float64), params={'W': W})\n"
        "_, jac = p.jacobian(p.z0)\n"
        "s = 1 - torch.tanh(torch.tensor(0.5, dtype=torch.float64)) ** 2\n"
        "expected = torch.eye(n, dtype=torch.float64) * (1 - 0.5 * s)\n"
        "print(torch.allclose(jac, expected.expand(2, n, n), rtol=0, atol=1e-15))\n"
        "print(any(m in sys.modules for m in ('torch._dynamo', 'sympy')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "False"]


def test_converged_samples_freeze_while_others_continue() -> None:
    # z ← a·z + 1 with a = 0.1 (fast) and a = 0.9 (slow): fixed points 1/(1−a).
    problem = _rates_problem([0.1, 0.9])
    result = run(problem, make_solver("fixed_point"), StopRule(atol=1e-10, max_iter=1000))
    assert result.sample_status == [Status.CONVERGED, Status.CONVERGED]
    fast, slow = result.iterations
    assert fast < slow
    # After the fast sample stops, its residual record stays fixed.
    tail = {row[0] for row in result.residual_history[fast:]}
    assert len(tail) == 1
    np.testing.assert_allclose(result.solution[:, 0].numpy(), [1 / 0.9, 10.0], atol=1e-8)


def _recording(problem: Problem) -> list[int]:
    """Record the rows of every call of ``problem``'s map."""
    seen: list[int] = []
    inner = problem.func

    def recording(z: torch.Tensor, p: dict[str, torch.Tensor]) -> torch.Tensor:
        seen.append(z.shape[0])
        return inner(z, p)

    problem.func = recording
    return seen


def test_stopped_samples_are_no_longer_evaluated() -> None:
    # z ← a·z + 1 per sample: ‖g_k‖ = aᵏ under plain iteration, so sample b stops at the first k
    # with aᵏ ≤ 1e-12. The map is called with all 4 rows until half of them have stopped (a few
    # stopped rows are not worth taking out: PACK_FRACTION), then with the 2 running, then 1,
    # each with its own a; the answers are 1/(1 − a).
    rates = [0.1, 0.3, 0.5, 0.8]
    problem = _rates_problem(rates)
    seen = _recording(problem)
    result = run(problem, make_solver("fixed_point"), StopRule(atol=1e-12, max_iter=500))
    assert result.status is Status.CONVERGED
    np.testing.assert_allclose(
        result.solution[:, 0].numpy(), [1 / (1 - a) for a in rates], rtol=0, atol=1e-11
    )
    stops = [math.ceil(math.log(1e-12) / math.log(a)) for a in rates]
    assert result.iterations == stops
    assert seen == [4] * (stops[1] + 1) + [2] * (stops[2] - stops[1]) + [1] * (stops[3] - stops[2])
    # After the run every row is evaluated again (reports and diagnostics see the real map).
    seen.clear()
    torch.testing.assert_close(
        problem.raw_f(result.solution), result.solution * problem.params["a"] + 1
    )
    assert seen == [4]


@pytest.mark.parametrize("solver", ["anderson", "broyden", "newton-krylov", "newton", "auto"])
def test_every_solver_evaluates_only_the_running_samples(solver: str) -> None:
    # z = a·tanh(2z) + 1 with a = 0.1, 0.3, 0.7: the samples stop at different iterations; after
    # the first stops the map sees fewer rows, and each sample's iterations and evaluations are
    # those it takes alone.
    problem = _per_sample(
        "fixed_point", lambda z, c: c * torch.tanh(2 * z) + 1, 1.0, [0.1, 0.3, 0.7]
    )
    seen = _recording(problem)
    stop = StopRule(atol=1e-12, max_iter=100)
    result = run(problem, make_solver(solver), stop)
    assert result.status is Status.CONVERGED
    assert len(set(result.iterations)) > 1
    assert seen[0] == 3 and min(seen) < 3
    assert float(problem.g(result.solution).abs().max()) <= 1e-12
    alone = _per_sample_costs(problem, solver, stop)
    assert [a[0] for a in alone] == result.iterations
    assert result.counts.nfev == [a[1] for a in alone]


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "broyden", "newton-krylov"])
def test_a_stopped_sample_stays_at_its_final_iterate_while_the_others_run(solver: str) -> None:
    # z = c·tanh(A z) + 1 in R³ with four values of c: the samples stop at different
    # iterations. Once half have stopped the problem is packed, a stopped row's map is constant
    # and a solver may move the row (Anderson's mixing does). The driver puts such rows back only
    # when the running rows change or the run ends, so the solution, every kept iterate after a
    # sample's stop and its residual record must still show the sample where it stopped: its own
    # solve alone.
    a = torch.tensor([[0.6, -0.8, 0.3], [0.8, 0.6, -0.2], [0.1, 0.4, 0.9]], dtype=torch.float64)
    c = torch.tensor([[0.2], [0.5], [0.8], [0.95]], dtype=torch.float64)
    problem = Problem(
        name="rotating-tanh",
        kind="test",
        form="fixed_point",
        func=lambda z, p: p["c"] * torch.tanh(z @ a.T) + 1,
        z0=torch.zeros(4, 3, dtype=torch.float64),
        params={"c": c},
        batched_params=frozenset({"c"}),
    )
    stop = StopRule(atol=1e-12, max_iter=200, keep_iterates=200)
    result = run(problem, make_solver(solver), stop)
    assert result.status is Status.CONVERGED
    assert len(set(result.iterations)) > 2
    first = result.nit - len(result.tail_iterates) + 1  # the iteration of the oldest kept iterate
    assert first == 0
    residuals = np.asarray(result.residual_history)
    for b, stopped in enumerate(result.iterations):
        alone = run(problem.select(b), make_solver(solver), stop)
        torch.testing.assert_close(result.solution[b], alone.solution[0], rtol=0, atol=1e-14)
        for k in range(stopped, result.nit + 1):
            assert torch.equal(result.tail_iterates[k][b], result.solution[b]), (b, k)
        assert set(residuals[stopped:, b]) == {residuals[stopped, b]}
        assert residuals[stopped, b] == float(
            torch.linalg.vector_norm(problem.g(result.solution)[b])
        )


def test_a_packed_problem_evaluates_the_running_rows_and_freezes_the_others() -> None:
    # The tanh layer's map, its closed-form Jacobian and an autodiff JVP on a packed problem: the
    # running rows equal the whole problem's, a stopped row has f ≡ its final z (g = 0 there,
    # J_f = 0, so J_g v = v), whatever z the solver hands in for it.
    from deqcli.problems.tanh_layer import tanh_layer_jacobian, tanh_layer_map

    gen = torch.Generator().manual_seed(3)
    problem = Problem(
        name="layer",
        kind="tanh_layer",
        form="fixed_point",
        func=tanh_layer_map,
        z0=torch.zeros(4, 6, dtype=torch.float64),
        params={
            "W": torch.randn(6, 6, dtype=torch.float64, generator=gen) / 2,
            "x": torch.randn(4, 6, dtype=torch.float64, generator=gen),
        },
        batched_params=frozenset({"x"}),
        row_scaled_jacobian=tanh_layer_jacobian,
    )
    z = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    v = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    f_full = problem.raw_f(z)
    _, s_full, weight = problem.closed_form_jacobian(z)
    _, jv_full = problem.jvp(z, v)
    final = z + 0.25  # the stopped rows' final iterates
    running = torch.tensor([True, False, True, False])
    problem.pack(running, final)
    f = problem.raw_f(z)
    torch.testing.assert_close(f[running], f_full[running], rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(f[~running], final[~running], rtol=0, atol=0)
    _, scale, same = problem.closed_form_jacobian(z)
    assert same is weight
    torch.testing.assert_close(scale[running], s_full[running], rtol=1e-14, atol=0)
    assert bool((scale[~running] == 0).all())
    _, jv = problem.jvp(z, v)
    torch.testing.assert_close(jv[running], jv_full[running], rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(jv[~running], v[~running], rtol=0, atol=0)
    # Explicit parameters (an analysis's copy of the batch) are never packed.
    torch.testing.assert_close(problem.raw_f(z, problem.params), f_full, rtol=0, atol=0)
    problem.pack(None)
    torch.testing.assert_close(problem.raw_f(z), f_full, rtol=0, atol=0)


def test_closed_form_jacobian_needs_a_problem_that_has_one() -> None:
    problem = _rates_problem([0.5])
    with pytest.raises(ValueError, match="no closed-form Jacobian"):
        problem.closed_form_jacobian(problem.z0)


def test_a_packed_residual_problem_has_its_stopped_rows_at_their_final_z() -> None:
    # g(z) = z² − c per sample, packed with samples 1 and 3 stopped at 4: their residual is z − 4
    # (a root at the final iterate, Jacobian I), the running rows keep z² − c with their own c.
    problem = _per_sample("residual", lambda z, c: z**2 - c, 1.0, [2.0, 5.0, 7.0, 3.0])
    z = torch.tensor([[1.5], [2.0], [2.5], [1.0]], dtype=torch.float64)
    final = torch.full((4, 1), 4.0, dtype=torch.float64)
    problem.pack(torch.tensor([True, False, True, False]), final)
    g = problem.raw_g(z)
    torch.testing.assert_close(
        g[:, 0], torch.tensor([0.25, -2.0, -0.75, -3.0], dtype=torch.float64)
    )
    _, jac = problem.jacobian(z)
    torch.testing.assert_close(
        jac[:, 0, 0], torch.tensor([3.0, 1.0, 5.0, 1.0], dtype=torch.float64)
    )
    # With more than PACK_FRACTION of the samples running, every row is evaluated.
    problem.pack(torch.tensor([True, False, True, True]), final)
    torch.testing.assert_close(problem.raw_g(z)[:, 0], (z**2 - problem.params["c"])[:, 0])


@pytest.mark.parametrize("solver", ["fixed_point", "anderson", "auto"])
def test_norms_handed_to_the_driver_are_each_rows_residual(solver: str) -> None:
    # These steps give the driver norms they computed or know (‖g‖; fixed_point also ‖f‖ and its
    # step's length): a frozen row keeps its record, and the last row of the record is ‖z − f(z)‖,
    # ‖f(z)‖ and the last step of the returned iterates, sample by sample.
    a = torch.tensor([[0.01], [0.9]], dtype=torch.float64)
    cycle = torch.roll(torch.eye(3, dtype=torch.float64), 1, dims=1)  # a cyclic permutation
    problem = Problem(
        name="two-rates",
        kind="test",
        form="fixed_point",
        func=lambda z, p: p["a"] * torch.tanh(z @ p["P"].T) + 1,
        z0=torch.zeros(2, 3, dtype=torch.float64),
        params={"a": a, "P": cycle},
        batched_params=frozenset({"a"}),
    )
    result = run(problem, make_solver(solver), StopRule(atol=1e-10, max_iter=1000))
    assert result.sample_status == [Status.CONVERGED, Status.CONVERGED]
    fast, slow = result.iterations
    assert fast < slow
    assert len({row[0] for row in result.residual_history[fast:]}) == 1
    z = result.solution
    final = torch.linalg.vector_norm(z - problem.f(z), dim=1).tolist()
    assert result.residual_history[-1] == pytest.approx(final, rel=1e-12, abs=1e-300)
    assert max(final) <= 1e-10
    f_norm = torch.linalg.vector_norm(problem.f(z), dim=1).tolist()
    relative = [r / f for r, f in zip(final, f_norm, strict=True)]
    assert result.relative_history[-1] == pytest.approx(relative, rel=1e-10, abs=1e-300)
    last_step = torch.linalg.vector_norm(result.tail_iterates[-1] - result.tail_iterates[-2], dim=1)
    assert result.step_history[-1] == pytest.approx(last_step.tolist(), rel=1e-12, abs=0)
    assert result.step_history[-1][0] == 0.0  # the fast sample stopped long before


def test_divergence_nonfinite_max_iter_and_timeout_statuses() -> None:
    stop = StopRule(atol=1e-12, max_iter=200)
    grow = run(
        scalar_problem("fixed_point", lambda z: 2 * z + 1, 0.0), make_solver("fixed_point"), stop
    )
    assert grow.sample_status == [Status.DIVERGED]
    nan = run(scalar_problem("fixed_point", torch.log, 0.5), make_solver("fixed_point"), stop)
    assert nan.sample_status == [Status.NONFINITE]
    short = run(
        scalar_problem("fixed_point", torch.cos, 1.0),
        make_solver("fixed_point"),
        StopRule(max_iter=5),
    )
    assert short.sample_status == [Status.MAX_ITER] and short.iterations == [5]
    late = run(
        scalar_problem("fixed_point", torch.cos, 1.0),
        make_solver("fixed_point"),
        StopRule(timeout=1e-12),
    )
    assert late.sample_status == [Status.TIMEOUT]


@pytest.mark.parametrize("mode", ["abs", "rel"])
def test_stopping_test_on_the_host_and_on_tensors_agree(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # One batch with every verdict: z ← a z + 1 converges (a = 0.5, z* = 2; a = −0.9, z* ≈ 0.526),
    # z ← 3 z + 1 diverges, z ← log z goes non-finite; float32, so the comparisons are made on
    # float32 norms. The host loop (batches up to HOST_TEST_MAX) and the tensor form (larger
    # batches) must give the same statuses, iterations and records.
    a = torch.tensor([[0.5], [-0.9], [3.0], [0.0]], dtype=torch.float32)
    problem = Problem(
        name="verdicts",
        kind="test",
        form="fixed_point",
        func=lambda z, p: torch.where(p["a"] == 0, torch.log(z), p["a"] * z + 1),
        z0=torch.tensor([[0.0], [0.0], [0.0], [0.5]], dtype=torch.float32),
        params={"a": a},
        batched_params=frozenset({"a"}),
    )
    stop = StopRule(atol=1e-5, rtol=1e-4 if mode == "rel" else 0.0, stop_mode=mode, max_iter=300)
    on_host = run(problem, make_solver("fixed_point"), stop)
    monkeypatch.setattr(solver_base, "HOST_TEST_MAX", 0)
    on_tensors = run(problem, make_solver("fixed_point"), stop)
    expected = [Status.CONVERGED, Status.CONVERGED, Status.DIVERGED, Status.NONFINITE]
    assert on_host.sample_status == on_tensors.sample_status == expected
    assert on_host.iterations == on_tensors.iterations
    np.testing.assert_array_equal(on_host.residual_history, on_tensors.residual_history)
    np.testing.assert_allclose(on_host.solution[:2, 0].numpy(), [2.0, 1 / 1.9], atol=1e-3)


def test_overall_status_needs_every_sample() -> None:
    # Samples: a contraction (converges) and an expansion (diverges) in one batch.
    a = torch.tensor([[0.5], [3.0]], dtype=torch.float64)
    problem = Problem(
        name="mixed",
        kind="test",
        form="fixed_point",
        func=lambda z, p: p["a"] * z + 1,
        z0=torch.zeros(2, 1, dtype=torch.float64),
        params={"a": a},
        batched_params=frozenset({"a"}),
    )
    result = run(problem, make_solver("fixed_point"), StopRule(atol=1e-10, max_iter=500))
    assert result.sample_status == [Status.CONVERGED, Status.DIVERGED]
    assert result.status is Status.DIVERGED
    doc = result.to_dict()
    assert doc["converged"] is False and doc["converged_samples"] == 1
    assert [s["status"] for s in doc["samples"]] == ["converged", "diverged"]


def test_float32_converges_to_single_precision() -> None:
    problem = Problem(
        name="dottie32",
        kind="test",
        form="fixed_point",
        func=lambda z, p: torch.cos(z),
        z0=torch.ones(1, 1, dtype=torch.float32),
    )
    result = run(problem, make_solver("fixed_point"), StopRule(atol=1e-6, max_iter=500))
    assert result.status is Status.CONVERGED and result.dtype == "float32"
    assert float(result.solution[0, 0]) == pytest.approx(DOTTIE, abs=1e-5)


def test_newton_refuses_dense_jacobians_that_do_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(problem_base, "DENSE_JACOBIAN_LIMIT_BYTES", 1000)
    problem = affine_problem(np.eye(20) * 0.5, np.ones(20))
    with pytest.raises(UsageError, match="newton-krylov"):
        run(problem, make_solver("newton"), StopRule())


def test_unknown_solver_and_options_list_the_valid_ones() -> None:
    with pytest.raises(UsageError, match="unknown solver 'newtn'; did you mean 'newton'"):
        make_solver("newtn")
    with pytest.raises(
        UsageError,
        match=r"solver\.betta: unknown option .*did you mean 'beta'.*valid options: beta",
    ):
        make_solver("fixed_point", {"betta": 0.5})
    with pytest.raises(UsageError, match=r"solver\.beta: must lie in \(0, 2\)"):
        make_solver("fixed_point", {"beta": 2.5})
    with pytest.raises(UsageError, match=r"solver\.max_backtracks: must be an integer"):
        make_solver("newton", {"max_backtracks": "many"})


def test_text_options_take_a_list_of_names_and_null_keeps_the_default() -> None:
    # auto's stages are comma-separated names; a YAML list of them means the same, null (an
    # empty --set value) keeps the default list, and anything else is refused by name.
    assert make_solver("auto", {"stages": ["newton", "ptc"]}).stages == "newton,ptc"
    assert make_solver("auto", {"stages": None}).stages == ""
    assert make_solver("newton", {"max_backtracks": None}).max_backtracks == 20
    with pytest.raises(UsageError, match=r"solver\.stages: must be text, got \{'a': 1\}"):
        make_solver("auto", {"stages": {"a": 1}})
    with pytest.raises(UsageError, match=r"solver\.stages: must be text, got \[1, 2\]"):
        make_solver("auto", {"stages": [1, 2]})
    with pytest.raises(UsageError, match=r"solver\.betta: unknown option"):
        make_solver("fixed_point", {"betta": None})


def _rotation(angle: float = 1.0) -> Problem:
    """z ← R z with an irrational rotation: bounded, never converging, never diverging."""
    c, s = math.cos(angle), math.sin(angle)
    R = torch.tensor([[c, -s], [s, c]], dtype=torch.float64)
    return Problem(
        name="rotation",
        kind="test",
        form="fixed_point",
        func=lambda z, p: z @ p["R"].T,
        z0=torch.tensor([[1.0, 0.0]], dtype=torch.float64),
        params={"R": R},
    )


def test_relative_stop_mode_is_torchdeqs_relative_residual() -> None:
    # z ← 0.5 z + 100: z* = 200, ‖f(z)‖ ≈ 200 near the solution, so rtol 1e-6 stops at ‖g‖ ≈ 2e-4.
    problem = scalar_problem("fixed_point", lambda z: 0.5 * z + 100, 0.0)
    rel = run(problem, make_solver("fixed_point"), StopRule(atol=0.0, rtol=1e-6, stop_mode="rel"))
    absolute = run(problem, make_solver("fixed_point"), StopRule(atol=1e-6, rtol=0.0))
    assert rel.status is Status.CONVERGED and absolute.status is Status.CONVERGED
    final = rel.final_residuals()[0]
    assert rel.final_relative()[0] <= 1e-6 < rel.relative_history[-2][0]
    assert final == pytest.approx(rel.final_relative()[0] * float(rel.solution[0, 0]), rel=1e-6)
    assert rel.iterations[0] < absolute.iterations[0]
    doc = rel.to_dict()
    assert doc["tolerance"]["stop_mode"] == "rel"
    assert doc["tolerance"]["rule"] == "‖g‖ ≤ atol + rtol·‖f(z)‖"
    # The threshold the diagnostics quote is the one the run applied.
    assert rel.thresholds()[0] == pytest.approx(1e-6 * float(rel.solution[0, 0]), rel=1e-6)


def test_long_runs_keep_a_bounded_history_with_exact_start_and_recent_window() -> None:
    limit = 200
    result = run(
        _rotation(),
        make_solver("fixed_point"),
        StopRule(atol=1e-12, max_iter=5000, history_limit=limit),
    )
    assert result.status is Status.MAX_ITER and result.iterations == [5000]
    rows = result.rows
    assert len(rows) < limit and len(result.residual_history) == len(rows)
    assert len(result.step_history) == len(rows) - 1
    # Exact start and an exact, contiguous recent window ending at the last iteration.
    assert rows[: limit // 4] == list(range(limit // 4))
    assert rows[-(limit // 2) :] == list(range(5001 - limit // 2, 5001))
    assert rows == sorted(rows)
    # A rotation keeps ‖g‖ = ‖R − I‖·‖z0‖ = 2 sin(1/2) at every iteration.
    assert result.final_residuals()[0] == pytest.approx(2 * math.sin(0.5), rel=1e-9)
    summary = result.to_dict()["history"]["summary"]
    assert summary["dropped_rows"] == 5001 - len(rows)
    iters, residuals, steps = result.sample_history(0)
    assert iters[-1] == 5000 and len(residuals) == len(iters) == len(steps) + 1


def test_history_memory_stays_flat_however_long_the_run() -> None:
    import tracemalloc

    def peak(iterations: int) -> int:
        tracemalloc.start()
        run(
            _rotation(),
            make_solver("fixed_point"),
            StopRule(atol=1e-12, max_iter=iterations, history_limit=256, keep_iterates=8),
        )
        _, top = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return top

    short, long = peak(2_000), peak(20_000)
    # Ten times the iterations, the same memory (a list per iteration would grow tenfold).
    assert long < 1.5 * short


def test_monitor_sees_the_start_every_kth_iteration_and_the_end() -> None:
    seen: list[tuple[int, int]] = []
    result = run(
        scalar_problem("fixed_point", torch.cos, 1.0),
        make_solver("fixed_point"),
        StopRule(atol=1e-12, max_iter=500, monitor_every=10),
        monitor=lambda it: seen.append((it.k, it.running)),
    )
    k = result.iterations[0]
    assert seen[0] == (0, 1)
    assert [i for i, _ in seen[:-1]] == list(range(0, k, 10))
    assert seen[-1] == (k, 0)


# -- per-sample counts ------------------------------------------------------------------------------


def _per_sample(form: str, fn, start: float, values: list[float]) -> Problem:
    """Scalar problems fn(z, c) = 0 or z = fn(z, c), one per value c (a per-sample parameter)."""
    c = torch.tensor(values, dtype=torch.float64)[:, None]
    return Problem(
        name="per-sample",
        kind="test",
        form=form,
        func=lambda z, p: fn(z, p["c"]),
        z0=torch.full_like(c, start),
        params={"c": c},
        batched_params=frozenset({"c"}),
    )


def _per_sample_costs(problem: Problem, solver: str, stop: StopRule) -> list[tuple[int, int, int]]:
    """(iterations, nfev, njev) of every sample solved alone."""
    out = []
    for b in range(problem.batch):
        alone = run(problem.select(b), make_solver(solver), stop)
        out.append((alone.iterations[0], alone.counts.nfev[0], alone.counts.njev[0]))
    return out


def test_fixed_point_counts_each_sample_until_it_stops() -> None:
    # z = c z + 1 from z0 = 0: the error shrinks by c per iteration, so samples with c = 0.1, 0.5
    # and 0.8 stop at very different iterations; each counts only the evaluations it ran for.
    problem = _per_sample("fixed_point", lambda z, c: c * z + 1, 0.0, [0.1, 0.5, 0.8])
    stop = StopRule(atol=1e-12, max_iter=500)
    result = run(problem, make_solver("fixed_point"), stop)
    assert result.status is Status.CONVERGED
    assert len(set(result.iterations)) == 3
    alone = _per_sample_costs(problem, "fixed_point", stop)
    assert [a[0] for a in alone] == result.iterations
    assert result.counts.nfev == [a[1] for a in alone]
    assert result.counts.nfev == [k + 1 for k in result.iterations]
    # The slowest sample ran through every batched call: the totals are those calls.
    assert result.counts.totals()["nfev"] == result.nit + 1


@pytest.mark.parametrize("solver", ["newton", "ptc"])
def test_newton_counts_each_sample_until_it_stops(solver: str) -> None:
    # z² − a = 0 from above the root: Newton decreases the residual monotonically (no backtracks),
    # and a = 100 is reached from 12 in fewer steps than a = 2. Ψtc's dense steps factor only
    # the running samples too.
    problem = _per_sample("residual", lambda z, a: z**2 - a, 12.0, [2.0, 100.0, 140.0])
    a = problem.params["c"]
    stop = StopRule(atol=1e-12, max_iter=50)
    result = run(problem, make_solver(solver), stop)
    assert result.status is Status.CONVERGED
    np.testing.assert_allclose(result.solution[:, 0].numpy(), np.sqrt(a[:, 0].numpy()), atol=1e-12)
    assert len(set(result.iterations)) > 1
    alone = _per_sample_costs(problem, solver, stop)
    assert [a[0] for a in alone] == result.iterations
    assert result.counts.nfev == [a[1] for a in alone]
    assert result.counts.njev == [a[2] for a in alone] == result.iterations


# -- run.check_every: the stopping test every c iterations ------------------------------------------


def _rates_problem(rates: list[float]) -> Problem:
    """z ← a·z + 1 per sample: from z0 = 0, g_k = (1 − a)(z_k − z*) = −aᵏ, so ‖g_k‖ = |a|ᵏ."""
    a = torch.tensor(rates, dtype=torch.float64)[:, None]
    return Problem(
        name="rates",
        kind="test",
        form="fixed_point",
        func=lambda z, p: p["a"] * z + 1,
        z0=torch.zeros(len(rates), 1, dtype=torch.float64),
        params={"a": a},
        batched_params=frozenset({"a"}),
    )


@pytest.mark.parametrize("every", [3, 7, 32])
def test_checking_every_c_iterations_stops_each_sample_where_it_met_the_test(every: int) -> None:
    # ‖g_k‖ = |a|ᵏ: sample b first meets 3e-10 at k = ⌈log 3e-10 / log |a|⌉ (10, 32, 99, 209;
    # none within rounding of the tolerance).
    rates = [0.1, 0.5, -0.8, 0.9]
    expected = [math.ceil(math.log(3e-10) / math.log(abs(a))) for a in rates]
    assert expected == [10, 32, 99, 209]
    stop = StopRule(atol=3e-10, max_iter=1000, check_every=every)
    result = run(_rates_problem(rates), make_solver("fixed_point"), stop)
    assert result.iterations == expected
    assert result.sample_status == [Status.CONVERGED] * 4
    # The run ended with the last sample: no row of the record lies beyond it.
    assert result.history_iterations[-1] == max(expected) == len(result.residual_history) - 1
    np.testing.assert_allclose(result.solution[:, 0].numpy(), [1 / (1 - a) for a in rates])
    # A stopped sample's record and iterate stay those of its stopping iteration, as with c = 1.
    every_one = run(_rates_problem(rates), make_solver("fixed_point"), StopRule(atol=3e-10))
    assert result.residual_history == every_one.residual_history
    assert result.step_history == every_one.step_history
    assert torch.equal(result.solution, every_one.solution)
    pairs = zip(result.tail_iterates, every_one.tail_iterates, strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    # What differs: the evaluations made after a sample met the test, until the next check.
    extra = [a - b for a, b in zip(result.counts.nfev, every_one.counts.nfev, strict=True)]
    assert all(0 <= e < every for e in extra)


@pytest.mark.parametrize("solver", ["newton", "broyden", "trust-region", "newton-krylov"])
def test_checking_every_c_iterations_changes_nothing_but_the_counts(solver: str) -> None:
    problem = lambda: _rates_problem([0.3, 0.95, -0.6])  # noqa: E731
    tanh = lambda: scalar_problem("fixed_point", torch.cos, [0.0, 1.0, 3.0, -2.0])  # noqa: E731
    for build in (problem, tanh):
        one = run(build(), make_solver(solver), StopRule(atol=1e-12, max_iter=200))
        five = run(build(), make_solver(solver), StopRule(atol=1e-12, max_iter=200, check_every=5))
        assert five.iterations == one.iterations
        assert five.sample_status == one.sample_status
        assert five.residual_history == one.residual_history
        assert torch.equal(five.solution, one.solution)


def test_checking_every_c_iterations_keeps_max_iter_and_failures_exact() -> None:
    # a = 0.99 needs ~2300 iterations: max_iter 50 (not a multiple of 7) stops it at exactly 50;
    # a = 3 grows until ‖g‖ = 3ᵏ passes 1e8·‖g_0‖ (3¹⁷ > 1e8 > 3¹⁶); a = inf makes g_0 NaN.
    stop = StopRule(atol=1e-10, max_iter=50, check_every=7)
    result = run(_rates_problem([0.99, 3.0, math.inf]), make_solver("fixed_point"), stop)
    assert result.sample_status == [Status.MAX_ITER, Status.DIVERGED, Status.NONFINITE]
    reference = run(
        _rates_problem([0.99, 3.0, math.inf]),
        make_solver("fixed_point"),
        StopRule(atol=1e-10, max_iter=50),
    )
    assert result.iterations == reference.iterations == [50, 17, 0]
    assert len(result.residual_history) == 51


def test_check_every_defaults_by_device() -> None:
    assert StopRule().checks_every(torch.device("cpu")) == 1
    assert StopRule().checks_every(torch.device("cuda")) == solver_base.CHECK_EVERY_ACCELERATOR > 1
    assert StopRule(check_every=4).checks_every(torch.device("cpu")) == 4
