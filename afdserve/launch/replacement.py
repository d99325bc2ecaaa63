"""EPLB over worker processes: the front's two-phase switch to a new placement.

Attention workers step independently, so no single instant is "between steps" for all of them.
The switch therefore never needs one:
1. every FFN worker is told to hold the new placement's experts *as well as* its old ones
   (`HoldExperts(keep_others=True)`: it loads the missing ones from the model files, then
   swaps its sets between two batches) and answers `ExpertsHeld`;
2. once all have, every attention worker is told to route by the new placement from its next
   step (`UsePlacement`, applied between two of its steps) and answers `PlacementInUse`;
3. once all have, no step routed by the old placement is left anywhere, and the FFN workers
   drop the experts the new placement does not give them (`HoldExperts(keep_others=False)`).
Throughout, any frame an FFN worker receives names experts it holds, and every pair's output
is the same whichever replica computes it, so no request is dropped and no token changes.
A switch that is not answered within its deadline is abandoned with a warning (a worker that
is gone is the failure detector's business; the old placement stays valid for phase 1).

Torch-free (the front imports no torch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from afdserve.eplb.controller import EPLBController
from afdserve.eplb.placement import Placement
from afdserve.launch.messages import (
    ExpertsHeld,
    HoldExperts,
    PlacementInUse,
    StepOutputs,
    UsePlacement,
)

log = logging.getLogger(__name__)


class TwoPhaseSwitch:
    def __init__(
        self,
        controller: EPLBController,
        attention_ranks: Sequence[int],
        ffn_ranks: Sequence[int],
        send: Callable[[int, object], None],
        timeout_s: float,
    ) -> None:
        self.controller = controller
        self.attention_ranks, self.ffn_ranks = tuple(attention_ranks), tuple(ffn_ranks)
        self.send, self.timeout_s = send, timeout_s
        self.target: Placement | None = None
        """The placement being switched to (None: no switch in progress)."""
        self.phase = 0
        self._waiting: set[int] = set()
        self._deadline = 0.0

    def observe(self, m: object) -> bool:
        """Take a worker message that concerns expert load or the switch; True if it did."""
        if isinstance(m, StepOutputs):
            if m.expert_load:
                self.controller.observe(m.expert_load)
            return False  # its events are still the front's
        if self.target is None or not isinstance(m, ExpertsHeld | PlacementInUse):
            return isinstance(m, ExpertsHeld | PlacementInUse)
        if m.version == self.target.version:
            self._waiting.discard(m.rank)
        if not self._waiting:
            self._advance()
        return True

    def begin(self, target: Placement) -> None:
        """Switch to `target` (EPLB's proposal, or the placement that gives a restarted FFN
        worker experts again after a failover): phase 1, to the FFN workers it names live."""
        self.target, self.phase = target, 1
        ranks = [self.ffn_ranks[w] for w in target.live]
        self._ask(ranks, HoldExperts(target.to_dict(), keep_others=True))

    def abandon(self) -> None:
        """Drop a switch in progress (an FFN failover replaces the placement at once: every
        FFN worker still holds its old experts, `keep_others`, so nothing routed is lost)."""
        if self.target is not None:
            log.warning("EPLB re-placement to v%d abandoned (an FFN failover)", self.target.version)
        self.target, self.phase = None, 0

    def tick(self, propose: bool = True) -> None:
        """Start a re-placement when one is due (not while `propose` is false: FFN workers are
        down), or give up an overdue one."""
        if self.target is None:
            new = (
                self.controller.propose()
                if propose and not self.controller.placement.down
                else None
            )
            if new is not None:
                self.begin(new)
        elif time.monotonic() > self._deadline:
            log.warning(
                "EPLB re-placement to v%d abandoned in phase %d: no answer from ranks %s",
                self.target.version,
                self.phase,
                sorted(self._waiting),
            )
            self.target, self.phase = None, 0

    def _ask(self, ranks: Sequence[int], msg: object) -> None:
        self._waiting = set(ranks)
        self._deadline = time.monotonic() + self.timeout_s
        for rank in ranks:
            self.send(rank, msg)

    def _advance(self) -> None:
        assert self.target is not None
        if self.phase == 1:
            self.phase = 2
            self._ask(self.attention_ranks, UsePlacement(self.target.to_dict()))
        elif self.phase == 2:
            self.controller.installed(self.target)
            for w in self.target.live:  # phase 3: nothing routes by the old placement now
                rank = self.ffn_ranks[w]
                self.send(rank, HoldExperts(self.target.to_dict(), keep_others=False))
            log.info("EPLB: placement v%d in use\n%s", self.target.version, self.target.render())
            self.target, self.phase = None, 0
