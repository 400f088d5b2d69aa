"""The worker-side file store: a config's files, named by the SHA-256 of their bytes.

A remote worker may not see the client's filesystem. The client reads every file a config names
once (``deqcli.execution.source.ship``); the bytes travel once to each worker and are written here as
``STORE/ab/abcdef…/NAME``, where the folder is the digest and NAME the file's own name (loaders
look at its suffix). A task carries only names and digests and reads the stored copies. The same
bytes are stored once per machine however many sweeps use them, and a stored copy is never
rewritten: its name is its content.

The store is ``$DEQ_FILE_STORE`` or ``<tmp>/deq-files-<user>``, a folder only its owner may write.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from deqcli.errors import UsageError

STORE_ENV = "DEQ_FILE_STORE"


@dataclass(frozen=True)
class Blob:
    """One file's bytes and the name it is stored under (its base name on the client)."""

    name: str
    data: bytes


def digest(data: bytes) -> str:
    """The content address of some bytes (hex SHA-256)."""
    return hashlib.sha256(data).hexdigest()


def store_dir() -> Path:
    """Where this machine keeps shipped files."""
    chosen = os.environ.get(STORE_ENV, "").strip()
    if chosen:
        return Path(chosen)
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers): the number will do
        user = str(os.getuid()) if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"deq-files-{user}"


def stored_path(content: str, name: str) -> Path:
    """The stored copy of the file with digest ``content`` and config name ``name``."""
    return store_dir() / content[:2] / content / Path(name).name


def _private_store() -> Path:
    """The store folder, created if needed, refused when another user could write into it."""
    root = store_dir()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = root.stat()
    foreign = hasattr(os, "getuid") and info.st_uid != os.getuid()
    if foreign or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UsageError(
            f"the file store {root} can be written by other users; set {STORE_ENV} to a private folder"
        )
    return root


def store(blobs: Mapping[str, Blob]) -> None:
    """Write shipped files into this machine's store (each once; existing copies are kept)."""
    _private_store()
    for content, blob in blobs.items():
        target = stored_path(content, blob.name)
        if target.exists() and target.stat().st_size == len(blob.data):
            continue
        if digest(blob.data) != content:
            raise UsageError(f"the shipped copy of '{blob.name}' is damaged (its digest differs)")
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Written under a temporary name and renamed, so a reader never sees half a file.
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(blob.data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
