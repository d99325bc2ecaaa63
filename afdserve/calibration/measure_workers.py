"""Worker-process measurements: a real 1A1F engine of worker processes (`MultiProcessEngine`)
over a multi-process transport, its decode steps (M = 1 and M = 2) and prefill steps timed from
the front. `fit_workers` turns them into the transport's worker-process coefficients.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np

from afdserve.calibration.grid import ProfileGrid
from afdserve.calibration.timing import Timer, blocks_for

WORKER_WINDOW_STEPS = 8
"""Steps per timed window of a worker-process engine (timed from the front, so a window
averages out when a step's token events reach the front)."""
WORKER_DEADLINE_S = 120.0


def worker_step_points(
    model: str,
    transport: str,
    timer: Timer,
    grid: ProfileGrid,
    device: str,
    dtype: str,
    threads: int | None,
    pin_workers: bool = False,
) -> tuple[list[tuple], list[tuple], list[tuple]]:
    """Decode steps of a real 1A1F engine in worker processes (M = 1) over `transport`, with N
    sequences for N in the grid: (N, mean context, ms per step); then prefill steps of S
    prompts of the grid's longest chunk, S in the grid's prefill_sequences: (S, P, ms). A step is timed from the
    front, which receives every step's token events: after the prefill and a warm-up, the
    median of `repeats` (at least 5) windows of WORKER_WINDOW_STEPS steps, each the time the
    slowest sequence took to gain that many tokens (every sequence gains one per step).

    The median, not the fastest window as for the in-process points: three processes on few
    cores step at a rate that wanders with where the scheduler puts them and how fast a
    sleeping peer wakes, not only when other load disturbs them, and a real run (`generate`
    of many steps) pays the typical rate; the fastest short window is a rare one.

    The prompts are as long as the grid's shortest decode context: a serving-like context
    (measured: at 8-token prompts the fitted extra under-predicted real 64-token runs by 20-30%,
    at 64 it did not)."""
    from afdserve.config import EngineConfig
    from afdserve.launch.multiproc import MultiProcessEngine

    prompt = min(grid.decode_contexts)
    warm = max(timer.warmup, 2)
    windows = max(timer.repeats, 5)
    decode = warm + windows * WORKER_WINDOW_STEPS
    chunk = max(grid.prefill_chunks)
    prefills = sorted({(s, chunk) for s in grid.prefill_sequences})
    max_len = max(prompt + decode, chunk + 1) + 8
    n_max = max(max(grid.step_batches), max(s for s, _ in prefills))
    cfg = EngineConfig(
        model=model,
        mode="afd",
        attention_workers=1,
        microbatches=1,
        transport=transport,
        max_num_seqs=n_max,
        max_num_batched_tokens=max(2048, n_max * prompt, max(s * c for s, c in prefills)),
        max_model_len=max_len,
        device=device,
        dtype=dtype,
        num_kv_blocks=n_max * blocks_for(max_len, 16) + 2,
        worker_threads=threads or 1,
        pin_workers=pin_workers,
    )
    engine = MultiProcessEngine(cfg)
    try:
        out = _worker_decode_points(engine, grid, prompt, warm, windows, transport)
        pre = [
            (S, P, _worker_prefill_ms(engine, S, P, max(timer.repeats, 3), transport))
            for S, P in prefills
        ]
    finally:
        engine.close()
    engine = MultiProcessEngine(dataclasses.replace(cfg, microbatches=2))
    try:
        out2 = _worker_decode_points(engine, grid, prompt, warm, windows, transport)
    finally:
        engine.close()
    return out, pre, out2


def _worker_decode_points(
    engine: Any, grid: ProfileGrid, prompt: int, warm: int, windows: int, transport: str
) -> list[tuple]:
    """(N, mean context, ms per step) of decode steps with N sequences, N in the grid."""
    from afdserve.types import SamplingParams

    decode = warm + windows * WORKER_WINDOW_STEPS
    out = []
    for N in grid.step_batches:
        params = SamplingParams(max_tokens=1 + decode, temperature=0.0, ignore_eos=True)
        counts = {f"w{N}-{i}": 0 for i in range(N)}
        for rid in counts:
            engine.add_request(rid, list(range(3, 3 + prompt)), params)
        deadline = time.monotonic() + WORKER_DEADLINE_S

        def until(tokens: int, counts=counts, deadline=deadline) -> float:
            """Step the front until every sequence has `tokens` tokens; the time then."""
            while min(counts.values()) < tokens:
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"worker-process steps over {transport}: no progress within "
                        f"{WORKER_DEADLINE_S:.0f} s"
                    )
                for ev in engine.step(timeout_s=0.05):
                    if ev.request_id in counts:
                        counts[ev.request_id] += 1
            return time.perf_counter()

        base = 1 + warm  # the prefill's token, then the warm-up steps
        t = until(base)
        per_step = []
        for k in range(1, windows + 1):
            t_next = until(base + k * WORKER_WINDOW_STEPS)
            per_step.append((t_next - t) / WORKER_WINDOW_STEPS)
            t = t_next
        until(1 + decode)  # finished: the KV blocks are free for the next batch
        ctx = prompt + base + windows * WORKER_WINDOW_STEPS / 2.0
        out.append((N, ctx, float(np.median(per_step)) * 1e3))
    return out


def _worker_prefill_ms(engine: Any, seqs: int, prompt: int, repeats: int, transport: str) -> float:
    """One prefill step of `seqs` prompts of `prompt` tokens (one token generated each) over
    worker processes, timed from the front from submission to the last first token: the
    median of `repeats` after one warm-up."""
    from afdserve.types import SamplingParams

    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    times = []
    for k in range(repeats + 1):
        ids = {f"p{seqs}x{prompt}-{k}-{i}" for i in range(seqs)}
        deadline = time.monotonic() + WORKER_DEADLINE_S
        t0 = time.perf_counter()
        for i, rid in enumerate(sorted(ids)):
            engine.add_request(rid, [3 + (i + j) % 97 for j in range(prompt)], params)
        while ids:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"worker-process prefill over {transport}: no progress within "
                    f"{WORKER_DEADLINE_S:.0f} s"
                )
            for ev in engine.step(timeout_s=0.05):
                if ev.finished:
                    ids.discard(ev.request_id)
        if k:  # the first is the warm-up
            times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3
