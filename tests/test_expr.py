"""Tests for the safe expression language (deqcli/expr/).

Expected values come from math/numpy computed independently of the implementation, from
analytic Jacobians, and from the definition of vmap (a loop over rows).
"""

from __future__ import annotations

import math
import operator
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.func import jacfwd, jacrev, vmap

from deqcli.expr import (
    CONSTANTS,
    FUNCTION_SPECS,
    FUNCTIONS,
    MAX_DEPTH,
    MAX_TEXT_LENGTH,
    Expression,
    ExpressionError,
    parse_expression,
)

F64 = torch.float64
F32 = torch.float32
CPU = torch.device("cpu")
DOTTIE = 0.7390851332151607
REPO = Path(__file__).resolve().parents[1]


def ev(text: str, dtype: torch.dtype = F64, **env: object) -> torch.Tensor:
    """Parse with exactly the given variables and evaluate."""
    expr = parse_expression(text, key="test.expr", names=env.keys())
    return expr.evaluate(env, dtype=dtype, device=CPU)


def as_np(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy()


def rejects(text: str, names: set[str] | frozenset[str] = frozenset({"z"}), key: str = "k.x"):
    with pytest.raises(ExpressionError) as info:
        parse_expression(text, key=key, names=names)
    return info.value


# ---------------------------------------------------------------------------------------------
# Values against independent computations
# ---------------------------------------------------------------------------------------------

Z = np.array([0.3, -0.7, 0.55, 0.1])
ZT = torch.tensor(Z, dtype=F64)


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


ELEMENTWISE_REFERENCE = {
    "sin": np.sin,
    "cos": np.cos,
    "tan": np.tan,
    "asin": np.arcsin,
    "acos": np.arccos,
    "atan": np.arctan,
    "sinh": np.sinh,
    "cosh": np.cosh,
    "tanh": np.tanh,
    "exp": np.exp,
    "expm1": np.expm1,
    "log": lambda x: np.log(np.abs(x)),
    "log1p": np.log1p,
    "log2": lambda x: np.log2(np.abs(x)),
    "log10": lambda x: np.log10(np.abs(x)),
    "sqrt": lambda x: np.sqrt(np.abs(x)),
    "abs": np.abs,
    "sign": np.sign,
    "sigmoid": sigmoid,
    "relu": lambda x: np.maximum(x, 0.0),
    "softplus": lambda x: np.log1p(np.exp(x)),
    "erf": lambda x: np.array([math.erf(v) for v in x]),
    "floor": np.floor,
    "ceil": np.ceil,
    "square": lambda x: x * x,
    "reciprocal": lambda x: 1.0 / x,
}
# log and sqrt are taken of abs(z) so that every reference value is real.
ABS_ARG = {"log", "log2", "log10", "sqrt"}


def test_every_elementwise_function_is_checked() -> None:
    elementwise = {n for n, spec in FUNCTION_SPECS.items() if spec.category == "elementwise"}
    assert elementwise == set(ELEMENTWISE_REFERENCE)


@pytest.mark.parametrize("name", sorted(ELEMENTWISE_REFERENCE))
def test_elementwise_functions(name: str) -> None:
    text = f"{name}(abs(z))" if name in ABS_ARG else f"{name}(z)"
    got = ev(text, z=ZT)
    np.testing.assert_allclose(as_np(got), ELEMENTWISE_REFERENCE[name](Z), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sum(z)", Z.sum()),
        ("prod(z)", Z.prod()),
        ("mean(z)", Z.mean()),
        ("norm(z)", np.linalg.norm(Z)),
        ("norm(z, 1)", np.abs(Z).sum()),
        ("norm(z, 3)", (np.abs(Z) ** 3).sum() ** (1 / 3)),
        ("max(z)", Z.max()),
        ("min(z)", Z.min()),
        ("max(z, 0.2)", np.maximum(Z, 0.2)),
        ("min(z, 0.2)", np.minimum(Z, 0.2)),
        ("cumsum(z)", np.cumsum(Z)),
        ("cumprod(z)", np.cumprod(Z)),
        ("sum(z) / n", Z.sum() / 4),
        ("norm(M)", np.sqrt(np.sum(np.arange(6.0) ** 2))),
        ("sum(M)", 15.0),
        ("cumsum(M)", np.cumsum(np.arange(6.0).reshape(2, 3), axis=0)),
        ("where(z > 0, z, 0.1 * z)", np.where(Z > 0, Z, 0.1 * Z)),
        ("where(z > 0, 1, 0)", (Z > 0).astype(float)),
        ("clamp(z, -0.5, 0.4)", np.clip(Z, -0.5, 0.4)),
        ("roll(z, 1)", np.roll(Z, 1)),
        ("roll(z, -1) - z", np.roll(Z, -1) - Z),
        ("concat(z, z[0:2])", np.concatenate([Z, Z[:2]])),
        ("concat(0, z, 1)", np.concatenate([[0.0], Z, [1.0]])),
        ("stack(z, 2 * z)", np.stack([Z, 2 * Z])),
        ("stack(1, 2, 3)", np.array([1.0, 2.0, 3.0])),
        ("dot(z, z)", Z @ Z),
        ("transpose(M)", np.arange(6.0).reshape(2, 3).T),
        ("transpose(z)", Z),
        ("atan2(z, 0.5)", np.arctan2(Z, 0.5)),
        ("pow(z, 2)", Z**2),
        ("pow(2, z)", 2.0**Z),
        ("logsumexp(z)", np.log(np.sum(np.exp(Z)))),
        ("softmax(z)", np.exp(Z) / np.exp(Z).sum()),
        ("diag(z)", np.diag(Z)),
        ("diag(M @ transpose(M))", [0 * 0 + 1 * 1 + 2 * 2, 3 * 3 + 4 * 4 + 5 * 5]),
        ("outer(z, z[0:2])", np.outer(Z, Z[:2])),
        ("pi * e", math.pi * math.e),
    ],
)
def test_function_values(text: str, expected: object) -> None:
    m = torch.arange(6.0, dtype=F64).reshape(2, 3)
    got = ev(text, z=ZT, n=4, M=m)
    np.testing.assert_allclose(
        as_np(got), np.asarray(expected, dtype=float), rtol=1e-13, atol=1e-15
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("arange(5)", np.arange(5.0)),
        ("arange(1, n + 1)", np.arange(1.0, 5.0)),
        ("arange(0, 1, 0.25)", np.array([0.0, 0.25, 0.5, 0.75])),
        ("arange(3, 0, -1)", np.array([3.0, 2.0, 1.0])),
        ("arange(2, 2)", np.zeros(0)),
        ("linspace(0, 1, 5)", np.linspace(0.0, 1.0, 5)),
        ("ones(3)", np.ones(3)),
        ("ones(2, n)", np.ones((2, 4))),
        ("zeros(n / 2)", np.zeros(2)),
        ("eye(3)", np.eye(3)),
        ("eye(2, 3)", np.eye(2, 3)),
        ("diag(arange(1, 4))", np.diag([1.0, 2.0, 3.0])),
        ("outer(arange(1, n + 1), ones(n)) / (2 * n)", np.outer(np.arange(1, 5), np.ones(4)) / 8),
    ],
)
def test_builders(text: str, expected: np.ndarray) -> None:
    got = ev(text, n=4)
    assert got.dtype == F64
    np.testing.assert_allclose(as_np(got), expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("z[0]", Z[0]),
        ("z[-1]", Z[-1]),
        ("z[n - 1]", Z[3]),
        ("z[1:]", Z[1:]),
        ("z[:-1]", Z[:-1]),
        ("z[::2]", Z[::2]),
        ("z[::-1]", Z[::-1]),
        ("z[-2::-2]", Z[-2::-2]),
        ("z[2:0:-1]", Z[2:0:-1]),
        ("z[3:1]", Z[3:1]),
        ("z[10:]", Z[10:]),
        ("z[-100:2]", Z[-100:2]),
        ("M[0, :]", np.arange(6.0).reshape(2, 3)[0, :]),
        ("M[:, 1]", np.arange(6.0).reshape(2, 3)[:, 1]),
        ("M[1]", np.arange(6.0).reshape(2, 3)[1]),
        ("M[-1, ::-1]", np.arange(6.0).reshape(2, 3)[-1, ::-1]),
        ("M[::-1, 1:]", np.arange(6.0).reshape(2, 3)[::-1, 1:]),
        ("M[1, 2]", 5.0),
        ("z[2 * 1 - 1]", Z[1]),
    ],
)
def test_indexing(text: str, expected: object) -> None:
    m = torch.arange(6.0, dtype=F64).reshape(2, 3)
    got = ev(text, z=ZT, n=4, M=m)
    np.testing.assert_array_equal(as_np(got), np.asarray(expected, dtype=float))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("z + 1", Z + 1),
        ("2 - z", 2 - Z),
        ("z * z / 3", Z * Z / 3),
        ("z ** 2 - 2", Z**2 - 2),
        ("2 ** z", 2.0**Z),
        ("-z", -Z),
        ("+z", Z),
        ("z % 0.25", np.mod(Z, 0.25)),
        ("-7 % 3", -7 % 3),
        ("7 % -3", 7 % -3),
        ("z // 0.25", np.floor_divide(Z, 0.25)),
        ("7 // 2", 3.0),
        ("(z > 0) * z", np.where(Z > 0, Z, 0.0)),
        ("where((z > 0) & (z < 0.5), 1, 0)", ((Z > 0) & (Z < 0.5)).astype(float)),
        ("where((z < 0) | (z > 0.5), 1, 0)", ((Z < 0) | (Z > 0.5)).astype(float)),
        ("where(~(z > 0), 1, 0)", (~(Z > 0)).astype(float)),
        ("where(z >= 0.3, 1, 0)", (Z >= 0.3).astype(float)),
        ("where(z <= 0.3, 1, 0)", (Z <= 0.3).astype(float)),
        ("where(z == 0.3, 1, 0)", (Z == 0.3).astype(float)),
        ("where(z != 0.3, 1, 0)", (Z != 0.3).astype(float)),
        ("1e-3 * z", 1e-3 * Z),
        ("2 ** 10", 1024.0),
        ("2 ** -1", 0.5),
        ("10 / 4", 2.5),
    ],
)
def test_operators(text: str, expected: object) -> None:
    got = ev(text, z=ZT)
    np.testing.assert_allclose(as_np(got), np.asarray(expected, dtype=float), rtol=1e-15, atol=0)


def test_matmul_and_docs_examples() -> None:
    w = np.array([[0.2, -0.1, 0.05], [0.3, 0.1, -0.2], [0.0, 0.4, 0.1]])
    x = np.array([0.1, -0.2, 0.3])
    z = np.array([0.5, 0.25, -0.5])
    got = ev("tanh(W @ z + x)", W=torch.tensor(w), z=torch.tensor(z), x=torch.tensor(x))
    np.testing.assert_allclose(as_np(got), np.tanh(w @ z + x), rtol=1e-15)

    a = ev("outer(arange(1, n + 1), ones(n)) / (2 * n)", n=3)
    got = ev("1 / (1 - A @ z)", A=a, z=torch.tensor(z))
    a_ref = np.outer([1.0, 2.0, 3.0], np.ones(3)) / 6
    np.testing.assert_allclose(as_np(got), 1 / (1 - a_ref @ z), rtol=1e-15)

    got = ev("r * z * (1 - z)", r=3.5, z=torch.tensor(z))
    np.testing.assert_allclose(as_np(got), 3.5 * z * (1 - z), rtol=1e-15)


def test_known_answers() -> None:
    root = torch.tensor([math.sqrt(2.0)], dtype=F64)
    assert abs(ev("z**2 - 2", z=root).item()) < 1e-15
    dottie = torch.tensor([DOTTIE], dtype=F64)
    assert abs(ev("cos(z)", z=dottie).item() - DOTTIE) < 1e-15
    # The Dottie number is the fixed point, so iterating the compiled map finds it.
    expr = parse_expression("cos(z)", key="problem.fixed_point", names={"z"})
    z = torch.tensor([1.0], dtype=F64)
    for _ in range(200):
        z = expr.evaluate({"z": z}, dtype=F64, device=CPU)
    assert abs(z.item() - DOTTIE) < 1e-14


def test_constants_and_shadowing() -> None:
    assert {"pi": math.pi, "e": math.e} == CONSTANTS
    assert ev("pi").item() == math.pi
    assert ev("e ** 1").item() == math.e
    # A variable of the same name wins over the constant.
    assert ev("e + 1", e=2).item() == 3.0
    assert parse_expression("e * z", key="k", names={"z"}).names == frozenset({"z"})


def test_scalar_arithmetic_follows_ieee_not_python_exceptions() -> None:
    assert ev("1 / 0").item() == math.inf
    assert ev("-1 / 0").item() == -math.inf
    assert math.isnan(ev("0 / 0").item())
    assert math.isnan(ev("1 % 0").item())
    assert ev("0 ** -1").item() == math.inf
    assert math.isnan(ev("(-8) ** (1 / 3)").item())
    assert ev("10.0 ** 400").item() == math.inf
    assert ev("(-10.0) ** 401").item() == -math.inf
    # Must return promptly instead of building a gigantic integer.
    assert ev("9 ** 9 ** 9").item() == math.inf
    assert ev("2 ** 62 * 4").item() == 2.0**64
    assert ev("9" * 400).item() == math.inf  # an integer literal beyond float range


def test_python_numbers_in_env_and_results() -> None:
    result = ev("n * 2 + 1", n=3)
    assert isinstance(result, torch.Tensor)
    assert result.dtype == F64 and result.item() == 7.0
    assert ev("x", x=np.array([1.0, 2.0])).tolist() == [1.0, 2.0]
    cond = ev("n > 2", n=3)
    assert cond.dtype == torch.bool and cond.item() is True


# ---------------------------------------------------------------------------------------------
# dtype, device and names
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(
    "text", ["arange(4)", "linspace(0, 1, 4)", "ones(2, 2)", "zeros(4)", "eye(4)", "1 + 2", "pi"]
)
def test_builders_and_literals_take_dtype_and_device(text: str, dtype: torch.dtype) -> None:
    got = parse_expression(text, key="k", names=()).evaluate({}, dtype=dtype, device="cpu")
    assert got.dtype == dtype
    assert got.device == CPU


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize(
    "text",
    [
        "cos(z) + 0.1",
        "where(z > 0, z, 0.1 * z)",
        "clamp(z, -0.5, 0.5)",
        "max(z, 0.25)",
        "atan2(z, 1)",
        "concat(z, 1)",
        "stack(z[0], 1)",
        "outer(arange(1, n + 1), ones(n)) @ z",
        "z + arange(n)",
        "softmax(z)",
    ],
)
def test_float32_and_float64_propagate(text: str, dtype: torch.dtype) -> None:
    z = torch.tensor([0.3, -0.2, 0.5], dtype=dtype)
    got = ev(text, dtype=dtype, z=z, n=3)
    assert got.dtype == dtype


def test_literal_precision_follows_dtype() -> None:
    # 1e-10 is below float32 resolution at 1 but well above float64's.
    z64 = torch.ones(1, dtype=F64)
    z32 = torch.ones(1, dtype=F32)
    assert ev("(z + 1e-10) - z", dtype=F64, z=z64).item() == pytest.approx(1e-10, rel=1e-6)
    assert ev("(z + 1e-10) - z", dtype=F32, z=z32).item() == 0.0


def test_names_are_the_free_variables() -> None:
    expr = parse_expression("tanh(W @ z + x) + pi", key="k", names={"W", "z", "x", "b", "n"})
    assert isinstance(expr, Expression)
    assert expr.names == frozenset({"W", "z", "x"})
    assert expr.text == "tanh(W @ z + x) + pi"
    assert expr.key == "k"
    assert parse_expression("arange(3)", key="k", names={"z"}).names == frozenset()


def test_expression_pickles_by_text() -> None:
    expr = parse_expression("z ** 2 - 2", key="problem.residual", names={"z"})
    clone = pickle.loads(pickle.dumps(expr))
    z = torch.tensor([3.0], dtype=F64)
    assert clone.evaluate({"z": z}, dtype=F64, device=CPU).item() == 7.0
    assert clone.key == "problem.residual" and clone.names == frozenset({"z"})


# ---------------------------------------------------------------------------------------------
# Autodiff and vmap
# ---------------------------------------------------------------------------------------------


def compiled(text: str, **fixed: object):
    expr = parse_expression(text, key="k", names={"z", *fixed})

    def f(z: torch.Tensor) -> torch.Tensor:
        return expr.evaluate({"z": z, **fixed}, dtype=F64, device=CPU)

    return f


def test_jacobian_of_cos() -> None:
    z = torch.tensor([0.1, -0.4, 1.3], dtype=F64)
    expected = torch.diag(-torch.sin(z))
    for jac in (jacfwd, jacrev):
        torch.testing.assert_close(jac(compiled("cos(z)"))(z), expected, rtol=1e-14, atol=1e-15)


def test_jacobian_of_tanh_layer() -> None:
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 4, generator=gen, dtype=F64) * 0.5
    x = torch.randn(4, generator=gen, dtype=F64)
    z = torch.randn(4, generator=gen, dtype=F64)
    f = compiled("tanh(W @ z + x)", W=w, x=x)
    expected = torch.diag(1 - torch.tanh(w @ z + x) ** 2) @ w
    torch.testing.assert_close(jacfwd(f)(z), expected, rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(jacrev(f)(z), expected, rtol=1e-13, atol=1e-15)


def test_jacobian_of_resolvent_map_and_leaky_relu() -> None:
    a = torch.tensor([[0.1, 0.2], [0.05, 0.3]], dtype=F64)
    z = torch.tensor([0.4, -0.6], dtype=F64)
    f = compiled("1 / (1 - A @ z)", A=a)
    expected = torch.diag(1 / (1 - a @ z) ** 2) @ a
    torch.testing.assert_close(jacfwd(f)(z), expected, rtol=1e-14, atol=1e-15)
    g = compiled("where(z > 0, z, 0.1 * z)")
    torch.testing.assert_close(jacrev(g)(z), torch.diag(torch.tensor([1.0, 0.1], dtype=F64)))


def test_autograd_gradient() -> None:
    z = torch.tensor([0.3, -1.2, 2.0], dtype=F64, requires_grad=True)
    value = compiled("sum(z ** 2) / 2 + dot(z, arange(3))")(z)
    (grad,) = torch.autograd.grad(value, z)
    torch.testing.assert_close(grad, z.detach() + torch.arange(3, dtype=F64))


VMAP_EXPRESSIONS = [
    "cos(z)",
    "tanh(W @ z + x)",
    "1 / (1 - A @ z)",
    "where(z > 0, z, 0.1 * z)",
    "sum(z) / n + 0 * z",
    "roll(z, 1) - z",
    "cumsum(z) + cumprod(z)",
    "concat(z[1:], z[0])",
    "stack(z[0], z[-1])",
    "z[::-1] * z",
    "norm(z) + norm(z, 1) + max(z) - min(z) + mean(z) + prod(z)",
    "max(z, 0) + min(z, 0)",
    "diag(outer(z, z))",
    "diag(z) @ z",
    "softmax(z) + logsumexp(z)",
    "z + arange(n) + linspace(0, 1, n) + ones(n) - zeros(n)",
    "dot(z, z) * z",
    "transpose(W) @ z",
    "clamp(z, -0.2, 0.2) + atan2(z, 1) + pow(z, 2)",
    "((z > 0) & (z < 1)) * z + ~(z > 0) * 2",
    "eye(n) @ z + W[0, :] * z[1]",
    "sigmoid(z) + relu(z) + softplus(z) + erf(z) + abs(z) + sign(z)",
]


@pytest.mark.parametrize("text", VMAP_EXPRESSIONS)
def test_vmap_matches_loop(text: str) -> None:
    gen = torch.Generator().manual_seed(1)
    n = 3
    fixed = {
        "W": torch.randn(n, n, generator=gen, dtype=F64),
        "x": torch.randn(n, generator=gen, dtype=F64),
        "A": torch.randn(n, n, generator=gen, dtype=F64) * 0.1,
        "n": n,
    }
    f = compiled(text, **fixed)
    batch = torch.randn(5, n, generator=gen, dtype=F64)
    looped = torch.stack([f(row) for row in batch])
    torch.testing.assert_close(vmap(f)(batch), looped, rtol=1e-14, atol=1e-15)


def test_vmap_of_jacobian() -> None:
    f = compiled("tanh(2 * z) + roll(z, 1)")
    batch = torch.tensor([[0.1, 0.2, 0.3], [-0.5, 0.0, 0.7]], dtype=F64)
    eye_roll = torch.roll(torch.eye(3, dtype=F64), 1, 0)
    for z, jac in zip(batch, vmap(jacrev(f))(batch), strict=True):
        expected = torch.diag(2 * (1 - torch.tanh(2 * z) ** 2)) + eye_roll
        torch.testing.assert_close(jac, expected, rtol=1e-14, atol=1e-15)


def test_shape_from_iterate_under_vmap_is_a_clear_error() -> None:
    f = compiled("roll(z, z[0])")
    with pytest.raises(ExpressionError, match=r"^k: roll\(\): shift must be known before"):
        vmap(f)(torch.ones(2, 3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# Error messages
# ---------------------------------------------------------------------------------------------


def test_documented_error_messages_exactly() -> None:
    err = rejects("cso(z)", key="problem.fixed_point")
    assert (
        str(err) == "problem.fixed_point: unknown function 'cso' at column 1; did you mean 'cos'?"
    )
    assert (err.key, err.column, err.token) == ("problem.fixed_point", 1, "cso")
    assert err.suggestion == "did you mean 'cos'?"

    err = rejects("zz", names={"z", "n"}, key="problem.residual")
    assert str(err) == (
        "problem.residual: unknown name 'zz' at column 1; did you mean 'z'? (known names: n, z)"
    )

    err = rejects("A.T", names={"A"}, key="problem.fixed_point")
    assert str(err) == (
        "problem.fixed_point: attribute access '.T' is not allowed at column 2; use transpose(A)"
    )

    err = rejects("1 + )", names=set(), key="problem.params.A")
    assert str(err) == "problem.params.A: syntax error at column 5: unexpected token ')'"
    assert err.token == ")"

    err = rejects("cos(z, z)", key="problem.fixed_point")
    assert str(err) == "problem.fixed_point: cos() takes 1 argument, got 2 at column 1"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("z.T", "attribute access '.T'"),
        ("torch.cos(z)", "attribute access '.cos'"),
        ("z.__class__", "attribute access '.__class__'"),
        ("z.sum()", "use sum(z)"),
        ("__import__('os')", "name '__import__' is not allowed"),
        ("__builtins__", "name '__builtins__' is not allowed"),
        ("import os", "import is not allowed"),
        ("lambda: z", "lambda is not allowed"),
        ("[v for v in z]", "comprehensions are not allowed"),
        ("{v for v in z}", "comprehensions are not allowed"),
        ("sum(v for v in z)", "generator expressions are not allowed"),
        ("cos(z, ord=2)", "keyword argument 'ord=' is not allowed"),
        ("norm(z, **k)", "'**' arguments are not allowed"),
        ("cos(*z)", "starred arguments"),
        ("f'{z}'", "f-strings are not allowed"),
        ("(y := z)", "assignment expressions (':=') are not allowed"),
        ("A = outer(z, z)", "assignment is not allowed"),
        ("z += 1", "assignment is not allowed"),
        ("'z'", "strings are not allowed"),
        ("b'z'", "byte strings are not allowed"),
        ("1j * z", "complex numbers are not supported"),
        ("True", "True is not supported"),
        ("None", "None is not allowed"),
        ("z[...]", "'...' is not allowed"),
        ("[z, z]", "list literals are not allowed"),
        ("(z, z)", "tuples are not allowed"),
        ("{'a': z}", "dict literals are not allowed"),
        ("z if z else 0", "use where(cond, a, b)"),
        ("z and z", "'and' / 'or' are not allowed"),
        ("not z", "'not' is not allowed"),
        ("z is z", "'is' is not allowed"),
        ("z in z", "'in' is not allowed"),
        ("0 < z < 1", "chained comparisons are not supported"),
        ("z ^ 2", "use ** for powers"),
        ("z << 1", "operator '<<' is not allowed"),
        ("z(1)", "'z' is a value, not a function"),
        ("(z)(1)", "'z' is a value, not a function"),
        ("cos(z)(1)", "only functions from the table can be called"),
        ("cos", "function 'cos' must be called"),
        ("z[0.5]", "index must be a whole number"),
        ("pass", "statements ('pass') are not allowed"),
        ("", "expression is empty"),
        ("   ", "expression is empty"),
        ("z +* 2", "syntax error at column 4: unexpected token '*'"),
        ("cos(z", "syntax error at column 4: '(' was never closed"),
        ("z +", "syntax error at column 4: unexpected end of expression"),
        ("z\x00", "syntax error"),
    ],
)
def test_forbidden_constructs_are_named(text: str, fragment: str) -> None:
    err = rejects(text, key="problem.fixed_point")
    message = str(err)
    assert message.startswith("problem.fixed_point: ")
    assert fragment in message
    assert "\n" not in message


def test_error_columns_point_at_the_token() -> None:
    assert rejects("z + zz").column == 5
    assert rejects("cos(z) + sni(z)").column == 10
    assert rejects("  zz").column == 3  # leading blanks are counted
    assert rejects("ζ + zz", names={"ζ"}).column == 5  # characters, not UTF-8 bytes
    err = rejects("(z +\n  zz)")
    assert (err.line, err.column) == (2, 3)
    assert "at line 2, column 3" in str(err)
    assert rejects("A = 1", names={"A"}).column == 3


def test_suggestions() -> None:
    assert "did you mean 'W'?" in str(rejects("w @ z", names={"W", "z"}))
    assert "did you mean 'tanh'?" in str(rejects("tahn(z)"))
    assert "did you mean 'linspace'?" in str(rejects("linspce(0, 1, 3)"))
    assert "did you mean 'pi'?" in str(rejects("pii * z"))
    # No near miss: the message still lists what exists.
    err = rejects("qqqq", names={"z", "n"})
    assert err.suggestion == "known names: n, z"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("where(z)", "where() takes 3 arguments, got 1"),
        ("arange()", "arange() takes from 1 to 3 arguments, got 0"),
        ("ones(1, 2, 3)", "ones() takes 1 or 2 arguments, got 3"),
        ("concat()", "concat() takes at least 1 argument, got 0"),
        ("max(z, z, z)", "max() takes 1 or 2 arguments, got 3"),
    ],
)
def test_argument_counts(text: str, message: str) -> None:
    assert rejects(text).message == message


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("W @ z", "cannot evaluate '@' at column 3"),
        ("z + ones(5)", "cannot evaluate '+' at column 3"),
        ("z[7]", "indexing: index 7 is out of range for axis 0 of size 4 at column 2"),
        ("z[0, 0]", "too many indices"),
        ("z[n / 3]", "an index must be a whole number"),
        ("z[::0]", "slice step must not be zero"),
        ("ones(-1)", "size must not be negative"),
        ("ones(2.5)", "size must be a whole number, got 2.5"),
        ("ones(z)", "size must be a single number"),
        ("arange(5, 1)", "stop 1 cannot be reached from start 5 with step 1"),
        ("arange(0, 1, 0)", "step must not be zero"),
        ("2 @ z", "'@' needs a vector or matrix on the left"),
        ("dot(z, ones(3))", "vectors have different lengths"),
        ("diag(z[0])", "diag(): takes a vector or a matrix, got a single number"),
        ("(z > 0) & z", "'&' combines conditions"),
        (
            "~z",
            "problem.residual: '~' negates a condition such as ~(z > 0), got an array of shape (4,)",
        ),
        ("-(z > 0)", "cannot evaluate '-' at column 1"),
        ("missing + z", "problem.residual: no value was given for 'missing' at column 1"),
        ("stack(z, z[0:2])", "cannot evaluate stack() at column 1"),
    ],
)
def test_runtime_errors_name_key_and_place(text: str, fragment: str) -> None:
    names = {"z", "n", "W", "missing"}
    expr = parse_expression(text, key="problem.residual", names=names)
    env = {"z": ZT, "n": 4, "W": torch.ones(3, 3, dtype=F64)}
    with pytest.raises(ExpressionError) as info:
        expr.evaluate(env, dtype=F64, device=CPU)
    message = str(info.value)
    assert message.startswith("problem.residual: ")
    assert fragment in message
    assert "\n" not in message


def test_error_is_a_value_error_and_pickles() -> None:
    err = rejects("cso(z)")
    assert isinstance(err, ValueError)
    clone = pickle.loads(pickle.dumps(err))
    assert str(clone) == str(err)
    assert (clone.key, clone.column, clone.token, clone.suggestion) == (
        err.key,
        err.column,
        err.token,
        err.suggestion,
    )


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------


def test_text_length_limit() -> None:
    longest = "z" + " + z" * ((MAX_TEXT_LENGTH - 1) // 4)
    assert len(longest) <= MAX_TEXT_LENGTH
    # A long flat sum is one nesting level and evaluates without deep recursion.
    terms = longest.count("z")
    assert ev(longest, z=torch.ones(1, dtype=F64)).item() == terms
    err = rejects("z" + " " * MAX_TEXT_LENGTH)
    assert f"the limit is {MAX_TEXT_LENGTH}" in str(err)


def test_nesting_depth_limit() -> None:
    ok = "cos(" * (MAX_DEPTH - 1) + "z" + ")" * (MAX_DEPTH - 1)
    parse_expression(ok, key="k", names={"z"})
    for text in [
        "cos(" * (MAX_DEPTH + 1) + "z" + ")" * (MAX_DEPTH + 1),
        "(" * 300 + "z" + ")" * 300,
        "-" * 3000 + "z",
        "z" + "**z" * 200,
    ]:
        assert "nested too deeply" in str(rejects(text))


@pytest.mark.parametrize(
    "text",
    [
        "ones(10000001)",
        "zeros(4000, 4000)",
        "eye(5000)",
        "arange(0, 1e9)",
        "arange(0, 1, 1e-8)",
        "linspace(0, 1, 100000000)",
        "diag(v)",
        "outer(v, v)",
    ],
)
def test_builder_size_limit_is_checked_before_allocating(
    text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    expr = parse_expression(text, key="problem.params.A", names={"v"})
    env = {"v": torch.zeros(4000, dtype=F64)}

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("allocation was attempted")

    for name in ("ones", "zeros", "eye", "arange", "linspace", "diag_embed"):
        monkeypatch.setattr(torch, name, refuse)
    with pytest.raises(ExpressionError, match=r"^problem\.params\.A: .*the limit is 10000000"):
        expr.evaluate(env, dtype=F64, device=CPU)


# ---------------------------------------------------------------------------------------------
# Parsing does not import torch
# ---------------------------------------------------------------------------------------------


def test_parsing_does_not_import_torch() -> None:
    code = (
        "import deqcli.expr as e, sys; "
        "e.parse_expression('cos(z)', key='k', names={'z'}); "
        "e.parse_expression('tanh(W @ z + x)[0:2]', key='k', names={'z', 'W', 'x'}); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------
# Documentation
# ---------------------------------------------------------------------------------------------


def test_docs_list_every_function_with_its_usage() -> None:
    page = (REPO / "docs" / "expressions.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `([a-z0-9]+)` \|", page, flags=re.MULTILINE))
    assert documented == set(FUNCTIONS)
    for spec in FUNCTION_SPECS.values():
        assert spec.usage.split(" / ")[0] in page


# ---------------------------------------------------------------------------------------------
# Property tests
# ---------------------------------------------------------------------------------------------

VARIABLES = {"a": 1.75, "b": -0.5, "c": 3.0}
BINARY = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": operator.truediv,
    "%": operator.mod,
    "**": operator.pow,
}

leaves = st.one_of(
    st.sampled_from(sorted(VARIABLES)).map(lambda name: ("var", name)),
    st.integers(min_value=0, max_value=9).map(lambda k: ("num", k)),
    st.sampled_from([0.5, 0.25, 1.5, 2.0, 0.1, 3.75]).map(lambda x: ("num", x)),
)
trees = st.recursive(
    leaves,
    lambda kids: st.one_of(
        st.tuples(st.just("bin"), st.sampled_from(sorted(BINARY)), kids, kids),
        st.tuples(st.just("neg"), kids),
    ),
    max_leaves=10,
)


def render(node: tuple) -> str:
    if node[0] == "var":
        return node[1]
    if node[0] == "num":
        return repr(node[1])
    if node[0] == "neg":
        return f"(-{render(node[1])})"
    return f"({render(node[2])} {node[1]} {render(node[3])})"


def reference(node: tuple, values: list[float]) -> np.float64:
    """IEEE double arithmetic with numpy scalars (a float subclass): 1/0 is inf, not an error."""
    if node[0] == "var":
        result = np.float64(VARIABLES[node[1]])
    elif node[0] == "num":
        result = np.float64(node[1])
    elif node[0] == "neg":
        result = -reference(node[1], values)
    else:
        left = reference(node[2], values)
        right = reference(node[3], values)
        result = np.float64(BINARY[node[1]](left, right))
    if np.isfinite(result):
        values.append(abs(float(result)))
    return result


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tree=trees, as_tensors=st.booleans())
def test_arithmetic_agrees_with_float_arithmetic(tree: tuple, as_tensors: bool) -> None:
    text = render(tree)
    intermediates: list[float] = []
    with np.errstate(all="ignore"):
        expected = float(reference(tree, intermediates))
    env = {
        name: torch.tensor(value, dtype=F64) if as_tensors else value
        for name, value in VARIABLES.items()
    }
    got = parse_expression(text, key="k", names=VARIABLES).evaluate(env, dtype=F64, device=CPU)
    got_value = got.item()
    if not math.isfinite(expected):
        assert not math.isfinite(got_value), text
        return
    # Rounding of pow may differ in the last bit between libraries; allow for it on the scale
    # of the largest intermediate value.
    scale = max([1.0, *intermediates])
    assert math.isclose(got_value, expected, rel_tol=1e-9, abs_tol=1e-9 * scale), text


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=60))
def test_arbitrary_text_parses_or_raises_expression_error(text: str) -> None:
    try:
        expr = parse_expression(text, key="problem.residual", names={"z", "n", "W"})
    except ExpressionError as err:
        assert str(err).startswith("problem.residual: ")
        assert "\n" not in str(err)
    else:
        assert expr.names <= {"z", "n", "W"}


@settings(max_examples=200, deadline=None)
@given(
    text=st.lists(
        st.sampled_from(
            [
                "z",
                "n",
                "W",
                "1",
                "2.5",
                "+",
                "-",
                "*",
                "/",
                "**",
                "@",
                "(",
                ")",
                "[",
                "]",
                ":",
                ",",
                "cos",
                "sum",
                "where",
                ">",
                ".",
                "T",
                "_",
                "__",
                "'",
                "lambda",
                "=",
                " ",
            ]
        ),
        max_size=25,
    ).map("".join)
)
def test_token_soup_parses_or_raises_expression_error(text: str) -> None:
    # Near-valid texts reach deeper into the validator than random unicode does.
    try:
        parse_expression(text, key="problem.residual", names={"z", "n", "W"})
    except ExpressionError as err:
        assert str(err).startswith("problem.residual: ")


def _doc_blocks(language: str) -> list[str]:
    page = (REPO / "docs" / "expressions.md").read_text(encoding="utf-8")
    return re.findall(rf"```{language}\n(.*?)```", page, flags=re.DOTALL)


def test_docs_yaml_examples_evaluate() -> None:
    yaml = pytest.importorskip("yaml")
    blocks = [yaml.safe_load(block)["problem"] for block in _doc_blocks("yaml")]
    assert len(blocks) == 6
    for problem in blocks:
        n = problem.get("dim", 1)
        env: dict[str, object] = {"n": n}
        for name, text in problem.get("params", {}).items():
            env[name] = parse_expression(text, key=name, names=env).evaluate(
                env, dtype=F64, device=CPU
            )
        form = "fixed_point" if "fixed_point" in problem else "residual"
        samples = problem.get("batch_params", {"_": [None]})
        for values in zip(*samples.values(), strict=True):
            sample_env = {**env, **dict(zip(samples, values, strict=True))}
            sample_env["z"] = torch.full((n,), float(problem.get("initial", 0.5)), dtype=F64)
            expr = parse_expression(problem[form], key=form, names=sample_env)
            out = expr.evaluate(sample_env, dtype=F64, device=CPU)
            assert out.shape == (n,) and torch.isfinite(out).all(), problem[form]


def test_docs_formula_examples_evaluate() -> None:
    (formulas,) = [b for b in _doc_blocks("text") if "leaky relu" in b]
    z = torch.tensor([0.5, -0.25, 1.5], dtype=F64)
    for line in formulas.strip().splitlines():
        text = re.split(r"\s{2,}", line.strip())[0]
        out = ev(text, z=z, n=3)
        assert torch.isfinite(out).all(), text
