"""Serving deployments on a given number of instances, built from simulated units:

- AFD: `bundles` rA-1F bundles side by side;
- aggregated: `instances` replicas, each running attention and FFN itself, continuous batching
  with chunked prefill (the usual vLLM-style deployment);
- prefill/decode split: a pool of prefill instances (chunked prefill, first token) and a pool of
  decode instances, the prompt's KV moved between them.

Requests are routed round-robin in arrival order (decode instances: in order of KV arrival).
Units do not interact otherwise, so each is simulated on its own share and the runs are
summarised together; simulating every unit costs about as much as one unit with all the load.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from afdserve.errors import UserInputError
from afdserve.sim.closed_loop import can_bulk, simulate_closed_loop
from afdserve.sim.config import BundleConfig
from afdserve.sim.costs import SimCosts
from afdserve.sim.engine import simulate
from afdserve.sim.metrics import SLO, SimReport, summarize
from afdserve.sim.replica import simulate_reference
from afdserve.sim.requests import RequestSet
from afdserve.sim.run import SimRun

ENGINES: tuple[str, ...] = ("fast", "reference")
"""`fast`: the step engine (`sim.engine`, or the bulk closed loop); `reference`: the replica that
drives the runtime's scheduler (`sim.replica`), slower, open loop only."""


def run_unit(
    costs: SimCosts,
    config: BundleConfig,
    requests: RequestSet,
    *,
    closed_loop: bool = False,
    max_steps: int | None = None,
    timeline_steps: int = 0,
    label: str = "",
    engine: str = "fast",
) -> SimRun:
    """Simulate one unit; a closed loop with no prefill and no KV limit takes the bulk path.
    `engine="reference"` runs the reference replica instead (every request to its end)."""
    if engine not in ENGINES:
        raise UserInputError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "reference":
        if requests.cached_len is not None and requests.cached_len.any():
            raise UserInputError("the reference engine runs without a prefix cache")
        if closed_loop or max_steps is not None or timeline_steps:
            raise UserInputError(
                "the reference engine runs open-loop requests to completion: no closed loop, "
                "step limit or timeline"
            )
        return simulate_reference(costs, config, requests, label=label)
    if closed_loop and can_bulk(config, requests):
        return simulate_closed_loop(
            costs, config, requests, max_steps=max_steps, timeline_steps=timeline_steps, label=label
        )
    return simulate(
        costs,
        config,
        requests,
        stop_when_unfilled=closed_loop,
        max_steps=max_steps,
        timeline_steps=timeline_steps,
        label=label,
    )


def _split(requests: RequestSet, units: int) -> list[RequestSet]:
    if units < 1:
        raise UserInputError(f"need at least one unit, got {units}")
    idx = np.arange(len(requests))
    return [requests.subset(idx[u::units]) for u in range(units) if idx[u::units].size]


def run_afd(
    costs: SimCosts,
    config: BundleConfig,
    requests: RequestSet,
    *,
    bundles: int = 1,
    devices: float | None = None,
    slo: SLO | None = None,
    timeline_steps: int = 0,
    label: str = "afd",
) -> tuple[SimReport, list[SimRun]]:
    """`bundles` identical bundles (rA-1F each) sharing the requests round-robin."""
    t0 = time.perf_counter()
    runs = [
        run_unit(costs, config, part, timeline_steps=timeline_steps if u == 0 else 0, label=label)
        for u, part in enumerate(_split(requests, bundles))
    ]
    report = summarize(runs, label=label, devices=devices, slo=slo, wall_s=time.perf_counter() - t0)
    return report, runs


def run_aggregated(
    costs: SimCosts,
    requests: RequestSet,
    *,
    instances: int,
    slots: int,
    token_budget: int = 2048,
    microbatches: int = 1,
    kv_capacity_tokens: int | None = None,
    devices: float | None = None,
    slo: SLO | None = None,
    label: str = "aggregated",
) -> tuple[SimReport, list[SimRun]]:
    """`instances` aggregated replicas (each attention + FFN, continuous batching)."""
    t0 = time.perf_counter()
    config = BundleConfig(
        attention_workers=1,
        slots=slots,
        microbatches=microbatches,
        pipeline="colocated",
        prefill="chunked",
        token_budget=token_budget,
        kv_capacity_tokens=kv_capacity_tokens,
    )
    runs = [simulate(costs, config, part, label=label) for part in _split(requests, instances)]
    report = summarize(runs, label=label, devices=devices, slo=slo, wall_s=time.perf_counter() - t0)
    return report, runs


def run_pd_split(
    prefill_costs: SimCosts,
    decode_costs: SimCosts,
    requests: RequestSet,
    *,
    prefill_instances: int,
    decode_instances: int,
    prefill_slots: int,
    decode_slots: int,
    token_budget: int = 2048,
    kv_capacity_tokens: int | None = None,
    devices: float | None = None,
    slo: SLO | None = None,
    label: str = "pd-split",
    decode_config: BundleConfig | None = None,
) -> tuple[SimReport, list[SimRun]]:
    """Prefill pool then decode pool. The first token comes from the prefill instance; the KV
    (prompt + first token) then moves to a decode instance (`kv_transfer_*` costs of
    `decode_costs`), which decodes the remaining output_len - 1 tokens. `decode_config`: what a
    decode instance is (default: one colocated instance of `decode_slots`); an AFD bundle
    (rA-1F, microbatch pipeline, no prefill) makes this AFD decode plus a prefill pool, the
    KV then going to one of its attention workers."""
    t0 = time.perf_counter()
    N = len(requests)
    pre_cfg = BundleConfig(
        attention_workers=1,
        slots=prefill_slots,
        pipeline="colocated",
        prefill="chunked",
        token_budget=token_budget,
    )
    ones = np.ones(N, dtype=np.int64)
    prefill_reqs = RequestSet(
        requests.prompt_len,
        ones,
        requests.arrival_s,
        name=requests.name,
        cached_len=requests.cached_len,
    )
    idx = np.arange(N)
    first = np.full(N, np.nan)
    pre_runs: list[tuple[np.ndarray, SimRun]] = []
    for u in range(prefill_instances):
        part = idx[u::prefill_instances]
        if part.size == 0:
            continue
        run = simulate(prefill_costs, pre_cfg, prefill_reqs.subset(part), label=label)
        first[part] = run.first_token
        pre_runs.append((part, run))
    if np.isnan(first).any():
        raise RuntimeError("prefill pool left requests without a first token")
    # decode pool: requests with more than one token, in order of KV arrival
    out = np.asarray(requests.output_len)
    prompt = np.asarray(requests.prompt_len)
    more = np.flatnonzero(out > 1)
    finish = first.copy()  # one-token requests end at their first token
    dec_runs: list[SimRun] = []
    gaps: list[np.ndarray] = []
    if more.size:
        kv_ms = (
            decode_costs.kv_transfer_ms_per_token * (prompt[more] + 1)
            + decode_costs.kv_transfer_beta_ms
        )
        ready = first[more] + kv_ms
        order = np.argsort(ready, kind="stable")
        more, ready = more[order], ready[order]
        dec_cfg = decode_config or BundleConfig(
            attention_workers=1,
            slots=decode_slots,
            pipeline="colocated",
            prefill="none",
            kv_capacity_tokens=kv_capacity_tokens,
        )
        if dec_cfg.prefill != "none":
            raise UserInputError("a decode instance of a prefill/decode split does no prefill")
        for u in range(decode_instances):
            sel = np.arange(u, more.size, decode_instances)
            if sel.size == 0:
                continue
            q = more[sel]
            reqs = RequestSet(prompt[q] + 1, out[q] - 1, ready[sel] / 1e3, name=requests.name)
            run = simulate(decode_costs, dec_cfg, reqs, label=label)
            finish[q] = run.finish
            gaps.append(run.first_token - first[q])
            # latencies are taken per request below, from the prefill side's arrays
            run = dataclasses.replace(
                run,
                arrival=np.zeros(0),
                first_token=np.zeros(0),
                finish=np.zeros(0),
                prompt_len=np.zeros(0, dtype=np.int64),
                output_len=np.zeros(0, dtype=np.int64),
                warm=np.zeros(0, dtype=bool),
            )
            dec_runs.append(run)
    # the prefill runs carry every request's end-to-end times
    runs = [
        dataclasses.replace(run, first_token=first[part], finish=finish[part], output_len=out[part])
        for part, run in pre_runs
    ]
    if gaps:
        g = np.concatenate(gaps)
        g = g[np.isfinite(g)]
        dec_runs[0].extra_itl = (g, np.ones_like(g))
    runs += dec_runs
    report = summarize(runs, label=label, devices=devices, slo=slo, wall_s=time.perf_counter() - t0)
    return report, runs
