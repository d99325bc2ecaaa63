"""The front's view of one worker process: what it tracks itself and what the worker reported.

A remote front cannot look at a worker's scheduler; it routes by the tokens it sent each
attention worker (`outstanding`), counts the adds a worker has not taken in yet (so admission
control sees a flood at once, not one report later), keeps the latest status and AFD stats each
worker reported, and checks that every worker serves the model it tokenizes for (`mismatch`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from afdserve.afd.stats import AFDStatsSnapshot, AttentionStatus
from afdserve.config import EngineConfig
from afdserve.engine.scheduler import SchedulerCounters
from afdserve.launch.messages import Fingerprint
from afdserve.model.config import ModelConfig


@dataclass
class RemoteWorker:
    """The front's view of one attention worker process: what the front itself tracks, and the
    latest status the worker reported."""

    rank: int
    outstanding: dict[str, int] = field(default_factory=dict)
    """request id -> tokens it holds or will hold (prompt + generated so far)."""
    adds_sent: int = 0
    adds_failed: int = 0
    """Adds the worker refused (an `error` naming a request id)."""
    status: AttentionStatus = field(
        default_factory=lambda: AttentionStatus(0, 0.0, 0, 0, 0, 0, SchedulerCounters())
    )
    afd: AFDStatsSnapshot = field(default_factory=AFDStatsSnapshot)
    last_heard: float = field(default_factory=time.monotonic)
    """When the front last got a message from this worker (time.monotonic)."""
    down: str = ""
    """Why the front routes nothing to this worker ("" while it serves): it died, reported a
    fatal error, or fell silent (its requests then moved to the others)."""
    dead: bool = False
    """Its process exited or reported a fatal error: it never serves again (a silent one that
    speaks again is back)."""
    cached: set[bytes] = field(default_factory=set)
    """A mirror of the block keys its prefix cache holds, kept from the keys each step's
    outputs say it stored and removed (Dynamo's KV events), for cache-aware routing. A lost
    message only makes routing less apt, never an output different."""

    def load_score(self) -> int:
        return sum(self.outstanding.values())

    def cached_prefix_len(self, keys) -> int:
        """Leading `keys` (a prompt's block keys) the worker's prefix cache holds."""
        n = 0
        for key in keys:
            if key not in self.cached:
                break
            n += 1
        return n

    def take_kv_events(self, stored, removed) -> None:
        """Apply a step's prefix-cache events, in order (removed after stored: a key stored
        and evicted within one step is gone)."""
        self.cached.update(stored)
        self.cached.difference_update(removed)

    def unseen_adds(self) -> int:
        """Requests sent to this worker that it had not taken in when it last reported."""
        taken = self.status.counters.requests_added + self.adds_failed
        return max(0, self.adds_sent - taken)

    def take_status(self, status: AttentionStatus, afd: dict | None) -> None:
        """Apply a step's or heartbeat's status (the codec checked its types); ValueError when
        a count is negative or the AFD stats are malformed."""
        counts = (status.num_running, status.num_waiting, status.kv_blocks_used)
        if min(*counts, status.kv_blocks_total) < 0:
            raise ValueError(f"negative status counts {status}")
        snapshot = AFDStatsSnapshot.from_dict(afd) if afd is not None else None
        self.status = status
        if snapshot is not None:
            self.afd = snapshot


def mismatch(
    model: ModelConfig, cfg: EngineConfig, theirs: Fingerprint, others: dict[int, Fingerprint]
) -> str:
    """What differs between a worker's fingerprint and the front's model and config, or the
    workers already ready ("" when nothing does)."""
    want = {
        "architecture": model.architecture,
        "layers": model.num_hidden_layers,
        "hidden_size": model.hidden_size,
        "vocab_size": model.vocab_size,
        "batch_invariant": cfg.batch_invariant,
    }
    if cfg.dtype != "auto":
        want["dtype"] = cfg.dtype
    diff = [
        f"{k} {getattr(theirs, k)!r} (front: {v!r})"
        for k, v in want.items()
        if getattr(theirs, k) != v
    ]
    for rank, fp in sorted(others.items()):
        diff += [f"{k} {b!r} (rank {rank}: {a!r})" for k, (b, a) in theirs.differences(fp).items()]
    return ", ".join(diff)


@dataclass
class Tracked:
    """What the front keeps of a request it serves, so it can replay it on another attention
    worker (a migration): everything its `AddRequest` said, and the tokens it generated."""

    prompt: tuple[int, ...]
    params: Any  # SamplingParams
    seed: int
    generated: list[int] = field(default_factory=list)
    migrations: int = 0
