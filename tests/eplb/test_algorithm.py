"""DeepSeek-style rebalancing: valid placements within capacity, the two steps' own guarantees,
a skewed layer balanced, and the hierarchical variant keeping groups on one node."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from afdserve.eplb.algorithm import capacities, imbalance_of, pack, rebalance, replicate
from afdserve.eplb.placement import Placement
from afdserve.errors import UserInputError

LOADS = st.sampled_from([0, 1, 2, 5, 10, 100, 1000]) | st.integers(0, 10**6)


@st.composite
def problems(draw, max_experts=64):
    """(load [L, E], m, redundant slots) with L <= 4, E in 2..max_experts, m in 1..8, R in 0..E."""
    e = draw(st.integers(2, max_experts))
    layers = draw(st.integers(1, 4))
    load = draw(st.lists(st.lists(LOADS, min_size=e, max_size=e), min_size=layers, max_size=layers))
    return load, draw(st.integers(1, 8)), draw(st.integers(0, e))


def test_capacities_spread_the_slots():
    assert capacities(10, 4) == [3, 3, 2, 2] and capacities(8, 2) == [4, 4]
    assert capacities(3, 5) == [1, 1, 1, 0, 0]


# Not asserted: "never worse than Placement.static". Greedy packing is a heuristic, and the
# contiguous blocks are sometimes the better (lucky) split, with or without redundancy:
#   m=2, R=0, load [3, 3, 2, 2, 2]: greedy (3+2+2 | 3+2) = 1.167, static (3+3 | 2+2+2) = 1.0;
#   m=2, R=2, load [10, 5, 3]: capacities (3, 2) force the second replica of expert 1 onto the
#     worker holding a replica of 0 and expert 2: 1.167, static (10 | 5+3) 1.111;
#   m=2, R=3, load [100, 2, 2, 0, 3, 1, 0, 1, 1, 0, 3, 3, 100]: 1.005, static exactly 1.0.
# So R >= m does not make it true either; the controller compares before it switches.
@settings(max_examples=100, deadline=None)
@given(problems())
def test_rebalance_gives_a_valid_placement_within_capacity(problem):
    load, m, r = problem
    e = len(load[0])
    caps = capacities(e + r, m)
    if max(caps) > e:
        with pytest.raises(UserInputError, match="more than the"):
            rebalance(load, m, r)
        return
    p = rebalance(load, m, r, version=3)  # Placement validates: every expert held somewhere
    assert p.version == 3 and p.num_experts == e and p.num_workers == m
    assert p == rebalance(np.array(load), m, r, version=3)  # deterministic, numpy or lists
    for layer in range(len(load)):
        held = p.layers[layer]
        assert all(len(ids) <= c for ids, c in zip(held, caps, strict=True))
        assert all(len(set(ids)) == len(ids) for ids in held)
        assert all(1 <= n <= m for n in p.replica_counts(layer))
        assert sum(len(ids) for ids in held) <= e + r
    assert all(1.0 - 1e-9 <= v <= m + 1e-9 for v in imbalance_of(load, p))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 40), st.integers(1, 8), st.data())
def test_without_load_every_slot_is_used(e, m, data):
    r = data.draw(st.integers(0, e * (m - 1)))
    if max(capacities(e + r, m)) > e:
        return
    p = rebalance([[0] * e], m, r)
    assert sorted(len(ids) for ids in p.layers[0]) == sorted(capacities(e + r, m))


@settings(max_examples=100, deadline=None)
@given(st.lists(LOADS, min_size=1, max_size=5), st.integers(1, 3), st.integers(0, 6))
def test_replicate_minimises_the_heaviest_replica(load, cap, spare):
    """Step 1 is exact: no other replica counts (each 1..cap, the same total) have a lighter
    heaviest replica."""
    e = len(load)
    reps = replicate(load, e + spare, cap)
    used = min(e + spare, e * cap)
    assert sum(reps) == used and all(1 <= n <= cap for n in reps)
    best = min(
        max(x / n for x, n in zip(load, alt, strict=True))
        for alt in itertools.product(range(1, cap + 1), repeat=e)
        if sum(alt) == used
    )
    assert max(x / n for x, n in zip(load, reps, strict=True)) == pytest.approx(best)


@settings(max_examples=100, deadline=None)
@given(st.lists(LOADS, min_size=1, max_size=40), st.integers(1, 8))
def test_pack_without_binding_capacities_keeps_grahams_bound(load, m):
    """Step 2, free of capacities and replicas, is list scheduling heaviest first: the worst
    worker is at most the mean plus the heaviest item."""
    held = pack(load, [1] * len(load), [len(load)] * m)
    totals = [sum(load[x] for x in ids) for ids in held]
    assert sorted(x for ids in held for x in ids) == list(range(len(load)))
    assert max(totals) <= sum(load) / m + max(load) + 1e-9


def test_pack_puts_a_replica_next_to_its_twin_never_on_it():
    # expert 1's second replica would go to the least-loaded worker, which holds the first
    assert pack([100, 10], [1, 2], [2, 2]) == [[0, 1], [1]]
    # no worker with room lacks expert 0: the surplus replica is dropped, expert 1 still placed
    assert pack([10, 1], [3, 1], [2, 2]) == [[0, 1], [0]]


def test_a_skewed_layer_is_balanced_with_two_redundant_slots():
    load = [[1000, 900, 10, 10, 10, 10, 10, 10]]
    static = Placement.static([True], 8, 2)
    assert static.imbalance(load)[0] > 1.7
    p = rebalance(load, 2, 2)
    assert p.imbalance(load)[0] <= 1.15
    assert p.replica_counts(0)[:2] == [2, 2]  # the two hot experts sit on both workers


def test_room_for_every_replica_balances_perfectly():
    load = [[7, 0, 300, 12, 5, 1]]
    p = rebalance(load, 3, 6 * 2)  # S = E*m: every worker holds every expert
    assert p.layers[0] == (tuple(range(6)),) * 3 and p.imbalance(load) == [pytest.approx(1.0)]


def test_dense_layers_are_left_out():
    load = [[1, 2, 3, 4], [-5, 0, 0, 0], [4, 3, 2, 1]]  # a dense row is not even read
    p = rebalance(load, 2, 0, moe_layers=[True, False, True])
    assert p.layers[1] is None and p.moe_layers == [0, 2]


@pytest.mark.parametrize(
    "load,kw,match",
    [
        ([], {}, "non-empty"),
        ([1, 2, 3], {}, "shape"),
        ([[1, 2], [3]], {}, "table of numbers"),
        ([[1, -2]], {}, ">= 0"),
        ([[1, float("nan")]], {}, "finite"),
        ([[1, float("inf")]], {}, "finite"),
        ([[1, 2]], dict(num_workers=0), "num_workers"),
        ([[1, 2]], dict(redundant_slots=-1), "redundant_slots"),
        ([[1, 2]], dict(num_workers=1, redundant_slots=1), "more than the 2 experts"),
        ([[1, 2]], dict(moe_layers=[True, True]), "2 entries for 1 layers"),
        ([[1, 2, 3, 4]], dict(num_groups=2), "num_nodes"),
        ([[1, 2, 3, 4]], dict(num_groups=3, num_nodes=1), "divisible"),
        ([[1, 2, 3, 4]], dict(num_groups=2, num_nodes=3, num_workers=3), "divisible"),
    ],
)
def test_bad_input_is_refused(load, kw, match):
    args = dict(num_workers=2, redundant_slots=0) | kw
    with pytest.raises(UserInputError, match=match):
        rebalance(load, **args)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_hierarchical_keeps_each_group_on_one_node(data):
    nodes = data.draw(st.integers(1, 3))
    groups = nodes * data.draw(st.integers(1, 3))
    size = data.draw(st.integers(1, 4))
    per_node = data.draw(st.integers(1, 3))
    e, m = groups * size, nodes * per_node
    r = data.draw(st.integers(0, e))
    load = data.draw(st.lists(st.lists(LOADS, min_size=e, max_size=e), min_size=1, max_size=2))
    s = e + r
    if math.ceil(s / m) > e:
        return
    p = rebalance(load, m, r, num_groups=groups, num_nodes=nodes)
    for layer in range(len(load)):
        held = p.layers[layer]
        assert all(len(ids) <= math.ceil(s / m) for ids in held)
        assert sum(len(ids) for ids in held) <= s
        for g in range(groups):  # replicas included: redundancy stays inside the node
            node_of = {
                w // per_node
                for x in range(g * size, (g + 1) * size)
                for w in p.workers_of(layer, x)
            }
            assert len(node_of) == 1, (g, held)


def test_hierarchical_with_one_node_is_the_flat_policy():
    load = [[5, 1, 1, 1, 9, 9, 1, 1], [0, 3, 0, 3, 0, 3, 0, 3]]
    assert rebalance(load, 3, 4, num_groups=1, num_nodes=1) == rebalance(load, 3, 4)


def test_hierarchical_spreads_slots_evenly_over_nodes():
    # flat capacities for S=8 over 6 workers are (2, 2, 1, 1, 1, 1): node 1 would get 3 slots for
    # its 4 experts; per node first, each node gets 4 slots (2, 1, 1)
    p = rebalance([[5, 1, 1, 1, 9, 9, 1, 1]], 6, 0, num_groups=4, num_nodes=2)
    assert [len(ids) for ids in p.layers[0]] == [2, 1, 1, 2, 1, 1]
