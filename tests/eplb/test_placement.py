"""The placement table: validation, the static layout, lookups, loads, JSON and the render."""

from __future__ import annotations

import json

import numpy as np
import pytest

from afdserve.eplb.placement import RENDER_WIDTH, Placement
from afdserve.errors import UserInputError


def test_static_spreads_contiguous_blocks():
    # worker w holds [w*E//m, (w+1)*E//m): for E=8, m=3 that is 2, 3, 3 experts
    p = Placement.static([True, False], 8, 3)
    assert p.layers == (((0, 1), (2, 3, 4), (5, 6, 7)), None)
    assert [len(ids) for ids in p.layers[0]] == [2, 3, 3]
    assert p.workers_of(0, 4) == (1,) and p.experts_of(0, 2) == (5, 6, 7)
    assert p.replica_counts(0) == [1] * 8 and p.moe_layers == [0] and p.version == 0
    # m > E: two of the four workers hold nothing, which is allowed
    assert Placement.static([True], 2, 4).layers[0] == ((), (0,), (), (1,))


@pytest.mark.parametrize(
    "layers,match",
    [
        ((((0,), (1,)),), r"experts \[2\] held nowhere"),
        ((((0, 0), (1, 2)),), "sorted and distinct"),
        ((((1, 0), (2,)),), "sorted and distinct"),
        ((((0, 1, 2),),), "1 worker entries for 2"),
        ((((0, 1), (2, 3)),), "expert 3 not in 0..2"),
        ((((0, -1), (1, 2)),), "expert -1 not in 0..2"),
        ((((0, True), (1, 2)),), "expert True not in"),
        ((((0, 1.0), (2,)),), "expert 1.0 not in"),
        ((((0, "1"), (2,)),), "not in 0..2"),
        ((((0, 1), 2),), "2 is not a list of expert ids"),
        ((5,), "5 is not a worker list"),
    ],
)
def test_bad_placements_are_refused(layers, match):
    with pytest.raises(UserInputError, match=match):
        Placement(3, 2, layers)


@pytest.mark.parametrize("field", ["num_experts", "num_workers", "version"])
def test_bad_sizes_are_refused(field):
    kw = dict(num_experts=2, num_workers=1, layers=(((0, 1),),), version=0)
    kw[field] = -1
    with pytest.raises(UserInputError, match=field):
        Placement(**kw)


def test_lists_and_numpy_ids_are_stored_as_tuples_of_ints():
    p = Placement(3, 2, [[[0, 1], np.array([1, 2])], None])
    assert p.layers == (((0, 1), (1, 2)), None)
    assert all(type(x) is int for x in p.layers[0][1])
    assert p == Placement(3, 2, (((0, 1), (1, 2)), None)) and hash(p)
    assert p.workers_of(0, 1) == (0, 1) and p.replica_counts(0) == [1, 2, 1]


def test_round_trip_through_json():
    p = Placement(4, 3, (((0, 3), (1, 3), (2,)), None, ((0, 1, 2), (3,), (0,))), version=7)
    d = json.loads(json.dumps(p.to_dict()))
    assert Placement.from_dict(d) == p and Placement.from_dict(d).version == 7
    assert Placement.from_dict(d).workers_of(2, 0) == (0, 2)


@pytest.mark.parametrize(
    "d,match",
    [
        ({"num_experts": 2, "num_workers": 1, "layers": [[[0, 1]]]}, "malformed"),  # no version
        ({"num_experts": 2, "num_workers": 1, "version": 0, "layers": 3}, "malformed"),
        ({"num_experts": 2, "num_workers": 1, "version": 0, "layers": [[[0]]]}, "held nowhere"),
    ],
)
def test_from_dict_validates(d, match):
    with pytest.raises(UserInputError, match=match):
        Placement.from_dict(d)


def test_owner_table_pads_with_minus_one():
    p = Placement(3, 3, (((0, 1), (1,), (1, 2)), None))
    table = p.owner_table(0)  # [E, max replicas]
    assert table.dtype == np.int64 and table.tolist() == [[0, -1, -1], [0, 1, 2], [2, -1, -1]]
    with pytest.raises(UserInputError, match="dense"):
        p.owner_table(1)


def test_worker_load_splits_a_replicated_expert_evenly():
    p = Placement(3, 2, (((0, 1), (1, 2)), None))
    assert p.worker_load(0, [10, 6, 4]) == [13.0, 7.0]
    assert p.imbalance([[10, 6, 4], [99, 99, 99]]) == [pytest.approx(13 / 10), None]
    assert p.imbalance([[0, 0, 0], [1, 2, 3]])[0] == 1.0  # no load: balanced
    with pytest.raises(UserInputError, match="1 layers, the placement 2"):
        p.imbalance([[1, 2, 3]])
    with pytest.raises(UserInputError, match="2 expert loads for 3"):
        p.worker_load(0, [1, 2])


def test_render_lists_each_worker_and_the_imbalance():
    p = Placement(4, 2, (((0, 1, 3), (2, 3)), None))
    load = [[30, 10, 20, 40], [0, 0, 0, 0]]
    text = p.render(load)
    assert "F0" in text and "F1" in text and "3*" in text and "0,1,3*" in text
    assert p.imbalance(load)[0] == pytest.approx(1.2) and "1.200" in text  # (60, 40): 60/50
    assert "60" in text and "40" in text and "1 dense layer not shown" in text
    assert "max/mean" not in p.render() and "0,1,3*" in p.render()


def test_render_fits_100_columns_and_counts_large_layers():
    rng = np.random.default_rng(0)
    ids = rng.permutation(16)
    small = Placement(16, 4, (tuple(tuple(sorted(ids[w::4].tolist())) for w in range(4)),))
    load = rng.integers(0, 10**6, (1, 16))
    assert max(len(line) for line in small.render(load).splitlines()) <= RENDER_WIDTH
    big = Placement.static([True], 64, 4)
    assert "16 experts" in big.render([[1] * 64]) and "," not in big.render()
