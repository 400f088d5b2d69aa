"""A config as a task carries it: its text, where it came from, overrides, and its files by digest.

``ConfigSource`` holds plain strings only, so it pickles small and builds the same validated
``Config`` in any process: the client's, or a worker's that never saw the file. ``ship`` prepares
one for a worker without the client's filesystem: it reads the files the config names, and the
source then refers to them by digest (``deqcli.execution.files``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deqcli.config import (
    Config,
    check_readable,
    config_files,
    load_yaml,
    parse_config,
    read_config_text,
    relocate_files,
)
from deqcli.errors import ConfigError
from deqcli.execution.files import Blob, digest, stored_path


def value_text(value: Any) -> str:
    """A value as a ``--set`` override writes it (floats keep every digit)."""
    return repr(value) if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class ConfigSource:
    """The config every task of a sweep or comparison starts from, as plain strings.

    ``files`` maps each file name written in the config to the digest of its shipped bytes; when
    set, the config reads those stored copies instead of the paths (empty: the paths as written).
    """

    text: str
    base_dir: str
    source: str
    overrides: tuple[str, ...] = ()
    solver: str | None = None
    files: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_path(
        cls, path: str | Path, overrides: list[str] | None = None, solver: str | None = None
    ) -> ConfigSource:
        """Read a config file once; tasks re-parse its text with their own overrides."""
        text, base_dir = read_config_text(path)
        return cls(text, str(base_dir), str(path), tuple(overrides or ()), solver)

    @property
    def problem_name(self) -> str:
        """The problem's name, or the config file's name without its suffix (titles, reports)."""
        problem = self.raw().get("problem")
        name = problem.get("name") if isinstance(problem, dict) else None
        return name if isinstance(name, str) and name else Path(self.source).stem

    def raw(self) -> dict[str, Any]:
        """The YAML mapping (for resolving short parameter names)."""
        try:
            data = load_yaml(self.text, self.source)  # bounded: an alias bomb is refused
        except ConfigError:
            data = None
        return data if isinstance(data, dict) else {}

    def config(
        self, assignment: Mapping[str, Any] | None = None, *, solver: str | None = None
    ) -> Config:
        """The validated config: base overrides, then ``assignment``'s values; ``solver`` replaces
        the source's solver. Shipped files are read from this machine's store."""
        extra = [f"{k}={value_text(v)}" for k, v in (assignment or {}).items()]
        cfg = parse_config(
            self.text,
            base_dir=Path(self.base_dir),
            source=self.source,
            overrides=[*self.overrides, *extra],
            solver=solver if solver is not None else self.solver,
        )
        if not self.files:
            return cfg
        shipped = dict(self.files)
        paths = {}
        for ref in config_files(cfg):
            content = shipped.get(ref.name)
            if content is None:
                raise ConfigError(ref.key, f"file '{ref.name}' was not shipped with the task")
            local = stored_path(content, ref.name)
            if not local.exists():
                raise ConfigError(
                    ref.key, f"file '{ref.name}' has not reached this worker (looked in {local})"
                )
            paths[ref.name] = str(local)
        return relocate_files(cfg, paths)

    def shown(self, text: str) -> str:
        """``text`` (a description, an error message) with the stored copies' paths on this
        machine written as the file names the user gave."""
        for name, content in self.files:
            text = text.replace(str(stored_path(content, name)), name)
        return text


def ship(source: ConfigSource, configs: Iterable[Config]) -> tuple[ConfigSource, dict[str, Blob]]:
    """Read the files ``configs`` name (configs of this source); return the source that refers to
    them by digest, and the bytes by digest. A missing or unreadable file is a ConfigError now,
    before any task starts."""
    names: dict[str, str] = dict(source.files)
    blobs: dict[str, Blob] = {}
    base_dir = Path(source.base_dir)
    for cfg in configs:
        for ref in config_files(cfg):
            if ref.name in names:
                continue
            path = ref.path(base_dir)
            check_readable(path, ref.name, ref.key)
            try:
                data = path.read_bytes()
            except OSError as exc:
                raise ConfigError(ref.key, f"cannot read '{ref.name}': {exc}") from None
            content = digest(data)
            names[ref.name] = content
            blobs[content] = Blob(path.name, data)
    return replace(source, files=tuple(sorted(names.items()))), blobs
