"""``auto``: a poly-algorithm that starts cheap and falls back to robust methods when progress fails."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from deqcli.errors import UsageError
from deqcli.solvers.base import Solver, State

if TYPE_CHECKING:
    import torch

    from deqcli.problems.base import Problem
    from deqcli.result import SolveResult


@dataclass
class AutoState(State):
    """The current method's own state plus what ``auto`` watches to decide when to switch."""

    sub: Solver
    sub_state: State
    stages: list[str]
    stage: int
    best: torch.Tensor  # (B,) smallest ‖g‖ seen in the whole run
    best_z: torch.Tensor  # (B, n) where it was seen
    best_g: torch.Tensor  # (B, n)
    mark: torch.Tensor  # (B,) residual at the last sufficient decrease in this stage
    since: torch.Tensor  # (B,) iterations since then
    k: int = 0
    stuck: torch.Tensor | None = None  # samples the current method reported it cannot advance
    methods: list[str] = field(default_factory=list)
    switches: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


@dataclass
class Auto(Solver):
    """Start with ``anderson``; switch to a more robust method when the iteration goes wrong.

    Stages: anderson → newton → trust-region when dense Jacobians are allowed (n ≤ ``dense_max``
    and they fit in memory), otherwise anderson → newton-krylov. After every step ``auto`` checks
    the samples still running and moves the whole batch to the next stage when any of them

    - produced a non-finite residual (that step is discarded: those samples go back to their best
      iterate instead of reaching the driver as non-finite);
    - grew: ‖g‖ > ``growth`` × the smallest residual it has had in this run;
    - stalled: ‖g‖ has not fallen below ``progress`` × its level at the last such decrease for
      ``patience`` iterations (``newton_patience`` in the Newton-type stages);
    - or the method reports it cannot advance it (a collapsed trust region).

    The next stage starts from each sample's best iterate so far. The last stage runs until the
    driver stops it. The methods used, the iterations at which ``auto`` switched and why are in
    ``result.extra["auto"]`` (JSON) and in the report's notes.

    Cost: that of the stage running; a switch costs one extra evaluation (the new method's start).
    """

    name: ClassVar[str] = "auto"
    summary: ClassVar[str] = "anderson first, then newton / newton-krylov, then trust-region"
    m: int = 5
    patience: int = 30
    newton_patience: int = 5
    progress: float = 0.5
    growth: float = 100.0
    dense_max: int = 1000

    def check(self) -> None:
        """Validate the switching rules."""
        if self.m < 1:
            raise ValueError(f"m: must be ≥ 1, got {self.m}")
        if self.patience < 1:
            raise ValueError(f"patience: must be ≥ 1, got {self.patience}")
        if self.newton_patience < 1:
            raise ValueError(f"newton_patience: must be ≥ 1, got {self.newton_patience}")
        if not 0.0 < self.progress < 1.0:
            raise ValueError(f"progress: must lie in (0, 1), got {self.progress}")
        if self.growth <= 1.0:
            raise ValueError(f"growth: must be > 1, got {self.growth}")
        if self.dense_max < 1:
            raise ValueError(f"dense_max: must be ≥ 1, got {self.dense_max}")

    def stages(self, problem: Problem) -> list[str]:
        """The methods ``auto`` would try on ``problem``, in order."""
        dense = problem.dim <= self.dense_max
        if dense:
            try:
                problem.check_dense_fits()
            except UsageError:
                dense = False
        return ["anderson", "newton", "trust-region"] if dense else ["anderson", "newton-krylov"]

    def init(self, problem: Problem, z0: torch.Tensor) -> AutoState:
        """Start the first stage at z0."""
        import torch

        stages = self.stages(problem)
        sub = self._make(stages[0])
        sub_state = sub.init(problem, z0)
        res = torch.linalg.vector_norm(sub_state.g, dim=1)
        return AutoState(
            z=sub_state.z,
            g=sub_state.g,
            sub=sub,
            sub_state=sub_state,
            stages=stages,
            stage=0,
            best=res,
            best_z=sub_state.z,
            best_g=sub_state.g,
            mark=res,
            since=torch.zeros_like(res, dtype=torch.int64),
            methods=[stages[0]],
        )

    def _make(self, name: str) -> Solver:
        from deqcli.solvers import make_solver

        options: dict[str, Any] = {"m": self.m} if name == "anderson" else {}
        return make_solver(name, options)

    def observe(self, state: State, active: torch.Tensor) -> torch.Tensor | None:
        """Pass the running samples on to the current method; report stuck ones at the last stage."""
        if not isinstance(state, AutoState):
            return None
        # auto drives its current method as the driver drives auto: hand the mask on the same way.
        state.sub_state.active = active
        stuck = state.sub.observe(state.sub_state, active)
        if stuck is not None and state.stage + 1 < len(state.stages):
            state.stuck = stuck  # handled by switching at the next step
            return None
        return stuck

    def step(self, problem: Problem, state: State) -> AutoState:
        """Advance the current method one step, then decide whether to switch."""
        import torch

        if not isinstance(state, AutoState):
            raise TypeError("auto.step needs the state made by auto.init")
        s = state
        s.k += 1
        running = s.active if s.active is not None else torch.ones_like(s.best, dtype=torch.bool)
        if s.stuck is not None and bool((s.stuck & running).any()):
            s.stuck = None
            return self._switch(problem, s, "the method could not advance a sample")
        # The driver restores the rows of finished samples in s.z/s.g; the current method keeps
        # its own copy, which is harmless for those rows (they are never read again).
        s.sub_state = s.sub.step(problem, s.sub_state)
        z_new, g_new = s.sub_state.z, s.sub_state.g
        res = torch.linalg.vector_norm(g_new, dim=1)
        last = s.stage + 1 == len(s.stages)

        nonfinite = running & ~torch.isfinite(res)
        if bool(nonfinite.any()) and not last:
            return self._switch(problem, s, "non-finite residual")

        improved = res < s.best
        s.best = torch.where(improved, res, s.best)
        s.best_z = torch.where(improved[:, None], z_new, s.best_z)
        s.best_g = torch.where(improved[:, None], g_new, s.best_g)
        decreased = res <= self.progress * s.mark
        s.mark = torch.where(decreased, res, s.mark)
        s.since = torch.where(decreased, torch.zeros_like(s.since), s.since + 1)
        s.z, s.g = z_new, g_new
        if last:
            return s

        patience = self.patience if s.stages[s.stage] == "anderson" else self.newton_patience
        if bool((running & (res > self.growth * s.best)).any()):
            return self._switch(problem, s, "residual growth")
        if bool((running & (s.since >= patience)).any()):
            return self._switch(problem, s, "no progress")
        return s

    def _switch(self, problem: Problem, s: AutoState, reason: str) -> AutoState:
        """Start the next stage from each sample's best iterate."""
        import torch

        s.stage += 1
        name = s.stages[s.stage]
        s.sub = self._make(name)
        s.sub_state = s.sub.init(problem, s.best_z)
        s.z, s.g = s.sub_state.z, s.sub_state.g
        res = torch.linalg.vector_norm(s.g, dim=1)
        s.mark = res
        s.since = torch.zeros_like(s.since)
        s.methods.append(name)
        s.switches.append(s.k)
        s.reasons.append(reason)
        if s.active is not None:
            s.sub_state.active = s.active
            s.sub.observe(s.sub_state, s.active)
        return s

    def finish(self, state: State, result: SolveResult) -> None:
        """Record the methods used and the switches in the result."""
        if not isinstance(state, AutoState):
            return
        state.sub.finish(state.sub_state, result)
        result.extra["auto"] = {
            "methods": list(state.methods),
            "switches": list(state.switches),
            "reasons": list(state.reasons),
        }
        if state.switches:
            steps = "; ".join(
                f"{state.methods[i + 1]} at iteration {k} ({why})"
                for i, (k, why) in enumerate(zip(state.switches, state.reasons, strict=True))
            )
            result.notes.append(f"auto: started with {state.methods[0]}, switched to {steps}")
        else:
            result.notes.append(f"auto: {state.methods[0]} sufficed")
