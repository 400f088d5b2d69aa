"""Consent before running code that a config names.

A config with ``kind: python`` (or ``kind: module``) imports and runs a Python target, and configs
arrive from pull requests and other people. Such a config is only built when the user has said
so: ``--trust-code`` on the command line, ``trust_code=True`` in the Python API, or
``DEQ_TRUST_CODE=1`` in the environment. Without consent nothing is imported and the user gets one
line naming the target and how to consent (exit code 2 on the command line).

Work sent to other processes (a sweep's points on Dask workers) carries the client's consent with
each task and runs under ``decided(trust)``, so a worker's own environment never changes the answer.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from deqcli.errors import UsageError

ENV_VAR = "DEQ_TRUST_CODE"
# Problem kinds whose config names Python code to import and run.
CODE_KINDS = frozenset({"python", "module"})
HOW = f"pass --trust-code (or set {ENV_VAR}=1) if you trust it"

_granted: ContextVar[bool] = ContextVar("deq_trust_code", default=False)
# A decision made elsewhere and carried here (a task on a worker): it replaces flag and environment.
_decided: ContextVar[bool | None] = ContextVar("deq_trust_code_decided", default=None)


class ConsentError(UsageError):
    """A config would run code the user has not agreed to run."""


def env_grants() -> bool:
    """True when the environment gives consent (DEQ_TRUST_CODE=1, true or yes)."""
    return os.environ.get(ENV_VAR, "").strip().lower() in ("1", "true", "yes")


def granted() -> bool:
    """True when running a config's code has been allowed here (flag, API argument or env)."""
    decision = _decided.get()
    if decision is not None:
        return decision
    return _granted.get() or env_grants()


@contextmanager
def allowed(trust: bool) -> Iterator[None]:
    """Within the block, configs may run their code when ``trust`` is True (else the env decides)."""
    token = _granted.set(trust or _granted.get())
    try:
        yield
    finally:
        _granted.reset(token)


@contextmanager
def decided(trust: bool) -> Iterator[None]:
    """Within the block, exactly ``trust`` decides (a task run for a client carries its consent).

    A worker's own environment neither adds consent the client did not give nor takes it away.
    """
    token = _decided.set(trust)
    try:
        yield
    finally:
        _decided.reset(token)


def require(kind: str, target: str, *, key: str = "problem.target") -> None:
    """Refuse, before anything is imported, to build a code-running problem without consent."""
    if kind in CODE_KINDS and not granted():
        raise ConsentError(f"{key}: this config runs Python code ({target}); {HOW}")


def require_all(problems: Iterable[Any]) -> None:
    """``require`` for each config's problem section, before any of them runs (a sweep's or a
    comparison's tasks then carry the answer to wherever they run)."""
    for problem in problems:
        require(problem.kind, getattr(problem, "target", ""))


def notice(kind: str, target: str) -> str | None:
    """What ``deq validate`` says about a config that runs code (None for other kinds)."""
    if kind not in CODE_KINDS:
        return None
    state = "allowed here" if granted() else f"solving it needs consent: {HOW}"
    return f"runs Python code from {target} ({state})"


# -- while the config's code runs -----------------------------------------------------------------

# Files of code the user consented to run; tracebacks through them are the config's failures.
_user_files: set[str] = set()


class UserCodeError(UsageError):
    """The config's own Python code failed (raised, or called sys.exit) while deq ran it."""


def mark_user_code(filename: str | None) -> None:
    """Remember a file of the config's code, so failures inside it are reported as its own."""
    if filename:
        _user_files.add(os.path.realpath(filename))


def user_code_site(exc: BaseException) -> str | None:
    """``file.py:line`` of the innermost frame of the config's code in ``exc``'s traceback, if any."""
    site = None
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if os.path.realpath(code.co_filename) in _user_files:
            site = f"{os.path.basename(code.co_filename)}:{tb.tb_lineno}"
        tb = tb.tb_next
    return site


@contextmanager
def running_user_code(target: str, *, key: str = "problem.target") -> Iterator[None]:
    """Run the config's code with its prints sent to stderr (so ``--json -`` keeps stdout pure
    JSON), and a ``sys.exit()`` inside it turned into one line of bad input."""
    saved = sys.stdout
    sys.stdout = sys.stderr
    try:
        yield
    except SystemExit as exc:
        raise UserCodeError(f"{key}: {target} called sys.exit({exc.code!r})") from None
    finally:
        sys.stdout = saved
