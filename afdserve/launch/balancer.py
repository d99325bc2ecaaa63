"""EPLB in the in-process engine: between two engine steps nothing is in flight (every
attention worker's step has finished, so no FFN worker holds an activation), so a re-placement
is installed at once: each FFN worker gets its new expert sets (subsets of the one loaded FFN
part: in-process workers share its weights), each attention worker's dispatcher the new table.
The multi-process front does the same in two phases (launch/multiproc.py).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from afdserve.afd.expert_dispatch import ExpertDispatcher
from afdserve.afd.ffn_worker import FFNWorker
from afdserve.afd.stats import ExpertLoadState
from afdserve.eplb.controller import EPLBController
from afdserve.eplb.placement import Placement
from afdserve.model.parts import FFNPart

log = logging.getLogger(__name__)


class LocalBalancer:
    def __init__(
        self,
        controller: EPLBController,
        ffn_part: FFNPart,
        ffns: Sequence[FFNWorker],
        dispatchers: Sequence[ExpertDispatcher],
    ) -> None:
        self.controller, self.ffn_part = controller, ffn_part
        self.ffns, self.dispatchers = list(ffns), list(dispatchers)

    def before_step(self) -> None:
        """Install a re-placement if one is due (called with no step in flight)."""
        new = self.controller.propose()
        if new is not None:
            self.install(new)

    def install(self, placement: Placement) -> None:
        from afdserve.launch.local import held_experts

        for j, ffn in enumerate(self.ffns):
            ffn.use_experts(
                {
                    layer: held_experts(self.ffn_part, layer, placement.experts_of(layer, j))
                    for layer in placement.moe_layers
                }
            )
        for d in self.dispatchers:
            d.use(placement)
        self.controller.installed(placement)
        log.info("EPLB: placement v%d in use\n%s", placement.version, placement.render())

    def after_step(self) -> None:
        for d in self.dispatchers:
            self.controller.observe(d.take_counts())

    def state(self) -> ExpertLoadState:
        return ExpertLoadState.of(self.controller)
