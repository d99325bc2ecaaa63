"""/metrics in Prometheus text format, parsed with prometheus_client's parser: vLLM's series
under vLLM's names, types, labels and buckets; the counters and histograms move by exactly what
the requests did (time per output token per token and per request, numerically); the router
spreads requests over the attention workers; the AFD series, process and HTTP series are
there; the old `afdserve:` names come back only when asked for."""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from afdserve.afd.stats import EngineState
from afdserve.config import EngineConfig
from afdserve.server.metrics import (
    PER_TOKEN_BUCKETS_S,
    REQUEST_LATENCY_BUCKETS_S,
    TTFT_BUCKETS_S,
    FinishedRequest,
    ServerMetrics,
    buckets_1_2_5,
)
from tests.server.conftest import MODEL, SERVED

UNLABELLED = ("process_", "python_", "http_")
"""Series that carry no model_name (as in vLLM): the process's and the HTTP middleware's."""


def _families(text: str) -> dict:
    return {fam.name: fam for fam in text_string_to_metric_families(text)}


def _metrics_text(srv) -> str:
    with srv.http() as h:
        resp = h.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    return resp.text


def scrape(srv) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(_metrics_text(srv)):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            if not s.name.startswith(UNLABELLED):
                assert s.labels.get("model_name") == SERVED, s
            if s.name.startswith("vllm:"):
                assert s.labels.get("engine") == "0", s
            out[(s.name, labels)] = s.value
    return out


def total(m: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= set(ls))


def _complete(srv, prompt, max_tokens: int) -> dict:
    with srv.http() as h:
        r = h.post(
            "/v1/completions",
            json={"model": SERVED, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True},
        )
    assert r.status_code == 200, r.text
    return r.json()


HELD_S = 0.4


def test_counters_move_with_requests(afd_server):
    srv = afd_server
    srv.wait_idle()
    before = scrape(srv)
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34]]
    with srv.held_engine() as gate, ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(_complete, srv, p, 6) for p in prompts]
        deadline = time.monotonic() + 30
        while srv.engine.state(afd=False).num_waiting < len(prompts):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        queued = scrape(srv)
        time.sleep(HELD_S)  # every request waits at least this long before it is scheduled
        gate.set()
        results = [f.result() for f in futures]
    srv.wait_idle()
    after = scrape(srv)
    assert total(queued, "vllm:num_requests_waiting") == len(prompts)
    # least-load routing: three requests over two idle workers go 0, 1, then the lighter one
    per_worker = [
        total(queued, "afdserve:worker_num_requests_waiting", worker=str(k)) for k in range(2)
    ]
    assert sorted(per_worker) == [1, 2]
    routed = [
        total(after, "afdserve:router_requests_total", worker=str(k))
        - total(before, "afdserve:router_requests_total", worker=str(k))
        for k in range(2)
    ]
    assert sorted(routed) == [1, 2]
    assert total(queued, "afdserve:worker_load", worker="0") > 0

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    n = len(prompts)
    assert moved("vllm:prompt_tokens_total") == sum(len(p) for p in prompts) == 12
    assert (
        moved("vllm:generation_tokens_total")
        == sum(r["usage"]["completion_tokens"] for r in results)
        == 18
    )
    assert moved("vllm:request_success_total", finished_reason="length") == n
    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_time_per_output_token_seconds",
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_inference_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
        "request_params_max_tokens",
        "request_params_n",
    ):
        assert moved(f"vllm:{name}_count") == n, name  # one observation per request
        assert moved(f"vllm:{name}_bucket", le="+Inf") == n, name
    assert moved("vllm:inter_token_latency_seconds_count") == n * 5  # one per later token
    assert moved("vllm:time_per_output_token_seconds_count") == n * 5
    assert moved("vllm:request_prompt_tokens_sum") == 12
    assert moved("vllm:request_generation_tokens_sum") == 18
    assert moved("vllm:request_params_max_tokens_sum") == 18
    assert moved("vllm:request_params_n_sum") == n
    # held before its first step: each request queued at least HELD_S, none was preempted
    assert moved("vllm:request_queue_time_seconds_sum") >= n * HELD_S
    assert moved("vllm:request_queue_time_seconds_bucket", le="0.3") == 0
    assert moved("vllm:time_to_first_token_seconds_sum") >= n * HELD_S
    assert moved("vllm:num_preemptions_total") == 0
    # tokens the attention workers' steps scheduled: the prompts, then 5 decode tokens each
    assert moved("vllm:iteration_tokens_total_sum") == 12 + 5 * 3
    assert moved("vllm:iteration_tokens_total_count") >= 6  # two workers' prefill + decodes
    assert total(after, "vllm:kv_cache_usage_perc") == 0.0
    assert total(after, "vllm:gpu_cache_usage_perc") == 0.0
    assert total(after, "vllm:num_requests_running") == 0.0
    assert total(after, "afdserve:healthy") == 1.0
    assert moved("http_requests_total", handler="/v1/completions", method="POST", status="2xx") == n
    assert moved("http_request_duration_seconds_count", handler="/v1/completions") == n

    # AFD: every layer's activations crossed both ways, in batches gathered from both workers
    num_layers = 3
    for direction in ("a2f", "f2a"):
        for layer in range(num_layers):
            assert (
                moved("afdserve:afd_transfer_bytes_total", direction=direction, layer=str(layer))
                > 0
            )
            assert (
                moved("afdserve:afd_transfer_seconds_count", direction=direction, layer=str(layer))
                > 0
            )
    # the prompts' prefill (12 tokens from both workers) went through each layer's FFN, then 5
    # decode steps of 3 tokens each (the first token comes with the prefill)
    for layer in range(num_layers):
        assert moved("afdserve:ffn_batch_tokens_sum", layer=str(layer)) == 12 + 5 * 3
    assert total(
        after, "afdserve:ffn_batch_tokens_bucket", layer="0", microbatch="0", le="+Inf"
    ) == (total(after, "afdserve:ffn_batch_tokens_count", layer="0", microbatch="0"))
    for role in ("attention", "ffn"):
        assert moved(f"afdserve:{role}_busy_seconds_total") > 0
        frac = [v for (n, _), v in after.items() if n == f"afdserve:{role}_busy_fraction"]
        assert frac and all(0.0 <= f <= 1.0 for f in frac)
    assert total(after, "afdserve:afd_attention_ratio") == 2.0
    assert total(after, "afdserve:afd_microbatches") == 2.0
    assert total(after, "afdserve:afd_sync_timeouts_total") == 0.0
    # the vLLM-named series replace the old names unless --legacy-metric-names
    for old in ("num_requests_waiting", "prompt_tokens_total", "time_per_output_token_seconds"):
        assert not [k for k in after if k[0].startswith(f"afdserve:{old}")], old


VLLM_SERIES = {
    "vllm:num_requests_running": "gauge",
    "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:gpu_cache_usage_perc": "gauge",
    "vllm:cache_config_info": "gauge",
    "vllm:prompt_tokens": "counter",
    "vllm:generation_tokens": "counter",
    "vllm:num_preemptions": "counter",
    "vllm:request_success": "counter",
    "vllm:iteration_tokens_total": "histogram",
    "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
    "vllm:time_per_output_token_seconds": "histogram",
    "vllm:request_time_per_output_token_seconds": "histogram",
    "vllm:e2e_request_latency_seconds": "histogram",
    "vllm:request_queue_time_seconds": "histogram",
    "vllm:request_prefill_time_seconds": "histogram",
    "vllm:request_decode_time_seconds": "histogram",
    "vllm:request_inference_time_seconds": "histogram",
    "vllm:request_prompt_tokens": "histogram",
    "vllm:request_generation_tokens": "histogram",
    "vllm:request_params_max_tokens": "histogram",
    "vllm:request_params_n": "histogram",
}


def _bounds(fam) -> list[float]:
    return sorted({float(s.labels["le"]) for s in fam.samples if s.name.endswith("_bucket")})


def test_vllm_series_have_vllm_types_labels_and_buckets(afd_server):
    srv = afd_server
    _complete(srv, [5, 6, 7], 3)
    srv.wait_idle()
    fams = _families(_metrics_text(srv))
    for name, kind in VLLM_SERIES.items():
        assert name in fams, name
        fam = fams[name]
        assert fam.type == kind, (name, fam.type)
        assert fam.samples, name
        for s in fam.samples:
            assert s.labels["model_name"] == SERVED and s.labels["engine"] == "0", s
    # the finish reasons are there from the start, as in vLLM
    reasons = {
        s.labels["finished_reason"]
        for s in fams["vllm:request_success"].samples
        if s.name == "vllm:request_success_total"
    }
    assert reasons == {"stop", "length", "abort", "error"}
    # vLLM's buckets
    inf = [math.inf]
    assert _bounds(fams["vllm:time_to_first_token_seconds"]) == [*TTFT_BUCKETS_S, *inf]
    for name in ("inter_token_latency_seconds", "request_time_per_output_token_seconds"):
        assert _bounds(fams[f"vllm:{name}"]) == [*PER_TOKEN_BUCKETS_S, *inf]
    for name in ("e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert _bounds(fams[f"vllm:{name}"]) == [*REQUEST_LATENCY_BUCKETS_S, *inf]
    limit = srv.engine.max_model_len
    assert _bounds(fams["vllm:request_prompt_tokens"]) == [*buckets_1_2_5(limit), *inf]
    assert _bounds(fams["vllm:request_params_n"]) == [1, 2, 5, 10, 20, *inf]
    assert _bounds(fams["vllm:iteration_tokens_total"])[:3] == [1, 8, 16]
    # the cache configuration as labels of a gauge set to 1
    (info,) = fams["vllm:cache_config_info"].samples
    st = srv.engine.state(afd=False)
    assert info.value == 1.0
    assert info.labels["block_size"] == str(srv.serving.config.block_size)
    assert info.labels["num_gpu_blocks"] == str(sum(w.kv_blocks_total for w in st.workers))
    assert info.labels["cache_dtype"] == srv.serving.config.dtype
    # process series, as prometheus_client's default registry has them
    assert fams["process_cpu_seconds"].type == "counter"
    assert fams["process_resident_memory_bytes"].samples[0].value > 0
    assert "python_info" in fams and "python_gc_collections" in fams


def _sample(m: dict, name: str) -> float:
    return total(m, name)


def test_time_per_output_token_per_token_and_per_request(afd_server):
    """vllm:inter_token_latency_seconds and vllm:time_per_output_token_seconds take one sample
    per token; vllm:request_time_per_output_token_seconds one per request (its mean)."""
    srv = afd_server
    srv.wait_idle()
    snaps = [scrape(srv)]
    for max_tokens in (2, 9, 1):  # one request at a time, scraped after each
        _complete(srv, [40, 41, 42, 43], max_tokens)
        srv.wait_idle()
        snaps.append(scrape(srv))

    def delta(i: int, name: str) -> float:
        return _sample(snaps[i + 1], name) - _sample(snaps[i], name)

    decode = [delta(i, "vllm:request_decode_time_seconds_sum") for i in range(3)]
    assert decode[0] > 0 and decode[1] > 0 and decode[2] == 0.0  # one token: no decode
    for i, tokens in enumerate((2, 9, 1)):
        itl_sum = delta(i, "vllm:inter_token_latency_seconds_sum")
        assert delta(i, "vllm:inter_token_latency_seconds_count") == tokens - 1
        assert delta(i, "vllm:time_per_output_token_seconds_count") == tokens - 1
        assert delta(i, "vllm:time_per_output_token_seconds_sum") == pytest.approx(itl_sum)
        assert itl_sum == pytest.approx(decode[i], abs=1e-9)  # the gaps add up to the decode
        # per request: the request's mean gap, one sample (0 for a one-token request, as vLLM)
        assert delta(i, "vllm:request_time_per_output_token_seconds_count") == 1
        want = decode[i] / (tokens - 1) if tokens > 1 else 0.0
        assert delta(i, "vllm:request_time_per_output_token_seconds_sum") == pytest.approx(want)
        # the phases: inference = prefill + decode; queue + prefill fit inside the TTFT
        prefill = delta(i, "vllm:request_prefill_time_seconds_sum")
        queue = delta(i, "vllm:request_queue_time_seconds_sum")
        ttft = delta(i, "vllm:time_to_first_token_seconds_sum")
        e2e = delta(i, "vllm:e2e_request_latency_seconds_sum")
        inference = delta(i, "vllm:request_inference_time_seconds_sum")
        assert inference == pytest.approx(prefill + decode[i])
        assert 0 <= queue and 0 < prefill and queue + prefill <= ttft <= e2e
        assert e2e == pytest.approx(ttft + decode[i])
    # over both multi-token requests, per token and per request disagree (8 gaps vs 1)
    per_token = (decode[0] + decode[1]) / 9
    per_request = (decode[0] / 1 + decode[1] / 8) / 2
    total_req = sum(delta(i, "vllm:request_time_per_output_token_seconds_sum") for i in range(2))
    assert total_req / 2 == pytest.approx(per_request)
    total_tok = sum(delta(i, "vllm:time_per_output_token_seconds_sum") for i in range(2))
    assert total_tok / 9 == pytest.approx(per_token)


def test_http_metrics_by_route_and_status(afd_server):
    srv = afd_server
    before = scrape(srv)
    with srv.http() as h:
        assert h.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404
        assert h.get("/v1/models").status_code == 200
        assert h.get("/health").status_code == 200
    after = scrape(srv)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    c = "http_requests_total"
    assert moved(c, handler="/v1/completions", method="POST", status="4xx") == 1
    assert moved(c, handler="/v1/models", method="GET", status="2xx") == 1
    assert moved("http_request_duration_seconds_count", handler="/v1/models", method="GET") == 1
    # vLLM's exclusions: scrapes and health checks are not counted
    assert total(after, c, handler="/metrics") == 0 and total(after, c, handler="/health") == 0


def _unit_metrics(legacy: bool) -> ServerMetrics:
    cfg = EngineConfig(model=MODEL, mode="afd", attention_workers=2, microbatches=2)
    return ServerMetrics(
        "m",
        cfg,
        state=lambda: EngineState(()),
        healthy=lambda: True,
        max_model_len=100,
        legacy_names=legacy,
    )


def _samples(m: ServerMetrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            if "le" not in s.labels:
                out[s.name] = out.get(s.name, 0.0) + s.value
    return out


@pytest.mark.parametrize("legacy", [False, True])
def test_legacy_afdserve_names_only_when_asked(legacy):
    m = _unit_metrics(legacy)
    gaps = [0.01, 0.03, 0.05]  # one request of 4 tokens: decode 0.09 s
    m.on_first_token(0.2)
    for g in gaps:
        m.on_token(g)
    m.on_finished(FinishedRequest("stop", 0.29, 7, 4, 16, 0.05, 0.15, sum(gaps)))
    s = _samples(m)
    assert s["vllm:time_per_output_token_seconds_count"] == 3  # per token
    assert s["vllm:time_per_output_token_seconds_sum"] == pytest.approx(0.09)
    assert s["vllm:request_time_per_output_token_seconds_count"] == 1  # per request
    assert s["vllm:request_time_per_output_token_seconds_sum"] == pytest.approx(0.03)
    assert s["vllm:request_inference_time_seconds_sum"] == pytest.approx(0.24)
    assert s["vllm:request_queue_time_seconds_sum"] == pytest.approx(0.05)
    assert s["afdserve:healthy"] == 1.0  # AFD's own series are there either way
    legacy_names = [
        "afdserve:time_to_first_token_seconds_count",
        "afdserve:inter_token_latency_seconds_count",
        "afdserve:time_per_output_token_seconds_count",
        "afdserve:e2e_request_latency_seconds_count",
        "afdserve:request_prompt_tokens_count",
        "afdserve:request_generation_tokens_count",
        "afdserve:request_success_total",
        "afdserve:num_requests_running",
        "afdserve:num_requests_waiting",
        "afdserve:kv_cache_usage_perc",
        "afdserve:prompt_tokens_total",
        "afdserve:generation_tokens_total",
        "afdserve:num_preemptions_total",
    ]
    if not legacy:
        assert not [n for n in legacy_names if n in s]
        return
    assert all(n in s for n in legacy_names), [n for n in legacy_names if n not in s]
    # the old name keeps its old meaning: per request
    assert s["afdserve:time_per_output_token_seconds_count"] == 1
    assert s["afdserve:time_per_output_token_seconds_sum"] == pytest.approx(0.03)
    assert s["afdserve:inter_token_latency_seconds_count"] == 3


def test_phases_of_a_request_that_never_ran_are_not_observed():
    m = _unit_metrics(False)
    m.on_finished(FinishedRequest("abort", 0.5, 7, 0, 16))  # aborted while queued
    s = _samples(m)
    assert s["vllm:e2e_request_latency_seconds_count"] == 1
    assert s["vllm:request_queue_time_seconds_count"] == 0
    assert s["vllm:request_decode_time_seconds_count"] == 0
    assert s["vllm:request_time_per_output_token_seconds_count"] == 0


def test_buckets_1_2_5():
    assert buckets_1_2_5(100) == (1, 2, 5, 10, 20, 50, 100)
    assert buckets_1_2_5(4) == (1, 2)
    assert buckets_1_2_5(2048)[-1] == 2000


@pytest.mark.parametrize("kv, label", [("auto", "float32"), ("int8", "int8"), ("fp8_e4m3", "fp8")])
def test_cache_config_info_names_the_kv_cache_dtype(kv, label):
    cfg = EngineConfig(model=MODEL, dtype="float32", kv_cache_dtype=kv)
    m = ServerMetrics(
        "m", cfg, state=lambda: EngineState(()), healthy=lambda: True, max_model_len=9
    )
    fams = {f.name: f for f in text_string_to_metric_families(generate_latest(m.registry).decode())}
    (info,) = fams["vllm:cache_config_info"].samples
    assert info.labels["cache_dtype"] == label
