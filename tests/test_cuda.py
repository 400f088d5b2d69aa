"""CUDA paths: every solver of ours on a GPU agrees with the CPU. Skipped without a GPU."""

from __future__ import annotations

import json

import pytest
import torch

from deqcli.api import load_problem, solve
from deqcli.config import parse_config
from deqcli.solvers import SOLVERS
from tests.conftest import CONFIGS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LAYER = """
problem:
  kind: tanh_layer
  dim: 32
  batch: 4
  W: {random: normal, seed: 0, spectral_norm: 0.9}
  x: {random: normal, seed: 1}
run: {atol: 1.0e-9, max_iter: 2000, device: DEVICE, dtype: DTYPE}
"""
OURS = [name for name, info in SOLVERS.items() if info.family == "deq"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", OURS)
def test_solver_on_cuda_matches_cpu(name: str, dtype: str) -> None:
    atol = "1.0e-9" if dtype == "float64" else "1.0e-4"
    text = LAYER.replace("DTYPE", dtype).replace("1.0e-9", atol)
    cpu = solve(parse_config(text.replace("DEVICE", "cpu"), solver=name))
    gpu_cfg = parse_config(text.replace("DEVICE", "cuda"), solver=name)
    gpu = solve(gpu_cfg)
    assert gpu.device.startswith("cuda") and gpu.solution.is_cuda
    assert gpu.status.ok and cpu.status.ok
    tol = 1e-7 if dtype == "float64" else 1e-3
    torch.testing.assert_close(gpu.solution.cpu(), cpu.solution, atol=tol, rtol=0)
    problem = load_problem(gpu_cfg)
    z = gpu.solution
    assert float(torch.linalg.vector_norm(problem.raw_g(z), dim=1).max()) <= float(atol) * 10


def test_auto_device_picks_the_gpu(cli) -> None:
    doc = json.loads(
        cli("solve", CONFIGS / "tanh_layer.yaml", "--device", "auto", "--json", "-").stdout
    )
    assert doc["device"].startswith("cuda") and doc["status"] == "converged"
    assert "diagnostics" in doc


def test_the_digits_model_on_cuda_matches_cpu(cli, tmp_path, monkeypatch) -> None:
    from tests.test_digits import EXAMPLE

    monkeypatch.setenv("DEQ_TRUST_CODE", "1")
    runs = {}
    for device in ("cpu", "cuda"):
        out = tmp_path / f"{device}.pt"
        run = cli(
            "solve",
            EXAMPLE / "solve.yaml",
            "--device",
            device,
            "--set",
            "problem.batch=4",
            "--save",
            out,
            "--json",
            "-",
        )
        assert run.exit_code == 0, run.stderr
        assert json.loads(run.stdout)["device"].startswith(device)
        runs[device] = torch.load(out, weights_only=True)
    torch.testing.assert_close(runs["cuda"], runs["cpu"], atol=1e-7, rtol=0)


def test_deq_layer_backward_on_cuda_matches_cpu() -> None:
    from deqcli.nn import DEQLayer
    from tests.models.cells import ConvCell

    grads = {}
    for device in ("cpu", "cuda"):
        cell = ConvCell(channels=2).double().to(device)
        x = torch.linspace(-1, 1, 18, dtype=torch.float64, device=device).reshape(2, 1, 3, 3)
        z = DEQLayer(cell, atol=1e-12, backward_tol=1e-12)(x)
        assert z.device.type == device
        (grads[device],) = torch.autograd.grad((z**2).sum(), cell.conv.weight)
    torch.testing.assert_close(grads["cuda"].cpu(), grads["cpu"], atol=1e-9, rtol=1e-8)


def test_a_cuda_module_gets_its_start_and_list_data_on_the_gpu() -> None:
    import deqcli
    from deqcli.nn import DEQLayer
    from tests.models.cells import Baked, Injection

    baked = Baked(torch.tensor([0.1, 0.2, 0.3, 0.4])).cuda()
    made = deqcli.solve(baked, state_shape=(4,), diagnostics=False)
    assert made.status.ok and made.solution.is_cuda
    assert DEQLayer(baked, state_shape=(4,))().is_cuda
    lists = deqcli.solve(
        Injection().cuda(), [0.0] * 4, inputs=[[0.1] * 4, [0.2] * 4], diagnostics=False
    )
    assert lists.status.ok and lists.solution.is_cuda


def test_remedy_trials_and_error_bound_on_cuda(cli) -> None:
    # The period-2 logistic map on the GPU: the diagnostics locate the fixed point, the trials run
    # there too, and the verified damping reaches 1 − 1/r as on the CPU.
    path = CONFIGS / "diagnostics" / "logistic_period2.yaml"
    doc = json.loads(cli("solve", path, "--device", "cuda", "--json", "-").stdout)
    s = doc["samples"][0]["diagnostics"]
    assert doc["device"].startswith("cuda") and s["classification"] == "oscillating"
    first = s["advice"][0]
    assert first["kind"] == "verified"
    trial = doc["diagnostics"]["trials"]["runs"][first["trial"]]
    assert trial["solution"][0][0] == pytest.approx(1 - 1 / 3.2, abs=1e-10)
    converged = json.loads(
        cli("solve", CONFIGS / "dottie.yaml", "--device", "cuda", "--json", "-").stdout
    )
    assert converged["samples"][0]["diagnostics"]["error_bound"]["near_singular"] is False


@pytest.mark.parametrize("name", ["fixed_point", "newton", "broyden"])
def test_the_gpu_tests_every_8th_iteration_and_keeps_counts_exact(name: str) -> None:
    text = LAYER.replace("DTYPE", "float64").replace("DEVICE", "cuda")
    default = solve(parse_config(text, solver=name), diagnostics=False)
    every_one = text.replace("dtype: float64}", "dtype: float64, check_every: 1}")
    every = solve(parse_config(every_one, solver=name), diagnostics=False)
    assert default.iterations == every.iterations
    assert default.sample_status == every.sample_status
    assert default.residual_history == every.residual_history
    torch.testing.assert_close(default.solution, every.solution, atol=0, rtol=0)
