"""The digits example: a reduced model in detail, the shipped checkpoint through every command."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from tests.conftest import ROOT

pytestmark = pytest.mark.usefixtures("one_thread")

EXAMPLE = ROOT / "examples" / "digits_deq"
CONFIGS = sorted(EXAMPLE.glob("*.yaml"))
COMMAND = re.compile(r"^#\s*run:\s*(deq .+)$", re.MULTILINE)


@pytest.fixture(autouse=True)
def _trust(monkeypatch) -> None:
    monkeypatch.setenv("DEQ_TRUST_CODE", "1")


def _model() -> ModuleType:
    spec = importlib.util.spec_from_file_location("digits_model", EXAMPLE / "model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    with np.load(EXAMPLE / "batch.npz") as data:
        return torch.as_tensor(data["x"]), torch.as_tensor(data["y"])


# -- the shipped files -----------------------------------------------------------------------------


def test_the_checkpoint_is_small_and_classifies_the_batch() -> None:
    assert (EXAMPLE / "checkpoint.pt").stat().st_size < 1024**2
    ckpt = torch.load(EXAMPLE / "checkpoint.pt", weights_only=True)
    assert set(ckpt) >= {"cell", "head", "channels", "size", "test_accuracy"}
    cell_params = sum(v.numel() for k, v in ckpt["cell"].items() if k != "scale")
    head_params = sum(v.numel() for v in ckpt["head"].values())
    assert 1000 <= cell_params + head_params <= 10_000  # a few thousand parameters
    x, y = _batch()
    assert x.shape == (32, 1, 8, 8) and y.shape == (32,)
    model = _model().load_classifier(str(EXAMPLE / "checkpoint.pt"), atol=1e-4)
    with torch.no_grad():
        predicted = model(x).argmax(dim=1)
    assert model.deq.stats.status == "converged"
    assert float((predicted == y).float().mean()) >= 0.9
    assert ckpt["test_accuracy"] >= 0.9


def test_every_example_config_states_its_command() -> None:
    assert {p.name for p in CONFIGS} == {
        "solve.yaml",
        "compare.yaml",
        "gradcheck.yaml",
        "sweep.yaml",
    }
    for path in CONFIGS:
        commands = COMMAND.findall(path.read_text())
        assert len(commands) == 1, path
        assert "--trust-code" in commands[0], path


def _documented(path: Path, *extra: str) -> list[str]:
    """The config's documented command (without `deq`), pointed at the file, plus extra flags."""
    (command,) = COMMAND.findall(path.read_text())
    args = shlex.split(command)[1:]
    return [str(path) if a.endswith(path.name) else a for a in args] + list(extra)


def test_solve_the_shipped_model_and_save_z_star(cli, tmp_path: Path) -> None:
    out = tmp_path / "z.pt"
    run = cli(
        *_documented(
            EXAMPLE / "solve.yaml", "--set", "problem.batch=4", "--save", out, "--json", "-"
        )
    )
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["status"] == "converged" and doc["state_shape"] == [8, 8, 8]
    z = torch.load(out, weights_only=True)
    assert z.shape == (4, 8, 8, 8)
    # z* from the command line, read by the trained head, classifies as the classifier itself does.
    model = _model().load_classifier(str(EXAMPLE / "checkpoint.pt"), atol=1e-8)
    x, _ = _batch()
    with torch.no_grad():
        logits = model.head(torch.flatten(torch.nn.functional.avg_pool2d(z.float(), 2), 1))
        torch.testing.assert_close(logits, model(x[:4]), atol=1e-4, rtol=1e-4)


def test_compare_solvers_on_the_shipped_model(cli) -> None:
    args = _documented(EXAMPLE / "compare.yaml", "--set", "problem.batch=4")
    args[args.index("--solvers") + 1] = "fixed_point,anderson,torchdeq:anderson"
    run = cli(*args, "--repeat", "1", "--warmup", "0", "--json", "-")
    assert run.exit_code == 0, run.stderr
    (problem,) = json.loads(run.stdout)["problems"]
    rows = {row["solver"]: row for row in problem["solvers"]}
    assert rows["anderson"]["status"] == "converged"
    assert problem["dim"] == 512 and problem["batch"] == 4


def test_gradcheck_a_convolution_weight_of_the_shipped_model(cli) -> None:
    run = cli(*_documented(EXAMPLE / "gradcheck.yaml", "--set", "problem.batch=1", "--json", "-"))
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["parameters"] == ["conv1.weight"] and doc["ok"] and doc["agree"]
    assert np.asarray(doc["ift"]["gradient"]["conv1.weight"]).shape == (8, 8, 3, 3)


def test_sweep_the_scale_of_the_shipped_model(cli) -> None:
    # All 8 images, as documented: some image wanders chaotically from scale 1.75 on (with only
    # the first two, Anderson's plain steps after a stall converge at 3.0).
    args = _documented(EXAMPLE / "sweep.yaml", "--no-diagnostics")
    args[args.index("--param") + 1] = "scale=0.5,1.0,3.0"
    run = cli(*args, "--json", "-")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["axes"][0]["key"] == "problem.params.scale"
    converged = [p["converged"] for p in doc["points"]]
    assert converged[:2] == [True, True] and not converged[2]


# -- a reduced model: few channels, 4×4 images ------------------------------------------------------


def test_the_reduced_model_trains_with_implicit_gradients() -> None:
    digits = _model()
    torch.manual_seed(0)
    model = digits.DigitsDEQ(channels=2, size=4, atol=1e-6).double()
    x, y = _batch()
    x = torch.nn.functional.avg_pool2d(x[:16].double(), 2)  # 4×4 images
    y = y[:16]
    # The implicit gradient of the whole classifier equals backpropagation through the iterations.
    loss = torch.nn.functional.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    cell = model.cell
    z = torch.zeros(16, 2, 4, 4, dtype=torch.float64)
    for _ in range(100):
        z = cell(z, x)
    logits = model.head(torch.flatten(torch.nn.functional.avg_pool2d(z, 2), 1))
    unrolled = torch.autograd.grad(
        torch.nn.functional.cross_entropy(logits, y), list(model.parameters())
    )
    for got, want in zip(grads, unrolled, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    optimiser = torch.optim.Adam(model.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]


def test_the_reduced_model_through_kind_module(cli, write_config) -> None:
    cfg = write_config(
        f"""
        problem:
          kind: module
          target: {EXAMPLE / "model.py"}:DigitsCell
          args: {{channels: 2}}
          inputs: {{random: uniform, shape: [3, 1, 4, 4]}}
          params: {{scale: 0.5}}
        solver: anderson
        """
    )
    run = cli("solve", cfg, "--sensitivity", "scale", "--json", "-")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["state_shape"] == [2, 4, 4]
    assert doc["sensitivity"]["scale"]["shape"] == [32]
    grad = cli("gradcheck", cfg, "--param", "conv2.weight", "--json", "-")
    assert grad.exit_code == 0 and json.loads(grad.stdout)["ok"], grad.stderr


def test_the_training_script_runs(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out, batch = tmp_path / "ckpt.pt", tmp_path / "batch.npz"
    done = subprocess.run(
        [
            sys.executable,
            str(EXAMPLE / "train.py"),
            "--epochs",
            "1",
            "--channels",
            "2",
            "--train-size",
            "128",
            "--out",
            str(out),
            "--batch-out",
            str(batch),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "epoch  1" in done.stdout and "test accuracy" in done.stdout
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["channels"] == 2 and ckpt["epochs"] == 1
    with np.load(batch) as data:
        assert data["x"].shape == (32, 1, 8, 8)
