"""Every solver of ours on every suitable known-answer problem, plus each solver's own guarantees."""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from deqcli.api import load_problem
from deqcli.config import load_config
from deqcli.errors import UsageError
from deqcli.problems.base import Problem
from deqcli.problems.tanh_layer import tanh_layer_jacobian, tanh_layer_map
from deqcli.result import SolveResult, Status
from deqcli.solvers import SOLVERS, make_solver
from deqcli.solvers.base import StopRule, run
from tests.conftest import CONFIGS

DOTTIE = 0.7390851332151607
OURS = [name for name, info in SOLVERS.items() if info.family == "deq"]
DTYPES = {"float64": torch.float64, "float32": torch.float32}
ATOL = {"float64": 1e-10, "float32": 1e-5}


def scalar_problem(form: str, fn: Callable[[torch.Tensor], torch.Tensor], starts, dtype):
    """A batch of scalar problems, one row per start."""
    z0 = torch.tensor(starts, dtype=dtype)[:, None]
    return Problem(name="scalar", kind="test", form=form, func=lambda z, p: fn(z), z0=z0)


def affine_problem(A: np.ndarray, c: np.ndarray, z0: np.ndarray, dtype) -> Problem:
    """z = A z + c, batched over the rows of z0."""
    return Problem(
        name="affine",
        kind="test",
        form="fixed_point",
        func=lambda z, p: z @ p["A"].T + p["c"],
        z0=torch.tensor(z0, dtype=dtype),
        params={"A": torch.tensor(A, dtype=dtype), "c": torch.tensor(c, dtype=dtype)},
    )


# -- the known-answer problems ---------------------------------------------------------------


@dataclass
class Case:
    """A problem builder and a check of the answer against what is known about it."""

    build: Callable[[torch.dtype], Problem]
    check: Callable[[Problem, SolveResult, float], None]


def _sqrt2(dtype: torch.dtype) -> Problem:
    return scalar_problem("residual", lambda z: z**2 - 2, [1.0, 3.0], dtype)


def _check_sqrt2(problem: Problem, result: SolveResult, atol: float) -> None:
    # The roots are ±√2, and |z² − 2| ≤ atol means ||z| − √2| ≤ atol / (|z| + √2) < atol. (From
    # z = 3 a plain first step lands at −4, in the basin of −√2.)
    magnitudes = result.solution.double().abs().flatten().tolist()
    assert magnitudes == pytest.approx([math.sqrt(2)] * 2, abs=atol)


def _dottie(dtype: torch.dtype) -> Problem:
    return scalar_problem("fixed_point", torch.cos, [1.0, 0.0], dtype)


def _check_dottie(problem: Problem, result: SolveResult, atol: float) -> None:
    # |cos z − z| ≤ atol and |(cos z − z)'| = 1 + sin z ≥ 1.67 near the root.
    assert result.solution.double().flatten().tolist() == pytest.approx([DOTTIE] * 2, abs=atol)


_RNG = np.random.default_rng(0)
_A = _RNG.standard_normal((5, 5))
_A *= 0.5 / np.linalg.norm(_A, 2)
_C = _RNG.standard_normal(5)
_EXACT = np.linalg.solve(np.eye(5) - _A, _C)


def _linear(dtype: torch.dtype) -> Problem:
    return affine_problem(_A, _C, np.stack([np.zeros(5), np.ones(5)]), dtype)


def _check_linear(problem: Problem, result: SolveResult, atol: float) -> None:
    # ‖(I − A)(z − z*)‖ ≤ atol and σ_min(I − A) ≥ 1 − ‖A‖ = 0.5.
    for row in result.solution.double().numpy():
        np.testing.assert_allclose(row, _EXACT, atol=2.5 * atol, rtol=0)


_W = np.random.default_rng(1).standard_normal((12, 12))
_W *= 0.8 / np.linalg.norm(_W, 2)
_X = np.random.default_rng(2).standard_normal((3, 12))


def _tanh(dtype: torch.dtype) -> Problem:
    params = {"W": torch.tensor(_W, dtype=dtype), "x": torch.tensor(_X, dtype=dtype)}
    return Problem(
        name="tanh",
        kind="tanh_layer",
        form="fixed_point",
        func=tanh_layer_map,
        z0=torch.zeros(3, 12, dtype=dtype),
        params=params,
        batched_params=frozenset({"x"}),
    )


def _check_tanh(problem: Problem, result: SolveResult, atol: float) -> None:
    # The defining equation z = tanh(W z + x), checked independently in float64 numpy.
    z = result.solution.double().numpy()
    residual = np.linalg.norm(z - np.tanh(z @ _W.T + _X), axis=1)
    assert residual.max() <= 1.5 * atol


def _chandrasekhar(dtype: torch.dtype) -> Problem:
    dtype_name = str(dtype).removeprefix("torch.")
    return load_problem(load_config(CONFIGS / "chandrasekhar.yaml", [f"run.dtype={dtype_name}"]))


def _check_chandrasekhar(problem: Problem, result: SolveResult, atol: float) -> None:
    # Summing the discretised equation gives (c/2N) Σ H_i = 1 − √(1 − c) exactly (c = 0.9).
    H = result.solution.double().numpy()[0]
    assert 0.9 / (2 * len(H)) * H.sum() == pytest.approx(1 - math.sqrt(0.1), abs=10 * atol)
    mu = (np.arange(1, len(H) + 1) - 0.5) / len(H)
    A = 0.9 / (2 * len(H)) * mu[:, None] / (mu[:, None] + mu[None, :])
    assert np.abs(H - 1 / (1 - A @ H)).max() <= 1.5 * atol


CASES = {
    "sqrt2": Case(_sqrt2, _check_sqrt2),
    "dottie": Case(_dottie, _check_dottie),
    "linear": Case(_linear, _check_linear),
    "tanh": Case(_tanh, _check_tanh),
    "chandrasekhar": Case(_chandrasekhar, _check_chandrasekhar),
}
# The naive map of g(z) = z² − 2 is f(z) = z − z² + 2, with f'(√2) = 1 − 2√2 ≈ −1.83: repelling.
EXPECTED_FAILURES = {
    ("fixed_point", "sqrt2"): "plain iteration on z − (z² − 2) is repelled from √2 (f' ≈ −1.83)",
}


def _matrix() -> list:
    params = []
    for solver in OURS:
        for case in CASES:
            for dtype in DTYPES:
                marks = []
                if (solver, case) in EXPECTED_FAILURES:
                    marks.append(
                        pytest.mark.xfail(reason=EXPECTED_FAILURES[solver, case], strict=True)
                    )
                params.append(pytest.param(solver, case, dtype, marks=marks))
    return params


@pytest.mark.parametrize(("solver", "case", "dtype"), _matrix())
def test_solver_finds_the_known_answer(solver: str, case: str, dtype: str) -> None:
    spec = CASES[case]
    problem = spec.build(DTYPES[dtype])
    atol = ATOL[dtype]
    result = run(problem, make_solver(solver), StopRule(atol=atol, max_iter=500))
    assert result.status is Status.CONVERGED, result.sample_status
    assert result.solution.dtype == DTYPES[dtype]
    assert max(result.final_residuals()) <= atol
    spec.check(problem, result, atol)


# -- Anderson --------------------------------------------------------------------------------


@pytest.mark.parametrize("m", [6, 9])
def test_anderson_with_full_memory_solves_a_linear_map_in_n_plus_one_steps(m: int) -> None:
    # Walker–Ni: with β = 1 and m ≥ n, Anderson on an affine map is GMRES on (I − A) z = c, exact
    # after at most n + 1 steps, even where plain iteration diverges (ρ(A) > 1 here).
    n = 6
    rng = np.random.default_rng(3)
    A = 0.8 * rng.standard_normal((n, n))
    c = rng.standard_normal(n)
    assert max(abs(np.linalg.eigvals(A))) > 1.5
    exact = np.linalg.solve(np.eye(n) - A, c)
    problem = affine_problem(A, c, np.zeros((1, n)), torch.float64)
    result = run(problem, make_solver("anderson", {"m": m}), StopRule(atol=1e-10, max_iter=50))
    assert result.status is Status.CONVERGED
    assert result.iterations[0] <= n + 2
    np.testing.assert_allclose(result.solution[0].numpy(), exact, atol=1e-9, rtol=0)
    naive = run(problem, make_solver("fixed_point"), StopRule(atol=1e-10, max_iter=50))
    assert not naive.status.ok


def test_anderson_counts_one_evaluation_per_iteration_and_no_derivatives() -> None:
    result = run(_tanh(torch.float64), make_solver("anderson"), StopRule(atol=1e-10))
    totals = result.counts.totals()
    assert totals["nfev"] == result.nit + 1
    assert totals["njev"] == totals["jvp"] == totals["vjp"] == 0


def test_anderson_restarts_only_the_samples_that_need_it() -> None:
    # z = z² + c: fixed points for c = 0.1 and −0.5; none for c = 1, whose residual grows.
    problem = _quadratic_batch()
    result = run(problem, make_solver("anderson"), StopRule(atol=1e-12, max_iter=200))
    restarts = result.extra["anderson"]["restarts"]
    assert restarts[:2] == [0, 0] and restarts[2] >= 1
    assert any("restarted" in note for note in result.notes)
    off = run(problem, make_solver("anderson", {"restart": False}), StopRule(atol=1e-12))
    assert "anderson" not in off.extra


def test_anderson_takes_plain_steps_where_it_stalls_on_a_fixed_point_map() -> None:
    # A strongly non-normal layer (coupling 3): Anderson(5) wanders at residuals near 1e-2 and
    # never converges; after 20 iterations without a smaller residual a sample takes plain steps
    # (the user's own map), records their differences and then mixes again.
    problem = _nonnormal_layer(64, 4, 2, coupling=3.0)
    rule = StopRule(atol=1e-10, max_iter=2000)
    result = run(problem, make_solver("anderson"), rule)
    assert result.status is Status.CONVERGED
    z = result.solution
    assert float(torch.linalg.vector_norm(z - problem.f(z), dim=1).max()) <= 1e-10
    stalls = result.extra["anderson"]["stalls"]
    assert sum(stalls) >= 1
    assert any("took plain steps" in note for note in result.notes)
    without = run(problem, make_solver("anderson", {"stall": 0}), rule)
    assert without.status is Status.MAX_ITER
    assert without.extra["anderson"]["stalls"] == [0, 0, 0, 0]


def test_anderson_never_takes_plain_steps_on_a_root_problem() -> None:
    # z − βg is the user's map only for a fixed-point problem: the same layer given as a
    # residual runs exactly as with the stall rule off.
    layer = _nonnormal_layer(64, 4, 2, coupling=3.0)
    problem = dataclasses.replace(
        layer, form="residual", func=lambda z, p: z - tanh_layer_map(z, p)
    )
    rule = StopRule(atol=1e-10, max_iter=300)
    result = run(problem, make_solver("anderson"), rule)
    off = run(problem, make_solver("anderson", {"stall": 0}), rule)
    assert result.extra["anderson"]["stalls"] == [0, 0, 0, 0]
    assert result.iterations == off.iterations
    assert torch.equal(result.solution, off.solution)


def test_anderson_stall_rule_ends_plain_steps_that_do_not_help() -> None:
    # The rule on its own, residual by residual: ``stall`` iterations without a new best start
    # ``plain`` plain steps; plain steps that find no new best within the patience end early
    # and double it; one that raises the residual tenfold above the best ends them for good.
    from deqcli.solvers.anderson import NEVER, PLAIN_RISE

    problem = _tanh(torch.float64)
    method = make_solver("anderson", {"stall": 3, "plain": 10}).implementation()
    state = method.init(problem, problem.z0)
    active = torch.ones(3, dtype=torch.bool)
    state.best = torch.ones(3, dtype=torch.float64)
    flat = torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)  # sample 2 keeps improving

    def guard(res: torch.Tensor) -> None:
        method._safeguard(state, res, active, stalls=True)

    for _ in range(3):
        guard(flat)
        flat = flat * torch.tensor([1.0, 1.0, 0.5], dtype=torch.float64)
    assert state.plain.tolist() == [10, 10, 0] and state.stalls.tolist() == [1, 1, 0]
    assert state.plain_any
    # Sample 0's plain steps find nothing smaller; sample 1's first one rises tenfold.
    guard(torch.tensor([1.0, 1.01 * PLAIN_RISE, 0.01], dtype=torch.float64))
    assert state.plain.tolist() == [9, 0, 0] and state.patience.tolist() == [3, NEVER, 3]
    guard(torch.tensor([1.0, 1.0, 0.01], dtype=torch.float64))
    guard(torch.tensor([1.0, 1.0, 0.01], dtype=torch.float64))
    assert state.plain.tolist() == [0, 0, 0] and state.patience.tolist() == [6, NEVER, 3]
    assert not state.plain_any


def test_anderson_memory_is_m_batch_n_and_capped_at_n() -> None:
    # ΔF and the orthonormal factor Q of ΔG: 2·m·B·n numbers.
    solver = make_solver("anderson", {"m": 4})
    problem = _tanh(torch.float64)
    state = solver.init(problem, problem.z0)
    assert tuple(state.df.shape) == tuple(state.q.shape) == (3, 4, 12)
    wide = make_solver("anderson", {"m": 50}).init(problem, problem.z0)
    assert tuple(wide.df.shape) == tuple(wide.q.shape) == (3, 12, 12)


# -- batches ---------------------------------------------------------------------------------


def _quadratic_batch() -> Problem:
    c = torch.tensor([0.1, -0.5, 1.0], dtype=torch.float64)
    return Problem(
        name="quadratic",
        kind="test",
        form="fixed_point",
        func=lambda z, p: z**2 + p["c"][:, None],
        z0=torch.zeros(3, 1, dtype=torch.float64),
        params={"c": c},
        batched_params=frozenset({"c"}),
    )


@pytest.mark.parametrize("solver", OURS)
def test_one_sample_fails_while_the_others_converge(solver: str) -> None:
    # z = z² + c has the attracting fixed point (1 − √(1 − 4c))/2 for c = 0.1 and c = −0.5, and
    # no real fixed point at all for c = 1.
    result = run(_quadratic_batch(), make_solver(solver), StopRule(atol=1e-12, max_iter=200))
    assert result.sample_status[:2] == [Status.CONVERGED, Status.CONVERGED]
    assert result.sample_status[2] is not Status.CONVERGED
    assert result.status is result.sample_status[2]
    expected = [(1 - math.sqrt(1 - 4 * c)) / 2 for c in (0.1, -0.5)]
    assert result.solution[:2, 0].tolist() == pytest.approx(expected, abs=1e-11)
    doc = result.to_dict(history=False)
    assert doc["converged_samples"] == 2 and doc["converged"] is False
    assert [s["status"] for s in doc["samples"][:2]] == ["converged", "converged"]
    # A sample stops changing once it has stopped: its recorded residual stays put.
    for b in range(2):
        k = result.iterations[b]
        assert {row[b] for row in result.residual_history[k:]} == {result.residual_history[k][b]}


def test_plain_iteration_diverges_on_the_sample_without_a_fixed_point() -> None:
    result = run(_quadratic_batch(), make_solver("fixed_point"), StopRule(atol=1e-12))
    assert result.sample_status[2] is Status.DIVERGED


# -- trust region ----------------------------------------------------------------------------


def test_trust_region_reports_a_collapsed_region_as_stalled() -> None:
    # g(z) = z² + 1 has no real root; ½‖g‖² has its minimum at z = 0, where the model predicts no
    # further decrease and the radius shrinks to nothing.
    problem = scalar_problem("residual", lambda z: z**2 + 1, [1.0], torch.float64)
    result = run(problem, make_solver("trust-region"), StopRule(atol=1e-12, max_iter=200))
    assert result.status is Status.STALLED
    assert result.nit < 200
    assert abs(float(result.solution[0, 0])) < 1e-6


# -- line searches at a nonzero minimum of ‖g‖ ------------------------------------------------


def _no_root() -> Problem:
    # g(z) = (z − 1)² + 0.01 has no root: ‖g‖ has its minimum 0.01 at z = 1.
    return scalar_problem("residual", lambda z: (z - 1) ** 2 + 0.01, [3.0, -2.0], torch.float64)


@pytest.mark.parametrize("solver", ["newton", "newton-krylov"])
def test_a_line_search_method_stops_as_stalled_at_a_nonzero_minimum(solver: str) -> None:
    # Each sample reaches z = 1 to about 1e-9 (closer, g no longer changes in float64); from
    # there no step lowers ½‖g‖², and the same direction would fail the same search at every
    # iteration to come: the sample is stalled there, not run to the budget.
    result = run(_no_root(), make_solver(solver), StopRule(atol=1e-12, max_iter=300))
    assert result.sample_status == [Status.STALLED, Status.STALLED]
    assert max(result.iterations) <= 25
    np.testing.assert_allclose(result.solution[:, 0].numpy(), 1.0, atol=1e-8, rtol=0)
    np.testing.assert_allclose(result.final_residuals(), 0.01, rtol=1e-12)


def test_trust_region_needs_one_jacobian_on_a_linear_map() -> None:
    # The first model is exact, so the Broyden updates never need a fresh Jacobian.
    result = run(_linear(torch.float64), make_solver("trust-region"), StopRule(atol=1e-12))
    assert result.status is Status.CONVERGED
    assert result.counts.totals()["njev"] == 1
    np.testing.assert_allclose(result.solution[0].numpy(), _EXACT, atol=1e-11, rtol=0)


# -- Newton–Krylov and Broyden ---------------------------------------------------------------


def test_newton_krylov_uses_jvps_and_never_a_dense_jacobian() -> None:
    result = run(_chandrasekhar(torch.float64), make_solver("newton-krylov"), StopRule(atol=1e-12))
    totals = result.counts.totals()
    assert result.status is Status.CONVERGED
    assert totals["njev"] == 0 and totals["jvp"] > 0
    # Superlinear: Eisenstat–Walker forcing reaches 1e-12 in a handful of Newton steps.
    assert result.nit <= 8


def test_newton_krylov_solves_a_linear_map_in_one_exact_step() -> None:
    solver = make_solver("newton-krylov", {"forcing": "constant", "eta": 1e-13})
    result = run(_linear(torch.float64), solver, StopRule(atol=1e-11))
    assert result.nit == 1
    np.testing.assert_allclose(result.solution[1].numpy(), _EXACT, atol=1e-11, rtol=0)


KRYLOV_TR = {"globalisation": "trust-region"}


def test_krylov_trust_region_takes_the_full_newton_step_on_a_linear_map() -> None:
    # Δ₀ = 100·max(‖z₀‖, 1) holds the Newton step of both starts, and with η = 1e-13 GMRES solves
    # the 5 × 5 system to rounding: one step lands on the exact solution. The step lies inside
    # the region, so no Cauchy point is needed: JVPs only (GMRES and J p_N), no VJP, no Jacobian.
    problem = _linear(torch.float64)
    solver = make_solver("newton-krylov", {**KRYLOV_TR, "forcing": "constant", "eta": 1e-13})
    result = run(problem, solver, StopRule(atol=1e-11))
    assert result.status is Status.CONVERGED and result.nit == 1
    exact = torch.linalg.solve(
        torch.eye(5, dtype=torch.float64) - problem.params["A"], problem.params["c"]
    )
    for row in result.solution:
        torch.testing.assert_close(row, exact, rtol=0, atol=1e-10)
    totals = result.counts.totals()
    assert totals["njev"] == totals["vjp"] == 0 and totals["jvp"] > 0
    assert result.extra["trust_region"]["linearisations"] == [1, 1]


def test_krylov_trust_region_with_ew_forcing_solves_a_linear_map() -> None:
    result = run(_linear(torch.float64), make_solver("newton-krylov", KRYLOV_TR), StopRule())
    assert result.status is Status.CONVERGED and result.counts.totals()["njev"] == 0
    _check_linear(_linear(torch.float64), result, 1e-10)


def test_krylov_trust_region_cuts_the_first_step_to_the_radius() -> None:
    # factor 0.05: Δ₀ = 0.05 (z₀ = 0) and 0.05·√5 (z₀ = 1), both shorter than the Newton step to
    # the solution, so the first step is the dogleg step on the boundary: of length exactly Δ₀.
    # It needs the gradient Jᵀg (one VJP per sample) for the Cauchy point.
    problem = _linear(torch.float64)
    solver = make_solver("newton-krylov", {**KRYLOV_TR, "factor": 0.05})
    result = run(problem, solver, StopRule(atol=1e-12))
    assert result.status is Status.CONVERGED
    assert result.step_history[0] == pytest.approx([0.05, 0.05 * math.sqrt(5)], rel=1e-12)
    assert all(n >= 1 for n in result.counts.vjp) and result.counts.totals()["njev"] == 0
    _check_linear(problem, result, 1e-12)


def test_krylov_trust_region_follows_a_scalar_linear_map_along_its_radius() -> None:
    # g(z) = 3z − 6 from z₀ = 10 with factor 0.1: Δ₀ = 1 and the Newton step is −8. In one
    # dimension the Cauchy point is the Newton point, so each step goes to the boundary; the
    # model is exact (ratio 1), so hybrj's rule sets Δ = 2‖p‖: steps 1, 2, 4, then the last 1.
    problem = scalar_problem("residual", lambda z: 3 * z - 6, [10.0], torch.float64)
    result = run(problem, make_solver("newton-krylov", {**KRYLOV_TR, "factor": 0.1}), StopRule())
    assert result.status is Status.CONVERGED and result.nit == 4
    assert [row[0] for row in result.step_history] == pytest.approx([1, 2, 4, 1], rel=1e-12)
    assert float(result.solution[0, 0]) == pytest.approx(2.0, abs=1e-12)


def test_krylov_trust_region_reports_a_collapsed_region_as_stalled() -> None:
    # g(z) = z² + 1 has no real root (see the dense trust region's test): the sample stalls at
    # the minimum of ½‖g‖², z = 0, with every iterate finite.
    problem = scalar_problem("residual", lambda z: z**2 + 1, [1.0], torch.float64)
    result = run(problem, make_solver("newton-krylov", KRYLOV_TR), StopRule(max_iter=200))
    assert result.status is Status.STALLED and result.nit < 200
    assert abs(float(result.solution[0, 0])) < 1e-6
    assert result.extra["trust_region"]["stopped"][0] is not None
    assert any(note.startswith("trust-region stopped sample(s) 0") for note in result.notes)


def test_broyden_needs_no_derivatives_and_respects_its_memory() -> None:
    solver = make_solver("broyden", {"memory": 3})
    problem = _chandrasekhar(torch.float64)
    result = run(problem, solver, StopRule(atol=1e-10, max_iter=200))
    totals = result.counts.totals()
    assert result.status is Status.CONVERGED
    assert totals["njev"] == totals["jvp"] == totals["vjp"] == 0
    solver.init(problem, problem.z0)
    # The inverse model's rank-one terms a, b: two rows of memory·n per sample.
    model = solver.implementation().direction.model
    assert tuple(model.terms.shape) == (1, 2, 3, 100)


# -- auto ------------------------------------------------------------------------------------


def test_auto_falls_back_where_plain_iteration_diverges() -> None:
    # The map f(z) = z − (z³ − 8) from z = 3 jumps to −16 and blows up; auto's first step (plain
    # iteration's trial) grows the residual 216-fold, so it switches to Newton, past anderson
    # (whose first step is that same plain step).
    problem = scalar_problem("fixed_point", lambda z: z - (z**3 - 8), [3.0], torch.float64)
    naive = run(problem, make_solver("fixed_point"), StopRule(atol=1e-12, max_iter=100))
    assert naive.status in (Status.DIVERGED, Status.NONFINITE)
    result = run(problem, make_solver("auto"), StopRule(atol=1e-12, max_iter=100))
    assert result.status is Status.CONVERGED
    assert float(result.solution[0, 0]) == pytest.approx(2.0, abs=1e-12)
    info = result.extra["auto"]
    assert info["methods"] == ["fixed_point", "newton"]
    assert info["switches"] == [1] and info["reasons"] == ["residual growth"]
    assert result.to_dict(history=False)["auto"]["methods"] == ["fixed_point", "newton"]
    assert any("switched to newton" in note for note in result.notes)


def test_auto_keeps_anderson_when_it_works() -> None:
    # cos(z): plain iteration contracts at |f'(z*)| = sin(0.739…) = 0.6736 per step, which after
    # the 8-step trial predicts about 60 more; anderson takes over from z0 and finishes alone.
    result = run(_dottie(torch.float64), make_solver("auto"), StopRule(atol=1e-12))
    assert result.status is Status.CONVERGED
    info = result.extra["auto"]
    assert info["methods"] == ["fixed_point", "anderson"] and info["switches"] == [8]
    assert info["probe"]["trial"]["rate"] == pytest.approx(math.sin(DOTTIE), abs=5e-3)
    assert info["probe"]["trial"]["iterations"] > 32
    assert info["reasons"][0].startswith("plain iteration's rate 0.67")
    assert max(result.iterations) <= 8 + 15


def test_auto_keeps_plain_iteration_where_it_is_fast() -> None:
    # z = 0.1·cos(z) + 1: plain iteration contracts by 0.1·|sin z*| < 0.09 per step, so after the
    # 8-step trial (‖g‖ already near 1e-9) a few more steps finish: anderson is never started.
    problem = scalar_problem("fixed_point", lambda z: 0.1 * torch.cos(z) + 1, [0.0], torch.float64)
    result = run(problem, make_solver("auto"), StopRule(atol=1e-12))
    assert result.status is Status.CONVERGED
    info = result.extra["auto"]
    assert info["methods"] == ["fixed_point"] and info["switches"] == []
    assert info["probe"]["trial"]["choice"] == "fixed_point"
    z = float(result.solution[0, 0])
    assert z == pytest.approx(0.1 * math.cos(z) + 1, abs=1e-12)
    assert info["probe"]["trial"]["rate"] == pytest.approx(0.1 * math.sin(z), rel=0.05)
    assert result.notes[0] == "fixed_point sufficed"


def _linear_layer(a: torch.Tensor, batch: int, seed: int) -> tuple[Problem, torch.Tensor]:
    """z = A z + b per sample, and its exact solution (I − A)⁻¹ b."""
    n = a.shape[0]
    b = torch.randn(batch, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    problem = Problem(
        name="linear",
        kind="test",
        form="fixed_point",
        func=lambda z, p: z @ p["A"].T + p["b"],
        z0=torch.zeros(batch, n, dtype=torch.float64),
        params={"A": a, "b": b},
        batched_params=frozenset({"b"}),
    )
    exact = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - a, b.T).T
    return problem, exact


def _haar(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def test_auto_probe_sends_a_near_isometry_to_newton() -> None:
    # A = 0.999·Q: every mode contracts by 0.999 per plain step (about 20,000 steps to 1e-10) and
    # Anderson gains little; one Newton step is exact. The probe sees it after 30 iterations.
    problem, exact = _linear_layer(0.999 * _haar(40, 1), 2, 2)
    result = run(problem, make_solver("auto"), StopRule(atol=1e-10, max_iter=200))
    assert result.status is Status.CONVERGED
    torch.testing.assert_close(result.solution, exact, rtol=0, atol=1e-9)
    info = result.extra["auto"]
    # The trial first: an isometry times 0.999 shrinks ‖g‖ by exactly 0.999 per plain step.
    assert info["probe"]["trial"]["rate"] == pytest.approx(0.999, rel=1e-9)
    assert info["methods"] == ["fixed_point", "anderson", "newton"]
    assert info["switches"] == [8, 38]
    # Newton costs less than plain iteration would even at Anderson's rate (which plain
    # iteration never beats): ρ(J_f) could not change the choice and is not probed.
    assert info["reasons"][1].startswith("spectral probe: ρ(J_f) not needed")
    probe = info["probe"]
    assert probe["choice"] == "newton" and probe["ritz_rho"] is None
    assert "fixed_point" not in probe["costs"]
    k_anderson = probe["anderson_iterations"]
    assert probe["fixed_point_at_least"] == pytest.approx(1.6 * k_anderson, abs=1)
    assert probe["costs"]["newton"] < probe["fixed_point_at_least"] < probe["costs"]["anderson"]
    assert max(result.iterations) <= 8 + 33
    assert max(result.counts.jvp) == 0  # no Arnoldi steps were needed


def test_auto_probe_prefers_plain_iteration_where_anderson_gains_nothing() -> None:
    # Beyond dense_max there is no dense Newton; on A = 0.99·Q Anderson's rate is plain
    # iteration's (the spectrum surrounds 1), at twice the work per step: plain iteration.
    problem, exact = _linear_layer(0.99 * _haar(40, 3), 2, 4)
    solver = make_solver("auto", {"dense_max": 10})
    result = run(problem, solver, StopRule(atol=1e-10, max_iter=5000))
    assert result.status is Status.CONVERGED
    torch.testing.assert_close(result.solution, exact, rtol=0, atol=1e-9)
    info = result.extra["auto"]
    assert info["probe"]["trial"]["rate"] == pytest.approx(0.99, rel=1e-9)
    assert info["methods"] == ["fixed_point", "anderson", "fixed_point"]
    assert info["probe"]["choice"] == "fixed_point"
    # Plain iteration at rate 0.99: log(1e-10 / ‖g‖)/log(0.99) steps after the switch, no more.
    res = max(result.residual_history[38])
    bound = 38 + math.ceil(math.log(1e-10 / res) / math.log(0.99)) + 5
    assert max(result.iterations) <= bound


def _symmetric_linear_layer() -> tuple[Problem, torch.Tensor]:
    # Symmetric A with eigenvalues in [−0.5, 0.995]: plain iteration needs thousands of steps,
    # Anderson and GMRES (Krylov methods on a real interval) a few hundred at most.
    q = _haar(60, 5)
    a = (q * torch.linspace(-0.5, 0.995, 60, dtype=torch.float64)) @ q.T
    return _linear_layer(a, 2, 6)


def test_auto_probe_keeps_anderson_on_a_real_spectrum() -> None:
    # Without a Newton–Krylov stage in the list, the probe weighs Anderson against plain
    # iteration only, and keeps it.
    problem, exact = _symmetric_linear_layer()
    solver = make_solver("auto", {"dense_max": 10, "stages": "anderson,ptc"})
    result = run(problem, solver, StopRule(atol=1e-10))
    assert result.status is Status.CONVERGED
    torch.testing.assert_close(result.solution, exact, rtol=0, atol=1e-8)
    info = result.extra["auto"]
    assert info["methods"] == ["anderson"] and info["probe"]["choice"] == "anderson"
    assert info["probe"]["costs"]["anderson"] < info["probe"]["costs"]["fixed_point"]
    # Ritz values of a symmetric matrix lie inside its spectrum: ρ is estimated from below.
    assert 0.95 < info["probe"]["ritz_rho"] <= 0.995 + 1e-12
    off = run(problem, make_solver("auto", {"dense_max": 10, "probe": False}), StopRule(atol=1e-10))
    assert "probe" not in off.extra["auto"] and max(off.counts.jvp) == 0


def test_krylov_probe_reads_gmres_residual_from_the_arnoldi_steps() -> None:
    # The probe's estimate of GMRES on (I − A) d = −g after 12 steps is GMRES's own residual:
    # exact arithmetic gives the same minimiser over the same Krylov space.
    from deqcli.linalg import DenseOperator, gmres
    from deqcli.solvers.auto import PROBE_STEPS, _jacobian_f, _krylov_residual

    problem, _ = _symmetric_linear_layer()
    z = torch.zeros_like(problem.z0)
    g = problem.g(z)
    running = torch.ones(g.shape[0], dtype=torch.bool)
    estimate = _krylov_residual(_jacobian_f(problem, z, running), g, running)
    a = problem.params["A"]
    system = DenseOperator((torch.eye(60, dtype=torch.float64) - a).expand(2, 60, 60))
    reached = gmres(system, -g, rtol=1e-300, restart=PROBE_STEPS, max_matvecs=PROBE_STEPS + 1)
    assert int(reached.iterations.max()) == PROBE_STEPS
    torch.testing.assert_close(estimate, reached.residual, rtol=1e-8, atol=0)
    assert bool((estimate < 1).all())


def test_krylov_probe_reads_the_preconditioned_gmres_residual_from_the_arnoldi_steps() -> None:
    # With the shared preconditioner the probe's Arnoldi steps run on (I − J_f) M⁻¹, and its
    # estimate is right-preconditioned GMRES's own residual after 12 steps.
    from deqcli.linalg import gmres, jacobian_operator
    from deqcli.linalg.krylov import FUSED_MARGIN
    from deqcli.solvers.auto import (
        PROBE_STEPS,
        PROBE_TOLERANCE,
        _jacobian_f,
        _krylov_residual,
        _shared_preconditioner,
    )

    problem = _nonnormal_layer(64, 3, 2)  # rows' scales far apart: M is not exact
    z = 0.3 * torch.randn(3, 64, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    g = problem.g(z)
    running = torch.ones(3, dtype=torch.bool)
    op = _jacobian_f(problem, z, running)
    shared = _shared_preconditioner(problem, op, running)
    assert shared is not None
    # M⁻¹ alone (a plain callable: no products of its own), so every step takes a JVP.
    estimate = _krylov_residual(op, g, running, lambda v: shared(v))
    system = jacobian_operator(problem, z, counted=False)
    reached = gmres(
        system, -g, rtol=1e-300, restart=PROBE_STEPS, max_matvecs=PROBE_STEPS + 1, precond=shared
    )
    assert int(reached.iterations.max()) == PROBE_STEPS
    torch.testing.assert_close(estimate, reached.residual, rtol=1e-6, atol=0)
    assert bool((estimate < 1).all())
    # With the shared linearisation itself, its solves give 11 of the 12 products (the first is
    # a JVP that vouches for them to PROBE_TOLERANCE / FUSED_MARGIN), and the residual read off
    # the steps is GMRES's to within that.
    jvps = sum(problem.counter.jvp)
    fused = _krylov_residual(op, g, running, shared)
    assert sum(problem.counter.jvp) - jvps == 3  # one batched product, for each of the 3 rows
    assert float((fused - reached.residual).abs().max()) <= PROBE_TOLERANCE / FUSED_MARGIN


def test_auto_probe_sends_a_real_spectrum_to_newton_krylov_beyond_dense_max() -> None:
    # The same linear layer with the matrix-free list: GMRES on I − A (one Newton step solves a
    # linear problem) needs fewer products than Anderson's iterations, and the probe's 12
    # Arnoldi steps from g measure its rate.
    problem, exact = _symmetric_linear_layer()
    result = run(problem, make_solver("auto", {"dense_max": 10}), StopRule(atol=1e-10))
    assert result.status is Status.CONVERGED
    # ‖g‖ ≤ 1e-10 puts z within ‖g‖/σ_min(I − A) = ‖g‖/0.005 of the solution: the last Newton
    # system is solved only as far as the tolerance asks (Kelley's floor on the forcing term).
    reached = max(result.residual_history[-1])
    assert reached <= 1e-10
    error = float((result.solution - exact).abs().max())
    assert error <= reached / 0.005
    info = result.extra["auto"]
    assert info["methods"] == ["fixed_point", "anderson", "newton-krylov"]
    probe = info["probe"]
    assert probe["choice"] == "newton-krylov"
    assert (
        probe["costs"]["newton-krylov"] < probe["costs"]["anderson"] < probe["costs"]["fixed_point"]
    )
    # The estimate does not promise fewer GMRES steps than the solve took: the products after
    # the probe's two Arnoldi runs (12 JVPs each) are within the estimate.
    gmres_steps = max(result.counts.jvp) - 24
    assert 0 < gmres_steps <= probe["krylov_steps"]
    alone = run(problem, make_solver("anderson"), StopRule(atol=1e-10))
    assert max(result.counts.nfev) + max(result.counts.jvp) < max(alone.counts.nfev) / 2


def _nonnormal_layer(n: int, batch: int, seed: int, coupling: float = 2.0) -> Problem:
    """z = tanh(W z + x) with W = Q T Qᵀ, T upper triangular: eigenvalues −0.5 … 0.995 on its
    diagonal, strictly upper entries N(0, coupling²/n), so ‖W‖₂ ≈ 3 ≫ 1 > ρ(W) at coupling 2;
    inputs of scale 1."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    upper = torch.triu(torch.randn(n, n, generator=gen, dtype=torch.float64), diagonal=1)
    tri = (
        torch.diag(torch.linspace(-0.5, 0.995, n, dtype=torch.float64)) + coupling / n**0.5 * upper
    )
    x = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    return _tanh_layer("non-normal", q @ tri @ q.T, x)


def _tanh_layer(name: str, w: torch.Tensor, x: torch.Tensor) -> Problem:
    """z = tanh(W z + x) from z = 0, with its Jacobian in closed form (as kind: tanh_layer)."""
    return Problem(
        name=name,
        kind="tanh_layer",
        form="fixed_point",
        func=tanh_layer_map,
        z0=torch.zeros_like(x),
        params={"W": w, "x": x},
        batched_params=frozenset({"x"}),
        row_scaled_jacobian=tanh_layer_jacobian,
    )


def _autodiff_nonnormal_layer() -> Problem:
    """The non-normal layer with autodiff Jacobians: Anderson counts as ANDERSON_COST evaluations
    of f per iteration there (the closed form's small-layer surcharge does not apply)."""
    return dataclasses.replace(_nonnormal_layer(512, 8, 0), row_scaled_jacobian=None)


def test_auto_tries_plain_iteration_where_anderson_stalls_on_a_contracting_map() -> None:
    # Anderson stands still on this strongly non-normal layer (its probe at 30 iterations kept
    # it); ρ(J_f) < 1 at its best iterates, so plain iteration converges, and far more cheaply
    # than Newton started there: the probe after the stall puts it next, no Jacobian is formed.
    problem = _autodiff_nonnormal_layer()
    result = run(problem, make_solver("auto"), StopRule(atol=1e-8, max_iter=5000))
    assert result.status is Status.CONVERGED
    z = result.solution
    assert float(torch.linalg.vector_norm(z - problem.f(z), dim=1).max()) <= 1e-8
    info = result.extra["auto"]
    assert info["methods"] == ["fixed_point", "anderson", "fixed_point"]
    assert info["probe"]["choice"] == "anderson"
    assert info["reasons"][1].startswith("no progress; spectral probe: ρ(J_f) ≈ ")
    after = info["probe"]["after_stall"]
    assert after["choice"] == "fixed_point" and after["ritz_rho"] < 1
    assert 1.6 * after["fixed_point_iterations"] <= after["newton_cost"]
    assert max(result.counts.njev) == 0


def test_auto_keeps_to_its_list_when_plain_iteration_would_not_fit_the_budget() -> None:
    # The same stall with 400 iterations in all: anderson fits at the probe, but after its stall
    # plain iteration would need more than are left, so the list goes on to newton.
    problem = _autodiff_nonnormal_layer()
    result = run(problem, make_solver("auto"), StopRule(atol=1e-8, max_iter=400))
    info = result.extra["auto"]
    assert info["methods"][:3] == ["fixed_point", "anderson", "newton"]
    assert info["reasons"][1] == "no progress"
    assert info["probe"]["after_stall"]["choice"] == "next preset"
    assert result.status is Status.CONVERGED


def test_auto_probe_counts_anderson_s_own_work_on_a_small_closed_form_layer() -> None:
    # With the tanh layer's Jacobian in closed form, f is B·n² multiply-adds, and at n = 512 an
    # Anderson iteration's own work is about two more evaluations (1 + 1000/n in all): the probe
    # at 30 iterations already prefers plain iteration, before Anderson stalls.
    from deqcli.solvers.auto import _anderson_cost

    problem = _nonnormal_layer(512, 8, 0)
    assert _anderson_cost(problem) == pytest.approx(1 + 1000 / 512)
    assert _anderson_cost(_autodiff_nonnormal_layer()) == 2.0
    result = run(problem, make_solver("auto"), StopRule(atol=1e-8, max_iter=5000))
    assert result.status is Status.CONVERGED
    info = result.extra["auto"]
    assert info["methods"] == ["fixed_point", "anderson", "fixed_point"]
    assert info["switches"] == [8, 38]
    costs = info["probe"]["costs"]
    assert costs["fixed_point"] < costs["anderson"] < costs["newton"]
    assert max(result.counts.njev) == 0


def test_auto_probes_a_small_closed_form_layer_by_anderson_s_work_not_its_iterations() -> None:
    # configs/hard_sym.yaml (n = 32): Anderson predicts 69 more iterations, under the 100 that
    # let it finish unprobed, but at n = 32 each costs 1 + 1000/32 evaluations of f (its own
    # tensor work dwarfs f's): 2225 evaluations, beyond the 200 that 100 iterations at 2 mean.
    # The probe runs and dense Newton (the preconditioned Newton–Krylov is not twice cheaper)
    # finishes in a few steps.
    from deqcli.solvers.auto import ANDERSON_COST, PROBE_LONG, _anderson_cost

    problem = load_problem(CONFIGS / "hard_sym.yaml")
    result = run(problem, make_solver("auto"), StopRule(atol=1e-8, max_iter=3000))
    assert result.status is Status.CONVERGED
    info = result.extra["auto"]
    probe = info["probe"]
    assert probe["anderson_iterations"] <= PROBE_LONG
    assert _anderson_cost(problem) == pytest.approx(1 + 1000 / 32)
    assert probe["anderson_iterations"] * _anderson_cost(problem) > PROBE_LONG * ANDERSON_COST
    assert info["methods"] == ["fixed_point", "anderson", "newton"]
    assert probe["passed_over"] == "newton-krylov: not 2 times cheaper"
    assert max(result.iterations) <= 45


def test_auto_probe_skips_methods_that_would_not_finish_in_the_iterations_left() -> None:
    # 200 iterations in all: at the probe (iteration 38) plain iteration and anderson are
    # predicted to need more than the 162 left, so a Newton method goes next although it costs
    # more.
    problem = _nonnormal_layer(512, 8, 0)
    result = run(problem, make_solver("auto"), StopRule(atol=1e-8, max_iter=200))
    assert result.status is Status.CONVERGED
    info = result.extra["auto"]
    assert info["methods"] == ["fixed_point", "anderson", "newton-krylov"]
    assert info["switches"] == [8, 38]
    assert info["reasons"][1].endswith(
        "; anderson, fixed_point would not finish in the 162 iterations left"
    )
    probe = info["probe"]
    # Plain iteration would not finish even at Anderson's rate: ρ(J_f) is not probed. (The
    # Krylov probe's own products are counted in the test of its preconditioned residual.)
    assert probe["ritz_rho"] is None
    assert probe["costs"]["newton"] > probe["fixed_point_at_least"]
    assert 1.6 * probe["anderson_iterations"] > probe["iterations_left"] == 162
    # The preconditioned Newton–Krylov (the layer's Jacobian is diag(s)·W with one W) is weighed
    # too, is the cheapest that fits, and by the margin that puts it ahead of the list: its
    # GMRES steps cost what unpreconditioned ones do (the solves give their products), 893
    # evaluations against dense Newton's 1792, and it finishes within the budget.
    assert probe["preconditioner"] == "shared"
    assert probe["costs"]["newton-krylov"] <= probe["costs"]["newton"] / 2
    assert probe["choice"] == "newton-krylov" and "passed_over" not in probe


def test_auto_ends_with_ptc_where_nothing_can_succeed() -> None:
    # g(z) = z² + 1 has no real root: every local method stops at the minimum z = 0 of |g|, and
    # Ψtc, the last resort, cannot find a root either. A residual problem skips anderson.
    problem = scalar_problem("residual", lambda z: z**2 + 1, [1.0], torch.float64)
    result = run(problem, make_solver("auto"), StopRule(atol=1e-12, max_iter=300))
    assert not result.status.ok
    info = result.extra["auto"]
    assert info["methods"][0] == "newton" and info["methods"][-1] == "ptc"
    assert {"trust-region", "levenberg-marquardt"} <= set(info["methods"])
    assert len(info["reasons"]) == len(info["methods"]) - 1


def _row_scaled_linear_layer(
    a: torch.Tensor, batch: int, seed: int
) -> tuple[Problem, torch.Tensor]:
    """The linear layer z = A z + b given with its Jacobian in the row-scaled form diag(1)·A (the
    form of the tanh layer's), and its exact solution."""
    problem, exact = _linear_layer(a, batch, seed)

    def jacobian(z: torch.Tensor, p: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return z @ p["A"].T + p["b"], torch.ones_like(z), p["A"]

    return dataclasses.replace(problem, row_scaled_jacobian=jacobian), exact


def test_the_shared_preconditioner_makes_a_row_scaled_linear_system_one_gmres_step() -> None:
    # Every row's scales are 1, so M = I − A is each row's Newton matrix, factored in float32:
    # A M̃⁻¹ = I + E with ‖E‖ about κ(M)·ε₃₂ ≈ 2000 · 6e-8. GMRES then takes one step per Newton
    # step, and each Newton step cuts ‖g‖ by about ‖E‖: from 8.7 to below 1e-11 in two.
    # Unpreconditioned, GMRES on I − A with A = 0.999·Q (eigenvalues on a ring of radius 0.999
    # around 1) needs a step per dimension: its cap of 40 per Newton step, many Newton steps over.
    problem, exact = _row_scaled_linear_layer(0.999 * _haar(60, 7), 3, 8)
    stop = StopRule(atol=1e-11, max_iter=50)
    result = run(problem, make_solver("newton-krylov"), stop)
    assert result.status is Status.CONVERGED and result.nit == 2
    assert max(result.counts.jvp) == 2
    first, second = (max(row) for row in result.residual_history[:2])
    assert second <= 2000 * 6e-8 * first
    torch.testing.assert_close(result.solution, exact, rtol=0, atol=1e-10)
    # One GMRES step per solve: its product is the JVP that checks the solve's own products,
    # so none of them is used.
    assert result.extra["preconditioner"] == {
        "kind": "shared",
        "factorisations": 1,
        "products_from_solves": 0,
    }
    plain = run(problem, make_solver("newton-krylov", {"precondition": "none"}), stop)
    assert max(plain.counts.jvp) >= 40 and "preconditioner" not in plain.extra


def _near_isometric_tanh_layer(n: int, batch: int, seed: int) -> Problem:
    """z = tanh(0.999·Q z + x), inputs of scale 0.01: tanh′ ≈ 1, so the layer is about as slow as
    its linear part (plain iteration contracts by 0.999 per step)."""
    gen = torch.Generator().manual_seed(seed)
    x = 0.01 * torch.randn(batch, n, generator=gen, dtype=torch.float64)
    return _tanh_layer("near-isometry", 0.999 * _haar(n, seed), x)


def test_newton_krylov_with_the_shared_preconditioner_on_a_near_isometric_tanh_layer() -> None:
    problem = _near_isometric_tanh_layer(128, 4, 9)
    stop = StopRule(atol=1e-10, max_iter=500)
    pre = run(problem, make_solver("newton-krylov"), stop)
    plain = run(problem, make_solver("newton-krylov", {"precondition": "none"}), stop)
    assert pre.status is Status.CONVERGED and plain.status is Status.CONVERGED
    # The same fixed point: each is within ‖g‖/σ_min(I − J) ≤ 1e-10/(1 − 0.999) of it.
    torch.testing.assert_close(pre.solution, plain.solution, rtol=0, atol=2e-7)
    # The rows' scales differ (tanh′ = 1 − f², f ≠ 0), so M is not exact, but close.
    assert 5 * max(pre.counts.jvp) < max(plain.counts.jvp)
    assert 1 <= pre.extra["preconditioner"]["factorisations"] <= pre.nit
    # Where a solve's tolerance is within what the float32 solves vouch for, its products after
    # the first came from M's solves instead of JVPs (the last, tight solves of atol 1e-10 take
    # JVPs throughout).
    assert pre.extra["preconditioner"]["products_from_solves"] > 0


def test_the_forcing_term_never_asks_for_more_than_the_tolerance() -> None:
    # Eisenstat–Walker's η = 0.9(‖g_new‖/‖g‖)² after a fast step: from 1e-4 to 6e-8 it asks
    # for 3.2e-7, but a linear residual of 0.5·atol already ends the run: η ≥ 0.5·atol/‖g_new‖
    # (Kelley's guard), capped at eta_max.
    from deqcli.solvers.directions import OVERSOLVE, KrylovDirection

    direction = KrylovDirection(40, "ew", 0.5, 0.9)
    direction.eta = torch.full((3,), 0.01, dtype=torch.float64)
    g = torch.zeros(3, 4, dtype=torch.float64)
    g[:, 0] = 1e-4
    g_new = torch.zeros(3, 4, dtype=torch.float64)
    g_new[:, 0] = torch.tensor([6e-8, 1e-9, 5e-5], dtype=torch.float64)
    ew = 0.9 * (g_new[:, 0] / 1e-4).square()
    torch.testing.assert_close(direction._next_eta(g, g_new)[0], ew, rtol=1e-12, atol=0)
    direction.atol = 1e-8
    assert OVERSOLVE == 0.5
    expected = torch.tensor([0.5 * 1e-8 / 6e-8, 0.9, float(ew[2])], dtype=torch.float64)
    eta, floored = direction._next_eta(g, g_new)
    torch.testing.assert_close(eta, expected, rtol=1e-12, atol=0)
    assert floored.tolist() == [True, True, False]


def test_newton_krylov_stops_solving_at_the_run_s_tolerance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The run's atol reaches the direction through setup: the last Newton system is solved
    # only as far as the tolerance needs, in fewer products, with the same Newton steps.
    import deqcli.solvers.directions as directions

    stop = StopRule(atol=1e-10, max_iter=500)
    guarded = run(_near_isometric_tanh_layer(128, 4, 9), make_solver("newton-krylov"), stop)
    monkeypatch.setattr(directions, "OVERSOLVE", 0.0)
    unguarded = run(_near_isometric_tanh_layer(128, 4, 9), make_solver("newton-krylov"), stop)
    assert guarded.status is Status.CONVERGED and unguarded.status is Status.CONVERGED
    assert guarded.nit == unguarded.nit
    assert max(guarded.counts.jvp) < max(unguarded.counts.jvp)
    assert max(guarded.residual_history[-1]) <= 1e-10


def test_the_run_s_last_solve_keeps_the_shared_factorisation() -> None:
    # A mean scale moved by 0.05 (beyond the 0.02 that refactors M) is factored again, unless
    # the tolerance's floor set every running sample's forcing term: that solve is expected to
    # end the run, and a stale M costs it a GMRES step or two, not an LU.
    from deqcli.linalg.operators import RowScaledJacobian
    from deqcli.solvers.directions import KrylovDirection

    gen = torch.Generator().manual_seed(3)
    n, batch = 16, 3
    weight = 0.9 * _haar(n, 3)
    scale = 0.5 + 0.1 * torch.rand(batch, n, generator=gen, dtype=torch.float64)
    value = torch.zeros(batch, n, dtype=torch.float64)
    running = torch.tensor([True, True, False])
    direction = KrylovDirection(40, "ew", 0.5, 0.9, "shared")
    first = direction._preconditioner(
        RowScaledJacobian(value, scale, weight, residual=True), running
    )
    assert first is not None and direction.factorisations == 1
    moved = RowScaledJacobian(value, scale + 0.05, weight, residual=True)
    direction.last = torch.tensor([True, True, False])  # the stopped sample's flag is not read
    assert direction._preconditioner(moved, running) is first
    assert direction.factorisations == 1
    direction.last = torch.tensor([True, False, False])
    again = direction._preconditioner(moved, running)
    assert again is not first and direction.factorisations == 2


def test_the_shared_preconditioner_needs_a_row_scaled_jacobian() -> None:
    problem, _ = _linear_layer(0.5 * _haar(5, 1), 2, 1)  # no row-scaled form given
    solver = make_solver("newton-krylov", {"precondition": "shared"})
    with pytest.raises(UsageError, match=r"solver\.precondition: 'shared' needs a map whose"):
        run(problem, solver, StopRule(atol=1e-10))
    # auto leaves such problems unpreconditioned.
    result = run(problem, make_solver("newton-krylov"), StopRule(atol=1e-10))
    assert result.status is Status.CONVERGED and "preconditioner" not in result.extra


def test_auto_probe_puts_the_preconditioned_newton_krylov_ahead_of_dense_newton() -> None:
    # n = 128 is within dense_max, whose list holds no Newton–Krylov; the preconditioned one is
    # weighed all the same, estimated far cheaper than dense Newton and plain iteration, and
    # inserted after anderson. The probe's LU is handed over: no second factorisation at once.
    problem = _near_isometric_tanh_layer(128, 4, 9)
    stop = StopRule(atol=1e-10, max_iter=500)
    result = run(problem, make_solver("auto"), stop)
    assert result.status is Status.CONVERGED
    info = result.extra["auto"]
    assert info["methods"] == ["fixed_point", "anderson", "newton-krylov"]
    probe = info["probe"]
    assert probe["choice"] == "newton-krylov" and probe["preconditioner"] == "shared"
    others = [cost for name, cost in probe["costs"].items() if name != "newton-krylov"]
    assert 2 * probe["costs"]["newton-krylov"] <= min(others)
    assert max(result.counts.njev) == 0
    z = result.solution
    assert float(torch.linalg.vector_norm(z - problem.f(z), dim=1).max()) <= 1e-10
    # A list given by the user is kept to.
    listed = run(problem, make_solver("auto", {"stages": "anderson,newton"}), stop)
    assert "newton-krylov" not in listed.extra["auto"]["methods"]
    assert "preconditioner" not in listed.extra["auto"].get("probe", {})


def test_auto_uses_newton_krylov_beyond_dense_max() -> None:
    solver = make_solver("auto", {"dense_max": 10})
    assert solver.stage_names(_tanh(torch.float64)) == ["anderson", "newton-krylov", "ptc"]
    assert solver.stage_names(_dottie(torch.float64)) == [
        "anderson",
        "newton",
        "trust-region",
        "levenberg-marquardt",
        "ptc",
    ]
    assert solver.stage_names(_sqrt2(torch.float64))[0] == "newton"


# -- options ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("solver", "options", "message"),
    [
        ("anderson", {"m": 0}, "solver.m: must be ≥ 1"),
        (
            "newton-krylov",
            {"precondition": "lu"},
            "solver.precondition: must be one of auto, shared, none, got 'lu'",
        ),
        ("anderson", {"beta": 3}, "solver.beta: must lie in (0, 2]"),
        ("broyden", {"memory": 0}, "solver.memory: must be ≥ 1"),
        ("newton-krylov", {"eta": 1.5}, "solver.eta: must lie in (0, 1)"),
        ("newton-krylov", {"forcing": "fixed"}, "solver.forcing: must be one of ew, constant"),
        ("trust-region", {"factor": -1}, "solver.factor: must be > 0"),
        ("trust-region", {"scaling": "columns"}, "solver.scaling: must be one of jacobian, none"),
        ("broyden", {"update": "worse"}, "solver.update: must be one of auto, good, bad"),
        (
            "broyden",
            {"globalisation": "levenberg-marquardt"},
            "solver.globalisation: solver 'broyden' supports line-search, trust-region, none",
        ),
        (
            "newton-krylov",
            {"globalisation": "levenberg-marquardt"},
            "solver.globalisation: solver 'newton-krylov' supports line-search, trust-region, none",
        ),
        ("newton-krylov", {"factor": 0}, "solver.factor: must be > 0"),
        ("newton", {"step_max": 0}, "solver.step_max: must be > 0"),
        ("levenberg-marquardt", {"damping": 0}, "solver.damping: must be > 0"),
        ("ptc", {"dt0": -1}, "solver.dt0: must be > 0"),
        ("ptc", {"dt0": 1.0, "dt_max": 0.5}, "solver.dt_max: must be ≥ dt0"),
        ("auto", {"stages": "newton,bisection"}, "solver.stages: unknown preset 'bisection'"),
        ("auto", {"progress": 2}, "solver.progress: must lie in (0, 1)"),
        ("anderson", {"depth": 3}, "solver.depth: unknown option for solver 'anderson'"),
    ],
)
def test_bad_options_name_the_key(solver: str, options: dict, message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        make_solver(solver, options)


def test_solver_modules_do_not_import_torch_until_they_solve() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from deqcli.solvers import SOLVERS, solver_info;"
        "[solver_info(n).load() for n in SOLVERS];"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- Anderson: Walker–Ni with a QR ----------------------------------------------------------


def _walker_ni(problem: Problem, m: int, beta: float, steps: int) -> list[np.ndarray]:
    """A plain reference: the last min(m, k) differences, γ by numpy's least squares."""
    z = problem.z0.double().numpy()
    zs, gs = [z], [z - problem.raw_f(torch.tensor(z)).numpy()]
    for k in range(steps):
        depth = min(m, k)
        z, g = zs[-1], gs[-1]
        if depth == 0:
            z_new = z - beta * g
        else:
            z_new = np.empty_like(z)
            for b in range(z.shape[0]):
                dz = np.stack([zs[i + 1][b] - zs[i][b] for i in range(k - depth, k)], axis=1)
                dg = np.stack([gs[i + 1][b] - gs[i][b] for i in range(k - depth, k)], axis=1)
                gamma = np.linalg.lstsq(dg, g[b], rcond=None)[0]
                z_new[b] = z[b] - beta * g[b] - (dz - beta * dg) @ gamma
        zs.append(z_new)
        gs.append(z_new - problem.raw_f(torch.tensor(z_new)).numpy())
    return zs


@pytest.mark.parametrize(("m", "beta"), [(3, 1.0), (3, 0.6), (12, 1.0)])
def test_anderson_without_safeguards_is_walker_ni_step_by_step(m: int, beta: float) -> None:
    # m = 3 < n slides the window (QR downdating by Givens rotations); m = n never drops a column.
    problem = _tanh(torch.float64)
    steps = 9
    reference = _walker_ni(problem, m, beta, steps)
    solver = make_solver("anderson", {"m": m, "beta": beta, "restart": False})
    state = solver.init(problem, problem.z0)
    for k in range(steps):
        state = solver.step(problem, state)
        np.testing.assert_allclose(state.z.numpy(), reference[k + 1], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("beta", [1.0, 0.6])
def test_anderson_window_sliding_many_times_is_walker_ni(beta: float) -> None:
    # z = A z + b with A symmetric, eigenvalues evenly spaced in [−0.5, 0.95]: z* = (I − A)⁻¹ b.
    # With m = 5, 40 steps slide the window 35 times; every iterate must be the plain
    # least-squares Walker–Ni iterate (the downdates leave no trace beyond rounding).
    n, m, steps = 40, 5, 40
    rng = np.random.default_rng(7)
    basis, _ = np.linalg.qr(rng.standard_normal((n, n)))
    A = (basis * np.linspace(-0.5, 0.95, n)) @ basis.T
    b = rng.standard_normal(n)
    exact = np.linalg.solve(np.eye(n) - A, b)
    problem = affine_problem(A, b, rng.standard_normal((3, n)), torch.float64)
    reference = _walker_ni(problem, m, beta, steps)
    solver = make_solver("anderson", {"m": m, "beta": beta, "restart": False})
    state = solver.init(problem, problem.z0)
    for k in range(steps):
        state = solver.step(problem, state)
        np.testing.assert_allclose(state.z.numpy(), reference[k + 1], rtol=0, atol=1e-10)
    assert state.count.tolist() == [m] * 3  # the window stayed full while it slid
    start = np.abs(reference[0] - exact).max()
    assert np.abs(state.z.numpy() - exact).max() < 1e-3 * start


def test_anderson_conditioning_safeguard_works_in_float32() -> None:
    # Chandrasekhar's H-equation in float32 with m = 16: the newest differences soon lie within
    # rounding of the span of the older ones. cond_max = 1e12 is beyond what float32 resolves, so
    # the limit becomes 0.01/ε ≈ 8.4e4 and the oldest columns are dropped; without the safeguard
    # the noisy least-squares solutions cost three times the iterations.
    from deqcli.solvers.anderson import condition_limit

    assert condition_limit(1e12, torch.float32) == pytest.approx(0.01 / 1.1920929e-07)
    assert condition_limit(1e9, torch.float64) == 1e9
    problem = _chandrasekhar(torch.float32)
    stop = StopRule(atol=1e-5, max_iter=100)
    safe = run(problem, make_solver("anderson", {"m": 16, "cond_max": 1e12}), stop)
    plain = run(problem, make_solver("anderson", {"m": 16, "restart": False}), stop)
    assert safe.status is Status.CONVERGED and plain.status is Status.CONVERGED
    assert safe.extra["anderson"]["drops"][0] >= 1
    assert safe.iterations[0] < plain.iterations[0]


def test_anderson_tikhonov_term_is_relative_and_keeps_the_fixed_point() -> None:
    # lam > 0 damps γ but cannot move the fixed point: it still converges to the known answer.
    result = run(_tanh(torch.float64), make_solver("anderson", {"lam": 1e-3}), StopRule(atol=1e-10))
    assert result.status is Status.CONVERGED
    _check_tanh(_tanh(torch.float64), result, 1e-10)


def test_anderson_with_a_line_search_refuses_steps_that_raise_the_residual() -> None:
    # z = z² + c with c = 1 has no fixed point: the plain Anderson residual grows; with the line
    # search along the Anderson direction it never exceeds the largest of the last `window`.
    problem = _quadratic_batch()
    options = {"globalisation": "line-search", "max_backtracks": 3, "window": 1}
    result = run(problem, make_solver("anderson", options), StopRule(atol=1e-12, max_iter=60))
    assert result.sample_status[:2] == [Status.CONVERGED, Status.CONVERGED]
    history = [row[2] for row in result.residual_history]
    assert all(b <= a for a, b in itertools.pairwise(history))


# -- Newton-type presets and their globalisations ----------------------------------------------


def test_newton_globalisations_pick_their_method() -> None:
    problem = _sqrt2(torch.float64)
    stop = StopRule(atol=1e-12)
    tr = run(problem, make_solver("newton", {"globalisation": "trust-region"}), stop)
    lm = run(problem, make_solver("newton", {"globalisation": "levenberg-marquardt"}), stop)
    plain = run(problem, make_solver("newton", {"globalisation": "none"}), stop)
    for result in (tr, lm, plain):
        assert result.status is Status.CONVERGED
        assert result.solution.abs().flatten().tolist() == pytest.approx([math.sqrt(2)] * 2)
    # newton × trust region takes an exact Jacobian after every accepted step (no Broyden terms):
    # one at z₀ and one after each accepted step but the last.
    for b in range(2):
        moved = [row[b] > 0 for row in tr.step_history[: tr.iterations[b] - 1]]
        assert tr.extra["trust_region"]["jacobians"][b] == 1 + sum(moved)
    assert "levenberg_marquardt" in lm.extra
    assert plain.counts.totals()["nfev"] == plain.nit + 1  # no backtracking


def test_newton_step_max_caps_every_step() -> None:
    # g(z) = atan(z) − 1.4 from 0.05 (root tan 1.4 ≈ 5.8): with the line search off, every step
    # is the Newton step cut to step_max·max(|z|, √n); z only increases on the way.
    problem = scalar_problem("residual", lambda z: torch.atan(z) - 1.4, [0.05], torch.float64)
    options = {"globalisation": "none", "step_max": 0.5}
    result = run(problem, make_solver("newton", options), StopRule(atol=1e-12, max_iter=100))
    assert result.status is Status.CONVERGED
    z = 0.05
    capped = 0
    for (step,) in result.step_history:
        limit = 0.5 * max(abs(z), 1.0)
        assert step <= limit * (1 + 1e-12)
        capped += step >= limit * (1 - 1e-12)
        z += step
    assert capped >= 3  # the cap was what decided those steps
    assert float(result.solution[0, 0]) == pytest.approx(math.tan(1.4), rel=1e-12)


def test_broyden_bad_update_and_trust_region_need_no_jacobians() -> None:
    problem = _chandrasekhar(torch.float64)
    stop = StopRule(atol=1e-10, max_iter=300)
    for options in ({"update": "bad"}, {"globalisation": "trust-region"}, {"window": 1}):
        result = run(problem, make_solver("broyden", options), stop)
        assert result.status is Status.CONVERGED, options
        totals = result.counts.totals()
        assert totals["njev"] == totals["jvp"] == totals["vjp"] == 0
        _check_chandrasekhar(problem, result, 1e-10)


def test_broyden_terminates_on_a_linear_map_with_either_update() -> None:
    # Gay's theorem: the good update on an affine map terminates in at most 2n steps (n = 5);
    # the bad update does too on this map.
    for update in ("good", "bad"):
        solver = make_solver("broyden", {"update": update, "memory": 20, "globalisation": "none"})
        result = run(_linear(torch.float64), solver, StopRule(atol=1e-10, max_iter=50))
        assert result.status is Status.CONVERGED and max(result.iterations) <= 2 * 5 + 1
        _check_linear(_linear(torch.float64), result, 1e-10)


def test_broyden_auto_update_follows_the_problem_form() -> None:
    # auto: the bad update where J_g = I − J_f (a fixed-point problem), the good one on a root
    # problem; in one dimension both are the secant method, so both reach √2.
    stop = StopRule(atol=1e-12)
    fixed = scalar_problem("fixed_point", lambda z: z - (z * z - 2) / 4, [1.0], torch.float64)
    root = scalar_problem("residual", lambda z: z * z - 2, [1.0], torch.float64)
    solver = make_solver("broyden")  # one solver for both: each run resolves auto afresh
    for problem, update in ((fixed, "bad"), (root, "good"), (fixed, "bad")):
        result = run(problem, solver, stop)
        assert result.extra["broyden"]["update"] == update
        assert float(result.solution[0, 0]) == pytest.approx(math.sqrt(2), abs=1e-11)
    explicit = run(fixed, make_solver("broyden", {"update": "good"}), stop)
    assert explicit.extra["broyden"]["update"] == "good"


def test_broyden_terminates_on_a_near_isometry_within_gays_bound() -> None:
    # A = 0.999·Q: plain iteration needs about 23,000 steps to 1e-10, a Krylov-type method about
    # n. Every member of Broyden's family, the good and the bad update alike, terminates on an
    # affine map in at most 2n steps (Gay 1979) as long as no term is dropped: the default memory
    # exceeds 2n here, so each update (auto: the bad one on this fixed-point problem) with either
    # globalisation must stay within 2n + 1 iterations and hit the exact solution.
    n = 20
    problem, exact = _linear_layer(0.999 * _haar(n, 3), 2, 4)
    for options in (
        {"globalisation": "none"},
        {},
        {"update": "good"},
        {"update": "good", "globalisation": "none"},
    ):
        result = run(problem, make_solver("broyden", options), StopRule(atol=1e-10, max_iter=400))
        assert result.status is Status.CONVERGED, options
        assert result.extra["broyden"]["update"] == options.get("update", "bad")
        assert max(result.iterations) <= 2 * n + 1, (options, result.iterations)
        # ‖(I − A)(z − z*)‖ ≤ 1e-10 and σ_min(I − A) = 0.001.
        torch.testing.assert_close(result.solution, exact, rtol=0, atol=2e-7)


def test_broyden_memory_slides_by_dropping_the_oldest_term() -> None:
    # H = I + Σ aᵢ bᵢᵀ over the last `memory` terms of each sample, whichever samples appended.
    from deqcli.solvers.directions import JacobianModel

    gen = torch.Generator().manual_seed(5)
    batch, n, memory = 3, 6, 3
    model = JacobianModel(
        torch.zeros(batch, n, dtype=torch.float64),
        memory,
        dense=False,
        inverse_only=True,
        slide=True,
    )
    kept: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(batch)]
    masks = [[True, True, True]] * 4 + [[True, False, True], [False, True, True]] * 2 + [[True] * 3]
    for mask in masks:
        rows = torch.tensor(mask)
        a, b = (torch.randn(batch, n, generator=gen, dtype=torch.float64) for _ in range(2))
        model.append(rows, a=a, b=b)
        for i in range(batch):
            if mask[i]:
                kept[i] = [*kept[i], (a[i], b[i])][-memory:]
    x = torch.randn(batch, n, generator=gen, dtype=torch.float64)
    expected = torch.stack(
        [x[i] + sum(ai * (bi @ x[i]) for ai, bi in kept[i]) for i in range(batch)]
    )
    torch.testing.assert_close(model.solve(x), expected)
    assert model.count.tolist() == [memory] * batch


def test_newton_krylov_without_a_line_search_takes_the_full_step() -> None:
    solver = make_solver("newton-krylov", {"globalisation": "none"})
    result = run(_tanh(torch.float64), solver, StopRule(atol=1e-10))
    assert result.status is Status.CONVERGED
    assert result.counts.totals()["nfev"] == result.nit + 1
    _check_tanh(_tanh(torch.float64), result, 1e-10)


def test_trust_region_factor_and_scaling_set_the_first_radius() -> None:
    # hybrj: Δ₀ = factor·‖D z₀‖ with D the column norms of J₀ (scaling: jacobian) or I (none).
    problem = scalar_problem("residual", lambda z: 3 * z - 6, [2.0, 4.0], torch.float64)
    tr = make_solver("trust-region", {"factor": 0.5})
    state = tr.init(problem, problem.z0)
    assert state.diag.flatten().tolist() == [3.0, 3.0]
    assert state.radius.tolist() == [0.5 * 3 * 2.0, 0.5 * 3 * 4.0]
    plain = make_solver("trust-region", {"factor": 0.5, "scaling": "none"})
    assert plain.init(problem, problem.z0).radius.tolist() == [1.0, 2.0]


def test_trust_region_exact_update_and_memory_fold() -> None:
    # update: exact takes a Jacobian after each accepted step; a full memory is folded into a
    # dense J₀ (no new Jacobian): on a linear map one Jacobian serves the whole run.
    problem = _sqrt2(torch.float64)
    exact = run(problem, make_solver("trust-region", {"update": "exact"}), StopRule())
    broyden = run(problem, make_solver("trust-region"), StopRule())
    assert exact.status is Status.CONVERGED and broyden.status is Status.CONVERGED
    moved = [row[0] > 0 for row in exact.step_history[: exact.iterations[0] - 1]]
    assert exact.extra["trust_region"]["jacobians"][0] == 1 + sum(moved) > 1
    assert broyden.extra["trust_region"]["jacobians"][0] == 1
    folded = run(_tanh(torch.float64), make_solver("trust-region", {"memory": 2}), StopRule())
    assert folded.status is Status.CONVERGED
    assert folded.extra["trust_region"]["jacobians"] == [1, 1, 1]


def test_levenberg_marquardt_damping_and_scaling() -> None:
    problem = _linear(torch.float64)
    for options in ({"damping": 1e-8}, {"damping": 10.0}, {"scaling": "none"}):
        result = run(problem, make_solver("levenberg-marquardt", options), StopRule(atol=1e-11))
        assert result.status is Status.CONVERGED, options
        _check_linear(problem, result, 1e-11)
    # A heavier initial damping takes shorter first steps: more iterations on a linear map.
    light = run(
        problem, make_solver("levenberg-marquardt", {"damping": 1e-8}), StopRule(atol=1e-11)
    )
    heavy = run(
        problem, make_solver("levenberg-marquardt", {"damping": 10.0}), StopRule(atol=1e-11)
    )
    assert light.nit < heavy.nit


def test_ptc_options_and_its_matrix_free_variant() -> None:
    problem = _tanh(torch.float64)
    stop = StopRule(atol=1e-10, max_iter=400)
    dense = run(problem, make_solver("ptc", {"linear": "dense"}), stop)
    krylov = run(problem, make_solver("ptc", {"linear": "krylov", "krylov_dim": 12}), stop)
    for result in (dense, krylov):
        assert result.status is Status.CONVERGED
        _check_tanh(problem, result, 1e-10)
    assert dense.extra["ptc"]["linear"] == "dense" and krylov.extra["ptc"]["linear"] == "gmres"
    assert krylov.counts.totals()["njev"] == 0 and krylov.counts.totals()["jvp"] > 0
    # A smaller first pseudo-time step follows the flow longer before Newton's rate sets in.
    timid = run(problem, make_solver("ptc", {"dt0": 0.01, "dt_max": 1e6, "growth": 2.0}), stop)
    assert timid.status is Status.CONVERGED and timid.nit > dense.nit


def test_auto_stages_option_and_notes_name_each_preset_once() -> None:
    problem = scalar_problem("residual", lambda z: z**2 + 1, [1.0], torch.float64)
    solver = make_solver("auto", {"stages": "trust-region, levenberg-marquardt"})
    result = run(problem, solver, StopRule(atol=1e-12, max_iter=200))
    assert result.extra["auto"]["methods"][0] == "trust-region"
    assert set(result.extra["auto"]["methods"]) == {"trust-region", "levenberg-marquardt"}
    assert result.notes[0].startswith("started with trust-region, switched to levenberg-marquardt")
    # Notes never repeat a solver's name ("auto: auto: …" once compare prefixes it).
    for note in result.notes:
        head, _, rest = note.partition(": ")
        assert not rest.startswith(head + ":")
    assert not any(note.startswith("auto:") for note in result.notes)


def test_auto_checks_plain_iteration_every_8_steps_with_its_patience_in_steps() -> None:
    # The logistic map at r = 3.2 from 0.3: plain iteration settles on the 2-cycle and stops
    # making progress. Its checks come every FIXED_POINT_CHECKS = 8 steps, the patience (30
    # steps) in whole checks: 4, so the switch comes at the 8th check after the last fall of
    # ‖g‖ by half, a multiple of 8 steps into the preset. Newton then finds z* = 1 − 1/r.
    problem = scalar_problem("fixed_point", lambda z: 3.2 * z * (1 - z), [0.3], torch.float64)
    solver = make_solver("auto", {"stages": "fixed_point, newton"})
    result = run(problem, solver, StopRule(atol=1e-12, max_iter=300))
    info = result.extra["auto"]
    assert info["methods"] == ["fixed_point", "newton"] and info["reasons"] == ["no progress"]
    assert info["switches"][0] % 8 == 0 and 32 <= info["switches"][0] <= 64
    assert result.status is Status.CONVERGED
    assert float(result.solution[0, 0]) == pytest.approx(1 - 1 / 3.2, abs=1e-12)


def test_auto_sees_growth_between_plain_iteration_checks() -> None:
    # f halves z until z ≤ 1e-3 (z_10 = 2⁻¹⁰), then multiplies it by −200: ‖g‖ goes from
    # 2⁻¹⁰ (its best, at z_9) to 201·2⁻¹⁰, 201 times — beyond growth = 100 — on the eleventh
    # evaluation, between the checks after 8 and 16 steps and after the trial's check moved the
    # best. auto leaves at once, from the best iterate, and anderson lands on the root z* = 0.
    problem = scalar_problem(
        "fixed_point", lambda z: torch.where(z > 1e-3, 0.5 * z, -200 * z), [1.0], torch.float64
    )
    result = run(problem, make_solver("auto"), StopRule(atol=1e-9, max_iter=100))
    info = result.extra["auto"]
    assert info["probe"]["trial"]["choice"] == "fixed_point"
    assert info["methods"] == ["fixed_point", "anderson"] and info["switches"] == [10]
    assert info["reasons"] == ["residual growth"]
    assert result.status is Status.CONVERGED and float(result.solution[0, 0]) == 0.0


def test_auto_moves_on_at_the_runs_divergence_limit() -> None:
    # The shared ConvergenceTest: with divergence_factor 50 the first Anderson step (216-fold
    # growth) would be a divergence for the driver; auto discards it and moves on instead.
    problem = scalar_problem("fixed_point", lambda z: z - (z**3 - 8), [3.0], torch.float64)
    stop = StopRule(atol=1e-12, max_iter=100, divergence_factor=50.0)
    result = run(problem, make_solver("auto"), stop)
    assert result.status is Status.CONVERGED
    assert result.extra["auto"]["reasons"][0] == "residual beyond the divergence limit"
