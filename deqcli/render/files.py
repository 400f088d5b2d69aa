"""Writing result files safely: checked before the solve, never over the user's inputs, never
half-written, and never lost.

- ``check_output_path`` runs before any solving: the folder must exist and be writable, the name
  must fit the file system's limits, and an input (the config, a baseline) is never a target.
- ``write_text`` replaces a regular file atomically (a temporary file in the same folder, renamed
  over it), so an interrupted run leaves the old file intact. A symlink is followed and its target
  replaced; a FIFO, a device or ``/dev/stdout`` is written in place, never replaced by a regular
  file. New files get the permissions the umask allows (0666 & ~umask), like any other tool's; a
  replaced file keeps its own.
- A write that still fails after the solve (disk full, permissions changed meanwhile) loses
  nothing: the text goes to a fallback file in the temporary folder, or to stdout when even that
  fails, and ``OutputError`` says where, in one line. ``Outputs`` writes a command's files in order
  and reports the first failure only after every other file was written.
"""

from __future__ import annotations

import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from deqcli import interrupt
from deqcli.errors import UsageError

# Longest file name and path most file systems accept (POSIX NAME_MAX and PATH_MAX).
NAME_MAX = 255
PATH_MAX = 4096

_temporaries: set[str] = set()


class OutputError(UsageError):
    """A result could not be written where asked; the message says where it went instead."""


def check_output_path(path: str, *, protected: list[Path], flag: str) -> Path | None:
    """Validate an output path before anything is solved ('-' means stdout, returned as None)."""
    if path == "-":
        return None
    check_not_empty(path, flag=flag)
    target = Path(path)
    check_writable(target, flag=flag, protected=protected)
    if target.is_dir():
        raise UsageError(f"{flag}: '{path}' is a directory; give a file path")
    return target


def check_not_empty(path: str, *, flag: str) -> None:
    """Refuse an empty path: as a Path it is '.', the current folder, which no one means (an unset
    shell variable, ``--json "$OUT"``)."""
    if not path.strip():
        raise UsageError(f"{flag}: the path is empty; give a file path")


def check_writable(target: Path, *, flag: str, protected: Sequence[Path] = ()) -> None:
    """The checks every output path gets: name length, not an input, folder exists and is
    writable, an existing file is writable. Symlinks are judged by what they point to."""
    name = os.fsencode(target.name)
    if len(name) > NAME_MAX:
        raise UsageError(
            f"{flag}: the file name is {len(name)} bytes long; the limit is {NAME_MAX}"
        )
    if len(os.fsencode(str(target))) > PATH_MAX:
        raise UsageError(f"{flag}: the path is longer than {PATH_MAX} bytes")
    real = Path(os.path.realpath(target))
    for p in protected:
        if real == Path(os.path.realpath(p)):
            raise UsageError(
                f"{flag}: refusing to overwrite the input file '{target}'; choose another path"
            )
    if target.exists():  # through symlinks; /dev/stdout and FIFOs are written in place
        if not os.access(target, os.W_OK):
            raise UsageError(f"{flag}: '{target}' is not writable")
        return
    folder = real.parent
    if not folder.exists():
        raise UsageError(f"{flag}: directory '{_shown_parent(target)}' does not exist")
    if not folder.is_dir():
        raise UsageError(f"{flag}: '{_shown_parent(target)}' is not a directory")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag}: directory '{_shown_parent(target)}' is not writable")


def check_distinct(targets: Mapping[str, Path | None]) -> None:
    """Refuse two outputs of one command that name the same file: the one written last would
    replace the other. Devices and FIFOs (/dev/null, /dev/stdout) may be shared."""
    seen: dict[str, str] = {}
    for flag, target in targets.items():
        if target is None or (target.exists() and not target.is_file()):
            continue
        real = os.path.realpath(target)
        if real in seen:
            raise UsageError(
                f"{flag}: '{target}' is also the {seen[real]} file; give each output its own path"
            )
        seen[real] = flag


def _shown_parent(target: Path) -> Path:
    return target.parent if str(target.parent) else Path(".")


def write_text(target: Path, text: str) -> None:
    """Write ``text`` to ``target`` (see ``write_atomic``)."""
    write_atomic(target, lambda fh: fh.write(text.encode("utf-8")))


def write_atomic(target: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call ``write`` on the file behind ``target``: a temporary file beside a regular file (or a
    new one), renamed over it; a FIFO or a device is written in place."""
    try:
        mode = os.stat(target).st_mode  # through symlinks
    except FileNotFoundError:
        mode = None
    if mode is not None and not stat.S_ISREG(mode):
        # A FIFO, a terminal, /dev/stdout: replacing it by a regular file would break the
        # reader at the other end (or the device node itself). Write into it, by the name given
        # (/dev/stdout resolves to a /proc entry that cannot be opened by its resolved name).
        with open(target, "wb") as fh:
            write(fh)
        return
    real = Path(os.path.realpath(target))  # a symlink's target is what gets replaced
    keep = stat.S_IMODE(mode) if mode is not None else 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{real.name[:200]}.", dir=real.parent)
    _temporaries.add(tmp)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fchmod(fh.fileno(), keep)
        os.replace(tmp, real)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _temporaries.discard(tmp)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _remove_temporaries() -> None:
    for tmp in list(_temporaries):
        Path(tmp).unlink(missing_ok=True)


interrupt.at_hard_exit(_remove_temporaries)


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
    ``z`` and ``converged`` (one flag per sample) in a .npz archive. A write that fails is an
    OutputError naming the file (the JSON result, if asked for, still has z*)."""
    import numpy as np
    import torch

    z = z.detach().cpu()
    try:
        if target.suffix == ".pt":
            write_atomic(target, lambda fh: torch.save(z.clone(), fh))
        elif target.suffix == ".npy":
            write_atomic(target, lambda fh: np.save(fh, z.numpy()))
        else:
            write_atomic(
                target, lambda fh: np.savez(fh, z=z.numpy(), converged=np.array(converged))
            )
    except OSError as exc:
        raise OutputError(f"--save: cannot write '{target}' ({exc.strerror or exc})") from None


def emit_text(text: str, target: Path | None, *, flag: str = "output") -> None:
    """Write a rendered output to ``target`` or, for None ('-'), to stdout.

    When the write fails, the text is kept (see ``fallback``) and OutputError says where.
    """
    try:
        if target is None:
            sys.stdout.write(text)
            sys.stdout.flush()
        else:
            write_text(target, text)
    except OSError as exc:
        where = fallback(text, target)
        shown = "stdout" if target is None else f"'{target}'"
        raise OutputError(
            f"{flag}: cannot write {shown} ({exc.strerror or exc}); {where}"
        ) from None


def emit_json(doc: Any, target: Path | None, *, flag: str = "--json") -> None:
    """Write a JSON document to ``target`` or, for None, to stdout."""
    emit_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", target, flag=flag)


def fallback(text: str, target: Path | None) -> str:
    """Keep ``text`` that could not be written: in a file in the temporary folder, or on stdout
    (unless stdout was the target); returns the words saying where it went."""
    suffix = target.suffix if target is not None else ".txt"
    stem = target.stem if target is not None else "stdout"
    try:
        fd, path = tempfile.mkstemp(prefix=f"deq-{stem[:40]}-", suffix=suffix)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path, 0o666 & ~_umask())
        return f"it was written to {path} instead"
    except OSError:
        pass
    if target is not None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
            return "it follows on stdout instead"
        except OSError:
            pass
    return "it could not be kept anywhere"


class Outputs:
    """Write a command's outputs in order; a failed one is kept elsewhere (see ``emit_text``) and
    the first failure is raised after every other output was attempted."""

    def __init__(self) -> None:
        self.failures: list[OutputError] = []

    def write(self, flag: str, action: Callable[[], Any]) -> Any:
        """Run one output's writer; a failure is kept for ``finish`` (None is returned then)."""
        try:
            return action()
        except OutputError as exc:
            self.failures.append(exc)
        except (OSError, ValueError, RuntimeError) as exc:  # e.g. matplotlib refusing a file
            detail = " ".join(str(exc).split()) or type(exc).__name__
            self.failures.append(OutputError(f"{flag}: cannot write it ({detail})"))
        return None

    def finish(self) -> None:
        """Raise the first failure (naming how many more there were)."""
        if not self.failures:
            return
        first = self.failures[0]
        more = len(self.failures) - 1
        if more:
            raise OutputError(f"{first}; and {more} more output(s) failed") from None
        raise first
