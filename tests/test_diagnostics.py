"""Convergence diagnostics against theory: rates, spectra, periods, orders, certificates, remedies.

Problems are built directly in Python (no config files), so each expected number comes from the
mathematics of the map, never from the code's own output.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deqcli.analyses.remedies import try_remedies
from deqcli.diagnostics import DiagnosticOptions, attach, precheck
from deqcli.diagnostics.dynamics import order_estimate
from deqcli.diagnostics.spectral import damping_range
from deqcli.problems.base import Problem, Structure
from deqcli.problems.tanh_layer import tanh_layer_map
from deqcli.result import Status
from deqcli.solvers import make_solver
from deqcli.solvers.base import StopRule, run

F64 = torch.float64


# -- problem builders ---------------------------------------------------------------------------


def logistic(rs: list[float], z0: float = 0.5) -> Problem:
    """z ← r z (1 − z), one r per sample."""
    r = torch.tensor(rs, dtype=F64)[:, None]
    return Problem(
        "logistic",
        "test",
        "fixed_point",
        lambda z, p: p["r"] * z * (1 - z),
        torch.full((len(rs), 1), z0, dtype=F64),
        {"r": r},
        batched_params=frozenset({"r"}),
    )


def affine(A: list[list[float]], c: list[float], z0: list[float]) -> Problem:
    """z ← A z + c."""
    return Problem(
        "affine",
        "test",
        "fixed_point",
        lambda z, p: z @ p["A"].mT + p["c"],
        torch.tensor([z0], dtype=F64),
        {"A": torch.tensor(A, dtype=F64), "c": torch.tensor(c, dtype=F64)},
    )


def residual(fn, z0: float) -> Problem:
    """A scalar root-finding problem g(z) = 0."""
    return Problem("root", "test", "residual", lambda z, p: fn(z), torch.tensor([[z0]], dtype=F64))


def tanh_layer(W: list[list[float]], x: list[list[float]], z0: list[list[float]]) -> Problem:
    """z = tanh(W z + x) with its structural certificate L ≤ ‖W‖₂."""
    Wt = torch.tensor(W, dtype=F64)
    norm = float(torch.linalg.matrix_norm(Wt, ord=2))
    return Problem(
        "tanh",
        "tanh_layer",
        "fixed_point",
        tanh_layer_map,
        torch.tensor(z0, dtype=F64),
        {"W": Wt, "x": torch.tensor(x, dtype=F64)},
        structure=Structure(lipschitz_bound=norm, lipschitz_reason="L ≤ ‖W‖₂"),
        batched_params=frozenset({"x"}),
    )


def gradient_descent(lr: float, eigenvalues: tuple[float, ...] = (1.0, 2.0)) -> Problem:
    """w ← w − lr·H w for L(w) = ½ wᵀHw; the structure carries H, as the gradient_descent kind does."""
    H = torch.diag(torch.tensor(eigenvalues, dtype=F64))
    L = max(abs(1 - lr * lam) for lam in eigenvalues)
    return Problem(
        "gd",
        "gradient_descent",
        "fixed_point",
        lambda w, p: w - lr * w @ p["H"],
        torch.ones(1, len(eigenvalues), dtype=F64),
        {"H": H},
        structure=Structure(lipschitz_bound=L, lipschitz_reason="quadratic loss", hessian=H, lr=lr),
    )


def solve(problem: Problem, solver: str = "fixed_point", options=None, diag=None, **stop):
    """Run, diagnose and try the planned remedies, as deq solve does."""
    result = run(problem, make_solver(solver, dict(options or {})), StopRule(**stop))
    attach(problem, result, diag)
    try_remedies(problem, result, diag)
    return result


def sample(result, b: int = 0) -> dict:
    return result.diagnostics["samples"][b]


# -- logistic map -----------------------------------------------------------------------------


def test_logistic_converging_rate_is_rho_of_the_jacobian() -> None:
    r = 2.8
    res = solve(logistic([r]), atol=1e-12, max_iter=300)
    s = sample(res)
    assert res.sample_status == [Status.CONVERGED]
    assert s["classification"] == "converged"
    spec = s["spectral"]
    assert spec["point"] == "solution"
    # f'(z*) = r(1 − 2 z*) = 2 − r at z* = 1 − 1/r.
    assert spec["dominant_eigenvalue"][0] == pytest.approx(2 - r, abs=1e-9)
    assert spec["spectral_radius"] == pytest.approx(r - 2, abs=1e-9)
    assert s["rates"]["step_rate"] == pytest.approx(0.8, abs=1e-3)
    assert s["rates"]["order"] == pytest.approx(1.0, abs=0.05)
    assert s["rates"]["order_class"] == "linear"
    assert s["theory"]["expected_order"] == "linear" and s["theory"]["rate_agrees"] is True
    assert s["remedies"] == []


def test_logistic_period_two_matches_the_cycle_formula() -> None:
    r = 3.2
    res = solve(logistic([r]), atol=1e-12, max_iter=200)
    s = sample(res)
    assert res.sample_status == [Status.OSCILLATING]  # refined from the driver's max_iter
    assert s["driver_status"] == "max_iter" and s["status"] == "oscillating"
    ev = s["evidence"]
    assert ev["period"] == 2
    root = math.sqrt((r - 3) * (r + 1))
    cycle = sorted([(r + 1 - root) / (2 * r), (r + 1 + root) / (2 * r)])
    assert sorted(p[0] for p in ev["points"]) == pytest.approx(cycle, abs=1e-10)
    assert ev["amplitude"] == pytest.approx(root / r / 2, abs=1e-10)
    # The 2-cycle's multiplier f'(a) f'(b) = 4 + 2r − r².
    assert ev["cycle_multiplier"] == pytest.approx(4 + 2 * r - r * r, abs=1e-8)
    spec = s["spectral"]
    assert spec["point"] == "located fixed point"
    assert spec["fixed_point"][0] == pytest.approx(1 - 1 / r, abs=1e-9)
    assert spec["spectral_radius"] == pytest.approx(r - 2, abs=1e-8)
    assert spec["damping"]["beta_max"] == pytest.approx(2 / (1 + (r - 2)), abs=1e-8)
    # The damping the spectrum gives (β ≈ 1/(1 + ρ) = 0.45, inside β < 2/(1 + ρ) = 0.909) was tried
    # and reached the fixed point 1 − 1/r: a verified remedy, listed first and stated as a fact.
    damping = s["advice"][0]
    assert damping["kind"] == "verified" and damping["options"] == {"beta": 0.45}
    assert "2/(1 + ρ) = 0.909" in damping["why"]
    assert s["remedies"][0].startswith("tried: fixed_point beta=0.45 → converged in")
    assert "to the fixed point the diagnostics located" in s["remedies"][0]
    trial = res.diagnostics["trials"]["runs"][damping["trial"]]
    assert trial["solution"][0][0] == pytest.approx(1 - 1 / r, abs=1e-10)
    assert any("cycle attracts (multiplier ρ = 0.16 < 1)" in t for t in s["remedies"])


def test_logistic_longer_periods_and_chaos() -> None:
    # r = 3.5: stable 4-cycle; r = 3.835: inside the period-3 window (1 + √8, 3.8415); r = 3.9: chaos.
    res = solve(logistic([3.5, 3.835, 3.9], z0=0.5), atol=1e-12, max_iter=300)
    four, three, chaos = res.diagnostics["samples"]
    assert four["classification"] == "oscillating" and four["evidence"]["period"] == 4
    assert three["classification"] == "oscillating" and three["evidence"]["period"] == 3
    assert four["evidence"]["cycle_multiplier"] < 1 and three["evidence"]["cycle_multiplier"] < 1
    assert chaos["classification"] == "chaotic"
    assert res.sample_status == [Status.OSCILLATING, Status.OSCILLATING, Status.MAX_ITER]
    # The repelling fixed point 1 − 1/r has f' = 2 − r: ρ = 1.9 at r = 3.9.
    assert chaos["spectral"]["spectral_radius"] == pytest.approx(1.9, abs=1e-8)


def test_max_period_is_an_option() -> None:
    res = solve(logistic([3.5]), diag=DiagnosticOptions(max_period=3), atol=1e-12, max_iter=300)
    assert sample(res)["classification"] != "oscillating"
    assert res.sample_status == [Status.MAX_ITER]
    assert DiagnosticOptions(max_period=20).effective_max_period(32) == 10


# -- linear maps --------------------------------------------------------------------------------


def test_non_normal_map_grows_then_converges_and_is_not_divergent() -> None:
    # ‖A‖₂ = (4 + √(16 + 4·0.25))/2 = (4 + √17)/2, ρ(A) = 0.5. From z* + (I − A)⁻¹(0, 1), the
    # residual is g_t = A^t (0, 1): ‖g‖ = 1, then ≈ 4.03, 4.0, 3.0, … before it decays like t·0.5^t.
    res = solve(affine([[0.5, 4.0], [0.0, 0.5]], [1.0, 1.0], [34.0, 4.0]), atol=1e-12, max_iter=200)
    history = [row[0] for row in res.residual_history]
    assert max(history) > 3 * history[0]  # the residual really grew first (×4, then decays)
    s = sample(res)
    assert s["rates"]["peak_growth"] == pytest.approx(math.sqrt(4.0**2 + 0.5**2), rel=1e-12)
    assert res.sample_status == [Status.CONVERGED] and s["classification"] == "converged"
    assert s["spectral"]["norm2"] == pytest.approx((4 + math.sqrt(17)) / 2, rel=1e-12)
    assert s["spectral"]["spectral_radius"] == pytest.approx(0.5, abs=1e-7)
    assert s["banach"] is None  # ‖J‖₂ > 1: no contraction to quote
    assert s["theory"]["observed_order"] == pytest.approx(1.0, abs=0.05)


def test_transient_growth_cut_short_is_not_called_divergence() -> None:
    # A Jordan block 0.95 I + N (n = 5): ‖A^t‖ grows ~ C(t,4)·0.95^t for dozens of steps, ρ = 0.95.
    n = 5
    A = (0.95 * np.eye(n) + np.diag(np.ones(n - 1), 1)).tolist()
    res = solve(affine(A, [0.0] * n, [1.0] * n), atol=1e-10, max_iter=30)
    history = [row[0] for row in res.residual_history]
    assert history[-1] > 100 * history[0]
    s = sample(res)
    assert s["classification"] == "growing" and s["transient"] is True
    assert res.sample_status == [Status.MAX_ITER]
    assert s["spectral_last"]["spectral_radius"] == pytest.approx(0.95, abs=1e-6)
    assert "non-normal" in " ".join(s["remedies"])


def test_matrix_free_estimates_match_exact_values() -> None:
    # Forced matrix-free on the non-normal 2×2 map: power iteration on AᵀA and Arnoldi on A.
    problem = affine([[0.5, 4.0], [0.0, 0.5]], [1.0, 1.0], [10.0, -10.0])
    res = solve(problem, diag=DiagnosticOptions(dense_max_dim=0), atol=1e-12, max_iter=200)
    spec = sample(res)["spectral"]
    assert spec["method"] == "matrix-free" and spec["estimate"] is True
    assert spec["norm2"] == pytest.approx((4 + math.sqrt(17)) / 2, rel=1e-10)
    assert spec["spectral_radius"] == pytest.approx(0.5, abs=1e-6)


def test_beyond_dense_max_dim_the_estimates_are_matrix_free() -> None:
    # n = 80 > dense_max_dim = 64: eigenvalues in [−0.5, 0.5] plus a separated one at −0.9, so the
    # power and Arnoldi iterations converge to ‖A‖₂ = ρ(A) = 0.9 well within their budgets.
    n = 80
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    eig = torch.linspace(-0.5, 0.5, n, dtype=F64)
    eig[0] = -0.9
    A = (Q @ torch.diag(eig) @ Q.T).tolist()
    options = DiagnosticOptions(dense_max_dim=64)
    res = solve(affine(A, [1.0] * n, [0.0] * n), diag=options, atol=1e-10, max_iter=400)
    s = sample(res)
    assert res.sample_status == [Status.CONVERGED]
    assert s["spectral"]["method"] == "matrix-free"
    assert s["spectral"]["products"] == {"jvp": 31 + 20, "vjp": 30}
    assert s["spectral"]["norm2"] == pytest.approx(0.9, rel=1e-6)
    assert s["spectral"]["spectral_radius"] == pytest.approx(0.9, rel=1e-6)
    assert s["rates"]["step_rate"] == pytest.approx(0.9, abs=0.02)
    # Beyond the dense analysis σ_min(J_g) is estimated matrix-free: J_g = I − A is symmetric with
    # eigenvalues 1 − λ ∈ [0.5, 1.5] ∪ {1.9}, so σ_min = 0.5 and σ_max = 1.9.
    bound = s["error_bound"]
    assert bound["method"] == "inverse lanczos"
    assert bound["sigma_min"] == pytest.approx(0.5, rel=1e-4)
    assert bound["sigma_max"] == pytest.approx(1.9, rel=1e-6)
    assert bound["forward_error_estimate"] == pytest.approx(bound["residual"] / 0.5, rel=1e-4)
    assert bound["near_singular"] is False


def test_matrix_free_error_bounds_estimate_the_whole_batch_at_once(monkeypatch) -> None:
    # z ← s·A z + c per sample, A as above (eigenvalues in [−0.5, 0.5] and −0.9): J_g = I − s·A has
    # eigenvalues 1 − s·λ. s = 1: σ ∈ [0.5, 1.9]; s = 0.5: [0.75, 1.45]; s = −1: [0.1, 1.5].
    from deqcli.diagnostics import spectral

    n = 80
    gen = torch.Generator().manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    eig = torch.linspace(-0.5, 0.5, n, dtype=F64)
    eig[0] = -0.9
    problem = Problem(
        "scaled",
        "test",
        "fixed_point",
        lambda z, p: p["s"] * (z @ p["A"].mT) + 1.0,
        torch.zeros(3, n, dtype=F64),
        {"A": Q @ torch.diag(eig) @ Q.T, "s": torch.tensor([[1.0], [0.5], [-1.0]], dtype=F64)},
        batched_params=frozenset({"s"}),
    )
    calls = []
    estimate = spectral.sigma_min
    monkeypatch.setattr(
        spectral, "sigma_min", lambda op, **kw: calls.append(op.batch) or estimate(op, **kw)
    )
    res = solve(problem, "newton", diag=DiagnosticOptions(dense_max_dim=64), atol=1e-10)
    assert res.sample_status == [Status.CONVERGED] * 3
    assert calls == [3]  # one inverse Lanczos for the three samples, none at the start
    # σ_max is a Golub–Kahan estimate from below: fast where it stands apart (1.9, 1.45), slower
    # at the edge of a continuum (s = −1: 1 + λ fills [0.5, 1.5]).
    expected = [(0.5, 1.9, 1e-6), (0.75, 1.45, 1e-6), (0.1, 1.5, 1e-4)]
    for b, (low, high, rel) in enumerate(expected):
        bound = sample(res, b)["error_bound"]
        assert bound["method"] == "inverse lanczos"
        assert bound["sigma_min"] == pytest.approx(low, rel=1e-4)
        assert bound["sigma_max"] == pytest.approx(high, rel=rel)
        assert bound["sigma_max"] <= high * (1 + 1e-12)  # from below, up to rounding
        assert bound["sigma_max_at_start"] == pytest.approx(high, rel=rel)  # J is constant


def test_a_near_singular_jacobian_beyond_the_dense_analysis_is_flagged() -> None:
    # n = 80 > dense_max_dim = 64: z ← A z + c with A symmetric, eigenvalues in [−0.5, 0.5], one at
    # −0.9 and one at 1 − 1e-7, so J_g = I − A has σ_min = 1e-7 and σ_max = 1.9; c puts z* at
    # (1, …, 1). Newton solves the affine problem at once; the matrix-free estimate must still find
    # σ_min and call J_g near singular.
    n = 80
    gen = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=F64))
    eig = torch.linspace(-0.5, 0.5, n, dtype=F64)
    eig[0], eig[1] = -0.9, 1 - 1e-7
    A = Q @ torch.diag(eig) @ Q.T
    c = (torch.eye(n, dtype=F64) - A) @ torch.ones(n, dtype=F64)  # z* = (1, …, 1)
    options = DiagnosticOptions(dense_max_dim=64)
    problem = affine(A.tolist(), c.tolist(), [0.0] * n)
    res = solve(problem, "newton", diag=options, atol=1e-10, max_iter=20)
    bound = sample(res)["error_bound"]
    assert res.sample_status == [Status.CONVERGED]
    assert bound["method"] == "inverse lanczos"
    assert bound["sigma_min"] == pytest.approx(1e-7, rel=1e-3)
    assert bound["sigma_max"] == pytest.approx(1.9, rel=1e-6)
    assert bound["near_singular"] is True and "near singular" in bound["statement"]


def test_slow_convergence_predicts_the_iterations_needed() -> None:
    # z ← 0.999 z + 0.001 from −10: ‖g(z_t)‖ = 0.001·11·0.999^t, below 1e-10 after t iterations.
    res = solve(affine([[0.999]], [0.001], [-10.0]), atol=1e-10, max_iter=500)
    s = sample(res)
    assert s["classification"] == "slow" and res.sample_status == [Status.MAX_ITER]
    exact = math.ceil(math.log(1e-10 / 0.011) / math.log(0.999))
    assert s["evidence"]["iterations_needed"] == pytest.approx(exact, rel=0.01)
    assert s["evidence"]["rate"] == pytest.approx(0.999, abs=1e-9)
    # Anderson, tried first, solves the affine map in a couple of steps: a verified remedy. The
    # 18 000 more iterations plain iteration needs do not fit the trial budget (the run's own 501
    # evaluations): that stays a suggestion, marked as not tried, with the budget it needs.
    assert s["remedies"][0].startswith("tried: anderson → converged in")
    assert res.diagnostics["trials"]["budget"]["evaluations"] == 501
    more = next(e for e in s["advice"] if "more iterations of fixed_point" in e["text"])
    assert more["kind"] == "suggestion" and "not tried: about" in more["text"]
    need = s["evidence"]["iterations_needed"]
    assert f"suggestion: raise max_iter to about {math.ceil(need * 1.1)}" in s["remedies"]


def test_slow_sign_alternating_convergence_is_not_an_oscillation() -> None:
    # z ← −0.9999 z + 1: the iterates alternate around 1/1.9999 with an amplitude shrinking ×0.9999.
    res = solve(affine([[-0.9999]], [1.0], [0.0]), atol=1e-12, max_iter=200)
    s = sample(res)
    assert s["classification"] == "slow"
    assert res.sample_status == [Status.MAX_ITER]
    assert s["evidence"]["rate"] == pytest.approx(0.9999, abs=1e-9)


def test_pure_rotation_is_bounded_and_aperiodic() -> None:
    # Rotation by one radian: |λ| = 1, no period, ‖g‖ constant while z moves — not a stall.
    c, s_ = math.cos(1.0), math.sin(1.0)
    res = solve(affine([[c, -s_], [s_, c]], [1.0, 0.0], [0.0, 0.0]), atol=1e-12, max_iter=200)
    s = sample(res)
    assert s["classification"] == "chaotic"
    assert s["spectral"]["spectral_radius"] == pytest.approx(1.0, abs=1e-12)


# -- Newton -------------------------------------------------------------------------------------


def test_newton_on_a_simple_root_is_quadratic() -> None:
    res = solve(residual(lambda z: z**2 - 2, 1.0), "newton", atol=1e-12, max_iter=50)
    s = sample(res)
    assert res.solution[0, 0].item() == pytest.approx(math.sqrt(2), abs=1e-14)
    assert s["rates"]["order"] == pytest.approx(2.0, abs=0.1)
    assert s["rates"]["order_class"] == "quadratic"
    assert s["theory"]["expected_order"] == "quadratic"
    assert not s["theory"].get("linear_newton")
    # J_g = 2z, so cond(J_g) = 1 in one dimension and σ_min = 2√2 at the root.
    assert s["newton"]["cond_at_solution"] == pytest.approx(1.0)
    assert s["newton"]["sigma_min_at_solution"] == pytest.approx(2 * math.sqrt(2), rel=1e-12)
    assert s["newton"]["near_singular"] is False
    assert s["remedies"] == []


def test_newton_on_a_double_root_is_linear_with_rate_one_half() -> None:
    # g(z) = z²: Newton gives z_{k+1} = z_k / 2 exactly; ‖g‖ falls by 1/4 per step.
    res = solve(residual(lambda z: z**2, 1.0), "newton", atol=1e-12, max_iter=100)
    s = sample(res)
    assert res.sample_status == [Status.CONVERGED]
    assert s["rates"]["order"] == pytest.approx(1.0, abs=1e-6)
    assert s["rates"]["step_rate"] == pytest.approx(0.5, abs=1e-12)
    assert s["rates"]["residual_rate"] == pytest.approx(0.25, abs=1e-12)
    assert s["rates"]["residual_to_step_exponent"] == pytest.approx(2.0, abs=1e-9)
    assert s["theory"]["linear_newton"] is True
    assert s["theory"]["multiplicity"] == pytest.approx(2.0, abs=1e-9)
    assert s["newton"]["near_singular"] is True
    # The error estimate ‖g‖/σ_min = z²/(2z) = z/2 is half the true error z* − z = −z (m = 2).
    z = res.solution[0, 0].item()
    assert s["error_bound"]["near_singular"] is True
    assert s["error_bound"]["forward_error_estimate"] == pytest.approx(abs(z) / 2, rel=1e-9)
    # The multiplicity step z ← z − 2·J_g⁻¹g was checked before it is offered: z − 2·z²/(2z) = 0.
    assert s["remedies"][0].startswith(
        "tried: newton with the multiplicity step z ← z − 2·J_g⁻¹g → converged in 1 iteration"
    )
    assert "a root of multiplicity ≈ 2" in " ".join(s["remedies"])


def test_newton_without_a_root_stalls_at_a_local_minimum() -> None:
    # g(z) = z² + 1: Newton from 1 lands on z = 0 (J_g = 0), where |g| = 1 is minimal.
    res = solve(residual(lambda z: z**2 + 1, 1.0), "newton", atol=1e-12, max_iter=40)
    s = sample(res)
    assert res.sample_status == [Status.STALLED]
    assert s["classification"] == "stalled"
    assert s["stationarity"]["stationary"] is True
    assert "local minimum" in s["reason"] and "local minimum" in s["remedies"][0]


# -- tanh layer ---------------------------------------------------------------------------------


def test_tanh_contraction_certificate_and_banach_bounds_hold() -> None:
    W = [[0.3, -0.5], [0.4, 0.2]]
    problem = tanh_layer(W, [[0.3, -1.0]], [[0.0, 0.0]])
    res = solve(problem, atol=1e-10, max_iter=200)
    cert = res.diagnostics["certificate"]
    L = float(np.linalg.norm(np.array(W), 2))
    assert cert["contraction"] is True and cert["lipschitz_bound"] == pytest.approx(L)
    s = sample(res)
    banach = s["banach"]
    assert banach["rigorous"] is True and banach["source"] == "certificate"
    # Banach's a-priori count is an upper bound on the iterations plain iteration needs.
    assert banach["actual_iterations"] <= banach["a_priori_iterations"]
    assert banach["a_priori_iterations"] == math.ceil(
        math.log(1e-10 / res.residual_history[0][0]) / math.log(L)
    )
    # The a-posteriori bounds hold for the true fixed point (iterated to rounding level).
    z = res.solution.clone()
    for _ in range(200):
        z = problem.raw_f(z)
    error = float(torch.linalg.vector_norm(res.solution - z))
    assert error <= banach["error_bound"] and error <= banach["a_posteriori_bound"]
    # ρ(J) ≤ ‖J‖₂ ≤ ‖W‖₂ at the solution.
    spec = s["spectral"]
    assert spec["spectral_radius"] <= spec["norm2"] + 1e-12 <= L + 1e-12


def test_tanh_with_negative_weight_oscillates_between_plus_and_minus_a() -> None:
    res = solve(tanh_layer([[-1.5]], [[0.0]], [[0.1]]), atol=1e-12, max_iter=100)
    s = sample(res)
    assert res.sample_status == [Status.OSCILLATING]
    assert s["evidence"]["period"] == 2
    # a solves a = tanh(1.5 a), a > 0: bisection.
    lo, hi = 0.1, 1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.tanh(1.5 * mid) > mid else (lo, mid)
    a = (lo + hi) / 2
    assert sorted(p[0] for p in s["evidence"]["points"]) == pytest.approx([-a, a], abs=1e-10)
    assert s["evidence"]["amplitude"] == pytest.approx(a, abs=1e-10)
    assert s["spectral"]["fixed_point"] == pytest.approx([0.0], abs=1e-12)
    assert s["spectral"]["spectral_radius"] == pytest.approx(1.5, abs=1e-12)
    assert s["spectral"]["damping"]["beta_max"] == pytest.approx(0.8, abs=1e-12)
    # The certificate's bound ‖W‖₂ = 1.5 ≥ 1 proves nothing, and says so.
    assert res.diagnostics["certificate"]["contraction"] is False
    assert "proves nothing" in res.diagnostics["certificate"]["statement"]


def test_damping_the_period_two_tanh_layer_converges_as_advised() -> None:
    problem = tanh_layer([[-1.5]], [[0.0]], [[0.1]])
    advised = sample(solve(problem, atol=1e-12, max_iter=100))["spectral"]["damping"]["beta_best"]
    res = solve(problem, options={"beta": advised}, atol=1e-12, max_iter=100)
    assert res.sample_status == [Status.CONVERGED]
    assert res.solution[0, 0].item() == pytest.approx(0.0, abs=1e-11)


# -- gradient descent ---------------------------------------------------------------------------


def test_gradient_descent_just_below_the_limit_converges_at_the_predicted_rate() -> None:
    # λ(H) = {1, 2}: lr = 0.95 < 2/λmax = 1, rate max|1 − lr λ| = 0.9.
    res = solve(gradient_descent(0.95), atol=1e-10, max_iter=400)
    s = sample(res)
    assert res.sample_status == [Status.CONVERGED]
    assert s["rates"]["step_rate"] == pytest.approx(0.9, abs=1e-6)
    assert s["spectral"]["spectral_radius"] == pytest.approx(0.9, abs=1e-12)
    gd = res.diagnostics["certificate"]["gradient_descent"]
    assert gd["lr_limit"] == pytest.approx(1.0) and gd["lr_best"] == pytest.approx(2 / 3)
    assert gd["rate_best"] == pytest.approx(1 / 3)


def test_gradient_descent_just_above_the_limit_diverges_with_the_lr_remedy() -> None:
    # lr = 1.05 > 1: the error along λmax = 2 is multiplied by 1 − 2.1 = −1.1 per step.
    res = solve(gradient_descent(1.05), atol=1e-10, max_iter=100)
    s = sample(res)
    assert s["driver_status"] == "max_iter"  # 1.1^100 ≈ 1.4e4 is below the driver's 1e8 guard
    assert res.sample_status == [Status.DIVERGED] and s["classification"] == "diverged"
    assert s["evidence"]["growth_rate"] == pytest.approx(1.1, abs=1e-9)
    # Damping by β = lr_best/lr is gradient descent with the best learning rate 2/(λmin + λmax):
    # tried, it converges (rate 1/3), so it comes first; the exact limit is stated as a fact.
    first = s["advice"][0]
    assert first["kind"] == "verified" and first["options"]["beta"] == pytest.approx((2 / 3) / 1.05)
    assert "learning rate β·lr = 0.6667" in s["remedies"][0] and "converged in" in s["remedies"][0]
    note = next(t for t in s["remedies"] if "lr 1.05 > 2/λmax = 1" in t)
    assert "0.6667" in note


# -- non-finite values --------------------------------------------------------------------------


def test_nonfinite_says_whether_the_map_or_the_iterate_failed() -> None:
    # log z + 2z: the step from 0.5 lands at a negative z where log is undefined (z itself finite).
    undefined = Problem(
        "log",
        "test",
        "fixed_point",
        lambda z, p: torch.log(z) + 2 * z,
        torch.tensor([[0.5]], dtype=F64),
    )
    s = sample(solve(undefined, atol=1e-10, max_iter=50))
    assert s["classification"] == "nonfinite" and s["evidence"]["nonfinite"] == "residual"
    # Its fixed point solves log z = −z: the omega constant, where f' = 1/z + 2 > 1.
    assert s["spectral"]["fixed_point"][0] == pytest.approx(0.5671432904097838, abs=1e-9)
    assert s["spectral"]["damping"]["stabilisable"] is False

    # z ← 10 z from 1e300: the residual overflows after growing ×10 per step.
    overflow = affine([[10.0]], [0.0], [1e300])
    res = solve(overflow, atol=1e-10, max_iter=50, divergence_factor=1e300)
    s = sample(res)
    assert res.sample_status == [Status.NONFINITE]
    assert s["evidence"]["nonfinite"] == "overflow"
    assert s["evidence"]["growth_rate"] == pytest.approx(10.0, rel=1e-9)


# -- building blocks ----------------------------------------------------------------------------


def test_order_estimates_on_known_sequences() -> None:
    opts = DiagnosticOptions()
    linear = [0.5**k for k in range(30)]
    quadratic = [10.0 ** (-(2**k)) for k in range(5)]  # 1e-1, 1e-2, 1e-4, 1e-8, 1e-16
    assert order_estimate(linear, 0.0, opts)["order"] == pytest.approx(1.0)
    assert order_estimate(quadratic, 0.0, opts)["order"] == pytest.approx(2.0)
    assert order_estimate([1.0, 1.0, 1.0], 0.0, opts)["order"] is None


def test_damping_range_from_the_spectrum() -> None:
    one = damping_range(np.array([-1.2]))
    assert one["beta_max"] == pytest.approx(2 / 2.2) and one["rate_best"] == pytest.approx(
        0.0, abs=1e-9
    )
    # μ = 1 − λ ∈ {2.2, 0.1}: best β = 2/(2.2 + 0.1), rate (2.2 − 0.1)/(2.2 + 0.1).
    two = damping_range(np.array([-1.2, 0.9]))
    assert two["beta_best"] == pytest.approx(2 / 2.3, abs=1e-9)
    assert two["rate_best"] == pytest.approx(2.1 / 2.3, abs=1e-9)
    # λ = 0.5 ± 0.5i: μ = 0.5 ∓ 0.5i, β < 2 Re μ / |μ|² = 2.
    complex_pair = damping_range(np.array([0.5 + 0.5j, 0.5 - 0.5j]))
    assert complex_pair["beta_max"] == pytest.approx(2.0)
    assert damping_range(np.array([1.5]))["stabilisable"] is False


def test_diagnostics_do_not_change_the_counts_and_encode_as_strict_json() -> None:
    problem = logistic([2.8, 3.2])
    plain = run(problem, make_solver("fixed_point", {}), StopRule(atol=1e-12, max_iter=200))
    counted = run(problem, make_solver("fixed_point", {}), StopRule(atol=1e-12, max_iter=200))
    before = (list(problem.counter.nfev), list(problem.counter.jvp), list(problem.counter.vjp))
    attach(problem, counted)
    assert (
        list(problem.counter.nfev),
        list(problem.counter.jvp),
        list(problem.counter.vjp),
    ) == before
    assert counted.counts == plain.counts
    doc = counted.to_dict()
    text = json.dumps(doc, allow_nan=False)
    assert json.loads(text)["samples"][1]["diagnostics"]["classification"] == "oscillating"
    assert doc["status"] == "oscillating"
    assert "settings" in doc["diagnostics"] and "samples" not in doc["diagnostics"]


def test_precheck_estimates_the_lipschitz_constant_near_the_start() -> None:
    # For z ← A z + c every secant ratio is ‖A(u − v)‖/‖u − v‖ ∈ [σ_min, σ_max]: here [0.5, 0.8].
    problem = affine([[0.8, 0.0], [0.0, 0.5]], [1.0, 1.0], [3.0, 4.0])
    pre = precheck(problem)
    sec = pre["samples"][0]["secant"]
    assert 0.5 - 1e-12 <= sec["estimate"] <= 0.8 + 1e-12
    assert sec["pairs"] == DiagnosticOptions().precheck_pairs
    assert "estimate" in sec["label"] and "< 1" in sec["verdict"]
    assert pre["samples"][0]["jacobian_at_start"]["norm2"] == pytest.approx(0.8)
    assert problem.counter.nfev == [0]


def test_a_newton_run_stopped_at_a_nonzero_minimum_reports_that_level() -> None:
    # g(z) = (z − 1)² + 0.01: Newton creeps to z = 1, where ‖g‖ = 0.01 is minimal, and is stopped
    # there as stalled within a few iterations. ‖g‖ stays at 0.01 from then on: the level is that,
    # not an extrapolation of the fast fall before it (Aitken's Δ² on that gives about 0.0096).
    res = solve(residual(lambda z: (z - 1) ** 2 + 0.01, 3.0), "newton", atol=1e-12, max_iter=300)
    s = sample(res)
    assert res.sample_status == [Status.STALLED] and res.nit < 25
    assert s["classification"] == "stalled"
    assert s["evidence"]["level"] == pytest.approx(0.01, rel=1e-12)
    assert s["evidence"]["nonzero_level"] is True
    assert s["stationarity"]["stationary"] is True  # ∇½‖g‖² = J_gᵀg ≈ 0: a local minimum


def test_the_located_fixed_point_does_not_depend_on_where_the_data_lies() -> None:
    # Gradient descent with lr 1.05 on ½wᵀHw, H = diag(1, 2), diverges; the diagnostics locate the
    # fixed point it missed, w* = 0, by Newton from the centre of the iterates. One Newton step
    # lands on 0 up to rounding, and that rounding must not depend on the allocator's state
    # (with LAPACK's gelsy under MKL it came out 0.0 or -5.0e-92 from one solve to the next).
    from random import Random

    from deqcli import api
    from deqcli.config import load_config
    from tests.conftest import CONFIGS

    cfg = load_config(CONFIGS / "diagnostics" / "gd_lr_too_big.yaml")
    rng, held, found = Random(0), [], set()
    for _ in range(30):
        held.append(torch.empty(rng.randint(1, 5000)))  # moves where the next tensors lie
        spectral = api.solve(cfg).diagnostics["samples"][0]["spectral"]
        assert spectral["point"] == "located fixed point"
        found.add((tuple(spectral["fixed_point"]), spectral["point_residual"]))
    assert len(found) == 1
    ((point, residual),) = found
    assert max(map(abs, point)) < 1e-90 and residual < 1e-90
