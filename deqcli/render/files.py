"""Writing result files safely: never over the user's inputs, never half-written."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

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
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
