"""A labelled suite of verdicts: maps, Newton and gradient-descent runs, linear maps and batches,
each with the verdict, period and order theory gives and, where the case has one, a remedy the
diagnostics verified by running it.

Every case is built in Python from its mathematics; the expected numbers come from theory (rates
ρ(J), cycle periods, multiplicities, exact solutions), never from the code's own output. The
second half holds one test per misdiagnosis found in review, on a case built for it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import torch

from deqcli.analyses.remedies import try_remedies
from deqcli.diagnostics import DiagnosticOptions, attach
from deqcli.problems.base import Problem, Structure
from deqcli.problems.tanh_layer import tanh_layer_map
from deqcli.result import SolveResult, Status
from deqcli.solvers import make_solver
from deqcli.solvers.base import StopRule, run
from tests.test_diagnostics import gradient_descent, logistic
from tests.test_solvers import CASES as KNOWN

F64 = torch.float64
DOTTIE = 0.7390851332151607


# -- problem builders ---------------------------------------------------------------------------


def scalar(form: str, fn: Callable[[torch.Tensor], torch.Tensor], *starts: float, dtype=F64):
    """A batch of scalar problems, one row per start."""
    z0 = torch.tensor([[s] for s in starts], dtype=dtype)
    return Problem("scalar", "test", form, lambda z, p: fn(z), z0)


def vector(form: str, fn: Callable[[torch.Tensor], torch.Tensor], start: list[float]):
    """One vector problem."""
    return Problem("vector", "test", form, lambda z, p: fn(z), torch.tensor([start], dtype=F64))


def affine(A: Any, c: Any, z0: Any, dtype=F64) -> Problem:
    """z ← A z + c."""
    A_, c_ = torch.as_tensor(A, dtype=dtype), torch.as_tensor(c, dtype=dtype)
    z = torch.as_tensor(z0, dtype=dtype)
    return Problem("affine", "test", "fixed_point", lambda x, p: x @ A_.mT + c_, z.reshape(1, -1))


def tanh_layer(W: list[list[float]], xs: list[list[float]], z0: float = 0.1) -> Problem:
    """z = tanh(W z + x), one x per sample, with its certificate L ≤ ‖W‖₂."""
    Wt = torch.tensor(W, dtype=F64)
    x = torch.tensor(xs, dtype=F64)
    return Problem(
        "tanh",
        "tanh_layer",
        "fixed_point",
        tanh_layer_map,
        torch.full(x.shape, z0, dtype=F64),
        {"W": Wt, "x": x},
        structure=Structure(
            lipschitz_bound=float(torch.linalg.matrix_norm(Wt, ord=2)), lipschitz_reason="‖W‖₂"
        ),
        batched_params=frozenset({"x"}),
    )


def rotation(angle: float, scale: float = 1.0) -> Problem:
    """z ← scale·R(angle) z + (1, 0): a rotation (scale 1) or a spiral about its fixed point."""
    c, s = math.cos(angle), math.sin(angle)
    return affine([[scale * c, -scale * s], [scale * s, scale * c]], [1.0, 0.0], [0.0, 0.0])


def jordan(n: int = 5, lam: float = 0.95) -> Problem:
    """z ← (λI + N) z: ρ = λ < 1 but ‖A^t‖ grows like C(t, n−1)·λ^t for dozens of steps."""
    A = lam * np.eye(n) + np.diag(np.ones(n - 1), 1)
    return affine(A, np.zeros(n), np.ones(n))


def bowl() -> Problem:
    """g(x, y) = (x² + y² + 1, x − y): no root; ‖g‖ has its minimum 1 at the origin."""
    return vector(
        "residual",
        lambda z: torch.stack([z[:, 0] ** 2 + z[:, 1] ** 2 + 1, z[:, 0] - z[:, 1]], dim=1),
        [1.0, 0.5],
    )


def wide_affine(dtype: torch.dtype) -> tuple[Problem, np.ndarray]:
    """z ← A z + c in 8 dimensions with ‖A‖₂ = 0.5 and ‖z*‖ ≈ 2e4, and its exact fixed point."""
    rng = np.random.default_rng(1)
    A = rng.standard_normal((8, 8))
    A *= 0.5 / np.linalg.norm(A, 2)
    c = rng.standard_normal(8) * 1e4
    return affine(A, c, np.zeros(8), dtype=dtype), np.linalg.solve(np.eye(8) - A, c)


# -- the suite ------------------------------------------------------------------------------------


@dataclass
class Case:
    """One labelled run: what theory says the diagnostics must find."""

    name: str
    build: Callable[[], Problem]
    solver: str = "fixed_point"
    options: dict[str, Any] = field(default_factory=dict)
    stop: dict[str, Any] = field(default_factory=dict)
    verdict: str | list[str] = "converged"  # sample 0's class, or every sample's
    period: int | None = None
    order: str | None = None
    remedy: str | None = None  # the label of a remedy verified to work (the first one listed)
    check: Callable[[SolveResult, dict[str, Any]], None] | None = None


def run_case(case: Case) -> SolveResult:
    """Solve, diagnose and try the remedies, as deq solve does."""
    problem = case.build()
    stop = {"atol": 1e-12, "max_iter": 200, **case.stop}
    result = run(problem, make_solver(case.solver, dict(case.options)), StopRule(**stop))
    attach(problem, result)
    try_remedies(problem, result)
    return result


def _dottie(result: SolveResult, s: dict[str, Any]) -> None:
    assert result.solution[0, 0].item() == pytest.approx(DOTTIE, abs=1e-12)
    # f'(z*) = −sin z*: plain iteration converges linearly with rate sin z*.
    assert s["rates"]["step_rate"] == pytest.approx(math.sin(DOTTIE), abs=2e-3)
    assert s["theory"]["rate_agrees"] is True


def _sqrt2(result: SolveResult, s: dict[str, Any]) -> None:
    assert result.solution[0, 0].item() == pytest.approx(math.sqrt(2), abs=1e-14)
    # J_g = 2z: σ_min(J_g) = 2√2 at the root, so the error is below ‖g‖/(2√2).
    assert s["error_bound"]["sigma_min"] == pytest.approx(2 * math.sqrt(2), rel=1e-12)
    assert abs(result.solution[0, 0].item() - math.sqrt(2)) <= max(
        s["error_bound"]["forward_error_estimate"], 4e-16
    )


def _exact_linear(result: SolveResult, s: dict[str, Any]) -> None:
    # z = A z + c with A = [[0.5, 0.2], [0.1, 0.4]], c = (1, 2): z* = (I − A)⁻¹c, one Newton step.
    exact = np.linalg.solve(np.eye(2) - np.array([[0.5, 0.2], [0.1, 0.4]]), [1.0, 2.0])
    assert result.iterations == [1]
    assert result.solution[0].tolist() == pytest.approx(exact.tolist(), abs=1e-13)
    assert s["error_bound"]["near_singular"] is False


def _logistic_rate(result: SolveResult, s: dict[str, Any]) -> None:
    assert s["rates"]["step_rate"] == pytest.approx(0.8, abs=1e-3)  # |f'(1 − 1/r)| = |2 − r|


def _slow(result: SolveResult, s: dict[str, Any]) -> None:
    # ‖g(z_t)‖ = 0.011·0.999^t: below 1e-10 after log(1e-10/0.011)/log(0.999) iterations.
    exact = math.ceil(math.log(1e-10 / 0.011) / math.log(0.999))
    assert s["evidence"]["iterations_needed"] == pytest.approx(exact, rel=0.01)


def _sublinear(result: SolveResult, s: dict[str, Any]) -> None:
    # z ← z − z³: ρ(J) = 1 at 0, z_t ≈ 1/√(2t): the rate creeps towards 1.
    assert s["evidence"]["sublinear"] is True
    assert s["spectral"]["spectral_radius"] == pytest.approx(1.0, abs=1e-3)


def _period2_logistic(result: SolveResult, s: dict[str, Any]) -> None:
    r = 3.2
    root = math.sqrt((r - 3) * (r + 1))
    cycle = sorted([(r + 1 - root) / (2 * r), (r + 1 + root) / (2 * r)])
    assert sorted(p[0] for p in s["evidence"]["points"]) == pytest.approx(cycle, abs=1e-10)
    assert s["evidence"]["cycle_multiplier"] == pytest.approx(4 + 2 * r - r * r, abs=1e-8)


def _tanh_period2(result: SolveResult, s: dict[str, Any]) -> None:
    # f'(0) = −1.5: damping β < 2/(1 + 1.5) = 0.8 converges; β = 1/(1 + 1.5) = 0.4 is exact.
    assert s["spectral"]["damping"]["beta_max"] == pytest.approx(0.8, abs=1e-12)
    assert s["advice"][0]["options"] == {"beta": 0.4}


def _newton_cycle(result: SolveResult, s: dict[str, Any]) -> None:
    # Newton on z³ − z from 1/√5 jumps to −1/√5 and back: an exact period-2 cycle; with the
    # line search the first step is halved and Newton converges to the root 0.
    assert sorted(p[0] for p in s["evidence"]["points"]) == pytest.approx(
        [-1 / math.sqrt(5), 1 / math.sqrt(5)], abs=1e-12
    )
    assert s["advice"][0]["kind"] == "verified" and s["advice"][0]["options"]["line_search"]


def _spiral(result: SolveResult, s: dict[str, Any]) -> None:
    assert s["evidence"]["growth_rate"] == pytest.approx(1.0005, abs=1e-9)
    assert "×1.0005 per iteration" in s["reason"]


def _gd_lr(result: SolveResult, s: dict[str, Any]) -> None:
    assert s["evidence"]["growth_rate"] == pytest.approx(1.1, abs=1e-9)  # |1 − 1.05·2|
    assert s["advice"][0]["options"]["beta"] == pytest.approx((2 / 3) / 1.05)


def _transient(result: SolveResult, s: dict[str, Any]) -> None:
    assert s["transient"] is True
    assert s["spectral_last"]["spectral_radius"] == pytest.approx(0.95, abs=1e-6)


def _escape(result: SolveResult, s: dict[str, Any]) -> None:
    assert s["evidence"]["escaping"] is True
    assert result.sample_status == [Status.DIVERGED]


def _multiplicity(m: int) -> Callable[[SolveResult, dict[str, Any]], None]:
    def check(result: SolveResult, s: dict[str, Any]) -> None:
        # Newton at a root of multiplicity m: rate (m − 1)/m, ‖g‖ ∝ error^m.
        assert s["rates"]["step_rate"] == pytest.approx((m - 1) / m, abs=1e-9)
        assert s["theory"]["multiplicity"] == pytest.approx(m, abs=1e-6)
        assert s["error_bound"]["near_singular"] is True
        # ‖g‖/σ_min = zᵐ/(m zᵐ⁻¹) = z/m: the estimate is the true error over m.
        z = abs(result.solution[0, 0].item())
        assert s["error_bound"]["forward_error_estimate"] == pytest.approx(z / m, rel=1e-9)

    return check


def _no_multiplicity(result: SolveResult, s: dict[str, Any]) -> None:
    assert s["theory"]["linear_newton"] is True and s["theory"]["multiplicity"] is None
    assert not any("multiplicity step" in e.get("label", "") for e in s["advice"])


def _floor(result: SolveResult, s: dict[str, Any]) -> None:
    ev = s["evidence"]
    assert ev["dtype"] == "float32" and s["status"] == "stalled"
    assert ev["resolution"] == pytest.approx(ev["eps"] * ev["scale"])
    assert s["final_residual"] <= ev["floor"] and ev["threshold"] < ev["floor"]


def _bowl(result: SolveResult, s: dict[str, Any]) -> None:
    assert s["stationarity"]["stationary"] is True
    assert s["evidence"]["nonzero_level"] is True
    # The minimum of ‖g‖ = 1 is at the origin.
    assert s["final_residual"] == pytest.approx(1.0, abs=1e-2)


def _bowl_nearby(result: SolveResult, s: dict[str, Any]) -> None:
    # A Powell hybrid stops when five Jacobians in a row bring no 10 % decrease (MINPACK's info 4):
    # near the minimum, not at it, and ‖g‖ only ever fell on the way.
    assert s["evidence"]["nonzero_level"] is True and s["evidence"]["monotone"] is True
    assert s["final_residual"] == pytest.approx(1.0, abs=1e-3)


def _sigmoid(result: SolveResult, s: dict[str, Any]) -> None:
    # σ(z) → 0 only as z → −∞: Newton meets the tolerance where σ′ ≈ σ, so ‖g‖/σ_min ≈ 1.
    bound = s["error_bound"]
    assert bound["near_singular"] is True
    assert bound["forward_error_estimate"] == pytest.approx(1.0, abs=1e-3)


def _batch_tanh(result: SolveResult, s: dict[str, Any]) -> None:
    batch = next(t for t in result.diagnostics["trials"]["runs"] if t["scope"] == "batch")
    assert batch["verified"] is True and batch["statuses"] == ["converged"] * 3


SUITE = [
    # -- converging, with the order theory gives --------------------------------------------------
    Case(
        "dottie plain iteration", lambda: KNOWN["dottie"].build(F64), order="linear", check=_dottie
    ),
    Case(
        "sqrt2 newton",
        lambda: scalar("residual", lambda z: z**2 - 2, 1.0),
        "newton",
        order="quadratic",
        check=_sqrt2,
    ),
    Case(
        "sqrt2 broyden",
        lambda: scalar("residual", lambda z: z**2 - 2, 1.0),
        "broyden",
        order="superlinear",
    ),
    Case(
        "exact linear solve with newton",
        lambda: affine([[0.5, 0.2], [0.1, 0.4]], [1.0, 2.0], [0.0, 0.0]),
        "newton",
        check=_exact_linear,
    ),
    Case("logistic r=2.8", lambda: logistic([2.8]), order="linear", check=_logistic_rate),
    Case(
        "tanh contraction with anderson",
        lambda: tanh_layer([[0.3, -0.5], [0.4, 0.2]], [[0.3, -1.0]]),
        "anderson",
    ),
    Case(
        "chandrasekhar H with broyden",
        lambda: KNOWN["chandrasekhar"].build(F64),
        "broyden",
    ),
    # -- slow ----------------------------------------------------------------------------------
    Case(
        "slow contraction 0.999",
        lambda: affine([[0.999]], [0.001], [-10.0]),
        stop={"atol": 1e-10, "max_iter": 500},
        verdict="slow",
        remedy="anderson",
        check=_slow,
    ),
    Case(
        "slow sign-alternating −0.9999",
        lambda: affine([[-0.9999]], [1.0], [0.0]),
        verdict="slow",
        remedy="anderson",
    ),
    Case(
        "sublinear z − z³",
        lambda: scalar("fixed_point", lambda z: z - z**3, 0.5),
        stop={"max_iter": 300},
        verdict="slow",
        remedy="anderson",
        check=_sublinear,
    ),
    Case(
        "slow run with a thinned history",
        lambda: affine([[0.999]], [0.001], [-10.0]),
        stop={"atol": 1e-10, "max_iter": 300, "history_limit": 64},
        verdict="slow",
        remedy="anderson",
    ),
    # -- cycles ---------------------------------------------------------------------------------
    Case(
        "logistic r=3.2 period 2",
        lambda: logistic([3.2]),
        verdict="oscillating",
        period=2,
        remedy="fixed_point beta=0.45",
        check=_period2_logistic,
    ),
    Case(
        "logistic r=3.5 period 4",
        lambda: logistic([3.5]),
        stop={"max_iter": 300},
        verdict="oscillating",
        period=4,
        remedy=f"fixed_point beta={1 / (3.5 - 1):.2g}",  # 1/(1 + ρ), ρ = r − 2 at 1 − 1/r
    ),
    Case(
        "logistic r=3.835 period 3",
        lambda: logistic([3.835]),
        stop={"max_iter": 300},
        verdict="oscillating",
        period=3,
        remedy=f"fixed_point beta={1 / (3.835 - 1):.2g}",
    ),
    Case(
        "tanh W=−1.5 period 2",
        lambda: tanh_layer([[-1.5]], [[0.0]]),
        stop={"max_iter": 100},
        verdict="oscillating",
        period=2,
        remedy="fixed_point beta=0.4",
        check=_tanh_period2,
    ),
    Case(
        "newton without line search cycles",
        lambda: scalar("residual", lambda z: z**3 - z, 1 / math.sqrt(5)),
        "newton",
        {"line_search": False},
        {"max_iter": 50},
        verdict="oscillating",
        period=2,
        remedy="newton with line search",
        check=_newton_cycle,
    ),
    # -- bounded, aperiodic ----------------------------------------------------------------------
    Case(
        "logistic r=3.9 chaos",
        lambda: logistic([3.9]),
        stop={"max_iter": 300},
        verdict="chaotic",
        remedy=f"fixed_point beta={1 / (3.9 - 1):.2g}",
    ),
    Case(
        "logistic r=4 from 0.3",
        lambda: logistic([4.0], z0=0.3),
        stop={"max_iter": 300},
        verdict="chaotic",
    ),
    Case(
        "rotation by one radian",
        lambda: rotation(1.0),
        verdict="chaotic",
        remedy="newton with line search",
    ),
    # -- growth and divergence ------------------------------------------------------------------
    Case(
        "outward spiral ρ=1.0005",
        lambda: rotation(1.0, 1.0005),
        stop={"max_iter": 300},
        verdict="growing",
        remedy="fixed_point beta=0.5",
        check=_spiral,
    ),
    Case(
        "gradient descent lr above 2/λmax",
        lambda: gradient_descent(1.05),
        stop={"atol": 1e-10, "max_iter": 100},
        verdict="diverged",
        remedy="fixed_point beta=0.635 (learning rate β·lr = 0.6667)",
        check=_gd_lr,
    ),
    Case(
        "unstable scalar map ×−1.5",
        lambda: affine([[-1.5]], [1.0], [0.0]),
        stop={"max_iter": 100},
        verdict="diverged",
        remedy="fixed_point beta=0.4",
    ),
    Case(
        "non-normal transient growth",
        lambda: jordan(),
        stop={"atol": 1e-10, "max_iter": 30},
        verdict="growing",
        remedy="anderson",
        check=_transient,
    ),
    Case(
        "escape: no root of arctan z + 2",
        lambda: scalar("residual", lambda z: torch.atan(z) + 2, 0.0),
        stop={"max_iter": 300},
        verdict="diverged",
        check=_escape,
    ),
    Case(
        "escape from the repelling fixed point of z + tanh z",
        lambda: scalar("fixed_point", lambda z: z + torch.tanh(z), 0.5),
        stop={"max_iter": 300},
        verdict="diverged",
        remedy="newton with line search",
        check=_escape,
    ),
    Case(
        "newton without line search escapes on arctan",
        lambda: scalar("residual", torch.atan, 2.0),
        "newton",
        {"line_search": False},
        {"max_iter": 100},
        verdict="diverged",
        remedy="newton with line search",
        check=_escape,
    ),
    Case(
        "newton escapes to infinity on arctan z + 2",
        lambda: scalar("residual", lambda z: torch.atan(z) + 2, 0.0),
        "newton",
        stop={"max_iter": 100},
        verdict="diverged",
        check=_escape,
    ),
    # -- stalls and the precision floor ---------------------------------------------------------
    Case(
        "newton on z² + 1 (no root)",
        lambda: scalar("residual", lambda z: z**2 + 1, 1.0),
        "newton",
        stop={"max_iter": 40},
        verdict="stalled",
    ),
    Case(
        "newton circles the nonzero minimum of a bowl",
        bowl,
        "newton",
        verdict="stalled",
        check=_bowl,
    ),
    Case(
        "levenberg-marquardt settles at the nonzero minimum of a bowl",
        bowl,
        "levenberg-marquardt",
        stop={"max_iter": 300},
        verdict="stalled",
        check=_bowl,
    ),
    Case(
        "trust-region gives up near the nonzero minimum of a bowl (hybrj's progress rule)",
        bowl,
        "trust-region",
        stop={"max_iter": 300},
        verdict="stalled",
        check=_bowl_nearby,
    ),
    Case(
        "float32 at scale 2e4: precision floor",
        lambda: wide_affine(torch.float32)[0],
        "newton",
        stop={"atol": 1e-5},
        verdict="precision_floor",
        check=_floor,
    ),
    # -- conditioning at the root ----------------------------------------------------------------
    Case(
        "newton at a double root",
        lambda: scalar("residual", lambda z: z**2, 1.0),
        "newton",
        stop={"max_iter": 100},
        order="linear",
        remedy="newton with the multiplicity step z ← z − 2·J_g⁻¹g",
        check=_multiplicity(2),
    ),
    Case(
        "newton at a triple root",
        lambda: scalar("residual", lambda z: z**3, 1.0),
        "newton",
        stop={"atol": 1e-14, "max_iter": 200},
        order="linear",
        remedy="newton with the multiplicity step z ← z − 3·J_g⁻¹g",
        check=_multiplicity(3),
    ),
    Case(
        "trust-region (Broyden model) at a double root",
        lambda: scalar("residual", lambda z: z**2, 1.0),
        "trust-region",
        order="linear",
        check=_no_multiplicity,
    ),
    Case(
        "broyden with memory 1, linear at a simple root",
        lambda: KNOWN["chandrasekhar"].build(F64),
        "broyden",
        {"memory": 1},
        order="linear",
        check=_no_multiplicity,
    ),
    Case(
        "newton's residual vanishing at infinity (sigmoid)",
        lambda: scalar("residual", torch.sigmoid, 0.0),
        "newton",
        stop={"atol": 1e-10, "max_iter": 100},
        check=_sigmoid,
    ),
    # -- non-finite -----------------------------------------------------------------------------
    Case(
        "log z + 2z leaves its domain",
        lambda: scalar("fixed_point", lambda z: torch.log(z) + 2 * z, 0.5),
        stop={"max_iter": 50},
        verdict="nonfinite",
    ),
    Case(
        "z ← 10 z overflows",
        lambda: affine([[10.0]], [0.0], [1e300]),
        stop={"max_iter": 50, "divergence_factor": 1e300},
        verdict="nonfinite",
    ),
    # -- batches ---------------------------------------------------------------------------------
    Case(
        "logistic batch r = 2.8, 3.2, 3.9",
        lambda: logistic([2.8, 3.2, 3.9]),
        stop={"max_iter": 300},
        verdict=["converged", "oscillating", "chaotic"],
    ),
    Case(
        "tanh period-2 batch, damping verified on every sample",
        lambda: tanh_layer([[-1.5]], [[0.0], [0.05], [-0.05]]),
        stop={"max_iter": 100},
        verdict=["oscillating"] * 3,
        remedy="fixed_point beta=0.4",
        check=_batch_tanh,
    ),
]


@pytest.mark.parametrize("case", SUITE, ids=[c.name for c in SUITE])
def test_labelled_verdict(case: Case) -> None:
    result = run_case(case)
    diag = result.diagnostics
    samples = diag["samples"]
    expected = case.verdict if isinstance(case.verdict, list) else [case.verdict]
    assert [s["classification"] for s in samples[: len(expected)]] == expected, [
        s["reason"] for s in samples
    ]
    s = (
        samples[0]
        if not isinstance(case.verdict, list)
        else samples[diag["trials"].get("sample", 0)]
    )
    if case.period is not None:
        assert s["evidence"]["period"] == case.period
    if case.order is not None:
        assert s["rates"]["order_class"] == case.order
    if case.remedy is not None:
        first = s["advice"][0]
        assert first["kind"] == "verified" and first["label"] == case.remedy, s["remedies"]
        trial = diag["trials"]["runs"][first["trial"]]
        assert trial["status"] == "converged" and trial["verified"] is True
        assert s["remedies"][0] == trial["text"]
    _no_contradiction(s, diag)
    if case.check is not None:
        case.check(result, s)


def _no_contradiction(s: dict[str, Any], diag: dict[str, Any]) -> None:
    """Every stated fact about a remedy was measured: a verified entry has a converged trial, a
    failed one a trial that did not converge; untried ones are labelled as suggestions and
    predict no outcome."""
    runs = (diag.get("trials") or {}).get("runs", [])
    kinds = [e["kind"] for e in s["advice"]]
    assert kinds == sorted(kinds, key=["verified", "note", "tried", "suggestion"].index)
    for entry in s["advice"]:
        if entry["kind"] in ("verified", "tried"):
            trial = runs[entry["trial"]]
            assert trial["verified"] is (entry["kind"] == "verified")
            assert entry["text"].startswith("tried")
        if entry["kind"] == "suggestion":
            assert entry["text"].startswith("suggestion")
        for claim in (" will ", "typically", "restores", "converges to the fixed point the cycle"):
            assert claim not in entry["text"], entry["text"]


def test_the_suite_covers_every_class() -> None:
    classes = set()
    for case in SUITE:
        classes.update(case.verdict if isinstance(case.verdict, list) else [case.verdict])
    assert classes >= {
        "converged",
        "slow",
        "oscillating",
        "chaotic",
        "growing",
        "diverged",
        "stalled",
        "precision_floor",
        "nonfinite",
    }
    assert len(SUITE) >= 30


# -- the misdiagnoses found in review, one case built for each ------------------------------------


def test_iterates_escaping_while_the_residual_saturates_are_divergence() -> None:
    # Newton without a line search on arctan z from 2: |z| squares every step (2 → −3.5 → 13.6 →
    # …) until z is ~1e168, where arctan is flat at ±π/2 and J_g underflows: ‖g‖ stays ≤ π/2.
    # Formerly "stalled at a local minimum of ‖g‖"; it is divergence of the iterates.
    result = run_case(
        Case(
            "",
            lambda: scalar("residual", torch.atan, 2.0),
            "newton",
            {"line_search": False},
            {"max_iter": 100},
        )
    )
    s = result.diagnostics["samples"][0]
    assert s["classification"] == "diverged" and result.sample_status == [Status.DIVERGED]
    assert s["evidence"]["escaping"] is True
    assert s["evidence"]["residual_max"] == pytest.approx(math.pi / 2, rel=1e-12)
    assert "local minimum" not in s["reason"]
    # The first remedy turns the line search on, and it was checked: Newton then finds z* = 0.
    assert s["advice"][0]["label"] == "newton with line search"
    trial = result.diagnostics["trials"]["runs"][s["advice"][0]["trial"]]
    assert trial["verified"] and trial["solution"][0][0] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("solver", ["trust-region", "newton"])
def test_a_residual_levelling_off_at_a_nonzero_minimum_is_a_stall(solver: str) -> None:
    # g(z) = (z − 1)² + 0.01 has no root; |g| has its minimum 0.01 at z = 1. Trust-region creeps
    # towards it (formerly "slow — about 7e14 iterations needed"), Newton circles it (formerly
    # "chaotic"). Both are stalled at a nonzero minimum, with the evidence to show it.
    result = run_case(
        Case(
            "",
            lambda: scalar("residual", lambda z: (z - 1) ** 2 + 0.01, 3.0),
            solver,
            stop={"max_iter": 300},
        )
    )
    s = result.diagnostics["samples"][0]
    assert s["classification"] == "stalled" and result.sample_status == [Status.STALLED]
    assert s["evidence"]["nonzero_level"] is True
    assert s["stationarity"]["stationary"] is True
    assert s["final_residual"] == pytest.approx(0.01, rel=1e-3)
    assert "iterations needed" not in s["reason"]
    assert any("nonzero local minimum of ‖g‖" in text for text in s["remedies"])


@pytest.mark.parametrize("r", [3.7, 3.8, 3.9, 4.0])
def test_bounded_aperiodic_orbits_are_never_growing(r: float) -> None:
    # The logistic map keeps z in [0, 1]: a bounded orbit, whatever its start or run length. No
    # verdict may call it growing, diverged, slow or stalled (runs of 30 iterations or more).
    z0 = np.linspace(0.01, 0.99, 23)
    rs = torch.full((len(z0), 1), r, dtype=F64)
    problem = Problem(
        "logistic",
        "test",
        "fixed_point",
        lambda z, p: p["r"] * z * (1 - z),
        torch.tensor(z0, dtype=F64)[:, None],
        {"r": rs},
        batched_params=frozenset({"r"}),
    )
    options = DiagnosticOptions(trials=False)
    for max_iter in (30, 60, 100, 200):
        result = run(problem, make_solver("fixed_point"), StopRule(atol=1e-12, max_iter=max_iter))
        attach(problem, result, options)
        for s in result.diagnostics["samples"]:
            assert s["classification"] in ("chaotic", "oscillating", "converged"), s["reason"]


def test_an_outward_spiral_is_growth_not_chaos() -> None:
    # z ← 1.0005·R(1) z + c: every iteration multiplies ‖z − z*‖ (and ‖g‖) by exactly 1.0005.
    result = run_case(Case("", lambda: rotation(1.0, 1.0005), stop={"max_iter": 300}))
    s = result.diagnostics["samples"][0]
    assert s["classification"] == "growing"
    assert "×1.0005 per iteration" in s["reason"]  # not "×1"


def test_a_tolerance_below_the_precision_floor_is_its_own_verdict() -> None:
    # float32 at ‖z*‖ ≈ 2e4 resolves z only to ε‖z*‖ ≈ 3e-3: atol 1e-5 cannot be met. The same
    # problem in float64 converges, so the fixed point is not missing.
    problem, exact = wide_affine(torch.float32)
    result = run(problem, make_solver("newton"), StopRule(atol=1e-5, max_iter=200))
    attach(problem, result)
    s = result.diagnostics["samples"][0]
    assert s["classification"] == "precision_floor"
    assert s["evidence"]["resolution"] == pytest.approx(
        float(np.finfo(np.float32).eps) * np.linalg.norm(exact), rel=1e-3
    )
    assert not any("no fixed point was located" in t for t in s["remedies"])
    assert np.allclose(result.solution[0].double().numpy(), exact, rtol=1e-6)
    wide64, _ = wide_affine(F64)
    assert run(wide64, make_solver("newton"), StopRule(atol=1e-5)).status is Status.CONVERGED


def test_a_located_fixed_point_must_be_small_against_the_problems_own_scale() -> None:
    # arctan z + 2 > 0.43 has no root: Newton from the iterates runs to |z| ~ 1e10 and beyond,
    # where ‖g‖ ≈ 0.43 is tiny only next to ‖z‖. It is not a fixed point, and no remedy is built
    # on it (no damping from a spectrum there).
    result = run_case(
        Case(
            "", lambda: scalar("residual", lambda z: torch.atan(z) + 2, 0.0), stop={"max_iter": 300}
        )
    )
    s = result.diagnostics["samples"][0]
    assert s["spectral"]["point"] != "located fixed point"
    assert not any(e.get("options", {}).get("beta") for e in s["advice"])
    assert any("no fixed point" in t or "does not approach zero" in t for t in s["remedies"])


def test_linear_convergence_of_a_secant_model_is_not_a_multiple_root() -> None:
    # Broyden with one stored update converges linearly (×0.48 per iteration) on the Chandrasekhar
    # H-equation, whose root is simple (J_g well conditioned): formerly "multiplicity ≈ 1.06".
    result = run_case(Case("", lambda: KNOWN["chandrasekhar"].build(F64), "broyden", {"memory": 1}))
    s = result.diagnostics["samples"][0]
    assert s["rates"]["order_class"] == "linear" and s["theory"]["linear_newton"] is True
    assert s["theory"]["multiplicity"] is None
    assert s["error_bound"]["near_singular"] is False
    assert "no evidence of a multiple root" in s["theory"]["multiplicity_evidence"]


def test_the_multiplicity_remedy_is_checked_before_it_is_offered() -> None:
    # Without trials the multiplicity step is a labelled suggestion, never a fact; with them it is
    # stated only after it ran (z² from 1: z − 2·z²/(2z) = 0 in one step).
    problem = scalar("residual", lambda z: z**2, 1.0)
    result = run(problem, make_solver("newton"), StopRule(atol=1e-12, max_iter=100))
    attach(problem, result, DiagnosticOptions(trials=False))
    try_remedies(problem, result, DiagnosticOptions(trials=False))
    entry = next(
        e for e in result.diagnostics["samples"][0]["advice"] if "multiplicity step" in e["text"]
    )
    assert entry["kind"] == "suggestion" and entry["text"].startswith("suggestion:")
    assert "not tried: remedy trials are off" in entry["text"]
    try_remedies(problem, result)
    entry = result.diagnostics["samples"][0]["advice"][0]
    assert entry["kind"] == "verified" and "multiplicity step" in entry["label"]
    trial = result.diagnostics["trials"]["runs"][entry["trial"]]
    assert trial["iterations"] == 1 and trial["solution"] == [[0.0]]


def test_a_converged_residual_can_hide_a_large_error_whichever_solver_ran() -> None:
    # g(z) = z³ met to ‖g‖ ≤ 1e-12 leaves z ≈ 1e-4, far above ‖g‖: the error estimate says so for
    # Anderson too, not only for Newton-type solvers.
    problem = scalar("residual", lambda z: z**3, 0.5)
    result = run(problem, make_solver("anderson"), StopRule(atol=1e-12, max_iter=500))
    attach(problem, result)
    s = result.diagnostics["samples"][0]
    assert result.status is Status.CONVERGED
    z = abs(result.solution[0, 0].item())
    bound = s["error_bound"]
    assert bound["near_singular"] is True and "hides an error" in bound["statement"]
    # ‖g‖/σ_min = z³/(3z²) = z/3: the first-order estimate is the true error over m = 3.
    assert bound["forward_error_estimate"] == pytest.approx(z / 3, rel=1e-9)
    assert z > 1e3 * s["final_residual"]
