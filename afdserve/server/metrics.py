"""Prometheus metrics at /metrics: vLLM's engine metrics under `afdserve:`, plus AFD's own.

Every app gets its own `CollectorRegistry` (never prometheus_client's global one), so several
servers can live in one process (the tests start many) without clashing.

Two kinds of metric:
- request metrics the front end observes as tokens reach the event loop (histograms of time to
  first token, inter-token latency, time per output token, end-to-end latency, prompt and
  output lengths; finished requests by reason; rejected requests): prometheus_client objects;
- engine metrics read at scrape time from `engine.state()` (queues, KV usage, the schedulers'
  token counters, the router's choices and per-worker load, and the AFD recorders: per-layer
  transfer time and bytes in each direction, FFN batch tokens per (layer, microbatch), busy and
  idle time of attention and FFN workers, sync timeouts): a custom collector, so nothing in
  the engine's hot path touches prometheus_client.

Every sample carries `model_name` (the served model name), as vLLM's do.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from afdserve.afd.stats import AFDStatsSnapshot, EngineState, merge_snapshots
from afdserve.config import EngineConfig

PREFIX = "afdserve:"

LATENCY_BUCKETS_S = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
)
TOKEN_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.015,
    0.02,
    0.025,
    0.03,
    0.04,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    10.0,
)
LENGTH_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class ServerMetrics:
    """The registry of one app, and the request hooks the AsyncEngine calls (RequestObserver)."""

    def __init__(
        self,
        model_name: str,
        config: EngineConfig,
        state: Callable[[], EngineState],
        healthy: Callable[[], bool],
    ) -> None:
        self.model_name = model_name
        self.registry = CollectorRegistry()
        r, mn = self.registry, [model_name]
        label = ["model_name"]
        self.ttft = Histogram(
            PREFIX + "time_to_first_token_seconds",
            "Time from a request's arrival to its first generated token.",
            label,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        ).labels(*mn)
        self.itl = Histogram(
            PREFIX + "inter_token_latency_seconds",
            "Time between two consecutive generated tokens of one request.",
            label,
            buckets=TOKEN_LATENCY_BUCKETS_S,
            registry=r,
        ).labels(*mn)
        self.tpot = Histogram(
            PREFIX + "time_per_output_token_seconds",
            "Per request: (last token time - first token time) / (output tokens - 1).",
            label,
            buckets=TOKEN_LATENCY_BUCKETS_S,
            registry=r,
        ).labels(*mn)
        self.e2e = Histogram(
            PREFIX + "e2e_request_latency_seconds",
            "Time from a request's arrival to its end (finished, stopped, aborted or failed).",
            label,
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        ).labels(*mn)
        self.prompt_len = Histogram(
            PREFIX + "request_prompt_tokens",
            "Prompt length of finished requests.",
            label,
            buckets=LENGTH_BUCKETS,
            registry=r,
        ).labels(*mn)
        self.output_len = Histogram(
            PREFIX + "request_generation_tokens",
            "Generated tokens of finished requests.",
            label,
            buckets=LENGTH_BUCKETS,
            registry=r,
        ).labels(*mn)
        self.finished = Counter(
            PREFIX + "request_success",
            "Requests ended, by finished_reason (stop, length, abort, error).",
            [*label, "finished_reason"],
            registry=r,
        )
        self.rejected = Counter(
            PREFIX + "request_rejected",
            "Requests refused at admission, by reason (queue_full: HTTP 429).",
            [*label, "reason"],
            registry=r,
        )
        r.register(_EngineCollector(model_name, config, state, healthy))

    # RequestObserver
    def on_first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)

    def on_token(self, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def on_finished(
        self,
        reason: str,
        e2e_s: float,
        prompt_tokens: int,
        output_tokens: int,
        tpot_s: float | None,
    ) -> None:
        self.finished.labels(self.model_name, reason).inc()
        self.e2e.observe(e2e_s)
        self.prompt_len.observe(prompt_tokens)
        self.output_len.observe(output_tokens)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def on_rejected(self, reason: str) -> None:
        self.rejected.labels(self.model_name, reason).inc()


class _EngineCollector:
    """Reads `engine.state()` at scrape time and yields the engine and AFD metric families."""

    def __init__(
        self,
        model_name: str,
        config: EngineConfig,
        state: Callable[[], EngineState],
        healthy: Callable[[], bool],
    ) -> None:
        self.model_name = model_name
        self.config = config
        self.state = state
        self.healthy = healthy

    def collect(self) -> Iterator[Metric]:
        st = self.state()
        mn = self.model_name
        yield _gauge(
            "healthy",
            "1 while the engine serves, 0 once a worker is down.",
            {(): float(self.healthy())},
            mn,
        )
        yield _gauge(
            "num_requests_running",
            "Requests in the attention workers' batches.",
            {(): st.num_running},
            mn,
        )
        yield _gauge(
            "num_requests_waiting",
            "Requests queued, not yet admitted to a batch.",
            {(): st.num_waiting},
            mn,
        )
        yield _gauge(
            "kv_cache_usage_perc",
            "Fraction of all attention workers' KV blocks in use (0-1).",
            {(): st.kv_usage},
            mn,
        )
        yield _counter(
            "prompt_tokens",
            "Prompt tokens prefilled (first time only).",
            {(): st.counter("prompt_tokens")},
            mn,
        )
        yield _counter(
            "generation_tokens", "Tokens generated.", {(): st.counter("generation_tokens")}, mn
        )
        yield _counter(
            "num_preemptions",
            "Sequences preempted (KV freed, recomputed later).",
            {(): st.counter("preemptions")},
            mn,
        )
        yield _counter(
            "recomputed_tokens",
            "Tokens prefilled again after a preemption.",
            {(): st.counter("recomputed_tokens")},
            mn,
        )

        by_worker = {(str(w.index),): w for w in st.workers}
        wl = ("worker",)
        yield _counter(
            "router_requests",
            "Requests the router sent to each attention worker.",
            {k: w.routed for k, w in by_worker.items()},
            mn,
            wl,
        )
        yield _gauge(
            "worker_load",
            "Router load of each attention worker: KV tokens held plus tokens queued for prefill.",
            {k: w.load_score for k, w in by_worker.items()},
            mn,
            wl,
        )
        yield _gauge(
            "worker_num_requests_running",
            "Running requests per attention worker.",
            {k: w.num_running for k, w in by_worker.items()},
            mn,
            wl,
        )
        yield _gauge(
            "worker_num_requests_waiting",
            "Waiting requests per attention worker.",
            {k: w.num_waiting for k, w in by_worker.items()},
            mn,
            wl,
        )
        yield _gauge(
            "worker_kv_cache_usage_perc",
            "KV block usage per attention worker (0-1).",
            {k: w.kv_usage for k, w in by_worker.items()},
            mn,
            wl,
        )

        cfg = self.config
        ratio = cfg.attention_workers / cfg.ffn_workers if cfg.is_afd else 0.0
        yield _gauge(
            "afd_attention_ratio",
            "Configured attention workers per FFN worker (r/m); 0 in aggregated mode.",
            {(): ratio},
            mn,
        )
        yield _gauge(
            "afd_microbatches",
            "Configured microbatches per attention-worker step.",
            {(): cfg.microbatches},
            mn,
        )
        yield _gauge(
            "afd_attention_workers",
            "Configured attention workers (replicas when aggregated).",
            {(): cfg.attention_workers},
            mn,
        )
        yield from self._afd(st, mn)

    def _afd(self, st: EngineState, mn: str) -> Iterator[Metric]:
        every = merge_snapshots([*st.attention, *st.ffn])
        h = HistogramMetricFamily(
            PREFIX + "afd_transfer_seconds",
            "Seconds in transport.send per activation, per layer: a2f (attention -> FFN, "
            "ACTIVATION_TRANSFER) and f2a (FFN -> attention, ACTIVATION_RESULT).",
            labels=["model_name", "direction", "layer"],
        )
        b = CounterMetricFamily(
            PREFIX + "afd_transfer_bytes",
            "Activation bytes sent, per direction and layer.",
            labels=["model_name", "direction", "layer"],
        )
        for (direction, layer), hist in sorted(every.transfer_seconds.items()):
            labels = [mn, direction, str(layer)]
            h.add_metric(labels, hist.cumulative(), hist.sum)
            b.add_metric(labels, every.transfer_bytes.get((direction, layer), 0))
        yield h
        yield b
        f = HistogramMetricFamily(
            PREFIX + "ffn_batch_tokens",
            "Tokens per FFN call, per (layer, microbatch): in AFD, gathered from every "
            "attention worker; in aggregated mode, one worker's.",
            labels=["model_name", "layer", "microbatch"],
        )
        for (layer, mb), hist in sorted(every.ffn_batch_tokens.items()):
            f.add_metric([mn, str(layer), str(mb)], hist.cumulative(), hist.sum)
        yield f
        for role, snaps in (("attention", st.attention), ("ffn", st.ffn)):
            yield from _busy_idle(role, snaps, mn)
        yield _counter(
            "afd_sync_timeouts",
            "Waits for a peer worker that passed the sync deadline (TransportTimeout).",
            {(): every.sync_timeouts},
            mn,
        )


_ACTIVE = {
    "attention": "its time inside steps",
    "ffn": "its loop's time (waiting for work included)",
}


def _busy_idle(role: str, snaps: tuple[AFDStatsSnapshot, ...], mn: str) -> Iterator[Metric]:
    wl = ("worker",)
    yield _gauge(
        f"{role}_busy_fraction",
        f"Share of {_ACTIVE[role]} each {role} worker computes rather than waits for its peer, "
        "since start: busy / (busy + idle).",
        {(str(i),): s.busy_fraction for i, s in enumerate(snaps)},
        mn,
        wl,
    )
    yield _counter(
        f"{role}_busy_seconds",
        f"Seconds each {role} worker computed ({_ACTIVE[role]} minus its waits).",
        {(str(i),): s.busy_s for i, s in enumerate(snaps)},
        mn,
        wl,
    )
    yield _counter(
        f"{role}_idle_seconds",
        f"Seconds each {role} worker waited for its peer (or, for the FFN, for any work).",
        {(str(i),): s.idle_s for i, s in enumerate(snaps)},
        mn,
        wl,
    )


def _gauge(name: str, doc: str, values: dict, mn: str, labels: tuple[str, ...] = ()) -> Metric:
    g = GaugeMetricFamily(PREFIX + name, doc, labels=["model_name", *labels])
    for key, v in values.items():
        g.add_metric([mn, *key], float(v))
    return g


def _counter(name: str, doc: str, values: dict, mn: str, labels: tuple[str, ...] = ()) -> Metric:
    c = CounterMetricFamily(PREFIX + name, doc, labels=["model_name", *labels])
    for key, v in values.items():
        c.add_metric([mn, *key], float(v))
    return c
