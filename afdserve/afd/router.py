"""Router: sends each new request to the attention worker with the least outstanding work."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Protocol


class HasLoad(Protocol):
    def load_score(self) -> int: ...


class Router:
    """Least-load routing: load = KV tokens in use plus queued tokens (see Scheduler.load).

    Ties go to the lowest index, so routing is deterministic for a given history.
    """

    def __init__(self, workers: Sequence[HasLoad]) -> None:
        if not workers:
            raise ValueError("router needs at least one worker")
        self.workers = workers
        self.routed = [0] * len(workers)

    def choose(self, among: Collection[int] | None = None) -> int:
        """The least-loaded worker (of `among`, the workers still serving, when given)."""
        ks = range(len(self.workers)) if among is None else sorted(among)
        if not ks:
            raise ValueError("no worker to route to")
        k = min(ks, key=lambda i: (self.workers[i].load_score(), i))
        self.routed[k] += 1
        return k
