"""Scale-out benchmark: a 2-D sweep and a compare-solvers suite, in-process against Dask workers.

Workloads (the same ones ``deq sweep`` and ``deq compare-solvers`` run):

    sweep     a DEQ layer z = tanh(W z + x) (configs/tanh_layer.yaml: n = 64, batch 8) over
              ‖W‖₂ = 0.5 … 1.3 (20 values) × the input scale 0.2 … 2 (15 values): 300 points,
              each solved and diagnosed (classification, ρ(J) at the fixed point)
    compare   configs/suite (5 problems) × deq's own solvers, 1 warm-up and 3 timed repeats:
              45 tasks of about 40 ms, under 2 s of work in all
    configs   every shipped example config (configs/, configs/diagnostics/; 25 problems, from
              scalar maps to the hard 256-wide layers and a Python map) × deq's own solvers, 1
              warm-up and 3 timed repeats: 225 tasks from 5 ms to seconds, the size of suite a
              model's CI guards

Each workload runs in this process, then on the Dask cluster, taking turns, 3 times (the short
compare workload 15 times), and the medians are compared: a machine's speed can drift by 10-30 %
over seconds to minutes. Both sides are warmed up first by one untimed small round of both
workloads (imports, lazy initialisation, the first call of every solver and diagnostic in every
process); that and the cluster's start are timed apart and not counted in the speed-up: a long
sweep pays them once. Speed-up = in-process time / Dask time;
efficiency = speed-up / workers. This process runs torch with one thread, like each worker
(``--threads`` to change it). The CPU seconds each side used (this process; the sum over the
workers) show what the wall times rest on: on a busy machine the workers get less CPU per second
than the cores could give. The results are checked to be identical up to timing fields.

Each round also measures the machine's own ceiling for the workload (on a local cluster): every
worker runs the whole workload in its own process at once, with no Dask scheduling in between,
and ceiling = workers × (this process's time for it alone) / (their wall time). On idle cores
that is the worker count; where the cores share caches, memory bandwidth or a host with other
guests it is less, and no scheduler can beat it. The report gives Dask's speed-up against it.

    python bench/scale.py                      # 2 local worker processes (--workers 2)
    python bench/scale.py --workers 8
    python bench/scale.py --scheduler tcp://10.0.0.5:8786   # an existing Dask cluster
    python bench/scale.py --quick              # a smaller grid and one repeat, for development

Run it on an otherwise idle machine: other load on the cores skews both sides.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deqcli.analyses.compare import compare, resolve_solvers  # noqa: E402
from deqcli.analyses.sweep import SweepBase, make_axes, run_sweep  # noqa: E402
from deqcli.consent import decided  # noqa: E402
from deqcli.execution import ExecutionSettings, Executor, InProcess, untimed  # noqa: E402

SWEEP_CONFIG = ROOT / "configs" / "tanh_layer.yaml"
SWEEP_OVERRIDES: list[str] = []
SWEEP_GRID = ["problem.W.spectral_norm=0.5:1.3:20", "problem.x.scale=0.2:2:15"]
QUICK_GRID = ["problem.W.spectral_norm=0.5:1.3:8", "problem.x.scale=0.2:2:4"]
SUITE = ROOT / "configs" / "suite"
# Every shipped example (configs/models holds a model's Python file, not a config).
EXAMPLES = [ROOT / "configs", ROOT / "configs" / "diagnostics"]
TARGET_SPEEDUP = 1.7  # on 2 workers over 2 cores
# How often each workload runs on each side (taking turns; the medians are compared). This
# machine's speed drifts by 10-30 % over seconds to minutes: one round of the short compare workload
# (about 1.5 s of work) gave anything from 1.1x to 2.3x, one round of the sweep 1.56x to 2.24x.
ROUNDS = {"sweep": 3, "compare": 15, "configs": 3}


@dataclass
class Measured:
    """One workload on one side: wall seconds, CPU seconds used for it, and its document."""

    wall: float
    cpu: float
    doc: dict[str, Any]


def differences(a: Any, b: Any, path: str = "") -> Iterator[str]:
    """Where two documents differ: the path of each differing value, with both values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                yield f"{path}/{key}: on one side only"
            else:
                yield from differences(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from differences(x, y, f"{path}[{i}]")
    elif a != b:
        yield f"{path}: {str(a)[:80]} | {str(b)[:80]}"


def _median(runs: Iterator[Measured]) -> Measured:
    """The run of median wall time (the upper one of an even count)."""
    ordered = sorted(runs, key=lambda m: m.wall)
    return ordered[len(ordered) // 2]


def cpu_seconds(client: Any) -> float:
    """CPU seconds used so far: this process, or the sum over the workers of a Dask client."""
    if client is None:
        return time.process_time()
    return sum(client.run(time.process_time).values())


def measure(run: Callable[[], dict[str, Any]], client: Any = None) -> Measured:
    """Run a workload; its wall time and the CPU time it took where the tasks ran."""
    cpu = cpu_seconds(client)
    started = time.perf_counter()
    doc = run()
    wall = time.perf_counter() - started
    return Measured(wall, cpu_seconds(client) - cpu, doc)


def sweep_on(executor: Executor, params: list[str]) -> dict[str, Any]:
    """The 2-D sweep's document, solved on ``executor``."""
    base = SweepBase.from_path(SWEEP_CONFIG, SWEEP_OVERRIDES)
    return run_sweep(base, make_axes(base, params), executor=executor).to_dict()


def compare_on(
    executor: Executor, repeat: int, folders: list[Path] | None = None
) -> dict[str, Any]:
    """The comparison of every config in ``folders`` (configs/suite by default), on ``executor``."""
    files = [path for folder in folders or [SUITE] for path in sorted(folder.glob("*.yaml"))]
    solvers = resolve_solvers(None, include_peers=False)
    # configs/python_map.yaml imports its map: this script runs only the project's own files.
    with decided(True):
        return compare(files, solvers, repeat=repeat, warmup=1, executor=executor)


def _alone(run: Callable[[Executor], dict[str, Any]]) -> float:
    """On a worker: the workload in this process, start to end (for the ceiling)."""
    started = time.perf_counter()
    run(InProcess())
    return time.perf_counter() - started


def all_at_once(client: Any, run: Callable[[Executor], dict[str, Any]]) -> float:
    """Wall seconds for every worker to run the whole workload in its own process, all at once."""
    started = time.perf_counter()
    futures = [
        client.submit(_alone, run, workers=[address], allow_other_workers=False, pure=False)
        for address in client.scheduler_info()["workers"]
    ]
    client.gather(futures)
    return time.perf_counter() - started


def warm_up(executor: Executor) -> None:
    """One untimed small round of the workloads, so every process has run every code path."""
    sweep_on(executor, QUICK_GRID)
    compare_on(executor, 1, [SUITE, *EXAMPLES])


def main() -> None:
    """Run both workloads here and on Dask; print times, speed-up and efficiency."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, default=None, help="local worker processes (2)")
    where.add_argument("--scheduler", default=None, help="an existing Dask scheduler's address")
    parser.add_argument("--quick", action="store_true", help="a smaller grid, one repeat")
    parser.add_argument("--json", type=Path, default=None, help="write the figures to this file")
    parser.add_argument(
        "--workloads",
        default="sweep,compare,configs",
        help="which workloads to run, comma-separated (default: all three)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads in this process (workers have 1)"
    )
    args = parser.parse_args()
    chosen = [name.strip() for name in args.workloads.split(",")]
    unknown = sorted(set(chosen) - set(ROUNDS))
    if unknown:
        sys.exit(f"--workloads: unknown {', '.join(unknown)}; choose from {', '.join(ROUNDS)}")
    import torch

    # The same thread count on both sides, so the speed-up measures processes working side by
    # side, not torch's intra-op threads (which, on small problems and busy cores, mostly spin).
    torch.set_num_threads(args.threads)
    workers = None if args.scheduler else (args.workers or 2)
    settings = ExecutionSettings(workers=workers, scheduler=args.scheduler)
    grid = QUICK_GRID if args.quick else SWEEP_GRID
    repeat = 1 if args.quick else 3

    from deqcli.execution.dask_executor import DaskExecutor

    workloads: dict[str, Callable[[Executor], dict[str, Any]]] = {
        "sweep": lambda executor: sweep_on(executor, grid),
        "compare": lambda executor: compare_on(executor, repeat),
        "configs": lambda executor: compare_on(executor, repeat, EXAMPLES),
    }
    here: dict[str, Measured] = {}
    there: dict[str, Measured] = {}
    spread: dict[str, list[float]] = {}
    ceilings: dict[str, list[float]] = {}
    identical: dict[str, bool] = {}
    load_before = os.getloadavg()[0]
    with DaskExecutor(settings) as executor:
        started = time.perf_counter()
        client = executor._start()
        warm_up(executor)
        startup = time.perf_counter() - started
        # Warm this process up (imports, first calls of every solver) as the workers are.
        warm_up(InProcess())
        workers = len(client.scheduler_info()["workers"])
        for name in chosen:
            run = workloads[name]
            # The two sides take turns, so a drift of the machine's speed hits both.
            rounds = 1 if args.quick else ROUNDS[name]
            pairs = []
            ceilings[name] = []
            for _ in range(rounds):
                pairs.append(
                    (measure(partial(run, InProcess())), measure(partial(run, executor), client))
                )
                if args.scheduler is None:  # a remote cluster's machines are not this one
                    together = all_at_once(client, run)
                    ceilings[name].append(workers * pairs[-1][0].wall / together)
            here[name] = _median(a for a, _ in pairs)
            there[name] = _median(b for _, b in pairs)
            spread[name] = sorted(a.wall / b.wall for a, b in pairs)
            identical[name] = True
            for round_, (a, b) in enumerate(pairs):
                found = list(itertools.islice(differences(untimed(a.doc), untimed(b.doc)), 5))
                identical[name] = identical[name] and not found
                for line in found:  # see docs/scale-out.md on a float's last bits
                    print(f"{name} round {round_ + 1} differs at {line}", flush=True)
        where_run = executor.describe()
    load_after = os.getloadavg()[0]

    tasks = {
        name: here[name].doc["points_total"]
        if name == "sweep"
        else len(here[name].doc["problems"]) * len(here[name].doc["settings"]["solvers"])
        for name in chosen
    }
    print(
        f"{workers} Dask workers ({where_run.get('cluster')}), {os.cpu_count()} cores here, "
        f"load average {load_before:.1f} → {load_after:.1f}; cluster start and warm-up "
        f"{startup:.1f} s (not counted)"
    )
    print(f"{'workload':9} {'tasks':>5} {'in-process':>17} {'dask':>17} {'speed-up':>9} "
          f"{'efficiency':>10}  same")  # fmt: skip
    print(f"{'':9} {'':>5} {'wall':>8} {'cpu':>8} {'wall':>8} {'cpu':>8}")
    figures = []
    for name in chosen:
        a, b = here[name], there[name]
        same = identical[name]
        speedup = a.wall / b.wall
        figures.append(
            {
                "workload": name,
                "tasks": tasks[name],
                "in_process": {"wall_s": a.wall, "cpu_s": a.cpu},
                "dask": {"wall_s": b.wall, "worker_cpu_s": b.cpu},
                "speedup": speedup,
                "rounds": len(spread[name]),
                "speedup_per_round": spread[name],
                "efficiency": speedup / workers,
                "identical": same,
            }
        )
        print(
            f"{name:9} {tasks[name]:5d} {a.wall:7.2f}s {a.cpu:7.2f}s {b.wall:7.2f}s {b.cpu:7.2f}s "
            f"{speedup:8.2f}× {speedup / workers:9.0%}  {'yes' if same else 'NO'}"
        )
        if len(spread[name]) > 1:
            rounds = ", ".join(f"{r:.2f}×" for r in spread[name])
            print(f"{'':9} {len(spread[name])} rounds, medians compared; per round: {rounds}")
        if ceilings[name]:
            ceiling = statistics.median(ceilings[name])
            figures[-1]["ceiling"] = ceiling
            figures[-1]["ceiling_per_round"] = sorted(ceilings[name])
            print(
                f"{'':9} this machine's ceiling: {ceiling:.2f}× ({workers} processes running the "
                f"workload at once, median of rounds {min(ceilings[name]):.2f}–"
                f"{max(ceilings[name]):.2f}×); Dask reached {speedup / ceiling:.0%} of it"
            )
    if workers == 2:
        best = min(f["speedup"] for f in figures)
        verdict = "meets" if best >= TARGET_SPEEDUP else "misses"
        print(f"target ≥ {TARGET_SPEEDUP}× on 2 workers: {verdict} it (lowest {best:.2f}×)")
    busy = max(load_before, load_after) > (os.cpu_count() or 1)
    if busy:
        print(
            "the machine was busy (load above its core count): the speed-up measures how much "
            "CPU the other load left us; compare the CPU columns, and rerun on idle cores"
        )
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "workers": workers,
                    "startup_s": startup,
                    "load_average": [load_before, load_after],
                    "execution": where_run,
                    "rows": figures,
                },
                indent=2,
            )
            + "\n"
        )
    if not all(f["identical"] for f in figures):
        sys.exit("the Dask results differ from the in-process ones beyond timing fields")


if __name__ == "__main__":
    main()
