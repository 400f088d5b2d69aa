"""``kind: module``: an ``nn.Module`` from the user's code whose forward is the map f(z, x).

The factory (``target``, called with ``args``) builds the module; ``weights`` loads a checkpoint
(a state_dict, or the sub-tree ``key`` of one) with strict or lenient key matching; ``mode`` puts
it in eval (default) or train mode; ``params`` then replaces parameters or buffers by state_dict
name (a number fills one: that is how a sweep moves a scale buffer); ``inputs`` is the batch x.
The rest (state shapes, per-sample inputs, checks of every call) is ``problems.model.from_map``.
"""

from __future__ import annotations

import difflib
from pathlib import Path

import torch

from deqcli.config import WEIGHTS_FILE_SUFFIXES, Config, ModuleSpec, WeightsSpec
from deqcli.errors import ConfigError
from deqcli.problems import checkpoints
from deqcli.problems.arrays import ArrayBuilder
from deqcli.problems.base import Problem
from deqcli.problems.model import from_map
from deqcli.problems.python_callable import call_factory, load_factory


def build(cfg: Config, arrays: ArrayBuilder) -> Problem:
    """Build the module, load its weights, set its parameters and wrap it with its inputs."""
    spec = cfg.problem
    if not isinstance(spec, ModuleSpec):
        raise TypeError("module.build needs a ModuleSpec")
    factory = load_factory(spec.target, cfg.base_dir, cfg.run.timeout)
    module = call_factory(
        factory, spec.args, spec.target, arrays.device, arrays.dtype, cfg.run.timeout
    )
    if not isinstance(module, torch.nn.Module):
        raise ConfigError(
            "problem.target",
            f"{spec.target} must return a torch.nn.Module, got {type(module).__name__} "
            "(use kind: python for a plain function)",
        )
    if spec.weights is not None:
        load_weights(module, spec.weights, strict=spec.strict, base_dir=cfg.base_dir)
    module = module.to(device=arrays.device, dtype=arrays.dtype)
    module.train(spec.mode == "train")
    set_tensors(module, spec, arrays)

    inputs = None if spec.inputs is None else arrays.build(spec.inputs, "problem.inputs")
    if inputs is not None and spec.batch is not None:
        if inputs.dim() == 0 or spec.batch > inputs.shape[0]:
            rows = inputs.shape[0] if inputs.dim() else 0
            raise ConfigError("problem.batch", f"is {spec.batch} but the inputs have {rows} rows")
        inputs = inputs[: spec.batch]  # the first rows: a quick look at a few samples
    z0: torch.Tensor | None = arrays.build(spec.initial, "problem.initial")
    fill = 0.0
    if z0.dim() == 0:  # a number fills the state, whatever its shape turns out to be
        fill, z0 = float(z0), None
    what = f"the module from {spec.target}"
    problem = from_map(
        module,
        z0,
        inputs,
        name=cfg.problem_name,
        kind="module",
        what=what,
        form=spec.form,
        state_shape=spec.state_shape,
        batch=spec.batch,
        fill=fill,
        dtype=arrays.dtype,
        device=arrays.device,
        timeout=cfg.run.timeout,
    )
    problem.description = _describe(spec, module, problem)
    return problem


def load_weights(
    module: torch.nn.Module, weights: WeightsSpec, *, strict: bool, base_dir: Path
) -> None:
    """Load a checkpoint (or its sub-tree ``weights.key``) into ``module``; mismatches are errors."""
    key = "problem.weights"
    path = checkpoints.locate(weights.file, base_dir, f"{key}.file", WEIGHTS_FILE_SUFFIXES)
    given = checkpoints.state_dict(
        path, weights.file, f"{key}.file", weights.key, entry_key=f"{key}.key"
    )
    expected = module.state_dict()
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing {checkpoints.listing(missing)}")
        if unexpected:
            parts.append(f"unexpected {checkpoints.listing(unexpected)}")
        hint = _prefix_hint(expected, given, weights.key)
        raise ConfigError(
            key,
            f"the keys of '{weights.file}' do not match the module: {'; '.join(parts)} ({hint})",
        )
    matching = {k: v for k, v in given.items() if k in expected}
    if not matching:
        raise ConfigError(
            key,
            f"no key of '{weights.file}' matches the module ({_prefix_hint(expected, given, weights.key)})",
        )
    for name, value in matching.items():
        want = tuple(expected[name].shape)
        if tuple(value.shape) != want:
            raise ConfigError(
                key,
                f"'{name}' has shape {tuple(value.shape)} in '{weights.file}' but {want} in the "
                "module; build the module to match (problem.args) or load another checkpoint",
            )
    with torch.no_grad():
        module.load_state_dict(matching, strict=False)


def _prefix_hint(
    expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], key: str | None
) -> str:
    """Suggest the ``weights.key`` that would make the names line up, when one would."""
    for name in given:
        for want in expected:
            if name.endswith("." + want):
                prefix = name[: -len(want) - 1]
                full = f"{key}.{prefix}" if key else prefix
                if all(f"{prefix}.{k}" in given for k in expected):
                    return f"set problem.weights.key: {full}"
    return "check problem.weights.key, or set problem.strict: false to load the keys that match"


def set_tensors(module: torch.nn.Module, spec: ModuleSpec, arrays: ArrayBuilder) -> None:
    """Replace parameters or buffers by state_dict name with the values ``spec.params`` gives."""
    if not spec.params:
        return
    named = dict(module.named_parameters())
    named.update(module.named_buffers())
    for name, value_spec in spec.params.items():
        key = f"problem.params.{name}"
        if name not in named:
            close = difflib.get_close_matches(name, list(named), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                key,
                f"the module has no parameter or buffer '{name}' ({hint}names: {checkpoints.listing(list(named))})",
            )
        target = named[name]
        value = arrays.build(value_spec, key)
        if value.dim() == 0:
            value = value.expand(target.shape)
        if tuple(value.shape) != tuple(target.shape):
            raise ConfigError(
                key,
                f"has shape {tuple(value.shape)} but '{name}' is {tuple(target.shape)}; give a number "
                "(fills it) or an array of that shape",
            )
        with torch.no_grad():
            target.copy_(value)


def _describe(spec: ModuleSpec, module: torch.nn.Module, problem: Problem) -> str:
    count = sum(p.numel() for p in module.parameters())
    shape = "×".join(map(str, problem.sample_shape))
    x = problem.params.get("x")
    inputs = f", x {'×'.join(map(str, x.shape[1:]))}" if x is not None and x.dim() > 1 else ""
    source = f" ← {Path(spec.weights.file).name}" if spec.weights is not None else ""
    return (
        f"{type(module).__name__} from {spec.target}{source}: z {shape}{inputs}, "
        f"{count:,} parameters, {spec.mode} mode"
    )
