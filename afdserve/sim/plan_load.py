"""The load of one bundle step as the runtime plans it: each worker's `StepPlan`, split into
microbatches by `split_microbatches`, turned into the per-(worker, microbatch) numbers that
`pipeline.time_one_step` prices.

A chunk of n tokens starting at position s reads a context of s + n tokens. It is a decode when
it samples after feeding a single token of a sequence that has already sampled (that token is
its newest output): the cost model charges it only for the context it reads. Every other chunk
is prefill (a prompt's, or a preempted sequence's recompute), charged in addition per new token
and per (query, context) pair, n s + n (n + 1) / 2 of them, as the fast engine charges its
chunks (`sim.engine`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from afdserve.types import ScheduledChunk


@dataclass(frozen=True)
class PlanLoad:
    """What r workers' microbatched plans compute in one step ([r][G] lists, [r] for sampled)."""

    tokens: list[list[float]]
    context: list[list[float]]
    prefill_tokens: list[list[float]]
    pairs: list[list[float]]
    sampled: list[float]
    decode_slots: int
    """Decode chunks of the step (every worker)."""
    decode_context: int
    """Context tokens those decode chunks read."""
    prefill_total: int
    """Prefill-chunk tokens of the step."""
    itl_tokens: int
    """Sampled tokens that follow an earlier token of their request (ITL samples)."""


def is_decode(chunk: ScheduledChunk) -> bool:
    """One token fed, the sequence's newest output, and a sample: a decode step of a sequence."""
    return chunk.sample and chunk.num_tokens == 1 and chunk.output_index > 0


def plan_load(microbatches: Sequence[Sequence[Sequence[ScheduledChunk]]], groups: int) -> PlanLoad:
    """Loads of one step from each worker's microbatches (at most `groups` per worker; a worker
    with fewer leaves the rest empty, as the runtime sends nothing for them)."""
    tokens, context, prefill, pairs, sampled = [], [], [], [], []
    n_dec = dec_ctx = pref_total = itl = 0
    for worker in microbatches:
        if len(worker) > groups:
            raise ValueError(f"{len(worker)} microbatches for {groups} groups")
        tok_row, ctx_row = [0.0] * groups, [0.0] * groups
        pref_row, pair_row = [0.0] * groups, [0.0] * groups
        n_sampled = 0
        for i, chunks in enumerate(worker):
            for c in chunks:
                n, s = c.num_tokens, c.start_pos
                tok_row[i] += n
                ctx_row[i] += s + n
                if c.sample:
                    n_sampled += 1
                    itl += c.output_index > 0
                if is_decode(c):
                    n_dec += 1
                    dec_ctx += s + n
                else:
                    pref_row[i] += n
                    pair_row[i] += n * s + n * (n + 1) / 2.0
                    pref_total += n
        tokens.append(tok_row)
        context.append(ctx_row)
        prefill.append(pref_row)
        pairs.append(pair_row)
        sampled.append(float(n_sampled))
    return PlanLoad(tokens, context, prefill, pairs, sampled, n_dec, dec_ctx, pref_total, itl)
