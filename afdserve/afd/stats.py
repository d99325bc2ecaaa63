"""AFD metrics: a tiny recorder each worker writes on its hot path, and plain snapshots of it.

Why a recorder of our own rather than prometheus_client objects: the attention and FFN loops
record something every layer of every microbatch, and prometheus_client takes a lock per
observation. Here each recorder has exactly one writer at a time (an attention worker's link is
only used by the thread running that worker's step; the FFN worker serves on one thread), so an
observation is a bisect and a few integer adds, with no lock. Readers (a /metrics scrape) take
`snapshot()`, a copy that may lag the writer by one observation, which Prometheus tolerates; the
lock here only guards the rare creation of a new (direction, layer) or (layer, microbatch) key.

What is recorded, per component (an attention worker, or the FFN worker):

- transfers: per (direction, layer), the seconds spent in `transport.send` of an activation
  (serialise and hand off; A->F by attention workers, F->A by the FFN worker) as a histogram,
  and the tensor bytes sent;
- FFN batch tokens: per (layer, microbatch), how many tokens one FFN call processed (the FFN
  worker in AFD: the tokens gathered from every attention worker; each worker itself when
  aggregated);
- active and idle seconds: `active` is the wall time an attention worker spends inside steps,
  or the FFN worker's loop runs; `idle` is the part of it spent blocked (attention: waiting for
  FFN results; FFN: waiting for SYNCs and activations, with or without work pending);
  busy = active - idle;
- sync timeouts: waits that passed their deadline;
- step tokens (attention workers only): tokens each step scheduled (prefill chunks, recomputes
  and one per decoding sequence), the server's `vllm:iteration_tokens_total`.

Snapshots are plain picklable data, and `to_dict`/`from_dict` turn them into JSON and back, so
the multi-process runtime ships each worker's snapshot to the front over its control plane.
"""

from __future__ import annotations

import dataclasses
import threading
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import msgspec

from afdserve.engine.scheduler import SchedulerCounters

A2F = "a2f"
"""Direction label: attention worker -> FFN worker (ACTIVATION_TRANSFER)."""
F2A = "f2a"
"""Direction label: FFN worker -> attention worker (ACTIVATION_RESULT)."""

TRANSFER_BUCKETS_S: tuple[float, ...] = (
    1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4,
    1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1, 0.25, 0.5, 1.0,
)  # fmt: skip
"""Upper bounds (seconds) of the transfer-time histogram buckets; +Inf is implicit."""

BATCH_TOKEN_BUCKETS: tuple[float, ...] = (
    1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
)  # fmt: skip
"""Upper bounds of the FFN batch-token histogram buckets; +Inf is implicit."""

STEP_TOKEN_BUCKETS: tuple[float, ...] = (
    1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384,
)  # fmt: skip
"""Upper bounds of the tokens-per-step histogram: vLLM's `iteration_tokens_total` buckets."""


class BucketCounts:
    """A cumulative-free histogram: counts[i] observations fell in (bounds[i-1], bounds[i]].

    The last count is the +Inf bucket. `observe` is a bisect and two adds: cheap enough for
    every layer of every microbatch.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def copy(self) -> BucketCounts:
        out = BucketCounts(self.bounds)
        out.counts = self.counts[:]  # one C-level copy: consistent under the GIL
        out.sum = self.sum
        return out

    def merge(self, other: BucketCounts) -> None:
        if other.bounds != self.bounds:
            raise ValueError("cannot merge histograms with different bucket bounds")
        for i, c in enumerate(other.counts):
            self.counts[i] += c
        self.sum += other.sum

    def cumulative(self) -> list[tuple[str, int]]:
        """[(le, cumulative count)] in Prometheus order, ending with ("+Inf", total)."""
        out, total = [], 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += c
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), total))
        return out

    def __getstate__(self) -> tuple:
        return (self.bounds, self.counts, self.sum)

    def __setstate__(self, state: tuple) -> None:
        self.bounds, self.counts, self.sum = state


class _Transfer:
    __slots__ = ("hist", "nbytes")

    def __init__(self) -> None:
        self.hist = BucketCounts(TRANSFER_BUCKETS_S)
        self.nbytes = 0


@dataclass
class AFDStatsSnapshot:
    """A copy of one recorder (or a merge of several): plain data, safe to read and pickle."""

    transfer_seconds: dict[tuple[str, int], BucketCounts] = field(default_factory=dict)
    """(direction, layer) -> histogram of send times."""
    transfer_bytes: dict[tuple[str, int], int] = field(default_factory=dict)
    ffn_batch_tokens: dict[tuple[int, int], BucketCounts] = field(default_factory=dict)
    """(layer, microbatch) -> histogram of tokens per FFN call."""
    active_s: float = 0.0
    idle_s: float = 0.0
    sync_timeouts: int = 0
    step_tokens: BucketCounts | None = None
    """Tokens per step of an attention worker; None before its first step (and for the FFN)."""

    @property
    def busy_s(self) -> float:
        return max(0.0, self.active_s - self.idle_s)

    @property
    def busy_fraction(self) -> float:
        """busy / active, in [0, 1]; 0 before any step."""
        return self.busy_s / self.active_s if self.active_s > 0 else 0.0

    def merge(self, other: AFDStatsSnapshot) -> None:
        for key, h in other.transfer_seconds.items():
            mine = self.transfer_seconds.get(key)
            if mine is None:
                self.transfer_seconds[key] = h.copy()
            else:
                mine.merge(h)
        for key, n in other.transfer_bytes.items():
            self.transfer_bytes[key] = self.transfer_bytes.get(key, 0) + n
        for key, h in other.ffn_batch_tokens.items():
            mine = self.ffn_batch_tokens.get(key)
            if mine is None:
                self.ffn_batch_tokens[key] = h.copy()
            else:
                mine.merge(h)
        self.active_s += other.active_s
        self.idle_s += other.idle_s
        self.sync_timeouts += other.sync_timeouts
        if other.step_tokens is not None:
            if self.step_tokens is None:
                self.step_tokens = other.step_tokens.copy()
            else:
                self.step_tokens.merge(other.step_tokens)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form, for the multi-process control plane (see `from_dict`).

        Histogram bounds are not shipped: both ends use this module's bucket constants, and
        `from_dict` checks that the counts fit them.
        """
        return {
            "transfers": [
                [direction, layer, h.counts, h.sum, self.transfer_bytes.get((direction, layer), 0)]
                for (direction, layer), h in self.transfer_seconds.items()
            ],
            "ffn_batches": [
                [layer, mb, h.counts, h.sum] for (layer, mb), h in self.ffn_batch_tokens.items()
            ],
            "active_s": self.active_s,
            "idle_s": self.idle_s,
            "sync_timeouts": self.sync_timeouts,
            "step_tokens": (
                None
                if self.step_tokens is None
                else [self.step_tokens.counts, self.step_tokens.sum]
            ),
        }

    @classmethod
    def from_dict(cls, data: Any) -> AFDStatsSnapshot:
        """The snapshot `to_dict` described; ValueError (naming the field) when malformed."""
        if not isinstance(data, dict):
            raise ValueError(f"AFD stats must be a JSON object, got {type(data).__name__}")
        out = cls(
            active_s=_number(data.get("active_s"), "active_s"),
            idle_s=_number(data.get("idle_s"), "idle_s"),
            sync_timeouts=_index(data.get("sync_timeouts"), "sync_timeouts"),
        )
        for row in _rows(data, "transfers", 5):
            direction, layer, counts, total, nbytes = row
            if direction not in (A2F, F2A):
                raise ValueError(
                    f"AFD stats: transfer direction must be a2f or f2a, got {direction!r}"
                )
            key = (direction, _index(layer, "transfers layer"))
            out.transfer_seconds[key] = _histogram(TRANSFER_BUCKETS_S, counts, total, "transfers")
            out.transfer_bytes[key] = _index(nbytes, "transfers bytes")
        for row in _rows(data, "ffn_batches", 4):
            layer, mb, counts, total = row
            key = (_index(layer, "ffn_batches layer"), _index(mb, "ffn_batches microbatch"))
            out.ffn_batch_tokens[key] = _histogram(
                BATCH_TOKEN_BUCKETS, counts, total, "ffn_batches"
            )
        steps = data.get("step_tokens")
        if steps is not None:
            if not isinstance(steps, list) or len(steps) != 2:
                raise ValueError("AFD stats: step_tokens must be null or [counts, sum]")
            out.step_tokens = _histogram(STEP_TOKEN_BUCKETS, steps[0], steps[1], "step_tokens")
        return out


def _number(v: Any, what: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
        raise ValueError(f"AFD stats: {what} must be a number >= 0, got {v!r}")
    return float(v)


def _index(v: Any, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"AFD stats: {what} must be an integer >= 0, got {v!r}")
    return v


def _rows(data: dict, name: str, width: int) -> list[list]:
    rows = data.get(name)
    if not isinstance(rows, list) or not all(isinstance(r, list) and len(r) == width for r in rows):
        raise ValueError(f"AFD stats: {name} must be a list of {width}-element lists")
    return rows


def _histogram(bounds: tuple[float, ...], counts: Any, total: Any, what: str) -> BucketCounts:
    if not isinstance(counts, list) or len(counts) != len(bounds) + 1:
        raise ValueError(f"AFD stats: {what} histogram needs {len(bounds) + 1} bucket counts")
    h = BucketCounts(bounds)
    h.counts = [_index(c, f"{what} bucket count") for c in counts]
    h.sum = _number(total, f"{what} histogram sum")
    return h


def merge_snapshots(snapshots: Iterable[AFDStatsSnapshot]) -> AFDStatsSnapshot:
    out = AFDStatsSnapshot()
    for s in snapshots:
        out.merge(s)
    return out


class AFDStats:
    """One component's recorder. Exactly one thread writes at a time; any thread may snapshot."""

    def __init__(self) -> None:
        self._new_key = threading.Lock()  # taken only when a key is first seen, and by snapshot
        self._transfers: dict[tuple[str, int], _Transfer] = {}
        self._batches: dict[tuple[int, int], BucketCounts] = {}
        self.active_s = 0.0
        self.idle_s = 0.0
        self.sync_timeouts = 0
        self._steps: BucketCounts | None = None

    def record_transfer(self, direction: str, layer: int, seconds: float, nbytes: int) -> None:
        t = self._transfers.get((direction, layer))
        if t is None:
            with self._new_key:
                t = self._transfers.setdefault((direction, layer), _Transfer())
        t.hist.observe(seconds)
        t.nbytes += nbytes

    def record_ffn_batch(self, layer: int, microbatch: int, tokens: int) -> None:
        h = self._batches.get((layer, microbatch))
        if h is None:
            with self._new_key:
                h = self._batches.setdefault((layer, microbatch), BucketCounts(BATCH_TOKEN_BUCKETS))
        h.observe(tokens)

    def add_active(self, seconds: float) -> None:
        self.active_s += seconds

    def add_idle(self, seconds: float) -> None:
        self.idle_s += seconds

    def record_sync_timeout(self) -> None:
        self.sync_timeouts += 1

    def record_step(self, tokens: int) -> None:
        """One attention-worker step that scheduled `tokens` tokens."""
        h = self._steps
        if h is None:
            with self._new_key:
                h = self._steps = BucketCounts(STEP_TOKEN_BUCKETS)
        h.observe(tokens)

    def snapshot(self) -> AFDStatsSnapshot:
        with self._new_key:
            transfers = list(self._transfers.items())
            batches = list(self._batches.items())
            steps = self._steps
        return AFDStatsSnapshot(
            transfer_seconds={k: t.hist.copy() for k, t in transfers},
            transfer_bytes={k: t.nbytes for k, t in transfers},
            ffn_batch_tokens={k: h.copy() for k, h in batches},
            active_s=self.active_s,
            idle_s=self.idle_s,
            sync_timeouts=self.sync_timeouts,
            step_tokens=steps.copy() if steps is not None else None,
        )


class AttentionStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a front's `state()` and router need from an attention worker: its queues, KV
    blocks and scheduler counters (`counters.requests_added` lets a remote front count the adds
    this worker has not taken in yet). A msgspec Struct: it crosses the control plane as is."""

    load: int
    kv_usage: float
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    counters: SchedulerCounters
    kv_host_blocks_total: int = 0
    """Slots of its KV host tier (0: none)."""


@dataclass(frozen=True)
class WorkerState:
    """One attention worker as the metrics see it."""

    index: int
    num_running: int
    num_waiting: int
    kv_usage: float
    """Fraction of usable KV blocks in use, [0, 1]."""
    kv_blocks_used: int
    kv_blocks_total: int
    load_score: int
    """The router's key: KV tokens held plus tokens queued for prefill."""
    counters: Mapping[str, int]
    """The scheduler's monotonic counters (SchedulerCounters as a dict)."""
    routed: int
    """Requests the router has sent to this worker."""
    kv_host_blocks_total: int = 0
    """Slots of its KV host tier (0: none)."""

    @classmethod
    def of(
        cls,
        index: int,
        status: AttentionStatus,
        routed: int,
        *,
        unseen_adds: int = 0,
        load_score: int | None = None,
    ) -> WorkerState:
        """From a worker's status. A remote front adds the requests it sent that the worker
        had not taken in when it reported (`unseen_adds`, counted as waiting) and routes by
        its own `load_score`."""
        return cls(
            index=index,
            num_running=status.num_running,
            num_waiting=status.num_waiting + unseen_adds,
            kv_usage=status.kv_usage,
            kv_blocks_used=status.kv_blocks_used,
            kv_blocks_total=status.kv_blocks_total,
            load_score=status.load if load_score is None else load_score,
            counters=dataclasses.asdict(status.counters),
            routed=routed,
            kv_host_blocks_total=status.kv_host_blocks_total,
        )


@dataclass(frozen=True)
class ExpertLoadState:
    """Expert load and balance of a group under expert parallelism, for metrics."""

    placement_version: int
    replacements: int
    pairs_total: tuple[tuple[int, ...], ...]
    """[L, E] (token, slot) pairs routed to each expert since start (dense layers all zero)."""
    imbalance: tuple[float | None, ...]
    """Per layer, max/mean FFN-worker load over the EPLB window under the current placement."""
    placement: str = ""
    """The placement table, printable (Placement.render)."""
    history: tuple[tuple[int, float, float], ...] = ()
    """Each re-placement: (version, worst-layer max/mean before, after) on its window."""

    @classmethod
    def of(cls, controller: Any) -> ExpertLoadState:  # an eplb.controller.EPLBController
        p = controller.placement
        return cls(
            p.version,
            len(controller.history),
            tuple(tuple(row) for row in controller.window.total_pairs),
            tuple(controller.imbalance()),
            p.render(controller.window.total()),
            tuple((h.version, h.imbalance_before, h.imbalance_after) for h in controller.history),
        )


@dataclass(frozen=True)
class EngineState:
    """What an engine reports to a front end: per-worker state and the AFD recorders' copies.

    An in-process `Engine` builds it from its objects; a multi-process runtime can build the
    same from worker reports, so the server's metrics need not know which it talks to.
    """

    workers: tuple[WorkerState, ...]
    attention: tuple[AFDStatsSnapshot, ...] = ()
    """One per attention worker (index order); empty when not asked for."""
    ffn: tuple[AFDStatsSnapshot, ...] = ()
    """One per FFN worker (AFD only)."""
    experts: ExpertLoadState | None = None
    """Expert parallelism (m > 1 on a MoE model): load per expert and the placement's balance."""
    requests_migrated: int = 0
    """Moves of a request to another attention worker because its own died or stalled (a
    request that moved twice counts twice)."""
    worker_restarts: int = 0
    """Dead workers started again (worker processes only)."""
    ffn_failovers: int = 0
    """Dead FFN workers whose experts the surviving FFN workers took (launch/failover.py)."""
    ffn_workers_down: int = 0
    """FFN workers out of service now, their experts on the survivors."""
    parked: int = 0
    """Requests waiting for any attention worker to take them (every one stalled)."""
    routing: Mapping[str, int] = dataclasses.field(default_factory=dict)
    """The router's decisions by reason (afd/router.py: load, prefix, balance)."""

    @property
    def num_running(self) -> int:
        return sum(w.num_running for w in self.workers)

    @property
    def num_waiting(self) -> int:
        return sum(w.num_waiting for w in self.workers) + self.parked

    @property
    def kv_usage(self) -> float:
        total = sum(w.kv_blocks_total for w in self.workers)
        return sum(w.kv_blocks_used for w in self.workers) / total if total else 0.0

    def counter(self, name: str) -> int:
        return sum(int(w.counters.get(name, 0)) for w in self.workers)
