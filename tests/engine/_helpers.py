"""Shared helpers for the engine tests: a fake runner that answers plans without a model."""

from __future__ import annotations

from collections.abc import Callable

from afdserve.engine import NULL_BLOCK, CacheConfig, Scheduler, SchedulerConfig, SequenceStatus
from afdserve.types import (
    FinishReason,
    Request,
    SampledToken,
    SamplingParams,
    ScheduledChunk,
    StepPlan,
    StepResult,
    TokenEvent,
)

EOS = 2
TokenFn = Callable[[ScheduledChunk], int]


def make_scheduler(
    *,
    block_size: int = 4,
    num_blocks: int = 64,
    max_num_seqs: int = 8,
    budget: int = 32,
    max_model_len: int = 256,
    threshold: int = 0,
    eos: tuple[int, ...] = (EOS,),
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=budget,
            max_model_len=max_model_len,
            long_prefill_token_threshold=threshold,
        ),
        CacheConfig(block_size=block_size, num_blocks=num_blocks),
        eos_token_ids=eos,
    )


def make_request(
    rid: str, prompt_len: int = 8, *, seed: int = 0, first_token: int = 10, **params: object
) -> Request:
    prompt = tuple(first_token + i for i in range(prompt_len))
    return Request(rid, prompt, SamplingParams(**params), sampling_seed=seed)


def seeded_token(chunk: ScheduledChunk) -> int:
    """Like seeded sampling: a token fixed by (seed, output_index), never EOS (2) or below 100."""
    return 100 + (chunk.sampling_seed * 31 + chunk.output_index * 7) % 97


def answer(plan: StepPlan, token_fn: TokenFn = seeded_token) -> StepResult:
    sampled = tuple(
        SampledToken(seq_id=c.seq_id, token_id=token_fn(c)) for c in plan.chunks if c.sample
    )
    return StepResult(step_id=plan.step_id, sampled=sampled)


def step(sched: Scheduler, token_fn: TokenFn = seeded_token) -> tuple[StepPlan, list[TokenEvent]]:
    plan = sched.schedule()
    check_plan(sched, plan)
    events = sched.update(plan, answer(plan, token_fn))
    check_invariants(sched)
    return plan, events


def run_all(
    sched: Scheduler, token_fn: TokenFn = seeded_token, max_steps: int = 10_000
) -> dict[str, tuple[list[int], FinishReason]]:
    """Step until nothing is left; returns request_id -> (output tokens, finish reason)."""
    outputs: dict[str, list[int]] = {}
    done: dict[str, tuple[list[int], FinishReason]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return done
        _, events = step(sched, token_fn)
        for ev in events:
            outputs.setdefault(ev.request_id, []).append(ev.token_id)
            if ev.finished:
                assert ev.finish_reason is not None
                done[ev.request_id] = (outputs.pop(ev.request_id), ev.finish_reason)
    raise AssertionError(f"scheduler did not finish within {max_steps} steps")


def check_plan(sched: Scheduler, plan: StepPlan) -> None:
    """Everything a runner relies on in a plan."""
    bs = sched.cache_config.block_size
    assert plan.num_tokens <= sched.config.max_num_batched_tokens
    assert len(plan.chunks) <= sched.config.max_num_seqs
    seen_seqs: set[int] = set()
    seen_blocks: set[int] = set()
    for c in plan.chunks:
        assert c.seq_id not in seen_seqs
        seen_seqs.add(c.seq_id)
        seq = sched.sequence_by_seq_id(c.seq_id)
        assert seq.status is SequenceStatus.RUNNING
        assert c.num_tokens >= 1
        assert c.start_pos == seq.num_computed_tokens
        assert list(c.token_ids) == seq.token_ids[c.start_pos : c.context_len]
        assert c.sample == (c.context_len == seq.num_tokens)
        assert c.output_index == seq.output_index
        assert c.sampling_seed == seq.request.sampling_seed
        assert c.params is seq.params
        assert len(c.block_table) == -(-c.context_len // bs)
        assert tuple(seq.block_table) == c.block_table
        assert NULL_BLOCK not in c.block_table
        assert seen_blocks.isdisjoint(c.block_table)
        seen_blocks.update(c.block_table)
        assert c.context_len <= sched.max_model_len
        if sched.config.long_prefill_token_threshold and c.num_tokens > 1:
            assert c.num_tokens <= sched.config.long_prefill_token_threshold
    for sid in plan.preempted:
        assert sid not in seen_seqs


def check_invariants(sched: Scheduler) -> None:
    """State invariants that hold between steps."""
    bs = sched.cache_config.block_size
    held: list[int] = []
    assert sched.num_running <= sched.config.max_num_seqs
    for seq in sched.running:
        assert seq.status is SequenceStatus.RUNNING
        assert len(seq.block_table) == -(-seq.num_computed_tokens // bs)
        assert 1 <= seq.num_uncomputed_tokens
        assert seq.num_tokens <= sched.max_model_len
        held.extend(seq.block_table)
    for seq in sched.waiting:
        assert seq.status is SequenceStatus.WAITING
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert len(held) == len(set(held)), "a KV block is held by two sequences"
    assert NULL_BLOCK not in held
    assert sched.allocator.num_used == len(held)
    assert sched.allocator.num_free + len(held) == sched.cache_config.num_usable_blocks
    live = {s.seq_id for s in sched.running} | {s.seq_id for s in sched.waiting}
    assert live == set(sched.live_seq_ids)
    assert len(sched.running) + len(sched.waiting) == len(live)
