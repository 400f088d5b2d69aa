"""Classic hard nonlinear systems (a fast subset of bench/hard_systems.py) with known roots, the
trust region against MINPACK's hybrj, and batches that follow each sample's own path."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from scipy.optimize import root

from bench.hard_systems import SYSTEMS, System
from deqcli.result import SolveResult, Status
from deqcli.solvers import make_solver
from deqcli.solvers.base import StopRule, run

BY_NAME = {s.name: s for s in SYSTEMS}
ATOL = 1e-10


def _assert_same_path(together: Any, b: int, alone: Any) -> None:
    """Sample b of a batched run followed the path of the same problem solved alone."""
    assert together.sample_status[b] is alone.sample_status[0]
    assert together.iterations[b] == alone.iterations[0]
    k = alone.iterations[0]
    mine = [row[b] for row in together.residual_history[: k + 1]]
    theirs = [row[0] for row in alone.residual_history[: k + 1]]
    # Below the stopping tolerance the residuals are rounding, which batched and single
    # products may commit differently.
    np.testing.assert_allclose(mine, theirs, rtol=1e-8, atol=ATOL)
    torch.testing.assert_close(together.solution[b], alone.solution[0], rtol=1e-8, atol=1e-11)


def solve(
    system: str, solver: str, scale: float = 1.0, max_iter: int = 400, **options: object
) -> SolveResult:
    problem = BY_NAME[system].problem(scale)
    stop = StopRule(atol=ATOL, max_iter=max_iter)
    return run(problem, make_solver(solver, dict(options)), stop)


@pytest.mark.parametrize(
    ("system", "solver"),
    [
        ("rosenbrock", "newton"),
        ("rosenbrock", "trust-region"),
        ("rosenbrock", "levenberg-marquardt"),
        ("rosenbrock", "broyden"),
        ("helical-valley", "trust-region"),
        ("helical-valley", "newton"),
        ("helical-valley", "auto"),
        ("brown-almost-linear", "trust-region"),
        ("variably-dimensioned", "levenberg-marquardt"),
        ("variably-dimensioned", "broyden"),
    ],
)
def test_hard_systems_reach_their_known_roots(system: str, solver: str) -> None:
    result = solve(system, solver)
    assert result.status is Status.CONVERGED, result.sample_status
    known = torch.tensor(BY_NAME[system].root, dtype=torch.float64)
    # Each of these roots is simple: the residual bounds the error through σ_min(J) ≥ 1e-2.
    assert float((result.solution[0] - known).abs().max()) <= 1e-7


@pytest.mark.parametrize("solver", ["trust-region", "levenberg-marquardt", "auto"])
def test_wood_reaches_one_of_its_roots(solver: str) -> None:
    # The MINPACK form of Wood's function (its gradient, scaled) has the root (1, 1, 1, 1) and a
    # saddle point of Wood's function near (−0.968, 0.947, −0.970, 0.951): both solve g = 0.
    result = solve("wood", solver)
    assert result.status is Status.CONVERGED
    residual = BY_NAME["wood"].residual(result.solution)
    assert float(torch.linalg.vector_norm(residual)) <= ATOL


@pytest.mark.parametrize("solver", ["newton", "trust-region", "levenberg-marquardt"])
def test_powell_singular_converges_to_its_singular_root(solver: str) -> None:
    # J is singular at the root 0, so convergence is linear and ‖g‖ ≤ 1e-10 only bounds the
    # error by about √1e-10 (the last two equations are squares).
    result = solve("powell-singular", solver)
    assert result.status is Status.CONVERGED
    assert float(result.solution.abs().max()) <= 1e-4


def test_newton_caps_its_step_where_the_jacobian_is_nearly_singular() -> None:
    # Powell's badly scaled function from 100·x0 = (0, 100): J has a row of size e^{−100}, the
    # Newton step is of order 1e40. Uncapped it threw the iterate to infinity; capped, the line
    # search walks x2 down the valley to the root (1.098e−5, 9.106).
    result = solve("powell-badly-scaled", "newton", 100.0)
    assert result.status is Status.CONVERGED
    assert result.solution[0].tolist() == pytest.approx([1.098159e-05, 9.106146], rel=1e-5)
    steps = torch.tensor(result.step_history)[: result.nit, 0]
    norms = torch.tensor([row[0] for row in result.relative_history])  # finite throughout
    assert bool(torch.isfinite(norms).all()) and float(steps.max()) <= 1e3 * 100


@pytest.mark.parametrize("system", ["variably-dimensioned", "wood", "chebyquad-5"])
def test_broyden_never_ends_non_finite(system: str) -> None:
    # From 10·x0 the first quasi-Newton step (−g) used to overflow; the capped search refuses it.
    problem = BY_NAME[system].problem(10.0)
    result = run(problem, make_solver("broyden"), StopRule(atol=ATOL, max_iter=150))
    assert result.status is not Status.NONFINITE
    assert bool(torch.isfinite(result.solution).all())
    assert result.final_residuals()[0] <= result.residual_history[0][0]


def test_ptc_reaches_the_root_that_local_methods_miss() -> None:
    # Freudenstein–Roth from (0.5, −2): ½‖g‖² has a local minimum at (11.41, −0.8968) that traps
    # the trust region and Levenberg–Marquardt; pseudo-transient continuation does not descend
    # ‖g‖ and reaches the root (5, 4).
    for solver in ("trust-region", "levenberg-marquardt"):
        trapped = solve("freudenstein-roth", solver)
        assert trapped.status is Status.STALLED
        assert trapped.solution[0].tolist() == pytest.approx([11.4128, -0.896805], rel=1e-4)
    result = solve("freudenstein-roth", "ptc", max_iter=1000)
    assert result.status is Status.CONVERGED
    assert result.solution[0].tolist() == pytest.approx([5.0, 4.0], abs=1e-9)
    auto = solve("freudenstein-roth", "auto", max_iter=1000)
    assert auto.status is Status.CONVERGED and auto.extra["auto"]["methods"][-1] == "ptc"


# -- the trust region is hybrj ---------------------------------------------------------------


def _points_of_ours(system: System, scale: float, count: int) -> list[np.ndarray]:
    problem = system.problem(scale)
    seen: list[np.ndarray] = []
    func = problem.func

    def logged(z: torch.Tensor, params: object) -> torch.Tensor:
        if not z.requires_grad:
            seen.append(z[0].detach().numpy().copy())
        return func(z, params)  # type: ignore[arg-type]

    problem.func = logged  # type: ignore[method-assign]
    run(problem, make_solver("trust-region"), StopRule(atol=1e-300, max_iter=count))
    return seen


def _points_of_hybr(system: System, scale: float) -> list[np.ndarray]:
    problem = system.problem(scale)
    seen: list[np.ndarray] = []

    def fun(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not seen or not np.array_equal(seen[-1], x):
            seen.append(x.copy())
        g, jac = problem.jacobian(torch.tensor(x)[None])
        return g[0].numpy(), jac[0].numpy()

    root(fun, problem.z0[0].numpy(), jac=True, method="hybr", options={"xtol": 1e-15})
    return seen


@pytest.mark.parametrize(
    ("system", "scale", "count"), [("chebyquad-5", 10.0, 25), ("rosenbrock", 1.0, 12)]
)
def test_trust_region_visits_the_points_hybrj_visits(system: str, scale: float, count: int) -> None:
    # Same model (autodiff Jacobian, scaled Broyden updates), same scaling, radius, acceptance and
    # refresh rules: the trial points agree with MINPACK's up to rounding, which its QR updates and
    # our LU with low-rank terms commit differently (amplified by J's conditioning, up to 1e6
    # here, to about 1e-6 relative after twenty steps). hybrj re-evaluates at the
    # current point for each fresh Jacobian; those repeats are dropped from its list.
    ours = _points_of_ours(BY_NAME[system], scale, count)
    theirs = _points_of_hybr(BY_NAME[system], scale)
    # hybrj's first evaluation is at the start, where ours takes g from the Jacobian's pass.
    unique = [p for i, p in enumerate(theirs) if not any(np.array_equal(p, q) for q in theirs[:i])]
    unique = unique[1:]
    mine = [
        p for i, p in enumerate(ours) if not any(np.allclose(p, q, rtol=1e-12) for q in ours[:i])
    ]
    n = min(len(unique), len(mine), count)
    assert n >= 10
    np.testing.assert_allclose(np.array(mine[:n]), np.array(unique[:n]), rtol=1e-5, atol=1e-8)


# -- batches follow each sample's own path ---------------------------------------------------


PATH_CASES = [
    (system, solver)
    for system in ("rosenbrock", "helical-valley")
    for solver in ("trust-region", "levenberg-marquardt", "newton", "broyden")
] + [("rosenbrock", solver) for solver in ("newton-krylov", "ptc", "anderson")]


@pytest.mark.parametrize(("system", "solver"), PATH_CASES)
def test_each_sample_of_a_batch_follows_the_path_it_follows_alone(system: str, solver: str) -> None:
    # Three starts that stop at different iterations, for different reasons; each sample's
    # residuals, stop and solution match its run alone (the first 60 iterations at most).
    scales = (1.0, 10.0, 100.0)
    stop = StopRule(atol=ATOL, max_iter=60)
    together = run(BY_NAME[system].batch(scales), make_solver(solver), stop)
    for b, scale in enumerate(scales):
        alone = run(BY_NAME[system].problem(scale), make_solver(solver), stop)
        _assert_same_path(together, b, alone)


# -- the matrix-free trust region (newton-krylov × trust region) -----------------------------

KRYLOV_TR = {"globalisation": "trust-region"}


@pytest.mark.parametrize(
    "system", ["rosenbrock", "helical-valley", "brown-almost-linear", "variably-dimensioned"]
)
def test_krylov_trust_region_reaches_known_roots_without_a_jacobian(system: str) -> None:
    result = solve(system, "newton-krylov", **KRYLOV_TR)
    assert result.status is Status.CONVERGED, result.sample_status
    known = torch.tensor(BY_NAME[system].root, dtype=torch.float64)
    # Simple roots: the residual bounds the error through σ_min(J) ≥ 1e-2.
    assert float((result.solution[0] - known).abs().max()) <= 1e-7
    assert result.counts.totals()["njev"] == 0


def test_krylov_trust_region_reaches_powell_singulars_singular_root() -> None:
    # J is singular at the root 0: linear convergence, and ‖g‖ ≤ 1e-10 bounds the error by about
    # √1e-10 (as for the dense methods).
    result = solve("powell-singular", "newton-krylov", **KRYLOV_TR)
    assert result.status is Status.CONVERGED
    assert float(result.solution.abs().max()) <= 1e-4
    assert result.counts.totals()["njev"] == 0


def test_krylov_trust_region_reuses_its_products_after_a_rejected_step() -> None:
    # Rosenbrock from 10·x0 rejects some steps. A rejected step changes only the radius: GMRES
    # runs once per point (once at z₀ and once after each accepted step but the last) and the
    # gradient Jᵀg (one VJP) at most once per point.
    result = solve("rosenbrock", "newton-krylov", 10.0, **KRYLOV_TR)
    assert result.status is Status.CONVERGED
    moved = [row[0] > 0 for row in result.step_history[: result.nit - 1]]
    assert not all(moved)  # some step was rejected
    linearisations = result.extra["trust_region"]["linearisations"][0]
    assert linearisations == 1 + sum(moved)
    assert 0 < result.counts.vjp[0] <= linearisations
    assert result.counts.njev[0] == 0


@pytest.mark.parametrize("system", ["rosenbrock", "helical-valley"])
def test_krylov_trust_region_batch_follows_each_samples_own_path(system: str) -> None:
    # As the test above for the other solvers, and the counts too: a product is counted only
    # for the samples it is made for, so each sample's JVPs and VJPs are those it has alone.
    scales = (1.0, 10.0, 100.0)
    stop = StopRule(atol=ATOL, max_iter=60)
    together = run(BY_NAME[system].batch(scales), make_solver("newton-krylov", KRYLOV_TR), stop)
    assert len(set(together.iterations)) > 1  # the samples stop at different iterations
    for b, scale in enumerate(scales):
        alone = run(BY_NAME[system].problem(scale), make_solver("newton-krylov", KRYLOV_TR), stop)
        _assert_same_path(together, b, alone)
        for kind in ("nfev", "jvp", "vjp", "njev"):
            assert getattr(together.counts, kind)[b] == getattr(alone.counts, kind)[0], kind
