"""The DEQ solver benchmark: our solvers against the scipy and torchdeq peers on tanh layers.

Every solver runs in this one process on the same float64 problems z = tanh(W z + x), with the
same stopping rule (‖z − f(z)‖ ≤ 1e-8 per sample, at most 3000 iterations) and the same counting
wrapper, through the same driver loop. Cases:

    easy       n=512,  B=32, W Gaussian with ‖W‖₂ = 0.95, x ~ N(0, 1)
    hard-orth  n=256,  B=16, W = 0.999·Q, Q random orthogonal, x ~ 0.01·N(0, 1)
    hard-sym   n=256,  B=16, W symmetric, eigenvalues evenly spaced in [−0.5, 0.995], x ~ 0.01·N(0, 1)
    large      n=1024, B=64, W Gaussian with ‖W‖₂ = 0.95, x ~ N(0, 1)

For each solver: the median wall time over the timed repeats (after a short warm-up run; a solver
whose runs add up to more than --budget seconds stops repeating, and the table says how many runs
it had), iterations of the slowest sample, nfev/njev/JVPs, and samples converged. Per case: the
ratio of the best torchdeq solver's time (and the best peer's) to our best solver's time, "best"
being the fastest that converged on every sample. On the large case also the overhead ratio
time / (nfev × one bare evaluation of f) for fixed_point and anderson, and the peak memory each
solver needs beyond the problem: on CUDA the allocator's peak during a run
(torch.cuda.max_memory_allocated, every solver, everything the run allocates); on every device
the bytes of the state tensors a solver keeps between iterations beyond z and g (ours only:
exact, but it leaves out temporaries inside a step such as newton-krylov's Krylov basis).
tracemalloc cannot see torch's CPU tensors, and the CPU allocator reuses freed blocks, so peak RSS
growth says little; the CPU column is therefore the state size.

    python bench/deq_suite.py [--device cpu|cuda] [--repeat 3] [--cases easy,large]
                              [--quick] [--threads N] [--budget 60] [--json out.json]

--quick shrinks every case (n/4, B/4), runs once and is meant for development only.

``--family`` runs the hard-layer family instead (bench/deq_family.py: nine hard layer types and
the easy one, three seeds each, our solvers against torchdeq's called directly, with the targets
case by case); --types, --seeds, --broyden-gib and --no-first-solve apply to it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deq_family import haar  # noqa: E402

from deqcli.errors import DeqError  # noqa: E402
from deqcli.problems.base import Problem  # noqa: E402
from deqcli.problems.tanh_layer import tanh_layer_jacobian, tanh_layer_map  # noqa: E402
from deqcli.result import SolveResult  # noqa: E402
from deqcli.solvers import SOLVERS, make_solver  # noqa: E402
from deqcli.solvers.base import State, StopRule, run  # noqa: E402

ATOL = 1e-8
MAX_ITER = 3000
HARD_SPEEDUP_TARGET = 5.0
OVERHEAD_TARGETS = {"fixed_point": 1.1, "anderson": 1.5}


@dataclass(frozen=True)
class CaseSpec:
    """One benchmark case: the layer's size and how W and x are drawn."""

    name: str
    n: int
    batch: int
    weights: str  # "gaussian" | "orthogonal" | "symmetric"
    x_scale: float


CASES = {
    "easy": CaseSpec("easy", 512, 32, "gaussian", 1.0),
    "hard-orth": CaseSpec("hard-orth", 256, 16, "orthogonal", 0.01),
    "hard-sym": CaseSpec("hard-sym", 256, 16, "symmetric", 0.01),
    "large": CaseSpec("large", 1024, 64, "gaussian", 1.0),
}


@dataclass
class Entry:
    """A solver configuration to run: label, registry name, options."""

    label: str
    name: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        """deq, scipy or torchdeq."""
        return SOLVERS[self.name].family


@dataclass
class Row:
    """What one solver did on one case."""

    label: str
    family: str
    seconds: float | None = None
    runs: int = 0
    iterations: int = 0
    nfev: int = 0
    njev: int = 0
    jvp: int = 0
    converged: int = 0
    batch: int = 0
    status: str = ""
    error: str = ""
    state_bytes: int | None = None
    peak_bytes: int | None = None

    @property
    def all_converged(self) -> bool:
        """Every sample met the tolerance."""
        return self.seconds is not None and self.converged == self.batch


def entries(spec: CaseSpec) -> list[Entry]:
    """Every solver of ours with its defaults, newton-krylov also with its trust region, Anderson
    also with memory n on the hard cases (there it needs as many differences as unknowns), and
    every peer with its defaults."""
    out = [Entry(name, name) for name, info in SOLVERS.items() if info.family == "deq"]
    at = [e.name for e in out].index("newton-krylov") + 1
    out.insert(at, Entry("newton-krylov tr", "newton-krylov", {"globalisation": "trust-region"}))
    if spec.name.startswith("hard"):
        at = [e.name for e in out].index("anderson") + 1
        out.insert(at, Entry(f"anderson m={spec.n}", "anderson", {"m": spec.n}))
    out += [Entry(name, name) for name, info in SOLVERS.items() if info.family != "deq"]
    return out


def build(spec: CaseSpec, device: torch.device) -> Problem:
    """The case's tanh layer, drawn in float64 on the CPU from fixed seeds, moved to ``device``."""
    gen = torch.Generator().manual_seed(20240601)
    f64 = torch.float64
    n = spec.n
    if spec.weights == "gaussian":
        W = torch.randn(n, n, generator=gen, dtype=f64)
        W *= 0.95 / torch.linalg.matrix_norm(W, ord=2)
    else:
        q = haar(n, gen)
        if spec.weights == "orthogonal":
            W = 0.999 * q
        else:
            W = (q * torch.linspace(-0.5, 0.995, n, dtype=f64)) @ q.T
    x = spec.x_scale * torch.randn(spec.batch, n, generator=gen, dtype=f64)
    params = {"W": W.to(device), "x": x.to(device)}
    norm = float(torch.linalg.matrix_norm(W, ord=2))
    return Problem(
        name=spec.name,
        kind="tanh_layer",
        form="fixed_point",
        func=tanh_layer_map,
        z0=torch.zeros(spec.batch, n, dtype=f64, device=device),
        params=params,
        description=f"z = tanh(W z + x), n={n}, B={spec.batch}, ‖W‖₂={norm:.4g}",
        batched_params=frozenset({"x"}),
        row_scaled_jacobian=tanh_layer_jacobian,  # as `deq solve` builds a tanh layer
    )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_f_seconds(problem: Problem, repeat: int = 50) -> float:
    """Median time of one evaluation of the map itself, without counting or solver work."""
    gen = torch.Generator().manual_seed(1)
    z = (0.5 * torch.randn(problem.z0.shape, generator=gen, dtype=problem.dtype)).to(problem.device)
    for _ in range(5):
        tanh_layer_map(z, problem.params)
    times = []
    for _ in range(repeat):
        _sync(problem.device)
        start = time.perf_counter()
        tanh_layer_map(z, problem.params)
        _sync(problem.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def overhead(problem: Problem, name: str, pairs: int) -> tuple[float, float, float, int]:
    """Median of time / (nfev × bare f) over ``pairs`` runs, each paired with a fresh measurement
    of one bare evaluation of f taken just before it (the machine's speed drifts between the two
    otherwise). Returns (ratio, median run time, median bare f, nfev)."""
    stop = StopRule(atol=ATOL, max_iter=MAX_ITER)
    ratios, times, bares, nfev = [], [], [], 0
    for _ in range(pairs):
        bare = bare_f_seconds(problem, repeat=15)
        result = run(problem, make_solver(name), stop)
        nfev = result.counts.totals()["nfev"]
        ratios.append(result.wall_time / (nfev * bare))
        times.append(result.wall_time)
        bares.append(bare)
    return statistics.median(ratios), statistics.median(times), statistics.median(bares), nfev


def state_bytes(problem: Problem, entry: Entry) -> int | None:
    """Bytes of the solver's state tensors beyond z and g, after a few steps (ours only)."""
    if entry.family != "deq":
        return None
    solver = make_solver(entry.name, entry.options)
    state = solver.init(problem, problem.z0)
    for _ in range(3):
        state = solver.step(problem, state)
    return _tensor_bytes(state, skip={"z", "g"})


def _tensor_bytes(obj: Any, skip: set[str] = frozenset(), seen: set[int] | None = None) -> int:
    seen = set() if seen is None else seen
    total = 0
    if isinstance(obj, torch.Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if dataclasses.is_dataclass(obj) and isinstance(obj, State):
        for f in dataclasses.fields(obj):
            if f.name not in skip:
                total += _tensor_bytes(getattr(obj, f.name), seen=seen)
    return total


def measure(
    problem: Problem, entry: Entry, repeat: int, budget: float, memory: bool
) -> tuple[Row, SolveResult | None]:
    """Warm up, then time up to ``repeat`` runs (fewer once ``budget`` seconds are spent)."""
    row = Row(entry.label, entry.family, batch=problem.batch)
    stop = StopRule(atol=ATOL, max_iter=MAX_ITER)
    try:
        run(problem, make_solver(entry.name, entry.options), StopRule(atol=ATOL, max_iter=2))
        results: list[SolveResult] = []
        spent = 0.0
        for _ in range(repeat):
            result = run(problem, make_solver(entry.name, entry.options), stop)
            results.append(result)
            spent += result.wall_time
            if spent > budget:
                break
        if memory:
            row.peak_bytes, row.state_bytes = _memory(problem, entry, stop)
    except (DeqError, RuntimeError, MemoryError) as exc:
        row.error = f"{type(exc).__name__}: {exc}".splitlines()[0][:100]
        return row, None
    last = results[-1]
    totals = last.counts.totals()
    row.seconds = statistics.median(r.wall_time for r in results)
    row.runs = len(results)
    row.iterations = last.nit
    row.nfev, row.njev, row.jvp = totals["nfev"], totals["njev"], totals["jvp"]
    row.converged = sum(s.ok for s in last.sample_status)
    row.status = last.status.value
    return row, last


def _memory(problem: Problem, entry: Entry, stop: StopRule) -> tuple[int | None, int | None]:
    """Peak extra memory of one run on CUDA (allocator peak), and the solver's state bytes."""
    peak = None
    if problem.device.type == "cuda":
        torch.cuda.synchronize(problem.device)
        base = torch.cuda.memory_allocated(problem.device)
        torch.cuda.reset_peak_memory_stats(problem.device)
        run(problem, make_solver(entry.name, entry.options), stop)
        peak = torch.cuda.max_memory_allocated(problem.device) - base
    return peak, state_bytes(problem, entry)


def _best(rows: list[Row], family: str | None, *, ours: bool) -> Row | None:
    pool = [r for r in rows if r.seconds is not None]
    pool = [r for r in pool if (r.family == "deq") == ours]
    if family is not None:
        pool = [r for r in pool if r.family == family]
    converged = [r for r in pool if r.all_converged]
    candidates = converged or pool
    return min(candidates, key=lambda r: r.seconds or 0.0, default=None)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def print_case(spec: CaseSpec, problem: Problem, rows: list[Row], memory: bool) -> dict:
    """Print the table and the ratios of one case; return the summary for JSON."""
    print(f"\n== {spec.name}: {problem.description}, atol {ATOL:g}, max_iter {MAX_ITER}")
    header = f"{'solver':<26} {'time':>9} {'runs':>4} {'iters':>6} {'nfev':>7} {'njev':>5} {'jvp':>6} {'conv':>7}  status"
    if memory:
        header += f"  {'cuda peak MiB':>13} {'state MiB':>9}"
    print(header)
    for r in rows:
        if r.seconds is None:
            print(f"{r.label:<26} {'-':>9}  {r.error}")
            continue
        line = (
            f"{r.label:<26} {r.seconds:>8.3f}s {r.runs:>4} {r.iterations:>6} {r.nfev:>7} "
            f"{r.njev:>5} {r.jvp:>6} {r.converged:>3}/{r.batch:<3}  {r.status}"
        )
        if memory:
            line += f"  {_mib(r.peak_bytes):>13} {_mib(r.state_bytes):>9}"
        print(line)
    summary: dict[str, Any] = {}
    ours = _best(rows, None, ours=True)
    for label, family in (("torchdeq", "torchdeq"), ("any peer", None)):
        peer = _best(rows, family, ours=False)
        if ours is None or peer is None or not ours.seconds:
            continue
        ratio = (peer.seconds or 0.0) / ours.seconds
        peer_note = "" if peer.all_converged else " (no peer converged on every sample)"
        print(
            f"best of ours: {ours.label} {ours.seconds:.3f}s ({ours.converged}/{ours.batch}); "
            f"best {label}: {peer.label} {peer.seconds:.3f}s{peer_note}; "
            f"their time / ours = {ratio:.2f}"
        )
        summary[f"speedup_vs_{family or 'peers'}"] = ratio
        summary[f"best_{family or 'peer'}"] = peer.label
    if ours is not None:
        summary["best_ours"] = ours.label
    return summary


def print_targets(case: str, summary: dict, rows: list[Row]) -> list[str]:
    """Check the case's targets; return lines saying met or missed (and by how much)."""
    lines = []
    ours = _best(rows, None, ours=True)
    ratio = summary.get("speedup_vs_torchdeq")
    if case.startswith("hard") and ratio is not None and ours is not None:
        ok = ratio >= HARD_SPEEDUP_TARGET and ours.all_converged
        lines.append(
            f"{case}: best of ours {ratio:.2f}× faster than torchdeq's best, "
            f"{ours.converged}/{ours.batch} converged (target ≥ {HARD_SPEEDUP_TARGET:g}× and all): "
            + ("met" if ok else "MISSED")
        )
    if case == "easy" and ratio is not None:
        lines.append(
            f"easy: torchdeq's fastest / ours = {ratio:.2f} (target ≥ 1): "
            + ("met" if ratio >= 1 else f"MISSED by {(1 / ratio - 1) * 100:.0f}%")
        )
    for name, target in OVERHEAD_TARGETS.items():
        value = summary.get(f"overhead_{name}")
        if value is not None:
            lines.append(
                f"{case}: {name} overhead {value:.2f} (target ≤ {target}): "
                + ("met" if value <= target else f"MISSED by {value - target:.2f}")
            )
    return lines


def main() -> None:
    """Run the selected cases and print tables, ratios and targets."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per solver (≥ 3)")
    parser.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    parser.add_argument("--solvers", default="", help="only these labels (comma-separated)")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run: development")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch.set_num_threads(N); 0 keeps torch's default. Prefer 0 or 1: with some MKL builds "
        "an explicit N > 1 makes batched LU fail (MKL DLASWP errors) and hang",
    )
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per solver per case")
    parser.add_argument("--json", default="", help="also write the results to this file")
    family = parser.add_argument_group("the hard-layer family (bench/deq_family.py)")
    family.add_argument("--family", action="store_true", help="run the family instead of --cases")
    family.add_argument("--types", default="", help="only these layer types (comma-separated)")
    family.add_argument("--seeds", default="", help="seeds (comma-separated; default 0,1,2)")
    family.add_argument(
        "--broyden-gib", type=float, default=2.0, help="memory cap of torchdeq's broyden (GiB)"
    )
    family.add_argument(
        "--no-first-solve",
        action="store_true",
        help="skip measuring each solver's first solve in a fresh process (CPU only)",
    )
    args = parser.parse_args()

    if args.family and not args.threads:
        # One thread unless asked: on a shared machine OpenMP's spinning threads make two-thread
        # timings of small solves vary a hundredfold; both sides run under the same setting.
        args.threads = 1
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    repeat = 1 if args.quick else max(args.repeat, 1)
    if args.family:
        run_family_from(args, device, repeat)
        return
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    only = {s.strip() for s in args.solvers.split(",") if s.strip()}
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    print(
        f"deq solver suite: device {device}{' (' + gpu + ')' if gpu else ''}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
        f"repeats {repeat}, budget {args.budget:g}s per solver{', QUICK sizes' if args.quick else ''}"
    )

    report: dict[str, Any] = {"device": str(device), "gpu": gpu, "cases": {}}
    verdicts: list[str] = []
    for case in names:
        spec = CASES[case]
        if args.quick:
            spec = dataclasses.replace(spec, n=spec.n // 4, batch=max(spec.batch // 4, 2))
        problem = build(spec, device)
        memory = case == "large"
        rows: list[Row] = []
        for entry in entries(spec):
            if only and entry.label not in only:
                continue
            row, _ = measure(problem, entry, repeat, args.budget, memory)
            rows.append(row)
            print(f"  .. {row.label}: {row.seconds if row.seconds is not None else row.error}")
        summary = print_case(spec, problem, rows, memory)
        if case == "large":
            for name in OVERHEAD_TARGETS:
                if any(r.label == name and r.seconds for r in rows):
                    value, seconds, bare, nfev = overhead(problem, name, max(repeat, 7))
                    summary[f"overhead_{name}"] = value
                    print(
                        f"overhead {name}: median over {max(repeat, 7)} paired runs of "
                        f"time / (nfev × bare f) = {value:.2f} "
                        f"(median {seconds:.4f}s, nfev {nfev}, bare f {bare * 1e3:.3f} ms)"
                    )
            for name, label in (("anderson", "anderson"), ("broyden", "broyden")):
                row = next((r for r in rows if r.label == label), None)
                if row is not None and row.state_bytes is not None:
                    scale = problem.batch * problem.dim * 8
                    print(
                        f"{name} state beyond z, g: {_mib(row.state_bytes)} MiB "
                        f"= {row.state_bytes / scale:.1f} × B·n·8 bytes (O(m·B·n), no Jacobians)"
                    )
        verdicts += print_targets(case, summary, rows)
        report["cases"][case] = {
            "spec": dataclasses.asdict(spec),
            "rows": [dataclasses.asdict(r) for r in rows],
            "summary": summary,
        }
    if verdicts:
        print("\n== targets")
        for line in verdicts:
            print(line)
    report["targets"] = verdicts
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


def run_family_from(args: argparse.Namespace, device: torch.device, repeat: int) -> None:
    """The hard-layer family with this command line's settings."""
    from deq_family import SEEDS, TYPES, run_family

    budget_given = "--budget" in sys.argv
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] or (
        [SEEDS[0]] if args.quick else list(SEEDS)
    )
    report = run_family(
        device=device,
        quick=args.quick,
        budget=args.budget if budget_given else (5.0 if args.quick else 20.0),
        repeat=repeat,
        types=[t.strip() for t in args.types.split(",") if t.strip()] or list(TYPES),
        seeds=seeds,
        only={s.strip() for s in args.solvers.split(",") if s.strip()},
        broyden_gib=args.broyden_gib,
        first_solve=not args.no_first_solve,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
