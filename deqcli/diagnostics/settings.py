"""Every threshold the diagnostics use, in one place, with its meaning.

``DiagnosticOptions`` is torch-free so the CLI can build it from flags without importing torch.
docs/diagnostics.md documents each field; the JSON echoes the values in effect under
``diagnostics.settings``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DiagnosticOptions:
    """Named thresholds and budgets of the convergence diagnostics (all documented)."""

    # -- spectral analysis at the solution ------------------------------------------------------
    dense_max_dim: int = 256
    """Up to this n the Jacobian J = ∂f/∂z is formed densely: exact eigenvalues and singular values."""
    dense_max_elements: int = 2**24
    """…and only while batch·n² stays below this many entries (about 128 MiB in float64)."""
    power_iterations: int = 30
    """Matrix-free ‖J‖₂: power iterations on JᵀJ (one JVP and one VJP each)."""
    arnoldi_steps: int = 20
    """Matrix-free ρ(J): Arnoldi steps on J (one JVP each); ρ is the largest Ritz value's modulus."""
    locate_max_iter: int = 25
    """Newton iterations spent locating the fixed point of a sample that did not converge (small n)."""
    locate_rtol: float = 1e-9
    """A located point counts as a fixed point when ‖g‖ ≤ max(the run's tolerance, locate_rtol·S),
    S = max(1, ‖z0‖, ‖f(z0)‖) the problem's own scale (not the located point's norm)."""
    cond_points: int = 8
    """Newton-type solvers: the residual Jacobian's condition number at up to this many kept iterates."""
    cond_warn: float = 1e8
    """cond(J_g) at or above this is reported as near singular (about 1/√ε in float64)."""
    jacobian_decay_warn: float = 1e-4
    """σ_min(J_g) at the solution below this fraction of σ_max(J_g) along the iterates: tending to singular."""

    # -- rates and orders -----------------------------------------------------------------------
    rate_window: int = 10
    """Contraction and growth rates are geometric means over the last this-many usable ratios."""
    noise_factor: float = 64.0
    """Steps and residuals below noise_factor·ε·max(1, ‖z‖) are rounding noise and not used for rates."""
    order_window: int = 3
    """The order q is the median of the last this-many three-point estimates."""
    min_log_ratio: float = 0.01
    """Three-point order estimates need |log(e_{k}/e_{k−1})| above this (else q = 0/0)."""
    quadratic_order: float = 1.8
    """q at or above this is reported as quadratic convergence."""
    superlinear_order: float = 1.15
    """q at or above this (and below quadratic_order) is superlinear; below it, linear."""
    rate_match_atol: float = 0.05
    """An observed linear rate agrees with the predicted one when they differ by at most this…"""
    rate_match_rtol: float = 0.1
    """…plus this fraction of the predicted rate."""
    slow_rate: float = 0.95
    """A converged linear rate above this earns a 'slow' remark and a faster-solver suggestion."""

    # -- trajectory classification --------------------------------------------------------------
    min_iterations: int = 4
    """Fewer iterations than this leave a sample unclassified (too little evidence)."""
    growth_rate: float = 1.0001
    """A residual growing steadily by at least this factor per iteration is growing (any steady
    growth above rounding: an outward spiral with ρ = 1.0005 grows)…"""
    divergence_growth: float = 1e3
    """…and diverged once it is also this many times above max(‖g(z0)‖, atol) (or the iterate grew so)."""
    max_period: int = 8
    """Largest cycle period looked for; capped at a third of the kept iterates (keep_iterates)."""
    period_cycles: int = 2
    """A period-p cycle must repeat over this many full periods (so needs (period_cycles+1)·p iterates)."""
    period_rtol: float = 1e-3
    """Returns ‖z_t − z_{t−p}‖ must stay below this fraction of the cycle's amplitude."""
    amplitude_decay: float = 0.01
    """A candidate cycle whose returns, extrapolated geometrically, would shrink its amplitude by more
    than this fraction is a converging (e.g. sign-alternating) sequence, not an oscillation."""
    stall_window: int = 20
    """Progress is judged over the last this-many iterations (fewer if fewer were run)."""
    stall_decrease: float = 0.01
    """No progress: the best residual in the window improved on the best before it by less than this
    fraction (and ‖g‖ is not falling steadily)."""
    stall_flat_rtol: float = 1e-6
    """The residual norm has converged to a non-zero value when it varied by less than this fraction."""
    stall_step_rtol: float = 1e-10
    """The iterate is stuck when its steps are below this fraction of max(1, ‖z‖)."""
    stall_spread_rtol: float = 1e-6
    """A flat ‖g‖ counts as settled only while the window's iterates stay within this fraction of
    max(1, ‖z‖) of their mean (a rotation keeps ‖g‖ flat but moves: that is not a stall)."""
    stationary_rtol: float = 1e-6
    """‖J_gᵀ g‖ ≤ this·max(‖J_g‖₂, ‖J_g(z0)‖₂)·‖g‖ marks a stationary point of ½‖g‖² (a local
    minimum of ‖g‖, not a root)."""
    stall_band: float = 0.01
    """‖g‖ hovering within this fraction of its window's largest value without progress may circle a
    nonzero local minimum of ‖g‖ (confirmed by locating that minimum)."""
    level_fraction: float = 0.5
    """‖g‖ levels off (is not heading to zero) when its extrapolated limit is at least this fraction
    of the last ‖g‖."""
    escape_growth: float = 10.0
    """Iterates whose norm rose steadily to this many times the problem's scale max(1, ‖z0‖,
    ‖f(z0)‖), while ‖g‖ does not head to zero, are escaping to infinity (diverged)."""

    # -- remedy trials --------------------------------------------------------------------------
    trials: bool = True
    """Run the candidate remedies of a failed or slow run (``--no-try`` turns this off)."""
    try_budget: int | None = None
    """Evaluations each trial may spend (f-evaluations, with a dense Jacobian counted as n and a
    JVP/VJP as one); None: the run's own evaluations of the sample tried, at least try_min_budget."""
    try_min_budget: int = 100
    """The smallest default budget, so that runs stopped after a few steps still get a fair trial."""
    try_time: float = 2.0
    """Seconds all the trials of one solve may take together."""
    try_max: int = 4
    """At most this many candidate remedies are tried (the rest stay suggestions)."""

    # -- precheck -------------------------------------------------------------------------------
    precheck_pairs: int = 32
    """Secant pairs (u, v) sampled per sample for the empirical Lipschitz estimate."""
    precheck_radius: float = 0.1
    """The pairs lie within this radius times max(1, ‖z0‖) of z0."""
    seed: int = 0
    """Seed of the random probes (precheck pairs, power and Arnoldi start vectors)."""

    def effective_max_period(self, keep_iterates: int) -> int:
        """max_period, capped so (period_cycles + 1)·p iterates fit in the kept tail."""
        return max(1, min(self.max_period, keep_iterates // (self.period_cycles + 1)))

    def as_dict(self) -> dict[str, Any]:
        """The settings in effect, for the JSON document."""
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> DiagnosticOptions:
        """A copy with some settings changed (unknown names raise a ValueError naming them)."""
        names = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise ValueError(f"unknown diagnostics setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


DEFAULT_OPTIONS = DiagnosticOptions()
