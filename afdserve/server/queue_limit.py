"""The --max-queue limit: how many requests really wait, and what a refused client is told.

A request in an attention worker's waiting queue is not necessarily waiting: a request added
a moment ago sits there until the worker's next step schedules it, and a front of worker
processes counts the adds a worker has not reported yet as waiting too. Counting those, a
burst into an idle server was refused (429) while most of its batch slots were free. So only
the requests beyond a worker's `max_num_seqs` batch slots count: per attention worker,
`running + waiting - max_num_seqs` when positive. Those cannot be scheduled by the next step
whatever the KV cache holds. (A request that waits for KV blocks while slots are free is not
counted: the limit bounds the queue of requests past the batch, not preemption.)

Every 429 carries `Retry-After: RETRY_AFTER_S`, as HTTP's 429 allows and as the `openai`
client reads it: a constant, because the queue moves at every step (tens of milliseconds)
and a request's wait depends on the outputs still to come, which the front does not know.
"""

from __future__ import annotations

from afdserve.afd.stats import EngineState

RETRY_AFTER_S = 1
"""Seconds a refused client is asked to wait before retrying (the 429's Retry-After)."""


def queued_beyond_slots(state: EngineState, max_num_seqs: int) -> int:
    """Requests that wait for a batch slot: on each attention worker, those beyond its
    `max_num_seqs` (running and waiting, unreported adds included, as `state` counts them)."""
    return sum(max(0, w.num_running + w.num_waiting - max_num_seqs) for w in state.workers)
