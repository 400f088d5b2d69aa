"""A Problem from a model: a callable or ``nn.Module`` f(z[, x]) on states of any shape.

This is the edge where a model meets the driver. The model sees its own shapes: z as
(batch, *state_shape) (an image (C, H, W), a sequence (T, d), or a vector) and its inputs x as
(batch, ...). Solvers see (batch, n) rows: the problem flattens z after each call and unflattens it
before the next. The inputs are the per-sample parameter ``x``, so any subset of rows a solver, peer
or analysis takes (``Problem.subset``) carries the matching rows of x; a module's parameters and
floating-point buffers are the problem's named parameters under their state_dict names, so
sensitivities, gradcheck and sweeps address them as ``cell.conv1.weight``.

Every call of the model is checked: an exception, or an output whose shape is not z's, becomes a
``ModelError`` that names the config key, so the CLI prints one line instead of a traceback.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from deqcli import deadline
from deqcli.consent import UserCodeError, running_user_code, user_code_site
from deqcli.errors import ConfigError, describe
from deqcli.problems.base import Form, Problem

INPUTS = "x"


class ModelError(ConfigError, RuntimeError):
    """The user's map raised, or broke its contract (changed the shape of z), while being evaluated.

    A RuntimeError too, so the analyses that tolerate a map autodiff cannot handle (diagnostics)
    report it instead of stopping, while a solve stops with one line (exit code 2).
    """


def placement(
    fmap: Callable[..., Any], inputs: torch.Tensor | None
) -> tuple[torch.dtype | None, torch.device | None]:
    """Where a start made for ``fmap`` belongs: on the inputs' device, in their dtype when it is a
    floating one; else (or for the dtype of integer inputs) where the module's first floating
    parameter or buffer is. (None, None) for a plain callable without inputs: torch's defaults.

    A start made anywhere else would meet the map's own tensors on another device (a CUDA
    module given a CPU start) or in another dtype, and the map's first call would fail.
    """
    weight = None
    if isinstance(fmap, torch.nn.Module):
        tensors = (*fmap.parameters(), *fmap.buffers())
        weight = next((t for t in tensors if t.is_floating_point()), None)
    device = inputs.device if inputs is not None else None
    dtype = inputs.dtype if inputs is not None and inputs.is_floating_point() else None
    if weight is not None:
        device = device or weight.device
        dtype = dtype or weight.dtype
    return dtype, device


def module_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's parameters and floating-point buffers by state_dict name, detached."""
    out = {name: p.detach() for name, p in module.named_parameters()}
    for name, buf in module.named_buffers():
        if buf.is_floating_point():
            out[name] = buf.detach()
    return out


def from_map(
    fmap: Callable[..., torch.Tensor],
    z0: torch.Tensor | None,
    inputs: torch.Tensor | None = None,
    *,
    name: str,
    kind: str,
    key: str = "problem.target",
    what: str = "the map",
    form: Form = "fixed_point",
    state_shape: Sequence[int] | None = None,
    batch: int | None = None,
    fill: float = 0.0,
    dtype: torch.dtype | None = None,
    device: torch.device | None = None,
    description: str = "",
    check: bool = True,
    timeout: float | None = None,
) -> Problem:
    """Wrap ``fmap`` (called as ``fmap(z, x)`` when there are inputs, else ``fmap(z)``) as a Problem.

    ``z0`` is (batch, *state shape), or one state without the batch axis when it has at most one
    dimension (used for every sample). Without ``z0`` the start is ``fill`` everywhere, in the shape
    the module's ``init_state(x)`` returns, else ``state_shape``, else the shape of one call
    ``fmap(zeros like x, x)``, in ``dtype`` on ``device`` (default: those of x, else of the module's
    parameters; see ``placement``). The batch is the
    rows of ``inputs``, else of ``z0``, else ``batch``. Messages name ``key`` and call the map ``what``.
    ``check`` evaluates the map once at z0 (finite, rows independent) before anything else runs;
    a training layer that builds a problem per step skips it (every call's shape is checked anyway).
    Each of those checks gets ``timeout`` seconds (run.timeout): a map that does not return is one
    line of bad input, not a hang.
    """
    if inputs is not None and inputs.dim() == 0:
        raise ConfigError(key, "the inputs x need a batch axis: shape (batch, ...)")
    call = _Caller(fmap, inputs is not None, key, what)
    with bounded_load(timeout, key, what):
        z0 = _start(call, z0, inputs, state_shape, batch, fill, key, dtype, device)
    shape = tuple(z0.shape[1:])
    flat = z0.reshape(z0.shape[0], -1).clone()

    params: dict[str, torch.Tensor] = {}
    if isinstance(fmap, torch.nn.Module):
        params = module_tensors(fmap)
        if inputs is not None and INPUTS in params:
            raise ConfigError(
                key,
                f"the module has a parameter or buffer named '{INPUTS}', the name the inputs take; "
                "rename it",
            )
    func = call.batched(shape, tuple(params))
    if inputs is not None:
        params[INPUTS] = inputs
    if check:
        with bounded_load(timeout, key, what):
            _probe(func, flat, params, key, what)
    return Problem(
        name=name,
        kind=kind,
        form=form,
        func=func,
        z0=flat,
        params=params,
        description=description,
        batched_params=frozenset({INPUTS}) if inputs is not None else frozenset(),
        state_shape=shape,
    )


@contextmanager
def bounded_load(
    timeout: float | None, key: str, what: str, during: str = "while it was checked at the start"
) -> Iterator[None]:
    """The config's own code run while a problem loads (its import, its factory, the map's checks)
    gets ``timeout`` seconds (run.timeout): code that does not return is one line of bad input
    naming ``key``, not a hang. The block is the user's code for the watchdog (``deadline.user_code``):
    it stops it where the innermost frame is not torch's, ours or the import machinery."""
    try:
        with deadline.armed(timeout), deadline.user_code():
            yield
    except deadline.DeadlineExceeded:
        raise ConfigError(
            key,
            f"{what} did not return within run.timeout ({timeout:g} s) {during}; look for a loop "
            "in it that does not end, or raise run.timeout",
        ) from None


class _Caller:
    """Calls the user's map with the right arguments and turns its failures into ModelErrors."""

    def __init__(
        self, fmap: Callable[..., torch.Tensor], with_inputs: bool, key: str, what: str
    ) -> None:
        self.fmap = fmap
        self.with_inputs = with_inputs
        self.key = key
        self.what = what

    def __call__(
        self, z: torch.Tensor, x: torch.Tensor | None, weights: Mapping[str, torch.Tensor] | None
    ) -> Any:
        args = (z, x) if self.with_inputs else (z,)
        try:
            # Its prints go to stderr (--json - keeps stdout pure JSON); a sys.exit() in it is
            # one line of bad input.
            with running_user_code(self.what, key=self.key), deadline.user_code():
                if weights is not None and isinstance(self.fmap, torch.nn.Module):
                    return torch.func.functional_call(self.fmap, dict(weights), args)
                return self.fmap(*args)
        except (ModelError, UserCodeError, deadline.DeadlineExceeded):
            raise  # the last: run.timeout's watchdog stopped a call that overran it
        except Exception as exc:  # the user's code failed: their input, reported in one line
            site = user_code_site(exc)  # file.py:line in the config's own code, when it is there
            where = f" (at {site})" if site else ""
            raise ModelError(self.key, f"{self.what} raised {describe(exc)}{where}") from exc

    def batched(
        self, shape: tuple[int, ...], names: tuple[str, ...]
    ) -> Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]:
        """The (batch, n) → (batch, n) function the Problem evaluates."""
        module = isinstance(self.fmap, torch.nn.Module)

        def func(z: torch.Tensor, p: Mapping[str, torch.Tensor]) -> torch.Tensor:
            state = z.reshape(z.shape[0], *shape)
            out = self(state, p.get(INPUTS), {k: p[k] for k in names} if module else None)
            if not isinstance(out, torch.Tensor) or out.shape != state.shape:
                got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ModelError(
                    self.key,
                    f"{self.what} returned {got} for z of shape {tuple(state.shape)}; an "
                    "equilibrium map must return a tensor of z's shape",
                )
            if out.device != state.device:  # else the solver's arithmetic fails inside torch
                raise ModelError(
                    self.key,
                    f"{self.what} returned a tensor on {out.device} for z on {state.device}; "
                    "an equilibrium map must return z's device",
                )
            return out.reshape(z.shape[0], -1)

        return func


def _start(
    call: _Caller,
    z0: torch.Tensor | None,
    inputs: torch.Tensor | None,
    state_shape: Sequence[int] | None,
    batch: int | None,
    fill: float,
    key: str,
    dtype: torch.dtype | None,
    device: torch.device | None,
) -> torch.Tensor:
    """z0 as (batch, *state shape)."""
    rows = inputs.shape[0] if inputs is not None else batch
    if z0 is not None:
        if state_shape is not None and tuple(z0.shape) == tuple(state_shape):
            z0 = z0[None]  # one state, without the batch axis
        elif z0.dim() <= 1:
            z0 = z0.reshape(1, -1)
        if state_shape is not None and tuple(z0.shape[1:]) != tuple(state_shape):
            raise ConfigError(
                key,
                f"z0 has shape {tuple(z0.shape)}, which is neither one state {tuple(state_shape)} "
                f"nor (batch, {', '.join(map(str, state_shape))})",
            )
        if rows is not None and z0.shape[0] != rows:
            if z0.shape[0] != 1:
                raise ConfigError(
                    key,
                    f"z0 has {z0.shape[0]} rows but there are {rows} samples (the rows of x); "
                    "give one start per sample or a single one",
                )
            z0 = z0.expand(rows, *z0.shape[1:])
        return z0
    shape = _state_shape(call, inputs, state_shape, key)
    if shape is None:
        raise ConfigError(
            key,
            f"cannot tell the shape of z: give {_names(key)[0]} (one sample's shape), "
            f"{_names(key)[1]}, or an init_state(x) method on the module",
        )
    own_dtype, own_device = placement(call.fmap, inputs)
    dtype = dtype or own_dtype
    device = device or own_device
    return torch.full((rows or 1, *shape), fill, dtype=dtype, device=device)


def _state_shape(
    call: _Caller, inputs: torch.Tensor | None, given: Sequence[int] | None, key: str
) -> tuple[int, ...] | None:
    """One sample's state shape: init_state(x), else ``given``, else one call at z = 0 like x."""
    init = getattr(call.fmap, "init_state", None)
    if callable(init):
        try:
            with torch.no_grad():
                made = init(inputs)
        except Exception as exc:  # the user's method failed
            raise ConfigError(key, f"init_state(x) raised {describe(exc)}") from None
        if not isinstance(made, torch.Tensor) or made.dim() == 0:
            raise ConfigError(key, "init_state(x) must return a tensor of shape (batch, ...)")
        shape = tuple(made.shape[1:])
        if given is not None and tuple(given) != shape:
            # init_state wins; a state shape given beside it that disagrees would be ignored.
            raise ConfigError(
                key,
                f"{_names(key)[0]} is {tuple(given)} but init_state(x) gives {shape} per "
                f"sample; drop {_names(key)[0]} or make them agree",
            )
        return shape
    if given is not None:
        return tuple(given)
    if inputs is None:
        return None
    try:
        with torch.no_grad():
            out = call(torch.zeros_like(inputs), inputs, None)
    except ModelError as exc:
        raise ConfigError(
            key,
            f"cannot tell the shape of z: calling {call.what} with z = zeros like x failed "
            f"({exc.message}); give {_names(key)[0]} or an init_state(x) method",
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        raise ConfigError(key, f"{call.what} must return a tensor of shape (batch, ...)")
    return tuple(out.shape[1:])


def _probe(
    func: Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor],
    z0: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    key: str,
    what: str,
) -> None:
    """Evaluate once at z0 (finite, and rows independent of each other) before any solve."""
    with torch.no_grad():
        out = func(z0, params)
        if not out.is_floating_point():  # complex, integer or boolean values cannot be iterated
            raise ConfigError(
                key, f"{what} must return real floating-point values, got {out.dtype}"
            )
        if not bool(torch.isfinite(out).all()):
            raise ConfigError(key, f"{what} is not finite at z0; choose another start")
        if z0.shape[0] == 1:
            return
        # Solvers, peers and the Jacobian helpers rely on row b depending on row b only.
        try:
            alone = func(z0[:1], {k: v[:1] if k == INPUTS else v for k, v in params.items()})
        except ModelError as exc:
            raise ConfigError(
                key,
                f"{what} fails on one sample alone ({exc.message.removeprefix(what + ' ')}) {_INDEPENDENT}",
            ) from None
    tol = math.sqrt(torch.finfo(out.dtype).eps)
    gap = float((alone[0] - out[0]).abs().max())
    scale = 1.0 + float(out[0].abs().max())
    if not gap <= tol * scale:
        raise ConfigError(
            key,
            f"{what} gives sample 0 a different value alone than in the batch (by {gap:.3g}): {_INDEPENDENT}",
        )


_INDEPENDENT = (
    "samples must not depend on each other (BatchNorm in train mode, a closure over the whole "
    "batch); pass per-sample data as inputs x"
)


def _names(key: str) -> tuple[str, str]:
    """How the user gives a state shape and a start: config keys, or keyword arguments."""
    if key.startswith("problem."):
        return "problem.state_shape", "problem.initial"
    return "state_shape=", "z0"
