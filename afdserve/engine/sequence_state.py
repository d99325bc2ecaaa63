"""State a sampler keeps per sequence on its attention worker (penalty history, grammar state).

Such state is created on a sequence's first step, advanced by the tokens sampled for it, kept
through a preemption (a recompute re-feeds tokens but samples nothing new for them) and dropped
once the scheduler no longer tracks the sequence. `PerSequence` is that bookkeeping, shared by
`penalties.TokenHistory` and `structured.Grammars`. Used by one thread: the one that runs the
worker's steps.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Generic, TypeVar

T = TypeVar("T")


class PerSequence(Generic[T]):
    def __init__(self) -> None:
        self._seqs: dict[int, T] = {}

    def __len__(self) -> int:
        return len(self._seqs)

    def retain(self, live_seq_ids: Collection[int]) -> None:
        """Drop the state of sequences that are no longer live (finished or aborted)."""
        for seq_id in [s for s in self._seqs if s not in live_seq_ids]:
            del self._seqs[seq_id]
