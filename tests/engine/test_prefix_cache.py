"""Prefix caching without a model: the block keys, the pool's references, LRU and eviction, and
the scheduler's reuse of cached blocks, checked against a fake runner that keeps a real paged
"KV cache" of token ids. That runner answers from what it *reads* from the cache (the context
in the blocks of the block table, plus the chunk), so a block reused with the wrong tokens in
it, or written while another sequence shares it, changes the answer or fails at once."""

from __future__ import annotations

import random
import zlib

import pytest

from afdserve.engine import CacheConfig, Scheduler, SchedulerConfig, SequenceStatus
from afdserve.engine.prefix_cache import BlockPool, HostHit, block_hashes, hash_block
from afdserve.types import (
    ChunkPromptLogprobs,
    PromptLogprob,
    Request,
    SampledToken,
    SamplingParams,
    StepPlan,
    StepResult,
)

# ---- keys -------------------------------------------------------------------------------------


def test_keys_chain_the_prefix_and_cover_full_blocks_only():
    a = block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert len(a) == 2  # the 9th token's block is not full
    assert a[0] == hash_block(None, [1, 2, 3, 4]) and a[1] == hash_block(a[0], [5, 6, 7, 8])
    b = block_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert b[1] != a[1]  # same tokens in block 1, another prefix before them: another key
    assert block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], 4, a)[:2] == a  # extends
    assert len(set(block_hashes(list(range(400)), 4))) == 100
    assert hash_block(None, [1, 2]) != hash_block(None, [2, 1])
    assert hash_block(None, [256]) != hash_block(None, [1])  # ids are not truncated to bytes


# ---- the pool ---------------------------------------------------------------------------------


def test_pool_references_cache_and_evict_least_recently_released_first():
    pool = BlockPool(6)  # usable 1..5
    keys = block_hashes(list(range(12)), 4)
    a = pool.allocate(3)
    for b, k in zip(a, keys, strict=True):
        assert pool.cache(b, k)
    assert pool.lookup(keys) == a and pool.num_used == 3
    pool.touch(a[:2])  # a second sequence shares the first two
    assert [pool.refs(b) for b in a] == [2, 2, 1]
    pool.free(reversed(a))  # the first sequence ends: all stay cached
    assert pool.num_used == 2 and pool.num_evictable == 1 and pool.num_cached == 3
    pool.free(reversed(a[:2]))
    assert pool.num_used == 0 and pool.num_free == 5 and pool.num_evictable == 3
    # free blocks go first, then the least recently released: a[2] (released first), then a[1]
    got = pool.allocate(3)
    assert a[2] in got and a[1] not in got and pool.evictions == 1
    assert pool.lookup(keys) == a[:2]  # a broken chain ends the match
    more = pool.allocate(1)
    assert more == [a[1]] and pool.lookup(keys) == a[:1]
    with pytest.raises(ValueError, match="double free"):
        pool.free([a[0]])  # cached, unreferenced
    with pytest.raises(ValueError, match="not cached"):
        pool.touch(got)


def test_pool_keeps_the_first_copy_of_a_key_and_frees_duplicates():
    pool = BlockPool(4)
    key = hash_block(None, [1, 2])
    x, y = pool.allocate(2)
    assert pool.cache(x, key) and not pool.cache(y, key)
    pool.free([y])
    assert pool.num_evictable == 0 and pool.num_free == 2  # y went back to the free list
    pool.free([x])
    assert pool.num_evictable == 1 and pool.lookup([key]) == [x]


def test_pool_without_caching_is_a_plain_allocator():
    pool = BlockPool(4, caching=False)
    b = pool.allocate(2)
    assert not pool.cache(b[0], hash_block(None, [1]))
    assert pool.lookup([hash_block(None, [1])]) == []
    pool.free(b)
    assert pool.num_free == 3 and pool.num_cached == 0


def test_pool_events_name_what_was_stored_and_evicted():
    pool = BlockPool(3)
    pool.record_events = True
    keys = block_hashes(list(range(8)), 4)
    a = pool.allocate(2)
    pool.cache(a[0], keys[0])
    pool.cache(a[1], keys[1])
    pool.free(a)
    assert pool.take_events() == (tuple(keys), ())
    pool.allocate(1)
    assert pool.take_events() == ((), (keys[0],))  # released first: evicted first
    assert pool.take_events() == ((), ())


# ---- the scheduler, against a runner that reads its KV ---------------------------------------

BS = 4


class KVRunner:
    """Writes each fed token id into its (block, offset) and samples from what it reads."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        n = sched.cache_config.num_blocks
        self.kv: list[list[int | None]] = [[None] * BS for _ in range(n)]
        self.host: list[list[int | None]] = [[None] * BS for _ in range(64)]
        self.copied = 0

    def answer(self, plan: StepPlan) -> StepResult:
        for d, h in plan.swap_out:  # the host tier's copies, outs first (as the runner)
            self.host[h] = list(self.kv[d])
        for h, d in plan.swap_in:
            self.kv[d] = list(self.host[h])
        self.copied += len(plan.swap_in)
        sampled, prompt = [], []
        for c in plan.chunks:
            ctx = [self.kv[c.block_table[p // BS]][p % BS] for p in range(c.start_pos)]
            assert None not in ctx, "a chunk starts after KV that was never written"
            for j, t in enumerate(c.token_ids):
                p = c.start_pos + j
                block = c.block_table[p // BS]
                assert self.sched.allocator.refs(block) == 1, "wrote into a shared block"
                self.kv[block][p % BS] = t
            seen = ctx + list(c.token_ids)
            if c.prompt_logprob_targets:
                first = c.start_pos + c.prompt_logprob_start
                entries = [
                    PromptLogprob(t, -float(_digest(seen[: first + i + 1])), 1, ())
                    for i, t in enumerate(c.prompt_logprob_targets)
                ]
                prompt.append(ChunkPromptLogprobs(c.seq_id, tuple(entries)))
            if c.sample:  # a token that depends on every token of the context it read
                sampled.append(SampledToken(c.seq_id, 3 + _digest(seen) % 97))
        return StepResult(plan.step_id, tuple(sampled), tuple(prompt))


def _digest(tokens: list) -> int:
    return zlib.crc32(repr(tokens).encode())


def _scheduler(
    num_blocks: int, caching: bool, budget: int = 16, max_seqs: int = 8, host: int = 0
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_seqs, max_num_batched_tokens=budget, max_model_len=128),
        CacheConfig(
            block_size=BS,
            num_blocks=num_blocks,
            enable_prefix_caching=caching,
            num_host_blocks=host,
        ),
        eos_token_ids=(2,),
    )


def _check(sched: Scheduler) -> None:
    """Invariants with sharing: references equal holders, shared blocks are cached and full."""
    holders: dict[int, int] = {}
    for seq in sched.running:
        assert len(seq.block_table) == -(-seq.num_computed_tokens // BS)
        for b in seq.block_table:
            holders[b] = holders.get(b, 0) + 1
    for seq in sched.waiting:
        assert seq.block_table == [] and seq.num_computed_tokens == 0
    pool = sched.allocator
    for b, n in holders.items():
        assert pool.refs(b) == n
    assert pool.num_used == len(holders)
    assert pool.num_used + pool.num_free == sched.cache_config.num_usable_blocks


def _drive(sched: Scheduler, requests, arrive_every: int = 0):
    """Run to the end (requests enter `arrive_every` steps apart; 0: all at once); outputs and
    prompt logprobs per request."""
    runner = KVRunner(sched)
    pending = list(requests)
    outs: dict[str, list[int]] = {}
    lps: dict[str, tuple] = {}
    steps = 0
    while pending or sched.has_unfinished():
        if pending and (arrive_every == 0 or steps % arrive_every == 0):
            for r in pending if arrive_every == 0 else pending[:1]:
                sched.add_request(r)
            pending = [] if arrive_every == 0 else pending[1:]
        plan = sched.schedule()
        for ev in sched.update(plan, runner.answer(plan)):
            outs.setdefault(ev.request_id, []).append(ev.token_id)
            if ev.prompt_logprobs is not None:
                lps[ev.request_id] = ev.prompt_logprobs
        _check(sched)
        steps += 1
        assert steps < 5000
    return outs, lps


def _req(rid: str, prompt, max_tokens: int = 6, **params) -> Request:
    params.setdefault("ignore_eos", True)
    return Request(rid, tuple(prompt), SamplingParams(max_tokens=max_tokens, **params))


def test_a_shared_prefix_is_computed_once_and_the_last_token_always_fed():
    system = list(range(10, 26))  # 16 tokens: 4 full blocks
    reqs = [_req(f"r{i}", system + [40 + i, 41 + i]) for i in range(3)]
    reqs.append(_req("same", system))  # its whole prompt is cached: the last block is fed
    on = _scheduler(64, True)
    outs_on, _ = _drive(on, reqs, arrive_every=8)
    outs_off, _ = _drive(_scheduler(64, False), reqs, arrive_every=8)
    assert outs_on == outs_off
    c = on.counters
    assert c.prefix_cache_hits == 2 * 16 + 12  # r1, r2 and "same" (all but its last block)
    assert c.prefix_cache_queries == 18 * 3 + 16
    assert c.prompt_tokens == 18 * 3 + 16  # cached tokens still count as prompt tokens
    assert c.recomputed_tokens == 0


def test_prompt_logprobs_and_penalties_are_not_skipped():
    system = list(range(10, 30))
    first = _req("a", system + [5], max_tokens=2)
    scored = _req("b", system + [6], max_tokens=2, prompt_logprobs=1)
    penal = _req("c", system + [7], max_tokens=2, repetition_penalty=1.3)
    sched = _scheduler(64, True)
    outs, lps = _drive(sched, [first, scored, penal], arrive_every=4)
    assert sched.counters.prefix_cache_hits == 0
    assert len(lps["b"]) == len(system)  # every prompt position scored
    ref, ref_lps = _drive(_scheduler(64, False), [first, scored, penal], arrive_every=4)
    assert (outs, lps) == (ref, ref_lps)


def _workload(seed: int, n: int = 14):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 250) for _ in range(rng.choice([4, 8, 13]))] for _ in range(3)]
    reqs = []
    for i in range(n):
        tail = [rng.randrange(3, 250) for _ in range(rng.randrange(0, 7))]
        reqs.append(_req(f"q{i}", rng.choice(prefixes) + tail or [5], rng.randrange(1, 12)))
    return reqs


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("num_blocks", [9, 14, 40])
@pytest.mark.parametrize("host", [0, 5, 64])
def test_random_shared_prefix_workloads_match_caching_off(seed, num_blocks, host):
    """Small pools force preemption (9 blocks: every sequence fits alone) and eviction, a
    small host tier drops blocks too; the runner's answers depend on the KV it reads (copies
    to and from the tier included), so any wrong reuse shows."""
    reqs = _workload(seed)
    on = _scheduler(num_blocks, True, budget=12, max_seqs=4, host=host)
    outs_on, _ = _drive(on, reqs, arrive_every=seed % 3)
    outs_off, _ = _drive(_scheduler(num_blocks, False, budget=12, max_seqs=4), reqs, seed % 3)
    assert outs_on == outs_off
    assert on.counters.prefix_cache_hits > 0
    if num_blocks == 9:
        assert on.counters.preemptions > 0 and on.allocator.evictions > 0
        assert (on.counters.kv_host_blocks_in > 0) == (host > 0)


def test_a_preempted_sequence_resumes_from_what_is_left_of_its_cached_blocks():
    """8 usable blocks: "a" (20 + 6 tokens, 7 blocks) preempts "b" (12 + 10), whose blocks
    are released tail first, so "a" evicts b's tail and b resumes with its first block."""

    def run(caching: bool) -> tuple[Scheduler, dict]:
        s = _scheduler(9, caching, budget=32, max_seqs=2)
        outs, _ = _drive(s, [_req("a", list(range(10, 30)), 6), _req("b", list(range(50, 62)), 10)])
        return s, outs

    (on, outs_on), (off, outs_off) = run(True), run(False)
    assert outs_on == outs_off
    assert on.counters.preemptions == off.counters.preemptions == 1
    assert on.counters.prefix_cache_hits == 4
    assert on.counters.recomputed_tokens == off.counters.recomputed_tokens - 4


def test_aborted_and_finished_sequences_leave_their_blocks_cached():
    sched = _scheduler(16, True)
    sched.add_request(_req("a", list(range(10, 22)), max_tokens=3))
    runner = KVRunner(sched)
    plan = sched.schedule()
    sched.update(plan, runner.answer(plan))  # the prompt is in: 3 full blocks cached
    assert sched.allocator.num_cached == 3
    sched.abort_request("a")
    assert sched.allocator.num_used == 0 and sched.allocator.num_evictable == 3
    seq_id = sched.add_request(_req("b", list(range(10, 22)) + [99], max_tokens=1))
    plan = sched.schedule()
    (chunk,) = plan.chunks
    assert chunk.start_pos == 12 and chunk.token_ids == (99,)
    assert sched.sequence_by_seq_id(seq_id).status is SequenceStatus.RUNNING


def test_with_a_host_tier_a_preempted_sequence_resumes_without_recompute():
    """The preemption above, with a host tier: b's evicted blocks go to the host and come back,
    (one stayed on the device), so its resume recomputes nothing: it feeds only the token it
    had sampled, as if it had never been preempted."""

    def run(host: int) -> tuple[Scheduler, dict]:
        s = _scheduler(9, True, budget=32, max_seqs=2, host=host)
        outs, _ = _drive(s, [_req("a", list(range(10, 30)), 6), _req("b", list(range(50, 62)), 10)])
        return s, outs

    (tier, outs_tier), (none, outs_none) = run(16), run(0)
    assert outs_tier == outs_none
    assert tier.counters.preemptions == 1
    assert tier.counters.kv_host_blocks_in == 2 and tier.counters.kv_host_blocks_out >= 2
    assert tier.counters.prefix_cache_hits == 12  # b's whole prompt: 3 blocks
    assert tier.counters.recomputed_tokens == 0 < none.counters.recomputed_tokens


def test_host_tier_bookkeeping():
    pool = BlockPool(3, num_host_blocks=2)  # 2 device blocks, 2 host slots
    keys = block_hashes(list(range(16)), 4)
    a = pool.allocate(2)
    pool.cache(a[0], keys[0])
    pool.cache(a[1], keys[1])
    pool.free(reversed(a))  # a[1] is the least recently released
    b = pool.allocate(1)
    assert b == [a[1]] and pool.take_plan_copies() == (((a[1], 0),), ())
    hit = pool.lookup_tiers(keys)
    assert hit[0] == a[0] and isinstance(hit[1], HostHit) and len(hit) == 2
    pool.free(b)
    got = pool.take(hit)  # a[0] touched; keys[1] back into the one free device block
    assert got[0] == a[0] and pool.lookup(keys[:2]) == got
    out, back = pool.take_plan_copies()
    assert back == ((0, got[1]),) and out == ()
    assert pool.host.num_stored == 0  # exclusive: it left the host
    with pytest.raises(ValueError, match="needs prefix caching"):
        BlockPool(3, caching=False, num_host_blocks=2)
