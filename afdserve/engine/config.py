"""Frozen, validated configuration of one attention worker's scheduler and paged KV cache.

Both are plain data (no torch): the model runner sizes its KV tensors from `CacheConfig`, the
scheduler plans steps from both. Per-worker copies are made with `dataclasses.replace`.
"""

from __future__ import annotations

from dataclasses import dataclass

from afdserve.errors import UserInputError


def _check_int(owner: str, name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserInputError(f"{owner}.{name} must be an integer, got {value!r}")
    if value < minimum:
        raise UserInputError(f"{owner}.{name} must be >= {minimum}, got {value}")


@dataclass(frozen=True)
class CacheConfig:
    """Shape of the paged KV cache of one attention worker."""

    block_size: int = 16
    """Tokens per KV block (one page of the cache)."""
    num_blocks: int = 1024
    """Physical blocks the runner allocates, *including* the reserved null block 0.

    Block 0 is never handed to a sequence: runners pad block tables with it, so a padded
    gather `cache[block_table]` always reads a valid (and never written-for-real) block. The
    scheduler can therefore use `num_blocks - 1` blocks.
    """
    enable_prefix_caching: bool = False
    """Keep full blocks by their tokens' chained hash and reuse them for any sequence that
    starts with the same tokens (engine/prefix_cache.py). Off here so that a bare scheduler
    (unit tests, the simulator's replica) keeps exact block counts; `EngineConfig` turns it on
    by default, as vLLM does."""
    num_host_blocks: int = 0
    """Slots of the KV host tier: cached blocks the device evicts are copied there and back
    on a hit or a resume (engine/prefix_cache.py); 0: none. Needs prefix caching."""

    def __post_init__(self) -> None:
        _check_int("CacheConfig", "block_size", self.block_size, 1)
        _check_int("CacheConfig", "num_blocks", self.num_blocks, 2)
        if not isinstance(self.enable_prefix_caching, bool):
            raise UserInputError(
                f"CacheConfig.enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}"
            )
        _check_int("CacheConfig", "num_host_blocks", self.num_host_blocks, 0)
        if self.num_host_blocks and not self.enable_prefix_caching:
            raise UserInputError(
                "a KV host tier keeps evicted prefix-cache blocks: it needs prefix caching"
            )

    @property
    def num_usable_blocks(self) -> int:
        """Blocks that sequences can hold (all but the null block 0)."""
        return self.num_blocks - 1

    @property
    def capacity_tokens(self) -> int:
        """Most tokens the cache can hold for sequences at once."""
        return self.num_usable_blocks * self.block_size

    def blocks_for(self, num_tokens: int) -> int:
        """KV blocks needed to hold `num_tokens` tokens of one sequence."""
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True)
class SchedulerConfig:
    """Batching policy of one attention worker (vLLM v1-like continuous batching)."""

    max_num_seqs: int = 128
    """Most sequences running (holding KV and scheduled) at once."""
    max_num_batched_tokens: int = 2048
    """Token budget of one step: decode tokens plus prefill-chunk tokens, summed over sequences."""
    max_model_len: int = 2048
    """Model context: prompt + output tokens of one request never exceed this. The scheduler
    further caps it at the KV cache capacity (see `Scheduler.max_model_len`)."""
    long_prefill_token_threshold: int = 0
    """Most prompt tokens one sequence may prefill in one step (0: only the step budget limits
    it). Lower values let more requests share a step instead of one long prompt taking it all."""

    def __post_init__(self) -> None:
        _check_int("SchedulerConfig", "max_num_seqs", self.max_num_seqs, 1)
        _check_int("SchedulerConfig", "max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _check_int("SchedulerConfig", "max_model_len", self.max_model_len, 1)
        _check_int(
            "SchedulerConfig", "long_prefill_token_threshold", self.long_prefill_token_threshold, 0
        )


def worker_configs(
    *,
    max_num_seqs: int,
    max_num_batched_tokens: int,
    max_model_len: int,
    block_size: int,
    num_blocks: int | None = None,
    budget_blocks: int | None = None,
    enable_prefix_caching: bool = False,
    num_host_blocks: int = 0,
) -> tuple[CacheConfig, SchedulerConfig]:
    """One attention worker's cache and scheduler configs from an engine's flags.

    The runtime (`launch.local`, from `EngineConfig` and the model's KV bytes per block) and the
    simulator's reference replica both build them here, so a simulated worker schedules under
    the same rules as a real one. `num_blocks` is taken as given; otherwise the cache gets
    `budget_blocks` (what the KV memory holds; None: unbounded) but never more than every slot at
    full context needs, plus the null block, since more could never be used.
    """
    if num_blocks is None:
        need = max_num_seqs * -(-max_model_len // block_size) + 1
        num_blocks = max(2, need if budget_blocks is None else min(budget_blocks, need))
    cache = CacheConfig(
        block_size=block_size,
        num_blocks=num_blocks,
        enable_prefix_caching=enable_prefix_caching,
        num_host_blocks=num_host_blocks,
    )
    sched = SchedulerConfig(
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len,
    )
    return cache, sched
