"""The control plane's typed messages: every field survives the codec, and anything else a
socket delivers comes out as a `Malformed` (naming the request where one can be read)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from afdserve.config import EngineConfig
from afdserve.engine.scheduler import SchedulerCounters
from afdserve.launch import control
from afdserve.launch.messages import (
    SCHEMA_VERSION,
    Abort,
    AddRequest,
    AttentionStatus,
    Configure,
    Failed,
    Fingerprint,
    Heartbeat,
    Malformed,
    Ping,
    Ready,
    Shutdown,
    StepOutputs,
    encode,
)
from afdserve.types import FinishReason, PromptLogprob, SamplingParams, TokenEvent

FP = Fingerprint("m", "LlamaForCausalLM", 30, 576, 49152, "float32", True)
STATUS = AttentionStatus(7, 0.25, 2, 1, 10, 40, SchedulerCounters(requests_added=3, steps=9))

finite = st.floats(allow_nan=False, allow_infinity=False)
events = st.builds(
    TokenEvent,
    request_id=st.text(min_size=1, max_size=8),
    token_id=st.integers(-1, 200_000),
    finished=st.booleans(),
    finish_reason=st.none() | st.sampled_from(list(FinishReason)),
    logprob=st.none() | finite,
    top_logprobs=st.lists(st.tuples(st.integers(0, 200_000), finite), max_size=5).map(tuple),
    queue_s=st.none() | finite,
    prefill_s=st.none() | finite,
    prompt_logprobs=st.none()
    | st.lists(
        st.builds(
            PromptLogprob,
            token_id=st.integers(0, 200_000),
            logprob=finite,
            rank=st.integers(1, 200_000),
            top_logprobs=st.lists(st.tuples(st.integers(0, 200_000), finite), max_size=3).map(
                tuple
            ),
        ),
        max_size=4,
    ).map(tuple),
)


@given(st.lists(events, max_size=6))
def test_step_outputs_keep_every_field_of_every_token_event(evs):
    msg = StepOutputs(1, STATUS, tuple(evs), afd={"active_s": 1.5})
    back = control.TO_FRONT.decode(encode(msg))
    assert back == msg
    assert [type(e) for e in back.events] == [TokenEvent] * len(evs)
    # the first token's timings are left out of ==: compare them by hand
    assert [(e.queue_s, e.prefill_s) for e in back.events] == [
        (e.queue_s, e.prefill_s) for e in evs
    ]


def test_step_outputs_carry_prefix_cache_events_and_counters():
    from afdserve.engine.prefix_cache import block_hashes

    keys = tuple(block_hashes(list(range(12)), 4))
    counters = SchedulerCounters(prefix_cache_queries=9, prefix_cache_hits=4, kv_host_blocks_in=2)
    status = msgspec.structs.replace(STATUS, counters=counters, kv_host_blocks_total=7)
    msg = StepOutputs(0, status, (), kv_stored=keys, kv_removed=keys[:1])
    back = control.TO_FRONT.decode(encode(msg))
    assert back == msg and back.kv_stored == keys and back.status.counters == counters


@pytest.mark.parametrize(
    "msg",
    [
        Ready(0, "attention", 123, FP, max_model_len=2048),
        Ready(2, "ffn", 124, FP),
        Heartbeat(0, "attention", STATUS, None),
        Heartbeat(2, "ffn", afd={"idle_s": 0.5}),
        Failed(1, "attention", "bad prompt", False, "r-1"),
        Failed(2, "ffn", "CUDA out of memory", True),
    ],
)
def test_worker_messages_round_trip(msg):
    assert control.TO_FRONT.decode(encode(msg)) == msg


CONFIG = EngineConfig(
    model="builtin:tiny-llama", attention_workers=3, microbatches=4, dtype="bfloat16",
    block_size=32, num_kv_blocks=99, max_model_len=512, sync_timeout_s=2.5, transport="tcp",
    microbatch_tokens=64, worker_threads=2, ffn_threads=3, ffn_gather_wait_s=0.0,
    batch_invariant=True, front="10.0.0.1:7000", kv_cache_dtype="int8",
)  # fmt: skip


def test_front_messages_round_trip():
    params = SamplingParams(
        max_tokens=5, temperature=0.7, top_p=0.9, top_k=20, seed=3, stop_token_ids=(2,),
        stop=("\n",), ignore_eos=True, logprobs=5, presence_penalty=0.5, frequency_penalty=-1.5,
        repetition_penalty=1.2, min_p=0.05, min_tokens=2, logit_bias={7: -100.0, 3: 2.5},
    )  # fmt: skip
    configure = Configure(3, CONFIG, "/models/llama", "10.0.0.1:7005", transport_key=b"\0k" * 16)
    assert control.TO_WORKER.decode(encode(configure)).transport_key == b"\0k" * 16
    assert Configure(3, CONFIG, "/m", "h:1").transport_key == b""  # none unless the front draws one
    for msg in (configure, AddRequest("r", (1, 2, 3), params, 99), Abort("r"), Ping(), Shutdown()):
        assert control.TO_WORKER.decode(encode(msg)) == msg
    decoded = control.TO_WORKER.decode(encode(AddRequest("r", (1,), params, 9))).params
    assert decoded.logit_bias == ((3, 2.5), (7, -100.0)) and decoded.min_tokens == 2
    assert configure.schema == Ready(0, "ffn", 1, FP).schema == SCHEMA_VERSION


def test_a_configuration_that_does_not_validate_is_malformed():
    """The worker gets the EngineConfig's own checks: a bad value is refused, not served."""
    good = msgspec.to_builtins(Configure(0, CONFIG, "/m", "h:1"))
    for bad in ({"transport": "carrier-pigeon"}, {"microbatches": 0}, {"block_size": "big"}):
        frame = _raw({**good, "config": {**good["config"], **bad}})
        assert isinstance(control.TO_WORKER.decode(frame), Malformed), bad


def _raw(obj) -> bytes:
    return msgspec.msgpack.encode(obj)


@pytest.mark.parametrize(
    "frame",
    [
        b"\x00\xffnot msgpack",
        _raw({"no": "op"}),
        _raw({"op": "launch-missiles"}),
        _raw({"op": "abort"}),  # a field missing
        _raw({"op": "abort", "request_id": 5}),  # a field of the wrong type
        _raw({"op": "ping", "extra": 1}),  # a field nobody declared
        encode(Ready(0, "attention", 1, FP)),  # the other direction's message
    ],
)
def test_garbage_is_malformed_not_an_exception(frame):
    out = control.TO_WORKER.decode(frame)
    assert isinstance(out, Malformed) and out.request_id is None


def test_an_add_that_does_not_validate_names_its_request():
    good = msgspec.to_builtins(AddRequest("r-7", (1, 2), SamplingParams(), 1))
    for bad in (
        {"temperature": -1.0},
        {"max_tokens": 0},
        {"top_p": "high"},
        {"presence_penalty": 2.5},
        {"repetition_penalty": 0.0},
        {"min_tokens": 17},  # > max_tokens
        {"logit_bias": [[5, 101.0]]},
    ):
        frame = _raw({**good, "params": {**good["params"], **bad}})  # SamplingParams' checks
        out = control.TO_WORKER.decode(frame)
        assert isinstance(out, Malformed) and out.request_id == "r-7", bad
    out = control.TO_WORKER.decode(_raw({**good, "prompt": "not a list"}))
    assert isinstance(out, Malformed) and out.request_id == "r-7"


def test_fingerprint_differences_name_the_fields():
    other = msgspec.structs.replace(FP, dtype="bfloat16", layers=2)
    assert FP.differences(other) == {"layers": (30, 2), "dtype": ("float32", "bfloat16")}
    assert FP.differences(FP) == {}
