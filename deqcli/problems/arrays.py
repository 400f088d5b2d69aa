"""Turn array specifications from a config (numbers, lists, expressions, files, random) into tensors."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from deqcli.config import ARRAY_FILE_SUFFIXES, FileArray, RandomArray
from deqcli.errors import ConfigError
from deqcli.expr import parse_expression
from deqcli.limits import Limits
from deqcli.problems import checkpoints

# Integer and boolean arrays are read as numbers too (labels, masks); anything else is refused.
_NUMERIC_INTS = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.bool)


class ArrayBuilder:
    """Materialises array specs on one device and dtype, resolving files and seeds from the config."""

    def __init__(
        self,
        *,
        device: torch.device,
        dtype: torch.dtype,
        base_dir: Path,
        seed_for: Any,
        limits: Limits | None = None,
    ) -> None:
        self.device = device
        self.dtype = dtype
        self.base_dir = base_dir
        self.seed_for = seed_for  # key -> int
        self.limits = limits or Limits()  # an expression's cost is checked before it runs

    def build(
        self,
        spec: Any,
        key: str,
        *,
        shape: tuple[int, ...] | None = None,
        env: Mapping[str, Any] | None = None,
    ) -> torch.Tensor:
        """The tensor for ``spec`` at config key ``key``; ``shape`` is required for random arrays."""
        if isinstance(spec, FileArray):
            value = self._load(spec, key)
        elif isinstance(spec, RandomArray):
            if spec.shape is not None:
                if shape is not None and tuple(spec.shape) != tuple(shape):
                    raise ConfigError(
                        f"{key}.shape", f"must be {list(shape)} here, or left out, got {spec.shape}"
                    )
                shape = tuple(spec.shape)
            if shape is None:
                raise ConfigError(
                    key,
                    "a random array needs a known shape here; give shape: [...], a list or a file",
                )
            numel_ok(shape, key)
            value = self._random(spec, key, shape)
        elif isinstance(spec, str):
            value = self._expression(spec, key, env or {})
        else:
            value = torch.as_tensor(spec, dtype=self.dtype, device=self.device)
        if not bool(torch.isfinite(value).all()):
            raise ConfigError(key, "contains inf or NaN; every value must be finite")
        return value

    def _expression(self, text: str, key: str, env: Mapping[str, Any]) -> torch.Tensor:
        expr = parse_expression(text, key=key, names=set(env))
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.limits.check_expression(expr, env, itemsize=itemsize)
        out = expr.evaluate(env, dtype=self.dtype, device=self.device)
        return torch.as_tensor(out, dtype=self.dtype, device=self.device)

    def _load(self, spec: FileArray, key: str) -> torch.Tensor:
        path = checkpoints.locate(spec.file, self.base_dir, key, ARRAY_FILE_SUFFIXES)
        data = checkpoints.array(path, spec.file, key, spec.key)
        if not (data.is_floating_point() or data.dtype in _NUMERIC_INTS):
            raise ConfigError(key, f"'{spec.file}' is not a numeric array (dtype {data.dtype})")
        return data.to(device=self.device, dtype=self.dtype)

    def _random(self, spec: RandomArray, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        seed = spec.seed if spec.seed is not None else self.seed_for(key)
        gen = torch.Generator().manual_seed(seed)
        # Draw in float64 on the CPU so a seed gives the same array on every device and dtype.
        if spec.random in ("normal", "uniform"):
            draw = torch.randn if spec.random == "normal" else _uniform
            value = draw(shape, generator=gen, dtype=torch.float64) * spec.scale
            if spec.spectral_norm is not None:
                if len(shape) != 2:
                    raise ConfigError(key, "spectral_norm needs a matrix")
                value = value * (spec.spectral_norm / torch.linalg.matrix_norm(value, ord=2))
        else:
            if len(shape) != 2 or shape[0] != shape[1]:
                raise ConfigError(
                    key, f"random: {spec.random} needs a square matrix, shape is {shape}"
                )
            q, r = torch.linalg.qr(torch.randn(shape, generator=gen, dtype=torch.float64))
            q = q * torch.sign(torch.diagonal(r))  # Haar measure
            if spec.random == "orthogonal":
                value = spec.scale * q
            else:
                lo, hi = spec.eigenvalues  # type: ignore[misc]  # checked by the config model
                eig = torch.linspace(lo, hi, shape[0], dtype=torch.float64)
                value = spec.scale * (q * eig) @ q.T
        return value.to(device=self.device, dtype=self.dtype)


def _uniform(
    shape: tuple[int, ...], *, generator: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    return torch.rand(shape, generator=generator, dtype=dtype) * 2 - 1


def as_batch(value: torch.Tensor, key: str, batch: int, dim: int) -> torch.Tensor:
    """Broadcast a scalar, an (n,) vector or a (batch, n) matrix to (batch, n)."""
    if value.dim() == 0:
        return value.expand(batch, dim).clone()
    if value.dim() == 1 and value.shape[0] == dim:
        return value.expand(batch, dim).clone()
    if value.dim() == 2 and value.shape == (batch, dim):
        return value.clone()
    if value.dim() == 2 and value.shape == (1, dim):
        return value.expand(batch, dim).clone()
    raise ConfigError(
        key,
        f"shape {tuple(value.shape)} does not fit: expected a number, ({dim},) or ({batch}, {dim});"
        " set problem.dim (and problem.batch) to match",
    )


def numel_ok(shape: tuple[int, ...], key: str, limit: int = 50_000_000) -> None:
    """Refuse absurd array sizes early, with the key that asked for them."""
    if math.prod(shape) > limit:
        raise ConfigError(key, f"array of shape {shape} is too large (limit {limit} elements)")
