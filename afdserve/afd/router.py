"""Router: sends each new request to the attention worker with the least outstanding work."""

from __future__ import annotations

from collections.abc import Sequence
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

    def choose(self) -> int:
        scores = [w.load_score() for w in self.workers]
        k = min(range(len(scores)), key=lambda i: (scores[i], i))
        self.routed[k] += 1
        return k
