"""/metrics in Prometheus text format, parsed with prometheus_client's parser: the counters move
by exactly what the requests did, the router spreads requests over the attention workers, and
the AFD metrics (transfers, FFN batches, busy time, configuration) are there."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import SERVED


def scrape(srv) -> dict[tuple[str, tuple], float]:
    with srv.http() as h:
        resp = h.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out = {}
    for fam in text_string_to_metric_families(resp.text):
        for s in fam.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            assert s.labels.get("model_name") == SERVED, s
            out[(s.name, labels)] = s.value
    return out


def total(m: dict, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in m.items() if n == name and want <= set(ls))


def test_counters_move_with_requests(afd_server):
    srv = afd_server
    srv.wait_idle()
    before = scrape(srv)
    prompts = [[11, 12, 13, 14, 15], [21, 22, 23], [31, 32, 33, 34]]
    with srv.held_engine() as gate, ThreadPoolExecutor(len(prompts)) as pool:

        def send(p):
            with srv.http() as h:
                return h.post(
                    "/v1/completions",
                    json={"model": SERVED, "prompt": p, "max_tokens": 6, "ignore_eos": True},
                ).json()

        futures = [pool.submit(send, p) for p in prompts]
        deadline = time.monotonic() + 30
        while srv.engine.state(afd=False).num_waiting < len(prompts):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        queued = scrape(srv)
        gate.set()
        results = [f.result() for f in futures]
    srv.wait_idle()
    after = scrape(srv)
    assert total(queued, "afdserve:num_requests_waiting") == len(prompts)
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

    assert moved("afdserve:prompt_tokens_total") == sum(len(p) for p in prompts)
    assert (
        moved("afdserve:generation_tokens_total")
        == sum(r["usage"]["completion_tokens"] for r in results)
        == 18
    )
    assert moved("afdserve:request_success_total", finished_reason="length") == 3
    assert moved("afdserve:time_to_first_token_seconds_count") == 3
    assert moved("afdserve:e2e_request_latency_seconds_count") == 3
    assert moved("afdserve:time_per_output_token_seconds_count") == 3
    assert moved("afdserve:inter_token_latency_seconds_count") == 3 * 5
    assert moved("afdserve:request_prompt_tokens_sum") == 12
    assert total(after, "afdserve:kv_cache_usage_perc") == 0.0
    assert total(after, "afdserve:num_requests_running") == 0.0
    assert total(after, "afdserve:healthy") == 1.0

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
