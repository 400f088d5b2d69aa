"""The equilibrium layer z = tanh(W z + U x + b) of a deep equilibrium model."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from deqcli.config import Config, RandomArray, TanhLayerSpec
from deqcli.errors import ConfigError
from deqcli.problems.arrays import ArrayBuilder, as_batch
from deqcli.problems.base import Problem, Structure


def tanh_layer_map(z: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Batched map: rows of z are samples, rows of p['x'] their inputs; U and b are optional."""
    pre = z @ p["W"].mT + (p["x"] @ p["U"].mT if "U" in p else p["x"])
    return torch.tanh(pre + p["b"] if "b" in p else pre)


def tanh_layer_jacobian(
    z: torch.Tensor, p: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """f(z), and J_f(z) = diag(1 − f²) W per sample as its row scales 1 − f² and W."""
    f = tanh_layer_map(z, p)
    return f, 1 - f * f, p["W"]


def build(cfg: Config, arrays: ArrayBuilder) -> Problem:
    """Build the layer from its spec; U defaults to the identity when input_dim equals dim."""
    spec = cfg.problem
    if not isinstance(spec, TanhLayerSpec):
        raise TypeError("tanh_layer.build needs a TanhLayerSpec")
    n, m = spec.dim, spec.input_dim or spec.dim
    batch = _batch(spec, arrays, m)
    env: dict[str, object] = {"n": n, "m": m, "batch": batch}
    W = _shaped(arrays.build(spec.W, "problem.W", shape=(n, n), env=env), "problem.W", (n, n))
    env["W"] = W
    if spec.U is None:
        if m != n:
            raise ConfigError("problem.U", f"required when input_dim ({m}) differs from dim ({n})")
        U = None
    else:
        U = _shaped(arrays.build(spec.U, "problem.U", shape=(n, m), env=env), "problem.U", (n, m))
        env["U"] = U
    b = None
    if spec.b is not None:
        b = arrays.build(spec.b, "problem.b", shape=(n,), env=env)
        b = _shaped(b.expand(n) if b.dim() == 0 else b, "problem.b", (n,))
        env["b"] = b
    x = as_batch(
        arrays.build(spec.x, "problem.x", shape=(batch, m), env=env), "problem.x", batch, m
    )
    env["x"] = x
    z0 = as_batch(
        arrays.build(spec.initial, "problem.initial", shape=(batch, n), env=env),
        "problem.initial",
        batch,
        n,
    )

    # U x + b is recomputed in each call (not cached) so derivatives with respect to x, U and b
    # flow through the map; with U = I (the default) it costs nothing extra.
    params = {"W": W, "x": x}
    if U is not None:
        params["U"] = U
    if b is not None:
        params["b"] = b
    norm = float(torch.linalg.matrix_norm(W.to(torch.float64), ord=2))
    structure = Structure(
        lipschitz_bound=norm,
        lipschitz_reason="L ≤ ‖W‖₂ · sup|tanh′| = ‖W‖₂ (tanh is 1-Lipschitz)",
    )
    formula = "W z + " + ("U x" if U is not None else "x") + (" + b" if b is not None else "")
    return Problem(
        name=cfg.problem_name,
        kind="tanh_layer",
        form="fixed_point",
        func=tanh_layer_map,
        z0=z0,
        params=params,
        structure=structure,
        description=f"z = tanh({formula}), n={n}, batch={batch}, ‖W‖₂={norm:.4g}",
        batched_params=frozenset({"x"}),
        row_scaled_jacobian=tanh_layer_jacobian,
    )


def _batch(spec: TanhLayerSpec, arrays: ArrayBuilder, m: int) -> int:
    """``batch`` as given, else the rows of a given (batch, m) x, else 1."""
    if spec.batch is not None or isinstance(spec.x, (RandomArray, str)):
        return spec.batch or 1
    x = arrays.build(spec.x, "problem.x")
    return x.shape[0] if x.dim() == 2 and x.shape[1] == m else 1


def _shaped(value: torch.Tensor, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    if tuple(value.shape) != shape:
        raise ConfigError(key, f"expected shape {shape}, got {tuple(value.shape)}")
    return value
