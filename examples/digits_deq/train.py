"""Train the digits DEQ and write checkpoint.pt and batch.npz next to this file.

    pip install 'deqcli[examples]'        # scikit-learn, for its bundled digits (no download)
    python examples/digits_deq/train.py   # about a minute on 2 CPU cores

The forward pass solves the equilibrium with deq's Anderson solver (``deqcli.nn.DEQLayer``); the
backward pass is the implicit function theorem (an adjoint GMRES solve per step), so no graph is
kept through the iterations. Everything is seeded: the same machine and torch version give the
same checkpoint. The checkpoint holds the cell's and the head's state_dicts ("cell", "head"), the
model's sizes and its test accuracy; batch.npz holds 32 test images ("x") and their labels ("y")
for the configs here.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from model import DigitsDEQ  # model.py beside this script (Python puts its folder on the path)
from torch import nn

HERE = Path(__file__).resolve().parent


def digits(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 8×8 digits scaled to [0, 1], split 80/20 by a seeded permutation."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise SystemExit(
            "this example needs scikit-learn: pip install 'deqcli[examples]'"
        ) from None
    data = load_digits()
    x = torch.tensor(data.images[:, None] / 16.0, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    return x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]]


def jacobian_penalty(model: DigitsDEQ, x: torch.Tensor) -> torch.Tensor:
    """‖∂f/∂z‖_F² / n at the equilibrium, estimated with one random vector–Jacobian product.

    Keeping the Jacobian small keeps the map contractive while it trains (Bai et al., 2021,
    "Stabilizing Equilibrium Models by Jacobian Regularization"), so the solves stay short.
    """
    z = model.deq.last_result.z_star.detach().requires_grad_(True)
    out = model.cell(z, x)
    v = torch.randn_like(out)
    (vjp,) = torch.autograd.grad(out, z, v, create_graph=True)
    return vjp.pow(2).sum() / v.numel()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Fraction of x classified as y (no gradients)."""
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument(
        "--train-size",
        type=int,
        default=None,
        help="train on the first N images only (a smoke test)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jac-reg", type=float, default=2.0, help="weight of the Jacobian penalty")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these convolutions are too small to gain from more)",
    )
    parser.add_argument("--out", type=Path, default=HERE / "checkpoint.pt")
    parser.add_argument("--batch-out", type=Path, default=HERE / "batch.npz")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = digits(args.seed)
    x_train, y_train = x_train[: args.train_size], y_train[: args.train_size]
    model = DigitsDEQ(
        channels=args.channels,
        solver="anderson",
        stop_mode="rel",
        rtol=1e-4,
        atol=0.0,
        max_iter=40,
        backward_tol=1e-4,
        backward_max_iter=40,
    )
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_fn = nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(args.seed + 1)
    started = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        order = torch.randperm(len(y_train), generator=shuffle)
        forward_iters, backward_iters, unconverged = [], [], 0
        for start in range(0, len(order), args.batch_size):
            rows = order[start : start + args.batch_size]
            xb = x_train[rows]
            loss = loss_fn(model(xb), y_train[rows])
            if args.jac_reg > 0:
                loss = loss + args.jac_reg * jacobian_penalty(model, xb)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            stats = model.deq.stats
            forward_iters.append(stats.iterations)
            backward_iters.append(stats.backward_iterations or 0)
            unconverged += stats.batch - stats.converged_samples
        print(
            f"epoch {epoch:2d}  loss {float(loss.detach()):.3f}  test accuracy {accuracy(model, x_test, y_test):.3f}  "
            f"forward iterations {np.mean(forward_iters):.1f}  backward GMRES {np.mean(backward_iters):.1f}  "
            f"unconverged samples {unconverged}  ({time.perf_counter() - started:.0f} s)"
        )

    test_accuracy = accuracy(model, x_test, y_test)
    torch.save(
        {
            "cell": model.cell.state_dict(),
            "head": model.head.state_dict(),
            "channels": args.channels,
            "size": 8,
            "epochs": args.epochs,
            "seed": args.seed,
            "test_accuracy": test_accuracy,
        },
        args.out,
    )
    np.savez(args.batch_out, x=x_test[:32].numpy(), y=y_test[:32].numpy())
    print(
        f"test accuracy {test_accuracy:.3f}; wrote {_shown(args.out)} and {_shown(args.batch_out)}"
    )


def _shown(path: Path) -> str:
    """The path relative to the current folder when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    main()
