"""When and how the front re-places experts (`--eplb`): it feeds every attention worker's
per-step expert counts into a sliding window and, every `eplb_step_interval` reports, computes
a balanced placement (algorithm.py); when that lowers the window's worst-layer imbalance it is
proposed, and the placement (in-process engine, or the multi-process front's two-phase switch)
installs it between steps. Expert outputs do not depend on which replica computes them, so the
switch changes no token (exact mode: bit for bit).

Torch-free: the multi-process front runs it too.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from afdserve.eplb.algorithm import rebalance
from afdserve.eplb.placement import Placement
from afdserve.eplb.window import ExpertLoadWindow

MIN_GAIN = 0.05
"""A re-placement must cut the worst layer's max/mean by at least this fraction: moving
experts for less is churn (each move loads weights on the target worker)."""


@dataclass(frozen=True)
class Replacement:
    """One re-placement, for metrics and logs: the worst layer's max/mean before and after, on
    the window's load."""

    version: int
    at_report: int
    imbalance_before: float
    imbalance_after: float


class EPLBController:
    def __init__(self, cfg: Any, placement: Placement) -> None:
        """`cfg`: the group's EngineConfig (its eplb, eplb_window_size, eplb_step_interval and
        num_redundant_experts; not imported: eplb sits below config's users in the layers)."""
        self.placement = placement
        self.enabled = cfg.eplb
        self.interval, self.redundant = cfg.eplb_step_interval, cfg.num_redundant_experts
        self.moe = [w is not None for w in placement.layers]
        self.window = ExpertLoadWindow(
            len(placement.layers), placement.num_experts, cfg.eplb_window_size
        )
        self.reports = 0
        self._last = 0
        self.history: list[Replacement] = []

    def observe(self, counts: Mapping[int, Sequence[int]]) -> None:
        """One attention worker's step: layer -> pairs per expert."""
        if counts:
            self.window.add(counts)
            self.reports += 1

    def imbalance(self, placement: Placement | None = None) -> list[float | None]:
        """Per layer max/mean worker load of the window's load under `placement` (current)."""
        return (placement or self.placement).imbalance(self.window.total())

    def propose(self) -> Placement | None:
        """A better placement when one is due (every `interval` reports) and cuts the worst
        layer's imbalance on the window by MIN_GAIN or more; else None."""
        if not self.enabled or self.reports - self._last < self.interval:
            return None
        self._last = self.reports
        load = self.window.total()
        new = rebalance(
            load, self.placement.num_workers, self.redundant, self.moe, self.placement.version + 1
        )
        before = max(v for v in self.placement.imbalance(load) if v is not None)
        after = max(v for v in new.imbalance(load) if v is not None)
        if new.layers == self.placement.layers or after > before * (1 - MIN_GAIN):
            return None
        self.history.append(Replacement(new.version, self.reports, before, after))
        return new

    def installed(self, placement: Placement) -> None:
        self.placement = placement
