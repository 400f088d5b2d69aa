"""An example map written in Python, used by configs/python_map.yaml.

The factory returns (map, z0). The map takes a (batch, n) tensor to a (batch, n) tensor row by row
and must accept any batch size (deq evaluates single rows for per-sample peers such as scipy).
"""

import torch


class DampedCosine(torch.nn.Module):
    """z ↦ a ⊙ cos(z) + c with a learnable weight vector a (its entries are below 1 in size)."""

    def __init__(self, n: int, c: float) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.linspace(0.2, 0.8, n))
        self.c = c

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.a * torch.cos(z) + self.c


def make(n: int = 4, batch: int = 3, c: float = 0.25) -> tuple[torch.nn.Module, torch.Tensor]:
    """The module and `batch` different starts, one per row."""
    starts = torch.linspace(-1.0, 1.0, batch)[:, None].expand(batch, n).clone()
    return DampedCosine(n, c), starts
