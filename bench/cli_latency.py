"""Start-up latency of the commands that solve nothing, against `python -c "import torch"`.

They must not import torch; the target is under 0.5 s each on a 2-core machine. Run:

    python bench/cli_latency.py [--repeat 5]

Prints the median wall time of each command over the repeats and its ratio to importing torch.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 0.5
COMMANDS = {
    "deq --help": ["--help"],
    "deq validate configs/dottie.yaml": ["validate", "configs/dottie.yaml"],
    "deq schema": ["schema"],
    "deq list-solvers": ["list-solvers"],
}


def median_seconds(argv: list[str], repeat: int) -> float:
    """Median wall time of running ``argv`` (after one warm-up run for the disk cache)."""
    subprocess.run(argv, cwd=ROOT, capture_output=True, check=True)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(argv, cwd=ROOT, capture_output=True, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    """Measure and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    torch_time = median_seconds([sys.executable, "-c", "import torch"], args.repeat)
    print(f"{'command':<36} {'median':>9} {'vs import torch':>16}  target < {TARGET_SECONDS} s")
    label = "python -c 'import torch'"
    print(f"{label:<36} {torch_time:>8.3f}s {1.0:>16.2f}")
    worst = 0.0
    for label, cli_args in COMMANDS.items():
        seconds = median_seconds([sys.executable, "-m", "deqcli", *cli_args], args.repeat)
        worst = max(worst, seconds)
        mark = "ok" if seconds < TARGET_SECONDS else "MISSED"
        print(f"{label:<36} {seconds:>8.3f}s {seconds / torch_time:>16.2f}  {mark}")
    print(f"slowest: {worst:.3f} s ({'meets' if worst < TARGET_SECONDS else 'misses'} the target)")


if __name__ == "__main__":
    main()
