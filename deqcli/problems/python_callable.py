"""Problems from the user's own Python code: ``target: path/to/file.py:factory`` or ``module:factory``.

This imports and runs that code, with the user's permissions. The factory is called with the
config's ``args`` (plus ``device`` and ``dtype`` if its signature accepts them) and returns
``(map, z0)`` or ``{"map": map, "z0": z0}``. The map takes a (batch, n) tensor to a (batch, n) tensor
row by row; it may be a plain function or a ``torch.nn.Module`` (whose parameters become the
problem's named parameters, so sensitivities work).
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

from deqcli.config import NUMBER, Config, PythonSpec
from deqcli.consent import UserCodeError, mark_user_code, running_user_code
from deqcli.errors import ConfigError
from deqcli.problems.arrays import as_batch
from deqcli.problems.base import Problem


def load_factory(target: str, base_dir: Path) -> Callable[..., Any]:
    """Import ``file.py:name`` (relative to the config) or ``module:name`` and return the factory."""
    where, _, attr = target.rpartition(":")
    key = "problem.target"
    if where.endswith(".py"):
        path = Path(where)
        if not path.is_absolute():
            path = base_dir / path
        if not path.exists():
            raise ConfigError(key, f"file '{where}' does not exist (looked in {path.parent})")
        module_name = f"deq_user_{abs(hash(str(path.resolve())))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(key, f"cannot import '{where}'")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        mark_user_code(str(path))
        try:
            with running_user_code(target):
                spec.loader.exec_module(module)
        except Exception as exc:  # the user's module failed to import: report it as their input
            if isinstance(exc, UserCodeError):
                raise
            raise ConfigError(
                key, f"importing '{where}' failed: {type(exc).__name__}: {exc}"
            ) from None
    else:
        try:
            with running_user_code(target):
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


def build(cfg: Config, device: torch.device, dtype: torch.dtype) -> Problem:
    """Call the user's factory and wrap its map as a Problem."""
    spec = cfg.problem
    if not isinstance(spec, PythonSpec):
        raise TypeError("python_callable.build needs a PythonSpec")
    factory = load_factory(spec.target, cfg.base_dir)
    # YAML 1.1 reads 1e-3 as a string; args are meant as numbers when they look like numbers.
    kwargs = {k: _number_or_text(v) for k, v in spec.args.items()}
    accepted = inspect.signature(factory).parameters
    for name, value in (("device", device), ("dtype", dtype)):
        if name in accepted and name not in kwargs:
            kwargs[name] = value
    try:
        with running_user_code(spec.target):
            made = factory(**kwargs)
    except UserCodeError:
        raise
    except Exception as exc:  # the user's factory failed: report it as their input, in one line
        raise ConfigError(
            "problem.args", f"calling {spec.target} failed: {type(exc).__name__}: {exc}"
        ) from None
    fmap, z0 = _unpack(made, spec.target)
    z0_t = _start(z0, spec.target, device, dtype)
    z0_t = as_batch(
        z0_t,
        "problem.target",
        z0_t.shape[0] if z0_t.dim() == 2 else 1,
        z0_t.shape[-1] if z0_t.dim() else 1,
    )

    params: dict[str, torch.Tensor] = {}
    if isinstance(fmap, torch.nn.Module):
        module = fmap.to(device=device, dtype=dtype)
        params = {name: p.detach() for name, p in module.named_parameters()}

        def func(z: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
            with running_user_code(spec.target):
                return torch.func.functional_call(module, dict(p), (z,))
    else:

        def func(z: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
            with running_user_code(spec.target):
                return fmap(z)

    _probe(func, z0_t, params, spec.target)
    return Problem(
        name=cfg.problem_name,
        kind="python",
        form=spec.form,
        func=func,
        z0=z0_t,
        params=params,
        description=f"{spec.form} from {spec.target}",
    )


def _start(z0: Any, target: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The factory's z0 as a real tensor on the device: numbers only, not empty, finite."""
    key = "problem.target"
    try:
        tensor = torch.as_tensor(z0)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            key,
            f"{target} must return a start z0 of numbers, got {type(z0).__name__}: "
            + str(exc).splitlines()[0],
        ) from None
    if tensor.is_complex() or tensor.dtype == torch.bool:
        raise ConfigError(
            key, f"the start z0 from {target} must be real numbers, got {tensor.dtype}"
        )
    if tensor.numel() == 0:
        raise ConfigError(key, f"the start z0 from {target} is empty; give it at least one number")
    if tensor.dim() > 2:
        raise ConfigError(
            key,
            f"the start z0 from {target} must be a vector or (batch, n), got shape {tuple(tensor.shape)}",
        )
    return tensor.to(device=device, dtype=dtype)


def _number_or_text(value: Any) -> Any:
    if isinstance(value, str) and NUMBER.match(value.strip()):
        return float(value)
    return value


def _unpack(made: Any, target: str) -> tuple[Callable[..., Any], Any]:
    if isinstance(made, Mapping):
        fmap = made.get("map", made.get("f"))
        z0 = made.get("z0")
    elif isinstance(made, tuple) and len(made) == 2:
        fmap, z0 = made
    else:
        raise ConfigError(
            "problem.target", f"{target} must return (map, z0) or {{'map': ..., 'z0': ...}}"
        )
    if not callable(fmap) or z0 is None:
        raise ConfigError("problem.target", f"{target} must return a callable map and a start z0")
    return fmap, z0


def _probe(
    func: Callable[..., torch.Tensor],
    z0: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    target: str,
) -> None:
    key = "problem.target"
    try:
        with torch.no_grad():
            out = func(z0, params)
    except UserCodeError:
        raise
    except Exception as exc:  # the user's map failed on its own start: bad input, not our bug
        raise ConfigError(
            key, f"the map from {target} failed at z0: {type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(z0.shape):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(
            key, f"the map must return a tensor of shape {tuple(z0.shape)}, got {shape}"
        )
    if not out.is_floating_point():  # complex, integer or boolean values cannot be iterated
        raise ConfigError(
            key, f"the map from {target} must return real floating-point values, got {out.dtype}"
        )
    if not bool(torch.isfinite(out).all()):
        raise ConfigError(key, f"the map from {target} is not finite at z0; choose another start")
