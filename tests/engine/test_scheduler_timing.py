"""The queue and prefill times a request's first token event carries (the server's
vllm:request_queue_time_seconds and request_prefill_time_seconds), on an injected clock."""

from __future__ import annotations

from afdserve.engine import CacheConfig, Scheduler, SchedulerConfig

from ._helpers import answer, check_invariants, make_request


def _scheduler(clock, *, budget: int, num_blocks: int = 64, max_model_len: int = 256):
    return Scheduler(
        SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=max_model_len),
        CacheConfig(block_size=4, num_blocks=num_blocks),
        eos_token_ids=(2,),
        clock=clock,
    )


def test_first_token_carries_queue_and_prefill_time_and_later_tokens_none():
    now = [1.0]
    s = _scheduler(lambda: now[0], budget=8)
    s.add_request(make_request("a", 8, max_tokens=3))
    s.add_request(make_request("b", 8, max_tokens=3))
    now[0] = 3.0
    plan = s.schedule()  # a takes the whole budget; b waits
    now[0] = 5.0
    (ev,) = s.update(plan, answer(plan))
    assert (ev.request_id, ev.queue_s, ev.prefill_s) == ("a", 2.0, 2.0)
    now[0] = 6.0
    plan = s.schedule()  # a decodes, b's first chunk (7 of its 8 tokens): no sample for b
    now[0] = 7.0
    (ev,) = s.update(plan, answer(plan))
    assert (ev.request_id, ev.queue_s, ev.prefill_s) == ("a", None, None)
    now[0] = 8.0
    plan = s.schedule()
    now[0] = 9.0
    events = {e.request_id: e for e in s.update(plan, answer(plan))}
    # b: taken in at 1, first scheduled at 6 (its first chunk), first token at 9
    assert (events["b"].queue_s, events["b"].prefill_s) == (5.0, 3.0)
    assert events["a"].queue_s is None
    check_invariants(s)


def test_preemption_does_not_move_the_first_scheduling():
    ticks = [0.0]

    def clock() -> float:
        ticks[0] += 1.0
        return ticks[0]

    # the cache holds one full-length sequence: preemptions are certain
    s = _scheduler(clock, budget=8, num_blocks=9, max_model_len=32)
    for i in range(4):
        s.add_request(make_request(f"r{i}", 10, max_tokens=100, seed=i, ignore_eos=True))
    first_scheduled: dict[str, float] = {}
    timed: dict[str, list] = {}
    tokens: dict[str, int] = {}
    while s.has_unfinished():
        plan = s.schedule()
        for rid in [f"r{i}" for i in range(4)]:
            seq = s.sequence(rid)
            if seq is not None and seq.first_scheduled_at is not None:
                assert first_scheduled.setdefault(rid, seq.first_scheduled_at) == (
                    seq.first_scheduled_at
                )
        for ev in s.update(plan, answer(plan)):
            tokens[ev.request_id] = tokens.get(ev.request_id, 0) + 1
            if ev.queue_s is not None or ev.prefill_s is not None:
                timed.setdefault(ev.request_id, []).append((tokens[ev.request_id], ev))
    assert s.counters.preemptions > 0
    assert sorted(timed) == [f"r{i}" for i in range(4)]
    for rid, [(index, ev)] in timed.items():  # exactly one timed event: the first token
        assert index == 1 and ev.queue_s >= 0 and ev.prefill_s > 0, rid
