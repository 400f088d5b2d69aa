"""deq: a solver and convergence analyser for fixed points z = f(z) and roots g(z) = 0.

The public Python API: ``solve`` (a config, or a callable / module with its start and inputs),
``load_problem``, ``load_config``, ``SolveResult``, ``Status``, and ``nn.DEQLayer`` for training.
Importing the package does not import torch; solving does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deqcli.result import SolveResult, Status

__version__ = "0.1.0"
__all__ = ["SolveResult", "Status", "__version__", "load_config", "load_problem", "nn", "solve"]


def __getattr__(name: str) -> Any:
    # Lazy so that `deq --help` and friends never pay for torch, and so that the entry point
    # installs its Ctrl-C handler before anything of weight is imported.
    if name in ("SolveResult", "Status"):
        from deqcli import result

        return getattr(result, name)
    if name in ("solve", "load_problem"):
        from deqcli import api

        return getattr(api, name)
    if name == "load_config":
        from deqcli.config import load_config

        return load_config
    if name == "nn":
        import importlib

        return importlib.import_module("deqcli.nn")
    raise AttributeError(f"module 'deqcli' has no attribute {name!r}")
