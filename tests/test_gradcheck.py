"""Gradients through a fixed point: implicit, unrolled and finite differences, and when they disagree."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from deqcli.analyses.gradcheck import GradcheckOptions, gradcheck
from deqcli.api import load_problem
from deqcli.config import parse_config
from deqcli.errors import UsageError
from deqcli.expr import ExpressionError
from tests.conftest import CONFIGS


def tanh_config(atol: float, **extra: str) -> str:
    lines = "\n".join(f"  {k}: {v}" for k, v in extra.items())
    return f"""
problem:
  kind: tanh_layer
  dim: 6
  batch: 2
  W: {{random: normal, seed: 0, spectral_norm: 0.9}}
  b: {{random: normal, seed: 2}}
  x: {{random: normal, seed: 1}}
{lines}
run: {{atol: {atol}, max_iter: 2000}}
"""


def analytic_gradient(text: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """dℓ/dW and dℓ/dx for ℓ = Σ‖z_b‖², from the exact fixed point and dense linear algebra.

    With D = diag(1 − z²): w_b = (I − D W)⁻ᵀ 2 z_b, dℓ/dx_b = D w_b, dℓ/dW = Σ_b (D w_b) z_bᵀ.
    """
    problem = load_problem(parse_config(text))
    W, x, b = problem.params["W"], problem.params["x"], problem.params["b"]
    z = torch.zeros_like(x)
    for _ in range(2000):  # a contraction with L ≤ 0.9: this reaches z* to rounding
        z = torch.tanh(z @ W.T + x + b)
    n = W.shape[0]
    gx, gW = [], torch.zeros_like(W)
    for zb in z:
        D = torch.diag(1 - zb**2)
        w = torch.linalg.solve((torch.eye(n, dtype=z.dtype) - D @ W).T, 2 * zb)
        gx.append(D @ w)
        gW += torch.outer(D @ w, zb)
    return {"W": gW, "x": torch.stack(gx), "b": sum(gx)}, z


def test_tight_forward_solve_gives_agreeing_gradients() -> None:
    text = tanh_config(1e-13)
    report = gradcheck(parse_config(text))
    reference, _ = analytic_gradient(text)
    assert report.params == ["W", "x", "b"]
    for name, grad in report.ift.items():
        torch.testing.assert_close(grad, reference[name], rtol=1e-10, atol=1e-12)
    assert report.ok and report.agree and not report.silent_failure and not report.causes
    assert report.error_ift < 1e-7  # against central differences of re-solved fixed points
    # Unrolling as many steps as the forward solve took reaches z* as well: same gradient.
    assert report.ift_vs_unrolled < 1e-8 and report.error_unrolled < 1e-7
    assert report.backward.converged and report.backward.residual <= 1e-11
    assert all(check.ok and check.max_rel < 1e-8 for check in report.jacobian_checks)


def test_loose_forward_tolerance_is_a_detectable_gradient_error() -> None:
    # The forward solve "converges" at atol 1e-2, but z* is off by about atol/(1 − L): the IFT
    # gradient taken there is wrong, although the solve reported success. The seed's warning.
    text = tanh_config(1e-2)
    report = gradcheck(parse_config(text))
    assert report.forward.status.ok
    assert report.silent_failure and not report.agree and not report.ok
    assert report.error_ift > 10 * report.rtol
    # Re-solved tightly, the IFT gradient is right again: the tolerance was the cause.
    assert report.refined_error_ift < report.rtol
    assert report.solution_shift > 1e-4
    assert any(c.startswith("forward tolerance too loose") for c in report.causes)
    reference, z = analytic_gradient(text)
    assert float((report.forward.solution - z).abs().max()) > 1e-4
    assert float((report.ift["x"] - reference["x"]).abs().max()) > 1e-4


def test_custom_loss_on_the_scalar_layer_matches_the_ift_formula() -> None:
    # z = tanh(w z + x) in one dimension, loss ℓ = z: dℓ/dw = s z/(1 − w s), dℓ/dx = s/(1 − w s).
    w, x = 0.6, 0.4
    cfg = parse_config(
        f"problem: {{kind: tanh_layer, dim: 1, W: [[{w}]], x: [[{x}]]}}\nrun: {{atol: 1.0e-14}}"
    )
    report = gradcheck(cfg, GradcheckOptions(loss="z[0]"))
    z = float(report.forward.solution[0, 0])
    s = 1 - z * z
    assert float(report.ift["W"]) == pytest.approx(s * z / (1 - w * s), rel=1e-12)
    assert float(report.ift["x"]) == pytest.approx(s / (1 - w * s), rel=1e-12)
    assert report.ok and report.loss == pytest.approx(z, rel=1e-15)


NEAR_FOLD = (
    "problem: {kind: tanh_layer, dim: 1, W: [[1.0]], x: [[1.0e-4]], initial: 0.5}\n"
    "solver: newton\n"
    "run: {atol: 1.0e-6, max_iter: 50}"
)


def test_rho_close_to_one_and_a_loose_tolerance_are_named_as_causes() -> None:
    # z = tanh(z + x) with x = 1e-4: z* ≈ (3x)^(1/3) ≈ 0.067 and ∂f/∂z = 1 − z*² ≈ 0.9955. Newton
    # stops at ‖g‖ ≤ 1e-6, but the error in z* is about ‖g‖/(1 − ρ): the gradient is visibly wrong.
    # z*(x) ~ x^(1/3) is strongly curved here, so the finite differences need a small step.
    report = gradcheck(parse_config(NEAR_FOLD), GradcheckOptions(loss="z[0]", eps=1e-7))
    rho = report.conditioning.spectral_radius[0]
    assert rho == pytest.approx(1 - float(report.forward.solution[0, 0]) ** 2, rel=1e-3)
    assert 0.99 < rho < 1
    assert report.silent_failure
    assert any(c.startswith("ρ(∂f/∂z) = 0.99") and "close to 1" in c for c in report.causes)
    assert any(c.startswith("forward tolerance too loose") for c in report.causes)
    assert report.refined_error_ift < report.rtol
    # The unrolled gradient follows plain iteration for as many steps as Newton took: noted.
    assert any("newton" in note and "plain iterations" in note for note in report.notes)


def test_inaccurate_finite_differences_are_recognised() -> None:
    # The same problem at the default step: central differences err by c·eps² with a huge c; the
    # second difference at eps/2 exposes it, and the report blames the reference, not the IFT.
    report = gradcheck(parse_config(NEAR_FOLD), GradcheckOptions(loss="z[0]", params=["x"]))
    assert not report.agree
    assert report.fd_truncation > 0.3 * report.error_ift
    assert any("finite differences themselves are inaccurate" in c for c in report.causes)


def detached_model(tmp_path: Path) -> Path:
    (tmp_path / "detached.py").write_text(
        textwrap.dedent(
            """
            import torch

            class Detached(torch.nn.Module):
                '''z ↦ a·cos(z) + 0.2, but cos(z) is computed on a detached copy: autodiff sees no z.'''

                def __init__(self):
                    super().__init__()
                    self.a = torch.nn.Parameter(torch.tensor([0.5, 0.7]))

                def forward(self, z):
                    return self.a * torch.cos(z.detach()) + 0.2

            def make():
                return Detached(), torch.zeros(1, 2)
            """
        )
    )
    path = tmp_path / "detached.yaml"
    path.write_text(
        "problem: {kind: python, target: detached.py:make}\nrun: {atol: 1.0e-13, max_iter: 500}\n"
    )
    return path


def test_a_detached_map_fails_the_jacobian_check(tmp_path: Path) -> None:
    from deqcli.config import load_config
    from deqcli.consent import allowed

    with allowed(True):
        report = gradcheck(load_config(detached_model(tmp_path)))
    dz = next(c for c in report.jacobian_checks if c.what == "∂g/∂z")
    # Autodiff says ∂f/∂z = 0, finite differences −a sin z: the discrepancy is of order one.
    assert not dz.ok and dz.max_rel > 0.1
    assert not report.agree and not report.ok
    assert any("detached tensor" in c for c in report.causes)


def test_cli_gradcheck_json_and_exit_codes(
    cli, write_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    good = write_config(tanh_config(1e-12), "good.yaml")
    run = cli("gradcheck", good, "--param", "x", "--json", "-")
    assert run.exit_code == 0
    doc = json.loads(run.stdout)
    assert doc["kind"] == "deq.gradcheck" and doc["ok"] is True and doc["parameters"] == ["x"]
    assert doc["ift"]["error_vs_fd"] < 1e-7
    assert doc["ift"]["backward_solve"]["iterations"] > 0
    assert len(doc["finite_differences"]["directions"]) == 3
    assert {c["of"] for c in doc["jacobian_checks"]} == {"∂g/∂z", "∂g/∂a"}

    run = cli("gradcheck", good, "--tol", "1e-2", "--param", "W")
    assert run.exit_code == 1
    assert "forward tolerance too loose" in run.stdout and "warning" in run.stdout

    run = cli("gradcheck", detached_model(tmp_path))
    assert run.exit_code == 2 and "DEQ_TRUST_CODE=1" in run.stderr  # it runs code: consent first
    monkeypatch.setenv("DEQ_TRUST_CODE", "1")
    run = cli("gradcheck", detached_model(tmp_path))
    assert run.exit_code == 1 and "detached" in run.stdout


def test_cli_gradcheck_bad_input_is_exit_two(cli, write_config) -> None:
    path = write_config(tanh_config(1e-12))
    run = cli("gradcheck", path, "--param", "nope")
    assert run.exit_code == 2 and "'nope'" in run.stderr and "W, x, b" in run.stderr
    run = cli("gradcheck", path, "--loss", "sum(q)")
    assert run.exit_code == 2 and "--loss" in run.stderr
    run = cli("gradcheck", CONFIGS / "dottie.yaml")
    assert run.exit_code == 2 and "no differentiable parameters" in run.stderr


def test_loss_must_be_a_scalar() -> None:
    cfg = parse_config(tanh_config(1e-10))
    with pytest.raises(ExpressionError, match="scalar"):
        gradcheck(cfg, GradcheckOptions(loss="z * 2"))
    with pytest.raises(UsageError, match="--eps"):
        gradcheck(cfg, GradcheckOptions(eps=0.0))
