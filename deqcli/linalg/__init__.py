"""The linear-operator layer: batched operators (``operators``) and Krylov methods (``krylov``).

Newton–Krylov, the sensitivities and adjoint solves, and the spectral diagnostics all multiply by
Jacobians through these operators and solve with the one GMRES here. Importing this package
imports torch: it is for code that solves, never for ``deq validate`` or ``deq list-solvers``.
"""

from deqcli.linalg.krylov import (
    KrylovResult,
    SingularEstimate,
    arnoldi,
    gmres,
    golub_kahan,
    ritz_values,
    sigma_max,
    sigma_min,
)
from deqcli.linalg.operators import (
    DenseOperator,
    FunctionOperator,
    Linearisation,
    LinearOperator,
    NormalOperator,
    RowScaledJacobian,
    ShiftedOperator,
    jacobian_operator,
)

__all__ = [
    "DenseOperator",
    "FunctionOperator",
    "KrylovResult",
    "LinearOperator",
    "Linearisation",
    "NormalOperator",
    "RowScaledJacobian",
    "ShiftedOperator",
    "SingularEstimate",
    "arnoldi",
    "gmres",
    "golub_kahan",
    "jacobian_operator",
    "ritz_values",
    "sigma_max",
    "sigma_min",
]
