"""Problem kinds and the one entry point that builds a Problem from a validated config."""

from __future__ import annotations

from typing import TYPE_CHECKING

from deqcli.config import Config

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem

KINDS = {
    "tanh_layer": "z = tanh(W z + U x + b), the equilibrium layer of a DEQ",
    "expression": "a scalar or vector map or residual written as text",
    "gradient_descent": "w ← w − lr·∇L(w) with the loss written as text",
    "python": "a map from your own Python code (runs that code)",
    "module": "an nn.Module f(z, x) from your code and checkpoint (runs that code)",
}


def build_problem(cfg: Config, device: torch.device, dtype: torch.dtype) -> Problem:
    """Build the Problem that ``cfg.problem`` describes, on ``device`` in ``dtype``.

    A config that runs Python code is refused unless consent was given (``deqcli.consent``).
    """
    from deqcli.consent import require
    from deqcli.limits import Limits
    from deqcli.problems import expression, module, python_callable, tanh_layer
    from deqcli.problems.arrays import ArrayBuilder

    # Before anything else, and before any import of the target: code runs only with consent.
    require(cfg.problem.kind, getattr(cfg.problem, "target", ""))

    arrays = ArrayBuilder(
        device=device,
        dtype=dtype,
        base_dir=cfg.base_dir,
        seed_for=cfg.random_seed,
        limits=Limits.of(cfg.run),
    )
    kind = cfg.problem.kind
    if kind == "tanh_layer":
        return tanh_layer.build(cfg, arrays)
    if kind == "expression":
        return expression.build(cfg, arrays)
    if kind == "gradient_descent":
        return expression.build_gradient_descent(cfg, arrays)
    if kind == "module":
        return module.build(cfg, arrays)
    return python_callable.build(cfg, device, dtype)
