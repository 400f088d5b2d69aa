"""dz*/da by the implicit function theorem, against closed forms and dense linear algebra."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deqcli.analyses.sensitivity import gmres, loss_gradient, sensitivity
from deqcli.api import load_problem, solve
from deqcli.config import parse_config
from deqcli.errors import UsageError
from deqcli.problems.base import Problem
from tests.conftest import CONFIGS


def solved(text: str) -> tuple[Problem, torch.Tensor]:
    cfg = parse_config(text, base_dir=CONFIGS)
    problem = load_problem(cfg)
    result = solve(cfg, problem=problem, diagnostics=False)
    assert result.status.ok
    return problem, result.solution


def linear(a: float, b: float) -> str:
    return f"""
problem: {{kind: expression, fixed_point: a * z + b, params: {{a: {a}, b: {b}}}}}
solver: newton
run: {{atol: 1.0e-14, max_iter: 20}}
"""


@pytest.mark.parametrize(("a", "b"), [(0.5, 2.0), (-0.7, 1.5), (0.9, -3.0), (2.5, 1.0)])
def test_linear_map_sensitivities_are_b_over_one_minus_a_squared(a: float, b: float) -> None:
    # z* = b/(1 − a): dz*/da = b/(1 − a)², dz*/db = 1/(1 − a) — also for a = 2.5, where plain
    # iteration diverges but the fixed point (found by Newton) is still a smooth function of a.
    problem, z = solved(linear(a, b))
    assert float(z[0, 0]) == pytest.approx(b / (1 - a), rel=1e-13)
    da = sensitivity(problem, z, "a")
    db = sensitivity(problem, z, "b")
    assert da.jacobian.shape == (1, 1)
    assert float(da.jacobian[0, 0]) == pytest.approx(b / (1 - a) ** 2, rel=1e-12)
    assert float(db.jacobian[0, 0]) == pytest.approx(1 / (1 - a), rel=1e-12)
    assert da.solve.converged and da.solve.residual <= 1e-11
    assert da.conditioning.sigma_min[0] == pytest.approx(abs(1 - a), rel=1e-12)
    assert da.conditioning.spectral_radius[0] == pytest.approx(abs(a), rel=1e-12)
    assert not any(da.conditioning.near_singular) and not da.notes


def test_scalar_tanh_layer_matches_the_ift_formula() -> None:
    # z = tanh(w z + x): with s = 1 − z², dz/dw = s z / (1 − w s) and dz/dx = s / (1 − w s).
    w, xs = 0.7, [0.3, -1.2, 2.0]
    problem, z = solved(
        f"""
problem: {{kind: tanh_layer, dim: 1, batch: 3, W: [[{w}]], x: [[{xs[0]}], [{xs[1]}], [{xs[2]}]]}}
run: {{atol: 1.0e-14}}
"""
    )
    s = 1 - z[:, 0] ** 2
    dw = sensitivity(problem, z, "W").jacobian.reshape(3)
    dx = sensitivity(problem, z, "x").jacobian.reshape(3)
    torch.testing.assert_close(dw, s * z[:, 0] / (1 - w * s), rtol=1e-12, atol=0)
    torch.testing.assert_close(dx, s / (1 - w * s), rtol=1e-12, atol=0)


TANH = """
problem:
  kind: tanh_layer
  dim: 5
  batch: 3
  W: {random: normal, seed: 3, spectral_norm: 0.8}
  b: {random: normal, seed: 4}
  x: {random: normal, seed: 5}
run: {atol: 1.0e-14}
"""


def dense_reference(problem: Problem, z: torch.Tensor) -> dict[str, torch.Tensor]:
    """dz*/da from the closed form of the tanh layer: (I − D W)⁻¹ ∂f/∂a with D = diag(1 − z²)."""
    W = problem.params["W"]
    n = problem.dim
    out: dict[str, list[torch.Tensor]] = {"W": [], "x": [], "b": []}
    for zb in z:
        D = torch.diag(1 - zb**2)
        inv = torch.linalg.inv(torch.eye(n, dtype=z.dtype) - D @ W)
        # ∂f_i/∂W_jk = D_ii δ_ij z_k, ∂f/∂x = ∂f/∂b = D
        dW = torch.einsum("ij,k->ijk", D, zb)
        out["W"].append(torch.einsum("ij,jkl->ikl", inv, dW))
        out["x"].append(inv @ D)
        out["b"].append(inv @ D)
    return {k: torch.stack(v) for k, v in out.items()}


@pytest.mark.parametrize("mode", ["forward", "adjoint"])
@pytest.mark.parametrize("name", ["W", "x", "b"])
def test_tanh_layer_sensitivities_match_the_closed_form(name: str, mode: str) -> None:
    problem, z = solved(TANH)
    ref = dense_reference(problem, z)[name]
    sens = sensitivity(problem, z, name, mode=mode)
    assert sens.mode == mode
    assert sens.shape == ((5, 5) if name == "W" else (5,))
    torch.testing.assert_close(sens.jacobian, ref, rtol=1e-10, atol=1e-12)
    assert sens.solve.systems == (25 if mode == "forward" and name == "W" else 5)


def test_auto_mode_takes_the_cheaper_side() -> None:
    problem, z = solved(TANH)
    assert sensitivity(problem, z, "W").mode == "adjoint"  # 25 entries > n = 5
    assert sensitivity(problem, z, "b").mode == "forward"  # 5 entries ≤ n


def test_loss_gradient_is_the_adjoint_of_the_jacobian() -> None:
    # For ℓ = Σ_b ‖z_b‖², dℓ/dx_b = 2 z_bᵀ dz_b/dx_b and dℓ/dW = Σ_b 2 z_bᵀ dz_b/dW.
    problem, z = solved(TANH)
    ref = dense_reference(problem, z)
    grad = loss_gradient(problem, z, lambda v: (v**2).sum(), ["W", "x"])
    assert grad.loss == pytest.approx(float((z**2).sum()), rel=1e-14)
    torch.testing.assert_close(
        grad.grads["x"], torch.einsum("bi,bij->bj", 2 * z, ref["x"]), rtol=1e-10, atol=1e-12
    )
    torch.testing.assert_close(
        grad.grads["W"], torch.einsum("bi,bijk->jk", 2 * z, ref["W"]), rtol=1e-10, atol=1e-12
    )
    assert grad.solve.method == "gmres (VJP)" and grad.solve.converged


def test_nn_module_parameters_are_differentiable() -> None:
    # configs/python_map.yaml: z_i = a_i cos z_i + c, so dz_i/da_j = δ_ij cos z_i / (1 + a_i sin z_i).
    cfg = parse_config(
        (CONFIGS / "python_map.yaml").read_text(),
        base_dir=CONFIGS,
        overrides=["run.atol=1e-14"],
    )
    problem = load_problem(cfg, trust_code=True)
    z = solve(cfg, problem=problem, diagnostics=False).solution
    a = problem.params["a"]
    expected = torch.diag_embed(torch.cos(z) / (1 + a * torch.sin(z)))
    torch.testing.assert_close(sensitivity(problem, z, "a").jacobian, expected, rtol=1e-11, atol=0)


def test_near_singular_where_branches_of_fixed_points_meet() -> None:
    # The logistic map's fixed points 0 and 1 − 1/r cross at r = 1 (transcritical): there ∂f/∂z = 1.
    # Just above, dz*/dr = 1/r² stays finite, but I − ∂f/∂z = r − 1 is tiny and is reported.
    r = 1 + 1e-6
    cfg = parse_config(
        f"problem: {{kind: expression, fixed_point: r * z * (1 - z), params: {{r: {r!r}}}, initial: 0.5}}"
    )
    problem = load_problem(cfg)
    z = torch.tensor([[1 - 1 / r]], dtype=torch.float64)
    sens = sensitivity(problem, z, "r")
    assert sens.conditioning.sigma_min[0] == pytest.approx(r - 1, rel=1e-6)
    assert sens.conditioning.near_singular == [True]
    assert any("near singular" in note and "branches" in note for note in sens.notes)
    assert float(sens.jacobian[0, 0]) == pytest.approx(1 / r**2, rel=1e-6)


def test_linear_map_near_a_equals_one_blows_up() -> None:
    a, b = 1 - 1e-7, 1.0
    cfg = parse_config(linear(a, b))
    problem = load_problem(cfg)
    z = torch.tensor([[b / (1 - a)]], dtype=torch.float64)
    sens = sensitivity(problem, z, "a")
    assert float(sens.jacobian[0, 0]) == pytest.approx(b / (1 - a) ** 2, rel=1e-6)
    assert sens.conditioning.near_singular == [True]


def test_gmres_solves_independent_systems_row_by_row() -> None:
    gen = torch.Generator().manual_seed(0)
    rows, n = 6, 12
    mats = torch.eye(n, dtype=torch.float64) + 0.4 * torch.randn(
        rows, n, n, generator=gen, dtype=torch.float64
    ) / math.sqrt(n)
    rhs = torch.randn(rows, n, generator=gen, dtype=torch.float64)
    rhs[2] = 0.0  # a zero right-hand side has the zero solution

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return torch.einsum("rij,rj->ri", mats, v)

    for restart in (50, 4):  # full GMRES, and restarted with a basis smaller than n
        x, rel, used = gmres(matvec, rhs, tol=1e-12, restart=restart, max_iter=500)
        torch.testing.assert_close(x, torch.linalg.solve(mats, rhs), rtol=1e-9, atol=1e-10)
        assert float(rel.max()) <= 1e-12 and used <= 500
        assert float(x[2].abs().max()) == 0.0


def test_residual_form_and_gradient_descent_problems() -> None:
    # g(z) = z² − c = 0: z* = √c and dz*/dc = 1/(2√c).
    problem, z = solved(
        "problem: {kind: expression, residual: z**2 - c, params: {c: 2.0}, initial: 1.0}\n"
        "solver: newton\nrun: {atol: 1.0e-14}"
    )
    assert float(sensitivity(problem, z, "c").jacobian[0, 0]) == pytest.approx(
        1 / (2 * math.sqrt(2)), rel=1e-12
    )
    # Gradient descent on ½ Σ h_i w_i² − Σ w_i: w* = 1/h, so dw*_i/dh_j = −δ_ij/h_i².
    cfg = parse_config((CONFIGS / "quadratic_lr.yaml").read_text(), base_dir=CONFIGS)
    problem = load_problem(cfg)
    z = solve(cfg, problem=problem, diagnostics=False).solution
    h = problem.params["h"]
    torch.testing.assert_close(
        sensitivity(problem, z, "h").jacobian[0], torch.diag(-1 / h**2), rtol=1e-8, atol=1e-10
    )


def test_gmres_stops_on_non_finite_input() -> None:
    rhs = torch.tensor([[1.0, float("nan")]], dtype=torch.float64)
    _, rel, used = gmres(lambda v: v, rhs, tol=1e-12, max_iter=1000)
    assert used < 10 and not bool(torch.isfinite(rel).all())


def test_gmres_reports_failure_on_a_singular_system() -> None:
    mat = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64))
    rhs = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)  # not in the range
    _, rel, _ = gmres(lambda v: v @ mat.T, rhs, tol=1e-10, max_iter=30)
    assert float(rel[0]) > 0.1


def test_integer_and_unknown_parameters_are_refused_by_name() -> None:
    problem, z = solved(linear(0.5, 2.0))
    with pytest.raises(
        UsageError, match=r"'n' is the number 1, not a tensor.*\(differentiable parameters: a, b\)"
    ):
        sensitivity(problem, z, "n")
    with pytest.raises(UsageError, match=r"no parameter 'q' \(differentiable parameters: a, b\)"):
        sensitivity(problem, z, "q")


def test_cli_prints_and_writes_the_sensitivity(cli) -> None:
    path = CONFIGS / "linear_scalar.yaml"
    run = cli("solve", path, "--sensitivity", "a", "--sensitivity", "b")
    assert run.exit_code == 0
    assert "sensitivity dz*/da" in run.stdout and "8.000000e+00" in run.stdout
    assert "2.000000e+00" in run.stdout and "relative residual" in run.stdout
    doc = json.loads(cli("solve", path, "--sensitivity", "a", "--json", "-").stdout)
    sens = doc["sensitivity"]["a"]
    assert sens["jacobian"][0][0] == pytest.approx(8.0, rel=1e-12)
    assert sens["linear_solve"]["converged"] is True
    assert sens["near_singular"] is False


def test_cli_big_parameters_show_norms_and_largest_entries(cli) -> None:
    run = cli("solve", CONFIGS / "tanh_layer.yaml", "--sensitivity", "W")
    assert run.exit_code == 0
    assert "‖dz*/dW‖_F" in run.stdout and "largest entries" in run.stdout


def test_cli_bad_parameter_is_one_line_exit_two(cli) -> None:
    run = cli("solve", CONFIGS / "linear_scalar.yaml", "--sensitivity", "n")
    assert run.exit_code == 2
    assert "error:" in run.stderr and "'n'" in run.stderr and "Traceback" not in run.stderr
