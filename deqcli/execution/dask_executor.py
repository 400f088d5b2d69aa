"""Tasks on a Dask cluster: a local one, an existing scheduler, or a batch system via dask-jobqueue.

Imported only when ``--workers``, ``--scheduler`` or ``--cluster`` asks for it (Dask is an optional
extra). What it does on top of Dask:

* threads: each worker process runs its tasks with ``threads`` torch/BLAS threads (default 1,
  see ``_PinThreads``); a local cluster (``--workers N``) has one task thread per worker, so N
  tasks run at a time on N processes and they do not oversubscribe the cores;
* timed tasks (``exclusive``) take a per-process lock, so a worker process never times two solves
  at once even where its owner gave it several threads;
* files: the bytes of the files the configs name travel once to each worker as a worker plugin
  (Dask also runs it on workers that join later or restart) and land in the worker's content-
  addressed file store (``deqcli.execution.files``); no shared filesystem is needed;
* groups: Dask spends a few milliseconds of CPU on every task it runs (scheduling, messages, the
  result's trip back), in the client's process as well as the worker's. Tasks that take less than
  about ``GROUP_SECONDS`` therefore travel in groups, one Dask task each, that run their tasks one
  after the other (``chunk``: ``auto`` sizes them from the durations measured so far, a number fixes
  the size; a comparison's groups hold at most KIND_GROUP_TASKS); groups are submitted as earlier
  ones come back, so the sizes follow what was measured;
* results come back in the order tasks finish; a group whose worker died is run again elsewhere by
  Dask (up to ``distributed.scheduler.allowed-failures`` times, then it is a ``TaskFailed``);
  on Ctrl-C the results that have already arrived are handed back before the interrupt goes on.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import pickle
import shutil
import signal
import socket
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distributed import Client, KilledWorker, LocalCluster, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from deqcli.errors import ConfigError, UsageError
from deqcli.execution import (
    ExecutionSettings,
    Executor,
    Task,
    TaskFailed,
    check_order,
    group_memo,
    scheduler_endpoint,
)
from deqcli.execution.files import Blob, digest, store

if TYPE_CHECKING:
    from deqcli.execution.cluster import ClusterSpec

# Seconds without any worker after which the user is told what the tasks wait for.
WORKER_WAIT = 10
# Seconds the batch system's submit command may take to accept a cluster file's jobs.
SUBMIT_TIMEOUT = 60
# Seconds to wait for --scheduler to answer before saying it cannot be reached.
CONNECT_TIMEOUT = 20
# The environment variables that size the thread pools of OpenMP, MKL and OpenBLAS.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")

# With chunk "auto", tasks are grouped so that one group takes about this many CPU seconds: enough that
# Dask's 10-15 ms of CPU per group (client, scheduler and worker together) are a small share of
# it, short enough for a steady progress bar. 0.25 s gave the small suite of bench/scale.py
# 1.59-1.76x on 2 workers, 0.5 s 1.75-1.83x (fewer groups; the last ones stay small).
GROUP_SECONDS = 0.5
# Groups in flight per worker: one running and one queued, which hides the round trip of a result
# (10-20 ms). The groups still to submit are sized from the durations of those that came back; a
# third group in flight made the groups smaller (more of Dask's overhead) and the suite of
# bench/scale.py slower: 1.53-1.74x against 1.74-1.83x on 2 workers.
IN_FLIGHT = 2

# A comparison's group holds at most this many tasks. One config's solvers can differ a
# hundredfold in cost (0.03 s to 2.3 s on the shipped examples), and a kind's cost is learned
# only when its group comes back, by which time the next group is queued on the same worker: ten
# tasks of a config whose first solver took 0.05 s made one group of 5.6 s, and the other worker
# idled for 2.3 s at the end. Simulated on the examples' measured task times, 4 cut the worst end
# from 1.5 s over the ideal to 0.4 s, for 0.1 s more overhead.
KIND_GROUP_TASKS = 4

# Dask settings of a local cluster (--workers N): its scheduler, nannies and workers share the
# machine's cores with the solves, so nothing samples task threads for Dask's profiler or GIL
# monitor, and the housekeeping that wakes every 20-100 ms (event-loop ticks, memory and system
# monitors) wakes once a second. That cut an idle 2-worker cluster's CPU use from about 10 % of a
# core to 2 %. Work stealing is off: the executor keeps only IN_FLIGHT groups per worker, so there
# is nothing worth moving, and the scheduler would still look every 100 ms.
LOCAL_WORKER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.gil.enabled": False,
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.scheduler.work-stealing": False,
}

# In a worker process: one timed task at a time, and the thread count its plugin asked for.
_EXCLUSIVE = threading.Lock()
_threads: int | None = None


def _pin() -> None:
    """Apply the worker's thread count in the calling task thread."""
    if _threads is None:
        return
    import torch

    if torch.get_num_threads() != _threads:
        torch.set_num_threads(_threads)


def _version() -> str:
    """The deqcli version of the process this runs in (a worker)."""
    import deqcli

    return deqcli.__version__


# One task of a group as it travels: key, function, arguments, keywords, the key it runs after.
_Item = tuple[Hashable, Callable[..., dict[str, Any]], tuple[Any, ...], dict[str, Any], Hashable]


@dataclass
class _Raised:
    """A task's exception, carried back to the client with the worker's traceback."""

    error: BaseException
    trace: str


def _run_group(
    items: Sequence[_Item],
    earlier: Mapping[Hashable, Any],
    exclusive: bool,
    version: str | None = None,
) -> list[tuple[Hashable, Any, float]]:
    """What runs on the worker: the group's tasks one after the other, pinned, each with the result
    it waits for (made in this group, or in ``earlier``: ``("result", r)`` when the client had it,
    ``("group", output)`` when it came from a group still running at submission). Returns
    ``(key, result, CPU seconds)`` per task; a task that raises ends the group with a ``_Raised``.

    ``version`` is the client's deqcli: a worker that joined after the start-up check (a batch
    job that left the queue late) and runs another version refuses the group, since another
    version may solve differently."""
    if version is not None and version != _version():
        raise UsageError(
            f"a Dask worker that joined during the run has deqcli {_version()}, this is "
            f"{version}; install the same version where the workers run"
        )
    _pin()
    try:
        return _run_items(items, earlier, exclusive)
    finally:
        group_memo().clear()  # what the group's tasks shared does not outlive it


def _run_items(
    items: Sequence[_Item], earlier: Mapping[Hashable, Any], exclusive: bool
) -> list[tuple[Hashable, Any, float]]:
    """The tasks of one group, in order (see ``_run_group``)."""
    made: dict[Hashable, Any] = {}
    out: list[tuple[Hashable, Any, float]] = []
    for key, fn, args, kwargs, after in items:
        call = dict(kwargs)
        if after is not None:
            previous = made[after] if after in made else _earlier(earlier[after], after)
            if previous is not None:  # None: the task it waited for was lost with its worker
                call["previous"] = previous
        # CPU seconds of this thread, not wall: on a busy machine the wall time would shrink the
        # groups just when the per-task overhead costs most.
        started = time.thread_time()
        try:
            with _EXCLUSIVE if exclusive else nullcontext():
                result = fn(*args, **call)
        except Exception as exc:
            out.append((key, _raised(exc), time.thread_time() - started))
            break
        made[key] = result
        out.append((key, result, time.thread_time() - started))
    return out


def _earlier(source: tuple[str, Any], key: Hashable) -> Any:
    """The result of task ``key`` from what the client passed for it (see ``_run_group``)."""
    kind, value = source
    if kind == "result":
        return value
    return next(result for made, result, _ in value if made == key)


def _raised(exc: Exception) -> _Raised:
    """The exception as it can travel: itself when it pickles, else a RuntimeError naming it."""
    trace = traceback.format_exc()
    try:
        pickle.dumps(exc)
    except Exception:  # an exception holding something unpicklable (a lock, a tensor hook, …)
        exc = RuntimeError(f"{type(exc).__name__}: {exc}")
    return _Raised(exc, trace)


@dataclass
class _GroupSizes:
    """How many tasks the next group gets: ``fixed`` (--chunk N), or, for ``auto``, enough to take
    about GROUP_SECONDS at the seconds per task measured lately, one until something was measured,
    and never more than a share of what is left, so the last groups are small and the workers end
    together."""

    fixed: int | None
    per_task: float | None = None

    @property
    def measured(self) -> bool:
        """Whether the next sizes rest on something: a fixed size, or a measured group."""
        return self.fixed is not None or self.per_task is not None

    def observe(self, tasks: int, seconds: float) -> None:
        """A group of ``tasks`` took ``seconds`` on its worker (the average follows recent groups:
        the first tasks of a process pay its imports and warm-up)."""
        if tasks:
            latest = seconds / tasks
            self.per_task = latest if self.per_task is None else 0.5 * (self.per_task + latest)

    def next(self, left: int, workers: int, *, by_kind: bool = False) -> int:
        """The size of the next group when ``left`` tasks wait and ``workers`` work; a
        comparison's (tasks ordered ``by_kind``) at most KIND_GROUP_TASKS with ``auto``."""
        if self.fixed is not None:
            return min(self.fixed, left)
        if self.per_task is None:
            return 1
        size = int(GROUP_SECONDS / max(self.per_task, 1e-9))
        if by_kind:
            size = min(size, KIND_GROUP_TASKS)
        return max(1, min(size, left // (IN_FLIGHT * workers), left))


class _Queue:
    """The tasks still to submit. They leave in the order given, except where every task has a
    ``kind`` and none waits for another (a comparison): then one task of each kind leaves first, in
    the order given, and after that always one of the kind whose tasks measured costliest so far
    (a kind still running its first task counts at the mean of the kinds measured). The longest
    tasks start early and the last to finish are short ones, so the workers finish together; the
    order given decides only among equals."""

    def __init__(self, tasks: Sequence[Task]) -> None:
        by_kind = all(t.kind is not None and t.after is None for t in tasks)
        self.tasks = list(tasks) if by_kind else list(reversed(tasks))
        # Task key -> its kind, while the order follows the kinds (empty: the order given).
        self.kinds = {t.key: t.kind for t in tasks} if by_kind else {}
        self.tried: set[Hashable] = set()
        self.seconds: dict[Hashable, list[float]] = {}  # kind -> [seconds in all, tasks measured]

    def __len__(self) -> int:
        return len(self.tasks)

    def pop(self) -> Task:
        """The next task to submit."""
        if not self.kinds:
            return self.tasks.pop()
        untried = (i for i, task in enumerate(self.tasks) if task.kind not in self.tried)
        index = next(untried, None)
        if index is None:
            means = {kind: total / count for kind, (total, count) in self.seconds.items()}
            unknown = sum(means.values()) / len(means) if means else 0.0
            index = max(
                range(len(self.tasks)), key=lambda i: means.get(self.tasks[i].kind, unknown)
            )
        task = self.tasks.pop(index)
        self.tried.add(task.kind)
        return task

    @property
    def by_kind(self) -> bool:
        """Whether the order follows the kinds (a comparison), not the order given."""
        return bool(self.kinds)

    def observe(self, key: Hashable, seconds: float) -> None:
        """Task ``key`` took ``seconds`` on its worker."""
        if self.kinds:
            total = self.seconds.setdefault(self.kinds[key], [0.0, 0])
            total[0] += seconds
            total[1] += 1


class _PinThreads(WorkerPlugin):
    """Sets the torch/BLAS thread count of every worker process (and of those that join later)."""

    def __init__(self, threads: int) -> None:
        self.threads = threads

    def setup(self, worker: Any) -> None:
        """Pin torch and the BLAS libraries to ``threads`` threads in this worker process."""
        global _threads
        _threads = self.threads
        for name in THREAD_VARIABLES:  # for processes the task may start
            os.environ[name] = str(self.threads)
        import torch

        torch.set_num_threads(self.threads)
        try:  # numpy's BLAS (the scipy peers) is sized at import: threadpoolctl resizes it
            from threadpoolctl import threadpool_limits
        except ImportError:
            return
        threadpool_limits(self.threads)


class _ShipFiles(WorkerPlugin):
    """Writes the shipped files into the store of every worker (and of those that join later)."""

    def __init__(self, blobs: Mapping[str, Blob]) -> None:
        self.blobs = dict(blobs)

    def setup(self, worker: Any) -> None:
        """Store the files on this worker's machine."""
        store(self.blobs)


class DaskExecutor(Executor):
    """A Dask client and, for --workers and --cluster, the cluster it started (closed on exit)."""

    remote = True

    def __init__(self, settings: ExecutionSettings, spec: ClusterSpec | None = None) -> None:
        self.settings = settings
        self.spec = spec
        self.threads = spec.threads if spec is not None else 1
        self.client: Any = None
        self.cluster: Any = None

    def _start(self) -> Any:
        """The client, connected on first use: every input is checked before a cluster starts."""
        if self.client is not None:
            return self.client
        settings = self.settings
        try:
            if settings.workers is not None:
                import dask

                with dask.config.set(LOCAL_WORKER_CONFIG):
                    self.cluster = LocalCluster(
                        n_workers=settings.workers,
                        threads_per_worker=1,
                        processes=True,
                        # No dashboard: its HTTP server still listens, on a free port.
                        dashboard_address=":0",
                        scheduler_kwargs={"dashboard": False},
                        silence_logs=logging.ERROR,
                        env=_local_env(),
                    )
                # Results come straight from the local workers instead of through the
                # scheduler, which runs in this process and would otherwise relay each one.
                self.client = Client(self.cluster, direct_to_workers=True)
            elif self.spec is not None:
                _can_submit(self.spec)
                self.cluster = _jobqueue(self.spec, settings.cluster or Path("cluster"))
                _submit_jobs(self.cluster, self.spec)
                self.client = Client(self.cluster)
            else:
                _answering(settings.scheduler)
                self.client = Client(settings.scheduler, timeout=CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            self.__exit__(None, None, None)
            where = f"--scheduler: cannot reach {settings.scheduler}"
            if settings.scheduler is None:
                where = "cannot start the Dask cluster"
            raise UsageError(f"{where}: {_one_line(exc)}") from None
        except (TypeError, ValueError) as exc:
            if settings.scheduler is None:
                raise
            # Dask's own objection to the connection settings: TLS without certificates, say.
            self.__exit__(None, None, None)
            hint = "; is it the scheduler's address, not a worker's?"
            if settings.scheduler.strip().lower().startswith(("tls://", "wss://")):
                hint = " (a TLS scheduler needs the certificates in Dask's distributed.comm.tls settings)"
            raise UsageError(
                f"--scheduler: cannot connect to {settings.scheduler}: {_one_line(exc)}{hint}"
            ) from None
        self.client.register_plugin(_PinThreads(self.threads), name="deq-threads")
        self._await_a_worker()
        self._check_versions()
        return self.client

    def _await_a_worker(self) -> None:
        """Say once, through ``settings.notice``, when a scheduler or a batch system's cluster has
        no worker after WORKER_WAIT seconds (jobs still queued, a scheduler whose workers were
        never started): the tasks then wait for one, and without a word that looks like a hang."""
        if self.settings.workers is not None:
            return  # a local cluster starts with its workers
        try:
            self.client.wait_for_workers(1, timeout=WORKER_WAIT)
        except TimeoutError:
            if self.settings.notice is None:
                return
            if self.spec is not None:
                where = f"the {self.spec.kind} jobs have not started (they may wait in its queue)"
            else:
                where = f"the scheduler at {self.settings.scheduler} has no worker"
            self.settings.notice(
                f"waiting for Dask workers: after {WORKER_WAIT:g} s {where}; the tasks start "
                "when one joins (Ctrl-C stops)"
            )

    def _check_versions(self) -> None:
        """The workers must run the client's deqcli: another version may solve differently."""
        mine = _version()
        where = "--scheduler" if self.settings.scheduler is not None else "the Dask workers"
        try:
            found = self.client.run(_version)
        except Exception as exc:  # a worker that cannot even load deqcli, whatever the reason
            raise UsageError(
                f"{where}: the workers cannot run deqcli ({type(exc).__name__}: {_one_line(exc)}); "
                f"install deqcli {mine} where they run"
            ) from None
        other = sorted({v for v in found.values() if v != mine})
        if other:
            raise UsageError(
                f"{where}: the workers run deqcli {', '.join(other)}, this is "
                f"{mine}; install the same version on both sides"
            )

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def describe(self) -> dict[str, Any]:
        """Which cluster ran the tasks, with how many workers and threads."""
        out: dict[str, Any] = {"backend": "dask"}
        if self.settings.workers is not None:
            out.update(cluster="local", workers=self.settings.workers)
        elif self.spec is not None:
            out.update(cluster=self.spec.kind, workers=self.spec.workers)
        else:
            out.update(cluster="scheduler", scheduler=self.settings.scheduler)
            if self.client is not None:
                out["workers"] = len(self.client.scheduler_info()["workers"])
        out["threads_per_worker"] = self.threads
        out["chunk"] = self.settings.group_size or "auto"
        return out

    def run(
        self,
        tasks: Sequence[Task],
        *,
        files: Mapping[str, Blob] | None = None,
        exclusive: bool = False,
    ) -> Iterator[tuple[Hashable, dict[str, Any] | TaskFailed]]:
        """Submit the tasks in groups (a task waits on the group of the one it runs after) and
        yield results as they arrive."""
        check_order(tasks)
        client = self._start()
        shipped = None
        if files:
            shipped = f"deq-files-{digest(''.join(sorted(files)).encode())[:16]}"
            client.register_plugin(_ShipFiles(files), name=shipped)
        prefix = f"deq-{uuid.uuid4().hex[:12]}"
        version = _version()
        sizes = _GroupSizes(self.settings.group_size)
        left = _Queue(tasks)
        # Results that tasks not yet submitted wait for; the group future of those still running.
        waiting = Counter(task.after for task in tasks if task.after is not None)
        kept: dict[Hashable, Any] = {}
        running: dict[Hashable, Any] = {}
        groups: dict[str, list[Hashable]] = {}  # group future's key -> its tasks' keys
        pending = as_completed([], with_results=True, raise_errors=False)

        workers = _WorkerCount(client)

        def submit() -> None:
            """Top the groups in flight up to IN_FLIGHT per worker."""
            count = workers()
            # Until a group has been measured, one single task per worker: sizing from nothing
            # would send singles whose Dask overhead is a large share of their work.
            depth = IN_FLIGHT if sizes.measured else 1
            while left and len(groups) < depth * count:
                size = sizes.next(len(left), count, by_kind=left.by_kind)
                group = [left.pop() for _ in range(size)]
                inside = {task.key for task in group}
                earlier: dict[Hashable, Any] = {}
                for task in group:
                    after = task.after
                    if after is None or after in inside:
                        continue
                    done = after in kept
                    earlier[after] = ("result", kept[after]) if done else ("group", running[after])
                    waiting[after] -= 1
                    if not waiting[after]:
                        kept.pop(after, None)
                        running.pop(after, None)
                future = client.submit(
                    _run_group,
                    [(t.key, t.fn, t.args, dict(t.kwargs), t.after) for t in group],
                    earlier,
                    exclusive,
                    version,
                    key=f"{prefix}-{len(tasks) - len(left)}",
                    pure=False,
                )
                groups[future.key] = [task.key for task in group]
                running.update((task.key, future) for task in group if waiting.get(task.key))
                pending.add(future)

        def arrived(future: Any, result: Any) -> Iterator[tuple[Hashable, Any]]:
            """The results of one group, its dependants' inputs kept, its measured time noted."""
            keys = groups.pop(future.key)
            outcome = _outcome(future, result)
            if isinstance(outcome, TaskFailed):
                for key in keys:
                    if waiting.get(key):  # a task waiting for it starts without it
                        kept[key] = None
                        running.pop(key, None)
                    yield key, outcome
                return
            sizes.observe(len(outcome), sum(seconds for _, _, seconds in outcome))
            for key, _, seconds in outcome:
                left.observe(key, seconds)
            for key, value, _ in outcome:
                if isinstance(value, _Raised):
                    if hasattr(value.error, "add_note"):  # Python 3.11 and later
                        value.error.add_note(f"on the Dask worker:\n{value.trace}")
                    raise value.error
                if waiting.get(key):
                    kept[key] = value
                    running.pop(key, None)
                yield key, value

        try:
            submit()
            # Results are fetched in the background as groups finish, so handing them on never
            # waits on the cluster, and an interrupt finds every result that has arrived already
            # in the queue.
            for future, result in pending:
                yield from arrived(future, result)
                future.release()
                submit()
        except KeyboardInterrupt:
            # Whatever has arrived is handed back before the interrupt goes on: nothing that a
            # worker completed and sent is lost.
            for future, result in list(pending.queue.queue):
                if future.key in groups:
                    yield from arrived(future, result)
            raise
        finally:
            remaining = [future for future, _ in pending.queue.queue] + list(pending.futures)
            if remaining:
                client.cancel(remaining)
            if shipped is not None:
                client.unregister_worker_plugin(shipped)


class _WorkerCount:
    """The cluster's worker count (at least 1), asked of the scheduler at most once a second:
    workers of a batch-system cluster join while the tasks run."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.count = 1
        self.asked = -math.inf

    def __call__(self) -> int:
        now = time.monotonic()
        if now - self.asked >= 1.0:
            self.asked = now
            self.count = max(1, int(self.client.scheduler_info(n_workers=0).get("n_workers", 1)))
        return self.count


def _outcome(future: Any, result: Any) -> dict[str, Any] | TaskFailed:
    """A finished task's result; its error raised here, except a worker that kept dying."""
    if future.status == "cancelled":  # by the cluster (a scheduler that restarted, say), not by us
        return TaskFailed("the cluster cancelled this task before it finished")
    if future.status != "error":
        return result
    _kind, exc, traceback = result
    if isinstance(exc, KilledWorker):
        return TaskFailed(
            f"the worker running this task died every time it was tried (out of memory, or a "
            f"crash in native code): {_one_line(exc)}"
        )
    raise exc.with_traceback(traceback)


def _answering(address: str) -> None:
    """Fail at once where the scheduler's host has no address or nothing listens at its port (Dask's
    client would retry a refused connection until its timeout), and within CONNECT_TIMEOUT where
    something listens but does not answer Dask's handshake (a dashboard's or another service's
    port), which Dask's client would wait for forever."""
    import asyncio

    from distributed.comm import connect
    from distributed.security import Security

    _scheme, host, port = scheduler_endpoint(address)
    try:
        socket.create_connection((host, port), timeout=CONNECT_TIMEOUT).close()
    except socket.gaierror as exc:
        raise UsageError(
            f"--scheduler: cannot resolve the host '{host}' of {address} ({exc.strerror}); "
            "check its spelling"
        ) from None
    except ConnectionRefusedError:
        raise UsageError(
            f"--scheduler: nothing accepts connections at {address} (connection refused); is the "
            "scheduler running, and is this its port?"
        ) from None
    arguments = Security().get_connection_args("client")

    async def handshake() -> None:
        comm = await asyncio.wait_for(
            connect(address, timeout=CONNECT_TIMEOUT, **arguments), CONNECT_TIMEOUT
        )
        await comm.close()

    try:
        asyncio.run(handshake())
    except (TimeoutError, asyncio.TimeoutError):
        raise UsageError(
            f"--scheduler: {address} accepts connections but gave no Dask handshake within "
            f"{CONNECT_TIMEOUT:g} s; is it the scheduler's port (8786 unless set, not the "
            "dashboard's 8787)?"
        ) from None
    except (OSError, TypeError):
        raise  # unreachable, or Dask's objection to the connection settings: reported by _start
    except Exception as exc:  # garbage where the handshake should be: another protocol
        raise UsageError(
            f"--scheduler: {address} does not speak Dask's protocol ({type(exc).__name__} on "
            "the handshake); is it the scheduler's address?"
        ) from None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def _local_env() -> dict[str, str]:
    """Worker processes of a local cluster import deqcli from where this process did."""
    import deqcli

    root = str(Path(deqcli.__file__).resolve().parent.parent)
    env = {name: "1" for name in THREAD_VARIABLES}
    if "site-packages" in root or "dist-packages" in root:
        return env
    paths = [root, *[p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def _dask_jobqueue() -> Any:
    """dask_jobqueue, imported without the SIGINT handler its runner module installs on import
    (one that exits at once): deq's own keeps Ctrl-C to exit 130 with the finished results kept."""
    handler = signal.getsignal(signal.SIGINT)
    import dask_jobqueue

    with contextlib.suppress(ValueError, TypeError):  # not the main thread; no Python handler
        signal.signal(signal.SIGINT, handler)
    return dask_jobqueue


def _can_submit(spec: ClusterSpec) -> None:
    """Jobs are submitted with the batch system's command; without it they would never start and
    the tasks would wait for workers forever."""
    from deqcli.execution.cluster import CLASSES

    dask_jobqueue = _dask_jobqueue()
    command = getattr(dask_jobqueue, CLASSES[spec.kind]).job_cls.submit_command
    if command and shutil.which(command) is None:
        raise UsageError(
            f"--cluster: {spec.kind} jobs are submitted with '{command}', which is not on this "
            "machine's PATH; run deq where jobs can be submitted (a login node)"
        )


class _Refusals(logging.Handler):
    """Keeps the errors logged while jobs are submitted (and keeps their tracebacks off stderr)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.errors: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.errors.append(record.exc_info[1])


def _submit_jobs(cluster: Any, spec: ClusterSpec) -> None:
    """Submit the cluster file's jobs and wait for the batch system's answer to each.

    dask-jobqueue submits in the background and only logs a refused submission (a queue or an
    account that does not exist, a limit): the tasks would then wait forever for workers that
    never come. A refusal is one line naming the batch system's own message; a job the batch
    system accepted may still wait in its queue, which is the queue's business.
    """
    from distributed.core import Status

    refusals = _Refusals()
    # Background errors reach tornado's logger (a callback that raised) or asyncio's, whose own
    # handlers (Dask's logging set-up gives them some) would print the traceback.
    loggers = [logging.getLogger(name) for name in ("tornado.application", "asyncio")]
    kept = [(log, log.handlers, log.propagate) for log in loggers]
    for log in loggers:
        log.handlers = [refusals]
        log.propagate = False
    try:
        cluster.scale(n=spec.workers)
        planned = len(cluster.worker_spec)  # jobs, each running one or more worker processes
        waited = time.monotonic() + SUBMIT_TIMEOUT
        while not refusals.errors and time.monotonic() < waited:
            jobs = list(cluster.workers.values())
            if len(jobs) >= planned and all(j.status != Status.created for j in jobs):
                return
            time.sleep(0.05)
    finally:
        for log, handlers, propagate in kept:
            log.handlers, log.propagate = handlers, propagate
        # Jobs whose submission failed are marked so (Dask's close asserts that every job it
        # created ran or failed) and forgotten, so the cluster stops cleanly, after a Ctrl-C
        # too, and nothing resubmits them.
        for name, job in list(cluster.workers.items()):
            if job.status == Status.created:
                job.status = Status.failed
                del cluster.workers[name]
                cluster.worker_spec.pop(name, None)
    if refusals.errors:
        said = " ".join(str(refusals.errors[0]).split("stderr:", 1)[-1].split())
        raise UsageError(f"--cluster: the {spec.kind} batch system refused the job: {said}")
    raise UsageError(
        f"--cluster: the {spec.kind} batch system did not accept the jobs within "
        f"{SUBMIT_TIMEOUT:g} s; check that its submit command works here"
    )


def _jobqueue(spec: ClusterSpec, path: Path) -> Any:
    """Start the dask-jobqueue cluster the file describes (no jobs yet: scale() submits them)."""
    from deqcli.execution.cluster import CLASSES

    dask_jobqueue = _dask_jobqueue()
    cls = getattr(dask_jobqueue, CLASSES[spec.kind])
    accepted = set()
    for owner in (cls, cls.job_cls, dask_jobqueue.core.Job):
        accepted |= set(inspect.signature(owner.__init__).parameters) - {"self", "kwargs"}
    # The dashboard on a free port unless the file says otherwise (8787 is often taken).
    keywords = {"scheduler_options": {"dashboard_address": ":0"}, **spec.keywords()}
    for key in keywords:
        if key not in accepted:
            where = key if key in type(spec).model_fields else f"options.{key}"
            raise ConfigError(
                f"{path}: {where}", f"{cls.__name__} takes no '{key}'; see the dask-jobqueue docs"
            )
    try:
        return cls(**keywords)
    except (TypeError, ValueError) as exc:
        raise ConfigError(str(path), f"{cls.__name__} refused it: {_one_line(exc)}") from None


__all__ = ["DaskExecutor"]
