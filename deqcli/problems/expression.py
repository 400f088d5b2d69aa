"""Problems written as text: ``fixed_point: cos(z)`` or ``residual: z**2 - 2``, and gradient descent."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.func import grad, vmap

from deqcli.config import Config, ExpressionSpec, GradientDescentSpec
from deqcli.errors import ConfigError
from deqcli.expr import Expression, ExpressionError, parse_expression
from deqcli.limits import Limits
from deqcli.problems.arrays import ArrayBuilder, as_batch
from deqcli.problems.base import Problem, Structure


def build_params(
    spec: ExpressionSpec | GradientDescentSpec, arrays: ArrayBuilder
) -> tuple[dict[str, Any], dict[str, torch.Tensor], torch.Tensor]:
    """Params (shared and per-sample, in the order written, plus n) and the start z0 (batch, n).

    The batch size is ``batch`` if given, else the rows of a 2-D ``initial``, else the length of the
    first ``batch_params`` entry, else 1. The dimension is ``dim``, else the length of ``initial``, else 1.
    """
    initial = (
        None if isinstance(spec.initial, str) else arrays.build(spec.initial, "problem.initial")
    )
    batch = spec.batch or (initial.shape[0] if initial is not None and initial.dim() == 2 else None)
    dim = spec.dim or (initial.shape[-1] if initial is not None and initial.dim() >= 1 else 1)
    env: dict[str, Any] = {"n": dim}
    for name, value in spec.params.items():
        env[name] = arrays.build(value, f"problem.params.{name}", env=env)
    sample: dict[str, torch.Tensor] = {}
    for name, value in spec.batch_params.items():
        key = f"problem.batch_params.{name}"
        tensor = arrays.build(value, key, env=env)
        if tensor.dim() == 0:
            raise ConfigError(key, "needs one entry per sample (a list)")
        batch = batch or tensor.shape[0]
        if tensor.shape[0] != batch:
            raise ConfigError(
                key, f"has {tensor.shape[0]} entries but the batch has {batch} samples"
            )
        sample[name] = tensor
        env[name] = tensor
    if initial is None:
        shared = {k: v for k, v in env.items() if k not in sample}
        initial = arrays.build(spec.initial, "problem.initial", env=shared)
    return env, sample, as_batch(initial, "problem.initial", batch or 1, dim)


def build(cfg: Config, arrays: ArrayBuilder) -> Problem:
    """Build an expression problem (fixed_point or residual form), vectorised over the batch with vmap."""
    spec = cfg.problem
    if not isinstance(spec, ExpressionSpec):
        raise TypeError("expression.build needs an ExpressionSpec")
    env, sample, z0 = build_params(spec, arrays)
    form = "fixed_point" if spec.fixed_point is not None else "residual"
    text = spec.fixed_point if spec.fixed_point is not None else spec.residual
    key = f"problem.{form}"
    expr = parse_expression(text or "", key=key, names=set(env) | {"z"})
    _check_cost(cfg, expr, env, sample, z0, "z")
    func = _vectorise(expr, "z", key, z0.shape[1], frozenset(sample))
    return _finish(cfg, "expression", form, func, z0, env, sample, f"{form}: {text}")


def build_gradient_descent(cfg: Config, arrays: ArrayBuilder) -> Problem:
    """w ← w − lr ∇L(w): the gradient comes from autodiff of the loss expression."""
    spec = cfg.problem
    if not isinstance(spec, GradientDescentSpec):
        raise TypeError("build_gradient_descent needs a GradientDescentSpec")
    env, sample, z0 = build_params(spec, arrays)
    expr = parse_expression(spec.loss, key="problem.loss", names=set(env) | {"w"})
    # The map evaluates the loss and differentiates it: about three evaluations' work.
    _check_cost(cfg, expr, env, sample, z0, "w", factor=3.0)
    lr = spec.lr
    sample_names = frozenset(sample)
    shared_names = [k for k in env if k not in sample_names]

    def loss(
        w: torch.Tensor, per_sample: Mapping[str, torch.Tensor], shared: Mapping[str, Any]
    ) -> torch.Tensor:
        value = expr.evaluate({**shared, **per_sample, "w": w}, dtype=w.dtype, device=w.device)
        if value.numel() != 1:
            raise ExpressionError(
                "problem.loss", f"the loss must be a scalar, got shape {tuple(value.shape)}"
            )
        if not value.is_floating_point():
            raise ExpressionError(
                "problem.loss",
                f"the loss must be a real number; this one gives "
                f"{str(value.dtype).removeprefix('torch.')} values (a condition has no gradient)",
            )
        return value.reshape(())

    def step(
        w: torch.Tensor, per_sample: Mapping[str, torch.Tensor], shared: Mapping[str, Any]
    ) -> torch.Tensor:
        return w - lr * grad(loss)(w, per_sample, shared)

    def func(z: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
        shared = {k: p[k] for k in shared_names}
        per_sample = {k: p[k] for k in sample_names}
        return vmap(step, in_dims=(0, 0, None))(z, per_sample, shared)

    _probe(func, z0, env, "problem.loss")
    problem = _finish(
        cfg,
        "gradient_descent",
        "fixed_point",
        func,
        z0,
        env,
        sample,
        f"w ← w − {lr}·∇[{spec.loss}]",
    )
    problem.structure = Structure(
        lr=lr, hessian=_constant_hessian(loss, z0, sample, env, shared_names)
    )
    if problem.structure.hessian is not None:
        eig = torch.linalg.eigvalsh(problem.structure.hessian.to(torch.float64))
        bound = float(torch.max(torch.abs(1 - lr * eig)))
        problem.structure.lipschitz_bound = bound
        problem.structure.lipschitz_reason = f"quadratic loss: L = max|1 − η λᵢ(H)| with λ(H) ∈ [{float(eig[0]):.4g}, {float(eig[-1]):.4g}]"
    return problem


def _check_cost(
    cfg: Config,
    expr: Expression,
    env: Mapping[str, Any],
    sample: Mapping[str, torch.Tensor],
    z0: torch.Tensor,
    var: str,
    *,
    factor: float = 1.0,
) -> None:
    """Refuse a map whose evaluation over the batch exceeds run.max_work or run.max_memory, from
    the actual shapes (one sample's view: z is (n,), a per-sample parameter one row)."""
    known: dict[str, Any] = {k: (tuple(v.shape[1:]) if k in sample else v) for k, v in env.items()}
    known[var] = (z0.shape[1],)
    Limits.of(cfg.run).check_expression(
        expr, known, batch=z0.shape[0], itemsize=z0.element_size(), factor=factor
    )


def _constant_hessian(
    loss: Any,
    z0: torch.Tensor,
    sample: Mapping[str, torch.Tensor],
    env: Mapping[str, Any],
    shared_names: list[str],
) -> torch.Tensor | None:
    """The Hessian of a quadratic loss (same at two distinct points), else None.

    Only computed for the first sample and small n: it backs an exact Lipschitz statement.
    """
    n = z0.shape[1]
    if n > 512:
        return None
    shared = {k: env[k] for k in shared_names}
    per = {k: v[0] for k, v in sample.items()}
    hess = torch.func.hessian(loss)
    h0 = hess(z0[0], per, shared)
    other = z0[0] + torch.linspace(0.3, 1.7, n, dtype=z0.dtype, device=z0.device)
    h1 = hess(other, per, shared)
    scale = float(h0.abs().max()) + 1e-300
    if not bool(torch.isfinite(h0).all()) or float((h0 - h1).abs().max()) > 1e-8 * scale:
        return None
    return h0


def _vectorise(expr: Expression, var: str, key: str, dim: int, sample_names: frozenset[str]) -> Any:
    def single(
        z: torch.Tensor, per_sample: Mapping[str, torch.Tensor], shared: Mapping[str, Any]
    ) -> torch.Tensor:
        out = expr.evaluate({**shared, **per_sample, var: z}, dtype=z.dtype, device=z.device)
        out = torch.as_tensor(out, dtype=z.dtype, device=z.device)
        if out.dim() == 0 or (out.numel() == 1 and dim == 1):
            out = out.reshape(1).expand(dim) if dim == 1 else out.expand(dim)
        if tuple(out.shape) != (dim,):
            raise ExpressionError(
                key,
                f"must give a vector of length {dim} (the size of z), got shape {tuple(out.shape)}",
            )
        return out

    batched = vmap(single, in_dims=(0, 0, None))

    def func(z: torch.Tensor, p: Mapping[str, Any]) -> torch.Tensor:
        per_sample = {k: p[k] for k in sample_names}
        shared = {k: v for k, v in p.items() if k not in sample_names}
        if z.shape[0] == 1:
            # A single problem needs no vmap; skipping it saves most of the per-call overhead.
            return single(z[0], {k: v[0] for k, v in per_sample.items()}, shared)[None]
        return batched(z, per_sample, shared)

    return func


def _probe(func: Any, z0: torch.Tensor, env: Mapping[str, Any], key: str) -> torch.Tensor:
    """Evaluate once at z0 so shape errors and non-finite values are reported as bad input."""
    try:
        out = func(z0, env)
    except ExpressionError:
        raise
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise ConfigError(
            key, f"cannot be evaluated at the initial point: {str(exc).splitlines()[0]}"
        ) from None
    bad = ~torch.isfinite(out).all(dim=1)
    if bool(bad.any()):
        b = int(torch.nonzero(bad)[0])
        raise ConfigError(
            key,
            f"is not finite at the initial point (sample {b}, z0 = {_short(z0[b])}); choose another initial",
        )
    return out


def _short(z: torch.Tensor) -> str:
    values = z.detach().cpu().tolist()
    text = ", ".join(f"{v:.4g}" for v in values[:4])
    return f"[{text}{', …' if len(values) > 4 else ''}]"


def _finish(
    cfg: Config,
    kind: str,
    form: str,
    func: Any,
    z0: torch.Tensor,
    env: Mapping[str, Any],
    sample: Mapping[str, torch.Tensor],
    description: str,
) -> Problem:
    params = {k: v for k, v in env.items() if isinstance(v, torch.Tensor)}
    for k, v in env.items():
        if not isinstance(v, torch.Tensor):
            params[k] = v  # plain ints such as n stay Python numbers for builders like ones(n)
    if kind != "gradient_descent":
        _probe(func, z0, params, f"problem.{form}")
    return Problem(
        name=cfg.problem_name,
        kind=kind,
        form=form,  # type: ignore[arg-type]
        func=func,
        z0=z0,
        params=params,
        description=description,
        batched_params=frozenset(sample),
    )
