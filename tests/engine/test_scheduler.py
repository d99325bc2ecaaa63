"""Scheduler behaviour, driven by hand-made StepResults (no model)."""

from __future__ import annotations

import pytest

from afdserve.engine import CacheConfig, Scheduler, SchedulerConfig, SequenceStatus
from afdserve.errors import UserInputError
from afdserve.types import FinishReason, Request, SampledToken, SamplingParams, StepResult

from ._helpers import EOS, answer, check_invariants, make_request, make_scheduler, run_all, step


def test_single_request_prefills_then_decodes_to_max_tokens():
    s = make_scheduler()
    s.add_request(make_request("a", 10, max_tokens=3))
    assert (s.num_waiting, s.num_running) == (1, 0)
    plan, events = step(s, lambda c: 100 + c.output_index)
    (chunk,) = plan.chunks
    assert (chunk.start_pos, chunk.num_tokens, chunk.sample, chunk.output_index) == (0, 10, True, 0)
    assert chunk.token_ids == tuple(range(10, 20))
    assert [(e.request_id, e.token_id, e.finished) for e in events] == [("a", 100, False)]
    assert (s.num_waiting, s.num_running) == (0, 1)
    plan, events = step(s, lambda c: 100 + c.output_index)
    (chunk,) = plan.chunks
    assert (chunk.start_pos, chunk.token_ids, chunk.output_index) == (10, (100,), 1)
    plan, events = step(s, lambda c: 100 + c.output_index)
    assert events[0].token_id == 102 and events[0].finished
    assert events[0].finish_reason is FinishReason.LENGTH
    assert not s.has_unfinished() and s.kv_usage == 0.0
    c = s.counters
    assert (c.prompt_tokens, c.generation_tokens, c.recomputed_tokens, c.preemptions) == (
        10,
        3,
        0,
        0,
    )
    assert (c.requests_added, c.requests_finished, c.steps) == (1, 1, 3)


def test_token_budget_is_respected_every_step_and_fully_used_when_work_exists():
    s = make_scheduler(budget=20, max_num_seqs=16, num_blocks=200)
    for i in range(12):
        s.add_request(make_request(f"r{i}", 7 + 3 * i, max_tokens=5, seed=i))
    while s.has_unfinished():
        queued = sum(q.num_uncomputed_tokens for q in [*s.running, *s.waiting])
        plan, _ = step(s)
        assert plan.num_tokens <= 20
        # with ample blocks and seats the scheduler leaves no budget unused
        assert plan.num_tokens == min(20, queued)


def test_long_prompt_is_chunked_across_steps_and_samples_only_at_the_end():
    s = make_scheduler(budget=16, block_size=4)
    s.add_request(make_request("long", 50, max_tokens=2))
    chunks = []
    for _ in range(4):
        plan, events = step(s)
        chunks.extend(plan.chunks)
        assert bool(events) == plan.chunks[0].sample
    assert [(c.start_pos, c.num_tokens, c.sample) for c in chunks] == [
        (0, 16, False),
        (16, 16, False),
        (32, 16, False),
        (48, 2, True),
    ]
    # the block table grows with the chunks and keeps its prefix
    assert [len(c.block_table) for c in chunks] == [4, 8, 12, 13]
    for prev, nxt in zip(chunks, chunks[1:], strict=False):
        assert nxt.block_table[: len(prev.block_table)] == prev.block_table
    assert s.counters.prompt_tokens == 50


def test_long_prefill_threshold_caps_a_prefill_chunk_but_not_the_step():
    s = make_scheduler(budget=32, threshold=8)
    s.add_request(make_request("a", 20, max_tokens=2))
    s.add_request(make_request("b", 20, max_tokens=2))
    plan, _ = step(s)
    assert [(c.seq_id, c.num_tokens) for c in plan.chunks] == [(0, 8), (1, 8)]


def test_decode_and_prefill_share_a_step():
    s = make_scheduler(budget=16)
    s.add_request(make_request("a", 4, max_tokens=10))
    step(s)
    s.add_request(make_request("b", 30, max_tokens=10))
    plan, events = step(s)
    kinds = [(c.seq_id, c.num_tokens, c.sample) for c in plan.chunks]
    assert kinds == [(0, 1, True), (1, 15, False)]  # decode first, then a prefill chunk
    assert [e.request_id for e in events] == ["a"]


def test_max_num_seqs_limits_running_and_admission_is_fcfs():
    s = make_scheduler(max_num_seqs=2, budget=64)
    for i in range(5):
        s.add_request(make_request(f"r{i}", 4, max_tokens=2 + i))
    admitted: list[int] = []
    while s.has_unfinished():
        before = {q.seq_id for q in s.running}
        step(s)
        admitted += [q.seq_id for q in s.running if q.seq_id not in before]
        assert s.num_running <= 2
    assert admitted == sorted(admitted)  # first come, first served


def test_head_of_queue_is_not_overtaken_when_blocks_are_short():
    # 10 usable blocks of 4 tokens; "a" holds 6 blocks while decoding
    s = make_scheduler(num_blocks=11, block_size=4, budget=64)
    s.add_request(make_request("a", 22, max_tokens=30))
    step(s)
    s.add_request(make_request("big", 30, max_tokens=1))  # needs 8 blocks: must wait
    s.add_request(make_request("small", 2, max_tokens=1))  # would fit, but may not overtake
    plan, _ = step(s)
    assert [c.seq_id for c in plan.chunks] == [0]
    assert [q.request_id for q in s.waiting] == ["big", "small"]


def _preemption_workload(num_blocks: int) -> Scheduler:
    s = make_scheduler(num_blocks=num_blocks, block_size=4, budget=64, max_model_len=64)
    for i in range(4):
        s.add_request(make_request(f"r{i}", 6 + 2 * i, max_tokens=24, seed=i, ignore_eos=True))
    return s


def test_preemption_recomputes_and_keeps_outputs():
    reference = run_all(_preemption_workload(num_blocks=200))
    assert reference == {
        f"r{i}": ([100 + (i * 31 + k * 7) % 97 for k in range(24)], FinishReason.LENGTH)
        for i in range(4)
    }
    s = _preemption_workload(num_blocks=17)  # 16 usable blocks: 4 sequences need up to 40
    preempted_seen = []
    resumed_with_outputs = 0
    outputs: dict[str, list[int]] = {}
    done = {}
    while s.has_unfinished():
        running_before = [q.seq_id for q in s.running]
        plan, events = step(s)
        if plan.preempted:
            preempted_seen.extend(plan.preempted)
            # victims are the most recently admitted running sequences, newest first
            assert list(plan.preempted) == running_before[::-1][: len(plan.preempted)]
            # and go to the front of the waiting queue, oldest victim first
            front = [q.seq_id for q in list(s.waiting)[: len(plan.preempted)]]
            assert front == sorted(plan.preempted)
            # nothing new is admitted in a step that preempted
            assert {c.seq_id for c in plan.chunks} <= set(running_before)
        for c in plan.chunks:
            seq = s.sequence_by_seq_id(c.seq_id)  # None once it finished in this step
            if c.start_pos == 0 and c.output_index > 0 and seq is not None:
                assert seq.num_preemptions > 0
                # a recompute that feeds the prompt and the outputs generated before
                resumed_with_outputs += 1
        for e in events:
            outputs.setdefault(e.request_id, []).append(e.token_id)
            if e.finished:
                done[e.request_id] = (outputs.pop(e.request_id), e.finish_reason)
    assert preempted_seen, "the workload was meant to force preemption"
    assert resumed_with_outputs > 0
    assert s.counters.preemptions == len(preempted_seen)
    assert s.counters.recomputed_tokens > 0
    assert s.counters.prompt_tokens == sum(6 + 2 * i for i in range(4))
    assert s.counters.generation_tokens == 4 * 24
    assert done == reference
    assert s.kv_usage == 0.0 and s.allocator.num_free == 16


def test_resumed_sequence_refeeds_prompt_and_outputs():
    # 4 usable blocks of 2 tokens: one 5-token sequence decoding alongside another must yield
    s = make_scheduler(num_blocks=5, block_size=2, budget=16, max_model_len=8)
    s.add_request(make_request("old", 3, max_tokens=4, ignore_eos=True))
    s.add_request(make_request("new", 3, max_tokens=4, ignore_eos=True, first_token=50))
    step(s)  # both prefilled (positions 0-2): 2 blocks each, the pool is full
    step(s)  # both decode position 3, still inside their second block
    plan, _ = step(s)  # "old" needs a third block for position 4: "new" is preempted
    assert plan.preempted == (1,)
    new = s.sequence("new")
    assert new.status is SequenceStatus.WAITING and new.output_token_ids != []
    kept = list(new.token_ids)
    while s.sequence("old") is not None:
        step(s)
    plan, _ = step(s)
    (chunk,) = plan.chunks
    assert chunk.seq_id == 1 and chunk.start_pos == 0 and chunk.sample
    assert list(chunk.token_ids) == kept and chunk.output_index == len(kept) - 3


def test_many_preemptions_never_deadlock_when_one_sequence_fills_the_cache():
    # the cache holds exactly one full-length sequence
    s = make_scheduler(num_blocks=9, block_size=4, budget=8, max_model_len=32)
    for i in range(6):
        s.add_request(make_request(f"r{i}", 10, max_tokens=100, seed=i, ignore_eos=True))
    done = run_all(s, max_steps=2000)
    assert all(len(out) == 22 and why is FinishReason.LENGTH for out, why in done.values())
    assert s.counters.preemptions > 0 and s.kv_usage == 0.0


def test_abort_frees_blocks_at_once():
    s = make_scheduler()
    s.add_request(make_request("a", 20, max_tokens=50))
    s.add_request(make_request("b", 5, max_tokens=50))
    step(s)
    assert s.allocator.num_used == 5 + 2
    assert s.abort_request("a") is True
    assert s.allocator.num_used == 2 and s.num_running == 1
    assert s.abort_request("a") is False and s.abort_request("nope") is False
    s.add_request(make_request("c", 5))
    assert s.abort_request("c") is True  # waiting
    assert s.num_waiting == 0
    assert s.abort_request("b") is True
    assert not s.has_unfinished() and s.kv_usage == 0.0
    assert s.counters.requests_aborted == 3 and s.counters.requests_finished == 0
    check_invariants(s)
    s.add_request(make_request("a", 4, max_tokens=1))  # an id can be reused once it is gone
    assert run_all(s)["a"][1] is FinishReason.LENGTH


def test_abort_while_a_step_is_in_flight_drops_its_result():
    s = make_scheduler()
    s.add_request(make_request("a", 6, max_tokens=5))
    s.add_request(make_request("b", 6, max_tokens=5))
    plan = s.schedule()
    s.abort_request("a")
    events = s.update(plan, answer(plan))
    assert [e.request_id for e in events] == ["b"]
    check_invariants(s)


def _finish(params: dict, tokens: list[int], eos=(EOS,), max_model_len=256, prompt_len=4):
    s = make_scheduler(eos=eos, max_model_len=max_model_len)
    s.add_request(make_request("a", prompt_len, **params))
    return run_all(s, lambda c: tokens[c.output_index])["a"]


def test_finish_reasons():
    toks = [7, 8, EOS, 9, 11, 12, 13, 14]
    assert _finish({"max_tokens": 8}, toks) == ([7, 8, EOS], FinishReason.STOP)
    assert _finish({"max_tokens": 8, "ignore_eos": True}, toks) == (toks, FinishReason.LENGTH)
    assert _finish({"max_tokens": 8, "stop_token_ids": (9,)}, toks, eos=()) == (
        [7, 8, EOS, 9],
        FinishReason.STOP,
    )
    assert _finish({"max_tokens": 8, "stop_token_ids": (9,), "ignore_eos": True}, toks) == (
        [7, 8, EOS, 9],
        FinishReason.STOP,
    )
    assert _finish({"max_tokens": 2}, toks) == ([7, 8], FinishReason.LENGTH)
    # any of several EOS ids
    assert _finish({"max_tokens": 8}, toks, eos=(11, 12)) == ([7, 8, EOS, 9, 11], FinishReason.STOP)
    # a stop token that is also the last allowed token reports "stop"
    assert _finish({"max_tokens": 3}, toks) == ([7, 8, EOS], FinishReason.STOP)


def test_min_tokens_defers_eos_and_stop_token_ids():
    """As vLLM's check_stop: EOS and stop ids end nothing before min_tokens were generated (the
    sampler masks them; this covers a row with nothing else left), the length rules still do."""
    toks = [EOS, 9, 7, EOS, 9, 11, 12, 13]
    assert _finish({"max_tokens": 8, "min_tokens": 3}, toks) == (
        [EOS, 9, 7, EOS],
        FinishReason.STOP,
    )
    assert _finish({"max_tokens": 8, "min_tokens": 5, "stop_token_ids": (9,)}, toks) == (
        [EOS, 9, 7, EOS, 9],
        FinishReason.STOP,
    )
    assert _finish({"max_tokens": 2, "min_tokens": 2}, toks) == ([EOS, 9], FinishReason.LENGTH)
    out, why = _finish({"max_tokens": 50, "min_tokens": 50}, toks * 9, max_model_len=10)
    assert (len(out), why) == (6, FinishReason.LENGTH)


def test_context_full_finishes_with_length_and_max_tokens_is_not_clipped():
    toks = list(range(100, 200))
    out, why = _finish({"max_tokens": 50}, toks, max_model_len=20, prompt_len=15)
    assert (len(out), why) == (5, FinishReason.LENGTH)
    # a prompt that fills the context exactly still gets one token
    out, why = _finish({"max_tokens": 50}, toks, max_model_len=20, prompt_len=20)
    assert (len(out), why) == (1, FinishReason.LENGTH)


def test_usable_context_is_capped_at_the_kv_capacity():
    s = make_scheduler(num_blocks=6, block_size=4, max_model_len=100)
    assert s.max_model_len == 20
    s.add_request(make_request("a", 12, max_tokens=100, ignore_eos=True))
    out, why = run_all(s)["a"]
    assert (len(out), why) == (8, FinishReason.LENGTH)


def test_prompt_too_long_is_a_clear_user_error():
    s = make_scheduler(max_model_len=16)
    with pytest.raises(UserInputError, match="prompt has 17 tokens but the model's context length"):
        s.add_request(make_request("a", 17))
    s = make_scheduler(num_blocks=3, block_size=4, max_model_len=16)
    with pytest.raises(UserInputError, match="KV cache of this worker holds only 8 tokens"):
        s.add_request(make_request("a", 9))
    assert not s.has_unfinished() and s.counters.requests_added == 0


def test_duplicate_request_id_is_rejected():
    s = make_scheduler()
    s.add_request(make_request("a"))
    with pytest.raises(UserInputError, match="duplicate request id 'a'"):
        s.add_request(make_request("a"))


def test_update_rejects_results_that_do_not_answer_the_plan_and_changes_nothing():
    s = make_scheduler()
    s.add_request(make_request("a", 4))
    s.add_request(make_request("b", 4))
    plan = s.schedule()
    with pytest.raises(RuntimeError, match="awaits update"):
        s.schedule()
    with pytest.raises(ValueError, match=r"missing for sequences \[1\]"):
        s.update(plan, StepResult(plan.step_id, (SampledToken(0, 5),)))
    with pytest.raises(ValueError, match=r"unexpected for \[9\]"):
        s.update(
            plan,
            StepResult(plan.step_id, (SampledToken(0, 5), SampledToken(1, 5), SampledToken(9, 5))),
        )
    with pytest.raises(ValueError, match="two tokens"):
        s.update(plan, StepResult(plan.step_id, (SampledToken(0, 5), SampledToken(0, 6))))
    with pytest.raises(ValueError, match="result of step 7"):
        s.update(plan, StepResult(7, ()))
    assert all(q.num_computed_tokens == 0 for q in s.running)
    events = s.update(plan, answer(plan))
    assert len(events) == 2
    with pytest.raises(ValueError, match="not the step in flight"):
        s.update(plan, answer(plan))


def test_empty_plan_needs_no_update():
    s = make_scheduler()
    plan = s.schedule()
    assert plan.is_empty
    assert s.update(plan, StepResult(plan.step_id, ())) == []
    s.add_request(make_request("a", 3, max_tokens=1))
    assert run_all(s)["a"][1] is FinishReason.LENGTH


def test_load_reports_blocks_and_queued_tokens():
    s = make_scheduler(budget=8, block_size=4)
    s.add_request(make_request("a", 20, max_tokens=5))
    s.add_request(make_request("b", 6, max_tokens=3))
    load = s.load()
    assert (load.num_waiting, load.kv_blocks_used, load.queued_prompt_tokens) == (2, 0, 26)
    assert load.remaining_output_tokens == 8 and load.score == 26
    step(s)  # 8 tokens of "a" prefilled
    load = s.load()
    assert (load.num_running, load.num_waiting, load.kv_blocks_used) == (1, 1, 2)
    assert load.queued_prompt_tokens == 18 and load.score == 2 * 4 + 18
    assert s.kv_usage == pytest.approx(2 / 63)


def test_config_validation():
    for kwargs, msg in [
        ({"max_num_seqs": 0}, "max_num_seqs must be >= 1"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens must be >= 1"),
        ({"max_model_len": "8"}, "max_model_len must be an integer"),
        ({"long_prefill_token_threshold": -1}, "long_prefill_token_threshold must be >= 0"),
    ]:
        with pytest.raises(UserInputError, match=msg):
            SchedulerConfig(**kwargs)
    with pytest.raises(TypeError):
        Scheduler(CacheConfig(), SchedulerConfig())  # arguments swapped


def test_request_is_validated_by_its_types():
    with pytest.raises(UserInputError, match="prompt must not be empty"):
        Request("a", (), SamplingParams())
