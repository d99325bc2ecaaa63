"""The front's FFN failover (m > 1, an MoE model): the surviving FFN workers take a dead one's
experts, so streams go on without waiting for its restart.

1. An FFN worker dies (its process exits). The front computes a placement over the survivors
   (eplb/failover.py: an expert with a replica on a survivor stays there; each orphan goes to
   the survivor with the fewest experts of its layer) that marks the dead worker `down`.
2. Survivors that must load experts are told `HoldExperts(keep_others=True)` and answer
   `ExpertsHeld` once the weights are in; with full redundancy nothing is loaded and this
   phase is skipped. Meanwhile the attention workers wait, as for a restart, with their KV.
3. Every other worker is told to `Rejoin` the data plane under a new epoch, leaving the dead
   rank out (`absent`), with the survivors' placement: an attention worker abandons its step in
   flight (`StepInterrupted`), connects again, routes by the new placement (the down worker is
   sent nothing) and runs the same step again, so its tokens are those of an undisturbed run.
   The front restarts the dead worker meanwhile; it joins with no experts, and the others
   rejoin the data plane with it only when it says `Joining` (its model loaded), so nobody
   waits for its load.
4. Once it is ready, the two-phase switch (replacement.py) gives it experts again: the
   placement from before the failure, under a new version.

A failover that cannot be made (no survivor, a survivor past `--ffn-failover-max-experts`)
or whose loads are not answered within the deadline falls back to waiting for the restart.

Torch-free (the front imports no torch).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from afdserve.eplb.failover import survivor_placement, to_load
from afdserve.eplb.placement import Placement
from afdserve.launch.messages import ExpertsHeld, HoldExperts
from afdserve.launch.replacement import TwoPhaseSwitch

log = logging.getLogger(__name__)


class FFNFailover:
    def __init__(
        self,
        switch: TwoPhaseSwitch,
        send: Callable[[int, object], None],
        timeout_s: float,
        max_experts: int = 0,
    ) -> None:
        self.switch, self.send, self.timeout_s = switch, send, timeout_s
        self.max_experts = max_experts
        self.ffn_ranks: Sequence[int] = switch.ffn_ranks
        self.original: Placement | None = None
        """The placement in use before the first FFN worker went down (restored once all are
        back)."""
        self.pending: Placement | None = None
        """The survivors' placement while they load its experts (phase 2)."""
        self.dead: dict[int, str] = {}
        """FFN rank -> why, for the failovers in progress."""
        self._waiting: set[int] = set()
        self._deadline = 0.0
        self.failovers = 0
        """FFN workers whose experts the survivors took."""
        self.experts_loaded = 0
        """Experts survivors loaded from the model files in failovers (0 with full redundancy)."""
        self.taken: dict[int, dict[int, list[int]]] = {}
        """The last failover: survivor FFN rank -> layer -> the experts it took on (loaded)."""

    @property
    def placement(self) -> Placement:
        return self.switch.controller.placement

    def index(self, rank: int) -> int:
        return self.ffn_ranks.index(rank)

    def can_take(self, rank: int) -> bool:
        """Whether the survivors could take FFN rank `rank`'s experts now (a wedged worker is
        killed only then: otherwise waiting for it costs less than its restart)."""
        current = self.pending or self.placement
        down = set(current.down) | {self.index(rank)}
        return survivor_placement(current, down, current.version + 1, self.max_experts) is not None

    def start(self, rank: int, why: str) -> bool:
        """FFN rank `rank` died: plan the survivors' placement and ask for its loads; False when
        no failover can be made (the caller waits for the restart)."""
        installed, target = self.placement, self.switch.target
        current = installed
        if self.pending is not None:  # a second death while survivors load: plan again
            current = self.pending
        if self.index(rank) in current.down and target is None:
            return True  # already failed over (it died again while restarting)
        # (dead again while the switch back gave it experts: fail over again, so that the
        # attention workers that already route to it are told the survivors' placement)
        version = max(current.version, target.version if target is not None else 0) + 1
        down = set(current.down) | {self.index(rank)}
        window = self.switch.controller.window.total()
        new = survivor_placement(current, down, version, self.max_experts, window)
        if new is None:
            log.warning(
                "%s: the surviving FFN workers cannot take its experts (%s); waiting for its "
                "restart",
                why,
                "none left" if len(down) >= current.num_workers else "--ffn-failover-max-experts",
            )
            return False
        self.switch.abandon()
        if not installed.down:  # every FFN worker was in service: that is what to restore
            self.original = target if target is not None and not target.down else installed
        loads = to_load(self.placement, new)  # against what is installed: pending's too
        self.taken = {self.ffn_ranks[w]: layers for w, layers in loads.items()}
        self.pending, self.dead[rank] = new, why
        self._waiting = set(self.taken)
        self._deadline = time.monotonic() + self.timeout_s
        for r in sorted(self.taken):
            self.send(r, HoldExperts(new.to_dict(), keep_others=True))
        self.experts_loaded += sum(
            len(v) for ls in to_load(current, new).values() for v in ls.values()
        )
        log.warning(
            "%s: its experts go to the surviving FFN workers (placement v%d; %s)",
            why,
            version,
            "; ".join(
                f"FFN rank {r} loads " + ", ".join(f"layer {k}: {v}" for k, v in layers.items())
                for r, layers in sorted(self.taken.items())
            )
            or "every expert already has a replica on a survivor: nothing to load",
        )
        return True

    def observe(self, m: object) -> bool:
        """An `ExpertsHeld` for the survivors' placement (True: taken)."""
        if self.pending is None or not isinstance(m, ExpertsHeld):
            return False
        if m.version != self.pending.version:
            return False
        self._waiting.discard(m.rank)
        return True

    def tick(self) -> tuple[str, Placement | None, dict[int, str]]:
        """("ready", placement, the dead) once the survivors hold its experts, ("abandoned",
        None, the dead) when they did not answer in time, else ("", None, {})."""
        if self.pending is None:
            return "", None, {}
        if not self._waiting:
            new, dead = self.pending, self.dead
            self.pending, self.dead = None, {}
            self.switch.controller.installed(new)
            self.failovers += len(dead)
            log.warning("FFN failover: placement v%d in use\n%s", new.version, new.render())
            return "ready", new, dead
        if time.monotonic() > self._deadline:
            log.warning(
                "FFN failover to v%d abandoned: no ExpertsHeld from ranks %s; waiting for the "
                "restart instead",
                self.pending.version,
                sorted(self._waiting),
            )
            dead = self.dead
            self.pending, self.dead = None, {}
            return "abandoned", None, dead
        return "", None, {}

    def back(self, rank: int) -> Placement | None:
        """FFN rank `rank` is ready again: the placement that gives it experts again (the one
        from before the failure, or over the workers still down), for the two-phase switch;
        None when it was not failed over."""
        current = self.placement
        w = self.index(rank)
        if w not in current.down or self.original is None:
            return None
        still = set(current.down) - {w}
        version = current.version + 1
        if not still:
            o = self.original
            return Placement(o.num_experts, o.num_workers, o.layers, version)
        return survivor_placement(self.original, still, version)
