"""An attention worker: its own scheduler and KV cache, and a runner that executes its plans."""

from __future__ import annotations

from afdserve.afd.attention_runner import AttentionRunner
from afdserve.engine.scheduler import Scheduler
from afdserve.types import StepPlan, StepResult


class AttentionWorker:
    def __init__(self, index: int, scheduler: Scheduler, runner: AttentionRunner) -> None:
        self.index = index
        self.scheduler = scheduler
        self.runner = runner

    def load_score(self) -> int:
        return self.scheduler.load().score

    def execute(self, plan: StepPlan, step: int) -> StepResult:
        """Run a non-empty plan as step `step` (an empty one has nothing to send the FFN)."""
        if plan.is_empty:
            return StepResult(plan.step_id, ())
        return self.runner.execute(plan, step)
