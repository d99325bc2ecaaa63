"""The engine of one attention worker: KV block allocator, scheduler, microbatch split, sampler.

Everything here but `sampler` and `kv_cache` is torch-free, so schedulers are unit tested on CPU
without a model by feeding them hand-made `StepResult`s, and the simulator's reference replica
drives them. Import the sampler as `from afdserve.engine.sampler import sample` (it needs torch).
"""

from __future__ import annotations

from afdserve.engine.block_allocator import NULL_BLOCK, BlockAllocator, NoFreeBlocksError
from afdserve.engine.config import CacheConfig, SchedulerConfig
from afdserve.engine.microbatch import split_microbatches
from afdserve.engine.scheduler import Scheduler, SchedulerCounters, SchedulerLoad
from afdserve.engine.sequence import Sequence, SequenceStatus

__all__ = [
    "NULL_BLOCK",
    "BlockAllocator",
    "CacheConfig",
    "NoFreeBlocksError",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerCounters",
    "SchedulerLoad",
    "Sequence",
    "SequenceStatus",
    "split_microbatches",
]
