"""Peers as solvers: scipy.optimize.root and torchdeq under our driver, counts and stopping rule."""

from __future__ import annotations

import importlib.util
import itertools
import math
import sys

import numpy as np
import pytest
import torch

from deqcli.errors import PeerUnavailableError, UsageError
from deqcli.problems.base import Problem
from deqcli.problems.tanh_layer import tanh_layer_map
from deqcli.result import Status
from deqcli.solvers import SOLVERS, make_solver
from deqcli.solvers.base import StopRule, run
from tests.conftest import CONFIGS
from tests.test_solvers import CASES, scalar_problem

SCIPY = [name for name, info in SOLVERS.items() if info.family == "scipy"]
TORCHDEQ = [name for name, info in SOLVERS.items() if info.family == "torchdeq"]
HAVE_TORCHDEQ = importlib.util.find_spec("torchdeq") is not None
needs_torchdeq = pytest.mark.skipif(
    not HAVE_TORCHDEQ, reason="torchdeq is not installed (pip install 'deqcli[peers]')"
)


def counting_tanh_layer(batch: int = 3, n: int = 12) -> tuple[Problem, list[int]]:
    """A tanh layer whose map counts the rows it evaluates, independently of the problem's counter."""
    rng = np.random.default_rng(5)
    W = rng.standard_normal((n, n))
    W *= 0.8 / np.linalg.norm(W, 2)
    rows = [0]

    def func(z: torch.Tensor, p: dict) -> torch.Tensor:
        rows[0] += z.shape[0]
        return tanh_layer_map(z, p)

    params = {
        "W": torch.tensor(W),
        "x": torch.tensor(rng.standard_normal((batch, n))),
    }
    problem = Problem(
        name="tanh",
        kind="tanh_layer",
        form="fixed_point",
        func=func,
        z0=torch.zeros(batch, n, dtype=torch.float64),
        params=params,
        batched_params=frozenset({"x"}),
    )
    return problem, rows


@pytest.mark.parametrize("case", ["dottie", "linear", "tanh", "chandrasekhar"])
@pytest.mark.parametrize("solver", SCIPY)
def test_scipy_peer_finds_the_known_answer(solver: str, case: str) -> None:
    spec = CASES[case]
    problem = spec.build(torch.float64)
    result = run(problem, make_solver(solver), StopRule(atol=1e-10, max_iter=500))
    assert result.status is Status.CONVERGED, result.notes
    assert max(result.final_residuals()) <= 1e-10
    spec.check(problem, result, 1e-10)
    assert result.extra["peer"]["library"] == "scipy"


@pytest.mark.parametrize("solver", ["scipy:krylov", "scipy:anderson", "scipy:df-sane"])
def test_scipy_counts_are_every_evaluation_it_made(solver: str) -> None:
    problem, rows = counting_tanh_layer()
    result = run(problem, make_solver(solver), StopRule(atol=1e-10, max_iter=500))
    assert result.status is Status.CONVERGED
    # scipy evaluates one sample at a time: every row it evaluated is in that sample's count.
    assert sum(result.counts.nfev) == rows[0]
    assert all(n > result.iterations[b] for b, n in enumerate(result.counts.nfev))


def test_scipy_minpack_gets_our_autodiff_jacobian() -> None:
    result = run(CASES["tanh"].build(torch.float64), make_solver("scipy:hybr"), StopRule(1e-10))
    assert result.status is Status.CONVERGED
    assert result.counts.totals()["njev"] >= 1


def test_scipy_peer_that_gives_up_is_stalled_with_its_message() -> None:
    # g(z) = z² + 1 has no real root: MINPACK reports that it is not making progress.
    problem = scalar_problem("residual", lambda z: z**2 + 1, [1.0], torch.float64)
    result = run(problem, make_solver("scipy:hybr"), StopRule(atol=1e-12, max_iter=200))
    assert result.status is Status.STALLED
    assert result.notes and result.notes[0].startswith("scipy:hybr: sample 0:")
    assert result.extra["peer"]["messages"][0] == result.notes[0].split("sample 0: ")[1]


def test_scipy_peer_stops_at_the_shared_rule_and_budget() -> None:
    problem = CASES["dottie"].build(torch.float64)
    loose = run(problem, make_solver("scipy:df-sane"), StopRule(atol=1e-4, max_iter=500))
    tight = run(problem, make_solver("scipy:df-sane"), StopRule(atol=1e-12, max_iter=500))
    assert loose.status.ok and tight.status.ok
    assert loose.nit < tight.nit
    assert max(loose.final_residuals()) <= 1e-4 < max(loose.residual_history[-2])
    capped = run(problem, make_solver("scipy:df-sane"), StopRule(atol=1e-15, max_iter=3))
    assert capped.status is Status.MAX_ITER and capped.nit == 3


@pytest.mark.parametrize("solver", SCIPY)
def test_scipy_replay_holds_the_residuals_of_its_own_iterates(solver: str) -> None:
    # scipy reuses its work arrays in place; the recording must hold copies, so every replayed
    # residual is g at the replayed iterate (every iterate is kept here).
    problem = CASES["tanh"].build(torch.float64)
    stop = StopRule(atol=1e-10, max_iter=200, keep_iterates=201)
    result = run(problem, make_solver(solver), stop)
    assert result.status is Status.CONVERGED
    for t, z in enumerate(result.tail_iterates):
        replayed = torch.tensor(result.residual_history[t], dtype=torch.float64)
        torch.testing.assert_close(
            torch.linalg.vector_norm(problem.raw_g(z), dim=1), replayed, rtol=1e-12, atol=1e-15
        )


@pytest.mark.parametrize("solver", ["scipy:hybr", "scipy:lm"])
def test_minpack_rejected_trial_points_are_not_iterates(solver: str) -> None:
    # g(z) = eᶻ − 1 from z = −5: the first Newton step lands at z ≈ 142 where ‖g‖ ≈ 7e61, which
    # MINPACK rejects. Counted as an evaluation, it is not an iterate: the run is not "diverged".
    problem = scalar_problem("residual", lambda z: torch.exp(z) - 1, [-5.0], torch.float64)
    options = {"factor": 1.0} if solver == "scipy:hybr" else {}
    result = run(problem, make_solver(solver, options), StopRule(atol=1e-10, max_iter=100))
    assert result.status is Status.CONVERGED
    assert result.solution[0, 0].item() == pytest.approx(0.0, abs=1e-10)
    history = [row[0] for row in result.residual_history]
    assert all(b < a for a, b in itertools.pairwise(history))  # accepted steps only
    assert history[0] == pytest.approx(1 - math.exp(-5.0), rel=1e-12)
    assert result.counts.nfev[0] > result.iterations[0] + 1  # rejected trials were evaluated


def test_scipy_hybr_scaling_options() -> None:
    # MINPACK's first step from z = −5 is bounded by factor·|z|: with the default factor 100 the
    # rejected trial collapses the trust region and hybr gives up at the start (stalled, with
    # its message); factor 1 bounds the first step to 5 and reaches the root.
    problem = scalar_problem("residual", lambda z: torch.exp(z) - 1, [-5.0], torch.float64)
    default = run(problem, make_solver("scipy:hybr"), StopRule(atol=1e-10, max_iter=100))
    assert default.status is Status.STALLED and default.iterations == [0]
    assert make_solver("scipy:hybr", {"factor": 1.0, "diag": [2]}).options() == {
        "factor": 1.0,
        "diag": [2.0],
    }
    # In two dimensions g = (eˣ − 1, y) from (−5, 0.05): MINPACK's automatic scaling by the
    # Jacobian's column norms (e⁻⁵ and 1) stretches the x-direction and hybr stops without
    # progress; fixed unit scales (diag) let it reach the root.
    plane = Problem(
        "plane",
        "test",
        "residual",
        lambda z, p: torch.stack([torch.exp(z[:, 0]) - 1, z[:, 1]], dim=1),
        torch.tensor([[-5.0, 0.05]], dtype=torch.float64),
    )
    auto = run(plane, make_solver("scipy:hybr"), StopRule(atol=1e-10, max_iter=100))
    unit = run(plane, make_solver("scipy:hybr", {"diag": [1, 1]}), StopRule(atol=1e-10))
    assert auto.status is Status.STALLED and "not making good progress" in auto.notes[0]
    assert unit.status is Status.CONVERGED
    assert unit.solution[0].tolist() == pytest.approx([0.0, 0.0], abs=1e-10)
    with pytest.raises(UsageError, match=r"solver\.factor: must be > 0"):
        make_solver("scipy:hybr", {"factor": 0})
    with pytest.raises(UsageError, match=r"solver\.diag: must be a list of positive numbers"):
        make_solver("scipy:hybr", {"diag": [1.0, -1.0]})
    with pytest.raises(UsageError, match=r"solver\.diag: needs one positive scale per unknown"):
        run(problem, make_solver("scipy:hybr", {"diag": [1.0, 1.0]}), StopRule())


def test_scipy_anderson_memory_option() -> None:
    assert make_solver("scipy:anderson", {"m": 3}).options() == {"m": 3}
    with pytest.raises(UsageError, match=r"solver\.m: must be ≥ 1"):
        make_solver("scipy:anderson", {"m": 0})


# -- torchdeq ---------------------------------------------------------------------------------


@needs_torchdeq
@pytest.mark.parametrize("case", ["dottie", "linear", "tanh", "chandrasekhar"])
@pytest.mark.parametrize("solver", TORCHDEQ)
def test_torchdeq_peer_finds_the_known_answer(solver: str, case: str) -> None:
    spec = CASES[case]
    problem = spec.build(torch.float64)
    result = run(problem, make_solver(solver), StopRule(atol=1e-10, max_iter=2000))
    assert result.status is Status.CONVERGED, result.notes
    spec.check(problem, result, 1e-10)


@needs_torchdeq
@pytest.mark.parametrize("solver", TORCHDEQ)
def test_torchdeq_counts_one_batched_evaluation_per_replayed_iteration(solver: str) -> None:
    problem, rows = counting_tanh_layer()
    result = run(problem, make_solver(solver), StopRule(atol=1e-10, max_iter=500))
    assert result.status is Status.CONVERGED
    assert rows[0] == sum(result.counts.nfev) == problem.batch * result.counts.totals()["nfev"]
    # Each evaluation is at the next iterate, and the run ends at the first iterate that meets
    # the rule for every sample: the start plus one evaluation per iteration of the slowest one.
    assert result.counts.totals()["nfev"] == result.nit + 1


@needs_torchdeq
def test_torchdeq_forward_iteration_matches_ours_step_for_step() -> None:
    problem = CASES["tanh"].build(torch.float64)
    stop = StopRule(atol=1e-10, max_iter=500)
    theirs = run(problem, make_solver("torchdeq:fixed_point_iter"), stop)
    ours = run(problem, make_solver("fixed_point"), stop)
    assert theirs.iterations == ours.iterations
    # Once a sample stops, ours evaluates the others alone (Problem.pack): the same arithmetic
    # in another summation order, so a residual near 1e-10 agrees to the rounding of the
    # iterate (about 1e-16 absolute) rather than to 1e-12 of itself.
    np.testing.assert_allclose(
        theirs.residual_history, ours.residual_history, rtol=1e-12, atol=1e-15
    )
    torch.testing.assert_close(theirs.solution, ours.solution, atol=1e-14, rtol=0)


@needs_torchdeq
def test_torchdeq_budget_is_max_iter() -> None:
    problem = CASES["tanh"].build(torch.float64)
    result = run(problem, make_solver("torchdeq:anderson"), StopRule(atol=1e-30, max_iter=7))
    assert result.status is Status.MAX_ITER
    assert result.nit == 7 and result.counts.totals()["nfev"] == 8


def test_missing_torchdeq_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, cli) -> None:
    for name in [m for m in sys.modules if m == "torchdeq" or m.startswith("torchdeq.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torchdeq", None)  # import torchdeq now fails
    with pytest.raises(PeerUnavailableError, match=r"pip install 'deqcli\[peers\]'"):
        make_solver("torchdeq:anderson")
    out = cli("solve", CONFIGS / "dottie.yaml", "--solver", "torchdeq:broyden")
    assert out.exit_code == 2
    assert out.stderr.strip() == "error: torchdeq is not installed; pip install 'deqcli[peers]'"
    assert "Traceback" not in out.stderr
