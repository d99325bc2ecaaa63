"""Attention workers added and removed at run time: a group started with one attention worker
and room for two (`max_attention_workers`) takes a second one in under load; every request
keeps its undisturbed tokens (the others rejoin the data plane under a new epoch and run an
interrupted step again), new requests go to the new worker, a slot beyond the maximum is
refused, and a drained worker is removed with no request lost."""

from __future__ import annotations

import time

import pytest

from afdserve import LLM
from afdserve.config import EngineConfig
from afdserve.errors import StateConflict, UserInputError
from afdserve.transport.options import free_port_run
from tests.launch.test_multiprocess import (
    LONG,
    SURVIVAL_PROMPTS,
    _alive,
    _all_started,
    _reap,
    _serve,
    _survival_group,
    _survival_reference,
    hand_started_worker,
)


@pytest.fixture(scope="module")
def survival_reference(tiny_model_dirs):
    """The aggregated tokens of SURVIVAL_PROMPTS on the tiny llama (exact mode)."""
    return _survival_reference(tiny_model_dirs["llama"])


def _wait_joined(llm, tokens: dict, give_up_s: float = 60.0) -> None:
    """Serve (collecting tokens) until no problem is left: the added worker said Ready."""
    _serve(llm, tokens, lambda t: not llm.engine.problems(), give_up_s=give_up_s)


def _new_requests(llm, n: int) -> list[str]:
    ids = [f"new{i}" for i in range(n)]
    for rid in ids:
        llm.engine.add_request(rid, SURVIVAL_PROMPTS[0], LONG)
    return ids


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_attention_worker_added_under_load_then_drained_and_removed(
    tiny_model_dirs, survival_reference, transport
):
    llm = _survival_group(
        tiny_model_dirs, attention_workers=1, max_attention_workers=2, transport=transport
    )
    try:
        eng = llm.engine
        assert eng.pids[1] == 0  # slot 1 starts empty: no process, no problem reported
        assert eng.problems() == []
        assert [w.index for w in eng.state(afd=False).workers] == [0]
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)  # every request mid-stream on worker 0
        assert eng.add_worker() == 1
        assert any("attention worker 1 added; adding it" in p for p in eng.problems())
        with pytest.raises(StateConflict, match="no free attention slot"):
            eng.add_worker()  # beyond --max-attention-workers
        with pytest.raises(StateConflict, match="has a worker already"):
            eng.add_worker(0)
        with pytest.raises(UserInputError, match=r"rank must be in 0\.\.1"):
            eng.add_worker(2)  # the FFN worker's rank, not an attention slot
        _wait_joined(llm, tokens)
        assert eng.pids[1] > 0 and _alive(eng.pids[1])
        assert [w.index for w in eng.state(afd=False).workers] == [0, 1]
        new = _new_requests(llm, 2)  # the new, empty worker is the least loaded
        assert 1 in {eng.owner(rid) for rid in new}
        _serve(llm, tokens, lambda t: not eng.has_unfinished())
        want = survival_reference["r0"]
        assert {k: v for k, v in tokens.items() if k.startswith("r")} == survival_reference
        assert {rid: tokens[rid] for rid in new} == {rid: want for rid in new}
        assert eng.state(afd=False).workers[1].routed >= 1
        assert eng.requests_migrated == 0 and eng.restarts == 0

        # drain, then remove: what it holds finishes there first; nothing is lost
        pid = eng.pids[1]
        for i in range(2):
            eng.add_request(f"late{i}", SURVIVAL_PROMPTS[0], LONG)
        on_1 = [f"late{i}" for i in range(2) if eng.owner(f"late{i}") == 1]
        assert on_1
        assert eng.drain(1) == len(on_1)
        with pytest.raises(StateConflict, match="still holds"):
            eng.remove_worker(1)
        _serve(llm, tokens, lambda t: all(eng.owner(rid) is None for rid in on_1))
        assert eng.remove_worker(1) == 0
        assert eng.pids[1] == 0 and not _alive(pid)
        assert eng.problems() == []
        with pytest.raises(StateConflict, match="no worker to remove"):
            eng.remove_worker(1)
        with pytest.raises(StateConflict, match="last one serving"):
            eng.remove_worker(0)
        _serve(llm, tokens, lambda t: not eng.has_unfinished())
        assert all(tokens[f"late{i}"] == want for i in range(2))
        assert eng.add_request("after", SURVIVAL_PROMPTS[0], LONG) == 0
        _serve(llm, tokens, lambda t: not eng.has_unfinished())
        assert tokens["after"] == want
    finally:
        llm.close()
    assert llm.engine.exit_codes == [0, 0, 0]


def test_removed_worker_with_requests_moves_them_when_asked(tiny_model_dirs, survival_reference):
    """`migrate=True`: the requests of a worker removed while it holds them replay on the
    other one with their undisturbed tokens (greedy and seeded)."""
    llm = _survival_group(tiny_model_dirs, attention_workers=2, max_attention_workers=2)
    try:
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)
        held = [f"r{k}" for k in range(len(SURVIVAL_PROMPTS)) if llm.engine.owner(f"r{k}") == 1]
        assert held
        assert llm.engine.remove_worker(1, migrate=True) == len(held)
        assert all(llm.engine.owner(rid) == 0 for rid in held)
        _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
        assert tokens == survival_reference
        assert llm.engine.add_worker() == 1  # the freed slot takes a worker again
        _wait_joined(llm, tokens)
        new = _new_requests(llm, 2)
        assert {llm.engine.owner(rid) for rid in new} == {0, 1}
        _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
        assert all(tokens[rid] == survival_reference["r0"] for rid in new)
    finally:
        llm.close()


def test_hand_started_worker_of_a_free_slot_joins(tiny_model_dirs, survival_reference):
    """Workers started by hand over tcp, room for 2 attention workers, 1 started: a worker
    started later with the free rank dials the front, is taken in, and serves."""
    port = free_port_run(5)  # events, ranks 0..2 (FFN: 2), the rendezvous store

    procs = [hand_started_worker(port, 0), hand_started_worker(port, 2)]
    try:
        llm = _survival_group(
            tiny_model_dirs,
            attention_workers=1,
            max_attention_workers=2,
            transport="tcp",
            front=f"127.0.0.1:{port}",
            startup_timeout_s=90,
        )
        try:
            with pytest.raises(StateConflict, match="--rank 1"):
                llm.engine.add_worker()  # the front starts nothing: it says what to run
            tokens: dict[str, list[int]] = {}
            _serve(llm, tokens, _all_started)
            procs.append(hand_started_worker(port, 1))
            t0 = time.monotonic()
            _serve(llm, tokens, lambda t: 1 in llm.engine._members or time.monotonic() - t0 > 30)
            _wait_joined(llm, tokens)
            new = _new_requests(llm, 2)
            assert 1 in {llm.engine.owner(rid) for rid in new}
            _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
            assert {k: v for k, v in tokens.items() if k.startswith("r")} == survival_reference
            assert all(tokens[rid] == survival_reference["r0"] for rid in new)
            assert llm.engine.restarts == 0
        finally:
            llm.close()
    finally:
        codes, errs = _reap(procs)
    assert codes == [0, 0, 0], errs


def test_max_attention_workers_is_checked():
    with pytest.raises(UserInputError, match="at least attention_workers"):
        EngineConfig(attention_workers=2, max_attention_workers=1)
    with pytest.raises(UserInputError, match="needs mode='afd'"):
        EngineConfig(mode="aggregated", attention_workers=1, max_attention_workers=2)
    cfg = EngineConfig(attention_workers=1, max_attention_workers=3, ffn_workers=1)
    assert (cfg.attention_slots, cfg.world_size, cfg.ffn_ranks) == (3, 4, (3,))
    assert EngineConfig(attention_workers=2).world_size == 3  # nothing changes by default


def test_in_process_engine_refuses_runtime_workers(tiny_model_dirs):
    with pytest.raises(UserInputError, match="needs worker processes"):
        LLM(str(tiny_model_dirs["llama"]), attention_workers=1, max_attention_workers=2)
    with LLM(str(tiny_model_dirs["llama"]), attention_workers=1) as llm:
        with pytest.raises(UserInputError, match="cannot add attention workers"):
            llm.engine.add_worker()


@pytest.mark.slow  # the others' rejoin waits out its connect deadline (60 s)
def test_a_join_whose_worker_dies_frees_the_slot_and_loses_no_request(
    tiny_model_dirs, survival_reference
):
    """The added worker is killed before it is ready: the slot is free again, a new epoch
    leaves it out, the workers whose rejoin waited for it take that epoch once their connect
    gives up, and every request ends with its undisturbed tokens; the group never fails."""
    import os
    import signal

    llm = _survival_group(tiny_model_dirs, attention_workers=1, max_attention_workers=2)
    try:
        eng = llm.engine
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)
        assert eng.add_worker() == 1
        os.kill(eng.pids[1], signal.SIGKILL)
        _serve(llm, tokens, lambda t: not eng.has_unfinished(), give_up_s=150)
        assert tokens == survival_reference
        assert eng.pids[1] == 0 and eng.healthy()
        _wait_joined(llm, tokens, give_up_s=30)
        assert eng.add_worker() == 1  # the slot takes a worker again
        _wait_joined(llm, tokens, give_up_s=90)
        new = _new_requests(llm, 2)
        assert 1 in {eng.owner(rid) for rid in new}
        _serve(llm, tokens, lambda t: not eng.has_unfinished())
        assert all(tokens[rid] == survival_reference["r0"] for rid in new)
    finally:
        llm.close()
