"""The survivors' placement of an FFN failover (eplb/failover.py) and `Placement.down`."""

from __future__ import annotations

import pytest
import torch

from afdserve.afd.expert_dispatch import ExpertDispatcher
from afdserve.eplb.failover import survivor_placement, to_load
from afdserve.eplb.placement import Placement
from afdserve.errors import UserInputError
from afdserve.model.experts import route


def test_orphans_go_to_the_survivors_and_the_dead_worker_holds_nothing():
    p = Placement.static([True, False, True], 8, 2)
    new = survivor_placement(p, {1}, version=1)
    assert new is not None and new.down == (1,) and new.version == 1
    assert new.experts_of(0, 0) == tuple(range(8)) and new.experts_of(0, 1) == ()
    assert new.layers[1] is None
    assert to_load(p, new) == {0: {0: [4, 5, 6, 7], 2: [4, 5, 6, 7]}}


def test_an_expert_with_a_replica_on_a_survivor_stays_there_unloaded():
    p = Placement(4, 2, (((0, 1, 2, 3), (0, 1, 2, 3)),))  # full redundancy
    new = survivor_placement(p, {0}, version=2)
    assert new.experts_of(0, 1) == (0, 1, 2, 3) and to_load(p, new) == {}
    partial = Placement(4, 2, (((0, 1, 2), (2, 3)),))
    new = survivor_placement(partial, {0}, version=1)
    assert to_load(partial, new) == {1: {0: [0, 1]}}  # expert 2's replica stays, unloaded


def test_each_orphan_goes_to_the_survivor_with_the_fewest_experts_heaviest_first():
    p = Placement(6, 3, (((0, 1, 2, 3), (4,), (5,)),))
    new = survivor_placement(p, {0}, version=1, load=[[1, 9, 5, 7, 0, 0]])
    # orphans by load: 1 (9), 3 (7), 2 (5), 0 (1); worker 1 and 2 each hold one
    assert new.experts_of(0, 1) == (1, 2, 4) and new.experts_of(0, 2) == (0, 3, 5)


def test_no_failover_past_the_memory_budget_or_without_a_survivor():
    p = Placement.static([True], 8, 2)
    assert survivor_placement(p, {1}, version=1, max_experts=7) is None
    assert survivor_placement(p, {1}, version=1, max_experts=8) is not None
    assert survivor_placement(p, {0, 1}, version=1) is None
    three = Placement.static([True], 8, 3)
    once = survivor_placement(three, {2}, version=1)
    assert survivor_placement(once, {0}, version=2).down == (0, 2)  # a second death


def test_placement_down_is_checked_and_travels():
    p = Placement(2, 2, (((0, 1), ()),), version=3, down=(1,))
    assert Placement.from_dict(p.to_dict()) == p and p.live == [0]
    assert Placement.from_dict({**p.to_dict(), "down": []}).down == ()
    old = p.to_dict()
    del old["down"]  # a placement dict from before the failover
    assert Placement.from_dict(old).down == ()
    with pytest.raises(UserInputError, match="is down but holds experts"):
        Placement(2, 2, (((0,), (1,)),), down=(1,))
    with pytest.raises(UserInputError, match="not all 2"):
        Placement(2, 2, (None,), down=(0, 1))
    with pytest.raises(UserInputError, match="placement down"):
        Placement(2, 2, (None,), down=(True,))
    assert "down: F1" in p.render()


class _Router:
    def __init__(self, logits: torch.Tensor, top_k: int) -> None:
        self.logits, self.top_k = logits, top_k

    def route(self, layer, h):
        return (h, *route(self.logits, self.top_k, True, h.dtype))


def test_a_down_ffn_worker_gets_no_rows_dense_or_routed():
    """Dense rows are cut over the live workers only; routed pairs never name a down worker."""
    p = Placement(4, 3, (((0, 1), (), (2, 3)), None), down=(1,))
    logits = torch.randn(5, 4)
    d = ExpertDispatcher(rank=1, num_ffn=3, router=_Router(logits, 2), placement=p)
    assert d.live == (0, 2)
    h = torch.arange(10.0).view(5, 2)
    sends, dispatch = d.plan(1, h)  # the dense layer
    assert [s.x.shape[0] for s in sends] == [3, 0, 2]  # chunk 0 -> live[1] = 2, chunk 1 -> 0
    assert torch.equal(d.gather(dispatch, [s.x * 2 for s in sends], h), h * 2)
    sends, dispatch = d.plan(0, h)
    assert sends[1].x.shape[0] == 0 and dispatch.places[1].numel() == 0
    assert sum(int((s.routing >= 0).sum()) for s in sends if s.routing is not None) == 10
