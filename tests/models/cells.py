"""Small models for the tests of ``kind: module``, ``kind: python`` with inputs and the Python API."""

from __future__ import annotations

import time

import torch
from torch import nn


def contraction(n: int, norm: float, seed: int = 0) -> torch.Tensor:
    """A seeded n×n matrix of spectral norm ``norm`` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=gen, dtype=torch.float64)
    return W * (norm / torch.linalg.matrix_norm(W, ord=2))


class Injection(nn.Module):
    """z ↦ tanh(W z + x): the tanh layer with input injection, x given per sample."""

    def __init__(self, n: int = 4, norm: float = 0.8, seed: int = 0) -> None:
        super().__init__()
        self.W = nn.Parameter(contraction(n, norm, seed))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + x)


class Baked(nn.Module):
    """The same layer with one input baked into the weights: z ↦ tanh(W z + x) with x a parameter."""

    def __init__(self, x: torch.Tensor, n: int = 4, norm: float = 0.8, seed: int = 0) -> None:
        super().__init__()
        self.W = nn.Parameter(contraction(n, norm, seed))
        self.x = nn.Parameter(torch.as_tensor(x, dtype=torch.float64).reshape(1, n))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.W.T + self.x)


class ConvCell(nn.Module):
    """A convolutional cell on (B, C, H, W) states: tanh(s·GN(conv(z)) + inject(x)), x (B, 1, H, W)."""

    def __init__(self, channels: int = 2, scale: float = 0.3, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.inject = nn.Conv2d(1, channels, 3, padding=1)
        self.norm = nn.GroupNorm(1, channels)
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.channels = channels

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        return x.new_zeros(x.shape[0], self.channels, *x.shape[2:])

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.scale * self.norm(self.conv(z)) + self.inject(x))


class Sequence(nn.Module):
    """A transformer-style cell on (B, T, d) states: z ↦ tanh(A z W + x) mixing positions and features."""

    def __init__(self, T: int = 3, d: int = 2) -> None:
        super().__init__()
        self.A = nn.Parameter(contraction(T, 0.7, seed=1))
        self.W = nn.Parameter(contraction(d, 0.9, seed=2))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.A @ z @ self.W + x)


class Raising(nn.Module):
    """Works for ``calls`` evaluations, then raises (a forward that fails in the middle of a solve)."""

    def __init__(self, calls: int = 3) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.calls = calls

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls < 0:
            raise ValueError("the cache ran dry")
        return self.a * z + x


class Hanging(nn.Module):
    """Works for ``calls`` evaluations, then waits ``wait`` seconds (a forward that never returns)."""

    def __init__(self, calls: int = 3, wait: float = 60.0) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.calls = calls
        self.wait = wait

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        self.calls -= 1
        if self.calls < 0:
            time.sleep(self.wait)
        return self.a * z + x


class SlowToBuild(nn.Module):
    """Its constructor waits ``wait`` seconds (a factory that never returns)."""

    def __init__(self, wait: float = 60.0) -> None:
        super().__init__()
        time.sleep(wait)
        self.a = nn.Parameter(torch.tensor(0.5))

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.a * z + x


class Reshaping(nn.Module):
    """Returns the transpose of z: the shape of a (B, 2, 3) state changes."""

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * z.transpose(1, 2) + x.transpose(1, 2)


class Mixing(nn.Module):
    """BatchNorm in train mode: every sample's output depends on the whole batch."""

    def __init__(self, n: int = 3) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(n)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * torch.tanh(self.norm(z + x))


def injection_with_inputs(n: int = 4, batch: int = 3):
    """A ``kind: python`` factory returning (map, z0, inputs): map(z, x) = tanh(W z + x)."""
    W = contraction(n, 0.8)
    x = torch.linspace(-1.0, 1.0, batch * n, dtype=torch.float64).reshape(batch, n)

    def layer(z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ W.T + x)

    return layer, torch.zeros(n, dtype=torch.float64), x


def not_a_module():
    """A factory for kind: module that returns a function by mistake."""
    return lambda z, x: z
