"""The hard-layer family: our solvers against torchdeq's on many tanh layers, case by case.

Each layer type is z = tanh(W z + x) in float64, drawn for three seeds (W, the inputs x and the
orthonormal bases all come from the seed). The hard types cover the regimes where plain
iteration barely converges:

    orth-999       W = 0.999·Q (a near-isometry)                     n=256,  B=16, x ~ 0.01·N(0, 1)
    orth-99        W = 0.99·Q                                         n=1024, B=32, x ~ 0.03
    orth-99-2048   W = 0.99·Q                                         n=2048, B=8,  x ~ 0.01
    sym-995        symmetric, eigenvalues evenly in [−0.5, 0.995]     n=256,  B=64, x ~ 0.01
    sym-998        symmetric, eigenvalues evenly in [−0.9, 0.998]     n=1024, B=16, x ~ 0.03
    rot-fast       pairs r·e^{±iθ}, r in [0.95, 0.998], θ in (0, π)   n=512,  B=32, x ~ 0.03
    rot-slow       pairs r·e^{±iθ}, r in [0.99, 0.998], θ in (0, 0.2) n=1024, B=8,  x ~ 0.01
    nonnormal      Q (D + 1.0·N/√n) Qᵀ, D in [−0.5, 0.98]             n=512,  B=32, x ~ 0.1
    nonnormal-x1   Q (D + 2.0·N/√n) Qᵀ, D in [−0.5, 0.995]            n=512,  B=16, x ~ 1

(Q Haar-random orthogonal, N strictly upper triangular with N(0, 1) entries: ρ(W) = max|D| < 1
while ‖W‖₂ > 1 (about 1.8 and 3.3), and powers of W grow before they decay. Larger inputs
saturate tanh and make a layer easier, so the x ~ N(0, 1) hard type needs the stronger
non-normality to stay hard.) The easy type is the spectrally normalised layer (W Gaussian with
‖W‖₂ = 0.95, n=512, B=32, x ~ N(0, 1)).

Per case, every solver runs to ‖z − f(z)‖ ≤ 1e-8 on every sample (float64) within a time budget:

- torchdeq's anderson, broyden and fixed_point_iter are called directly, as torchdeq's users call
  them: ``get_solver(name)(f, z0, max_iter=…, tol=1e-8, stop_mode='abs')`` on the plain torch
  function f(z) = tanh(z Wᵀ + x) under ``torch.no_grad()``. An untimed first run finds how many
  iterations each needs; the timed runs then get exactly that ``max_iter`` (the most favourable
  setting: torchdeq pads its traces up to ``max_iter`` after it stops). Broyden's memory equals
  ``max_iter``, so its runs are capped at what fits in --broyden-gib of memory. f only checks the
  clock (about 0.1 µs a call) so a run can be cut at the budget. Afterwards the returned z is
  checked: a sample counts as converged only if its own ‖z − f(z)‖ ≤ 1e-8.
- Ours run as `deq solve` users get them: ``deqcli.api.solve`` (config → solver → driver) with
  run.atol 1e-8, run.timeout = the budget, and no diagnostics afterwards.

Times are medians of up to --repeat timed runs (runs are repeated only while they have taken less
than 3 s together), in a process where
every solver has already run once. What a solver pays once per process inside its first solve
(lazy imports, first use of a kernel) is measured separately: each solver's first solve in a fresh
process on probe layers, minus its next solve there. That cost is reported and added to every
case's time, for ours and torchdeq's alike, since a `deq solve` invocation is a fresh process. What
a first solve loads depends on the path it takes, so the hard cases are charged the larger cost on
two hard probes (n=128 and n=1100, beyond auto's dense limit) and the easy case the cost on an easy
probe (n=128, ‖W‖₂ = 0.95).

Reported per case: torchdeq's best (fastest with every sample converged), our best, their ratio,
``auto`` alone against torchdeq's best, and whether the targets hold: on every hard case our best is
≥ 5× faster than torchdeq's best with every sample converged, ``auto`` ≥ 3×; on the easy case
``auto`` is never slower than torchdeq's best. A torchdeq solver that does not converge within the
budget counts as taking the budget, so the ratio is then a lower bound (marked ≥). Geometric means
over the hard cases close the table.

    python bench/deq_suite.py --family [--quick] [--budget 20] [--repeat 3] [--types orth-999,easy]
                              [--seeds 0,1,2] [--solvers auto,torchdeq:anderson] [--json out.json]

--quick shrinks every type (n/4, B/4), uses one seed, one run and a short budget: development only.
"""

from __future__ import annotations

import argparse
import compileall
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from deqcli.api import solve  # noqa: E402
from deqcli.config import Config  # noqa: E402
from deqcli.problems.base import Problem  # noqa: E402
from deqcli.problems.tanh_layer import tanh_layer_jacobian, tanh_layer_map  # noqa: E402
from deqcli.solvers import SOLVERS  # noqa: E402

ATOL = 1e-8
SEEDS = (0, 1, 2)
BEST_TARGET = 5.0  # our best against torchdeq's best, every hard case
AUTO_TARGET = 3.0  # auto against torchdeq's best, every hard case
EASY_TARGET = 1.0  # auto against torchdeq's best on the easy type: never slower
TORCHDEQ = ("anderson", "broyden", "fixed_point_iter")
OURS = tuple(name for name, info in SOLVERS.items() if info.family == "deq")
# Iteration budget of our solvers: effectively unlimited, the time budget (run.timeout) decides.
OUR_MAX_ITER = 10_000_000
# Iteration budget of torchdeq's anderson and fixed_point_iter in the untimed first run.
TORCHDEQ_MAX_ITER = 10_000_000
# Further timed runs (up to --repeat) only while the runs so far took less than this: repeats
# steady the short runs, where noise matters; a long run is timed once.
REPEAT_WINDOW = 3.0
# A timed torchdeq run (known to converge from its first run) is cut only past this × the budget.
TIMED_SLACK = 3.0


@dataclass(frozen=True)
class LayerType:
    """One kind of hard (or easy) tanh layer: its size, how W is drawn and the input scale.

    ``weights``: ``orthogonal`` (``radius``·Q), ``symmetric`` (eigenvalues evenly over
    ``spectrum``), ``rotation`` (2×2 blocks r·R(θ), r evenly over ``spectrum``, θ uniform in
    ``angles``), ``schur`` (Q (D + ``coupling``·N/√n) Qᵀ, D evenly over ``spectrum``) or
    ``gaussian`` (scaled to ‖W‖₂ = ``radius``).
    """

    name: str
    n: int
    batch: int
    weights: str
    x_scale: float
    radius: float = 0.0
    spectrum: tuple[float, float] = (0.0, 0.0)
    angles: tuple[float, float] = (0.0, math.pi)
    coupling: float = 0.0
    hard: bool = True


FAMILY = [
    LayerType("orth-999", 256, 16, "orthogonal", 0.01, radius=0.999),
    LayerType("orth-99", 1024, 32, "orthogonal", 0.03, radius=0.99),
    LayerType("orth-99-2048", 2048, 8, "orthogonal", 0.01, radius=0.99),
    LayerType("sym-995", 256, 64, "symmetric", 0.01, spectrum=(-0.5, 0.995)),
    LayerType("sym-998", 1024, 16, "symmetric", 0.03, spectrum=(-0.9, 0.998)),
    LayerType("rot-fast", 512, 32, "rotation", 0.03, spectrum=(0.95, 0.998)),
    LayerType("rot-slow", 1024, 8, "rotation", 0.01, spectrum=(0.99, 0.998), angles=(0.0, 0.2)),
    LayerType("nonnormal", 512, 32, "schur", 0.1, spectrum=(-0.5, 0.98), coupling=1.0),
    LayerType("nonnormal-x1", 512, 16, "schur", 1.0, spectrum=(-0.5, 0.995), coupling=2.0),
    LayerType("easy", 512, 32, "gaussian", 1.0, radius=0.95, hard=False),
]
TYPES = {t.name: t for t in FAMILY}

# The probes for the first-solve cost: two hard ones, small (dense paths) and beyond auto's dense
# limit, and an easy one. What a first solve loads depends on the path it takes (auto stays with
# plain iteration on an easy layer, and never loads its probes or Newton there), so a hard case is
# charged the larger cost of the hard probes and the easy case the easy probe's.
PROBES = {
    "small": LayerType("probe-small", 128, 4, "orthogonal", 0.01, radius=0.999),
    "large": LayerType("probe-large", 1100, 2, "orthogonal", 0.01, radius=0.999),
    "easy": LayerType("probe-easy", 128, 4, "gaussian", 1.0, radius=0.95, hard=False),
}
# Iterations of a probe solve: enough to reach every code path once (auto runs its first stage
# for up to 30 iterations before it may switch), few enough to keep the probes short.
PROBE_MAX_ITER = {"auto": 45}
# Where costs[label] keeps the one-time cost for hard cases (True) and for the easy one (False).
COST_KEY = {True: "cost", False: "cost_easy"}
PROBE_DEFAULT_ITER = 8


# -- the layers ---------------------------------------------------------------------------------


def haar(n: int, gen: torch.Generator) -> torch.Tensor:
    """A Haar-distributed random orthogonal n×n matrix (float64, CPU)."""
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def spectral_norm(w: torch.Tensor) -> float:
    """‖W‖₂ exactly (an SVD) up to n = 1024; beyond, a lower bound by 60 power steps on WᵀW."""
    if w.shape[0] <= 1024:
        return float(torch.linalg.matrix_norm(w, ord=2))
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(w.shape[0], generator=gen, dtype=w.dtype)
    for _ in range(60):
        v = w.T @ (w @ v)
        v = v / torch.linalg.vector_norm(v)
    return float(torch.linalg.vector_norm(w @ v))


def draw_weights(t: LayerType, gen: torch.Generator) -> tuple[torch.Tensor, float, float]:
    """W for layer type ``t`` and its spectral radius and 2-norm (known by construction, or
    computed where they are not)."""
    n, f64 = t.n, torch.float64
    if t.weights == "gaussian":
        w = torch.randn(n, n, generator=gen, dtype=f64)
        w *= t.radius / torch.linalg.matrix_norm(w, ord=2)
        return w, math.nan, t.radius
    q = haar(n, gen)
    if t.weights == "orthogonal":
        return t.radius * q, t.radius, t.radius
    lo, hi = t.spectrum
    if t.weights == "symmetric":
        eig = torch.linspace(lo, hi, n, dtype=f64)
        return (q * eig) @ q.T, max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
    if t.weights == "rotation":
        if n % 2:
            raise ValueError(f"{t.name}: rotation layers need an even n, got {n}")
        radii = torch.linspace(lo, hi, n // 2, dtype=f64)
        a0, a1 = t.angles
        theta = a0 + (a1 - a0) * torch.rand(n // 2, generator=gen, dtype=f64)
        c, s = radii * torch.cos(theta), radii * torch.sin(theta)
        blocks = torch.zeros(n, n, dtype=f64)
        idx = torch.arange(0, n, 2)
        blocks[idx, idx] = c
        blocks[idx + 1, idx + 1] = c
        blocks[idx, idx + 1] = -s
        blocks[idx + 1, idx] = s
        return q @ blocks @ q.T, hi, hi
    if t.weights == "schur":
        upper = torch.triu(torch.randn(n, n, generator=gen, dtype=f64), diagonal=1)
        tri = torch.diag(torch.linspace(lo, hi, n, dtype=f64)) + t.coupling / math.sqrt(n) * upper
        w = q @ tri @ q.T
        return w, max(abs(lo), abs(hi)), spectral_norm(w)
    raise ValueError(f"{t.name}: unknown weights '{t.weights}'")


def build_layer(t: LayerType, seed: int, device: torch.device) -> Problem:
    """The layer of type ``t`` for ``seed`` (drawn in float64 on the CPU), moved to ``device``."""
    gen = torch.Generator().manual_seed(1_000 * seed + sum(map(ord, t.name)))
    w, rho, norm = draw_weights(t, gen)
    x = t.x_scale * torch.randn(t.batch, t.n, generator=gen, dtype=torch.float64)
    rho_text = "" if math.isnan(rho) else f"ρ(W)={rho:.4g}, "
    return Problem(
        name=f"{t.name}/s{seed}",
        kind="tanh_layer",
        form="fixed_point",
        func=tanh_layer_map,
        z0=torch.zeros(t.batch, t.n, dtype=torch.float64, device=device),
        params={"W": w.to(device), "x": x.to(device)},
        description=f"n={t.n}, B={t.batch}, {rho_text}‖W‖₂={norm:.4g}, x scale {t.x_scale:g}",
        batched_params=frozenset({"x"}),
        row_scaled_jacobian=tanh_layer_jacobian,  # as `deq solve` builds a tanh layer
    )


def shrink(t: LayerType) -> LayerType:
    """The --quick version of a type: n/4 (even), B/4 (at least 2)."""
    n = max(2 * (t.n // 8), 16)
    return dataclasses.replace(t, n=n, batch=max(t.batch // 4, 2))


# -- timing ---------------------------------------------------------------------------------------


@dataclass
class Row:
    """What one solver did on one case (times in seconds, without the first-solve cost)."""

    solver: str
    family: str  # "deq" or "torchdeq"
    seconds: float | None = None
    runs: int = 0
    iterations: int = 0
    converged: int = 0
    batch: int = 0
    status: str = ""
    note: str = ""
    out_of_budget: bool = False

    @property
    def all_converged(self) -> bool:
        """Every sample met the tolerance (checked on the returned z)."""
        return self.seconds is not None and self.converged == self.batch


def sync(device: torch.device) -> None:
    """Wait for the device (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def converged_samples(problem: Problem, z: torch.Tensor) -> int:
    """How many samples of ``z`` meet ‖z − f(z)‖ ≤ ATOL, recomputed here for every solver."""
    with torch.no_grad():
        res = torch.linalg.vector_norm(z - tanh_layer_map(z, problem.params), dim=1)
    return int((res <= ATOL).sum())


class OutOfBudget(Exception):
    """Raised inside a torchdeq run when its time budget is spent."""


class Enough(Exception):
    """Raised inside the untimed first torchdeq run once every sample has met the tolerance."""


def deadline_map(
    params: dict[str, torch.Tensor], deadline: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The plain map z ↦ tanh(z Wᵀ + x), raising OutOfBudget once ``deadline`` has passed."""

    def f(z: torch.Tensor) -> torch.Tensor:
        if time.perf_counter() > deadline:
            raise OutOfBudget
        return tanh_layer_map(z, params)

    return f


def torchdeq_row(
    name: str, problem: Problem, budget: float, repeat: int, broyden_gib: float
) -> Row:
    """Time torchdeq's solver ``name`` called directly on the plain map (see the module notes)."""
    from torchdeq.solver import get_solver

    solver = get_solver(name)
    row = Row(f"torchdeq:{name}", "torchdeq", batch=problem.batch)
    params, z0, device = problem.params, problem.z0, problem.device
    cap = TORCHDEQ_MAX_ITER
    if name == "broyden":
        # Its memory is 2·B·n·max_iter numbers: cap max_iter at what fits.
        cap = int(broyden_gib * 2**30 // (2 * problem.batch * problem.dim * z0.element_size()))

    # Untimed first run: count the evaluations until every sample meets the tolerance.
    evals = 0
    start = time.perf_counter()

    def probe(z: torch.Tensor) -> torch.Tensor:
        nonlocal evals
        if time.perf_counter() - start > budget:
            raise OutOfBudget
        fz = tanh_layer_map(z, params)
        evals += 1
        if float(torch.linalg.vector_norm(fz - z, dim=1).max()) < ATOL:
            raise Enough
        return fz

    try:
        with torch.no_grad():
            solver(probe, z0, max_iter=cap, tol=ATOL, stop_mode="abs")
        row.note = f"stopped by itself after {evals} evaluations without converging"
        max_iter = cap
    except Enough:
        max_iter = evals + 1
    except OutOfBudget:
        row.seconds, row.runs, row.iterations, row.out_of_budget = budget, 0, evals, True
        row.status, row.note = "budget", f"not converged within {budget:g}s ({evals} evaluations)"
        return row

    times: list[float] = []
    z = z0
    for _ in range(max(repeat, 1)):
        # The first run decided convergence within the budget; a timed run of the same solve
        # that a busy machine slows past it is still timed (the cut is only a safety net).
        f = deadline_map(params, time.perf_counter() + TIMED_SLACK * budget)
        sync(device)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                z, _, _ = solver(f, z0, max_iter=max_iter, tol=ATOL, stop_mode="abs")
        except OutOfBudget:
            row.seconds, row.runs, row.out_of_budget = budget, len(times), True
            row.status, row.note = "budget", f"a timed run took over {TIMED_SLACK:g}× the budget"
            return row
        sync(device)
        times.append(time.perf_counter() - t0)
        if sum(times) > REPEAT_WINDOW:
            break
    row.seconds = statistics.median(times)
    row.runs = len(times)
    row.iterations = min(evals, max_iter)
    row.converged = converged_samples(problem, z)
    row.status = "converged" if row.converged == problem.batch else "not converged"
    if name == "broyden" and max_iter == cap and not row.all_converged:
        row.note = row.note or f"memory cap: max_iter {cap}"
    return row


def solver_config(name: str, problem: Problem, budget: float) -> Config:
    """The config `deq solve` would read for this run (the layer itself is passed built)."""
    return Config.model_validate(
        {
            "problem": {"kind": "tanh_layer", "dim": problem.dim, "batch": problem.batch, "W": 0.0},
            "solver": {"name": name},
            "run": {"atol": ATOL, "max_iter": OUR_MAX_ITER, "timeout": budget},
        }
    )


def ours_row(name: str, problem: Problem, budget: float, repeat: int) -> Row:
    """Time our solver ``name`` through deqcli.api.solve, as `deq solve` runs it."""
    row = Row(name, "deq", batch=problem.batch)
    cfg = solver_config(name, problem, budget)
    times: list[float] = []
    result = None
    try:
        for _ in range(max(repeat, 1)):
            sync(problem.device)
            t0 = time.perf_counter()
            result = solve(cfg, problem=problem, diagnostics=False)
            sync(problem.device)
            times.append(time.perf_counter() - t0)
            if sum(times) > REPEAT_WINDOW:
                break
    except Exception as exc:  # a failing solver is a row, not the end of the run
        row.note = f"{type(exc).__name__}: {exc}".splitlines()[0][:90]
        row.status = "error"
        return row
    if result is None:
        return row
    row.seconds = statistics.median(times)
    row.runs = len(times)
    row.iterations = max(result.iterations)
    row.converged = converged_samples(problem, result.solution)
    row.status = result.status.value
    row.out_of_budget = result.status.value == "timeout"
    auto = result.extra.get("auto")
    if auto:
        row.note = "→".join(auto["methods"])
    return row


def warm_up(device: torch.device) -> None:
    """Run every solver once on a tiny layer so the timed runs see a warm process."""
    t = LayerType("warm-up", 24, 2, "orthogonal", 0.01, radius=0.9)
    problem = build_layer(t, 0, device)
    for name in OURS:
        try:
            solve(solver_config(name, problem, 10.0), problem=problem, diagnostics=False)
        except Exception:  # the timed run reports it
            continue
    for name in TORCHDEQ:
        torchdeq_row(name, problem, 10.0, 1, 0.1)


# -- first solve in a fresh process -------------------------------------------------------------


def first_solve_child(label: str, probe: str) -> dict[str, float]:
    """In this (fresh) process: time the first, second and third solve of ``label`` on a probe."""
    t = PROBES[probe]
    problem = build_layer(t, 0, torch.device("cpu"))
    if label.startswith("torchdeq:"):
        from torchdeq.solver import get_solver  # importing is not part of a solve

        td_solver = get_solver(label.split(":", 1)[1])
    else:
        from deqcli.solvers import make_solver

        # Importing the solver's module is not part of a solve either (as for torchdeq above);
        # what its first solve loads beyond that (auto's stages, autodiff) is.
        solver = make_solver(label)
        if solver.method_path():
            solver.implementation()
    f = deadline_map(problem.params, math.inf)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        if label.startswith("torchdeq:"):
            with torch.no_grad():
                td_solver(
                    f,
                    problem.z0,
                    max_iter=PROBE_DEFAULT_ITER,
                    tol=ATOL,
                    stop_mode="abs",
                )
        else:
            cfg = solver_config(label, problem, 60.0)
            cfg.run.max_iter = PROBE_MAX_ITER.get(label, PROBE_DEFAULT_ITER)
            solve(cfg, problem=problem, diagnostics=False)
        times.append(time.perf_counter() - t0)
    return {"first": times[0], "warm": min(times[1:])}


def first_solve_costs(labels: list[str], probes: list[str]) -> dict[str, dict[str, Any]]:
    """Each solver's one-time cost per process: first solve minus a warm one, fresh processes."""
    # An installed deqcli has its bytecode compiled (pip does it), as torchdeq has: compile ours
    # first, or a machine with PYTHONDONTWRITEBYTECODE set charges each first solve the compiling.
    compileall.compile_dir(ROOT / "deqcli", quiet=1)
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        per_probe: dict[str, dict[str, float]] = {}
        for probe in probes:
            cmd = [sys.executable, str(Path(__file__)), "--first-solve", label, "--probe", probe]
            cmd += ["--threads", str(torch.get_num_threads())]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["failed"])[-1]
                per_probe[probe] = {"error": tail}  # type: ignore[dict-item]
                continue
            per_probe[probe] = json.loads(done.stdout.strip().splitlines()[-1])
        out[label] = {"probes": per_probe}
        for regime in (True, False):
            costs = [
                max(0.0, p["first"] - p["warm"])
                for probe, p in per_probe.items()
                if "first" in p and PROBES[probe].hard == regime
            ]
            out[label][COST_KEY[regime]] = max(costs, default=0.0)
        print(
            f"  first solve {label:<26} "
            + "  ".join(
                f"{probe}: {p['first']:.3f}s (warm {p['warm']:.3f}s)"
                if "first" in p
                else f"{probe}: {p.get('error')}"
                for probe, p in per_probe.items()
            )
            + f"  → one-time cost {out[label]['cost']:.3f}s (easy: {out[label]['cost_easy']:.3f}s)",
            flush=True,
        )
    return out


# -- the report -----------------------------------------------------------------------------------


@dataclass
class CaseResult:
    """One case (layer type × seed): every solver's row and the comparison."""

    layer: str
    seed: int
    hard: bool
    description: str
    rows: list[Row] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    verdicts: list[str] = field(default_factory=list)


def one_time(solver: str, costs: dict[str, dict[str, Any]], hard: bool) -> float:
    """The solver's one-time cost per process on a case of this regime (see PROBES)."""
    return costs.get(solver, {}).get(COST_KEY[hard], 0.0)


def total(row: Row, costs: dict[str, dict[str, Any]], hard: bool) -> float | None:
    """A row's time as users get it: the warm time plus the solver's one-time cost per process."""
    if row.seconds is None:
        return None
    return row.seconds + one_time(row.solver, costs, hard)


def best(rows: list[Row], family: str, costs: dict[str, dict[str, Any]], hard: bool) -> Row | None:
    """The fastest row of ``family`` with every sample converged."""
    pool = [r for r in rows if r.family == family and r.all_converged]
    return min(pool, key=lambda r: total(r, costs, hard) or math.inf, default=None)


def compare(case: CaseResult, budget: float, costs: dict[str, dict[str, Any]]) -> None:
    """Fill the case's summary (best of each side, ratios) and its target verdicts."""
    rows = case.rows
    hard = case.hard
    theirs = best(rows, "torchdeq", costs, hard)
    ours = best(rows, "deq", costs, hard)
    auto = next((r for r in rows if r.solver == "auto"), None)
    tried = [r for r in rows if r.family == "torchdeq"]
    # No torchdeq solver converged: it needs more than the budget, so ratios are lower bounds.
    bound = theirs is None and bool(tried)
    their_time = total(theirs, costs, hard) if theirs is not None else (budget if bound else None)
    s = case.summary
    s["torchdeq_best"] = theirs.solver if theirs else None
    s["torchdeq_seconds"] = their_time
    s["lower_bound"] = bound
    s["ours_best"] = ours.solver if ours else None
    s["ours_seconds"] = total(ours, costs, hard) if ours else None
    s["ratio"] = (their_time / s["ours_seconds"]) if their_time and s["ours_seconds"] else None
    auto_ok = auto is not None and auto.all_converged
    s["auto_seconds"] = total(auto, costs, hard) if auto_ok and auto is not None else None
    s["auto_ratio"] = (their_time / s["auto_seconds"]) if their_time and s["auto_seconds"] else None
    ge = "≥" if bound else ""
    name = f"{case.layer}/s{case.seed}"
    if their_time is None:
        case.verdicts.append(f"{name}: torchdeq was not run; no ratio")
        return
    checks = [("our best", s["ratio"], BEST_TARGET)] if case.hard else []
    checks.append(("auto", s["auto_ratio"], AUTO_TARGET if case.hard else EASY_TARGET))
    for who, ratio, target in checks:
        if who == "auto" and auto is None:
            case.verdicts.append(f"{name}: auto was not run")
            continue
        if ratio is None:
            why = "none of ours" if who == "our best" else "auto"
            case.verdicts.append(f"{name}: {why} did not converge on every sample: MISSED")
            continue
        verdict = "met" if ratio >= target else "MISSED"
        case.verdicts.append(
            f"{name}: {who} {ge}{ratio:.2f}× faster than torchdeq's best "
            f"(target ≥ {target:g}×, every sample converged): {verdict}"
        )


def fmt_time(value: float | None, bound: bool = False) -> str:
    """Seconds for the table, '-' when there is none."""
    if value is None:
        return "-"
    return f"{'>' if bound else ''}{value:.3f}s"


def fmt_ratio(value: float | None, bound: bool = False) -> str:
    """A ratio for the table, with ≥ when it is a lower bound."""
    return "-" if value is None else f"{'≥' if bound else ''}{value:.2f}"


def geomean(values: list[float]) -> float | None:
    """The geometric mean of positive values (None for none)."""
    return math.exp(statistics.fmean(math.log(v) for v in values)) if values else None


def print_table(cases: list[CaseResult]) -> dict[str, Any]:
    """The family table (one line per case), geometric means; returns them for JSON."""
    print(
        f"\n{'case':<20} {'torchdeq best':<26} {'time':>9}   {'our best':<15} {'time':>9} "
        f"{'ratio':>7}   {'auto':>9} {'ratio':>7}  auto path"
    )
    for c in cases:
        s, bound = c.summary, c.summary.get("lower_bound", False)
        auto_row = next((r for r in c.rows if r.solver == "auto"), None)
        print(
            f"{c.layer + '/s' + str(c.seed):<20} {s.get('torchdeq_best') or '(none in budget)':<26} "
            f"{fmt_time(s.get('torchdeq_seconds'), bound):>9}   {s.get('ours_best') or '-':<15} "
            f"{fmt_time(s.get('ours_seconds')):>9} {fmt_ratio(s.get('ratio'), bound):>7}   "
            f"{fmt_time(s.get('auto_seconds')):>9} {fmt_ratio(s.get('auto_ratio'), bound):>7}  "
            f"{auto_row.note if auto_row else ''}"
        )
    hard = [c for c in cases if c.hard]
    out: dict[str, Any] = {}
    for key in ("ratio", "auto_ratio"):
        values = [c.summary[key] for c in hard if c.summary.get(key)]
        bounds = sum(1 for c in hard if c.summary.get(key) and c.summary.get("lower_bound"))
        missing = len(hard) - len(values)
        g = geomean(values)
        out[f"geomean_{key}"] = g
        label = "our best / torchdeq's best" if key == "ratio" else "auto / torchdeq's best"
        if g is not None:
            extra = f", {bounds} of them lower bounds" if bounds else ""
            extra += f", {missing} case(s) without a converged run left out" if missing else ""
            print(f"geometric mean over {len(values)} hard cases, {label}: {g:.2f}{extra}")
    return out


def print_rows(case: CaseResult, costs: dict[str, dict[str, Any]]) -> None:
    """Every solver's line for one case."""
    print(f"\n== {case.layer}/s{case.seed}: {case.description}")
    for r in case.rows:
        if r.seconds is None:
            print(f"  {r.solver:<26} {'-':>9}  {r.status} {r.note}")
            continue
        cost = one_time(r.solver, costs, case.hard)
        print(
            f"  {r.solver:<26} {fmt_time(r.seconds, r.out_of_budget):>9} (+{cost:.3f}s first) "
            f"runs {r.runs}  iters {r.iterations:>6}  conv {r.converged:>2}/{r.batch:<2}  "
            f"{r.status} {r.note}",
            flush=True,
        )


def run_family(
    *,
    device: torch.device,
    quick: bool,
    budget: float,
    repeat: int,
    types: list[str],
    seeds: list[int],
    only: set[str],
    broyden_gib: float,
    first_solve: bool,
) -> dict[str, Any]:
    """Run the family and print everything; returns the JSON report."""
    unknown = [t for t in types if t not in TYPES]
    if unknown:
        raise SystemExit(
            f"unknown layer type(s) {', '.join(unknown)}; choose from {', '.join(TYPES)}"
        )
    labels = [n for n in OURS if not only or n in only]
    td = [n for n in TORCHDEQ if not only or f"torchdeq:{n}" in only]
    print(
        f"deq hard-layer family: device {device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, budget {budget:g}s per solver and case, "
        f"up to {repeat} timed runs, seeds {seeds}{', QUICK sizes' if quick else ''}",
        flush=True,
    )
    costs: dict[str, dict[str, Any]] = {}
    if first_solve and device.type == "cpu":
        print("first solve of each solver in a fresh process (one-time cost per `deq solve`):")
        probes = ["small", "easy"] if quick else list(PROBES)
        costs = first_solve_costs(labels + [f"torchdeq:{n}" for n in td], probes)
    warm_up(device)
    cases: list[CaseResult] = []
    for name in types:
        t = shrink(TYPES[name]) if quick else TYPES[name]
        for seed in seeds:
            problem = build_layer(t, seed, device)
            case = CaseResult(t.name, seed, t.hard, problem.description)
            for solver in td:
                case.rows.append(torchdeq_row(solver, problem, budget, repeat, broyden_gib))
            for solver in labels:
                case.rows.append(ours_row(solver, problem, budget, repeat))
            compare(case, budget, costs)
            print_rows(case, costs)
            cases.append(case)
            del problem
    summary = print_table(cases)
    print("\n== targets")
    verdicts = [v for c in cases for v in c.verdicts]
    for line in verdicts:
        print(line)
    missed = sum("MISSED" in v for v in verdicts)
    print(f"{len(verdicts) - missed} of {len(verdicts)} targets met")
    return {
        "device": str(device),
        "budget": budget,
        "quick": quick,
        "first_solve": costs,
        "cases": [dataclasses.asdict(c) for c in cases],
        "summary": summary,
        "targets": verdicts,
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point for the first-solve child processes (the family runs from deq_suite.py)."""
    parser = argparse.ArgumentParser(description="first solve of one solver in a fresh process")
    parser.add_argument("--first-solve", required=True, help="solver label")
    parser.add_argument("--probe", choices=list(PROBES), default="small")
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads(N)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(first_solve_child(args.first_solve, args.probe)))


if __name__ == "__main__":
    main()
