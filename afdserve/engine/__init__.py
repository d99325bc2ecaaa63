"""The engine of one attention worker: KV block allocator, scheduler, sampler.

Everything here but `sampler` is torch-free, so schedulers are unit tested on CPU without a
model by feeding them hand-made `StepResult`s. Import the sampler as
`from afdserve.engine.sampler import sample` (it needs torch).
"""

from __future__ import annotations

from afdserve.engine.block_allocator import NULL_BLOCK, BlockAllocator, NoFreeBlocksError
from afdserve.engine.config import CacheConfig, SchedulerConfig
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
]
