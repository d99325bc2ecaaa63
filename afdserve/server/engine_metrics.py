"""The engine's series at /metrics, read from `engine.state()` at scrape time.

A custom prometheus_client collector, so nothing in the engine's hot path touches
prometheus_client: vLLM's engine gauges and counters (`vllm:num_requests_running`,
`vllm:kv_cache_usage_perc`, `vllm:iteration_tokens_total`, `vllm:cache_config_info`, ...), their
legacy `afdserve:` copies when asked for, and AFD's own series (per-worker state, transfer
times and bytes, FFN batch sizes, busy and idle time). The request series, observed as tokens
reach the front, are in server/metrics.py, which lists every series.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from afdserve.afd.stats import AFDStatsSnapshot, EngineState, ExpertLoadState, merge_snapshots
from afdserve.config import EngineConfig

VLLM = "vllm:"
PREFIX = "afdserve:"
ENGINE = "0"
"""The `engine` label of every `vllm:` series: the whole bundle is one vLLM engine."""


class EngineCollector:
    """Reads `engine.state()` at scrape time and yields the engine and AFD metric families."""

    def __init__(
        self,
        model_name: str,
        config: EngineConfig,
        state: Callable[[], EngineState],
        healthy: Callable[[], bool],
        legacy_names: bool = False,
    ) -> None:
        self.model_name = model_name
        self.config = config
        self.state = state
        self.healthy = healthy
        self.legacy_names = legacy_names

    def collect(self) -> Iterator[Metric]:
        st = self.state()
        mn = self.model_name
        yield from self._vllm(st, mn)
        if self.legacy_names:
            yield from self._legacy(st, mn)
        yield _gauge(
            "healthy",
            "1 while the engine serves, 0 once a worker is down.",
            {(): float(self.healthy())},
            mn,
        )
        yield _counter(
            "requests_migrated",
            "Requests moved to another attention worker because theirs died or stalled.",
            {(): st.requests_migrated},
            mn,
        )
        yield _counter(
            "worker_restarts", "Dead workers started again.", {(): st.worker_restarts}, mn
        )
        yield _counter(
            "ffn_failovers",
            "Dead FFN workers whose experts the surviving FFN workers took.",
            {(): st.ffn_failovers},
            mn,
        )
        yield _gauge(
            "ffn_workers_down",
            "FFN workers out of service, their experts served by the survivors.",
            {(): float(st.ffn_workers_down)},
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
        yield _counter(
            "router_decisions",
            "Routing decisions by reason: load (no worker caches any of the prompt), prefix "
            "(to the worker with the longest cached prefix), balance (one with a longer "
            "prefix was too loaded).",
            {(reason,): n for reason, n in sorted(st.routing.items())},
            mn,
            ("reason",),
        )
        yield _counter(
            "kv_host_tier_blocks",
            "KV blocks copied to the host tier when the device evicted them (out) and back for "
            "a hit or a resume (in).",
            {
                ("out",): st.counter("kv_host_blocks_out"),
                ("in",): st.counter("kv_host_blocks_in"),
            },
            mn,
            ("direction",),
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

    def _vllm(self, st: EngineState, mn: str) -> Iterator[Metric]:
        yield _vgauge(
            "num_requests_running",
            "Number of requests in model execution batches.",
            st.num_running,
            mn,
        )
        yield _vgauge(
            "num_requests_waiting",
            "Number of requests waiting to be processed.",
            st.num_waiting,
            mn,
        )
        yield _vgauge(
            "kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", st.kv_usage, mn
        )
        yield _vgauge(
            "gpu_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage. DEPRECATED in vLLM: use "
            "vllm:kv_cache_usage_perc.",
            st.kv_usage,
            mn,
        )
        yield _vcounter(
            "prompt_tokens", "Number of prefill tokens processed.", st.counter("prompt_tokens"), mn
        )
        yield _vcounter(
            "generation_tokens",
            "Number of generation tokens processed.",
            st.counter("generation_tokens"),
            mn,
        )
        yield _vcounter(
            "num_preemptions",
            "Cumulative number of preemption from the engine.",
            st.counter("preemptions"),
            mn,
        )
        yield _vcounter(
            "prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.",
            st.counter("prefix_cache_queries"),
            mn,
        )
        yield _vcounter(
            "prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens.",
            st.counter("prefix_cache_hits"),
            mn,
        )
        steps = merge_snapshots(st.attention).step_tokens
        h = HistogramMetricFamily(
            VLLM + "iteration_tokens_total",
            "Histogram of number of tokens per engine_step: tokens each attention-worker step "
            "scheduled.",
            labels=["model_name", "engine"],
        )
        if steps is not None:
            h.add_metric([mn, ENGINE], steps.cumulative(), steps.sum)
        yield h
        cfg = self.config
        info = {
            "block_size": str(cfg.block_size),
            "cache_dtype": cfg.dtype if cfg.kv_cache_dtype == "auto" else cfg.kv_cache_dtype,
            "num_gpu_blocks": str(sum(w.kv_blocks_total for w in st.workers)),
            "num_cpu_blocks": str(sum(w.kv_host_blocks_total for w in st.workers)),
            "enable_prefix_caching": str(cfg.enable_prefix_caching),
        }
        g = GaugeMetricFamily(
            VLLM + "cache_config_info",
            "Information of the LLMEngine CacheConfig",
            labels=["model_name", "engine", *info],
        )
        g.add_metric([mn, ENGINE, *info.values()], 1.0)
        yield g

    def _legacy(self, st: EngineState, mn: str) -> Iterator[Metric]:
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
            "ffn_tokens",
            "Token rows each FFN worker computed (under expert parallelism, the rows it was sent).",
            {
                (str(i),): sum(h.sum for h in s.ffn_batch_tokens.values())
                for i, s in enumerate(st.ffn)
            },
            mn,
            ("worker",),
        )
        if st.experts is not None:
            yield from _experts(st.experts, mn)
        yield _counter(
            "afd_sync_timeouts",
            "Waits for a peer worker that passed the sync deadline (TransportTimeout).",
            {(): every.sync_timeouts},
            mn,
        )


def _experts(ex: ExpertLoadState, mn: str) -> Iterator[Metric]:
    """Expert parallelism: per-expert load, each layer's balance, EPLB's re-placements."""
    yield _counter(
        "expert_load",
        "(token, slot) pairs routed to each expert of each MoE layer, since start.",
        {
            (str(layer), str(e)): n
            for layer, row in enumerate(ex.pairs_total)
            if ex.imbalance[layer] is not None
            for e, n in enumerate(row)
        },
        mn,
        ("layer", "expert"),
    )
    yield _gauge(
        "ffn_expert_imbalance",
        "Max/mean FFN-worker load of each MoE layer over the EPLB window under the current "
        "placement (1 = balanced; the busiest worker sets the layer's pace).",
        {(str(layer),): v for layer, v in enumerate(ex.imbalance) if v is not None},
        mn,
        ("layer",),
    )
    yield _gauge(
        "eplb_placement_version", "Re-placements installed so far.", {(): ex.placement_version}, mn
    )
    yield _counter("eplb_replacements", "EPLB re-placements.", {(): ex.replacements}, mn)
    if ex.history:
        _, before, after = ex.history[-1]
        yield _gauge(
            "eplb_last_imbalance",
            "The worst MoE layer's max/mean FFN-worker load on the window of the latest "
            "re-placement, under the placement before it and the one it installed.",
            {("before",): before, ("after",): after},
            mn,
            ("placement",),
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


def _vgauge(name: str, doc: str, value: float, mn: str) -> Metric:
    g = GaugeMetricFamily(VLLM + name, doc, labels=["model_name", "engine"])
    g.add_metric([mn, ENGINE], float(value))
    return g


def _vcounter(name: str, doc: str, value: float, mn: str) -> Metric:
    c = CounterMetricFamily(VLLM + name, doc, labels=["model_name", "engine"])
    c.add_metric([mn, ENGINE], float(value))
    return c
