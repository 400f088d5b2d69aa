"""Resolve ``--device`` and ``--dtype`` to torch objects; an unavailable device is an error, never a fallback."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from deqcli.errors import DeviceError, UsageError

if TYPE_CHECKING:
    import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPES = ("float32", "float64")


def check_device_name(name: str, *, key: str = "run.device") -> None:
    """Reject malformed device names without importing torch."""
    if not DEVICE_PATTERN.match(name):
        raise UsageError(f"{key}: unknown device '{name}'; use auto, cpu, cuda, cuda:N or mps")


def resolve_device(name: str, *, key: str = "run.device") -> torch.device:
    """Map a device name to an available torch.device; ``auto`` prefers CUDA, then MPS, then CPU."""
    import torch

    check_device_name(name, key=key)
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"{key}: CUDA is not available on this machine (torch {torch.__version__}, "
                "built without CUDA or no GPU visible); use --device cpu or --device auto"
            )
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"{key}: {name} does not exist; this machine has "
                f"{torch.cuda.device_count()} CUDA device(s) (cuda:0 … cuda:{torch.cuda.device_count() - 1})"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise DeviceError(f"{key}: MPS is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def resolve_dtype(name: str, *, key: str = "run.dtype") -> torch.dtype:
    """Map ``float32``/``float64`` to the torch dtype."""
    import torch

    if name not in DTYPES:
        raise UsageError(f"{key}: unknown dtype '{name}'; use float32 or float64")
    return getattr(torch, name)


def default_atol(dtype_name: str) -> float:
    """The default absolute tolerance: near what each precision can reach on well-scaled problems."""
    return 1e-10 if dtype_name == "float64" else 1e-5
