"""Sweeps and comparisons on a Dask cluster: the same results as in-process, files shipped to the
workers by content, consent carried by each task, a worker that dies mid-sweep, resume.

The tests marked ``distributed`` share one local cluster of two worker processes (started once for
this module) and reach it with ``--scheduler``; deselect them with ``-m 'not distributed'``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from deqcli.analyses.sweep import PointOptions, SweepBase, make_axes, point_task, run_sweep
from deqcli.execution import ExecutionSettings, Executor, InProcess, Task, TaskFailed, untimed
from deqcli.execution.files import digest
from deqcli.execution.source import ship
from tests.conftest import CONFIGS, ROOT

DOTTIE = 0.7390851332151607
LINEAR = CONFIGS / "linear_scalar.yaml"  # z = a z + 2: z* = 2 / (1 − a)


@pytest.fixture(scope="module")
def scheduler(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a local cluster of two single-threaded worker processes, warmed up."""
    pytest.importorskip("distributed")
    from deqcli.execution.dask_executor import DaskExecutor

    # The workers keep shipped files in a store of this test run (they read the variable at start).
    store = tmp_path_factory.mktemp("store")
    before = os.environ.get("DEQ_FILE_STORE")
    os.environ["DEQ_FILE_STORE"] = str(store)
    try:
        with DaskExecutor(ExecutionSettings(workers=2)) as executor:
            client = executor._start()
            # Import torch and deqcli in both workers now, not in the first test that uses them.
            client.run(__import__, "deqcli.api")
            yield client.scheduler.address
    finally:
        if before is None:
            os.environ.pop("DEQ_FILE_STORE", None)
        else:
            os.environ["DEQ_FILE_STORE"] = before


# -- without Dask ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["sweep", "compare-solvers"])
def test_without_dask_the_flags_give_the_install_command(cli, monkeypatch, command: str) -> None:
    monkeypatch.setitem(sys.modules, "distributed", None)  # import distributed now fails
    args = ["--param", "a=0.5:0.6:2"] if command == "sweep" else ["--solvers", "newton"]
    run = cli(command, LINEAR, *args, "--workers", "2")
    assert run.exit_code == 2 and run.stdout == ""
    assert run.stderr.strip() == (
        "error: --workers needs Dask, which is not installed; install it with: "
        "pip install 'deqcli[distributed]'"
    )


def test_execution_flags_are_checked_before_anything_runs(cli, tmp_path: Path) -> None:
    run = cli("sweep", LINEAR, "--param", "a=0.5", "--workers", "0")
    assert run.exit_code == 2 and "--workers: give 1 or more" in run.stderr
    # Hundreds of local workers (each loads torch) would exhaust the memory: refused up front.
    from deqcli.execution import OVERSUBSCRIBE, available_cores

    cores = available_cores()
    many = str(OVERSUBSCRIBE * cores + 1)
    run = cli("compare-solvers", LINEAR, "--workers", many)
    assert run.exit_code == 2 and run.stdout == ""
    assert run.stderr.strip() == (
        f"error: --workers: {many} local worker processes on {cores} core(s) would only wait for "
        f"each other, each holding its own torch in memory; give at most {OVERSUBSCRIBE * cores} "
        f"({cores}, one per core, runs fastest), or run on a cluster with --scheduler or --cluster"
    )
    run = cli("sweep", LINEAR, "--param", "a=0.5", "--workers", "2", "--scheduler", "tcp://x:1")
    assert run.exit_code == 2 and "--workers and --scheduler exclude each other" in run.stderr
    run = cli("compare-solvers", LINEAR, "--cluster", tmp_path / "none.yaml")
    assert run.exit_code == 2 and "--cluster: " in run.stderr and "not a file" in run.stderr
    bad = tmp_path / "slurm.yaml"
    bad.write_text("kind: slurm\nworkers: 4\ncores: 2\nmemory: 4GB\nqueu: short\n")
    run = cli("sweep", LINEAR, "--param", "a=0.5", "--cluster", bad)
    assert run.exit_code == 2
    assert f"{bad}: queu (line 5): unknown key; did you mean 'queue'?" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ["--workers", "2", "--chunk", "0"],
            "--chunk: give a number of tasks (1 or more) or 'auto'",
        ),
        (["--workers", "2", "--chunk", "some"], "got 'some'"),
        (["--chunk", "4"], "--chunk groups the tasks sent to Dask; add --workers, --scheduler or"),
    ],
)
def test_the_chunk_flag_is_checked_before_anything_runs(cli, flags: list[str], message: str):
    for command, args in (("sweep", ["--param", "a=0.5"]), ("compare-solvers", [])):
        run = cli(command, LINEAR, *args, *flags)
        assert run.exit_code == 2 and run.stdout == ""
        assert message in run.stderr and len(run.stderr.strip().splitlines()) == 1


def test_group_sizes_follow_the_measured_durations() -> None:
    pytest.importorskip("distributed")
    from deqcli.execution.dask_executor import GROUP_SECONDS, IN_FLIGHT, _GroupSizes

    fixed = _GroupSizes(4)
    assert [fixed.next(left, 2) for left in (100, 5, 3)] == [4, 4, 3]
    assert fixed.measured
    auto = _GroupSizes(None)
    assert not auto.measured  # the executor sends one group per worker until one came back
    assert auto.next(300, 2) == 1  # nothing measured yet: one at a time
    auto.observe(1, 2.0)  # a first task that paid its process's imports
    assert auto.measured
    assert auto.next(300, 2) == 1
    for _ in range(20):  # then tasks of 10 ms: the average follows them
        auto.observe(5, 0.05)
    assert auto.per_task == pytest.approx(0.01, rel=0.01)
    assert auto.next(300, 2) == int(GROUP_SECONDS / auto.per_task)
    # Near the end a group is at most a share of what is left, so the workers end together.
    assert auto.next(30, 2) == 30 // (IN_FLIGHT * 2)
    assert auto.next(4, 2) == 1


def test_the_queue_tries_each_kind_once_then_runs_the_costliest_first() -> None:
    pytest.importorskip("distributed")
    from deqcli.execution.dask_executor import _Queue

    def nothing() -> dict[str, Any]:
        return {}

    tasks = [Task((k, j), nothing, kind=k) for k in "abc" for j in range(3)]
    queue = _Queue(tasks)
    assert [queue.pop().key for _ in range(3)] == [("a", 0), ("b", 0), ("c", 0)]
    queue.observe(("a", 0), 0.01)
    queue.observe(("b", 0), 2.0)  # c has not come back: taken at the mean of those measured
    assert [queue.pop().key for _ in range(2)] == [("b", 1), ("b", 2)]
    assert queue.pop().key == ("c", 1)  # 1.005 s, the mean, against a's 0.01 s
    queue.observe(("c", 0), 0.001)
    assert [queue.pop().key for _ in range(len(queue))] == [("a", 1), ("a", 2), ("c", 2)]
    # Without a kind on every task, or with a chain, the order given is kept.
    chained = [Task(0, nothing, kind="a"), Task(1, nothing, kind="b", after=0)]
    mixed = [Task(0, nothing, kind="a"), Task(1, nothing)]
    for given in (chained, mixed):
        queue = _Queue(given)
        assert [queue.pop().key for _ in range(2)] == [0, 1]


def test_a_comparisons_groups_hold_a_few_tasks_and_a_sweeps_are_sized_freely() -> None:
    pytest.importorskip("distributed")
    from deqcli.execution.dask_executor import KIND_GROUP_TASKS, _GroupSizes, _Queue

    def nothing() -> dict[str, Any]:
        return {}

    sizes = _GroupSizes(None)
    sizes.observe(10, 0.01)  # tasks of 1 ms: 500 would fill GROUP_SECONDS
    compared = _Queue([Task((k, j), nothing, kind=k) for k in "ab" for j in range(200)])
    assert sizes.next(400, 2, by_kind=compared.by_kind) == KIND_GROUP_TASKS
    assert sizes.next(2, 2, by_kind=compared.by_kind) == 1  # the end's share of what is left
    swept = _Queue([Task(j, nothing, after=j - 1 if j else None) for j in range(400)])
    assert sizes.next(400, 2, by_kind=swept.by_kind) == 400 // 4
    assert _GroupSizes(30).next(400, 2, by_kind=True) == 30  # --chunk N is taken as given


class _Recording(InProcess):
    """Runs a remote executor's tasks here, in the order given, and notes their kinds."""

    remote = True

    def __init__(self) -> None:
        self.kinds: list[Any] = []

    def run(self, tasks, *, files=None, exclusive=False):  # type: ignore[no-untyped-def]
        self.kinds = [task.kind for task in tasks]
        return super().run(tasks, files=files, exclusive=exclusive)


def test_compare_tasks_are_of_their_configs_kind_and_keep_the_configs_order() -> None:
    from deqcli.analyses.compare import compare

    files = sorted((CONFIGS / "suite").glob("*.yaml"))
    executor = _Recording()
    doc = compare(files, ["fixed_point", "newton"], repeat=1, warmup=0, executor=executor)
    assert executor.kinds == [i for i in range(len(files)) for _ in range(2)]
    assert [p["config"] for p in doc["problems"]] == [str(f) for f in files]
    here = compare(files, ["fixed_point", "newton"], repeat=1, warmup=0)
    assert untimed(doc["problems"]) == untimed(here["problems"])


def test_a_worker_with_another_deqcli_refuses_the_group() -> None:
    # The start-up check sees only the workers present then; one that joins later (a batch job
    # that left the queue late) checks the client's version with every group.
    pytest.importorskip("distributed")
    import deqcli
    from deqcli.errors import UsageError
    from deqcli.execution.dask_executor import _run_group

    item = ("a", divmod, (7, 2), {}, None)
    assert _run_group([item], {}, False, deqcli.__version__)[0][1] == (3, 1)
    with pytest.raises(UsageError) as caught:
        _run_group([item], {}, False, "0.0.1")
    assert str(caught.value) == (
        f"a Dask worker that joined during the run has deqcli {deqcli.__version__}, this is "
        "0.0.1; install the same version where the workers run"
    )


def test_a_groups_compare_tasks_build_each_problem_once_and_forget_it(monkeypatch) -> None:
    pytest.importorskip("distributed")
    from deqcli import api
    from deqcli.analyses.compare import compare_task
    from deqcli.execution import group_memo
    from deqcli.execution.dask_executor import _run_group
    from deqcli.execution.source import ConfigSource

    built: list[str] = []
    real = api.load_problem

    def counted(cfg: Any) -> Any:
        built.append(cfg.problem_name)
        return real(cfg)

    monkeypatch.setattr(api, "load_problem", counted)
    sources = [ConfigSource.from_path(CONFIGS / f"{name}.yaml") for name in ("sqrt2", "dottie")]
    items = [
        ((src.problem_name, solver), compare_task, (src, solver, 0, 1, False, False), {}, None)
        for src in sources
        for solver in ("newton", "broyden")
    ]
    together = _run_group(items, {}, True)
    assert built == ["sqrt2", "dottie"]  # each config's second solver reused its problem
    assert group_memo() == {}  # nothing outlives the group
    alone = [_run_group([item], {}, True)[0] for item in items]
    assert len(built) == 6
    for (key, shared, _), (_, fresh, _) in zip(together, alone, strict=True):
        assert shared["row"]["status"] == "converged", key
        assert untimed(shared) == untimed(fresh)
    roots = {key: out["row"]["result"]["samples"][0]["solution"] for key, out, _ in together}
    assert roots[("sqrt2", "newton")] == pytest.approx([2**0.5], abs=1e-9)
    assert roots[("dottie", "broyden")] == pytest.approx([DOTTIE], abs=1e-9)


def test_in_process_runs_never_import_dask() -> None:
    code = textwrap.dedent(
        """
        import sys
        from typer.testing import CliRunner
        from deqcli.cli import app
        run = CliRunner().invoke(app, ["sweep", "configs/linear_scalar.yaml", "--param",
                                       "a=0.1:0.5:3", "-q"])
        assert run.exit_code == 0, run.output
        print(sorted(m for m in ("dask", "distributed") if m in sys.modules))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


def test_in_process_tasks_run_in_order_and_chain_results() -> None:
    def add(x: int, previous: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"sum": x + (previous["sum"] if previous else 0)}

    tasks = [Task(0, add, (1,)), Task(1, add, (2,), after=0), Task(2, add, (3,), after=1)]
    assert list(InProcess().run(tasks)) == [(0, {"sum": 1}), (1, {"sum": 3}), (2, {"sum": 6})]
    with pytest.raises(ValueError, match="runs after 5, not before it"):
        list(InProcess().run([Task(0, add, (1,), after=5)]))


def test_the_task_carries_the_clients_consent_not_the_workers(monkeypatch) -> None:
    base = SweepBase.from_path(CONFIGS / "python_map.yaml")
    # The worker's environment would allow the code; the client did not, so the task refuses.
    monkeypatch.setenv("DEQ_TRUST_CODE", "1")
    refused = point_task(base, (0,), {"problem.args.c": 0.25}, PointOptions(), False)
    assert refused["status"] == "error" and "--trust-code" in refused["error"]
    monkeypatch.delenv("DEQ_TRUST_CODE")
    allowed = point_task(base, (0,), {"problem.args.c": 0.25}, PointOptions(), True)
    assert allowed["status"] == "converged" and allowed["index"] == [0]


def test_a_sweep_asks_for_consent_up_front(cli, monkeypatch) -> None:
    monkeypatch.delenv("DEQ_TRUST_CODE", raising=False)
    run = cli("sweep", CONFIGS / "python_map.yaml", "--param", "n=2,4", "--json", "-")
    assert run.exit_code == 2 and "--trust-code" in run.stderr and run.stdout == ""


class _LosesOnePoint(Executor):
    """Runs tasks here, except that the task with key ``lost`` fails as a dead worker's would."""

    def __init__(self, lost: tuple[int, ...]) -> None:
        self.lost = lost

    def describe(self) -> dict[str, Any]:
        return {"backend": "test"}

    def run(self, tasks, *, files=None, exclusive=False):  # type: ignore[no-untyped-def]
        for key, result in InProcess().run(tasks):
            yield key, TaskFailed("the worker died") if key == self.lost else result


def test_a_point_whose_task_failed_is_an_error_point() -> None:
    base = SweepBase.from_path(LINEAR)
    sweep = run_sweep(base, make_axes(base, ["a=0.1:0.5:3"]), executor=_LosesOnePoint((1,)))
    assert [p["status"] for p in sweep.points] == ["converged", "error", "converged"]
    assert sweep.points[1] == {
        "index": [1],
        "assignment": {"problem.params.a": 0.3},
        "status": "error",
        "error": "the worker died",
    }
    assert not sweep.ok and sweep.execution == {"backend": "test"}


# -- on a local cluster of two workers -------------------------------------------------------------------


def _dottie_map(folder: Path) -> Path:
    """A Python map z = a·cos(z) whose first call in a worker process kills that process."""
    module = folder / "dying_cosine.py"
    module.write_text(
        textwrap.dedent(
            """
            import os
            import torch

            def make(a=1.0, marker="", client=0):
                if os.getpid() != int(client):
                    try:
                        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                    except FileExistsError:
                        pass
                    else:  # the first task to get here, anywhere, takes its worker down
                        os.close(fd)
                        os._exit(1)
                return (lambda z: a * torch.cos(z)), torch.zeros(1, 1)
            """
        )
    )
    config = folder / "dying.yaml"
    config.write_text(
        "problem:\n  kind: python\n  target: dying_cosine.py:make\n"
        f"  args: {{a: 1.0, marker: '{folder / 'died'}', client: {os.getpid()}}}\n"
        "solver: newton\nrun: {atol: 1.0e-12}\n"
    )
    return config


@pytest.mark.distributed
@pytest.mark.parametrize("chunk", [None, "1", "2"])
def test_sweep_on_workers_matches_in_process(
    cli, scheduler: str, tmp_path: Path, chunk: str | None
) -> None:
    config = CONFIGS / "logistic_sweep.yaml"
    args = ["--param", "r=2.6:3.4:5", "--param", "initial=0.2,0.4,0.6", "--warm-start"]
    here = cli("sweep", config, *args, "--json", tmp_path / "here.json", "-q")
    # Groups of 2 split the rows of 3: a warm start then comes from another group's task.
    grouping = ["--chunk", chunk] if chunk else []
    there = cli("sweep", config, *args, "--json", tmp_path / "there.json", "--scheduler", scheduler,
                *grouping)  # fmt: skip
    assert here.exit_code == there.exit_code == 0, there.stderr
    assert "ran on   Dask (scheduler), 2 workers, 1 torch thread each" in there.stdout
    a = json.loads((tmp_path / "here.json").read_text())
    b = json.loads((tmp_path / "there.json").read_text())
    assert b["execution"] == {
        "backend": "dask",
        "cluster": "scheduler",
        "scheduler": scheduler,
        "workers": 2,
        "threads_per_worker": 1,
        "chunk": int(chunk) if chunk else "auto",
    }
    assert untimed(a) == untimed(b) and b["points_done"] == 15
    for point in b["points"]:
        r = point["assignment"]["problem.params.r"]
        if r < 3:  # below r = 3 the fixed point 1 − 1/r attracts
            assert point["converged"] and point["value"] == pytest.approx(1 - 1 / r, abs=1e-8)
        # Warm starts chain along the last axis: every point after the first of its row has one.
        assert point["warm_start"] == (point["index"][1] > 0 and point["converged"])


@pytest.mark.distributed
def test_compare_on_workers_matches_in_process(cli, scheduler: str, tmp_path: Path) -> None:
    configs = [CONFIGS / "suite" / "dottie.yaml", CONFIGS / "suite" / "oscillating.yaml"]
    args = ["--solvers", "newton,fixed_point,anderson", "--repeat", "2", "--warmup", "1"]
    here = cli("compare-solvers", *configs, *args, "--json", tmp_path / "here.json", "-q")
    there = cli("compare-solvers", *configs, *args, "--json", tmp_path / "there.json", "-q",
                "--scheduler", scheduler)  # fmt: skip
    assert here.exit_code == there.exit_code == 0, there.stderr
    a = json.loads((tmp_path / "here.json").read_text())
    b = json.loads((tmp_path / "there.json").read_text())
    assert b["environment"]["execution"]["backend"] == "dask"
    assert untimed(a) == untimed(b)
    dottie = {row["solver"]: row for row in b["problems"][0]["solvers"]}
    solution = dottie["newton"]["result"]["samples"][0]["solution"][0]
    assert dottie["newton"]["converged"] and solution == pytest.approx(DOTTIE, abs=1e-12)
    for row in dottie.values():
        assert len(row["time"]["runs"]) == 2  # both timed repeats came back
    # The logistic map at r = 3.2: the naive iteration settles on the 2-cycle, Newton finds z*.
    cycle = {row["solver"]: row for row in b["problems"][1]["solvers"]}
    assert cycle["fixed_point"]["status"] == "oscillating" and cycle["fixed_point"]["period"] == 2
    assert cycle["newton"]["converged"]


@pytest.mark.distributed
def test_compare_on_workers_names_the_users_files(cli, scheduler: str, tmp_path: Path) -> None:
    # The Python map reaches the workers as a stored copy; the document still names models/….py.
    config = CONFIGS / "python_map.yaml"
    args = ["--solvers", "newton,fixed_point", "--repeat", "1", "--warmup", "0", "--trust-code"]
    here = cli("compare-solvers", config, *args, "--json", tmp_path / "here.json", "-q")
    there = cli("compare-solvers", config, *args, "--json", tmp_path / "there.json", "-q",
                "--scheduler", scheduler)  # fmt: skip
    assert here.exit_code == there.exit_code, there.stderr
    a = json.loads((tmp_path / "here.json").read_text())
    b = json.loads((tmp_path / "there.json").read_text())
    assert untimed(a) == untimed(b)
    assert b["problems"][0]["description"].endswith("from models/damped_cosine.py:make")
    stored = digest((CONFIGS / "models" / "damped_cosine.py").read_bytes())
    assert stored not in json.dumps(b)  # the copy's content-addressed name


def _threads_here() -> dict[str, Any]:
    import torch

    return {"torch": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS")}


@pytest.mark.distributed
def test_worker_tasks_run_with_one_torch_thread(scheduler: str) -> None:
    from deqcli.execution.dask_executor import DaskExecutor

    with DaskExecutor(ExecutionSettings(scheduler=scheduler)) as executor:
        seen = dict(executor.run([Task(k, _threads_here) for k in range(4)], exclusive=True))
    assert all(threads == {"torch": 1, "omp": "1"} for threads in seen.values())


def _square_or_fail(x: int) -> dict[str, Any]:
    if x == 3:
        raise ArithmeticError(f"no square for {x}")
    return {"square": x * x}


@pytest.mark.distributed
def test_a_task_that_raises_inside_a_group_keeps_the_results_before_it(scheduler: str) -> None:
    from deqcli.execution.dask_executor import DaskExecutor

    tasks = [Task(x, _square_or_fail, (x,)) for x in range(6)]
    arrived = []
    executor = DaskExecutor(ExecutionSettings(scheduler=scheduler, chunk="6"))
    with executor, pytest.raises(ArithmeticError, match="no square for 3") as raised:
        for key, result in executor.run(tasks):
            arrived.append((key, result))
    assert arrived == [(0, {"square": 0}), (1, {"square": 1}), (2, {"square": 4})]
    if sys.version_info >= (3, 11):  # the worker's traceback goes with it
        assert "on the Dask worker" in raised.value.__notes__[0]
        assert "_square_or_fail" in raised.value.__notes__[0]


@pytest.mark.distributed
def test_workers_read_shipped_copies_of_the_configs_files(scheduler: str, tmp_path: Path) -> None:
    from deqcli.execution.dask_executor import DaskExecutor
    from deqcli.execution.files import stored_path

    # z = A z + b with the matrix and vector in .npy files: z* = (I − A)⁻¹ b exactly.
    folder = tmp_path / "project"
    (folder / "data").mkdir(parents=True)
    A = np.array([[0.5, 0.1], [0.0, 0.25]])
    b = np.array([1.0, 3.0])
    np.save(folder / "data" / "A.npy", A)
    np.save(folder / "b.npy", b)
    config = folder / "linear.yaml"
    config.write_text(
        "problem:\n  kind: expression\n  fixed_point: A @ z + c * b\n  dim: 2\n"
        "  params: {A: {file: data/A.npy}, b: {file: b.npy}, c: 1.0}\n"
        "solver: newton\nrun: {atol: 1.0e-12}\n"
    )
    base = SweepBase.from_path(config)
    axes = make_axes(base, ["c=1.0,2.0"])
    source, blobs = ship(base, [base.config({"problem.params.c": 1.0})])
    assert sorted(name for name, _ in source.files) == ["b.npy", "data/A.npy"]
    # The client's folder is gone: the workers can only read what was shipped.
    for path in (folder / "data" / "A.npy", folder / "b.npy", config):
        path.unlink()
    tasks = [
        Task(idx, point_task, (source, idx, assignment, PointOptions(), False))
        for idx, assignment in [((i,), {axes[0].key: c}) for i, c in enumerate(axes[0].values)]
    ]
    with DaskExecutor(ExecutionSettings(scheduler=scheduler)) as executor:
        results = dict(executor.run(tasks, files=blobs))
    for (i,), c in zip([(0,), (1,)], (1.0, 2.0), strict=True):
        point = results[(i,)]
        assert point["status"] == "converged", point.get("error")
        expected = np.linalg.solve(np.eye(2) - A, c * b)
        assert point["solution"][0] == pytest.approx(expected.tolist(), abs=1e-12)
    stored = [stored_path(content, name) for name, content in source.files]
    assert all(path.exists() for path in stored)  # this test run's store, shared with the workers


@pytest.mark.distributed
@pytest.mark.parametrize("chunk", ["auto", "3"])
def test_a_worker_that_dies_mid_sweep_loses_no_point(
    cli, scheduler: str, tmp_path: Path, chunk: str
) -> None:
    config = _dottie_map(tmp_path)
    args = ["--param", "a=0.5,1.0,1.5", "--trust-code", "--json", "-", "-q", "--chunk", chunk]
    run = cli("sweep", config, *args, "--scheduler", scheduler)
    assert (tmp_path / "died").exists()  # a worker did die, in the middle of a task
    assert run.exit_code == 0, run.stderr
    doc = json.loads(run.stdout)
    assert [p["status"] for p in doc["points"]] == ["converged"] * 3
    # The task the dead worker held ran again elsewhere: z = a·cos(z), Dottie's number at a = 1.
    assert doc["points"][1]["value"] == pytest.approx(DOTTIE, abs=1e-12)
    assert doc["points"][0]["value"] == pytest.approx(0.45018361129487355, abs=1e-12)


@pytest.mark.distributed
def test_a_resumed_sweep_on_workers_runs_only_missing_points(scheduler: str, tmp_path: Path):
    from deqcli.execution.dask_executor import DaskExecutor

    base = SweepBase.from_path(LINEAR)
    axes = make_axes(base, ["a=0.1:0.7:7"])
    path = tmp_path / "points.jsonl"

    def stop_after_three(count: int, total: int, point: dict) -> None:
        if count == 3:
            raise KeyboardInterrupt

    with DaskExecutor(ExecutionSettings(scheduler=scheduler)) as executor:
        partial = run_sweep(base, axes, results=path, on_point=stop_after_three, executor=executor)
    assert partial.interrupted and len(partial.points) == 3
    lines = path.read_text().splitlines()
    assert len(lines) == 4  # the header and every point that arrived
    # Mark the points already done: a resumed sweep must read them back, not solve them again.
    kept = [json.loads(line) for line in lines[1:]]
    path.write_text(
        "\n".join([lines[0], *(json.dumps({**p, "wall_time": -1.0}) for p in kept)]) + "\n"
    )
    with DaskExecutor(ExecutionSettings(scheduler=scheduler)) as executor:
        full = run_sweep(base, axes, results=path, resume=True, executor=executor)
    assert not full.interrupted and full.resumed == 3 and len(full.points) == 7
    assert sum(p["wall_time"] == -1.0 for p in full.points) == 3
    assert len(path.read_text().splitlines()) == 8
    for a, point in zip(axes[0].values, full.points, strict=True):
        assert point["value"] == pytest.approx(2.0 / (1 - a), rel=1e-12)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("notanaddress", "'notanaddress' is not HOST:PORT; give the scheduler's address as tcp://"),
        ("tcp://", "'tcp://' is not HOST:PORT"),
        ("tcp://10.0.0.5:8786/status", "'tcp://10.0.0.5:8786/status' is not HOST:PORT"),
        ("http://10.0.0.5:8786", "uses the scheme 'http'; deq reaches a Dask scheduler by tcp://"),
        ("inproc://x", "uses the scheme 'inproc'"),
        (
            "10.0.0.5:port",
            "has the port 'port'; give a port from 1 to 65535, e.g. tcp://10.0.0.5:8786",
        ),
        (
            "tcp://[::1]:65536",
            "has the port '65536'; give a port from 1 to 65535, e.g. tcp://[::1]:8786",
        ),
        ("  ", "give the scheduler's address as tcp://HOST:PORT"),
    ],
)
def test_a_malformed_scheduler_address_is_named_before_anything_runs(
    cli, address: str, message: str
) -> None:
    for command, args in (("sweep", ["--param", "a=0.5"]), ("compare-solvers", [])):
        run = cli(command, LINEAR, *args, "--scheduler", address)
        assert run.exit_code == 2 and run.stdout == ""
        assert run.stderr.startswith("error: --scheduler: ") and message in run.stderr
        assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.distributed
def test_an_unreachable_scheduler_is_one_line(cli, monkeypatch) -> None:
    import socket

    from deqcli.execution import dask_executor

    monkeypatch.setattr(dask_executor, "CONNECT_TIMEOUT", 1)
    # A port nothing listens on is refused at once, not after the timeout.
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    started = time.perf_counter()
    run = cli("sweep", LINEAR, "--param", "a=0.5", "--scheduler", f"tcp://127.0.0.1:{port}")
    assert run.exit_code == 2 and time.perf_counter() - started < 5
    assert run.stderr.strip() == (
        f"error: --scheduler: nothing accepts connections at tcp://127.0.0.1:{port} (connection "
        "refused); is the scheduler running, and is this its port?"
    )
    # A port that accepts the connection but never answers (an HTTP server's, say): Dask's client
    # would wait for its handshake forever; deq gives up after the connect timeout.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        address = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
        run = cli("sweep", LINEAR, "--param", "a=0.5", "--scheduler", address)
    assert run.exit_code == 2
    assert run.stderr.strip() == (
        f"error: --scheduler: {address} accepts connections but gave no Dask handshake within "
        "1 s; is it the scheduler's port (8786 unless set, not the dashboard's 8787)?"
    )

    # A port where another protocol answers (an SSH server's banner, to every connection).
    def greet(server: socket.socket) -> None:
        with contextlib.suppress(OSError):  # the server closed at the end of the test
            while True:
                server.accept()[0].sendall(b"SSH-2.0-OpenSSH_9.6\r\n")

    with socket.create_server(("127.0.0.1", 0)) as other:
        address = f"tcp://127.0.0.1:{other.getsockname()[1]}"
        threading.Thread(target=greet, args=(other,), daemon=True).start()
        run = cli("sweep", LINEAR, "--param", "a=0.5", "--scheduler", address)
    assert run.exit_code == 2
    assert run.stderr.startswith(f"error: --scheduler: {address} does not speak Dask's protocol (")
    assert len(run.stderr.strip().splitlines()) == 1
    run = cli("sweep", LINEAR, "--param", "a=0.5", "--scheduler", "tcp://no-such-host.invalid:8786")
    assert run.exit_code == 2
    assert run.stderr.startswith(
        "error: --scheduler: cannot resolve the host 'no-such-host.invalid'"
    )
    assert len(run.stderr.strip().splitlines()) == 1


@pytest.mark.distributed
def test_a_scheduler_without_workers_is_announced_not_a_silent_wait(scheduler, monkeypatch):
    # The tasks wait for a worker to join (jobs in a queue, workers not started yet); after
    # WORKER_WAIT seconds the user is told so once instead of watching nothing happen.
    from distributed import LocalCluster

    from deqcli.execution import dask_executor
    from deqcli.execution.dask_executor import DaskExecutor

    monkeypatch.setattr(dask_executor, "WORKER_WAIT", 0.5)
    said: list[str] = []
    with LocalCluster(n_workers=0, dashboard_address=":0") as empty:
        address = empty.scheduler_address
        with DaskExecutor(ExecutionSettings(scheduler=address, notice=said.append)) as executor:
            executor._start()
    assert said == [
        f"waiting for Dask workers: after 0.5 s the scheduler at {address} has no worker; the "
        "tasks start when one joins (Ctrl-C stops)"
    ]
    said.clear()
    with DaskExecutor(ExecutionSettings(scheduler=scheduler, notice=said.append)) as executor:
        executor._start()
    assert said == []  # its two workers are there


@pytest.mark.distributed
def test_a_slurm_cluster_file_becomes_the_job_script(tmp_path: Path) -> None:
    pytest.importorskip("dask_jobqueue")
    from deqcli.errors import ConfigError
    from deqcli.execution.cluster import load_cluster
    from deqcli.execution.dask_executor import _jobqueue

    path = tmp_path / "slurm.yaml"
    path.write_text(
        "kind: slurm\nworkers: 8\ncores: 4\nmemory: 8GB\nwalltime: '00:30:00'\nqueue: short\n"
        "job_script_prologue: ['source ~/venvs/deq/bin/activate']\n"
    )
    spec = load_cluster(path)
    cluster = _jobqueue(spec, path)
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    for line in ("#SBATCH -p short", "#SBATCH -t 00:30:00", "source ~/venvs/deq/bin/activate"):
        assert line in script
    assert "--nworkers 4" in script and "--nthreads 1" in script  # one core per worker process
    path.write_text("kind: slurm\nworkers: 8\ncores: 4\nmemory: 8GB\noptions: {no_such: 1}\n")
    with pytest.raises(ConfigError, match=r"options\.no_such: SLURMCluster takes no 'no_such'"):
        _jobqueue(load_cluster(path), path)


@pytest.mark.distributed
def test_a_cluster_file_needs_the_batch_systems_submit_command(cli, tmp_path, monkeypatch):
    pytest.importorskip("dask_jobqueue")
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch here
    path = tmp_path / "slurm.yaml"
    path.write_text("kind: slurm\nworkers: 2\ncores: 1\nmemory: 1GB\n")
    run = cli("sweep", LINEAR, "--param", "a=0.5", "--cluster", path)
    assert run.exit_code == 2
    assert "--cluster: slurm jobs are submitted with 'sbatch', which is not on this" in run.stderr


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (
            'echo "sbatch: error: invalid partition specified: shortt" >&2; exit 1',
            "--cluster: the slurm batch system refused the job: sbatch: error: invalid partition "
            "specified: shortt",
        ),
        ('echo "no job id here"', "Could not parse job id from submission command output"),
    ],
)
def test_a_refused_job_submission_is_one_line_not_a_wait_forever(
    cli, tmp_path, monkeypatch, answer: str, message: str
) -> None:
    # dask-jobqueue submits in the background and only logs a refusal (with its traceback); the
    # tasks then waited for workers that would never come.
    pytest.importorskip("dask_jobqueue")
    for command, body in (("sbatch", answer), ("squeue", "exit 0"), ("scancel", "exit 0")):
        script = tmp_path / command
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    path = tmp_path / "slurm.yaml"
    path.write_text("kind: slurm\nworkers: 2\ncores: 1\nmemory: 1GB\nqueue: shortt\n")
    started = time.perf_counter()
    run = cli("sweep", LINEAR, "--param", "a=0.5", "--cluster", path)
    assert run.exit_code == 2 and time.perf_counter() - started < 30
    assert run.stderr.startswith("error: ") and message in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1 and "Traceback" not in run.stderr


@pytest.mark.distributed
def test_importing_dask_jobqueue_keeps_the_ctrl_c_handler() -> None:
    # dask_jobqueue's runner module replaces the SIGINT handler on import with one that exits at
    # once: Ctrl-C during a --cluster run was "the config's Python code called sys.exit", exit 2.
    pytest.importorskip("dask_jobqueue")
    code = (
        "import signal; from deqcli import interrupt; interrupt.install();"
        "mine = signal.getsignal(signal.SIGINT);"
        "from deqcli.execution.dask_executor import _dask_jobqueue; _dask_jobqueue();"
        "print(signal.getsignal(signal.SIGINT) is mine)"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"


@pytest.mark.distributed
def test_ctrl_c_on_a_distributed_sweep_keeps_every_point_that_arrived(
    scheduler: str, tmp_path: Path
) -> None:
    import signal

    results = tmp_path / "points.jsonl"
    # More points than can finish before the interrupt, which comes once a few have arrived.
    command = [sys.executable, "-m", "deqcli", "sweep", str(LINEAR), "--param", "a=0:0.5:300",
               "--results", str(results), "--scheduler", scheduler, "-q"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.Popen(command, cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and run.poll() is None:
        if results.exists() and len(results.read_text().splitlines()) > 6:
            break
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate(timeout=60)
    assert run.returncode == 130, stderr
    lines = results.read_text().splitlines()
    assert json.loads(lines[0])["kind"] == "deq.sweep-results"
    points = [json.loads(line) for line in lines[1:]]  # every line whole
    indices = [p["index"][0] for p in points]
    assert 6 <= len(points) < 300 and len(set(indices)) == len(indices)
    for point in points:
        a = point["assignment"]["problem.params.a"]
        assert point["value"] == pytest.approx(2.0 / (1 - a), rel=1e-12)


@pytest.mark.distributed
def test_workers_with_another_deqcli_version_are_refused(cli, scheduler: str, monkeypatch) -> None:
    import deqcli

    theirs = deqcli.__version__
    monkeypatch.setattr(deqcli, "__version__", "0.0.1")  # this side only; the workers keep theirs
    run = cli("sweep", LINEAR, "--param", "a=0.5", "--scheduler", scheduler)
    assert run.exit_code == 2
    assert f"the workers run deqcli {theirs}, this is 0.0.1; install the same version" in run.stderr
