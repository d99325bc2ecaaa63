"""Splitting one step's chunks into M microbatches for ping-pong pipelining.

Torch-free and beside the scheduler whose plans it splits, so that the simulator's reference
replica (`afdserve.sim.replica`) splits steps with the very function the attention runner uses.
"""

from __future__ import annotations

from collections.abc import Sequence

from afdserve.types import ScheduledChunk


def split_microbatches(chunks: Sequence[ScheduledChunk], m: int) -> list[list[ScheduledChunk]]:
    """Split `chunks` into at most `m` contiguous, non-empty groups of near-equal token counts.

    Contiguous so that the concatenation of the microbatches is the step's original order; a
    group closes once it holds its fair share of the tokens still left to place.
    """
    if m < 1:
        raise ValueError(f"microbatch count must be >= 1, got {m}")
    groups: list[list[ScheduledChunk]] = []
    remaining_tokens = sum(c.num_tokens for c in chunks)
    current: list[ScheduledChunk] = []
    current_tokens = 0
    for i, chunk in enumerate(chunks):
        current.append(chunk)
        current_tokens += chunk.num_tokens
        groups_left = m - len(groups)
        chunks_left = len(chunks) - i - 1
        if groups_left > 1 and chunks_left > 0 and current_tokens * groups_left >= remaining_tokens:
            groups.append(current)
            remaining_tokens -= current_tokens
            current, current_tokens = [], 0
    if current:
        groups.append(current)
    return groups
