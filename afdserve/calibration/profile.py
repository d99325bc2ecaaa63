"""Calibration: `afdserve profile` times the runtime's own kernels and fits the cost coefficients.

Measured, each on the model's own parts (`afdserve.launch.local.load_model`) and averaged over
its layers:

- attention sub-block (`AttentionPart.layers[l]`), decode: a grid of batch size b x context c
  over a paged KV cache; fitted t = alpha_A * (b * c) + beta_A (context tokens read);
- attention sub-block, prefill: s sequences each prefilling a chunk of n tokens after d cached
  ones; with alpha_A and beta_A fixed, the rest is fitted (non-negative least squares on absolute
  residuals, so that budget-sized steps fit best) as prefill_token_ms * s n + prefill_pair_ms *
  s (n d + n (n + 1) / 2);
- FFN sub-block (`FFNPart(layer, h)`, dense or MoE) over token counts: t = alpha_F * n + beta_F;
- the per-step work outside the layers: the runtime's own `Engine.step()` (one attention
  worker, M = 1) with N sequences decoding at a short context, minus the fitted layer costs
  L * (attention + FFN); fitted t = step_alpha * N + step_beta (scheduling, metadata,
  embedding, LM head, sampling, bookkeeping). The same with an in-process AFD engine (1A1F)
  gives `step.afd_beta`, the extra per-step cost of AFD's step machinery (thread dispatch,
  SYNC) beyond the per-layer transfers; the work that grows with a step's prefill tokens
  (attention metadata, embedding, rotary tables for one sequence of n tokens) gives
  `step.prefill_token_ms`;
- transports: the in-process `local` transport (a message to a thread and back, halved: what a
  hand-over between the attention and FFN threads costs), a plain tensor copy (`copy`), and the
  multi-process backends from `afdserve.transport.registry` where they exist (two endpoints in
  this process; skipped with the reason on any failure or past a deadline). The one named by
  `comm_from` gives the top-level `comm` coefficients (per token, one way);
- worker processes: for each multi-process transport timed above, a real 1A1F engine of worker
  processes joined by it (`MultiProcessEngine`, M = 1) decodes N sequences for N in the grid,
  timed from the front as the median over windows of a few steps; minus the
  in-process prediction of the same step (layers + `step`) and the fitted transfers, the
  residual, fitted as a line in N, is that transport's `afd_alpha` (per sequence) and
  `afd_beta` (`transport.<name>.*`): what the control plane, the per-frame transport work and
  the extra processes add to every step. The same engine then times prefill steps (S prompts
  of the grid's longest chunk, S in `prefill_sequences`, submission to the last first token);
  their residual over the in-process prediction and those two, per prefill token, is
  `afd_prefill_token_ms`. The simulator uses them (`afd_beta` instead of `step.afd_beta`,
  `afd_alpha` on top of `step.alpha`, `afd_prefill_token_ms` on top of
  `step.prefill_token_ms`) for runs over that transport. Last, an engine with M = 2 times the
  same decode steps; what a second microbatch costs beyond what the simulator says (median over
  N >= 2 of the measured minus the simulated M=2 - M=1 difference) is `afd_microbatch_ms`,
  charged per step for every microbatch beyond the first.

Each time is the minimum of `repeats` runs after `warmup` runs (CUDA: synchronised): on a shared
machine other load only ever adds time, so the least-disturbed run is the reproducible figure
(`sim-validate runtime` takes the real runs the same way). The result
is the planner's profile JSON (docs/planner.md 3.2) plus the simulator's keys (`prefill`,
`step`) and everything measured (`transport`, `points`, `grid`), so `StageCosts.from_profile`
and `SimCosts.from_profile` both read it. torch is imported inside the functions only.

Here: the two entry points that measure (`run_profile`, `remeasure_worker_extras`) and the
check of a written profile. What is timed over is `grid`, how `timing`; the measurements are
`measure_in_process`, `measure_transports` and `measure_workers`, their fits `fit_in_process` and
`fit_workers`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np

from afdserve.calibration.fit_in_process import fit_layers, fit_step
from afdserve.calibration.fit_workers import worker_extras
from afdserve.calibration.grid import ProfileGrid
from afdserve.calibration.measure_in_process import (
    attention_decode_points,
    attention_prefill_points,
    engine_step_points,
    ffn_points,
    step_token_points,
)
from afdserve.calibration.measure_transports import time_transport
from afdserve.calibration.measure_workers import worker_step_points
from afdserve.calibration.timing import Timer
from afdserve.errors import UserInputError

TRANSPORTS: tuple[str, ...] = ("local", "copy", "shm", "tcp")
WORKER_TRANSPORTS: tuple[str, ...] = ("shm", "tcp")
"""Transports whose worker-process step overhead the profile measures (`worker_steps`)."""


def run_profile(
    model: str,
    *,
    device: str = "cpu",
    dtype: str = "auto",
    grid: ProfileGrid = ProfileGrid(),
    transports: Sequence[str] = TRANSPORTS,
    comm_from: str = "local",
    threads: int | None = None,
    rounds: int = 1,
    worker_steps: bool = True,
    pin_workers: bool = False,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Profile `model` (a directory or builtin:NAME) on `device`; returns the profile object.

    `worker_steps`: also time a real worker-process engine over each timed multi-process
    transport (a few seconds each: the workers start and load the model); `pin_workers` pins
    its worker k to core k (as `EngineConfig.pin_workers`: time it the way it will run).

    With `rounds` > 1 the whole grid is measured that many times, one round after another, and
    each point keeps its fastest round: spreading the repeats over time keeps a burst of other
    load on a shared machine from spoiling a point."""
    import torch

    from afdserve.launch.local import load_model, require_device

    for t in transports:
        if t not in TRANSPORTS:
            raise UserInputError(f"unknown transport {t!r} to profile; choose from {TRANSPORTS}")
    if comm_from not in transports:
        raise UserInputError(f"--comm-from {comm_from!r} must be one of the profiled transports")
    require_device(device)
    if threads is not None:
        if threads < 1:
            raise UserInputError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    t_start = time.perf_counter()
    m = load_model(model, dtype, device)
    cfg = m.config
    max_ctx = cfg.max_position_embeddings
    for name, vals in (
        ("decode_contexts", grid.decode_contexts),
        ("prefill_chunks", grid.prefill_chunks),
    ):
        if max(vals) + max(grid.prefill_starts) > max_ctx:
            raise UserInputError(
                f"profile grid {name} goes beyond the model's {max_ctx}-token context"
            )
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise UserInputError(f"rounds must be an integer >= 1, got {rounds!r}")
    timer = Timer(device, grid.repeats, grid.warmup)
    note = progress or (lambda _s: None)
    worker_names = [t for t in transports if t in WORKER_TRANSPORTS] if worker_steps else []
    worker_rounds: dict[str, list[list[tuple]]] = {}
    worker_skipped: dict[str, str] = {}
    with torch.inference_mode():
        measured: list[tuple[list[tuple], ...]] = []
        for k in range(rounds):
            tag = f" (round {k + 1}/{rounds})" if rounds > 1 else ""
            note("attention (decode)" + tag)
            a_pts = attention_decode_points(m, timer, grid, device)
            note("attention (prefill)" + tag)
            p_pts = attention_prefill_points(m, timer, grid, device)
            note("ffn" + tag)
            f_pts = ffn_points(m, timer, grid, device)
            note("per-token step work" + tag)
            t_pts = step_token_points(m, timer, grid, device)
            note("engine steps (aggregated, AFD)" + tag)
            g_pts = engine_step_points(m, model, "aggregated", timer, grid, device)
            d_pts = engine_step_points(m, model, "afd", timer, grid, device)
            measured.append((a_pts, p_pts, f_pts, t_pts, g_pts, d_pts))
            for name in worker_names:
                note(f"worker-process steps over {name}" + tag)
                try:
                    pts = worker_step_points(
                        model, name, timer, grid, device, dtype, threads, pin_workers
                    )
                except Exception as exc:  # workers that cannot start here: say why, go on
                    worker_skipped[name] = f"{type(exc).__name__}: {exc}"
                else:
                    worker_rounds.setdefault(name, []).append(pts)  # decode, prefill, M=2
        attn_pts, pre_pts, ffn_pts, tok_pts, agg_pts, afd_pts = (
            _fastest([r[i] for r in measured]) for i in range(6)
        )
        transport: dict[str, Any] = {}
        for name in transports:
            note(f"transport {name}")
            transport[name] = time_transport(name, m, timer, grid, device)
    attn_fit, ffn_fit, prefill, warnings = fit_layers(attn_pts, ffn_pts, pre_pts)
    comm = transport[comm_from]
    if "alpha" not in comm:
        raise UserInputError(f"transport {comm_from!r} could not be timed: {comm.get('skipped')}")
    step = fit_step(agg_pts, afd_pts, tok_pts, attn_fit, ffn_fit, comm, cfg.num_hidden_layers)
    threads_used = torch.get_num_threads()
    data = {
        "source": "measured",
        "model": model,
        "device": _device_name(device, threads_used),
        "units": "ms",
        "num_layers": cfg.num_hidden_layers,
        "attention": attn_fit.to_dict(),
        "ffn": ffn_fit.to_dict(),
        "comm": {
            "alpha": comm["alpha"],
            "beta": comm["beta"],
            "r2": comm["r2"],
            "max_rel_err": comm["max_rel_err"],
            "scales_with": "B",
        },
        "prefill": prefill,
        "step": step,
        "kv_transfer": {"alpha": 0.0, "beta": 0.0},
        "comm_transport": comm_from,
        "transport": transport,
        "dtype": str(m.dtype).replace("torch.", ""),
        "torch_threads": threads_used,
        "torch_version": torch.__version__,
        "rounds": rounds,
        "grid": asdict(grid),
        "points": {
            "attention_decode": [list(p) for p in attn_pts],
            "attention_prefill": [list(p) for p in pre_pts],
            "ffn": [list(p) for p in ffn_pts],
            "step_tokens": [list(p) for p in tok_pts],
            "engine_step_aggregated": [list(p) for p in agg_pts],
            "engine_step_afd": [list(p) for p in afd_pts],
        },
        "units_note": (
            "ms per layer: attention.alpha per context token read, ffn.alpha per token, "
            "comm.alpha per token one way; step: ms per step per attention worker "
            "(alpha per sampling sequence)"
        ),
        "warnings": warnings,
        "wall_s": time.perf_counter() - t_start,
    }
    for name in worker_names:  # fitted against the profile's own (in-process) fits above
        if name in worker_skipped:
            transport[name]["worker_step_skipped"] = worker_skipped[name]
        elif "alpha" in transport[name]:
            pts, pre, pts2 = (_median_points([r[i] for r in worker_rounds[name]]) for i in range(3))
            transport[name].update(worker_extras(data, name, pts, pre, pts2))
    return data


def remeasure_worker_extras(
    profile: dict[str, Any],
    model: str,
    transport: str,
    *,
    grid: ProfileGrid = ProfileGrid(),
    device: str = "cpu",
    dtype: str = "auto",
    threads: int | None = 1,
    pin_workers: bool = False,
) -> dict[str, Any]:
    """Time worker-process steps over `transport` again now and fit them against the
    in-process fits already in `profile`: the `transport.<name>` keys `run_profile` writes
    (the coefficients of `worker_extras` and their points). For comparisons
    with real runs made right after (`validate_runtime(interleave=True)`): on a shared machine
    the multi-process step rate drifts over minutes, so the profile's own timing can be from a
    different regime than the runs."""
    timed = profile.get("transport", {}).get(transport) or {}
    if "alpha" not in timed:
        raise UserInputError(f"the profile has no timing of transport {transport!r}")

    timer = Timer(device, grid.repeats, grid.warmup)
    pts, pre, pts2 = worker_step_points(
        model, transport, timer, grid, device, dtype, threads, pin_workers
    )
    return {**timed, **worker_extras(profile, transport, pts, pre, pts2)}


def _fastest(rounds: list[list[tuple]]) -> list[tuple]:
    """Per point (same grid in every round), the round with the smallest time (last field)."""
    return [min(pts, key=lambda p: p[-1]) for pts in zip(*rounds, strict=True)]


def _median_points(rounds: list[list[tuple]]) -> list[tuple]:
    """Per point, the median time over the rounds (for worker-process steps: see
    `measure_workers.worker_step_points` on why the typical rate, not the fastest)."""
    return [
        (*pts[0][:-1], float(np.median([p[-1] for p in pts]))) for pts in zip(*rounds, strict=True)
    ]


def _device_name(device: str, threads: int) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {threads} torch threads)"


def check_profile(data: dict[str, Any]) -> None:
    """The written profile must read back through the planner and the simulator."""
    from afdserve.planner.costs import StageCosts
    from afdserve.sim.costs import SimCosts

    StageCosts.from_profile_dict(data, origin="new profile")
    SimCosts.from_profile_dict(data, origin="new profile")
    for key in ("attention", "ffn", "comm"):
        if not math.isfinite(data[key]["r2"]):
            raise RuntimeError(f"profile {key}: fit quality is not finite")
