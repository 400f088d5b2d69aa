"""Bounded work and memory: the expression cost model, run.max_memory / run.max_work, run.timeout."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from deqcli import deadline
from deqcli.api import solve
from deqcli.config import ConfigError, parse_config
from deqcli.expr import ExpressionError, parse_expression
from deqcli.limits import DEFAULT_MAX_MEMORY, Limits, parse_memory
from deqcli.problems.base import Problem
from deqcli.result import SolveResult, Status
from deqcli.solvers import make_solver
from deqcli.solvers.base import Solver, State, StopRule, run
from tests.conftest import ROOT, one_line_error


def cost(text: str, **variables):
    return parse_expression(text, key="k", names=set(variables)).cost(variables)


# -- the cost model, against hand counts -------------------------------------------------------


def test_a_matrix_product_costs_2mkn() -> None:
    c = cost("A @ B", A=(30, 40), B=(40, 50))
    assert c.work == 2 * 30 * 40 * 50 and c.result == (30, 50) and c.largest == 30 * 50
    assert cost("W @ z", W=(100, 100), z=(100,)).work == 2 * 100 * 100
    assert cost("dot(a, b)", a=(7,), b=(7,)).work == 14
    assert cost("A @ B", A=(5, 2, 3), B=(3, 4)).result == (5, 2, 4)


def test_broadcasting_builders_and_reductions_are_counted_element_by_element() -> None:
    c = cost("sum(ones(3, 1) * ones(1, 4))")
    # ones: 3 and 4 elements made, the product 12, the sum reads 12 and makes one number.
    assert c.result == () and c.work == 3 + 4 + 12 + 12
    assert c.elements == 3 + 4 + 12 + 1 and c.largest == 12
    assert cost("outer(arange(1, n + 1), ones(n))", n=50).result == (50, 50)
    assert cost("eye(n) * 2", n=10).result == (10, 10)
    assert cost("linspace(0, 1, 11) + diag(eye(4))[0]").result == (11,)
    assert cost("concat(z, z, 1)", z=(3,)).result == (7,)
    assert cost("stack(z, z)", z=(3,)).result == (2, 3)
    assert cost("transpose(A)", A=(2, 5)).result == (5, 2)


def test_indexing_gives_the_shapes_torch_gives() -> None:
    assert cost("z[2:5]", z=(10,)).result == (3,)
    assert cost("z[::-1]", z=(10,)).result == (10,)
    assert cost("W[:, 0]", W=(3, 7)).result == (3,)
    assert cost("W[1]", W=(3, 7)).result == (7,)
    assert cost("W[0:2, 1:6:2]", W=(3, 7)).result == (2, 3)
    assert cost("z[8:2:-2]", z=(10,)).result == (3,) and cost("z[5:2]", z=(10,)).result == (0,)
    assert cost("v[1:]", v=(10**30,)).result == (10**30 - 1,)  # beyond what len() can count


def test_numbers_are_folded_and_unknown_shapes_add_nothing() -> None:
    assert cost("2 ** 10 + n", n=4).result == 1028
    assert cost("ones(n * 2)", n=3).result == (6,)
    unknown = cost("A @ A @ z", A=None, z=(5,))
    assert unknown.work == 0 and unknown.result is None  # a lower bound: a file of unknown shape


def test_the_issue_s_examples_are_refused_by_validate_with_the_estimate(cli, write_config) -> None:
    outer = write_config(
        "problem: {kind: expression, fixed_point: 'sum(ones(20000,1)*ones(1,20000))*0 + cos(z)'}\n"
    )
    one_line_error(
        cli("validate", outer),
        "problem.fixed_point",
        "8e8 operations",
        "20000×1, 1×20000 → 20000×20000",
        "run.max_work = 1e8",
    )
    matmul = write_config(
        "problem: {kind: expression, dim: 2, fixed_point: 'z * sum(M @ M) * 0 + cos(z)',\n"
        "          params: {M: 'ones(3000, 3000)'}}\n",
        name="matmul.yaml",
    )
    one_line_error(cli("validate", matmul), "problem.fixed_point", "5.4e10 operations", "'@'")
    # run.max_work raises the limit.
    assert cli("validate", matmul, "--set", "run.max_work=1e11").exit_code == 0


def test_work_counts_the_batch_and_memory_counts_the_element_size() -> None:
    text = "problem: {kind: expression, fixed_point: 'A @ z', dim: 1000, params: {A: 'eye(n)'}, batch: %d}\n"
    parse_config(text % 40)  # 2·10⁶ per sample × 40 = 8e7 < 1e8
    with pytest.raises(ConfigError, match=r"1\.6e8 operations for a batch of 80"):
        parse_config(text % 80)
    big = "problem: {kind: expression, fixed_point: 'cos(z) + sum(ones(5000, 5000)) * 0', dim: 2}\n"
    with pytest.raises(ConfigError, match="191 MiB of intermediate values"):
        parse_config(big + "run: {max_memory: 100MiB, max_work: 1e9}\n")
    parse_config(big + "run: {max_memory: 100MiB, max_work: 1e9, dtype: float32}\n")  # 95 MiB


def test_the_build_checks_shapes_the_config_could_not_know(tmp_path: Path) -> None:
    np.save(tmp_path / "A.npy", np.eye(2000) * 0.1)
    cfg = parse_config(
        "problem: {kind: expression, fixed_point: 'A @ (A @ A) @ z', dim: 2000,\n"
        "          params: {A: {file: A.npy}}}\n",
        base_dir=tmp_path,
    )  # validates: the file's shape is not read until the build
    # Two 2000³ products (2·8e9 operations each) and a matrix-vector product.
    with pytest.raises(ExpressionError, match=r"3\.2e10 operations.*2000×2000, 2000×2000"):
        solve(cfg)


def test_parameter_expressions_are_checked_before_they_are_evaluated(tmp_path: Path) -> None:
    np.save(tmp_path / "v.npy", np.ones(30000))
    cfg = parse_config(
        "problem: {kind: expression, fixed_point: cos(z), params: {v: {file: v.npy},\n"
        "          M: 'outer(v, v)'}}\nrun: {max_work: 1e10}\n",
        base_dir=tmp_path,
    )
    with pytest.raises(
        ExpressionError, match=r"problem\.params\.M: one evaluation creates about 6\.71 GiB"
    ):
        solve(cfg)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("8GiB", 8 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5 gib", int(1.5 * 2**30)),
        (1e9, 10**9),
        (4096, 4096),
    ],
)
def test_memory_sizes(text, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["lots", "-1GiB", "0", ".inf", True, "8 GiBs"])
def test_bad_memory_sizes(text) -> None:
    with pytest.raises(ValueError):
        parse_memory(float(text) if text == ".inf" else text)


def test_sizes_beyond_memory_are_refused_by_validate_without_torch(write_config) -> None:
    cfg = write_config("problem: {kind: expression, fixed_point: cos(z), dim: 1000000000}\n")
    code = (
        "import sys\nfrom deqcli.cli import app\n"
        f"try:\n    app(['validate', {str(cfg)!r}], prog_name='deq')\nexcept SystemExit as e:\n"
        "    print('exit', e.code, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.stdout.strip() == "exit 2 False", out.stderr
    assert "problem.dim: a start of batch 1 × n 1000000000" in out.stderr
    assert "14.9 GiB, more than run.max_memory = 4 GiB" in out.stderr


def test_layer_sizes_count_against_run_max_memory(cli, write_config) -> None:
    layer = "problem: {kind: tanh_layer, dim: 6000, batch: 20000, W: {random: normal}}\n"
    one_line_error(
        cli("validate", write_config(layer)), "problem.batch", "4.02 GiB", "run.max_memory"
    )
    assert cli("validate", write_config(layer + "run: {max_memory: 5GiB}\n")).exit_code == 0


def test_the_solver_s_working_set_is_checked_before_the_solve() -> None:
    cfg = parse_config(
        "problem: {kind: tanh_layer, dim: 64, W: {random: normal, spectral_norm: 0.5}}\n"
        "solver: {name: anderson, m: 10000000}\n"
    )
    with pytest.raises(
        ConfigError, match=r"solver anderson on batch 1 × n 64: its working arrays need about 9\.5"
    ):
        solve(cfg)


def test_a_working_set_mostly_of_stored_terms_names_the_option_to_lower() -> None:
    # Broyden's 500 default terms on batch 64 × n 20,000 in float64: 2·min(500, 1000) vectors of
    # 64·2e4·8 bytes each, about 9.5 GiB of the 9.6 GiB: lower solver.memory first.
    cfg = parse_config(
        "problem: {kind: expression, fixed_point: 0.5*z, dim: 20000, batch: 64}\nsolver: broyden\n"
    )
    with pytest.raises(ConfigError) as caught:
        solve(cfg)
    assert caught.value.key == "solver.memory"
    assert "the 500 stored terms of solver.memory; lower solver.memory" in str(caught.value)
    # Terms are allocated as they fill: a run of 50 iterations can store at most 50.
    small = parse_config(
        "problem: {kind: expression, fixed_point: 0.5*z, dim: 20000, batch: 64}\n"
        "solver: broyden\nrun: {max_iter: 50, atol: 1.0e-6}\n"
    )
    assert solve(small).status.value == "converged"


def test_torchdeq_gets_a_capped_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("torchdeq")
    import torchdeq.solver as td

    seen: dict = {}
    original = td.broyden_solver

    def spy(func, x0, **kwargs):
        seen.update(kwargs)
        return original(func, x0, **kwargs)

    monkeypatch.setattr(td, "broyden_solver", spy)
    cfg = parse_config(
        "problem: {kind: expression, fixed_point: cos(z), initial: 1.0}\n"
        "solver: torchdeq:broyden\nrun: {max_iter: 1000000000, atol: 1.0e-12}\n"
    )
    result = solve(cfg, diagnostics=False)
    assert result.status is Status.CONVERGED
    assert seen["max_iter"] == 100_000 and seen["LBFGS_thres"] == 1_000


# -- run.timeout -------------------------------------------------------------------------------


def test_deadlines_nest_and_never_extend_an_outer_one() -> None:
    with deadline.armed(0.0) as outer:
        time.sleep(0.001)
        with deadline.armed(100.0) as inner:
            assert inner is outer
            with pytest.raises(deadline.DeadlineExceeded, match=r"run\.timeout of 0 s"):
                deadline.checkpoint()
            with deadline.suspended():
                deadline.checkpoint()
    deadline.checkpoint()  # nothing in force outside


@dataclass
class Endless(Solver):
    """Each step evaluates until the deadline stops it (an inner loop that never ends)."""

    name = "endless"

    def init(self, problem: Problem, z0: torch.Tensor) -> State:
        return State(z=z0, g=problem.g(z0))

    def step(self, problem: Problem, state: State) -> State:
        z = state.z
        while True:
            z = problem.f(z)


def test_the_driver_stops_a_step_that_never_ends_at_run_timeout() -> None:
    z0 = torch.tensor([[1.0]], dtype=torch.float64)
    problem = Problem(
        name="p", kind="test", form="fixed_point", func=lambda z, p: torch.cos(z), z0=z0
    )
    result = run(problem, Endless(), StopRule(atol=0.0, max_iter=10, timeout=0.05))
    assert result.status is Status.TIMEOUT and result.iterations == [0]
    assert float(result.solution[0, 0]) == 1.0  # the last finished iterate: the start


def _cos_after(delay: float, user: bool):
    """cos(z), after the first call waiting ``delay`` seconds, marked as the user's code or not."""
    calls = [0]

    def f(z: torch.Tensor, p: dict) -> torch.Tensor:
        calls[0] += 1
        if calls[0] > 1:
            if user:
                with deadline.user_code():
                    time.sleep(delay)
            else:
                time.sleep(delay)
        return torch.cos(z)

    return f


def _plain_iteration_timed(func: Callable, timeout: float) -> tuple[SolveResult, float]:
    """fixed_point on ``func`` from z0 = 1 (two samples) under ``timeout``: (result, seconds)."""
    z0 = torch.full((2, 1), 1.0, dtype=torch.float64)
    problem = Problem(name="p", kind="test", form="fixed_point", func=func, z0=z0)
    started = time.perf_counter()
    result = run(problem, make_solver("fixed_point"), StopRule(atol=0.0, timeout=timeout))
    return result, time.perf_counter() - started


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no interval timers here")
def test_the_watchdog_stops_the_user_s_code_that_overruns_run_timeout() -> None:
    result, seconds = _plain_iteration_timed(_cos_after(60, True), 0.2)
    # Stopped inside the evaluation of the first step, about a grace (0.02 s) after the deadline.
    assert seconds < 5.0
    assert result.status is Status.TIMEOUT and result.iterations == [0, 0]
    assert torch.equal(result.solution, torch.ones(2, 1, dtype=torch.float64))
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no interval timers here")
def test_a_timeout_beyond_the_interval_timer_s_range_is_valid(cli) -> None:
    # setitimer refuses more than about 9e9 s; the watchdog's timer is set in shorter steps.
    with deadline.armed(1.0e300):
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 0.0 < left <= deadline.WATCHDOG_MAX
        deadline.checkpoint()
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
    run = cli("solve", ROOT / "configs" / "dottie.yaml", "--set", "run.timeout=1.0e300", "-q")
    assert run.exit_code == 0, run.stderr


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no interval timers here")
def test_the_watchdog_does_not_interrupt_code_that_is_not_the_user_s() -> None:
    # The same wait outside ``user_code()`` (our code, torch's) is never cut at an arbitrary
    # bytecode: it finishes, and the next evaluation's checkpoint stops the run.
    result, seconds = _plain_iteration_timed(_cos_after(0.6, False), 0.1)
    assert seconds >= 0.6
    assert result.status is Status.TIMEOUT and result.iterations == [1, 1]


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no interval timers here")
def test_the_watchdog_leaves_other_alarms_and_threads_alone() -> None:
    def theirs(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGALRM, theirs)
    try:
        with deadline.armed(0.05):
            assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)
        assert signal.getsignal(signal.SIGALRM) is theirs
    finally:
        signal.signal(signal.SIGALRM, previous)
    # Outside the main thread no signal can be set; the deadline still holds at checkpoints.
    seen: list[BaseException] = []

    def worker() -> None:
        try:
            with deadline.armed(0.0):
                time.sleep(0.001)
                deadline.checkpoint()
        except BaseException as exc:  # what the thread raised, for the assertion
            seen.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert len(seen) == 1 and isinstance(seen[0], deadline.DeadlineExceeded)


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="no interval timers here")
def test_the_watchdog_reads_the_main_thread_s_own_user_code_mark() -> None:
    # Another thread inside the user's code (a Dask task thread, say) does not make the main
    # thread's watchdog raise in whatever the main thread is running.
    inside = threading.Event()
    release = threading.Event()

    def worker() -> None:
        with deadline.user_code():
            inside.set()
            release.wait(5.0)

    thread = threading.Thread(target=worker)
    thread.start()
    inside.wait(5.0)
    try:
        with deadline.armed(0.02):
            until = time.perf_counter() + 0.4
            while time.perf_counter() < until:  # past the deadline and its grace, in this file
                pass
    finally:
        release.set()
        thread.join()


@pytest.mark.parametrize("solver", ["levenberg-marquardt", "newton", "anderson", "ptc", "auto"])
def test_run_timeout_inside_a_solver_s_first_evaluation_gives_the_start(solver: str) -> None:
    # The deadline passes inside init (the first evaluation of g, or the first factorisation):
    # the result is the start with the timeout status and a note, not a traceback from the
    # method's report of a state it never built.
    from deqcli.solvers import make_solver

    z0 = torch.full((2, 3), 3.0, dtype=torch.float64)
    problem = Problem(name="p", kind="test", form="fixed_point", func=_slow_cos(), z0=z0)
    with deadline.armed(0.0):  # already past: the first evaluation inside init stops
        result = run(problem, make_solver(solver), StopRule(atol=0.0, max_iter=100))
    assert result.status is Status.TIMEOUT and result.iterations == [0, 0]
    assert torch.equal(result.solution, z0)
    assert f"{solver}: stopped by the time limit before its first step" in result.notes


def _slow_cos(delay: float = 0.02):
    def f(z: torch.Tensor, p: dict) -> torch.Tensor:
        time.sleep(delay)
        return torch.cos(z) * 0.99999 + 0.5 * (1 - 0.99999)

    return f


@pytest.mark.parametrize(
    "solver", ["scipy:anderson", "scipy:df-sane", "torchdeq:fixed_point_iter", "torchdeq:anderson"]
)
def test_run_timeout_holds_inside_a_peer_s_own_loop(solver: str) -> None:
    if solver.startswith("torchdeq"):
        pytest.importorskip("torchdeq")
    from deqcli.solvers import make_solver

    z0 = torch.full((2, 3), 3.0, dtype=torch.float64)
    problem = Problem(name="p", kind="test", form="fixed_point", func=_slow_cos(), z0=z0)
    stop = StopRule(atol=0.0, max_iter=10**9, timeout=0.3)
    result = run(problem, make_solver(solver), stop)
    # A sample may reach an exact root before the deadline; the others are stopped by it (not
    # reported as stalled), and what was recorded is replayed in full.
    assert result.status is Status.TIMEOUT
    assert set(result.sample_status) <= {Status.TIMEOUT, Status.CONVERGED}
    assert "stopped by run.timeout of 0.3 s" in result.extra["peer"]["messages"]
    assert result.nit < 10**6  # it did stop, long before its budget


def test_diagnostics_past_run_timeout_end_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    import deqcli.diagnostics as diagnostics

    def endless(problem, result, *args, **kwargs):
        z = problem.z0
        while True:
            z = problem.raw_f(z)

    monkeypatch.setattr(diagnostics, "attach", endless)
    cfg = parse_config(
        "problem: {kind: expression, fixed_point: cos(z), initial: 1.0}\nrun: {timeout: 0.2}\n"
    )
    result = solve(cfg)
    assert result.status is Status.CONVERGED
    assert (
        "the diagnostics stopped after run.timeout (0.2 s); raise run.timeout for them"
        in result.notes
    )


# -- values that would not survive the JSON document -----------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--tol", "inf"], "run.atol"),
        (["--set", "run.rtol=.inf"], "run.rtol: Input should be a finite number"),
        (["--set", "run.timeout=.nan"], "run.timeout"),
        (["--set", "solver.beta=.inf"], "solver.beta: must be a finite number, got inf"),
        (
            ["--solver", "anderson", "--set", "solver.cond_max=.nan"],
            "solver.cond_max: must be a finite",
        ),
        (["--set", "run.max_work=.inf"], "run.max_work"),
        (["--set", "run.max_memory=0"], "run.max_memory"),
    ],
)
def test_non_finite_settings_are_refused_before_solving(
    cli, args: list[str], fragment: str
) -> None:
    one_line_error(cli("solve", "configs/dottie.yaml", "--json", "-", *args), fragment)


def test_defaults_are_documented_where_they_are_used() -> None:
    schema = json.loads(
        json.dumps(parse_config("problem: {kind: expression, fixed_point: z}\n").run.model_dump())
    )
    assert schema["max_memory"] == DEFAULT_MAX_MEMORY == Limits().max_memory
    assert schema["max_work"] == 1e8
