"""The placement table, DeepSeek-style rebalancing and the load window (torch-free)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afdserve.eplb.algorithm import capacities, rebalance
from afdserve.eplb.placement import Placement
from afdserve.eplb.window import ExpertLoadWindow
from afdserve.errors import UserInputError


def test_static_placement_spreads_contiguous_blocks():
    p = Placement.static([True, False], 8, 3)
    assert p.layers[0] == ((0, 1), (2, 3, 4), (5, 6, 7)) and p.layers[1] is None
    assert Placement.static([True], 2, 4).layers[0] == ((), (0,), (), (1,))
    assert p.workers_of(0, 4) == (1,) and p.replica_counts(0) == [1] * 8
    assert Placement.from_dict(p.to_dict()) == p


@pytest.mark.parametrize(
    "layers,match",
    [
        ((((0,), (1,)),), "experts \\[2\\] held nowhere"),
        ((((0, 0), (1, 2)),), "sorted and distinct"),
        ((((0, 1, 2),),), "1 worker entries for 2"),
        ((((0, 1), (2, 3)),), "expert 3 not in 0..2"),
    ],
)
def test_bad_placements_are_refused(layers, match):
    with pytest.raises(UserInputError, match=match):
        Placement(3, 2, layers)


def test_a_skewed_layer_is_balanced_with_two_redundant_slots():
    load = [[1000, 900, 10, 10, 10, 10, 10, 10]]
    static = Placement.static([True], 8, 2)
    assert static.imbalance(load)[0] > 1.7
    p = rebalance(load, 2, 2)
    assert p.imbalance(load)[0] <= 1.15
    assert p.replica_counts(0)[:2] == [2, 2]  # the two hot experts are replicated
    assert "0*" in p.render(load) and "max/mean" in p.render(load)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(2, 48).flatmap(
        lambda e: st.tuples(
            st.just(e),
            st.lists(
                st.lists(st.integers(0, 1000), min_size=e, max_size=e), min_size=1, max_size=3
            ),
            st.integers(1, 8),
            st.integers(0, e),
        )
    )
)
def test_rebalance_gives_a_valid_placement_within_capacity(args):
    e, load, m, r = args
    caps = capacities(e + r, m)
    if max(caps) > e:
        with pytest.raises(UserInputError, match="more than the"):
            rebalance(load, m, r)
        return
    p = rebalance(load, m, r)  # validated by Placement itself: every expert somewhere
    for layer in range(len(load)):
        assert all(len(ids) <= c for ids, c in zip(p.layers[layer], caps, strict=True))
        assert all(n <= m for n in p.replica_counts(layer))
        if r >= m:  # greedy packing with room to replicate beats contiguous blocks
            static = Placement.static([True] * len(load), e, m)
            assert p.imbalance(load)[layer] <= static.imbalance(load)[layer] + 1e-9


def test_hierarchical_keeps_each_group_on_one_node():
    load = [[5, 1, 1, 1, 9, 9, 1, 1]]
    p = rebalance(load, 4, 0, num_groups=4, num_nodes=2)
    nodes = [set(p.layers[0][0]) | set(p.layers[0][1]), set(p.layers[0][2]) | set(p.layers[0][3])]
    for g in range(4):
        group = {2 * g, 2 * g + 1}
        assert any(group <= n for n in nodes), (g, nodes)
    with pytest.raises(UserInputError, match="divisible"):
        rebalance(load, 4, 0, num_groups=3, num_nodes=2)


def test_the_window_slides():
    w = ExpertLoadWindow(2, 3, window_steps=2)
    w.add({0: [1, 0, 0]})
    w.add({0: [0, 2, 0], 1: [1, 1, 1]})
    w.add({0: [0, 0, 3]})
    assert w.total() == [[0, 2, 3], [1, 1, 1]] and w.steps() == 2
    assert w.total_pairs[0] == [1, 2, 3]
    with pytest.raises(UserInputError, match="do not fit"):
        w.add({0: [1, 2]})
    with pytest.raises(UserInputError, match=">= 0"):
        w.add({1: [1, -1, 0]})
