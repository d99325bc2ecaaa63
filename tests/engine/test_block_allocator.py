from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from afdserve.engine import NULL_BLOCK, BlockAllocator, CacheConfig, NoFreeBlocksError
from afdserve.errors import UserInputError


def test_fresh_pool_reserves_block_zero_and_hands_out_low_ids_first():
    a = BlockAllocator(5)
    assert (a.num_usable, a.num_free, a.num_used, a.usage) == (4, 4, 0, 0.0)
    assert a.allocate(2) == [1, 2]
    assert a.allocate(2) == [3, 4]
    assert a.num_free == 0 and a.usage == 1.0
    assert not a.can_allocate(1) and a.can_allocate(0)


def test_allocation_beyond_the_pool_raises_and_takes_nothing():
    a = BlockAllocator(4)
    a.allocate(2)
    with pytest.raises(NoFreeBlocksError, match="only 1 are free"):
        a.allocate(2)
    assert a.num_free == 1
    assert a.allocate(1) == [3]


def test_freed_blocks_are_reused_and_never_handed_out_twice():
    a = BlockAllocator(4)
    first = a.allocate(3)
    a.free([first[1]])
    again = a.allocate(1)
    assert again == [first[1]]
    assert a.num_free == 0


@pytest.mark.parametrize(
    "bad, msg",
    [
        ([0], "not an allocatable"),
        ([7], "not an allocatable"),
        ([-1], "not an allocatable"),
        ([True], "not an allocatable"),
        ([2], "double free"),
    ],
)
def test_bad_free_raises(bad, msg):
    a = BlockAllocator(7)
    a.allocate(1)  # block 1 held, block 2 free
    with pytest.raises(ValueError, match=msg):
        a.free(bad)
    assert a.num_used == 1


def test_double_free_raises_and_free_is_all_or_nothing():
    a = BlockAllocator(6)
    blocks = a.allocate(3)
    a.free([blocks[0]])
    with pytest.raises(ValueError, match="double free"):
        a.free([blocks[1], blocks[0]])  # blocks[1] must not be freed either
    assert a.num_used == 2
    with pytest.raises(ValueError, match="double free"):
        a.free([blocks[2], blocks[2]])
    assert a.num_used == 2
    a.free(blocks[1:])
    assert a.num_used == 0


@pytest.mark.parametrize("n", [0, 1, -3, 2.5, True, "4"])
def test_bad_pool_size(n):
    with pytest.raises(ValueError, match="num_blocks must be an integer >= 2"):
        BlockAllocator(n)


@pytest.mark.parametrize("n", [-1, 1.0, True, None])
def test_bad_allocation_size(n):
    a = BlockAllocator(4)
    with pytest.raises(ValueError, match="cannot allocate"):
        a.allocate(n)
    assert a.allocate(0) == [] and a.num_free == 3


def test_cache_config_validation_and_sizes():
    c = CacheConfig(block_size=16, num_blocks=11)
    assert c.num_usable_blocks == 10 and c.capacity_tokens == 160
    assert [c.blocks_for(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
    for kwargs, msg in [
        ({"block_size": 0}, "block_size must be >= 1"),
        ({"num_blocks": 1}, "num_blocks must be >= 2"),
        ({"block_size": 2.0}, "block_size must be an integer"),
        ({"num_blocks": True}, "num_blocks must be an integer"),
    ]:
        with pytest.raises(UserInputError, match=msg):
            CacheConfig(**kwargs)


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate/free sequences: no block is ever held twice, counts always add up."""

    def __init__(self) -> None:
        super().__init__()
        self.alloc = BlockAllocator(9)
        self.held: list[list[int]] = []

    @rule(n=st.integers(0, 10))
    def allocate(self, n: int) -> None:
        if n <= self.alloc.num_free:
            self.held.append(self.alloc.allocate(n))
        else:
            with pytest.raises(NoFreeBlocksError):
                self.alloc.allocate(n)

    @precondition(lambda self: self.held)
    @rule(i=st.integers(0, 100))
    def free(self, i: int) -> None:
        blocks = self.held.pop(i % len(self.held))
        self.alloc.free(blocks)
        if blocks:
            with pytest.raises(ValueError, match="double free"):
                self.alloc.free(blocks[:1])

    @invariant()
    def consistent(self) -> None:
        flat = [b for group in self.held for b in group]
        assert len(flat) == len(set(flat))
        assert NULL_BLOCK not in flat
        assert all(1 <= b < 9 for b in flat)
        assert self.alloc.num_used == len(flat)
        assert self.alloc.num_free + len(flat) == 8


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
