"""The Problem object: a batched fixed-point map / residual with honest evaluation counting.

Every evaluation a solver (ours or a peer's) makes goes through ``Problem.f``, ``Problem.g``,
``Problem.jacobian``, ``Problem.jvp`` or ``Problem.vjp``; each bumps the per-sample counters, so the
counts in a result are comparable across solvers.

Contract for ``func``: it maps a ``(batch, n)`` tensor and the parameter dict to a ``(batch, n)`` tensor,
row by row (row b of the output depends only on row b of the input and on row b of every per-sample
parameter). The Jacobian helpers rely on it. A problem whose state has another shape (an image
``(C, H, W)``, a sequence ``(T, d)``) flattens it at this edge: ``state_shape`` records one sample's
shape, so results can give z* back in it, while solvers only ever see ``(batch, n)`` rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch.func import jvp as _func_jvp

from deqcli.deadline import checkpoint
from deqcli.result import Counts

Form = Literal["fixed_point", "residual"]
BatchedFunc = Callable[[torch.Tensor, Mapping[str, torch.Tensor]], torch.Tensor]
# (z, params) -> (f(z), s, W) with J_f(z) = diag(s) W per sample: s (batch, n), W (n, n) shared.
RowScaledJacobian = Callable[
    [torch.Tensor, Mapping[str, torch.Tensor]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]

# Jacobians of up to this many rows are pulled back row by row (see _reverse).
SCALAR_PULLBACK_MAX = 16
# Dense Jacobians beyond this many bytes (over the whole batch) are refused with a clear error.
DENSE_JACOBIAN_LIMIT_BYTES = 2 * 1024**3
# A problem is packed (see ``Problem.pack``) once at most this fraction of its samples still run.
# Taking rows out costs a copy in and out per evaluation and a matrix product over fewer rows
# runs at a lower rate, so a few stopped samples gain nothing: on a layer whose 32 samples stop
# within three iterations of each other (n = 512) packing every change cost 5–10 % of the run.
PACK_FRACTION = 0.5


@dataclass
class Structure:
    """What the problem's construction tells us without computing anything.

    ``lipschitz_bound`` is a proven global bound on the fixed-point map's Lipschitz constant (2-norm),
    with ``lipschitz_reason`` saying why it holds. ``hessian`` is the constant Hessian of a quadratic
    loss for gradient descent problems (so L = max |1 − η λ_i(H)| can be stated exactly).
    """

    lipschitz_bound: float | None = None
    lipschitz_reason: str = ""
    hessian: torch.Tensor | None = None
    lr: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Counter:
    """Per-sample counters of map evaluations, Jacobians, JVPs and VJPs.

    A batched evaluation counts for the samples still running: the driver sets ``running`` before
    each step, so a sample that stopped at iteration k shows the evaluations of its k iterations,
    the same as if it had been solved alone (a per-sample peer's count). Before the first step
    (the start's evaluation) every sample counts.
    """

    def __init__(self, batch: int) -> None:
        self.batch = batch
        self.reset()

    def reset(self) -> None:
        """Zero every counter and count every sample again (a new solve starts)."""
        self.nfev = [0] * self.batch
        self.njev = [0] * self.batch
        self.jvp = [0] * self.batch
        self.vjp = [0] * self.batch
        self._running: list[bool] | None = None

    @property
    def running(self) -> list[bool] | None:
        """Which samples a batched evaluation counts for now (None: all of them)."""
        return self._running

    @running.setter
    def running(self, mask: torch.Tensor | Sequence[bool] | None) -> None:
        # Read once per iteration here, so counting itself never waits on the device.
        self._running = None if mask is None else [bool(v) for v in _host_list(mask)]

    def bump(self, kind: str, rows: int | None = None, times: int = 1) -> None:
        """Count one batched evaluation of ``kind`` for every running sample; ``rows`` names one."""
        counts = getattr(self, kind)
        if rows is not None:
            counts[rows] += times
            return
        running = self._running
        for b in range(self.batch):
            if running is None or running[b]:
                counts[b] += times

    def snapshot(self) -> Counts:
        """An immutable copy for a SolveResult."""
        return Counts(list(self.nfev), list(self.njev), list(self.jvp), list(self.vjp))


@dataclass
class Problem:
    """A batch of fixed-point problems z = f(z) (equivalently roots of g(z) = z − f(z)).

    ``func`` computes the map in the problem's own ``form``: f for ``fixed_point``, g for ``residual``.
    ``row_scaled_jacobian``, for maps that are an activation of an affine map (the tanh layer),
    gives f and J_f = diag(s) W in closed form: a dense Jacobian is one scaling of W (O(n²) per
    sample instead of autograd's n pull-backs, O(n³)) and a Jacobian-vector product one matmul.
    """

    name: str
    kind: str
    form: Form
    func: BatchedFunc
    z0: torch.Tensor
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    structure: Structure = field(default_factory=Structure)
    description: str = ""
    batched_params: frozenset[str] = frozenset()
    state_shape: tuple[int, ...] | None = None
    row_scaled_jacobian: RowScaledJacobian | None = None
    counter: Counter = field(init=False)
    # Set by the driver while some samples have stopped (see ``pack``); copies start without it.
    _packing: _Packing | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.z0.dim() != 2:
            raise ValueError(f"z0 must be (batch, n), got shape {tuple(self.z0.shape)}")
        if self.state_shape is not None and math.prod(self.state_shape) != self.z0.shape[1]:
            raise ValueError(
                f"state_shape {self.state_shape} does not hold the {self.z0.shape[1]} entries of a row"
            )
        self.counter = Counter(self.z0.shape[0])

    # -- shape and placement -------------------------------------------------------------
    @property
    def batch(self) -> int:
        """Number of samples."""
        return self.z0.shape[0]

    @property
    def dim(self) -> int:
        """Dimension n of one sample's unknown."""
        return self.z0.shape[1]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one sample's state (``(n,)`` unless the problem flattens another shape)."""
        return self.state_shape if self.state_shape is not None else (self.dim,)

    def unflatten(self, z: torch.Tensor) -> torch.Tensor:
        """(batch, n) rows as states: (batch, *sample_shape)."""
        return z.reshape(z.shape[0], *self.sample_shape)

    @property
    def device(self) -> torch.device:
        """Where the problem's tensors live."""
        return self.z0.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the iterates."""
        return self.z0.dtype

    # -- evaluating only the samples still running ----------------------------------------------
    def pack(self, running: torch.Tensor | None, z: torch.Tensor | None = None) -> None:
        """Evaluate only the ``running`` rows from now on (None: every row again), once they
        are at most PACK_FRACTION of the batch.

        The driver calls this when samples stop. A stopped sample's result is final and the
        driver puts its row back at the end (or at the next change of the running rows), so
        whatever a solver computes for it is never read: its map becomes the constant ``f ≡ z``
        (its final iterate, given in ``z``), with g = 0 there, J_f = 0 and J_g = I (well posed
        for every solver's arithmetic), and costs nothing. The running rows' values are those of
        the whole problem: rows are independent (the ``func`` contract). A batch whose last
        samples run for hundreds of iterations after the others stopped then pays for those
        samples alone.
        """
        if running is None or z is None:
            self._packing = None
            return
        index = running.nonzero().flatten()
        if index.numel() > PACK_FRACTION * self.batch:
            self._packing = None
            return
        self._packing = _Packing(index=index, value=z.detach(), params=self.params_at(index))

    @property
    def packed(self) -> bool:
        """True while only the running rows are evaluated (see ``pack``)."""
        return self._packing is not None

    def _packed(
        self, z: torch.Tensor, params: Mapping[str, torch.Tensor] | None
    ) -> _Packing | None:
        """The packing that applies to an evaluation at ``z``: none with explicit parameters (an
        analysis's copy of the batch) or another number of rows."""
        if params is not None or z.shape[0] != self.batch:
            return None
        return self._packing

    def _evaluate(self, z: torch.Tensor, params: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
        """``func`` at ``z``: on the running rows alone while the problem is packed."""
        packing = self._packed(z, params)
        if packing is None:
            return self.func(z, self.params if params is None else params)
        part = self.func(z.index_select(0, packing.index), packing.params)
        # A stopped row: f ≡ its final z, so g(z) = z − that in the residual form.
        rest = packing.value if self.form == "fixed_point" else z - packing.value
        return rest.index_copy(0, packing.index, part)

    def closed_form_jacobian(
        self, z: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(f(z), s, W) with J_f = diag(s) W from ``row_scaled_jacobian``, uncounted (packed as
        ``raw_f`` is: a stopped row has f ≡ its final z and s = 0)."""
        if self.row_scaled_jacobian is None:
            raise ValueError(f"problem '{self.name}' has no closed-form Jacobian")
        checkpoint()
        packing = self._packed(z, params)
        if packing is None:
            return self.row_scaled_jacobian(z, self.params if params is None else params)
        part, scale, weight = self.row_scaled_jacobian(
            z.index_select(0, packing.index), packing.params
        )
        f = packing.value.index_copy(0, packing.index, part)
        scale = scale.new_zeros(z.shape).index_copy(0, packing.index, scale)
        return f, scale, weight

    # -- the raw (uncounted) maps, used by the counted wrappers and by autodiff ---------------
    def raw_f(
        self, z: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The fixed-point map without counting (for autodiff compositions)."""
        checkpoint()  # run.timeout and a held Ctrl-C stop every evaluation, counted or not
        out = self._evaluate(z, params)
        return out if self.form == "fixed_point" else z - out

    def raw_g(
        self, z: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The residual g(z) = z − f(z) without counting."""
        checkpoint()
        out = self._evaluate(z, params)
        return z - out if self.form == "fixed_point" else out

    # -- counted evaluations -------------------------------------------------------------
    def f(self, z: torch.Tensor) -> torch.Tensor:
        """The fixed-point map f(z), counted as one evaluation per sample."""
        self.counter.bump("nfev")
        return self.raw_f(z)

    def g(self, z: torch.Tensor) -> torch.Tensor:
        """The residual g(z) = z − f(z), counted as one evaluation per sample."""
        self.counter.bump("nfev")
        return self.raw_g(z)

    def jvp(
        self, z: torch.Tensor, v: torch.Tensor, *, of: str = "g"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(g(z), J_g(z) v) per sample (or of f with ``of='f'``); counted as one JVP."""
        self.counter.bump("jvp")
        fn = self.raw_g if of == "g" else self.raw_f
        return _func_jvp(fn, (z,), (v,))

    def vjp(
        self, z: torch.Tensor, u: torch.Tensor, *, of: str = "g"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(g(z), uᵀ J_g(z)) per sample (or of f with ``of='f'``); counted as one VJP."""
        self.counter.bump("vjp")
        value, grad = _reverse(self.raw_g if of == "g" else self.raw_f, z, u, batched=False)
        return value, grad

    def jacobian(self, z: torch.Tensor, *, of: str = "g") -> tuple[torch.Tensor, torch.Tensor]:
        """(g(z), J) with J of shape (batch, n, n), the per-sample Jacobian; counted as one njev.

        Rows are independent, so pulling the same basis vector e_i back through every row at once
        gives row i of every sample's Jacobian: n reverse passes, vectorised by autograd.
        """
        self.check_dense_fits()
        self.counter.bump("njev")
        n = self.dim
        if self.row_scaled_jacobian is not None:
            f, scale, weight = self.closed_form_jacobian(z)
            if of == "f":
                return f, scale[:, :, None] * weight
            # I − diag(s) W written in one pass over one (B, n, n) tensor, not two.
            jac_g = torch.mul(scale[:, :, None], weight.neg())
            jac_g.diagonal(dim1=-2, dim2=-1).add_(1.0)
            return z - f, jac_g
        basis = torch.eye(n, dtype=z.dtype, device=z.device)[:, None, :].expand(n, z.shape[0], n)
        value, rows = _reverse(self.raw_g if of == "g" else self.raw_f, z, basis, batched=True)
        return value, rows.permute(1, 0, 2)  # rows[i, b] = e_iᵀ J_b  ->  [b, i, :]

    def check_dense_fits(self) -> None:
        """Refuse dense Jacobians that would not fit in memory, suggesting a matrix-free solver."""
        need = self.batch * self.dim * self.dim * self.z0.element_size() * 3
        if need > DENSE_JACOBIAN_LIMIT_BYTES:
            from deqcli.errors import UsageError

            raise UsageError(
                f"dense Jacobians need about {need / 1024**3:.1f} GiB for batch {self.batch} × n {self.dim}"
                " (limit 2 GiB); use a matrix-free solver such as newton-krylov, anderson or broyden"
            )

    # -- variants ------------------------------------------------------------------------
    def subset(self, rows: Sequence[int] | torch.Tensor) -> Problem:
        """Some samples as a problem of their own, with a fresh counter.

        The one way to take rows of a problem: every per-sample tensor (inputs x of any shape
        (batch, ...), per-sample parameters) is sliced with the same rows, so the subset's map on
        its rows equals the whole problem's map on those rows.
        """
        index = torch.as_tensor(rows, dtype=torch.long).reshape(-1).to(self.device)
        return replace(self, z0=self.z0.index_select(0, index), params=self.params_at(index))

    def params_at(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        """The parameters for the samples ``index``: per-sample ones sliced, shared ones as they
        are."""
        return {
            k: v.index_select(0, index.to(v.device)) if k in self.batched_params else v
            for k, v in self.params.items()
        }

    def select(self, index: int) -> Problem:
        """Sample ``index`` as a problem of batch 1 with its own counter (for per-sample peers)."""
        return self.subset([index])

    def with_params(self, **overrides: torch.Tensor) -> Problem:
        """A copy with some parameters replaced (sensitivity, sweeps)."""
        return replace(self, params={**self.params, **overrides})

    def with_start(self, z0: torch.Tensor) -> Problem:
        """A copy that starts from ``z0`` (warm starts)."""
        return replace(self, z0=z0)


@dataclass
class _Packing:
    """What a packed problem evaluates: the running rows, their parameters, the stopped rows' z."""

    index: torch.Tensor  # (R,) the running rows
    value: torch.Tensor  # (B, n) each stopped row's final z (its map's constant value)
    params: dict[str, torch.Tensor]  # the problem's parameters on the running rows


def _host_list(mask: torch.Tensor | Sequence[bool]) -> list[bool]:
    return mask.tolist() if isinstance(mask, torch.Tensor) else list(mask)


def _reverse(
    fn: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    cotangents: torch.Tensor,
    *,
    batched: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fn(z) and the pull-back of ``cotangents`` (one, or a stack of them) by reverse-mode autograd.

    Start-up cost shapes this: torch.func.vjp imports torch._dynamo (seconds) and autograd.grad
    with tensor grad_outputs imports sympy (over a second). Pulling back the scalar ⟨fn(z), u⟩ needs
    neither, so single VJPs and small stacks use it; large stacks use one vectorised call.
    """
    with torch.enable_grad():
        zz = z.detach().requires_grad_(True)
        value = fn(zz)
        if not value.requires_grad:  # the map does not depend on z at all
            return value.detach(), torch.zeros(cotangents.shape, dtype=z.dtype, device=z.device)
        if batched and cotangents.shape[0] > SCALAR_PULLBACK_MAX:
            grad = _pull_batched(value, zz, cotangents)
        else:
            stack = cotangents if batched else cotangents[None]
            rows = [
                _pull_scalar(value, zz, u, retain=i < len(stack) - 1) for i, u in enumerate(stack)
            ]
            grad = torch.stack(rows) if batched else rows[0]
    if grad is None:
        grad = torch.zeros(cotangents.shape, dtype=z.dtype, device=z.device)
    return value.detach(), grad


def _pull_batched(
    value: torch.Tensor, z: torch.Tensor, cotangents: torch.Tensor
) -> torch.Tensor | None:
    """The pull-backs of a stack of cotangents (k, *value.shape) in one vectorised backward pass.

    ``torch.autograd.grad(..., is_grads_batched=True)`` does exactly this, but its argument check
    for tensor grad_outputs imports torch.fx's symbolic shapes and with them sympy: 0.5–0.9 s in a
    fresh process, paid by the first dense Jacobian of every `deq solve`. The same vectorised
    call of autograd's engine, without that check, costs nothing once: the engine checks the
    shapes itself. Where this torch lacks those internals, the public call is used.
    """
    try:
        from torch._vmap_internals import _vmap
        from torch.autograd.graph import _engine_run_backward
    except ImportError:
        _vmap = None
    if _vmap is not None and cotangents.shape[1:] == value.shape:

        def pull(u: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
            return _engine_run_backward(
                (value,), (u,), True, False, (z,), True, accumulate_grad=False
            )

        try:
            (grad,) = _vmap(pull, 0, 0, allow_none_pass_through=True)(cotangents)
            return grad
        except (TypeError, AttributeError):  # internals of another signature: the public call
            pass
    (grad,) = torch.autograd.grad(value, z, cotangents, is_grads_batched=True, allow_unused=True)
    return grad


def _pull_scalar(
    value: torch.Tensor, z: torch.Tensor, u: torch.Tensor, *, retain: bool
) -> torch.Tensor:
    (grad,) = torch.autograd.grad((value * u).sum(), z, retain_graph=retain, allow_unused=True)
    return torch.zeros_like(z) if grad is None else grad
