"""A small convolutional deep equilibrium classifier for 8×8 handwritten digits.

The equilibrium map is ``DigitsCell``: z ↦ tanh(scale · conv₂(relu(conv₁(z))) + GroupNorm(inject(x)))
on a state z of shape (channels, size, size) per image, with the image x (1, size, size) injected
at every step. ``scale`` is a buffer (1 in training): it multiplies the recurrent weights, so the
Lipschitz constant of the map is at most scale · ‖conv₂‖ · ‖conv₁‖ and a sweep over it shows where
the layer stops converging. The classifier reads the equilibrium with a pooled linear head.

``deq`` loads ``DigitsCell`` from the checkpoint with ``kind: module`` (see the configs here and
docs/models.md); ``train.py`` trains ``DigitsDEQ`` with ``deqcli.nn.DEQLayer`` (implicit gradients).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deqcli.nn import DEQLayer


class DigitsCell(nn.Module):
    """The equilibrium map f(z, x): two 3×3 convolutions on z, the image injected through a third."""

    def __init__(self, channels: int = 8, groups: int = 2) -> None:
        super().__init__()
        self.channels = channels
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.inject = nn.Conv2d(1, channels, 3, padding=1)
        self.norm = nn.GroupNorm(groups, channels)
        self.register_buffer("scale", torch.tensor(1.0))

    def init_state(self, x: torch.Tensor) -> torch.Tensor:
        """The state has ``channels`` channels at the image's resolution: zeros of (B, C, H, W)."""
        return x.new_zeros(x.shape[0], self.channels, *x.shape[2:])

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        mixed = self.conv2(torch.relu(self.conv1(z)))
        return torch.tanh(self.scale * mixed + self.norm(self.inject(x)))


class DigitsDEQ(nn.Module):
    """Image → equilibrium z* of ``DigitsCell`` → 2×2 average pooling → linear → 10 logits."""

    def __init__(self, channels: int = 8, size: int = 8, **layer: Any) -> None:
        super().__init__()
        self.deq = DEQLayer(DigitsCell(channels), **layer)
        self.head = nn.Linear(channels * (size // 2) ** 2, 10)

    @property
    def cell(self) -> DigitsCell:
        """The equilibrium map (what the configs load)."""
        return self.deq.f

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.deq(x)
        return self.head(torch.flatten(nn.functional.avg_pool2d(z, 2), 1))


def load_classifier(path: str, **layer: Any) -> DigitsDEQ:
    """The trained classifier from a checkpoint written by train.py."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    model = DigitsDEQ(channels=int(ckpt["channels"]), size=int(ckpt["size"]), **layer)
    model.cell.load_state_dict(ckpt["cell"])
    model.head.load_state_dict(ckpt["head"])
    return model
