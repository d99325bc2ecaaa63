"""Multi-process AFD: real worker processes on 127.0.0.1 over each transport give exactly the
aggregated tokens; slow and dead peers end in bounded time; nothing is left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgspec
import pytest

from afdserve import LLM, SamplingParams
from afdserve.errors import UserInputError
from afdserve.launch.multiproc import WorkerError
from afdserve.transport.options import free_port_run

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[5, 9, 200], [7] * 21, [1], [100, 101, 102, 103, 104, 105, 106, 107], [42] * 5]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _segments_of(pids: list[int]) -> list[str]:
    """/dev/shm ring files created by any of `pids` (the shm transport names them by creator;
    other sessions' files are none of this test's business)."""
    from afdserve.transport.shm_segments import SEGMENT_RE

    names = os.listdir("/dev/shm") if os.path.isdir("/dev/shm") else []
    return [n for n in names if (m := SEGMENT_RE.match(n)) and int(m.group(1)) in pids]


def _generate(model_dir, **engine) -> list[list[int]]:
    with LLM(str(model_dir), **engine) as llm:
        return [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]


@pytest.fixture(scope="module")
def reference(tiny_model_dirs):
    """reference(arch, device="cpu"): the aggregated engine's tokens (computed once each)."""
    cache: dict[tuple[str, str], list[list[int]]] = {}

    def get(arch: str, device: str = "cpu") -> list[list[int]]:
        if (arch, device) not in cache:
            cache[arch, device] = _generate(
                tiny_model_dirs[arch],
                mode="aggregated",
                attention_workers=1,
                microbatches=1,
                device=device,
            )
        return cache[arch, device]

    return get


def _transports() -> list[str]:
    from afdserve.transport.nixl import nixl_available

    return ["shm", "torch", "tcp", *(["nixl"] if nixl_available() else [])]


CASES = [(t, r, m) for t in _transports() for r in (1, 2, 3) for m in (1, 2)]


@pytest.mark.parametrize("transport,r,m", CASES)
def test_multiprocess_afd_equals_aggregated(tiny_model_dirs, reference, transport, r, m):
    arch = (
        "qwen3-moe" if (r + m) % 2 else "llama"
    )  # both a MoE and a dense model on every transport
    with LLM(
        str(tiny_model_dirs[arch]),
        mode="afd",
        attention_workers=r,
        microbatches=m,
        transport=transport,
    ) as llm:
        pids = llm.engine.pids
        tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert tokens == reference(arch)
    assert llm.engine.exit_codes == [0] * (r + 1)  # the shutdown message stopped each cleanly
    assert not any(_alive(p) for p in pids)
    assert not _segments_of(pids), f"leftover shared memory: {_segments_of(pids)}"


GPU_CASES = [(t, r, m) for t in _transports() for r in (1, 2) for m in (1, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("transport,r,m", GPU_CASES)
def test_multiprocess_afd_on_cuda_equals_aggregated_on_cuda(
    tiny_model_dirs, reference, transport, r, m
):
    """Workers on the GPU: host transports stage activations through host memory, nixl moves
    them between VRAM slots; every path gives the aggregated GPU engine's tokens."""
    arch = "qwen3-moe" if (r + m) % 2 else "llama"
    with LLM(
        str(tiny_model_dirs[arch]),
        mode="afd",
        attention_workers=r,
        microbatches=m,
        transport=transport,
        device="cuda",
    ) as llm:
        pids = llm.engine.pids
        tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert tokens == reference(arch, "cuda")
    assert not any(_alive(p) for p in pids)
    assert not _segments_of(pids), f"leftover shared memory: {_segments_of(pids)}"


def test_worker_refuses_a_cuda_device_it_does_not_have(tiny_model_dirs):
    """--device is checked before any model is loaded; a missing GPU is a clear error."""
    import torch

    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last (cuda:0 on a CPU host)
    with pytest.raises(WorkerError, match="CUDA device"):
        LLM(
            str(tiny_model_dirs["llama"]),
            mode="afd",
            attention_workers=1,
            microbatches=1,
            transport="shm",
            device=missing,
        )


def test_stalled_attention_worker_does_not_stop_the_others(tiny_model_dirs, reference, monkeypatch):
    # attention worker 1 sleeps 4 s before its layer-1 activation of step 2, far past the 0.5 s
    # sync timeout: the FFN must serve worker 0 without it, then serve worker 1 late.
    monkeypatch.setenv("AFDSERVE_TEST_STALL", "1:2:1:4")  # read by faults/sitecustomize.py
    faults = str(Path(__file__).with_name("faults"))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [faults, os.getenv("PYTHONPATH")]))
    )
    with LLM(
        str(tiny_model_dirs["llama"]),
        mode="afd",
        attention_workers=2,
        microbatches=1,
        transport="shm",
        sync_timeout_s=0.5,
    ) as llm:
        for k, p in enumerate(PROMPTS):
            llm.engine.add_request(f"r{k}", p, GREEDY)
        owner = {f"r{k}": llm.engine.owner(f"r{k}") for k in range(len(PROMPTS))}
        finished_at: dict[str, float] = {}
        t0 = time.monotonic()
        tokens: dict[str, list[int]] = {f"r{k}": [] for k in range(len(PROMPTS))}
        while llm.engine.has_unfinished() and time.monotonic() - t0 < 60:
            for ev in llm.engine.step():
                tokens[ev.request_id].append(ev.token_id)
                if ev.finished:
                    finished_at[ev.request_id] = time.monotonic() - t0
    assert [tokens[f"r{k}"] for k in range(len(PROMPTS))] == reference("llama")  # late, but exact
    on0 = [rid for rid, k in owner.items() if k == 0]
    on1 = [rid for rid, k in owner.items() if k == 1]
    assert on0 and on1
    # worker 0's requests finished while worker 1 was still asleep
    assert max(finished_at[r] for r in on0) < min(finished_at[r] for r in on1)


def _busy_group(
    tiny_model_dirs, sync_timeout_s: float, max_tokens: int, arch="llama", ffn_workers=1, **engine
) -> LLM:
    """2A1F (or 2A:mF) over shm, every prompt added with a long output and one step taken: a
    group with work in flight on both attention workers, for the failure tests."""
    llm = LLM(
        str(tiny_model_dirs[arch]),
        mode="afd",
        attention_workers=2,
        ffn_workers=ffn_workers,
        microbatches=1,
        transport="shm",
        sync_timeout_s=sync_timeout_s,
        **engine,
    )
    for k, p in enumerate(PROMPTS):
        llm.engine.add_request(
            f"r{k}", p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        )
    llm.engine.step(0.5)
    return llm


def _seconds_until_worker_error(llm: LLM, match: str | None, give_up_s: float) -> float:
    """Step until the engine raises WorkerError (matching `match`); the seconds it took."""
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=match):
        while time.monotonic() - t0 < give_up_s:
            llm.engine.step()
    return time.monotonic() - t0


# every transport carries the ROUTING frames (MoE, A < F among them); shm carries all three kinds
EP_CASES = [
    ("shm", "qwen3-moe", 1, 2),
    ("shm", "mixtral", 2, 3),
    ("shm", "llama", 2, 2),
    ("tcp", "mixtral", 2, 3),
    ("torch", "qwen3-moe", 1, 2),
    *[(t, "qwen3-moe", 2, 2) for t in _transports() if t == "nixl"],
]


@pytest.mark.parametrize("transport,arch,r,f", EP_CASES)
def test_multiprocess_expert_parallel_equals_aggregated(
    tiny_model_dirs, reference, transport, arch, r, f
):
    """rA:mF over worker processes: each FFN process loads only its experts, the attention
    processes route; the tokens are the aggregated ones (A < F included)."""
    tokens = _generate(
        tiny_model_dirs[arch],
        mode="afd",
        attention_workers=r,
        ffn_workers=f,
        microbatches=2,
        transport=transport,
        batch_invariant=True,
    )
    assert tokens == reference(arch)


@pytest.mark.parametrize("victim", ["ffn", "ffn-of-2"])
def test_killed_ffn_worker_without_restarts_is_an_error_in_bounded_time(tiny_model_dirs, victim):
    """(With m = 2 and the FFN failover on, the survivor would serve instead:
    tests/launch/test_ffn_failover.py.)"""
    llm = _busy_group(
        tiny_model_dirs,
        sync_timeout_s=1.0,
        max_tokens=400,
        max_restarts=0,
        **(
            dict(arch="qwen3-moe", ffn_workers=2, ffn_failover=False)
            if victim == "ffn-of-2"
            else {}
        ),
    )
    pids = llm.engine.pids
    try:
        os.kill(pids[-1], signal.SIGKILL)
        assert _seconds_until_worker_error(llm, None, give_up_s=30) < 15
    finally:
        llm.close()
    assert not any(_alive(p) for p in pids)


# -- survival: an attention worker dies or stalls, and no request is lost --------------------------

LONG = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, seed=5, max_tokens=60, ignore_eos=True)
SURVIVAL_PROMPTS = [*PROMPTS, [3, 1, 4, 1, 5], [9] * 30]


def _survival_params(k: int) -> SamplingParams:
    return SEEDED if k % 2 else LONG


@pytest.fixture(scope="module")
def survival_reference(tiny_model_dirs):
    """The aggregated tokens of SURVIVAL_PROMPTS on the tiny llama (exact mode: a migrated
    request's recompute must give the tokens a decode would have)."""
    return _survival_reference(tiny_model_dirs["llama"])


def _survival_reference(model_dir) -> dict[str, list[int]]:
    with LLM(str(model_dir), mode="aggregated", batch_invariant=True) as llm:
        outs = [
            llm.generate([p], _survival_params(k))[0].token_ids
            for k, p in enumerate(SURVIVAL_PROMPTS)
        ]
    return {f"r{k}": t for k, t in enumerate(outs)}


def _survival_group(tiny_model_dirs, arch: str = "llama", **engine):
    """2A1F with every SURVIVAL_PROMPTS request added (spawned over shm unless told)."""
    llm = LLM(
        str(tiny_model_dirs[arch]),
        **{
            "mode": "afd",
            "attention_workers": 2,
            "microbatches": 1,
            "transport": "shm",
            "batch_invariant": True,
            "sync_timeout_s": 1.0,
            **engine,
        },
    )
    for k, p in enumerate(SURVIVAL_PROMPTS):
        llm.engine.add_request(f"r{k}", p, _survival_params(k))
    return llm


def _serve(llm, tokens: dict, until, give_up_s: float = 60.0) -> dict:
    """Step, appending each event's token to `tokens`, until `until(tokens)`; the finish
    reasons seen."""
    reasons = {}
    t0 = time.monotonic()
    while not until(tokens):
        assert time.monotonic() - t0 < give_up_s, "the group stopped serving"
        for ev in llm.engine.step():
            if ev.token_id >= 0:
                tokens.setdefault(ev.request_id, []).append(ev.token_id)
            if ev.finished:
                reasons[ev.request_id] = ev.finish_reason
    return reasons


def _all_started(tokens: dict) -> bool:
    """Every request has two tokens or more: all are mid-stream."""
    return len(tokens) == len(SURVIVAL_PROMPTS) and min(map(len, tokens.values())) >= 2


def _assert_both_serve(llm, want: list[int]) -> None:
    """Two new requests go one to each attention worker and give `want` (SURVIVAL_PROMPTS[0]'s
    undisturbed tokens): a worker that was lost serves again."""
    for k in range(2):
        llm.engine.add_request(f"again{k}", SURVIVAL_PROMPTS[0], LONG)
    assert {llm.engine.owner("again0"), llm.engine.owner("again1")} == {0, 1}
    tokens: dict[str, list[int]] = {}
    _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
    assert tokens == {"again0": want, "again1": want}


def _in_flight_on(llm, rank: int) -> list[str]:
    return [f"r{k}" for k in range(len(SURVIVAL_PROMPTS)) if llm.engine.owner(f"r{k}") == rank]


@pytest.mark.parametrize("limit", [3, 0])
def test_killed_attention_worker_loses_no_request(tiny_model_dirs, survival_reference, limit):
    """SIGKILL of attention worker 0 mid-stream: its requests continue on worker 1 from their
    tokens so far, with the undisturbed tokens (greedy and seeded); worker 1's requests are not
    touched; with --migration-limit 0 worker 0's requests end with an error instead. With no
    restart left, worker 0 stays gone and the group serves on with one."""
    llm = _survival_group(tiny_model_dirs, migration_limit=limit, max_restarts=0)
    pids = llm.engine.pids
    try:
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)
        os.kill(pids[0], signal.SIGKILL)
        moved = _in_flight_on(llm, 0)
        assert moved and _in_flight_on(llm, 1)
        reasons = _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
        assert llm.engine.healthy()
        assert any("rank 0 died" in p for p in llm.engine.problems())
        if limit:
            assert tokens == survival_reference
            assert llm.engine.requests_migrated == len(moved)
        else:
            assert llm.engine.requests_migrated == 0
            assert {r for r, why in reasons.items() if why == "abort"} == set(moved)
            kept = {r: t for r, t in tokens.items() if r not in moved}
            assert kept == {r: survival_reference[r] for r in kept}
        # and it keeps serving new requests, on the worker left
        tokens.clear()
        llm.engine.add_request("after", SURVIVAL_PROMPTS[0], LONG)
        _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
        assert tokens["after"] == survival_reference["r0"]
    finally:
        llm.close()
    assert not any(_alive(p) for p in pids)


def test_stopped_attention_worker_loses_no_request_and_comes_back(
    tiny_model_dirs, survival_reference
):
    """SIGSTOP of attention worker 0 for 4 s: the front calls it stalled within STALL_S, its
    requests continue on worker 1 (the FFN does not wait for it), and once resumed it drops them
    (the front told it to) and serves again."""
    from afdserve.launch.multiproc import STALL_S

    llm = _survival_group(tiny_model_dirs)
    pids = llm.engine.pids
    try:
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)
        os.kill(pids[0], signal.SIGSTOP)
        stopped_at = time.monotonic()
        moved = _in_flight_on(llm, 0)
        assert moved
        _serve(llm, tokens, lambda t: bool(llm.engine.problems()))
        noticed = time.monotonic() - stopped_at
        _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
        os.kill(pids[0], signal.SIGCONT)
        assert tokens == survival_reference
        assert llm.engine.requests_migrated == len(moved)
        _serve(llm, tokens, lambda t: not llm.engine.problems(), give_up_s=30)
        # back: the router uses it again, and it gives the right tokens
        _assert_both_serve(llm, survival_reference["r0"])
    finally:
        os.kill(pids[0], signal.SIGCONT)
        llm.close()
    assert not any(_alive(p) for p in pids)
    # noticed within the pulse window (a bounded-time check, as for a death), not after the
    # FFN result timeout the old silence limit waited for
    assert noticed < STALL_S + 3.0


def _one_to_one_over_tcp(tiny_model_dirs) -> LLM:
    """1A1F over tcp on the tiny llama: the set-up of the garbage tests."""
    return LLM(
        str(tiny_model_dirs["llama"]),
        mode="afd",
        attention_workers=1,
        microbatches=1,
        transport="tcp",
    )


def test_worker_survives_garbage_control_messages(tiny_model_dirs, reference):
    with _one_to_one_over_tcp(tiny_model_dirs) as llm:
        import msgspec

        ctrl = llm.engine._controls[0]
        ctrl.send(b"\x00\xffnot msgpack")
        bad_add = {"op": "add", "request_id": "bad", "prompt": "not a list", "params": {}}
        ctrl.send(msgspec.msgpack.encode({**bad_add, "seed": 1}))
        ctrl.send(msgspec.msgpack.encode({"no": "op"}))
        tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert llm.engine.workers[0].adds_failed == 1  # the bad add was answered, by its id
    assert tokens == reference("llama")


def _ffn_data_address(llm: LLM) -> str:
    """The FFN worker's tcp data address, from the workers' own rendezvous store."""
    import datetime

    import torch.distributed as dist

    host, port = llm.engine.rendezvous.rsplit(":", 1)
    store = dist.PrefixStore(
        "afd/tcp/e0",  # the data plane's first epoch
        dist.TCPStore(host, int(port), is_master=False, timeout=datetime.timedelta(seconds=10)),
    )
    return store.get(f"addr/{llm.engine.cfg.attention_workers}").decode()


def test_ffn_worker_drops_garbage_data_frames_and_keeps_serving(tiny_model_dirs, reference):
    # an outsider dials the FFN worker's data-plane socket and sends malformed frames, and a
    # well-formed one that claims to be the attention worker (rank 0); it never completed the
    # connection handshake, so the worker logs and drops each one, and then serves the
    # attention worker's real traffic exactly
    import torch
    import zmq

    from afdserve.transport.codec import encode_parts
    from afdserve.transport.message import Message, MsgType

    with _one_to_one_over_tcp(tiny_model_dirs) as llm:
        ffn_addr = _ffn_data_address(llm)
        prefix, payload = encode_parts(
            Message(MsgType.ACTIVATION_TRANSFER, 0, 0, 0, 0, tensor=torch.ones(2, 4))
        )
        bad_header = bytearray(prefix)
        bad_header[-1] ^= 0x01  # a shape entry past ndim set: the header no longer validates
        foreign = encode_parts(
            Message(MsgType.ACTIVATION_TRANSFER, 0, 0, 0, 7, tensor=torch.ones(2, 4))
        )  # well formed, but from rank 7: not a peer
        garbage = [
            [b"\x00\xffnot an AFD frame at all"],
            [bytes(bad_header), bytes(payload)],
            [prefix],  # the tensor part is missing
            [foreign[0], bytes(foreign[1])],
            [prefix, bytes(payload), b"one part too many"],
            [prefix, bytes(payload)],  # well formed, claiming rank 0: spoofed
        ]
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)  # the socket type the data port speaks with
        dealer.setsockopt(zmq.LINGER, 1000)
        try:
            dealer.connect(ffn_addr)
            for parts in garbage:
                dealer.send_multipart(parts)
        finally:
            dealer.close()
            ctx.term()
        tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        ffn_log = llm.engine.worker_log(llm.engine.cfg.attention_workers)
        deadline = time.monotonic() + 10
        while ffn_log.read_text().count("dropped a bad frame") < len(garbage):
            assert time.monotonic() < deadline, ffn_log.read_text()[-2000:]
            time.sleep(0.1)
    assert tokens == reference("llama")


def test_a_keyed_tcp_group_serves_exactly_and_refuses_connections_without_the_key(
    tiny_model_dirs, reference, monkeypatch
):
    """A front that draws a group key (`Configure.transport_key`) gets workers whose tcp data
    connections prove it: they serve the same tokens, and an outsider without the key is
    refused at the handshake. (The front is made to draw one here.)"""
    import functools

    import zmq

    from afdserve.launch import multiproc
    from afdserve.transport.tcp_handshake import ClientHandshake, new_routing_id

    key = os.urandom(32)
    monkeypatch.setattr(
        multiproc, "Configure", functools.partial(multiproc.Configure, transport_key=key)
    )
    with _one_to_one_over_tcp(tiny_model_dirs) as llm:
        ident = new_routing_id()
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.ROUTING_ID, ident)
        try:
            dealer.connect(_ffn_data_address(llm))
            dealer.send(ClientHandshake(0, 1, b"", ident).hello())  # claims rank 0, no key
            assert dealer.poll(10_000), "no answer to HELLO"
            assert b"authenticates with the group's key" in dealer.recv()
        finally:
            dealer.close()
            ctx.term()
        tokens = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert tokens == reference("llama")


def test_front_names_what_differs_between_the_workers_and_its_model():
    """Every worker loads the path the front sends, but a host may hold another model there:
    the front compares each worker's fingerprint with its model and with the workers already
    ready, and names every field that differs."""
    from types import SimpleNamespace

    from afdserve.config import EngineConfig
    from afdserve.launch.messages import Fingerprint
    from afdserve.launch.remote_worker import mismatch

    model = SimpleNamespace(  # the ModelConfig fields a fingerprint has
        architecture="LlamaForCausalLM", hidden_size=64, num_hidden_layers=2, vocab_size=256
    )
    cfg = EngineConfig(transport="tcp", dtype="float32")
    same = Fingerprint("m", "LlamaForCausalLM", 2, 64, 256, "float32", False)
    assert mismatch(model, cfg, same, {}) == ""
    assert mismatch(model, cfg, same, {0: same}) == ""
    other = msgspec.structs.replace(same, architecture="Qwen2ForCausalLM", dtype="bfloat16")
    what = mismatch(model, cfg, other, {0: same})
    assert "architecture 'Qwen2ForCausalLM' (front: 'LlamaForCausalLM')" in what
    assert "dtype 'bfloat16' (front: 'float32')" in what
    assert "(rank 0: 'LlamaForCausalLM')" in what
    renamed = msgspec.structs.replace(same, model="other-dir")  # the front does not know names
    assert mismatch(model, cfg, renamed, {}) == ""
    assert mismatch(model, cfg, renamed, {1: same}) == "model 'other-dir' (rank 1: 'm')"
    exact = EngineConfig(transport="tcp", batch_invariant=True)
    assert "batch_invariant False (front: True)" in mismatch(model, exact, same, {})


def test_worker_flags_say_only_where_the_front_is(monkeypatch, capsys):
    from afdserve.cli import main

    assert main(["worker"]) == 2
    assert "say where the front is" in capsys.readouterr().err
    assert main(["worker", "--front", "127.0.0.1:7000"]) == 2
    assert "--front needs --rank" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the model, the ratio...: the front's, not a flag
        main(["worker", "--front", "127.0.0.1:7000", "--rank", "0", "--model", "x"])
    assert "unrecognized arguments: --model" in capsys.readouterr().err
    monkeypatch.setenv("AFDSERVE_RANK", "two")
    assert main(["worker", "--front", "127.0.0.1:7000"]) == 2
    assert "AFDSERVE_RANK" in capsys.readouterr().err
    monkeypatch.setenv("AFDSERVE_RANK", "1")
    monkeypatch.setenv("AFDSERVE_HOST", "tcp://10.0.0.1:5")
    assert main(["worker", "--front", "127.0.0.1:7000"]) == 2
    assert "--host must be a host name or IP address" in capsys.readouterr().err


def test_a_worker_without_a_front_gives_up_at_its_deadline():
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "afdserve.cli", "worker", "--front", f"127.0.0.1:{free_port_run(3)}",
         "--rank", "0", "--connect-timeout-s", "1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "no configuration from the front" in proc.stderr
    assert time.monotonic() - t0 < 30


# -- workers started by hand (EngineConfig.front) ------------------------------------------------


def hand_started_worker(
    front_port: int, rank: int, extra: tuple[str, ...] = (), stderr: int = subprocess.PIPE
) -> subprocess.Popen:
    """`afdserve worker` started as a user would on another host (here 127.0.0.1): told only
    where the front is and its rank; the front configures it."""
    return subprocess.Popen(
        [sys.executable, "-m", "afdserve.cli", "worker", "--front", f"127.0.0.1:{front_port}",
         "--rank", str(rank), "--host", "127.0.0.1", "--connect-timeout-s", "60", *extra],
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )  # fmt: skip


def _hand_started_workers(
    r: int, front_port: int, extra: tuple[str, ...] = ()
) -> list[subprocess.Popen]:
    """r attention workers and the FFN worker, started by hand (`hand_started_worker`)."""
    return [hand_started_worker(front_port, k, extra) for k in range(r + 1)]


def _reap(procs: list[subprocess.Popen], timeout_s: float = 30.0) -> tuple[list, str]:
    """(exit codes once each has exited (None: it had to be killed), their stderr)."""
    codes: list[int | None] = []
    errs = []
    for p in procs:
        try:
            errs.append(p.communicate(timeout=timeout_s)[1])
            codes.append(p.returncode)
        except subprocess.TimeoutExpired:
            p.kill()
            errs.append(p.communicate()[1])
            codes.append(None)
    return codes, "\n".join(e[-2000:] for e in errs if e)


def _front(model_dir, r: int, port: int, transport: str = "tcp", timeout_s: float = 90) -> LLM:
    """An LLM whose front waits at 127.0.0.1:port for r + 1 workers started by hand."""
    return LLM(
        str(model_dir),
        mode="afd",
        attention_workers=r,
        transport=transport,
        front=f"127.0.0.1:{port}",
        startup_timeout_s=timeout_s,
    )


@pytest.mark.parametrize("transport", ["tcp", "torch", "shm"])
def test_workers_started_by_hand_serve_through_a_front(tiny_model_dirs, reference, transport):
    r = 2
    port = free_port_run(r + 3)
    procs = _hand_started_workers(r, port)
    try:
        with _front(tiny_model_dirs["llama"], r, port, transport) as llm:
            assert llm.engine.pids == []  # nothing spawned
            got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
            routed = [w.routed for w in llm.engine.state(afd=False).workers]
    finally:
        codes, errs = _reap(procs)
    assert got == reference("llama")
    assert all(n > 0 for n in routed)  # both attention workers served
    assert codes == [0] * (r + 1), errs  # the front's shutdown stopped every worker cleanly


def test_front_without_workers_times_out_naming_the_missing_ranks(tiny_model_dirs):
    port = free_port_run(5)
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"workers \[0, 1, 2\] not ready within 2s"):
        _front(tiny_model_dirs["llama"], 2, port, timeout_s=2)
    assert time.monotonic() - t0 < 20


@pytest.mark.parametrize(
    "opts, match",
    [
        (dict(front="127.0.0.1:7000", transport="local"), "multi-process transport"),
        (dict(front="127.0.0.1:7000", transport="tcp", mode="aggregated"), "mode='afd'"),
        (dict(front="127.0.0.1", transport="tcp"), "front must be HOST:PORT"),
        (dict(front="127.0.0.1:65534", transport="tcp"), "no room"),
        (dict(startup_timeout_s=0), "startup_timeout_s"),
    ],
)
def test_front_options_are_checked(opts, match):
    from afdserve.config import EngineConfig
    from afdserve.errors import UserInputError

    with pytest.raises(UserInputError, match=match):
        EngineConfig(**opts)


def test_hand_started_workers_exit_when_their_front_dies(tiny_model_dirs):
    """A front pings its workers every second; one killed with SIGKILL sends nothing more, and
    its hand-started workers (no parent to die with) exit with code 4 after --front-timeout-s."""
    port = free_port_run(4)
    model = str(tiny_model_dirs["llama"])
    procs = _hand_started_workers(1, port, extra=("--front-timeout-s", "2"))
    script = (
        "import time; from afdserve import LLM; "
        f"llm = LLM({model!r}, mode='afd', attention_workers=1, transport='tcp', "
        f"front='127.0.0.1:{port}', startup_timeout_s=90); print('ready', flush=True); "
        "time.sleep(600)"
    )
    front = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert front.stdout is not None and front.stdout.readline().strip() == "ready"
        time.sleep(4)  # twice the timeout: the pings keep them serving
        assert [p.poll() for p in procs] == [None, None]
        front.kill()
        t0 = time.monotonic()
        codes, errs = _reap(procs)
        waited = time.monotonic() - t0
    finally:
        front.kill()
        front.wait()
        _reap(procs, 1.0)
    assert codes == [4, 4], errs
    assert "it is gone" in errs
    assert waited < 15  # 2 s of silence, noticed within a heartbeat period


@pytest.mark.parametrize("transport", ["shm"])  # the switch is control plane: any transport
def test_eplb_replaces_experts_across_worker_processes_without_changing_a_token(
    tmp_path, transport
):
    """The two-phase switch (launch/replacement.py): FFN processes load the experts they lack,
    attention processes switch between their steps, then the old experts go; the tokens are the
    aggregated ones throughout."""
    from afdserve.model.make_model import make_model

    model = make_model("qwen3-moe", "tiny", 0, tmp_path / "skewed", router_skew=1.0)
    prompts = [[3 + k, 40 + k, 7] * (k + 1) for k in range(8)]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(str(model), mode="aggregated", attention_workers=1, microbatches=1) as llm:
        reference = [o.token_ids for o in llm.generate(prompts, params)]
    with LLM(
        str(model),
        mode="afd",
        attention_workers=2,
        ffn_workers=2,
        microbatches=2,
        transport=transport,
        batch_invariant=True,
        eplb=True,
        eplb_window_size=4,
        eplb_step_interval=3,
        num_redundant_experts=2,
    ) as llm:
        tokens = [o.token_ids for o in llm.generate(prompts[:4], params)]
        # the switch is asynchronous (three rounds of control messages): let it finish, then
        # serve the other half under the new placement
        deadline = time.monotonic() + 30
        while llm.engine.state().experts.placement_version < 1:
            assert time.monotonic() < deadline, llm.engine.state().experts
            llm.engine.step(0.05)
        tokens += [o.token_ids for o in llm.generate(prompts[4:], params)]
        experts = llm.engine.state().experts
    assert tokens == reference
    assert experts.placement_version >= 1, experts
    assert experts.history and experts.history[0][2] < experts.history[0][1]


@pytest.mark.parametrize("transport", ["tcp", "torch"])
def test_hand_started_attention_worker_killed_loses_no_request(
    tiny_model_dirs, survival_reference, transport
):
    """Workers started by hand: the front has no process to watch, so a dead attention worker
    is its silence (no pulse); its requests continue on the other one, over that transport."""
    port = free_port_run(5)
    procs = _hand_started_workers(2, port)
    try:
        llm = _survival_group(
            tiny_model_dirs, transport=transport, front=f"127.0.0.1:{port}", startup_timeout_s=90
        )
        try:
            tokens: dict[str, list[int]] = {}
            _serve(llm, tokens, _all_started)
            procs[0].kill()
            moved = _in_flight_on(llm, 0)
            assert moved
            _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
            assert tokens == survival_reference
            assert llm.engine.requests_migrated == len(moved)
            assert llm.engine.healthy()
        finally:
            llm.close()
    finally:
        _reap(procs)


@pytest.mark.parametrize(
    "transport,arch,m",
    [("shm", "llama", 1), ("tcp", "llama", 1), ("torch", "llama", 1), ("shm", "qwen3-moe", 2)],
)
def test_killed_ffn_worker_is_restarted_and_no_request_is_lost(
    tiny_model_dirs, survival_reference, transport, arch, m
):
    """SIGKILL of an FFN worker mid-stream: the front starts it again (with m = 2, holding its
    experts of the current placement), every other worker rejoins the data plane under a new
    epoch, the attention workers keep their KV and run the interrupted step again: every
    stream continues with the undisturbed tokens, none moved."""
    if arch != "llama":
        survival_reference = _survival_reference(tiny_model_dirs[arch])
    llm = _survival_group(tiny_model_dirs, arch, transport=transport, ffn_workers=m)
    pids = llm.engine.pids
    try:
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)
        os.kill(pids[-1], signal.SIGKILL)
        _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
        assert tokens == survival_reference
        assert llm.engine.restarts == 1 and llm.engine.requests_migrated == 0
        _serve(llm, tokens, lambda t: not llm.engine.problems(), give_up_s=30)
        assert llm.engine.healthy()
        new_pids = llm.engine.pids
        assert new_pids[:-1] == pids[:-1] and new_pids[-1] != pids[-1]
    finally:
        llm.close()
    assert not any(_alive(p) for p in llm.engine.pids)


def test_stopped_ffn_worker_is_degraded_and_every_stream_resumes(
    tiny_model_dirs, survival_reference
):
    """SIGSTOP of the FFN worker: the group reports it (within the pulse window) but keeps
    every request (the attention workers wait, bounded by their result timeout); after SIGCONT
    every stream finishes with the undisturbed tokens, and the group is healthy again."""
    llm = _survival_group(tiny_model_dirs)
    pids = llm.engine.pids
    try:
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)
        os.kill(pids[-1], signal.SIGSTOP)
        _serve(llm, tokens, lambda t: any("FFN worker 2" in p for p in llm.engine.problems()))
        assert llm.engine.healthy() and llm.engine.has_unfinished()
        os.kill(pids[-1], signal.SIGCONT)
        _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
        assert tokens == survival_reference
        assert llm.engine.restarts == 0 and llm.engine.requests_migrated == 0
        _serve(llm, tokens, lambda t: not llm.engine.problems(), give_up_s=30)
    finally:
        os.kill(pids[-1], signal.SIGCONT)
        llm.close()
    assert not any(_alive(p) for p in pids)


def test_killed_attention_worker_is_restarted_and_serves_again(tiny_model_dirs, survival_reference):
    """SIGKILL of attention worker 0: its requests move to worker 1 at once, the front starts
    it again (the group rejoins the data plane under a new epoch, worker 1 retrying any step in
    flight), and once ready it is routed to again and gives the right tokens."""
    llm = _survival_group(tiny_model_dirs)
    pids = llm.engine.pids
    try:
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)
        os.kill(pids[0], signal.SIGKILL)
        moved = _in_flight_on(llm, 0)
        _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
        assert tokens == survival_reference
        assert llm.engine.requests_migrated == len(moved) and llm.engine.restarts == 1
        _serve(llm, tokens, lambda t: not llm.engine.problems(), give_up_s=60)
        assert llm.engine.pids[0] != pids[0]
        _assert_both_serve(llm, survival_reference["r0"])
    finally:
        llm.close()
    assert not any(_alive(p) for p in llm.engine.pids)


def test_request_for_a_dead_worker_not_yet_noticed_goes_to_another(tiny_model_dirs, reference):
    """Workers started by hand: attention worker 0 dies and, before the front notices (its
    silence takes STALL_S), requests are routed to it (worker 1 is drained, so the router picks
    it): an add it does not take goes to the next worker, and one it took before dying moves
    when the front notices; either way every request ends with the aggregated tokens."""
    port = free_port_run(5)
    procs = _hand_started_workers(2, port)
    try:
        with _front(tiny_model_dirs["llama"], 2, port) as llm:
            llm.engine.drain(1)
            procs[0].kill()
            procs[0].wait(10)
            time.sleep(0.3)  # ZeroMQ sees the connection close (not needed for the outcome)
            got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    finally:
        _reap(procs)
    assert got == reference("llama")


@pytest.mark.parametrize("victim", [2, 0])
def test_hand_started_worker_restarted_by_hand_rejoins(tiny_model_dirs, survival_reference, victim):
    """Workers started by hand over tcp: the FFN worker (or attention worker 0) is killed and
    started again the way a supervisor would (same command line); it says hello, the front
    takes it back under a new epoch, and every stream ends with the undisturbed tokens."""
    port = free_port_run(5)
    procs = _hand_started_workers(2, port)
    try:
        llm = _survival_group(
            tiny_model_dirs, transport="tcp", front=f"127.0.0.1:{port}", startup_timeout_s=90
        )
        try:
            tokens: dict[str, list[int]] = {}
            _serve(llm, tokens, _all_started)
            procs[victim].kill()
            procs[victim].wait(10)
            procs[victim] = subprocess.Popen(
                procs[victim].args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
            _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
            assert tokens == survival_reference
            assert llm.engine.restarts == 1
            _serve(llm, tokens, lambda t: not llm.engine.problems(), give_up_s=60)
        finally:
            llm.close()
    finally:
        _reap(procs)


def test_drained_attention_worker_process_gets_no_new_request(tiny_model_dirs, reference):
    with LLM(
        str(tiny_model_dirs["llama"]), mode="afd", attention_workers=2, transport="shm"
    ) as llm:
        assert llm.engine.drain(1) == 0
        assert "attention worker 1 drained" in llm.engine.problems()[0]
        got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
        assert [w.routed for w in llm.engine.state(afd=False).workers] == [len(PROMPTS), 0]
        with pytest.raises(UserInputError, match="last one"):
            llm.engine.drain(0)
        llm.engine.drain(1, False)
        assert llm.engine.problems() == []
    assert got == reference("llama")


def test_requests_wait_while_every_attention_worker_is_stopped(tiny_model_dirs, survival_reference):
    """Both attention workers SIGSTOPped: every request is parked at the front (counted as
    waiting), none lost; once one resumes, they all go there and finish with the undisturbed
    tokens."""
    llm = _survival_group(tiny_model_dirs)
    pids = llm.engine.pids
    try:
        tokens: dict[str, list[int]] = {}
        _serve(llm, tokens, _all_started)
        for pid in pids[:2]:
            os.kill(pid, signal.SIGSTOP)
        _serve(llm, tokens, lambda t: len(llm.engine.problems()) >= 2)
        assert not llm.engine.healthy()  # nobody serves: /health says so (503)
        assert llm.engine.state(afd=False).num_waiting == len(SURVIVAL_PROMPTS) - sum(
            len(t) == 60 for t in tokens.values()
        )
        os.kill(pids[1], signal.SIGCONT)
        _serve(llm, tokens, lambda t: not llm.engine.has_unfinished())
        assert tokens == survival_reference
    finally:
        for pid in pids[:2]:
            os.kill(pid, signal.SIGCONT)
        llm.close()
    assert not any(_alive(p) for p in pids)


def test_restarts_back_off():
    from afdserve.launch.multiproc import restart_backoff_s

    assert [restart_backoff_s(n) for n in range(1, 8)] == [0.0, 1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
