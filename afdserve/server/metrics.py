"""Prometheus metrics at /metrics: vLLM's names and meanings, AFD's own series, process and HTTP.

A dashboard, autoscaling rule or endpoint picker written for vLLM finds its series here: the
`vllm:` names, types, label names (`model_name`, `engine`) and histogram buckets of vLLM's v1
engine (vllm/v1/metrics/loggers.py of the 0.12 line). afdserve is one vLLM "engine"
(`engine="0"`): an AFD bundle's attention workers are summed into it, and their per-worker
numbers are under `afdserve:worker_*`. What only AFD has stays under `afdserve:`. The names
this module used before it spoke vLLM's (`afdserve:time_to_first_token_seconds` and the like)
come back with `legacy_names=True` (`afdserve serve --legacy-metric-names`); they are off by
default so that each quantity has one name, and `afdserve:time_per_output_token_seconds`, which
meant per request where vLLM's `time_per_output_token_seconds` means per token, is not in sight.

Every app gets its own `CollectorRegistry` (never prometheus_client's global one), so several
servers can live in one process (the tests start many) without clashing.

Request series, observed by the front as tokens reach the event loop (front clock), except
queue and prefill time, which the attention worker's scheduler measures on its own clock and
sends with a request's first token (`TokenEvent.queue_s`, `prefill_s`):

  vllm:time_to_first_token_seconds        histogram  arrival -> first token
  vllm:inter_token_latency_seconds        histogram  one sample per token after the first
  vllm:time_per_output_token_seconds      histogram  the same samples: vLLM's older name
                                                     (always per token; deprecated in 0.11,
                                                     hidden in 0.12), kept for the dashboards
                                                     that still query it
  vllm:request_time_per_output_token_seconds  histogram  per request: decode / (tokens - 1),
                                                     0 for a request of one token (as vLLM)
  vllm:e2e_request_latency_seconds        histogram  arrival -> end (any finish reason)
  vllm:request_queue_time_seconds         histogram  taken in by the scheduler -> first
                                                     scheduled (the front->worker hop and
                                                     the front's own queue are not in it)
  vllm:request_prefill_time_seconds       histogram  first scheduled -> first token
  vllm:request_decode_time_seconds        histogram  first token -> last token
  vllm:request_inference_time_seconds     histogram  prefill + decode
  vllm:request_prompt_tokens              histogram  prompt length
  vllm:request_generation_tokens          histogram  tokens generated
  vllm:request_params_max_tokens          histogram  max_tokens of each engine request
  vllm:request_params_n                   histogram  n of each prompt admitted
  vllm:request_success_total              counter    ended requests by finished_reason (stop,
                                                     length, abort, error)

The phase histograms are observed for a request that reached the phase's end (a request aborted
while queued has an e2e latency but no queue time). Engine series, read at scrape time from
`engine.state()` (a custom collector, so nothing in the engine's hot path touches
prometheus_client):

  vllm:num_requests_running / num_requests_waiting  gauges  summed over attention workers
  vllm:kv_cache_usage_perc                gauge      used / usable KV blocks of all workers
  vllm:gpu_cache_usage_perc               gauge      the same: vLLM's older name (deprecated
                                                     in 0.9.2, hidden in 0.11), still read by
                                                     older dashboards and endpoint pickers
  vllm:prompt_tokens_total                counter    prompt tokens prefilled (first time)
  vllm:generation_tokens_total            counter    tokens sampled
  vllm:num_preemptions_total              counter    sequences preempted
  vllm:prefix_cache_queries_total         counter    tokens of the requests admitted with the
                                                     prefix cache on (vLLM's: tokens queried)
  vllm:prefix_cache_hits_total            counter    of those, tokens whose KV the cache had
  vllm:iteration_tokens_total             histogram  tokens each attention-worker step
                                                     scheduled (prefill chunks, recomputes, 1
                                                     per decode); vLLM's engine step adds up
                                                     its outputs instead: a whole prompt at
                                                     its first token, plus the tokens sampled
  vllm:cache_config_info                  gauge = 1  block_size, cache_dtype, num_gpu_blocks
                                                     (usable blocks of all workers),
                                                     enable_prefix_caching, ... labels

and AFD's: afdserve:healthy, recomputed_tokens_total, request_rejected_total, router (requests
per worker, router_decisions_total by reason: load, prefix, balance) and
per-worker series, the AFD configuration, transfer times and bytes per layer and direction,
FFN batch tokens per (layer, microbatch), busy/idle time of attention and FFN workers, sync
timeouts. Process series (`process_*`, `python_gc_*`, `python_info`: this front process only)
and HTTP series (`http_requests_total{handler,method,status}`, `http_request_duration_seconds`
and the rest of prometheus-fastapi-instrumentator's defaults, as vLLM's server has them) carry
no `model_name`, as in vLLM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from afdserve.afd.stats import EngineState
from afdserve.config import EngineConfig
from afdserve.server.engine_metrics import ENGINE, PREFIX, VLLM, EngineCollector

FINISH_REASONS = ("stop", "length", "abort", "error")

# vLLM's buckets (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
PER_TOKEN_BUCKETS_S = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS_S = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
N_BUCKETS = (1, 2, 5, 10, 20)
HTTP_EXCLUDED = ["/metrics", "/health", "/load", "/ping", "/version", "/server_info"]
"""Routes vLLM leaves out of its HTTP metrics."""

# the legacy `afdserve:` series' own buckets
LATENCY_BUCKETS_S = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
TOKEN_LATENCY_BUCKETS_S = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
    0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


def buckets_1_2_5(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to `max_value` (vLLM's token-count buckets)."""
    out: list[int] = []
    scale = 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_value:
                return tuple(out)
            out.append(m * scale)
        scale *= 10


@dataclass(frozen=True)
class FinishedRequest:
    """One ended request, as the front saw it (what `RequestObserver.on_finished` gets)."""

    reason: str
    """stop, length, abort or error."""
    e2e_s: float
    prompt_tokens: int
    output_tokens: int
    max_tokens: int
    queue_s: float | None = None
    """Scheduler: taken in -> first scheduled (None if it never got a token)."""
    prefill_s: float | None = None
    """Scheduler: first scheduled -> first token."""
    decode_s: float | None = None
    """Front: first token -> last token (None without a token)."""

    @property
    def tpot_s(self) -> float | None:
        """Per request: decode / (output tokens - 1); None under two tokens."""
        if self.decode_s is None or self.output_tokens < 2:
            return None
        return self.decode_s / (self.output_tokens - 1)


class ServerMetrics:
    """The registry of one app, and the request hooks the AsyncEngine calls (RequestObserver)."""

    def __init__(
        self,
        model_name: str,
        config: EngineConfig,
        state: Callable[[], EngineState],
        healthy: Callable[[], bool],
        *,
        max_model_len: int,
        legacy_names: bool = False,
    ) -> None:
        """`max_model_len` (the served context) tops the token-count buckets, as in vLLM."""
        self.model_name = model_name
        self.legacy_names = legacy_names
        self.registry = r = CollectorRegistry()
        labels = ["model_name", "engine"]
        values = [model_name, ENGINE]
        lengths = buckets_1_2_5(max_model_len)

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(VLLM + name, doc, labels, buckets=buckets, registry=r).labels(*values)

        self.ttft = hist(
            "time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            TTFT_BUCKETS_S,
        )
        self.itl = hist(
            "inter_token_latency_seconds",
            "Histogram of inter-token latency in seconds.",
            PER_TOKEN_BUCKETS_S,
        )
        self.tpot_per_token = hist(
            "time_per_output_token_seconds",
            "Histogram of time per output token in seconds: one sample per token. DEPRECATED "
            "in vLLM: use vllm:inter_token_latency_seconds (the same samples).",
            PER_TOKEN_BUCKETS_S,
        )
        self.request_tpot = hist(
            "request_time_per_output_token_seconds",
            "Histogram of time_per_output_token_seconds per request: "
            "(last token - first token) / (generated tokens - 1), 0 for one token.",
            PER_TOKEN_BUCKETS_S,
        )
        self.e2e = hist(
            "e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.queue = hist(
            "request_queue_time_seconds",
            "Histogram of time spent in WAITING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.prefill = hist(
            "request_prefill_time_seconds",
            "Histogram of time spent in PREFILL phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.decode = hist(
            "request_decode_time_seconds",
            "Histogram of time spent in DECODE phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.inference = hist(
            "request_inference_time_seconds",
            "Histogram of time spent in RUNNING phase for request.",
            REQUEST_LATENCY_BUCKETS_S,
        )
        self.prompt_len = hist(
            "request_prompt_tokens", "Number of prefill tokens processed.", lengths
        )
        self.output_len = hist(
            "request_generation_tokens", "Number of generation tokens processed.", lengths
        )
        self.max_tokens = hist(
            "request_params_max_tokens", "Histogram of the max_tokens request parameter.", lengths
        )
        self.n = hist("request_params_n", "Histogram of the n request parameter.", N_BUCKETS)
        self._success = success = Counter(
            VLLM + "request_success",
            "Count of successfully processed requests.",
            [*labels, "finished_reason"],
            registry=r,
        )
        for why in FINISH_REASONS:  # every reason's series exists from the start, as in vLLM
            success.labels(*values, why)
        self.rejected = Counter(
            PREFIX + "request_rejected",
            "Requests refused at admission, by reason (queue_full: HTTP 429).",
            ["model_name", "reason"],
            registry=r,
        )
        self._legacy = _LegacyRequestMetrics(model_name, r) if legacy_names else None
        r.register(EngineCollector(model_name, config, state, healthy, legacy_names))
        # vLLM serves prometheus_client's default registry, which holds these three
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)

    def instrument(self, app) -> None:
        """HTTP request counts and latencies by route and status, into this registry: the
        middleware vLLM's server uses (prometheus-fastapi-instrumentator), with its
        exclusions. Call before the app starts."""
        from prometheus_fastapi_instrumentator import Instrumentator

        Instrumentator(excluded_handlers=HTTP_EXCLUDED, registry=self.registry).instrument(app)

    # RequestObserver
    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)
        if self._legacy is not None:
            self._legacy.ttft.observe(ttft_s)

    def on_token(self, itl_s: float) -> None:
        self.itl.observe(itl_s)
        self.tpot_per_token.observe(itl_s)
        if self._legacy is not None:
            self._legacy.itl.observe(itl_s)

    def on_finished(self, req: FinishedRequest) -> None:
        self._success.labels(self.model_name, ENGINE, req.reason).inc()
        self.e2e.observe(req.e2e_s)
        self.prompt_len.observe(req.prompt_tokens)
        self.output_len.observe(req.output_tokens)
        self.max_tokens.observe(req.max_tokens)
        if req.queue_s is not None:
            self.queue.observe(req.queue_s)
        if req.prefill_s is not None:
            self.prefill.observe(req.prefill_s)
        if req.decode_s is not None:
            self.decode.observe(req.decode_s)
            self.request_tpot.observe(req.tpot_s or 0.0)
            if req.prefill_s is not None:
                self.inference.observe(req.prefill_s + req.decode_s)
        if self._legacy is not None:
            self._legacy.finished(req)

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()

    def on_admitted(self, prompts: int, n: int) -> None:
        """A request admitted with `prompts` prompts of `n` choices each."""
        for _ in range(prompts):
            self.n.observe(n)


class _LegacyRequestMetrics:
    """The `afdserve:` request series as they were before the vLLM names (legacy_names)."""

    def __init__(self, model_name: str, r: CollectorRegistry) -> None:
        self.model_name = model_name
        label, mn = ["model_name"], [model_name]

        def hist(name: str, doc: str, buckets: tuple) -> Histogram:
            return Histogram(PREFIX + name, doc, label, buckets=buckets, registry=r).labels(*mn)

        self.ttft = hist(
            "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            LATENCY_BUCKETS_S,
        )
        self.itl = hist(
            "inter_token_latency_seconds",
            "Time between two consecutive generated tokens of one request.",
            TOKEN_LATENCY_BUCKETS_S,
        )
        self.tpot = hist(
            "time_per_output_token_seconds",
            "Per request: (last token time - first token time) / (output tokens - 1). "
            "DEPRECATED: per request, where vLLM's name means per token; use "
            "vllm:request_time_per_output_token_seconds.",
            TOKEN_LATENCY_BUCKETS_S,
        )
        self.e2e = hist(
            "e2e_request_latency_seconds",
            "Time from a request's arrival to its end (finished, stopped, aborted or failed).",
            LATENCY_BUCKETS_S,
        )
        self.prompt_len = hist(
            "request_prompt_tokens", "Prompt length of finished requests.", LENGTH_BUCKETS
        )
        self.output_len = hist(
            "request_generation_tokens", "Generated tokens of finished requests.", LENGTH_BUCKETS
        )
        self.success = Counter(
            PREFIX + "request_success",
            "Requests ended, by finished_reason (stop, length, abort, error).",
            [*label, "finished_reason"],
            registry=r,
        )

    def finished(self, req: FinishedRequest) -> None:
        self.success.labels(self.model_name, req.reason).inc()
        self.e2e.observe(req.e2e_s)
        self.prompt_len.observe(req.prompt_tokens)
        self.output_len.observe(req.output_tokens)
        if req.tpot_s is not None:
            self.tpot.observe(req.tpot_s)
