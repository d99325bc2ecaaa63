"""Pieces of the front end without a server: stop-string streaming, the AFD stats recorder, the
bench's datasets, metrics and result block."""

from __future__ import annotations

import math
import pickle

import pytest

from afdserve.afd.stats import (
    A2F,
    BATCH_TOKEN_BUCKETS,
    F2A,
    TRANSFER_BUCKETS_S,
    AFDStats,
    BucketCounts,
    merge_snapshots,
)
from afdserve.errors import UserInputError
from afdserve.model.text_stream import TextStream
from afdserve.server.bench import RequestResult, compute_metrics, format_result
from afdserve.server.bench_data import random_requests, trace_requests


@pytest.fixture(scope="module")
def tokenizer():
    from afdserve.model.builtin import resolve_model
    from afdserve.model.tokenizer import Tokenizer

    return Tokenizer(resolve_model("builtin:tiny-qwen3-moe"))


def _stream(
    tokenizer, text: str, stop: list[str], min_tokens: int = 0
) -> tuple[list[str], TextStream]:
    ts = TextStream(tokenizer, stop, min_tokens)
    out = []
    for b in text.encode():  # one byte token at a time: ids 0..255 are the bytes
        ts.push(b)
        out.append(ts.take())
        if ts.stopped:
            break
    ts.finish()
    out.append(ts.take(final=True))
    return out, ts


def test_text_stream_without_stop_is_the_decoded_text(tokenizer):
    text = "héllo wörld, ça va? 🙂"
    pieces, ts = _stream(tokenizer, text, [])
    assert "".join(pieces) == text == ts.text
    assert not ts.stopped


@pytest.mark.parametrize(
    ("text", "stop", "expected"),
    [
        ("hello world", ["wor"], "hello "),
        ("hello world", ["o w", "ld"], "hell"),  # earliest match wins
        ("hello world", ["xyz"], "hello world"),
        ("abcabd", ["abd"], "abc"),  # a false start ("ab" then "c") is released
        ("aaa", ["aaaa"], "aaa"),  # a partial match at the end is released at the end
        ("stop at once", ["stop"], ""),
    ],
)
def test_text_stream_stop_strings(tokenizer, text, stop, expected):
    pieces, ts = _stream(tokenizer, text, stop)
    assert "".join(pieces) == expected == ts.text
    assert ts.stopped == (expected != text)


@pytest.mark.parametrize(
    ("text", "stop", "min_tokens", "expected"),
    [
        ("ab ab", ["ab"], 2, "ab "),  # the first "ab" is within min_tokens: the second stops
        ("ab ab", ["ab"], 1, ""),  # the first "ab" ends in token 2, past min_tokens=1
        ("ab ab", ["ab"], 5, "ab ab"),  # nothing ends after min_tokens: no stop
        ("xab", ["b", "ab"], 2, "x"),  # "ab" spans the boundary and ends after it: it counts
        ("abc", ["a"], 1, "abc"),  # "a" lay within min_tokens, later text does not repeat it
    ],
)
def test_text_stream_ignores_stop_strings_within_min_tokens(
    tokenizer, text, stop, min_tokens, expected
):
    pieces, ts = _stream(tokenizer, text, stop, min_tokens)
    assert "".join(pieces) == expected == ts.text


def test_text_stream_holds_back_only_a_possible_stop_prefix(tokenizer):
    ts = TextStream(tokenizer, ["END"])
    for b in b"abcE":
        ts.push(b)
    assert ts.take() == "abc"  # "E" may start "END": held back
    ts.push(ord("x"))
    assert ts.take() == "Ex"  # it did not: released


def test_bucket_counts_follow_prometheus_le_semantics():
    h = BucketCounts((1.0, 2.0))
    for v in (0.5, 1.0, 1.5, 2.0, 3.0):
        h.observe(v)
    assert h.counts == [2, 2, 1]  # (..1], (1..2], (2..+Inf)
    assert h.cumulative() == [("1.0", 2), ("2.0", 4), ("+Inf", 5)]
    assert h.count == 5 and h.sum == pytest.approx(8.0)


def test_afd_stats_record_snapshot_merge_pickle():
    a, b = AFDStats(), AFDStats()
    a.record_transfer(A2F, 0, 1e-4, 512)
    a.record_transfer(A2F, 0, 3e-4, 512)
    a.record_transfer(A2F, 1, 1e-4, 256)
    b.record_transfer(F2A, 0, 2e-3, 1024)
    b.record_ffn_batch(0, 1, 48)
    a.add_active(1.0)
    a.add_idle(0.25)
    b.record_sync_timeout()
    snap = a.snapshot()
    a.record_transfer(A2F, 0, 1e-4, 512)  # later records do not change a snapshot
    assert snap.transfer_bytes[(A2F, 0)] == 1024 and snap.transfer_seconds[(A2F, 0)].count == 2
    assert snap.busy_s == 0.75 and snap.busy_fraction == 0.75
    merged = merge_snapshots([pickle.loads(pickle.dumps(snap)), b.snapshot()])
    assert set(merged.transfer_seconds) == {(A2F, 0), (A2F, 1), (F2A, 0)}
    assert merged.transfer_bytes[(F2A, 0)] == 1024
    assert merged.ffn_batch_tokens[(0, 1)].sum == 48
    assert merged.sync_timeouts == 1 and merged.active_s == 1.0
    assert TRANSFER_BUCKETS_S == tuple(sorted(TRANSFER_BUCKETS_S))
    assert BATCH_TOKEN_BUCKETS == tuple(sorted(BATCH_TOKEN_BUCKETS))


def test_random_requests_are_seeded_and_sized():
    a = random_requests(5, 7, 3, vocab_size=100, seed=1)
    assert a == random_requests(5, 7, 3, vocab_size=100, seed=1)
    assert a != random_requests(5, 7, 3, vocab_size=100, seed=2)
    assert all(r.prompt_len == 7 and r.output_len == 3 for r in a)
    assert all(0 <= t < 100 for r in a for t in r.prompt_token_ids)
    with pytest.raises(UserInputError):
        random_requests(1, 0, 3, 100, 0)


def test_trace_requests_clip_to_the_context(tmp_path):
    trace = tmp_path / "t.csv"
    trace.write_text("arrived_at,num_prefill_tokens,num_decode_tokens\n0,10,5\n1,5000,300\n2,0,0\n")
    reqs = trace_requests(str(trace), 3, vocab_size=50, max_model_len=100, seed=0)
    lens = sorted((r.prompt_len, r.output_len) for r in reqs)
    assert lens == [
        (1, 1),
        (10, 5),
        (99, 1),
    ]  # long prompt clipped to the context, output to what is left
    reqs = trace_requests(
        str(trace), 6, vocab_size=50, max_model_len=100, seed=0, max_input_len=20, max_output_len=4
    )
    assert len(reqs) == 6  # more than the trace holds: resampled
    assert all(r.prompt_len <= 20 and r.output_len <= 4 for r in reqs)
    with pytest.raises(UserInputError):
        trace_requests(str(tmp_path / "missing.csv"), 1, 50, 100, 0)


def test_compute_metrics_and_vllm_result_block():
    results = [
        RequestResult(
            prompt_len=10, success=True, output_tokens=3, ttft=0.1, itl=[0.02, 0.04], latency=0.16
        ),
        RequestResult(prompt_len=20, success=True, output_tokens=1, ttft=0.3, itl=[], latency=0.3),
        RequestResult(prompt_len=5, success=False, error="HTTP 429"),
    ]
    m = compute_metrics(results, duration=2.0)
    assert m["completed"] == 2 and m["failed"] == 1
    assert m["total_input_tokens"] == 30 and m["total_output_tokens"] == 4
    assert m["request_throughput"] == 1.0 and m["output_throughput"] == 2.0
    assert m["total_token_throughput"] == 17.0
    assert m["mean_ttft_ms"] == pytest.approx(200.0) and m["median_ttft_ms"] == pytest.approx(200.0)
    assert m["mean_tpot_ms"] == pytest.approx(30.0)  # only the request with > 1 token
    assert m["mean_itl_ms"] == pytest.approx(30.0) and m["mean_e2el_ms"] == pytest.approx(230.0)
    block = format_result(m, max_concurrency=4, request_rate=math.inf).splitlines()
    assert block[0] == "============ Serving Benchmark Result ============"
    assert block[1] == "{:<40} {:<10}".format("Successful requests:", 2)
    assert "Benchmark duration (s):                  2.00      " in block
    assert "Total Token throughput (tok/s):          17.00     " in block
    assert "---------------Time to First Token----------------" in block
    assert "-----Time per Output Token (excl. 1st token)------" in block
    assert "---------------Inter-token Latency----------------" in block
    assert "----------------End-to-end Latency----------------" in block
    assert "P99 E2EL (ms):                           " in "\n".join(block)
    assert block[-1] == "=" * 50
    assert not any(line.startswith("Request rate configured") for line in block)
    rated = format_result(m, None, 2.5)
    assert "Request rate configured (RPS):           2.50      " in rated.splitlines()
