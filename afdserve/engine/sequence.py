"""Sequence: the scheduler's mutable state for one request.

A `Request` is immutable input; a `Sequence` tracks what happened to it inside one scheduler:
tokens known so far (prompt + outputs), how many of them have KV in the cache, which blocks
hold that KV, and whether it is waiting, running or finished. Only the scheduler mutates it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from afdserve.types import FinishReason, PromptLogprob, Request, SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    """Queued; holds no KV blocks (new, or preempted and waiting to be recomputed)."""
    RUNNING = "running"
    """Admitted; holds KV blocks for its `num_computed_tokens` (plus this step's chunk)."""
    FINISHED = "finished"
    """Done (stop, length or abort); its blocks are back in the pool."""


@dataclass(eq=False)
class Sequence:
    seq_id: int
    """Scheduler-assigned id, unique and never reused within one scheduler."""
    request: Request
    token_ids: list[int] = field(default_factory=list)
    """Prompt followed by the generated tokens. After a preemption all of it is re-fed as the
    'prompt' of the recompute, so nothing generated is ever lost."""
    num_computed_tokens: int = 0
    """Leading tokens of `token_ids` whose KV is in the cache."""
    block_table: list[int] = field(default_factory=list)
    """Physical KV blocks, in order; block i holds positions [i*B, (i+1)*B)."""
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    max_computed_tokens: int = 0
    """High-water mark of `num_computed_tokens`, to tell first computes from recomputes."""
    queued_at: float = 0.0
    """When the scheduler took the request in (its clock), for the queue-time metric."""
    first_scheduled_at: float | None = None
    """When a step first scheduled it (preemptions do not move it), for queue/prefill time."""
    prompt_logprobs: list[PromptLogprob] = field(default_factory=list)
    """Prompt logprobs gathered so far (positions 1.. in order), when the request asked for
    them; kept across a preemption, so a recompute scores only the positions still missing."""
    prompt_logprobs_sent: bool = False
    """True once they went out on the first token event (they are never sent twice)."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache keys of the full blocks of `token_ids` hashed so far (engine/prefix_cache.py);
    still valid after a preemption, since tokens are only ever appended."""
    num_cached_blocks: int = 0
    """Leading blocks of `block_table` already offered to the prefix cache."""

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.request.prompt_token_ids)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def output_index(self) -> int:
        """How many tokens have been generated: the index of the next one to sample."""
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def num_uncomputed_tokens(self) -> int:
        """Known tokens still to be fed (1 for a decoding sequence, more while prefilling)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def prompt_logprob_range(self, start: int, n: int) -> tuple[int, int]:
        """(first row, row count) of a chunk of n tokens from `start` that score prompt tokens
        not scored yet: row j scores the prompt token at position start + j + 1."""
        if self.params.prompt_logprobs is None or self.prompt_logprobs_sent:
            return 0, 0
        lo = max(start + 1, len(self.prompt_logprobs) + 1)  # the next position to score
        hi = min(start + n, self.num_prompt_tokens - 1)  # the last position in reach
        return (lo - 1 - start, hi - lo + 1) if hi >= lo else (0, 0)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
