"""Remedy trials: run the candidate remedies of a failed or slow run and report what happened.

The diagnostics plan each sample's remedies (``diagnostics.advice.plan``, kept in the document as
``plan``): measured facts, runnable candidates and suggestions. ``try_remedies`` re-solves the worst
sample that has candidates with each of them — on its own rows only (``Problem.select``), through
the public solver registry and the one driver loop (``solvers.base.run``) — within a budget of
evaluations and seconds; a candidate that works on that sample is then tried on the whole batch when
that is cheap. The outcomes go into the document (``diagnostics.trials``) and the remedies are
composed again: verified ones first, stated as facts. Trials never print and never raise for a
failing candidate.

Budget: each trial may spend ``try_budget`` evaluations (default: the run's own evaluations of
that sample, at least ``try_min_budget``), counted as f-evaluations with a dense Jacobian as n and
a JVP or VJP as one; all trials together get ``try_time`` seconds. A trial that exhausts its
evaluations is stopped and reported so. ``deq solve`` and ``deqcli.solve`` run the trials unless
``--no-try`` (``DiagnosticOptions.trials``); ``compare-solvers`` never does (it is a timing tool).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from deqcli.diagnostics import advice
from deqcli.diagnostics import dynamics as dyn
from deqcli.diagnostics.settings import DEFAULT_OPTIONS
from deqcli.solvers.base import Solver, State, StopRule

if TYPE_CHECKING:
    import torch

    from deqcli.diagnostics.settings import DiagnosticOptions
    from deqcli.problems.base import Counter, Problem
    from deqcli.result import SolveResult

# A trial's solution counts as the located fixed point when within this × max(1, ‖z*‖) of it.
SAME_POINT_RTOL = 1e-6


def cost(counter: Counter, dim: int, row: int) -> int:
    """Evaluations of one sample in f-evaluation units: nfev + jvp + vjp + n·njev."""
    return counter.nfev[row] + counter.jvp[row] + counter.vjp[row] + dim * counter.njev[row]


def result_cost(result: SolveResult, dim: int, row: int) -> int:
    """The same count from a finished result's per-sample counts."""
    c = result.counts
    return c.nfev[row] + c.jvp[row] + c.vjp[row] + dim * c.njev[row]


@dataclass
class MultiplicityNewton(Solver):
    """Newton's step scaled by a root's multiplicity m: z ← z − m·J_g(z)⁻¹g(z).

    At a root of multiplicity m plain Newton converges linearly with rate (m − 1)/m; the scaled
    step restores quadratic convergence. No registered solver takes this step: it exists so the
    diagnostics can check a multiplicity before they name it. Cost per iteration: one Jacobian
    and one evaluation of g.
    """

    name: ClassVar[str] = advice.MULTIPLICITY_STEP
    summary: ClassVar[str] = "Newton with the multiplicity step (diagnostics trials only)"
    m: float = 2.0

    def init(self, problem: Problem, z0: torch.Tensor) -> State:
        """Check dense Jacobians fit, then evaluate g at the start."""
        problem.check_dense_fits()
        return State(z=z0, g=problem.g(z0))

    def step(self, problem: Problem, state: State) -> State:
        """One scaled Newton step (least squares where J_g is singular)."""
        from deqcli.solvers.directions import solve_newton

        _, jac = problem.jacobian(state.z)
        z = state.z - self.m * solve_newton(jac, state.g)
        return State(z=z, g=problem.g(z), active=state.active)


@dataclass
class Budgeted(Solver):
    """Runs ``inner`` and reports every sample stuck once ``problem``'s evaluations reach ``limit``
    (the driver then stops them); ``exhausted`` says whether that happened."""

    name: ClassVar[str] = "budgeted"
    inner: Solver | None = None
    problem: Any = None
    limit: float = math.inf
    exhausted: bool = False

    def setup(self, stop: StopRule) -> None:
        """Pass the stopping rule on."""
        if self.inner is not None:
            self.inner.setup(stop)

    def init(self, problem: Problem, z0: torch.Tensor) -> State:
        """The inner solver's start."""
        if self.inner is None:
            raise TypeError("Budgeted needs an inner solver")
        return self.inner.init(problem, z0)

    def step(self, problem: Problem, state: State) -> State:
        """The inner solver's step."""
        if self.inner is None:
            raise TypeError("Budgeted needs an inner solver")
        return self.inner.step(problem, state)

    def observe(self, state: State, active: torch.Tensor) -> torch.Tensor | None:
        """The inner solver's own report, or every sample once the budget is spent."""
        import torch

        stuck = self.inner.observe(state, active) if self.inner is not None else None
        spent = max(
            cost(self.problem.counter, self.problem.dim, b) for b in range(self.problem.batch)
        )
        if spent >= self.limit:
            self.exhausted = True
            return torch.ones_like(active)
        return stuck

    def finish(self, state: State, result: SolveResult) -> None:
        """The inner solver's finishing touches, under its own name and options."""
        if self.inner is not None:
            self.inner.finish(state, result)
            result.solver = self.inner.name
            result.options = self.inner.options()

    def options(self) -> dict[str, Any]:
        """The inner solver's options (the guard has none of its own)."""
        return self.inner.options() if self.inner is not None else {}


def make(name: str, options: dict[str, Any]) -> Solver:
    """A registered solver, or the trial-only multiplicity step."""
    if name == advice.MULTIPLICITY_STEP:
        return MultiplicityNewton.configure(options)
    from deqcli.solvers import make_solver

    return make_solver(name, options)


def try_remedies(
    problem: Problem, result: SolveResult, options: DiagnosticOptions | None = None
) -> dict[str, Any] | None:
    """Run the planned remedies of ``result``'s diagnostics (``attach`` first), store the trials
    under ``result.diagnostics["trials"]`` and compose the remedies again; returns that record
    (None when there are no diagnostics with plans)."""
    import numpy as np

    from deqcli.diagnostics import compose_remedies, json_safe

    opts = options or DEFAULT_OPTIONS
    diag = result.diagnostics
    if not diag or not diag.get("samples") or any("plan" not in s for s in diag["samples"]):
        return None
    samples = diag["samples"]
    plans = [advice.Plan.from_dict(s["plan"]) for s in samples]
    max_period = int(diag["settings"]["max_period_effective"])
    with np.errstate(all="ignore"):
        record = json_safe(run_trials(problem, result, samples, plans, opts, max_period))
    diag["trials"] = record
    compose_remedies(diag, record)
    return record


def worst_with_candidates(
    result: SolveResult, plans: list[advice.Plan], samples: list[dict[str, Any]]
) -> int | None:
    """The sample to try remedies on: unconverged before converged, then the largest residual
    (converged samples: the most iterations); only samples that have candidates."""
    rows = [b for b, p in enumerate(plans) if p.candidates]
    if not rows:
        return None

    def badness(b: int) -> tuple[int, float]:
        ok = result.sample_status[b].ok
        r = float(samples[b]["final_residual"])  # the document writes inf/NaN as strings
        size = float(samples[b]["iterations"]) if ok else (math.inf if math.isnan(r) else r)
        return (0 if ok else 1, size)

    return max(rows, key=badness)


def run_trials(
    problem: Problem,
    result: SolveResult,
    samples: list[dict[str, Any]],
    plans: list[advice.Plan],
    opts: DiagnosticOptions,
    max_period: int,
) -> dict[str, Any]:
    """Run the worst sample's candidates (then the first one that works on the batch, when cheap);
    return the JSON record of all trials. Never prints; never raises for a failing trial."""
    record: dict[str, Any] = {"enabled": opts.trials, "runs": []}
    if not opts.trials:
        record["skipped"] = "remedy trials are off (--no-try)"
        return record
    b = worst_with_candidates(result, plans, samples)
    if b is None:
        record["skipped"] = "no sample needs a remedy"
        return record
    n = problem.dim
    original = result_cost(result, n, b)
    budget = opts.try_budget if opts.try_budget is not None else max(original, opts.try_min_budget)
    record.update(
        {
            "sample": b,
            "budget": {"evaluations": budget, "seconds": opts.try_time},
            "run_evaluations": original,
        }
    )
    started = time.perf_counter()
    located = _located_point(samples[b])
    tried = 0
    for cand in plans[b].candidates:
        index = len(record["runs"])
        left = opts.try_time - (time.perf_counter() - started)
        if tried >= opts.try_max or left <= 0:
            why = (
                f"at most {opts.try_max} trials"
                if tried >= opts.try_max
                else "the time budget is spent"
            )
            record["runs"].append(_not_run(cand, index, b, why))
            continue
        if cand.start == "last" and cand.max_iter is not None and result.iterations[b] > 0:
            # Continuing the run costs what its iterations cost: skip what cannot fit the budget.
            need = math.ceil(cand.max_iter * original / result.iterations[b])
            if need > budget:
                why = f"about {need} evaluations, beyond the budget of {budget}"
                record["runs"].append(_not_run(cand, index, b, why))
                continue
        trial = _trial(problem, result, cand, [b], budget, left, opts, max_period)
        tried += 1
        trial.update({"index": index, "sample": b, "scope": f"sample {b}"})
        _judge(trial, samples[b], original, located)
        record["runs"].append(trial)
    verified = [t for t in record["runs"] if t.get("verified")]
    left = opts.try_time - (time.perf_counter() - started)
    if verified and problem.batch > 1 and left > 0:
        first = verified[0]
        # Cheap: the whole batch in lock-step costs about one trial's time per sample at worst.
        if first["wall_time"] * problem.batch <= left:
            cand = next(c for c in plans[b].candidates if c.label == first["label"])
            rows = list(range(problem.batch))
            trial = _trial(problem, result, cand, rows, budget, left, opts, max_period)
            trial.update({"index": len(record["runs"]), "scope": "batch"})
            _judge_batch(trial)
            record["runs"].append(trial)
        else:
            record["batch_skipped"] = (
                f"{first['label']} on all {problem.batch} samples would take about "
                f"{first['wall_time'] * problem.batch:.2g} s, more than the {left:.2g} s left"
            )
    record["spent"] = {
        "evaluations": sum(t.get("evaluations", {}).get("cost", 0) for t in record["runs"]),
        "seconds": time.perf_counter() - started,
    }
    return record


def _not_run(cand: advice.Candidate, index: int, b: int, why: str) -> dict[str, Any]:
    return {
        "index": index,
        "label": cand.label,
        "solver": cand.solver,
        "options": cand.options,
        "start": cand.start,
        "sample": b,
        "scope": f"sample {b}",
        "outcome": "not run",
        "reason": why,
        "verified": False,
    }


def _trial(
    problem: Problem,
    result: SolveResult,
    cand: advice.Candidate,
    rows: list[int],
    budget: float,
    seconds: float,
    opts: DiagnosticOptions,
    max_period: int,
) -> dict[str, Any]:
    """Run one candidate on ``rows`` (one sample, or all); the trial's record."""
    import dataclasses

    import torch

    from deqcli.errors import DeqError
    from deqcli.solvers.base import run

    out: dict[str, Any] = {
        "label": cand.label,
        "solver": cand.solver,
        "options": cand.options,
        "start": cand.start,
    }
    # One sample's rows, or a copy of the whole problem: either way a fresh counter, so the run's
    # counts stay as they were.
    sub = problem.select(rows[0]) if len(rows) == 1 else dataclasses.replace(problem)
    if cand.start == "last":
        sub = sub.with_start(result.solution[rows].detach().clone().to(sub.device, sub.dtype))
    thresholds = result.thresholds()
    stop = StopRule(
        atol=result.atol,
        rtol=result.rtol,
        stop_mode=result.stop_mode,  # type: ignore[arg-type]
        max_iter=cand.max_iter if cand.max_iter is not None else result.max_iter,
        timeout=max(seconds, 1e-3),
    )
    if cand.start == "last" and result.stop_mode == "abs":
        # Continuing: the same target as the run (atol + rtol·‖g(z0)‖ of the original start).
        stop = dataclasses.replace(stop, atol=max(thresholds[r] for r in rows), rtol=0.0)
    try:
        solver = make(cand.solver, dict(cand.options))
        guard = Budgeted(inner=solver, problem=sub, limit=budget)
        with warnings.catch_warnings(), torch.enable_grad():
            warnings.simplefilter("ignore")
            trial = run(sub, guard, stop)
    except (DeqError, *_RUN_ERRORS) as exc:
        out.update(
            {
                "outcome": "error",
                "reason": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            }
        )
        out["verified"] = False
        out["text"] = f"tried: {cand.label} → could not run ({out['reason']})"
        return out
    n = sub.dim
    costs = [cost(sub.counter, n, i) for i in range(sub.batch)]
    classes = _classify(sub, trial, opts, max_period)
    out.update(
        {
            "status": trial.status.value,
            "statuses": [s.value for s in trial.sample_status],
            "classification": classes[0]["classification"] if len(rows) == 1 else None,
            "reason": classes[0]["reason"] if len(rows) == 1 else None,
            "classifications": [c["classification"] for c in classes],
            "iterations": trial.iterations[0] if len(rows) == 1 else trial.nit,
            "sample_iterations": list(trial.iterations),
            "final_residual": max(trial.final_residuals()),
            "evaluations": {**trial.counts.totals(), "cost": max(costs)},
            "wall_time": trial.wall_time,
            "budget_exhausted": guard.exhausted,
            "timed_out": any(s.value == "timeout" for s in trial.sample_status),
            "solution": trial.solution.detach().cpu().tolist() if n <= 8 else None,
        }
    )
    return out


# Failures of a user's map or of a solver on it, reported as the trial's outcome.
_RUN_ERRORS = (
    RuntimeError,
    ValueError,
    TypeError,
    ArithmeticError,
    IndexError,
    NotImplementedError,
)


def _classify(
    sub: Problem, trial: SolveResult, opts: DiagnosticOptions, max_period: int
) -> list[dict[str, Any]]:
    """The trial's own trajectory classes (history only: no evaluations)."""
    import torch

    z0_norms = torch.linalg.vector_norm(sub.z0, dim=1).tolist()
    period = min(max_period, opts.effective_max_period(len(trial.tail_iterates)))
    return [dyn.classify(tr, opts, period) for tr in dyn.traces(trial, z0_norms)]


def _located_point(sample: dict[str, Any]) -> list[float] | None:
    spec = sample.get("spectral") or {}
    if spec.get("point") == "located fixed point":
        return spec.get("fixed_point")
    return None


def _judge(
    trial: dict[str, Any], sample: dict[str, Any], original: int, located: list[float] | None
) -> None:
    """Verified or not, and the one-line outcome."""
    if trial.get("outcome") == "error":
        return
    it, spent = trial["iterations"], trial["evaluations"]["cost"]
    cost_text = f"{spent} evaluations, {_seconds(trial['wall_time'])}"
    converged = trial["status"] == "converged"
    was_ok = sample["driver_status"] == "converged"
    faster = spent < original
    trial["verified"] = converged and (not was_ok or faster)
    if converged:
        where = _where(trial, located)
        text = f"converged in {_iterations(it)}{where} ({cost_text}"
        if was_ok:
            text += f"; the run: {original}" + ("" if faster else ", no faster")
        text += ")"
        if trial["start"] == "last":
            text = f"converged after {it} more ({sample['iterations'] + it} iterations in all; {cost_text})"
        trial["outcome"] = "converged"
    elif trial["budget_exhausted"]:
        text = (
            f"not converged within the budget ({spent} evaluations: ‖g‖ = {trial['final_residual']:.3g}, "
            f"{trial['classification']})"
        )
        trial["outcome"] = "budget exhausted"
    elif trial["timed_out"]:
        text = f"not converged before the time budget ran out (‖g‖ = {trial['final_residual']:.3g})"
        trial["outcome"] = "time exhausted"
    else:
        cls = trial["classification"]
        same = cls == sample["classification"]
        text = f"{'still ' if same else ''}{cls}: {trial['reason']} ({cost_text})"
        trial["outcome"] = cls
    trial["text"] = f"tried: {trial['label']} → {text}"


def _judge_batch(trial: dict[str, Any]) -> None:
    if trial.get("outcome") == "error":
        trial["verified"] = False
        return
    statuses = trial["statuses"]
    done = sum(s == "converged" for s in statuses)
    trial["verified"] = done == len(statuses)
    trial["outcome"] = f"{done}/{len(statuses)} converged"
    trial["text"] = (
        f"tried on the batch: {trial['label']} → {done} of {len(statuses)} samples converged "
        f"(≤ {trial['iterations']} iterations, {trial['evaluations']['cost']} evaluations per sample, "
        f"{_seconds(trial['wall_time'])})"
    )


def _where(trial: dict[str, Any], located: list[float] | None) -> str:
    """' to the fixed point the diagnostics located', or how far from it the trial ended."""
    solution = trial.get("solution")
    if located is None or not solution:
        return ""
    z = solution[0]
    dist = math.sqrt(sum((a - b) ** 2 for a, b in zip(z, located, strict=True)))
    scale = max(1.0, math.sqrt(sum(v * v for v in located)))
    if dist <= SAME_POINT_RTOL * scale:
        return " to the fixed point the diagnostics located"
    # A fact, not a claim of another fixed point: at a degenerate root two solutions within
    # tolerance can lie far apart.
    return f" to a point {dist:.3g} from the fixed point the diagnostics located"


def _iterations(k: int) -> str:
    return f"{k} iteration" + ("" if k == 1 else "s")


def _seconds(t: float) -> str:
    return f"{t * 1e3:.3g} ms" if t < 1 else f"{t:.3g} s"
