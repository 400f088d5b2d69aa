"""Where the tasks of a sweep or a comparison run: in this process (the default) or on Dask.

An analysis cuts its work into ``Task`` objects, pure functions of a config's text, parameter
values and options that return JSON-ready dicts, and hands them to an ``Executor``, which yields
``(key, result)`` pairs in the order the tasks finish. ``InProcess`` runs them one after the other
here, in the order given. ``deqcli.execution.dask_executor.DaskExecutor`` sends them to a Dask
cluster: a local one (``--workers N``), an existing scheduler (``--scheduler ADDRESS``) or a
Slurm/PBS/… cluster from a small YAML file (``--cluster FILE``, see ``deqcli.execution.cluster``).

Dask is an optional extra and is imported only when one of those flags asks for it.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deqcli.errors import UsageError

if TYPE_CHECKING:
    from deqcli.execution.cluster import ClusterSpec
    from deqcli.execution.files import Blob

INSTALL = "pip install 'deqcli[distributed]'"
# Fields of the sweep and comparison documents that measure time or say where the work ran: the
# only ones that differ between two runs of the same work, here or on any cluster.
TIMING_FIELDS = frozenset(
    {
        "wall_time",
        "time",
        "time_history",
        "relative_time",
        "rank",
        "fastest",
        "wins",
        "geomean_relative_time",
        "created",
        "environment",
        "execution",
    }
)


def untimed(doc: Any) -> Any:
    """A JSON document without its timing fields (see TIMING_FIELDS), at every depth."""
    if isinstance(doc, dict):
        return {k: untimed(v) for k, v in doc.items() if k not in TIMING_FIELDS}
    if isinstance(doc, list):
        return [untimed(v) for v in doc]
    return doc


@dataclass(frozen=True)
class Task:
    """One unit of work: ``fn(*args, **kwargs)``, returning a JSON-ready dict.

    ``after`` is the key of an earlier task of the same batch whose result the function receives
    as the keyword ``previous`` (a warm start from a neighbouring point).

    ``kind`` groups tasks that cost about the same (a comparison's tasks of one config): where
    every task of a batch has one and none waits for another, a remote executor may run them out
    of order, the costliest kinds first (see ``DaskExecutor``).
    """

    key: Hashable
    fn: Callable[..., dict[str, Any]]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    after: Hashable | None = None
    kind: Hashable | None = None


@dataclass(frozen=True)
class TaskFailed:
    """A task that could not finish for a reason outside it (its worker died too often)."""

    message: str


class Executor:
    """Runs batches of tasks. ``remote``: tasks run in other processes, and files travel with them.

    Used as a context manager: leaving the block stops whatever the executor started (a Dask
    cluster starts on the first ``run``, once every input has been checked).
    """

    remote = False

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def describe(self) -> dict[str, Any]:
        """Where the tasks ran, for the documents (``backend``, workers, threads)."""
        raise NotImplementedError

    def run(
        self,
        tasks: Sequence[Task],
        *,
        files: Mapping[str, Blob] | None = None,
        exclusive: bool = False,
    ) -> Iterator[tuple[Hashable, dict[str, Any] | TaskFailed]]:
        """Run ``tasks`` and yield ``(key, result)`` as each one finishes.

        ``files`` (by digest) must reach every worker before the tasks read them. ``exclusive``
        tasks are timed: a worker process runs one of them at a time.
        """
        raise NotImplementedError


# What the tasks of one group share in one thread of a worker (see ``group_memo``).
_memo = threading.local()


def group_memo() -> dict[Hashable, Any]:
    """A dict in which a task may leave what the tasks after it in the same group can reuse (a
    comparison's built problem). The Dask executor empties it when a group ends, so nothing a
    task left there outlives the group in a worker process; in-process runs empty it after
    every task."""
    memo = getattr(_memo, "memo", None)
    if memo is None:
        memo = _memo.memo = {}
    return memo


def check_order(tasks: Sequence[Task]) -> None:
    """Every task runs after a task given before it, or after none (ValueError otherwise)."""
    seen: set[Hashable] = set()
    for task in tasks:
        if task.after is not None and task.after not in seen:
            raise ValueError(f"task {task.key!r} runs after {task.after!r}, not before it")
        seen.add(task.key)


class InProcess(Executor):
    """Every task here, one after the other, in the order given (``files`` are read in place)."""

    def describe(self) -> dict[str, Any]:
        """The run's place: this process."""
        return {"backend": "in-process"}

    def run(
        self,
        tasks: Sequence[Task],
        *,
        files: Mapping[str, Blob] | None = None,
        exclusive: bool = False,
    ) -> Iterator[tuple[Hashable, dict[str, Any] | TaskFailed]]:
        """Run each task in turn; a result is kept only until the task waiting for it has run."""
        check_order(tasks)
        waiting = Counter(task.after for task in tasks if task.after is not None)
        kept: dict[Hashable, dict[str, Any]] = {}
        for task in tasks:
            kwargs = dict(task.kwargs)
            if task.after is not None:
                kwargs["previous"] = kept[task.after]
                waiting[task.after] -= 1
                if not waiting[task.after]:
                    del kept[task.after]
            try:
                result = task.fn(*task.args, **kwargs)
            finally:
                group_memo().clear()
            if waiting.get(task.key):
                kept[task.key] = result
            yield task.key, result


@dataclass(frozen=True)
class ExecutionSettings:
    """The execution flags: ``--workers N``, ``--scheduler ADDRESS`` or ``--cluster FILE`` (one),
    and ``--chunk`` as given: how many tasks travel to Dask together (a number, or ``auto``)."""

    workers: int | None = None
    scheduler: str | None = None
    cluster: Path | None = None
    chunk: str | None = None
    # Where to say what the user should know while the tasks wait (no worker has joined yet).
    notice: Callable[[str], None] | None = field(default=None, compare=False, repr=False)

    @property
    def group_size(self) -> int | None:
        """Tasks per Dask task from --chunk; None (``auto``, the default): sized from durations."""
        if self.chunk is None or self.chunk.strip().lower() == "auto":
            return None
        return int(self.chunk)

    @property
    def distributed(self) -> bool:
        """True when the tasks go to Dask."""
        return self.workers is not None or self.scheduler is not None or self.cluster is not None

    def check(self) -> ClusterSpec | None:
        """Reject conflicting or bad flags and a missing Dask, before anything runs; returns the
        validated cluster file (with --cluster)."""
        given = [
            flag
            for flag, value in (
                ("--workers", self.workers),
                ("--scheduler", self.scheduler),
                ("--cluster", self.cluster),
            )
            if value is not None
        ]
        if len(given) > 1:
            raise UsageError(f"{' and '.join(given)} exclude each other; give one of them")
        if self.chunk is not None:
            _check_chunk(self.chunk, distributed=bool(given))
        if not given:
            return None
        flag = given[0]
        if self.workers is not None and self.workers < 1:
            raise UsageError(f"--workers: give 1 or more worker processes, got {self.workers}")
        cores = available_cores()
        if self.workers is not None and self.workers > OVERSUBSCRIBE * cores:
            raise UsageError(
                f"--workers: {self.workers} local worker processes on {cores} core(s) would only "
                "wait for each other, each holding its own torch in memory; give at most "
                f"{OVERSUBSCRIBE * cores} ({cores}, one per core, runs fastest), or run on a "
                "cluster with --scheduler or --cluster"
            )
        if self.scheduler is not None:
            scheduler_endpoint(self.scheduler)
        spec = None
        if self.cluster is not None:
            from deqcli.execution.cluster import load_cluster

            spec = load_cluster(self.cluster)
        needed = ("dask", "distributed") + (("dask_jobqueue",) if spec is not None else ())
        missing = [name for name in needed if not _importable(name)]
        if missing:
            what = "dask-jobqueue" if missing == ["dask_jobqueue"] else "Dask"
            raise UsageError(
                f"{flag} needs {what}, which is not installed; install it with: {INSTALL}"
            )
        return spec


# The schemes a client reaches a scheduler by without extra packages (ucx needs its own).
SCHEMES = ("tcp", "tls", "ws", "wss")
ADDRESS_EXAMPLE = "tcp://HOST:PORT, e.g. tcp://10.0.0.5:8786"


def scheduler_endpoint(address: str) -> tuple[str, str, int]:
    """(scheme, host, port) of --scheduler [SCHEME://]HOST:PORT, with a scheme deq connects by and
    a port in 1-65535; checked before anything runs, so a typo is named at once instead of after
    the connection timeout."""
    text = address.strip()
    if not text:
        raise UsageError(f"--scheduler: give the scheduler's address as {ADDRESS_EXAMPLE}")
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "tcp", text
    if scheme.lower() not in SCHEMES:
        raise UsageError(
            f"--scheduler: '{address}' uses the scheme '{scheme}'; deq reaches a Dask scheduler "
            f"by {', '.join(s + '://' for s in SCHEMES)}: give {ADDRESS_EXAMPLE}"
        )
    host, colon, port = rest.rpartition(":")
    if host.startswith("[") and host.endswith("]"):  # an IPv6 address: [::1]:8786
        host = host[1:-1]
    if not colon or not host or "/" in rest:
        raise UsageError(
            f"--scheduler: '{address}' is not HOST:PORT; give the scheduler's address as "
            f"{ADDRESS_EXAMPLE}"
        )
    if not (port.isdigit() and 1 <= int(port) <= 65535):
        raise UsageError(
            f"--scheduler: '{address}' has the port '{port}'; give a port from 1 to 65535, "
            f"e.g. tcp://{rest.rpartition(':')[0]}:8786"
        )
    return scheme.lower(), host, int(port)


# --workers beyond this many per core is refused: the processes would only compete for the cores,
# and each holds a few hundred MB (torch and its libraries), so hundreds can exhaust the memory.
OVERSUBSCRIBE = 4


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity where the system tells, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # not Linux
        return max(1, os.cpu_count() or 1)


def _check_chunk(text: str, *, distributed: bool) -> None:
    """--chunk is ``auto`` or a whole number ≥ 1, and only means something with Dask."""
    value = text.strip().lower()
    if value != "auto" and not (value.isdigit() and int(value) >= 1):
        raise UsageError(f"--chunk: give a number of tasks (1 or more) or 'auto', got '{text}'")
    if not distributed:
        raise UsageError(
            "--chunk groups the tasks sent to Dask; add --workers, --scheduler or --cluster, "
            "or drop it"
        )


def _importable(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def open_executor(settings: ExecutionSettings | None = None) -> Executor:
    """The executor the settings ask for (in-process without flags); use it as a context manager,
    which starts and stops the Dask client and cluster."""
    if settings is None:
        return InProcess()
    spec = settings.check()
    if not settings.distributed:
        return InProcess()
    from deqcli.execution.dask_executor import DaskExecutor

    return DaskExecutor(settings, spec)


__all__ = [
    "INSTALL",
    "TIMING_FIELDS",
    "ExecutionSettings",
    "Executor",
    "InProcess",
    "Task",
    "TaskFailed",
    "check_order",
    "group_memo",
    "open_executor",
    "untimed",
]
