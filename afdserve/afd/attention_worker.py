"""An attention worker: its own scheduler and KV cache, and a runner that executes its plans."""

from __future__ import annotations

from afdserve.afd.attention_runner import AttentionRunner
from afdserve.engine.scheduler import Scheduler
from afdserve.types import StepPlan, StepResult


class AttentionWorker:
    def __init__(
        self, index: int, scheduler: Scheduler, runner: AttentionRunner, always_sync: bool
    ) -> None:
        self.index = index
        self.scheduler = scheduler
        self.runner = runner
        self.always_sync = always_sync
        """AFD: run (and so SYNC) even an empty plan, so the FFN hears from every worker each step."""

    def load_score(self) -> int:
        return self.scheduler.load().score

    def execute(self, plan: StepPlan, step: int) -> StepResult:
        if plan.is_empty and not self.always_sync:
            return StepResult(plan.step_id, ())
        return self.runner.execute(plan, step)
