"""Exceptions that mean "the user's input is wrong": the CLI turns each into one line and exit code 2."""

from __future__ import annotations


class DeqError(Exception):
    """Base class for every user-facing error; ``str(err)`` is a single line."""


class ConfigError(DeqError):
    """A configuration value is invalid. ``key`` is the dotted path of the offending key."""

    def __init__(self, key: str, message: str, *, line: int | None = None) -> None:
        self.key = key
        self.message = message
        self.line = line
        where = f"{key} (line {line})" if line is not None else key
        super().__init__(f"{where}: {message}" if key else message)

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt from its fields, so the error survives pickling (a task on another process).
        return (_config_error, (type(self), self.key, self.message, self.line))


def _config_error(cls: type[ConfigError], key: str, message: str, line: int | None) -> ConfigError:
    return cls(key, message, line=line)


class UsageError(DeqError):
    """A command-line flag or argument is invalid (unknown solver, bad device, bad option)."""


class DeviceError(UsageError):
    """The requested torch device is not available on this machine."""


class PeerUnavailableError(UsageError):
    """An optional peer library (e.g. torchdeq) is not installed."""


def first_line(text: str) -> str:
    """The first line of ``text`` that is not blank, stripped ('' when there is none): error
    lines stay one line whatever a library's message holds."""
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def describe(exc: BaseException) -> str:
    """``Type: message`` (its first line) for an exception from code that is not ours, or just
    ``Type`` when it has no message (``raise MemoryError``, a bare ``assert``)."""
    line = first_line(str(exc))
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
