"""Your own model: ``kind: module``, per-sample inputs, any state shape, checkpoints and their errors."""

from __future__ import annotations

import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from deqcli.analyses.gradcheck import GradcheckOptions, gradcheck
from deqcli.analyses.sensitivity import sensitivity
from deqcli.api import load_problem
from deqcli.api import solve as api_solve
from deqcli.config import load_config
from deqcli.errors import ConfigError
from deqcli.result import Status
from tests.models.cells import Injection, contraction

pytestmark = pytest.mark.usefixtures("one_thread")
CELLS = Path(__file__).resolve().parent / "models" / "cells.py"


@pytest.fixture(autouse=True)
def _trust(monkeypatch) -> None:
    # These configs name the tests' own model file.
    monkeypatch.setenv("DEQ_TRUST_CODE", "1")


@pytest.fixture
def module_config(write_config) -> Callable[..., Path]:
    """A `kind: module` config for a class of tests/models/cells.py, with extra problem lines."""

    made: list[Path] = []

    def make(cls: str, body: str = "", *, solver: str = "anderson", run: str = "") -> Path:
        lines = "\n".join("  " + line for line in body.strip().splitlines() if line.strip())
        text = f"problem:\n  kind: module\n  target: {CELLS}:{cls}\n{lines}\nsolver: {solver}\n"
        if run:
            text += f"run: {run}\n"
        made.append(write_config(text, f"{cls.lower()}-{len(made)}.yaml"))
        return made[-1]

    return make


def one_line_error(run) -> str:
    assert run.exit_code == 2, (run.stdout, run.stderr)
    assert run.stderr.count("\n") == 1 and "Traceback" not in run.stderr, run.stderr
    return run.stderr


# -- the same layer three ways --------------------------------------------------------------------


def test_module_with_inputs_equals_the_tanh_layer(
    tmp_path: Path, module_config, write_config
) -> None:
    W = contraction(4, 0.8).numpy()
    x = np.linspace(-1.0, 1.0, 12).reshape(3, 4)
    np.save(tmp_path / "W.npy", W)
    np.save(tmp_path / "x.npy", x)
    layer = write_config(
        """
        problem: {kind: tanh_layer, dim: 4, W: {file: W.npy}, x: {file: x.npy}}
        solver: newton
        run: {atol: 1.0e-13}
        """,
        "layer.yaml",
    )
    module = module_config(
        "Injection", "inputs: {file: x.npy}", solver="newton", run="{atol: 1.0e-13}"
    )
    p_layer, p_module = load_problem(layer), load_problem(module)
    assert p_layer.batch == p_module.batch == 3  # the tanh layer takes its batch from x's rows
    r_layer = api_solve(layer, problem=p_layer, diagnostics=False)
    r_module = api_solve(module, problem=p_module, diagnostics=False)
    assert r_layer.status.ok and r_module.status.ok
    z = r_module.solution
    torch.testing.assert_close(z, r_layer.solution, atol=1e-12, rtol=0)
    np.testing.assert_allclose(z.numpy(), np.tanh(z.numpy() @ W.T + x), atol=1e-13)

    # dz*/dx = (I − D W)⁻¹ D with D = diag(1 − z*²), per sample.
    s_layer = sensitivity(p_layer, r_layer.solution, "x")
    s_module = sensitivity(p_module, z, "x")
    for b in range(3):
        D = np.diag(1 - z[b].numpy() ** 2)
        exact = np.linalg.solve(np.eye(4) - D @ W, D)
        np.testing.assert_allclose(s_module.jacobian[b].numpy(), exact, atol=1e-10)
    torch.testing.assert_close(s_module.jacobian, s_layer.jacobian, atol=1e-10, rtol=0)
    torch.testing.assert_close(
        sensitivity(p_module, z, "W").jacobian,
        sensitivity(p_layer, r_layer.solution, "W").jacobian,
        atol=1e-10,
        rtol=0,
    )


def test_inputs_or_baked_into_the_weights_give_the_same_answers(module_config) -> None:
    x = [0.3, -0.7, 1.1, 0.2]
    given = module_config(
        "Injection", f"inputs: [{x}]", solver="fixed_point", run="{atol: 1.0e-13}"
    )
    baked = module_config(
        "Baked", f"args: {{x: {x}}}\nstate_shape: [4]", solver="fixed_point", run="{atol: 1.0e-13}"
    )
    p_given, p_baked = load_problem(given), load_problem(baked)
    assert "x" in p_given.batched_params and not p_baked.batched_params
    r_given = api_solve(given, problem=p_given, diagnostics=False)
    r_baked = api_solve(baked, problem=p_baked, diagnostics=False)
    torch.testing.assert_close(r_given.solution, r_baked.solution, atol=1e-13, rtol=0)
    for name in ("W", "x"):
        a = sensitivity(p_given, r_given.solution, name).jacobian
        b = sensitivity(p_baked, r_baked.solution, name).jacobian
        torch.testing.assert_close(a.reshape(b.shape), b, atol=1e-10, rtol=0)
    reports = [
        gradcheck(load_config(cfg), GradcheckOptions(params=["W", "x"]), problem=p)
        for cfg, p in ((given, p_given), (baked, p_baked))
    ]
    assert [r.ok for r in reports] == [True, True]
    assert [r.causes for r in reports] == [[], []]
    torch.testing.assert_close(reports[0].ift["W"], reports[1].ift["W"], atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    ("cls", "inputs", "shape"),
    [
        ("ConvCell", "{random: normal, shape: [4, 1, 4, 4]}", (2, 4, 4)),
        ("Sequence", "{random: uniform, shape: [4, 3, 2]}", (3, 2)),
    ],
)
def test_states_of_any_shape_and_rows_evaluated_alone(module_config, cls, inputs, shape) -> None:
    problem = load_problem(module_config(cls, f"inputs: {inputs}"))
    assert problem.sample_shape == shape and problem.dim == int(np.prod(shape))
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(problem.batch, problem.dim, generator=gen, dtype=torch.float64)
    whole = problem.raw_f(z)
    for rows in ([2], [3, 1], [0, 1, 2, 3]):
        part = problem.subset(rows)
        torch.testing.assert_close(part.raw_f(z[rows]), whole[rows], atol=1e-14, rtol=0)
        torch.testing.assert_close(part.params["x"], problem.params["x"][rows])
    result = api_solve(module_config(cls, f"inputs: {inputs}"), diagnostics=False)
    assert result.status.ok
    assert tuple(result.z_star.shape) == (4, *shape)
    doc = result.to_dict(history=False)
    assert doc["state_shape"] == list(shape)
    assert np.asarray(doc["samples"][1]["solution"]).shape == shape


@pytest.mark.parametrize("peer", ["scipy:hybr", "scipy:lm", "torchdeq:anderson"])
def test_peers_carry_each_samples_inputs(module_config, peer) -> None:
    body = "inputs: {random: normal, shape: [2, 1, 3, 3]}\nargs: {channels: 2}"
    ours = api_solve(module_config("ConvCell", body, run="{atol: 1.0e-11}"), diagnostics=False)
    theirs = api_solve(
        module_config("ConvCell", body, solver=peer, run="{atol: 1.0e-11}"), diagnostics=False
    )
    assert ours.status.ok and theirs.status.ok, theirs.notes
    torch.testing.assert_close(theirs.solution, ours.solution, atol=1e-9, rtol=0)


def test_python_factory_may_return_inputs(write_config) -> None:
    cfg = write_config(f"problem: {{kind: python, target: '{CELLS}:injection_with_inputs'}}\n")
    problem = load_problem(cfg)
    assert problem.batch == 3 and problem.batched_params == frozenset({"x"})
    by_rows = api_solve(load_config(cfg, solver="scipy:hybr"), diagnostics=False)
    batched = api_solve(load_config(cfg, solver="newton"), diagnostics=False)
    assert by_rows.status.ok and batched.status.ok
    torch.testing.assert_close(by_rows.solution, batched.solution, atol=1e-9, rtol=0)
    W = contraction(4, 0.8)
    x = problem.params["x"]
    z = batched.solution
    torch.testing.assert_close(z, torch.tanh(z @ W.T + x), atol=1e-10, rtol=0)


# -- the start and the shape of z ------------------------------------------------------------------


def test_the_start_comes_from_init_state_a_given_shape_or_one_call(module_config) -> None:
    conv = load_problem(module_config("ConvCell", "inputs: {random: normal, shape: [2, 1, 3, 3]}"))
    assert conv.sample_shape == (2, 3, 3)  # init_state: 2 channels, not x's 1
    assert float(conv.z0.abs().max()) == 0.0
    inj = load_problem(module_config("Injection", "inputs: [[1.0, 2.0, 3.0, 4.0]]\ninitial: 0.25"))
    assert inj.sample_shape == (4,)  # one call f(0, x) told the shape
    assert bool((inj.z0 == 0.25).all())
    seq = load_problem(
        module_config("Sequence", "inputs: {random: normal, shape: [2, 3, 2]}\nstate_shape: [3, 2]")
    )
    assert seq.sample_shape == (3, 2) and seq.batch == 2


def test_without_inputs_the_shape_must_be_given(cli, module_config) -> None:
    cfg = module_config("Baked", "args: {x: [0.1, 0.2, 0.3, 0.4]}")
    err = one_line_error(cli("solve", cfg))
    assert "problem.target: cannot tell the shape of z" in err and "state_shape" in err


def test_a_state_shape_that_init_state_contradicts_is_bad_input(cli, module_config) -> None:
    body = "inputs: {random: normal, shape: [2, 1, 3, 3]}\nstate_shape: [%s]"
    err = one_line_error(cli("solve", module_config("ConvCell", body % "1, 3, 3")))
    assert "problem.state_shape is (1, 3, 3) but init_state(x) gives (2, 3, 3)" in err
    assert load_problem(module_config("ConvCell", body % "2, 3, 3")).sample_shape == (2, 3, 3)


def test_inputs_from_npz_with_a_key(tmp_path: Path, module_config) -> None:
    x = np.arange(8.0).reshape(2, 4) / 10
    np.savez(tmp_path / "batch.npz", x=x, labels=np.array([3, 7]))
    problem = load_problem(module_config("Injection", "inputs: {file: batch.npz, key: x}"))
    np.testing.assert_array_equal(problem.params["x"].numpy(), x)
    with pytest.raises(
        ConfigError, match=r"holds several arrays; pick one with key: \(x, labels\)"
    ):
        load_problem(module_config("Injection", "inputs: {file: batch.npz}"))
    with pytest.raises(
        ConfigError, match=r"problem\.inputs\.key: .*has no array 'y' \(it holds x, labels\)"
    ):
        load_problem(module_config("Injection", "inputs: {file: batch.npz, key: y}"))


def test_parameters_and_buffers_by_state_dict_name(module_config) -> None:
    problem = load_problem(
        module_config(
            "ConvCell",
            "inputs: {random: normal, shape: [2, 1, 3, 3]}\nparams: {scale: 0.9, norm.bias: [0.1, -0.1]}",
        )
    )
    assert float(problem.params["scale"]) == 0.9
    assert problem.params["norm.bias"].tolist() == [0.1, -0.1]
    assert {"conv.weight", "conv.bias", "inject.weight", "norm.weight", "scale"} <= set(
        problem.params
    )
    # --set writes nested keys; they name the same tensor.
    cfg = module_config("ConvCell", "inputs: {random: normal, shape: [2, 1, 3, 3]}")
    set_problem = load_problem(load_config(cfg, ["problem.params.norm.weight=2.0"]))
    assert set_problem.params["norm.weight"].tolist() == [2.0, 2.0]


def test_a_scale_buffer_moves_the_fixed_point_as_its_sensitivity_says(module_config) -> None:
    body = "inputs: {random: normal, shape: [2, 1, 3, 3]}\nparams: {scale: %s}"
    base = module_config("ConvCell", body % 0.5, solver="newton", run="{atol: 1.0e-13}")
    problem = load_problem(base)
    z = api_solve(base, problem=problem, diagnostics=False).solution
    dz = sensitivity(problem, z, "scale").jacobian  # a scalar parameter: (B, n)
    h = 1e-6
    plus = api_solve(
        module_config("ConvCell", body % (0.5 + h), solver="newton", run="{atol: 1.0e-13}"),
        diagnostics=False,
    )
    minus = api_solve(
        module_config("ConvCell", body % (0.5 - h), solver="newton", run="{atol: 1.0e-13}"),
        diagnostics=False,
    )
    fd = (plus.solution - minus.solution) / (2 * h)
    torch.testing.assert_close(dz, fd, atol=1e-7, rtol=1e-6)


# -- checkpoints -----------------------------------------------------------------------------------


def _trained_W() -> torch.Tensor:
    return contraction(4, 0.6, seed=5)


@pytest.mark.parametrize(
    ("name", "save", "key"),
    [
        (
            "nested.pt",
            lambda p, W: torch.save({"model": {"cell": {"W": W}}, "epoch": 3}, p),
            "model.cell",
        ),
        ("flat.pt", lambda p, W: torch.save({"model": {"cell.W": W}}, p), "model.cell"),
        ("plain.pth", lambda p, W: torch.save({"W": W}, p), None),
        ("weights.npz", lambda p, W: np.savez(p, W=W.numpy()), None),
        (
            "weights.safetensors",
            lambda p, W: __import__("safetensors.torch").torch.save_file({"cell.W": W}, str(p)),
            "cell",
        ),
    ],
)
def test_weights_load_from_a_checkpoint_or_a_sub_tree(
    tmp_path: Path, module_config, name, save, key
) -> None:
    W = _trained_W()
    save(tmp_path / name, W)
    weights = f"{{file: {name}" + (f", key: {key}}}" if key else "}")
    problem = load_problem(
        module_config("Injection", f"weights: {weights}\ninputs: [[0.5, 0.5, 0.5, 0.5]]")
    )
    torch.testing.assert_close(problem.params["W"], W)
    assert "Injection" in problem.description and name in problem.description


def test_wrong_keys_are_listed(cli, tmp_path: Path, module_config) -> None:
    W = _trained_W()
    torch.save({"V": W, "b": W[0]}, tmp_path / "other.pt")
    err = one_line_error(
        cli(
            "solve",
            module_config("Injection", "weights: {file: other.pt}\ninputs: [[0.5, 0.5, 0.5, 0.5]]"),
        )
    )
    assert (
        "problem.weights: the keys of 'other.pt' do not match the module: missing W; unexpected V, b"
        in err
    )
    assert "strict: false" in err

    torch.save({"W": W, "extra": W}, tmp_path / "more.pt")
    err = one_line_error(
        cli(
            "solve",
            module_config("Injection", "weights: {file: more.pt}\ninputs: [[0.5, 0.5, 0.5, 0.5]]"),
        )
    )
    assert "unexpected extra" in err and "missing" not in err
    lenient = load_problem(
        module_config(
            "Injection", "weights: {file: more.pt}\nstrict: false\ninputs: [[0.5, 0.5, 0.5, 0.5]]"
        )
    )
    torch.testing.assert_close(lenient.params["W"], W)

    torch.save({"model.cell.W": W}, tmp_path / "prefixed.pt")
    err = one_line_error(
        cli(
            "solve",
            module_config(
                "Injection", "weights: {file: prefixed.pt}\ninputs: [[0.5, 0.5, 0.5, 0.5]]"
            ),
        )
    )
    assert "set problem.weights.key: model.cell" in err
    err = one_line_error(
        cli(
            "solve",
            module_config(
                "Injection",
                "weights: {file: prefixed.pt, key: cell}\ninputs: [[0.5, 0.5, 0.5, 0.5]]",
            ),
        )
    )
    assert (
        "problem.weights.key: 'cell' matches no entry of 'prefixed.pt' (its top-level names: model)"
        in err
    )


def test_bad_checkpoints_are_one_line_errors(cli, tmp_path: Path, module_config) -> None:
    body = "weights: {file: %s}\ninputs: [[0.5, 0.5, 0.5, 0.5]]"
    torch.save({"W": contraction(5, 0.6)}, tmp_path / "big.pt")
    err = one_line_error(cli("solve", module_config("Injection", body % "big.pt")))
    assert "'W' has shape (5, 5) in 'big.pt' but (4, 4) in the module" in err

    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint at all")
    err = one_line_error(cli("solve", module_config("Injection", body % "broken.pt")))
    assert "problem.weights.file: cannot read 'broken.pt': not a torch checkpoint" in err

    torch.save(Injection(), tmp_path / "pickled.pt")
    err = one_line_error(cli("solve", module_config("Injection", body % "pickled.pt")))
    assert "holds Python objects (tests.models.cells.Injection)" in err and "state_dict" in err

    torch.save(contraction(4, 0.6), tmp_path / "tensor.pt")
    err = one_line_error(cli("solve", module_config("Injection", body % "tensor.pt")))
    assert "holds a single tensor, not a state_dict" in err

    err = one_line_error(cli("solve", module_config("Injection", body % "missing.pt")))
    assert "problem.weights.file: file 'missing.pt' does not exist" in err
    err = one_line_error(cli("solve", module_config("Injection", body % "weights.h5")))
    assert "problem.weights.file: file 'weights.h5' must be one of" in err


def test_safetensors_is_optional(cli, tmp_path: Path, module_config, monkeypatch) -> None:
    from safetensors.torch import save_file

    save_file({"W": _trained_W()}, str(tmp_path / "w.safetensors"))
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if not installed
    err = one_line_error(
        cli(
            "solve",
            module_config(
                "Injection", "weights: {file: w.safetensors}\ninputs: [[0.5, 0.5, 0.5, 0.5]]"
            ),
        )
    )
    assert "needs the safetensors package: pip install safetensors" in err


# -- a model that breaks its contract ---------------------------------------------------------------


def test_a_forward_that_raises_is_one_line(cli, module_config) -> None:
    at_start = module_config("Raising", "args: {calls: 0}\ninputs: [[1.0], [2.0]]")
    err = one_line_error(cli("solve", at_start))
    assert "raised ValueError: the cache ran dry" in err
    # Three calls succeed (the check at z0, a row alone, the solver's start), then a step fails.
    midway = module_config(
        "Raising", "args: {calls: 3}\ninputs: [[1.0], [2.0]]", solver="fixed_point"
    )
    err = one_line_error(cli("solve", midway))
    assert err.startswith("error: problem.target: the module from") and "the cache ran dry" in err


@pytest.mark.parametrize("calls", [2, 3, 4])
def test_run_timeout_stops_a_forward_that_never_returns(cli, module_config, calls: int) -> None:
    # The module answers ``calls`` times, then its forward waits a minute. Two calls: the checks
    # made while loading (at z0, a row alone) pass, the third check waits. Three: the solver's
    # first evaluation (in its init) waits. Four: its first step does. run.timeout's watchdog
    # stops the forward each time, long before the minute is out.
    cfg = module_config(
        "Hanging",
        f"args: {{calls: {calls}}}\ninputs: [[1.0], [2.0]]",
        solver="fixed_point",
        run="{timeout: 0.5, atol: 1.0e-10}",
    )
    started = time.perf_counter()
    run = cli("solve", cfg, "--json", "-", "--no-diagnostics")
    assert time.perf_counter() - started < 15.0
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # the timer is off afterwards
    if calls == 2:
        err = one_line_error(run)
        assert "did not return within run.timeout (0.5 s) while it was checked" in err
        return
    assert run.exit_code == 1, (run.stdout, run.stderr)
    doc = json.loads(run.stdout)
    assert doc["status"] == "timeout" and doc["iterations"] == 0
    samples = doc["samples"]
    assert [s["solution"] for s in samples] == [[0.0], [0.0]]  # the start: the last iterate
    assert [s["status"] for s in samples] == ["timeout", "timeout"]
    if calls == 3:
        # The start's residual could not be had either: unknown and said so, not "nonfinite".
        assert doc["residual"] == "nan"
        assert "the start's residual is unknown" in " ".join(doc["notes"])
    else:
        assert [s["residual"] for s in samples] == [1.0, 2.0]  # ‖x‖ at z0 = 0


def test_run_timeout_stops_a_factory_or_an_import_that_never_returns(
    cli, module_config, write_config
) -> None:
    # The module's constructor, then a file's top-level code, wait a minute: each is one line
    # naming problem.target within seconds, and the timer is off afterwards.
    slow = module_config("SlowToBuild", "inputs: [[1.0]]", run="{timeout: 0.5}")
    started = time.perf_counter()
    err = one_line_error(cli("solve", slow))
    assert time.perf_counter() - started < 15.0
    assert (
        err.startswith("error: problem.target: calling ") and ":SlowToBuild did not return" in err
    )
    assert "within run.timeout (0.5 s) while it built the map" in err
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    cfg = write_config(
        "problem: {kind: python, target: stalls.py:make}\nrun: {timeout: 0.5}\n", "stalls.yaml"
    )
    (cfg.parent / "stalls.py").write_text(
        "import time\n\ntime.sleep(60)\n\n\ndef make():\n    pass\n"
    )
    started = time.perf_counter()
    err = one_line_error(cli("solve", cfg))
    assert time.perf_counter() - started < 15.0
    assert "problem.target: importing 'stalls.py' did not return within run.timeout (0.5 s)" in err
    assert "while it ran its top level" in err
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


def test_a_forward_that_changes_the_shape_is_one_line(cli, module_config) -> None:
    cfg = module_config(
        "Reshaping", "inputs: {random: normal, shape: [2, 2, 3]}\nstate_shape: [2, 3]"
    )
    err = one_line_error(cli("solve", cfg))
    assert "returned (2, 3, 2) for z of shape (2, 2, 3)" in err


def test_samples_that_depend_on_each_other_are_refused(cli, module_config) -> None:
    cfg = module_config("Mixing", "inputs: {random: normal, shape: [4, 3]}\nmode: train")
    err = one_line_error(cli("solve", cfg))
    assert "fails on one sample alone" in err and "BatchNorm" in err
    # In eval mode BatchNorm uses its running statistics: rows are independent again.
    assert (
        load_problem(module_config("Mixing", "inputs: {random: normal, shape: [4, 3]}")).batch == 4
    )


def test_a_factory_that_returns_no_module(cli, module_config) -> None:
    err = one_line_error(cli("solve", module_config("not_a_module", "inputs: [[1.0]]")))
    assert "must return a torch.nn.Module, got function (use kind: python" in err


def test_unknown_parameter_names_get_a_suggestion(cli, module_config) -> None:
    cfg = module_config(
        "ConvCell", "inputs: {random: normal, shape: [2, 1, 3, 3]}\nparams: {scal: 1.0}"
    )
    err = one_line_error(cli("solve", cfg))
    assert (
        "problem.params.scal: the module has no parameter or buffer 'scal' (did you mean 'scale'?"
        in err
    )


def test_module_configs_need_consent(cli, module_config, monkeypatch) -> None:
    monkeypatch.delenv("DEQ_TRUST_CODE")
    err = one_line_error(cli("solve", module_config("Injection", "inputs: [[1.0, 2.0, 3.0, 4.0]]")))
    assert "runs Python code" in err and "DEQ_TRUST_CODE=1" in err


def test_validate_checks_module_files_without_importing(
    cli, tmp_path: Path, module_config, monkeypatch
) -> None:
    monkeypatch.delenv("DEQ_TRUST_CODE")
    cfg = module_config("Injection", "weights: {file: nowhere.pt}\ninputs: [[1.0, 2.0, 3.0, 4.0]]")
    run = cli("validate", cfg)
    assert (
        run.exit_code == 2
        and "problem.weights.file: file 'nowhere.pt' does not exist" in run.stderr
    )


# -- the Python API with callables and modules ----------------------------------------------------


def test_api_solves_a_callable() -> None:
    import deqcli

    result = deqcli.solve(torch.cos, torch.tensor(1.0, dtype=torch.float64), solver="fixed_point")
    assert result.status is Status.CONVERGED
    assert float(result.z_star) == pytest.approx(0.7390851332151607, abs=1e-9)
    assert result.diagnostics is not None  # the same diagnostics as the CLI
    # A residual: z² − 2 = 0, with Newton.
    root = deqcli.solve(
        lambda z: z**2 - 2,
        torch.tensor([1.0], dtype=torch.float64),
        form="residual",
        solver="newton",
        atol=1e-14,
    )
    assert float(root.solution) == pytest.approx(2**0.5, abs=1e-14)


def test_api_solves_a_module_with_inputs_in_its_own_shape() -> None:
    import deqcli
    from tests.models.cells import ConvCell

    cell = ConvCell(channels=2).double()
    x = torch.randn(3, 1, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    result = deqcli.solve(cell, inputs=x, atol=1e-11, diagnostics=False)
    assert result.status.ok and result.solver == "auto"
    z = result.z_star
    assert z.shape == (3, 2, 4, 4)
    with torch.no_grad():
        torch.testing.assert_close(cell(z, x), z, atol=1e-10, rtol=0)
    json.dumps(result.to_dict(), allow_nan=False)


def test_api_starts_where_the_modules_weights_are() -> None:
    # The start the API makes (from state_shape) or converts (a list z0, list inputs) takes the
    # module's dtype and device, or the inputs' when there are some. Torch's default float32 CPU
    # tensors would fail the first call of this float64 module, and of any module on a GPU.
    import deqcli
    from tests.models.cells import Baked

    baked = Baked(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    made = deqcli.solve(baked, state_shape=(4,), diagnostics=False)
    given = deqcli.solve(baked, [0, 0, 0, 0], diagnostics=False)
    lists = deqcli.solve(Injection(), [0.0] * 4, inputs=[[0.1] * 4, [0.2] * 4], diagnostics=False)
    for result in (made, given, lists):
        assert result.status.ok and result.solution.dtype == torch.float64
    torch.testing.assert_close(made.solution, given.solution, atol=1e-9, rtol=0)


def test_api_errors_from_the_map_are_deq_errors() -> None:
    import deqcli
    from deqcli.errors import DeqError

    with pytest.raises(DeqError, match=r"returned \(2, 2\) for z of shape \(2, 3\)"):
        deqcli.solve(lambda z: z[:, :2], torch.zeros(2, 3))
    with pytest.raises(DeqError, match=r"z0 has 2 rows but there are 3 samples"):
        deqcli.solve(lambda z, x: z + x, torch.zeros(2, 3), inputs=torch.zeros(3, 3))


# -- the solution: report, --save, JSON; sweeps by state_dict name ----------------------------------


@pytest.mark.parametrize("suffix", [".pt", ".npy", ".npz"])
def test_save_writes_z_star_in_the_state_shape(cli, tmp_path: Path, module_config, suffix) -> None:
    cfg = module_config("ConvCell", "inputs: {random: normal, shape: [3, 1, 4, 4]}")
    out = tmp_path / f"z{suffix}"
    run = cli("solve", cfg, "--save", out, "--json", "-", "--no-diagnostics")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    expected = np.array([s["solution"] for s in doc["samples"]])
    assert expected.shape == (3, 2, 4, 4) and doc["state_shape"] == [2, 4, 4]
    if suffix == ".pt":
        saved = torch.load(out, weights_only=True).numpy()
    elif suffix == ".npy":
        saved = np.load(out)
    else:
        with np.load(out) as archive:
            saved = archive["z"]
            assert archive["converged"].tolist() == [True, True, True]
    np.testing.assert_array_equal(saved, expected)


def test_save_never_overwrites_an_input(cli, tmp_path: Path, module_config) -> None:
    torch.save({"W": _trained_W()}, tmp_path / "w.pt")
    before = (tmp_path / "w.pt").read_bytes()
    cfg = module_config("Injection", "weights: {file: w.pt}\ninputs: [[0.5, 0.5, 0.5, 0.5]]")
    err = one_line_error(cli("solve", cfg, "--save", tmp_path / "w.pt"))
    assert "--save: refusing to overwrite the input file" in err
    assert (tmp_path / "w.pt").read_bytes() == before
    err = one_line_error(cli("solve", cfg, "--save", tmp_path / "z.csv"))
    assert "--save:" in err and "must end in .pt, .npy or .npz" in err
    assert not (tmp_path / "z.csv").exists()


def test_the_report_shows_z_star(cli, tmp_path: Path, module_config) -> None:
    from tests.conftest import CONFIGS

    sqrt2 = cli("solve", CONFIGS / "sqrt2.yaml", "--no-diagnostics")
    assert "z* = [1.41421356237]" in sqrt2.stdout
    layer = cli("solve", CONFIGS / "tanh_layer.yaml", "--no-diagnostics")
    assert "‖z*‖" in layer.stdout and "z* of shape 64" in layer.stdout
    conv = cli(
        "solve",
        module_config("ConvCell", "inputs: {random: normal, shape: [2, 1, 3, 3]}"),
        "--no-diagnostics",
    )
    assert "z* of shape 2×3×3" in conv.stdout


def test_sweep_a_buffer_by_its_state_dict_name(cli, module_config) -> None:
    body = "inputs: {random: normal, shape: [2, 1, 3, 3]}"
    cfg = module_config("ConvCell", body, run="{atol: 1.0e-11}")
    run = cli("sweep", cfg, "--param", "scale=0.1,0.4", "--no-diagnostics", "--json", "-")
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["axes"][0]["key"] == "problem.params.scale"
    for point, scale in zip(doc["points"], (0.1, 0.4), strict=True):
        direct = api_solve(
            module_config("ConvCell", f"{body}\nparams: {{scale: {scale}}}", run="{atol: 1.0e-11}"),
            diagnostics=False,
        )
        np.testing.assert_allclose(np.array(point["solution"]), direct.solution.numpy(), atol=1e-10)
    dotted = cli("sweep", cfg, "--param", "norm.bias=0.0,0.2", "--no-diagnostics", "--json", "-")
    assert json.loads(dotted.stdout)["axes"][0]["key"] == "problem.params.norm.bias"
    err = one_line_error(cli("sweep", cfg, "--param", "scal=0.1,0.4"))
    assert (
        "problem.params.scal: the module has no parameter or buffer 'scal' (did you mean 'scale'?"
        in err
    )
