"""Problems from the user's own Python code: ``target: path/to/file.py:factory`` or ``module:factory``.

This imports and runs that code, with the user's permissions. The factory is called with the
config's ``args`` (plus ``device`` and ``dtype`` if its signature accepts them) and returns
``(map, z0)``, ``(map, z0, inputs)`` or ``{"map": map, "z0": z0, "inputs": x}``. The map takes z
(batch, *state shape) — and the inputs x (batch, ...) when there are any, as ``map(z, x)`` — and
returns z's shape, row by row; it may be a plain function or a ``torch.nn.Module`` (whose
parameters become the problem's named parameters, so sensitivities work). The wrapping itself is
``problems.model.from_map``, shared with ``kind: module`` and the Python API.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from deqcli.config import NUMBER, Config, PythonSpec, check_readable
from deqcli.consent import UserCodeError, mark_user_code, running_user_code
from deqcli.errors import ConfigError, describe
from deqcli.problems.base import Problem
from deqcli.problems.model import bounded_load, from_map


def load_factory(target: str, base_dir: Path, timeout: float | None = None) -> Callable[..., Any]:
    """Import ``file.py:name`` (relative to the config) or ``module:name`` and return the factory.

    The import runs the module's top-level code: it gets ``timeout`` seconds (run.timeout)."""
    where, _, attr = target.rpartition(":")
    key = "problem.target"
    during = "while it ran its top level"
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_absolute():
            path = base_dir / path
        check_readable(path, where, key)
        module_name = f"deq_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(key, f"cannot import '{where}'")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        mark_user_code(str(path))
        try:
            with (
                bounded_load(timeout, key, f"importing '{where}'", during),
                running_user_code(target),
            ):
                spec.loader.exec_module(module)
        except (UserCodeError, ConfigError):
            raise
        except Exception as exc:  # the user's module failed to import: report it as their input
            raise ConfigError(key, f"importing '{where}' failed: {describe(exc)}") from None
    else:
        try:
            with (
                bounded_load(timeout, key, f"importing '{where}'", during),
                running_user_code(target),
            ):
                module = importlib.import_module(where)
        except ImportError as exc:
            raise ConfigError(key, f"cannot import module '{where}': {exc}") from None
        mark_user_code(getattr(module, "__file__", None))
    factory = getattr(module, attr, None)
    if not callable(factory):
        names = sorted(
            n for n in vars(module) if not n.startswith("_") and callable(getattr(module, n))
        )
        raise ConfigError(
            key, f"'{attr}' is not a callable in '{where}' (callables there: {', '.join(names)})"
        )
    return factory


def call_factory(
    factory: Callable[..., Any],
    args: Mapping[str, Any],
    target: str,
    device: torch.device,
    dtype: torch.dtype,
    timeout: float | None = None,
) -> Any:
    """Call the user's factory with the config's ``args`` (and ``device``/``dtype`` if it takes
    them), for at most ``timeout`` seconds (run.timeout)."""
    # YAML 1.1 reads 1e-3 as a string; args are meant as numbers when they look like numbers.
    kwargs = {k: _number_or_text(v) for k, v in args.items()}
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # some builtins and C extensions have no signature
        accepted = {}
    for name, value in (("device", device), ("dtype", dtype)):
        if name in accepted and name not in kwargs:
            kwargs[name] = value
    try:
        during = "while it built the map"
        with (
            bounded_load(timeout, "problem.target", f"calling {target}", during),
            running_user_code(target),
        ):
            return factory(**kwargs)
    except (UserCodeError, ConfigError):
        raise
    except Exception as exc:  # the user's factory failed: report it as their input, in one line
        raise ConfigError("problem.args", f"calling {target} failed: {describe(exc)}") from None


def build(cfg: Config, device: torch.device, dtype: torch.dtype) -> Problem:
    """Call the user's factory and wrap its map (and inputs, if it returns them) as a Problem."""
    spec = cfg.problem
    if not isinstance(spec, PythonSpec):
        raise TypeError("python_callable.build needs a PythonSpec")
    factory = load_factory(spec.target, cfg.base_dir, cfg.run.timeout)
    made = call_factory(factory, spec.args, spec.target, device, dtype, cfg.run.timeout)
    fmap, z0, inputs = _unpack(made, spec.target)
    if isinstance(fmap, torch.nn.Module):
        fmap = fmap.to(device=device, dtype=dtype)
    z0_t = _real_start(_as_tensor(z0, "z0", spec.target), spec.target).to(
        device=device, dtype=dtype
    )
    x = None if inputs is None else _as_tensor(inputs, "inputs", spec.target).to(device=device)
    if x is not None and x.is_floating_point():
        x = x.to(dtype=dtype)
    return from_map(
        fmap,
        z0_t,
        x,
        name=cfg.problem_name,
        kind="python",
        what=f"the map from {spec.target}",
        form=spec.form,
        description=f"{spec.form} from {spec.target}",
        timeout=cfg.run.timeout,
    )


def _number_or_text(value: Any) -> Any:
    if isinstance(value, str) and NUMBER.match(value.strip()):
        return float(value)
    return value


def _as_tensor(value: Any, what: str, target: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            "problem.target", f"the {what} from {target} is not a tensor: {exc}".splitlines()[0]
        ) from None
    if tensor.is_meta:  # a shape without values: moving it to the run's device fails in torch
        raise ConfigError(
            "problem.target", f"the {what} from {target} is a meta tensor (no values); give values"
        )
    return tensor


def _real_start(z0: torch.Tensor, target: str) -> torch.Tensor:
    """The factory's z0 must be real numbers, and at least one of them."""
    key = "problem.target"
    if z0.is_complex() or z0.dtype == torch.bool:
        raise ConfigError(key, f"the start z0 from {target} must be real numbers, got {z0.dtype}")
    if z0.numel() == 0:
        raise ConfigError(key, f"the start z0 from {target} is empty; give it at least one number")
    return z0


def _unpack(made: Any, target: str) -> tuple[Callable[..., Any], Any, Any]:
    """(map, z0, inputs) from what the factory returned (inputs None when it gave none)."""
    inputs = None
    if isinstance(made, Mapping):
        fmap = made.get("map", made.get("f"))
        z0 = made.get("z0")
        inputs = made.get("inputs", made.get("x"))
    elif isinstance(made, tuple) and len(made) in (2, 3):
        fmap, z0, *rest = made
        inputs = rest[0] if rest else None
    else:
        raise ConfigError(
            "problem.target",
            f"{target} must return (map, z0), (map, z0, inputs) or {{'map': ..., 'z0': ..., 'inputs': ...}}",
        )
    if not callable(fmap) or z0 is None:
        raise ConfigError("problem.target", f"{target} must return a callable map and a start z0")
    return fmap, z0, inputs
