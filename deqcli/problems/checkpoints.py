"""Reading arrays and state_dicts from files: .npy, .npz, torch.save files and .safetensors.

Nothing here unpickles code: numpy files are read with ``allow_pickle=False``, torch files with
``weights_only=True`` and safetensors holds tensors only. A file is read into either one array or a
flat mapping of dotted names to tensors (nested dicts such as ``{"model": state_dict, "epoch": 3}``
become ``model.<name>`` entries; numbers and strings beside them are metadata and are skipped).
Every failure is a ConfigError naming the config key.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deqcli.config import check_readable
from deqcli.errors import ConfigError, first_line

SAFETENSORS_INSTALL = "pip install safetensors (or pip install 'deqcli[models]')"
# How many names an error message lists before it says how many more there are.
NAMES_SHOWN = 8


def locate(name: str, base_dir: Path, key: str, suffixes: tuple[str, ...]) -> Path:
    """The file ``name`` (relative to the config's folder), checked for its suffix and existence."""
    path = Path(name)
    if not path.is_absolute():
        path = base_dir / path
    if path.suffix not in suffixes:
        raise ConfigError(key, f"file '{name}' must be one of {', '.join(suffixes)}")
    check_readable(path, name, key)
    return path


def read(path: Path, shown: str, key: str) -> torch.Tensor | dict[str, torch.Tensor]:
    """One tensor, or a flat {dotted name: tensor} mapping, from the file at ``path``."""
    if path.stat().st_size == 0:  # the readers' own messages for this are empty or cryptic
        raise ConfigError(key, f"cannot read '{shown}': the file is empty")
    try:
        if path.suffix == ".npy":
            data: Any = np.load(path, allow_pickle=False)
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                data = {k: archive[k] for k in archive.files}
        elif path.suffix == ".safetensors":
            data = _read_safetensors(path, key)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except ConfigError:
        raise
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text:
            found = re.search(r"GLOBAL (\S+)", text)
            what = f" ({found.group(1)})" if found else ""
            raise ConfigError(
                key,
                f"'{shown}' holds Python objects{what}, not only tensors; save "
                "model.state_dict() with torch.save and load that file",
            ) from None
        detail = text.partition("WeightsUnpickler error:")[2] or text
        raise ConfigError(
            key, f"cannot read '{shown}': not a torch checkpoint ({first_line(detail)})"
        ) from None
    except Exception as exc:  # any reader failure is the user's file, not our bug
        detail = first_line(str(exc)) or type(exc).__name__
        raise ConfigError(key, f"cannot read '{shown}': {detail}") from None
    if isinstance(data, (np.ndarray, torch.Tensor)):
        return _tensor(data, shown, key)
    if isinstance(data, Mapping):
        flat: dict[str, torch.Tensor] = {}
        _flatten(data, "", flat, shown, key)
        return flat
    raise ConfigError(
        key, f"'{shown}' holds a {type(data).__name__}, not an array or a dict of tensors"
    )


def _read_safetensors(path: Path, key: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError(
            key, f"reading .safetensors files needs the safetensors package: {SAFETENSORS_INSTALL}"
        ) from None
    return load_file(str(path), device="cpu")


def _flatten(
    node: Mapping[Any, Any], prefix: str, out: dict[str, torch.Tensor], shown: str, key: str
) -> None:
    for k, v in node.items():
        name = f"{prefix}{k}"
        if isinstance(v, Mapping):
            _flatten(v, f"{name}.", out, shown, key)
        elif isinstance(v, (np.ndarray, torch.Tensor)):
            out[name] = _tensor(v, f"{shown}:{name}", key)


def _tensor(value: np.ndarray | torch.Tensor, shown: str, key: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor) and value.layout != torch.strided:
        # Sparse and other layouts fail deep inside torch (isfinite, arithmetic) without it.
        raise ConfigError(
            key, f"'{shown}' is a {value.layout} tensor; save it dense (tensor.to_dense())"
        )
    try:
        return torch.as_tensor(value) if isinstance(value, np.ndarray) else value
    except (TypeError, RuntimeError) as exc:
        raise ConfigError(key, first_line(f"'{shown}' is not a numeric array: {exc}")) from None


def array(path: Path, shown: str, key: str, entry: str | None) -> torch.Tensor:
    """The one array a ``{file: ..., key: ...}`` spec names."""
    data = read(path, shown, key)
    if isinstance(data, torch.Tensor):
        if entry is not None:
            raise ConfigError(f"{key}.key", f"'{shown}' holds a single array; drop key: {entry}")
        return data
    if entry is None:
        if len(data) == 1:
            return next(iter(data.values()))
        if not data:
            raise ConfigError(key, f"'{shown}' holds no arrays")
        raise ConfigError(
            key, f"'{shown}' holds several arrays; pick one with key: ({listing(data)})"
        )
    if entry not in data:
        raise ConfigError(
            f"{key}.key", f"'{shown}' has no array '{entry}' (it holds {listing(data)})"
        )
    return data[entry]


def state_dict(
    path: Path, shown: str, key: str, entry: str | None, *, entry_key: str
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, or of the sub-tree ``entry`` (``model.cell`` → ``model.cell.*``).

    Errors about the file name ``key``; a sub-tree that is not there names ``entry_key``.
    """
    data = read(path, shown, key)
    if isinstance(data, torch.Tensor):
        raise ConfigError(
            key, f"'{shown}' holds a single tensor, not a state_dict; save model.state_dict()"
        )
    if not data:
        raise ConfigError(key, f"'{shown}' holds no tensors")
    if entry is None:
        return data
    prefix = entry.rstrip(".") + "."
    sub = {k[len(prefix) :]: v for k, v in data.items() if k.startswith(prefix)}
    if not sub:
        tops = sorted({k.split(".")[0] for k in data})
        raise ConfigError(
            entry_key,
            f"'{entry}' matches no entry of '{shown}' (its top-level names: {listing(tops)})",
        )
    return sub


def listing(names: Mapping[str, Any] | list[str], limit: int = NAMES_SHOWN) -> str:
    """Up to ``limit`` names, then how many more."""
    items = list(names)
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items)} in all)" if len(items) > limit else "")
