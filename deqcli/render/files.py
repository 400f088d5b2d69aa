"""Writing result files safely: never over the user's inputs, never half-written."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from deqcli.errors import UsageError


def check_output_path(path: str, *, protected: list[Path], flag: str) -> Path | None:
    """Validate an output path ('-' means stdout, returned as None); refuse to overwrite inputs."""
    if path == "-":
        return None
    target = Path(path)
    for p in protected:
        if target.resolve() == p.resolve():
            raise UsageError(
                f"{flag}: refusing to overwrite the input file '{path}'; choose another path"
            )
    if target.is_dir():
        raise UsageError(f"{flag}: '{path}' is a directory; give a file path")
    if not target.parent.exists():
        raise UsageError(f"{flag}: directory '{target.parent}' does not exist")
    return target


def write_text_atomic(target: Path, text: str) -> None:
    """Write via a temporary file and rename, so an interrupted run leaves the old file intact."""
    write_atomic(target, lambda fh: fh.write(text.encode("utf-8")))


def write_atomic(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on a temporary file beside ``target``, then rename it over ``target``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# The formats ``deq solve --save`` writes z* in, by suffix.
SOLUTION_FORMATS = {".pt": "torch.save", ".npy": "numpy.save", ".npz": "numpy.savez"}


def check_solution_path(path: str, *, protected: list[Path]) -> Path:
    """Validate ``--save PATH`` before solving: a known suffix, and none of the user's inputs."""
    target = check_output_path(path, protected=protected, flag="--save")
    if target is None or target.suffix not in SOLUTION_FORMATS:
        raise UsageError(
            f"--save: '{path}' must end in .pt, .npy or .npz (z* is written as a file)"
        )
    return target


def save_solution(z: Any, converged: list[bool], target: Path) -> None:
    """Write z* (batch, *state shape) to ``target``: a tensor (.pt), an array (.npy), or arrays
    ``z`` and ``converged`` (one flag per sample) in a .npz archive."""
    import numpy as np
    import torch

    z = z.detach().cpu()
    if target.suffix == ".pt":
        write_atomic(target, lambda fh: torch.save(z.clone(), fh))
    elif target.suffix == ".npy":
        write_atomic(target, lambda fh: np.save(fh, z.numpy()))
    else:
        write_atomic(target, lambda fh: np.savez(fh, z=z.numpy(), converged=np.array(converged)))


def emit_text(text: str, target: Path | None) -> None:
    """Write a rendered output to ``target`` or, for None ('-'), to stdout."""
    if target is None:
        sys.stdout.write(text)
        sys.stdout.flush()
    else:
        write_text_atomic(target, text)


def emit_json(doc: Any, target: Path | None) -> None:
    """Write a JSON document to ``target`` or, for None, to stdout."""
    emit_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", target)
