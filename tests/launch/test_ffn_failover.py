"""FFN failover over worker processes (launch/failover.py): with m = 2 FFN workers on the tiny
MoE, SIGKILL of one mid-stream moves its experts to the survivor (loaded from the model files,
or already there as replicas), the attention workers run the interrupted step again there, and
every stream ends with the aggregated engine's tokens; a restarted worker gets experts again."""

from __future__ import annotations

import os
import signal
import time

import pytest

from afdserve import LLM, SamplingParams

LONG = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=5, max_tokens=40, ignore_eos=True)
PROMPTS = [[5, 9, 200], [7] * 21, [1], [100, 101, 102, 103, 104, 105, 106, 107], [3, 1, 4, 1, 5]]


def _params(k: int) -> SamplingParams:
    return SEEDED if k % 2 else LONG


def _reference(model_dir) -> dict[str, list[int]]:
    with LLM(str(model_dir), mode="aggregated", batch_invariant=True) as llm:
        return {f"r{k}": llm.generate([p], _params(k))[0].token_ids for k, p in enumerate(PROMPTS)}


def _group(model_dir, **engine) -> LLM:
    """2A:2F over shm, exact mode."""
    return LLM(
        str(model_dir),
        **{
            "mode": "afd",
            "attention_workers": 2,
            "ffn_workers": 2,
            "microbatches": 1,
            "transport": "shm",
            "batch_invariant": True,
            "sync_timeout_s": 1.0,
            **engine,
        },
    )


def _add_all(llm: LLM) -> None:
    for k, p in enumerate(PROMPTS):
        llm.engine.add_request(f"r{k}", p, _params(k))


def _serve(llm: LLM, tokens: dict, until, give_up_s: float = 90.0) -> None:
    """Step, appending each event's token to `tokens`, until `until(tokens)`."""
    t0 = time.monotonic()
    while not until(tokens):
        assert time.monotonic() - t0 < give_up_s, "the group stopped serving"
        for ev in llm.engine.step():
            if ev.token_id >= 0:
                tokens.setdefault(ev.request_id, []).append(ev.token_id)


def _all_started(tokens: dict) -> bool:
    return len(tokens) == len(PROMPTS) and min(map(len, tokens.values())) >= 2


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def moe_reference(tiny_model_dirs):
    return _reference(tiny_model_dirs["qwen3-moe"])


@pytest.mark.parametrize("transport", ["shm", pytest.param("tcp", marks=pytest.mark.slow)])
def test_survivor_loads_a_dead_ffn_workers_experts_and_serves_alone(
    tiny_model_dirs, moe_reference, transport
):
    """No replicas (the static placement) and no restart left: the surviving FFN worker loads
    the dead one's experts from the model files and serves every MoE and dense layer alone;
    every stream ends with the aggregated tokens. (Without the failover the group fails:
    test_multiprocess.py, test_killed_ffn_worker_without_restarts_is_an_error_in_bounded_time.)"""
    llm = _group(tiny_model_dirs["qwen3-moe"], max_restarts=0, transport=transport)
    pids = llm.engine.pids
    try:
        _add_all(llm)
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)
        os.kill(pids[-1], signal.SIGKILL)  # FFN rank 3, experts 4..7 of every MoE layer
        _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
        assert tokens == moe_reference
        engine = llm.engine
        state = engine.state()
        assert state.ffn_failovers == 1 and state.ffn_workers_down == 1
        assert engine.failover.experts_loaded == 8  # 4 experts x 2 MoE layers, all loaded
        assert engine.failover.taken == {2: {0: [4, 5, 6, 7], 2: [4, 5, 6, 7]}}
        placement = engine.switch.controller.placement
        assert placement.down == (1,) and placement.experts_of(0, 0) == tuple(range(8))
        assert engine.healthy()
        assert any("running on 1 of 2 FFN workers" in p for p in engine.problems())
        assert engine.requests_migrated == 0
        # new requests are served by the survivor alone too
        again = llm.generate([PROMPTS[0]], LONG)[0].token_ids
        assert again == moe_reference["r0"]
    finally:
        llm.close()
    assert not any(_alive(p) for p in pids)


def test_redundant_experts_fail_over_without_loading_and_the_restarted_worker_gets_experts(
    tmp_path, monkeypatch
):
    """EPLB with full redundancy (every expert on both FFN workers): after a SIGKILL the
    survivor already holds everything (nothing loaded) and serves alone while the dead one
    restarts; the restarted one rejoins with no expert and the two-phase switch gives it its
    experts back. Tokens: the aggregated ones throughout. The restart is held back until
    every stream has finished (its backoff made endless, then cut short), so the survivor
    served them all alone, whatever the timing."""
    from afdserve.launch import multiproc
    from afdserve.model.make_model import make_model

    model = make_model("qwen3-moe", "tiny", 0, tmp_path / "skewed", router_skew=1.0)
    reference = _reference(model)
    llm = _group(
        model,
        eplb=True,
        eplb_window_size=4,
        eplb_step_interval=3,
        num_redundant_experts=8,
        max_restarts=1,
    )
    engine = llm.engine
    try:
        # warm EPLB up to its redundant placement before the fault
        llm.generate([[3 + k, 40 + k, 7] * (k + 1) for k in range(4)], LONG)
        deadline = time.monotonic() + 30
        while engine.switch.controller.placement.version < 1 or engine.switch.target:
            assert time.monotonic() < deadline, engine.state().experts
            engine.step(0.05)
        before = engine.switch.controller.placement
        assert all(before.replica_counts(layer) == [2] * 8 for layer in before.moe_layers)
        pids = engine.pids
        _add_all(llm)
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)
        monkeypatch.setattr(multiproc, "restart_backoff_s", lambda n: 1e6)
        os.kill(pids[-1], signal.SIGKILL)
        _serve(llm, tokens, lambda t: not engine.has_unfinished())
        assert tokens == reference
        assert engine.restarts == 1 and engine.requests_migrated == 0
        state = engine.state()
        assert state.ffn_failovers == 1 and state.ffn_workers_down == 1
        assert engine.pids[-1] == pids[-1]  # not restarted yet: the survivor served alone
        assert engine.failover.experts_loaded == 0 and engine.failover.taken == {}
        assert engine.switch.controller.placement.down == (1,)
        engine._respawn_due = dict.fromkeys(engine._respawn_due, 0.0)  # restart it now
        # back: the restarted worker holds experts again, under a newer placement
        deadline = time.monotonic() + 60
        while engine.switch.controller.placement.down or engine.switch.target:
            assert time.monotonic() < deadline, engine.problems()
            engine.step(0.05)
        after = engine.switch.controller.placement
        assert after.layers == before.layers and after.version > before.version + 1
        assert engine.state().ffn_workers_down == 0
        assert engine.pids[-1] != pids[-1]
        again = llm.generate([PROMPTS[0], PROMPTS[2]], LONG)  # both FFN workers serve again
        assert [o.token_ids for o in again] == [reference["r0"], reference["r2"]]
    finally:
        llm.close()


def test_stopped_ffn_worker_is_declared_wedged_and_its_experts_fail_over(
    tiny_model_dirs, moe_reference
):
    """SIGSTOP of an FFN worker: silent past `WEDGED_S`, it is killed and failed over like a
    dead one (the survivor loads its experts and serves; it is started again): every stream
    ends with the aggregated tokens."""
    llm = _group(tiny_model_dirs["qwen3-moe"], max_restarts=1)
    pids = llm.engine.pids
    try:
        _add_all(llm)
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)
        os.kill(pids[-1], signal.SIGSTOP)
        _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
        assert tokens == moe_reference
        assert llm.engine.state().ffn_failovers == 1 and llm.engine.restarts == 1
        assert not _alive_unreaped(pids[-1])
    finally:
        try:
            os.kill(pids[-1], signal.SIGCONT)
        except ProcessLookupError:
            pass
        llm.close()


def _alive_unreaped(pid: int) -> bool:
    """Still a running process (not killed; the front reaps what it spawns)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_hand_started_ffn_worker_stopped_fails_over_and_comes_back_when_it_wakes(
    tiny_model_dirs, moe_reference
):
    """Workers started by hand over tcp (the front cannot kill them): a stopped FFN worker is
    declared wedged and failed over, the survivor serves every stream to its end while it
    stays stopped; woken, it rejoins the data plane and the switch gives it experts again."""
    import subprocess

    from afdserve.transport.options import free_port_run
    from tests.launch.test_multiprocess import hand_started_worker

    port = free_port_run(7)
    procs = [hand_started_worker(port, k, stderr=subprocess.DEVNULL) for k in range(4)]
    try:
        llm = _group(
            tiny_model_dirs["qwen3-moe"],
            transport="tcp",
            front=f"127.0.0.1:{port}",
            startup_timeout_s=90,
        )
        engine = llm.engine
        try:
            _add_all(llm)
            tokens: dict[str, list[int]] = {}
            _serve(llm, tokens, _all_started)
            procs[3].send_signal(signal.SIGSTOP)
            _serve(llm, tokens, lambda t: not engine.has_unfinished())
            assert tokens == moe_reference
            assert engine.state().ffn_failovers == 1
            assert engine.switch.controller.placement.down == (1,)  # still stopped
            procs[3].send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 60
            while engine.switch.controller.placement.down or engine.switch.target:
                assert time.monotonic() < deadline, engine.problems()
                engine.step(0.05)
            assert engine.switch.controller.placement.experts_of(0, 1) == (4, 5, 6, 7)
            again = llm.generate([PROMPTS[0], PROMPTS[2]], LONG)
            assert [o.token_ids for o in again] == [moe_reference["r0"], moe_reference["r2"]]
        finally:
            llm.close()
    finally:
        for p in procs:
            p.send_signal(signal.SIGCONT)
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
