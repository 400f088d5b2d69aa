"""How long hostile inputs take to be refused, in process (no start-up cost counted).

Each case must be refused with one ConfigError or ExpressionError line; the target is well under a
second each on a 2-core machine. Run:

    python bench/hostile.py [--repeat 5]

Prints the median time per case and what it was refused with.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deqcli.config import load_config, parse_config  # noqa: E402
from deqcli.errors import DeqError  # noqa: E402
from deqcli.expr import ExpressionError  # noqa: E402

TARGET_SECONDS = 1.0
DOT = "problem: {kind: expression, fixed_point: cos(z), initial: 1.0}\n"


def billion_laughs() -> str:
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{k}: &l{k} [{','.join([f'*l{k - 1}'] * 9)}]" for k in range(1, 9)]
    return "\n".join(lines) + "\n" + DOT


def big_valid_matrix() -> str:
    rows = [[0.001 * ((i * 7 + j) % 13) for j in range(300)] for i in range(300)]
    return f"problem: {{kind: tanh_layer, dim: 300, W: {rows}}}\n"


CASES: dict[str, Callable[[], object]] = {
    "billion laughs (9 levels)": lambda: parse_config(billion_laughs()),
    "YAML nested 100,000 deep": lambda: parse_config("a: " + "[" * 100_000 + "]" * 100_000),
    "/dev/zero as a config": lambda: load_config("/dev/zero"),
    "a 5,000-digit integer": lambda: parse_config(DOT + "run: {max_iter: " + "9" * 5000 + "}\n"),
    "ones(20000,1)*ones(1,20000)": lambda: parse_config(
        DOT.replace("cos(z)", "'sum(ones(20000,1)*ones(1,20000))'")
    ),
    "3000x3000 matmul": lambda: parse_config(
        DOT.replace("cos(z)", "'sum(ones(3000,3000) @ ones(3000,3000))'")
    ),
    "dim 1e9": lambda: parse_config(DOT.replace("initial: 1.0", "dim: 1000000000")),
    "(accepted) a 300x300 matrix inline, 1 MB": lambda: parse_config(big_valid_matrix()),
}


def timed(case: Callable[[], object], repeat: int) -> tuple[float, str]:
    """Median seconds of ``case`` and how it ended (the refusal's first words, or 'accepted')."""
    times, outcome = [], "accepted"
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            case()
        except (DeqError, ExpressionError) as exc:
            outcome = str(exc)[:90]
        times.append(time.perf_counter() - start)
    return statistics.median(times), outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory():
        for name, case in CASES.items():
            seconds, outcome = timed(case, args.repeat)
            # An accepted large config is shown for scale: reading it is allowed to take longer.
            mark = (
                "ok  " if seconds < TARGET_SECONDS else "    " if outcome == "accepted" else "SLOW"
            )
            print(f"{mark} {seconds * 1000:9.1f} ms  {name:42s} {outcome}")


if __name__ == "__main__":
    main()
