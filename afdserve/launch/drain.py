"""Draining attention workers: an operator takes one out of routing (for maintenance, or to
let its requests finish before stopping its host) and puts it back; both engines keep one.

A drained attention worker gets no new request; what it holds finishes there, and requests
that move because another worker died still go to it when no other can take them. The last
attention worker that takes requests cannot be drained (that is what stopping the server is
for).
"""

from __future__ import annotations

from collections.abc import Collection

from afdserve.errors import UserInputError


class Drained:
    def __init__(self, num_workers: int) -> None:
        self.num_workers = num_workers
        self.ranks: set[int] = set()

    def set(self, rank: int, drained: bool, serving: Collection[int] | None = None) -> None:
        """Drain `rank` (or put it back); `serving`: the ranks that take requests now (all by
        default). UserInputError for an unknown rank or the last one serving."""
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < self.num_workers:
            raise UserInputError(
                f"attention worker rank must be in 0..{self.num_workers - 1}, got {rank!r}"
            )
        if not drained:
            self.ranks.discard(rank)
            return
        left = set(range(self.num_workers) if serving is None else serving) - self.ranks - {rank}
        if not left:
            raise UserInputError(
                f"attention worker {rank} is the last one taking requests: it cannot be drained"
            )
        self.ranks.add(rank)

    def among(self, ranks: Collection[int]) -> list[int]:
        """The ranks of `ranks` a new request may go to (all of them if every one is drained,
        as when the others died meanwhile)."""
        kept = [k for k in ranks if k not in self.ranks]
        return kept or list(ranks)

    def problems(self) -> list[str]:
        return [f"attention worker {k} drained (no new requests)" for k in sorted(self.ranks)]
