"""deqcli.nn.DEQLayer: forward by any deq solver, backward by the implicit function theorem."""

from __future__ import annotations

import pytest
import torch

from deqcli.errors import DeqError, UsageError
from deqcli.nn import DEQLayer
from tests.models.cells import Baked, ConvCell, Injection

pytestmark = pytest.mark.usefixtures("one_thread")


def _grads(loss: torch.Tensor, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    values = torch.autograd.grad(loss, list(tensors.values()))
    return dict(zip(tensors, values, strict=True))


def test_gradients_of_a_linear_layer_are_exact() -> None:
    # z* = (I − A)⁻¹ U x in closed form: every gradient has a known answer.
    gen = torch.Generator().manual_seed(0)
    n, m = 5, 3
    A = torch.randn(n, n, generator=gen, dtype=torch.float64)
    A = (0.7 * A / torch.linalg.matrix_norm(A, ord=2)).requires_grad_(True)
    U = torch.randn(n, m, generator=gen, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, m, generator=gen, dtype=torch.float64, requires_grad=True)
    layer = DEQLayer(lambda z, x: z @ A.T + x @ U.T, atol=1e-13, max_iter=200)
    z = layer(x, torch.zeros(4, n, dtype=torch.float64))
    weights = torch.linspace(-1, 1, n, dtype=torch.float64)
    got = _grads(((z**2).sum(dim=1) + z @ weights).sum(), {"A": A, "U": U, "x": x})
    exact_z = torch.linalg.solve(torch.eye(n, dtype=torch.float64) - A, (x @ U.T).T).T
    want = _grads(((exact_z**2).sum(dim=1) + exact_z @ weights).sum(), {"A": A, "U": U, "x": x})
    torch.testing.assert_close(z, exact_z, atol=1e-12, rtol=0)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-11, rtol=1e-10)
    assert layer.stats.backward_converged and layer.stats.backward_iterations > 0


def test_a_layer_without_inputs_starts_in_its_modules_dtype_and_device() -> None:
    # No x and no z0: the start is made in the shape given, where the module's weights are (a
    # float64 module here; a CUDA module on a GPU), not as torch's default float32 CPU tensor.
    cell = Baked(torch.tensor([0.1, 0.2, 0.3, 0.4]))
    layer = DEQLayer(cell, state_shape=(4,), atol=1e-12, max_iter=200)
    z = layer()
    assert z.dtype == torch.float64 and z.shape == (1, 4)
    assert layer.stats.status == "converged"
    with torch.no_grad():
        torch.testing.assert_close(cell(z), z, atol=1e-11, rtol=0)


def _unrolled(cell: torch.nn.Module, x: torch.Tensor, z: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        z = cell(z, x)
    return z


def test_conv_layer_gradients_match_unrolled_differentiation() -> None:
    cell = ConvCell(channels=2).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 1, 3, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(2, 2, 3, 3, generator=gen, dtype=torch.float64)
    layer = DEQLayer(cell, solver="broyden", atol=1e-13, max_iter=200, backward_tol=1e-13)
    z = layer(x)
    assert z.shape == (2, 2, 3, 3) and layer.stats.status == "converged"
    tensors = {**dict(cell.named_parameters()), "x": x}
    implicit = _grads((z * probe).sum() + (z**2).sum(), tensors)
    # Backpropagating through enough plain iterations converges to the same gradient (ρ < 1).
    z_unrolled = _unrolled(cell, x, torch.zeros_like(z), 120)
    torch.testing.assert_close(z_unrolled, z, atol=1e-12, rtol=0)
    unrolled = _grads((z_unrolled * probe).sum() + (z_unrolled**2).sum(), tensors)
    for name, value in unrolled.items():
        torch.testing.assert_close(implicit[name], value, atol=1e-10, rtol=1e-8, msg=name)


def test_gradients_match_torchdeq_implicit_backward() -> None:
    torchdeq = pytest.importorskip("torchdeq")
    cell = Injection(n=6, norm=0.9, seed=4)
    x = torch.linspace(-1.5, 1.5, 18, dtype=torch.float64).reshape(3, 6).requires_grad_(True)
    probe = torch.cos(torch.arange(18, dtype=torch.float64)).reshape(3, 6)
    tensors = {"W": cell.W, "x": x}

    ours = DEQLayer(cell, solver="anderson", atol=1e-13, max_iter=300, backward_tol=1e-13)
    mine = _grads((ours(x) * probe).sum(), tensors)

    deq = torchdeq.get_deq(
        f_solver="fixed_point_iter",
        b_solver="fixed_point_iter",
        f_max_iter=400,
        b_max_iter=400,
        f_tol=1e-14,
        b_tol=1e-14,
        ift=True,
    )
    z_out, _ = deq(lambda z: cell(z, x), torch.zeros(3, 6, dtype=torch.float64))
    theirs = _grads((z_out[-1] * probe).sum(), tensors)
    for name in tensors:
        torch.testing.assert_close(mine[name], theirs[name], atol=1e-9, rtol=1e-8, msg=name)


def test_jacobian_free_backward_is_the_one_step_gradient() -> None:
    cell = Injection(n=4, norm=0.8)
    x = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(2, 4)
    layer = DEQLayer(cell, backward="jfb", atol=1e-13)
    z = layer(x)
    (got,) = torch.autograd.grad(z.sum(), cell.W)
    (want,) = torch.autograd.grad(cell(z.detach(), x).sum(), cell.W)
    torch.testing.assert_close(got, want)
    assert layer.stats.backward_iterations is None  # no adjoint solve was made
    implicit = DEQLayer(cell, atol=1e-13)
    (exact,) = torch.autograd.grad(implicit(x).sum(), cell.W)
    assert not torch.allclose(exact, got)  # the shortcut is not the true gradient


def test_the_layer_trains_a_module_and_reports_its_statistics() -> None:
    torch.manual_seed(0)
    cell = ConvCell(channels=2)
    layer = DEQLayer(cell, solver="anderson", atol=1e-6)
    assert all(name.startswith("f.") for name, _ in layer.named_parameters())
    x = torch.randn(4, 1, 3, 3)
    target = torch.tanh(torch.randn(4, 2, 3, 3))
    optimiser = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(15):
        loss = ((layer(x) - target) ** 2).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]
    stats = layer.stats.to_dict()
    assert stats["status"] == "converged" and stats["converged_samples"] == stats["batch"] == 4
    assert stats["iterations"] > 0 and stats["nfev"] == stats["iterations"] + 1
    assert stats["residual"] <= 1e-6 and stats["backward_converged"] is True
    with torch.no_grad():
        assert layer(x).grad_fn is None


def test_inputs_of_another_shape_get_states_of_theirs() -> None:
    calls: list[tuple[int, ...]] = []

    def f(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(z.shape))
        return 0.5 * torch.tanh(z) + x

    layer = DEQLayer(f, atol=1e-10)
    extra = []
    with torch.no_grad():
        for shape in [(2, 3), (2, 3), (4, 5, 5), (4, 5, 5)]:
            before = len(calls)
            z = layer(torch.ones(shape, dtype=torch.float64))
            assert z.shape == shape and layer.stats.status == "converged"
            torch.testing.assert_close(z, 0.5 * torch.tanh(z) + 1, atol=1e-9, rtol=0)
            extra.append(len(calls) - before - layer.stats.nfev)
    # The shape of z is found by one call of f, once for each shape of the inputs.
    assert extra == [1, 0, 1, 0]


def test_unconverged_solves_are_reported_not_raised() -> None:
    layer = DEQLayer(Injection(n=4, norm=0.95), solver="fixed_point", max_iter=3, atol=1e-12)
    z = layer(torch.ones(2, 4, dtype=torch.float64))
    assert z.shape == (2, 4)
    assert layer.stats.status == "max_iter" and layer.stats.converged_samples == 0


def test_the_layer_is_part_of_the_public_api() -> None:
    import deqcli

    assert deqcli.nn.DEQLayer is DEQLayer and "nn" in deqcli.__all__


def test_bad_layers_fail_early_with_one_line() -> None:
    with pytest.raises(UsageError, match="unknown solver"):
        DEQLayer(Injection(), solver="andersen")
    with pytest.raises(UsageError, match="backward: must be implicit or jfb"):
        DEQLayer(Injection(), backward="phantom")  # type: ignore[arg-type]
    layer = DEQLayer(lambda z, x: z[:, :2] + x[:, :2])
    with pytest.raises(DeqError, match=r"returned \(2, 2\) for z of shape \(2, 3\)"):
        layer(torch.zeros(2, 3), z0=torch.zeros(2, 3))
