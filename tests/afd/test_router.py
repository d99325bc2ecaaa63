"""The router: least load without hits; a cached prefix wins while it outweighs the load gap
(cost = load - cached tokens); each decision counted by its reason."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from afdserve.afd.router import Router
from afdserve.engine.prefix_cache import block_hashes


@dataclass
class FakeWorker:
    load: int
    cached: set = field(default_factory=set)

    def load_score(self) -> int:
        return self.load

    def cached_prefix_len(self, keys) -> int:
        n = 0
        while n < len(keys) and keys[n] in self.cached:
            n += 1
        return n


PROMPT = list(range(100, 133))  # 33 tokens: 8 full blocks of 4 a worker could reuse


def _holding(blocks: int, load: int) -> FakeWorker:
    return FakeWorker(load, set(block_hashes(PROMPT, 4)[:blocks]))


def test_least_load_without_hits_ties_to_the_lowest_index():
    r = Router([FakeWorker(5), FakeWorker(3), FakeWorker(3)], block_size=4)
    assert r.choose(prompt=PROMPT) == 1
    assert r.choose(among=[0, 2], prompt=PROMPT) == 2
    assert r.by_reason == {"load": 2, "prefix": 0, "balance": 0} and r.routed == [0, 1, 1]


def test_the_longest_cached_prefix_wins_while_loads_are_close():
    # costs: worker 1 holds 8 blocks (32 tokens) and is 30 tokens busier: -2; worker 2, 2
    # blocks and 7 tokens busier: -1; worker 0: 0
    r = Router([_holding(0, 0), _holding(8, 30), _holding(2, 7)], block_size=4)
    assert r.choose(prompt=PROMPT) == 1 and r.by_reason["prefix"] == 1
    # 33 tokens busier, worker 1 costs 1: the saving no longer covers the gap
    r = Router([_holding(0, 0), _holding(8, 33), _holding(2, 7)], block_size=4)
    assert r.choose(prompt=PROMPT) == 2 and r.by_reason["balance"] == 1


def test_the_last_prompt_token_is_never_counted_as_cached():
    whole = set(block_hashes(PROMPT[:32], 4))  # all 8 blocks of a 32-token prompt
    r = Router([FakeWorker(0), FakeWorker(29, whole)], block_size=4)
    assert r.keys(PROMPT[:32]) == block_hashes(PROMPT[:31], 4)  # 7 blocks: the 8th is fed
    assert r.choose(prompt=PROMPT[:32]) == 0  # 7 blocks = 28 tokens < 29 of extra load


def test_without_a_block_size_it_is_least_load():
    r = Router([_holding(8, 1), _holding(0, 0)])
    assert r.choose(prompt=PROMPT) == 1 and r.by_reason["load"] == 1
    with pytest.raises(ValueError):
        Router([FakeWorker(0)], block_size=-1)
