"""Random workloads (hypothesis): invariants hold every step, nothing leaks, outputs are right.

The fake runner samples like seeded sampling does: the token depends only on
(sampling_seed, output_index), so every request's outputs must equal that sequence however it
was batched, chunked or preempted; EOS comes up at random the same way.
"""

from __future__ import annotations

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from afdserve.types import FinishReason, ScheduledChunk

from ._helpers import EOS, answer, check_invariants, check_plan, make_request, make_scheduler


def _token(seed: int, output_index: int, eos_every: int) -> int:
    h = (seed * 1_000_003 + output_index * 7919) % 1009
    return EOS if eos_every and h % eos_every == 0 else 100 + h


def _expected(
    seed: int, prompt_len: int, max_tokens: int, ignore_eos: bool, max_len: int, eos_every: int
) -> tuple[list[int], FinishReason]:
    """What the stop rules must produce for one request, computed without a scheduler."""
    out: list[int] = []
    while True:
        tok = _token(seed, len(out), eos_every)
        out.append(tok)
        if tok == EOS and not ignore_eos:
            return out, FinishReason.STOP
        if len(out) >= max_tokens or prompt_len + len(out) >= max_len:
            return out, FinishReason.LENGTH


request_st = st.tuples(
    st.integers(1, 40),  # prompt length (clipped to max_model_len)
    st.integers(1, 30),  # max_tokens
    st.booleans(),  # ignore_eos
    st.integers(0, 3),  # arrival step
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    block_size=st.integers(1, 8),
    extra_blocks=st.integers(0, 12),
    budget=st.integers(1, 48),
    max_num_seqs=st.integers(1, 6),
    threshold=st.sampled_from([0, 0, 3, 16]),
    max_model_len=st.integers(8, 64),
    eos_every=st.sampled_from([0, 7, 29]),
    requests=st.lists(request_st, min_size=1, max_size=10),
    abort_steps=st.lists(st.tuples(st.integers(0, 60), st.integers(0, 9)), max_size=3),
)
def test_random_workloads_keep_invariants_and_finish(
    block_size,
    extra_blocks,
    budget,
    max_num_seqs,
    threshold,
    max_model_len,
    eos_every,
    requests,
    abort_steps,
):
    # the cache always holds at least one full-length sequence, up to a few more
    num_blocks = 1 + -(-max_model_len // block_size) + extra_blocks
    s = make_scheduler(
        block_size=block_size,
        num_blocks=num_blocks,
        budget=budget,
        max_num_seqs=max_num_seqs,
        threshold=threshold,
        max_model_len=max_model_len,
    )

    def sample(c: ScheduledChunk) -> int:
        return _token(c.sampling_seed, c.output_index, eos_every)

    reqs = [
        (arrival, i, min(plen, max_model_len), mt, ign)
        for i, (plen, mt, ign, arrival) in enumerate(requests)
    ]
    pending = sorted(reqs)
    aborts = dict(abort_steps)
    outputs: dict[str, list[int]] = {}
    finished: dict[str, FinishReason] = {}
    aborted: set[str] = set()
    steps = 0
    limit = 20 + sum(p + m for _, _, p, m, _ in reqs) * (len(reqs) + 1)
    while pending or s.has_unfinished():
        while pending and pending[0][0] <= steps:
            _, i, plen, mt, ign = pending.pop(0)
            s.add_request(make_request(f"r{i}", plen, seed=i, max_tokens=mt, ignore_eos=ign))
        if steps in aborts:
            rid = f"r{aborts[steps]}"
            live = s.sequence(rid) is not None
            assert s.abort_request(rid) is live
            if live:
                aborted.add(rid)
        plan = s.schedule()
        check_plan(s, plan)
        if s.has_unfinished():
            assert not plan.is_empty, "live requests but an empty step: a stall"
        for ev in s.update(plan, answer(plan, sample)):
            assert ev.request_id not in finished
            outputs.setdefault(ev.request_id, []).append(ev.token_id)
            if ev.finished:
                finished[ev.request_id] = ev.finish_reason
        check_invariants(s)
        steps += 1
        assert steps < limit, "no progress"

    assert s.kv_usage == 0.0 and s.allocator.num_free == num_blocks - 1
    assert s.num_running == s.num_waiting == 0
    for _, i, plen, mt, ign in reqs:
        rid = f"r{i}"
        want_out, want_reason = _expected(i, plen, mt, ign, s.max_model_len, eos_every)
        got = outputs.get(rid, [])
        if rid in aborted:
            assert rid not in finished and got == want_out[: len(got)]
        else:
            assert (got, finished[rid]) == (want_out, want_reason)
    c = s.counters
    assert c.generation_tokens == sum(len(v) for v in outputs.values())
    assert c.requests_finished == len(finished) and c.requests_aborted == len(aborted)
    event(f"preempted: {c.preemptions > 0}")
    event(f"chunked prefill: {budget < max(p for _, _, p, _, _ in reqs)}")
    event(f"aborted: {bool(aborted)}")
