"""Router: sends each new request to the attention worker where it costs the least.

Least load by default; with prefix caching, cache-aware (as Dynamo's KV router and SGLang's
cache-aware router are): a worker that already holds the KV of a request's first blocks skips
that part of its prefill, so each worker's cost is

    cost_k = load_k - cached_tokens_k

where load_k is its outstanding work in tokens (KV held plus tokens queued for prefill; a
remote front counts the tokens it sent) and cached_tokens_k the leading prompt tokens its
prefix cache holds (whole blocks, and never the last prompt token, which is always fed). The
threshold this sets: a worker with a longer cached prefix wins while its load exceeds the least
load by less than the prompt tokens it would not recompute; past that, load wins and a hot
prefix spreads to another worker (which then caches it too). With no hit anywhere this is
exactly least-load routing. Ties go to the lower load, then the lowest index, so routing is
deterministic for a given history.

Every decision is counted by its reason (`by_reason`, exported as the router metrics):
`load` (no worker holds any of the prompt), `prefix` (the chosen worker holds the longest
cached prefix there is) and `balance` (some worker held a longer one but was too loaded).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol

from afdserve.engine.prefix_cache import BlockHash, block_hashes

REASONS = ("load", "prefix", "balance")


class HasLoad(Protocol):
    def load_score(self) -> int: ...

    def cached_prefix_len(self, keys: Sequence[BlockHash]) -> int: ...


class Router:
    """Cost-based routing over `workers` (module docstring). `block_size` > 0 turns on the
    cache-aware part (the workers' KV block size: the keys must be theirs); 0: least load."""

    def __init__(self, workers: Sequence[HasLoad], block_size: int = 0) -> None:
        if not workers:
            raise ValueError("router needs at least one worker")
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 0:
            raise ValueError(f"block_size must be an integer >= 0, got {block_size!r}")
        self.workers = workers
        self.block_size = block_size
        self.routed = [0] * len(workers)
        self.by_reason = dict.fromkeys(REASONS, 0)

    def keys(self, prompt: Sequence[int]) -> list[BlockHash]:
        """The keys of the blocks of `prompt` a worker could reuse (all full blocks but one
        holding the last token)."""
        if not self.block_size or len(prompt) <= self.block_size:
            return []
        return block_hashes(prompt[: len(prompt) - 1], self.block_size)

    def choose(
        self, among: Collection[int] | None = None, prompt: Sequence[int] | None = None
    ) -> int:
        """The cheapest worker for `prompt` (of `among`, the workers still serving, when
        given); without a prompt or a block size, the least-loaded one."""
        ks = range(len(self.workers)) if among is None else sorted(among)
        if not ks:
            raise ValueError("no worker to route to")
        keys = self.keys(prompt) if prompt is not None else []
        loads = {i: self.workers[i].load_score() for i in ks}
        hits = {i: (self.workers[i].cached_prefix_len(keys) if keys else 0) for i in ks}
        bs = self.block_size
        k = min(ks, key=lambda i: (loads[i] - hits[i] * bs, loads[i], i))
        best = max(hits.values())
        reason = "load" if best == 0 else "prefix" if hits[k] == best else "balance"
        self.routed[k] += 1
        self.by_reason[reason] += 1
        return k
