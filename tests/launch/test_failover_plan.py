"""The front's FFN failover state machine (launch/failover.py), without processes."""

from __future__ import annotations

import time
from types import SimpleNamespace

from afdserve.eplb.controller import EPLBController
from afdserve.eplb.placement import Placement
from afdserve.launch.failover import FFNFailover
from afdserve.launch.messages import ExpertsHeld, HoldExperts
from afdserve.launch.replacement import TwoPhaseSwitch

CFG = SimpleNamespace(eplb=False, eplb_window_size=4, eplb_step_interval=3, num_redundant_experts=0)


def _failover(placement: Placement, timeout_s: float = 30.0, max_experts: int = 0):
    sent: list[tuple[int, object]] = []

    def send(rank: int, msg: object) -> None:
        sent.append((rank, msg))

    switch = TwoPhaseSwitch(EPLBController(CFG, placement), [0, 1], [2, 3], send, 60.0)
    return FFNFailover(switch, send, timeout_s, max_experts), sent


def test_survivors_load_then_the_placement_is_in_use_and_the_restarted_one_gets_it_back():
    p = Placement.static([True, False], 4, 2)
    f, sent = _failover(p)
    assert f.can_take(3)
    assert f.start(3, "FFN rank 3 died")
    assert [(r, type(m)) for r, m in sent] == [(2, HoldExperts)]  # only the survivor loads
    assert f.taken == {2: {0: [2, 3]}} and f.experts_loaded == 2
    assert f.tick()[0] == ""  # not loaded yet
    assert f.observe(ExpertsHeld(2, 0)) is False  # another version: not ours
    assert f.observe(ExpertsHeld(2, f.pending.version))
    what, new, dead = f.tick()
    assert what == "ready" and dead == {3: "FFN rank 3 died"} and new.down == (1,)
    assert f.placement == new and f.failovers == 1
    back = f.back(3)
    assert back.layers == p.layers and back.down == () and back.version == new.version + 1
    f.switch.begin(back)  # the switch back starts; rank 3 dies again in its phase 1
    assert f.start(3, "died again") and f.switch.target is None
    again = f.pending
    assert again.down == (1,) and again.version == back.version + 1 and f.taken == {}
    assert f.tick()[0] == "ready"
    assert f.back(3).layers == p.layers  # what to restore is still the original


def test_full_redundancy_needs_no_load():
    p = Placement(2, 2, (((0, 1), (0, 1)),))
    f, sent = _failover(p)
    assert f.start(2, "FFN rank 2 died") and sent == []
    assert f.tick()[0] == "ready" and f.experts_loaded == 0


def test_a_failover_past_the_budget_is_refused_and_one_unanswered_is_abandoned():
    p = Placement.static([True], 4, 2)
    f, sent = _failover(p, max_experts=3)
    assert not f.can_take(3)
    assert not f.start(3, "died") and sent == [] and f.pending is None
    f, sent = _failover(p, timeout_s=0.0)
    assert f.start(3, "died")
    time.sleep(0.01)
    what, new, dead = f.tick()
    assert what == "abandoned" and new is None and dead == {3: "died"}
    assert f.placement == p
