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
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from afdserve.errors import UserInputError
from afdserve.sim.costs import SimCosts
from afdserve.sim.fit import AffineFit, fit_affine, fit_nonneg, quality

TRANSPORTS: tuple[str, ...] = ("local", "copy", "shm", "tcp")
WORKER_TRANSPORTS: tuple[str, ...] = ("shm", "tcp")
"""Transports whose worker-process step overhead the profile measures (`worker_steps`)."""
WORKER_WINDOW_STEPS = 8
"""Steps per timed window of a worker-process engine (timed from the front, so a window
averages out when a step's token events reach the front)."""
WORKER_DEADLINE_S = 120.0
TRANSPORT_DEADLINE_S = 20.0
ENGINE_STEP_REPEATS = 31
"""Engine steps are timed at least this many times (they are cheap, and noise matters more)."""


@dataclass(frozen=True)
class ProfileGrid:
    decode_batches: tuple[int, ...] = (1, 8, 32)
    decode_contexts: tuple[int, ...] = (64, 256, 1024)
    ffn_tokens: tuple[int, ...] = (1, 8, 32, 128, 512)
    prefill_chunks: tuple[int, ...] = (16, 64, 256)
    prefill_starts: tuple[int, ...] = (0, 256)
    prefill_sequences: tuple[int, ...] = (1, 8, 16)
    """Sequences prefilled together in one chunk (a step batches several prompts)."""
    step_batches: tuple[int, ...] = (1, 8, 16, 32)
    transport_tokens: tuple[int, ...] = (1, 32, 256, 2048)
    """Up to a default step budget: a prefill step ships that many hidden states per layer."""
    repeats: int = 7
    warmup: int = 2

    def __post_init__(self) -> None:
        for name in (
            "decode_batches",
            "decode_contexts",
            "ffn_tokens",
            "prefill_chunks",
            "step_batches",
            "transport_tokens",
        ):
            v = getattr(self, name)
            if len(v) < 2 or any(not isinstance(x, int) or x < 1 for x in v):
                raise UserInputError(f"profile grid {name} needs at least two integers >= 1")
        if any(not isinstance(x, int) or x < 0 for x in self.prefill_starts):
            raise UserInputError("profile grid prefill_starts must be integers >= 0")
        if not self.prefill_sequences or any(
            not isinstance(x, int) or x < 1 for x in self.prefill_sequences
        ):
            raise UserInputError("profile grid prefill_sequences must be integers >= 1")
        if self.repeats < 1 or self.warmup < 0:
            raise UserInputError("profile grid needs repeats >= 1 and warmup >= 0")


SMALL_GRID = ProfileGrid(
    decode_batches=(1, 4),
    decode_contexts=(32, 128),
    ffn_tokens=(1, 64, 512),
    prefill_chunks=(8, 32),
    prefill_starts=(0, 32),
    prefill_sequences=(1, 4),
    step_batches=(1, 4),
    transport_tokens=(1, 16),
    repeats=3,
    warmup=1,
)
"""For tests: a few seconds on a tiny model."""


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
    timer = _Timer(device, grid.repeats, grid.warmup)
    note = progress or (lambda _s: None)
    worker_names = [t for t in transports if t in WORKER_TRANSPORTS] if worker_steps else []
    worker_rounds: dict[str, list[list[tuple]]] = {}
    worker_skipped: dict[str, str] = {}
    with torch.inference_mode():
        measured: list[tuple[list[tuple], ...]] = []
        for k in range(rounds):
            tag = f" (round {k + 1}/{rounds})" if rounds > 1 else ""
            note("attention (decode)" + tag)
            a_pts = _attention_decode(m, timer, grid, device)
            note("attention (prefill)" + tag)
            p_pts = _attention_prefill(m, timer, grid, device)
            note("ffn" + tag)
            f_pts = _ffn(m, timer, grid, device)
            note("per-token step work" + tag)
            t_pts = _step_token_points(m, timer, grid, device)
            note("engine steps (aggregated, AFD)" + tag)
            g_pts = _engine_step_points(m, model, "aggregated", timer, grid, device)
            d_pts = _engine_step_points(m, model, "afd", timer, grid, device)
            measured.append((a_pts, p_pts, f_pts, t_pts, g_pts, d_pts))
            for name in worker_names:
                note(f"worker-process steps over {name}" + tag)
                try:
                    pts = _worker_step_points(
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
            transport[name] = _transport(name, m, timer, grid, device)
    a = np.asarray(attn_pts, dtype=np.float64)
    attn_fit = fit_affine(a[:, 2], a[:, 3])
    f = np.asarray(ffn_pts, dtype=np.float64)
    ffn_fit = fit_affine(f[:, 0], f[:, 1])
    warnings: list[str] = []
    ffn_flat = ffn_fit.alpha <= 0
    if ffn_flat:
        # the planner needs the FFN to grow with its batch; below the timer's resolution, take
        # a 0.1% rise over the grid and say so
        floor = 1e-3 * max(ffn_fit.beta, 1e-6) / float(f[:, 0].max())
        warnings.append(
            f"FFN time did not grow over {int(f[:, 0].min())}..{int(f[:, 0].max())} tokens; "
            f"alpha_F set to {floor:.3g} ms/token (a 0.1% rise over the grid); profile larger "
            "token counts for a measured slope"
        )
        ffn_fit = AffineFit(
            floor, ffn_fit.beta, *quality(f[:, 1], floor * f[:, 0] + ffn_fit.beta), ffn_fit.n
        )
    fits = {"attention": attn_fit} | ({} if ffn_flat else {"ffn": ffn_fit})  # flat: said above
    warnings += poor_fit_warnings(fits)
    prefill = _fit_prefill(np.asarray(pre_pts, dtype=np.float64), attn_fit.alpha, attn_fit.beta)
    comm = transport[comm_from]
    if "alpha" not in comm:
        raise UserInputError(f"transport {comm_from!r} could not be timed: {comm.get('skipped')}")
    # per-step cost outside the modelled layers: measured engine step - L * (attention + FFN)
    L = cfg.num_hidden_layers
    agg = np.asarray(agg_pts, dtype=np.float64)
    n, ctx = agg[:, 0], agg[:, 1]
    layers = L * (attn_fit.predict(n * ctx) + ffn_fit.predict(n))
    residual = np.maximum(agg[:, 2] - layers, 1e-6)
    step_fit = fit_affine(n, residual)
    afd = np.asarray(afd_pts, dtype=np.float64)
    comm_ms = comm["alpha"] * afd[:, 0] + comm["beta"]
    afd_extra = afd[:, 2] - agg[:, 2] - 2 * L * comm_ms
    tp = np.asarray(tok_pts, dtype=np.float64)
    tok_fit = fit_affine(tp[:, 0], tp[:, 1])
    step = {
        **step_fit.to_dict(),
        "afd_beta": float(max(0.0, np.median(afd_extra))),
        "prefill_token_ms": tok_fit.alpha,
        "prefill_token_r2": tok_fit.r2,
    }
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
            transport[name].update(_worker_extras(data, name, pts, pre, pts2))
    return data


# ---- timing --------------------------------------------------------------------------------


def _fastest(rounds: list[list[tuple]]) -> list[tuple]:
    """Per point (same grid in every round), the round with the smallest time (last field)."""
    return [min(pts, key=lambda p: p[-1]) for pts in zip(*rounds, strict=True)]


def _median_points(rounds: list[list[tuple]]) -> list[tuple]:
    """Per point, the median time over the rounds (for worker-process steps: see
    `_worker_step_points` on why the typical rate, not the fastest)."""
    return [
        (*pts[0][:-1], float(np.median([p[-1] for p in pts]))) for pts in zip(*rounds, strict=True)
    ]


class _Timer:
    def __init__(self, device: str, repeats: int, warmup: int) -> None:
        import torch

        self.repeats, self.warmup = repeats, warmup
        self.sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def best_ms(self, fn: Callable[[], Any]) -> float:
        """The least-disturbed time of `fn` (ms) over the repeats, after the warm-up."""
        for _ in range(self.warmup):
            fn()
        self.sync()
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return min(times) * 1e3


def _device_name(device: str, threads: int) -> str:
    import platform

    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {threads} torch threads)"


def _blocks(n_tokens: int, block_size: int) -> int:
    return -(-n_tokens // block_size)


def _attention_decode(m, timer: _Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    import torch

    from afdserve.engine.kv_cache import KVCache
    from afdserve.model.attention import AttentionMetadata

    cfg, part = m.config, m.attention
    bs = 16
    L = cfg.num_hidden_layers
    out = []
    for b in grid.decode_batches:
        for c in grid.decode_contexts:
            nb = _blocks(c, bs)
            kv = KVCache(cfg, b * nb + 1, bs, m.dtype, device)
            tables = [list(range(1 + i * nb, 1 + (i + 1) * nb)) for i in range(b)]
            meta = AttentionMetadata.build([c - 1] * b, [1] * b, tables, bs, device)
            x = torch.randn(b, cfg.hidden_size, dtype=m.dtype, device=device) * 0.02  # [b, D]
            cos, sin = part.rope(meta, m.dtype)

            def run(x=x, meta=meta, cos=cos, sin=sin, kv=kv) -> None:
                for layer in range(L):
                    part.layers[layer](x, meta, cos, sin, kv.k[layer], kv.v[layer])

            out.append((b, c, b * c, timer.best_ms(run) / L))
            del kv
    return out


def _attention_prefill(m, timer: _Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    """Chunks of n new tokens after d cached ones, for s sequences at once.
    Returns (s, n, d, ms per layer)."""
    import torch

    from afdserve.engine.kv_cache import KVCache
    from afdserve.model.attention import AttentionMetadata

    cfg, part = m.config, m.attention
    bs = 16
    L = cfg.num_hidden_layers
    out = []
    for seqs in grid.prefill_sequences:
        for n in grid.prefill_chunks:
            for d in grid.prefill_starts:
                nb = _blocks(d + n, bs)
                kv = KVCache(cfg, seqs * nb + 1, bs, m.dtype, device)
                tables = [list(range(1 + i * nb, 1 + (i + 1) * nb)) for i in range(seqs)]
                meta = AttentionMetadata.build([d] * seqs, [n] * seqs, tables, bs, device)
                x = torch.randn(seqs * n, cfg.hidden_size, dtype=m.dtype, device=device) * 0.02
                cos, sin = part.rope(meta, m.dtype)

                def run(x=x, meta=meta, cos=cos, sin=sin, kv=kv) -> None:
                    for layer in range(L):
                        part.layers[layer](x, meta, cos, sin, kv.k[layer], kv.v[layer])

                out.append((seqs, n, d, timer.best_ms(run) / L))
    return out


def _ffn(m, timer: _Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    import torch

    cfg, ffn = m.config, m.ffn
    L = cfg.num_hidden_layers
    out = []
    for n in grid.ffn_tokens:
        h = torch.randn(n, cfg.hidden_size, dtype=m.dtype, device=device) * 0.02  # [n, D]

        def run(h=h) -> None:
            for layer in range(L):
                ffn(layer, h)

        out.append((n, timer.best_ms(run) / L))
    return out


def _step_token_points(m, timer: _Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    """The runtime's per-step work that grows with the tokens of a step (one sequence of n new
    tokens): attention metadata, token ids, embedding and rotary tables. Its slope per token is
    `step.prefill_token_ms`; decode steps have it in the per-sequence term already."""
    import torch

    from afdserve.model.attention import AttentionMetadata

    part = m.attention
    vocab = m.config.vocab_size
    out = []
    for n in grid.prefill_chunks:
        table = list(range(1, _blocks(n, 16) + 1))

        def run(n=n, table=table) -> None:
            meta = AttentionMetadata.build([0], [n], [table], 16, device)
            ids = torch.tensor(  # [n] any valid token ids
                [3 + i % (vocab - 3) for i in range(n)], dtype=torch.int64, device=device
            )
            part.embed(ids)
            part.rope(meta, m.dtype)

        out.append((n, timer.best_ms(run)))
    return out


def _engine_step_points(
    m, model: str, mode: str, timer: _Timer, grid: ProfileGrid, device: str
) -> list[tuple]:
    """Median time of the runtime's own `Engine.step()` (1 attention worker, M = 1) with N
    sequences decoding at a short context (8 + a few tokens), for N in the grid: everything a
    step does (scheduling, metadata, embedding, every layer, the FFN link, LM head, sampling,
    bookkeeping). Returns (N, mean context, ms)."""
    from afdserve.config import EngineConfig
    from afdserve.launch.local import build_engine
    from afdserve.types import SamplingParams

    prompt = 64
    # a step costs a few ms: many repeats are cheap and the AFD extra is a small difference
    timer = _Timer(device, max(timer.repeats, ENGINE_STEP_REPEATS), timer.warmup)
    max_len = min(m.config.max_position_embeddings, prompt + timer.warmup + timer.repeats + 16)
    out = []
    for N in grid.step_batches:
        cfg = EngineConfig(
            model=model,
            mode=mode,
            attention_workers=1,
            microbatches=1,
            max_num_seqs=N,
            max_num_batched_tokens=max(2048, N * prompt),
            max_model_len=max_len,
            device=device,
            num_kv_blocks=N * _blocks(max_len, 16) + 2,
        )
        engine, _ = build_engine(cfg, m)
        try:
            params = SamplingParams(max_tokens=max_len, temperature=0.0, ignore_eos=True)
            for i in range(N):
                engine.add_request(f"p{i}", list(range(3, 3 + prompt)), params)
            engine.step()  # the prefill step
            ctx0 = prompt + 1 + timer.warmup
            ms = timer.best_ms(engine.step)
            out.append((N, ctx0 + timer.repeats / 2.0, ms))
        finally:
            engine.close()
    return out


def _worker_afd_fit(
    pts: list[tuple],
    num_layers: int,
    attn_fit: AffineFit,
    ffn_fit: AffineFit,
    step_fit: AffineFit,
    comm: dict[str, Any],
) -> tuple[float, float]:
    """A transport's (`afd_alpha` per sequence, `afd_beta`): measured worker-process decode
    steps (N, context, ms) minus what the in-process profile predicts for them (layers,
    per-step work, 2 L fitted transfers), fitted as a line in N. Part of the extra grows with
    the batch (every sequence's token event is encoded by the worker and decoded by the front,
    which shares the cores), part does not (control messages, wake-ups). Theil-Sen (median of
    pairwise slopes), so that one disturbed point does not tilt the line; both at least 0."""
    from scipy.stats import theilslopes

    p = np.asarray(pts, dtype=np.float64)
    n, ctx, ms = p[:, 0], p[:, 1], p[:, 2]
    predicted = (
        num_layers * (attn_fit.predict(n * ctx) + ffn_fit.predict(n))
        + step_fit.predict(n)
        + 2 * num_layers * (comm["alpha"] * n + comm["beta"])
    )
    resid = ms - predicted
    slope = max(0.0, float(theilslopes(resid, n)[0])) if len(set(n.tolist())) > 1 else 0.0
    beta = float(np.median(resid - slope * n))
    if beta < 0:  # the line crosses below 0 at small N: keep it through the origin instead
        beta = 0.0
        slope = max(0.0, float(np.median(resid / n)))
    return slope, beta


def costs_for_transport(profile: dict[str, Any], transport: str) -> SimCosts:
    """The profile's costs with `comm` taken from the timing of `transport` (each run is
    simulated with the transfer cost of the transport it really used), and for a worker-process
    transport the per-step AFD extra the profile measured over it (`afd_beta`, and `afd_alpha`
    per sequence on top of `step.alpha`), if it did."""
    timed = profile.get("transport", {}).get(transport)
    if transport == profile.get("comm_transport") or not timed or "alpha" not in timed:
        if transport != profile.get("comm_transport", "local"):
            raise UserInputError(f"the profile has no timing of transport {transport!r}")
        return SimCosts.from_profile_dict(profile, origin="profile")
    swapped = {
        **profile,
        "comm": {k: timed[k] for k in ("alpha", "beta", "r2", "max_rel_err") if k in timed},
        "comm_transport": transport,
    }
    if "afd_beta" in timed:
        step = dict(profile.get("step", {}))
        step["afd_beta"] = timed["afd_beta"]
        step["alpha"] = step.get("alpha", 0.0) + timed.get("afd_alpha", 0.0)
        step["prefill_token_ms"] = step.get("prefill_token_ms", 0.0) + timed.get(
            "afd_prefill_token_ms", 0.0
        )
        step["afd_microbatch_ms"] = timed.get("afd_microbatch_ms", 0.0)
        swapped["step"] = step
    return SimCosts.from_profile_dict(swapped, origin="profile")


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
    (the coefficients of `_worker_extras` and their points). For comparisons
    with real runs made right after (`validate_runtime(interleave=True)`): on a shared machine
    the multi-process step rate drifts over minutes, so the profile's own timing can be from a
    different regime than the runs."""
    timed = profile.get("transport", {}).get(transport) or {}
    if "alpha" not in timed:
        raise UserInputError(f"the profile has no timing of transport {transport!r}")

    timer = _Timer(device, grid.repeats, grid.warmup)
    pts, pre, pts2 = _worker_step_points(
        model, transport, timer, grid, device, dtype, threads, pin_workers
    )
    return {**timed, **_worker_extras(profile, transport, pts, pre, pts2)}


def _worker_extras(
    profile: dict[str, Any], transport: str, pts: list[tuple], pre: list[tuple], pts2: list[tuple]
) -> dict[str, Any]:
    """A transport's worker-process coefficients (`afd_alpha`, `afd_beta`,
    `afd_prefill_token_ms`, `afd_microbatch_ms`) and their points, from worker-process decode
    steps (M = 1), prefill steps and M = 2 decode steps, fitted against the in-process fits in
    `profile` (whose `transport.<name>` must hold that transport's transfer fit)."""

    def fit(d: dict[str, Any]) -> AffineFit:  # only alpha and beta predict
        return AffineFit(float(d["alpha"]), float(d["beta"]), 1.0, 0.0, 0)

    timed, step = profile["transport"][transport], profile["step"]
    L = int(profile["num_layers"])
    attn_fit, ffn_fit, step_fit = fit(profile["attention"]), fit(profile["ffn"]), fit(step)
    alpha, beta = _worker_afd_fit(pts, L, attn_fit, ffn_fit, step_fit, timed)
    per_token = _worker_prefill_fit(
        pre, L, attn_fit, profile["prefill"], ffn_fit, step_fit,
        float(step.get("prefill_token_ms", 0.0)), timed, alpha, beta,
    )  # fmt: skip
    out = {
        "afd_alpha": alpha,
        "afd_beta": beta,
        "afd_prefill_token_ms": per_token,
        "afd_microbatch_ms": 0.0,
        "worker_step_points": [list(q) for q in pts],
        "worker_prefill_points": [list(q) for q in pre],
        "worker_step_points_m2": [list(q) for q in pts2],
    }
    # the M = 2 term is judged against the simulator with the other three in place
    again = {**profile, "transport": {**profile["transport"], transport: {**timed, **out}}}
    out["afd_microbatch_ms"] = _worker_microbatch_fit(pts, pts2, again, transport)
    return out


def _worker_prefill_fit(
    pts: list[tuple],
    num_layers: int,
    attn_fit: AffineFit,
    prefill: dict[str, float],
    ffn_fit: AffineFit,
    step_fit: AffineFit,
    step_prefill_token_ms: float,
    comm: dict[str, Any],
    afd_alpha: float,
    afd_beta: float,
) -> float:
    """A transport's `afd_prefill_token_ms`: measured worker-process prefill steps (S
    sequences, P prompt tokens each, ms) minus the in-process prediction of the same step (the
    prefill fit's attention, the FFN, the per-step and per-prefill-token work, 2 L fitted
    transfers of S P hidden states) and the decode-fitted worker extra (`afd_beta`,
    `afd_alpha` per sequence), per prefill token: the median over the points, at least 0.
    What it catches is what grows with a step's tokens only over worker processes: the hidden
    states of a whole prefill step cross between processes (and caches) every layer."""
    p = np.asarray(pts, dtype=np.float64)
    if not len(p):
        return 0.0
    s, n, ms = p[:, 0], p[:, 1], p[:, 2]
    tokens = s * n
    attention = (
        attn_fit.alpha * tokens
        + attn_fit.beta
        + prefill["token_ms"] * tokens
        + prefill["pair_ms"] * s * n * (n + 1) / 2.0
    )
    predicted = (
        num_layers * (attention + ffn_fit.predict(tokens))
        + step_fit.predict(s)
        + step_prefill_token_ms * tokens
        + 2 * num_layers * (comm["alpha"] * tokens + comm["beta"])
        + afd_alpha * s
        + afd_beta
    )
    return max(0.0, float(np.median((ms - predicted) / tokens)))


def _worker_step_points(
    model: str,
    transport: str,
    timer: _Timer,
    grid: ProfileGrid,
    device: str,
    dtype: str,
    threads: int | None,
    pin_workers: bool = False,
) -> tuple[list[tuple], list[tuple]]:
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
        num_kv_blocks=n_max * _blocks(max_len, 16) + 2,
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


def _worker_microbatch_fit(
    pts1: list[tuple], pts2: list[tuple], profile: dict[str, Any], transport: str
) -> float:
    """A transport's `afd_microbatch_ms`: what a second microbatch costs a worker-process
    decode step beyond what the simulator (with this transport's other extras) says it costs,
    the median over N of (measured M=2 - measured M=1) - (simulated M=2 - simulated M=1),
    at least 0. Taken as a difference so that the M = 1 fit's own misses at each N cancel."""
    from afdserve.sim.pipeline import time_one_step

    costs = costs_for_transport(profile, transport)
    extra = []
    for (n, ctx, ms1), (n2, _, ms2) in zip(pts1, pts2, strict=True):
        if n != n2 or n < 2:  # one sequence fills one microbatch only
            continue
        halves = [n // 2 + n % 2, n // 2]
        one = time_one_step(costs, "microbatch", [[n]], [[n * ctx]], [[0]], [[0]], [n])[0]
        two = time_one_step(
            costs, "microbatch", [halves], [[h * ctx for h in halves]], [[0, 0]], [[0, 0]], [n]
        )[0]
        extra.append((ms2 - ms1) - (two - one))
    return max(0.0, float(np.median(extra))) if extra else 0.0


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


POOR_FIT_R2 = 0.5
"""Below this R^2 a stage's time barely follows its size, and the profile says so."""


def poor_fit_warnings(fits: dict[str, AffineFit]) -> list[str]:
    """A warning per stage whose affine fit explains little of its timings. Seen on a GPU with
    the builtin models: every sub-block takes ~1 ms of kernel launches whatever the batch or
    context, so the slopes mean little and planning needs a larger model's profile."""
    return [
        f"{name} time barely follows its size (R^2 {fit.r2:.2f}): fixed costs dominate it here "
        "(kernel launches, on a GPU with a small model); its slope is not a basis for planning "
        "larger models"
        for name, fit in fits.items()
        if not fit.r2 >= POOR_FIT_R2
    ]


def _fit_prefill(pts: np.ndarray, alpha: float, beta: float) -> dict[str, float]:
    """With the decode fit's alpha_A (per context token read) and beta_A fixed, fit the rest of
    each chunk's time as token_ms * new tokens + pair_ms * (query, context) pairs, by
    non-negative least squares on absolute residuals: unlike decode, what matters is the big,
    budget-sized prefill steps, and small kernels are superlinear in size on CPU."""
    seqs, n, d, t = pts[:, 0], pts[:, 1], pts[:, 2], pts[:, 3]
    base = alpha * seqs * (d + n) + beta
    tokens = seqs * n
    pairs = seqs * (n * d + n * (n + 1) / 2.0)
    coef = fit_nonneg(np.stack([tokens, pairs], axis=1), t - base)
    pred = base + coef[0] * tokens + coef[1] * pairs
    r2, err = quality(t, pred)
    return {"token_ms": float(coef[0]), "pair_ms": float(coef[1]), "r2": r2, "max_rel_err": err}


# ---- transports ------------------------------------------------------------------------------


def _transport(name: str, m, timer: _Timer, grid: ProfileGrid, device: str) -> dict[str, Any]:
    try:
        if name == "copy":
            pts = _copy_points(m, timer, grid, device)
        elif name == "local":
            from afdserve.transport.local import LocalHub

            hub = LocalHub(2)
            try:
                pts = _ping_pong(hub.endpoints[0], hub.endpoints[1], m, timer, grid, device)
            finally:
                hub.close()
        else:
            pts = _registry_points(name, m, timer, grid, device)
    except Exception as exc:  # optional measurements: report why, never fail the profile
        return {"skipped": f"{type(exc).__name__}: {exc}"}
    arr = np.asarray(pts, dtype=np.float64)
    fit = fit_affine(arr[:, 0], arr[:, 1])
    return {**fit.to_dict(), "points": [list(p) for p in pts]}


def _copy_points(m, timer: _Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    import torch

    out = []
    for n in grid.transport_tokens:
        src = torch.randn(n, m.config.hidden_size, dtype=m.dtype, device=device)  # [n, D]
        dst = torch.empty_like(src)
        out.append((n, timer.best_ms(lambda src=src, dst=dst: dst.copy_(src))))
    return out


def _ping_pong(a, b, m, timer: _Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    """One-way time of a hidden-state message: a -> b -> a round trips, halved. Endpoint b
    echoes from its own thread (as the FFN worker does); every wait has a deadline."""
    import torch

    from afdserve.transport.message import Message, MsgType

    per_size = timer.warmup + timer.repeats
    total = per_size * len(grid.transport_tokens)
    errors: list[BaseException] = []

    def echo() -> None:
        try:
            for i in range(total):
                msg = b.recv(a.rank, MsgType.ACTIVATION_TRANSFER, i, timeout_s=TRANSPORT_DEADLINE_S)
                reply = Message(MsgType.ACTIVATION_RESULT, i, sender=b.rank, tensor=msg.tensor)
                b.send(a.rank, reply)
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)

    th = threading.Thread(target=echo, daemon=True, name="profile-echo")
    th.start()
    out = []
    step = 0
    for n in grid.transport_tokens:
        h = torch.randn(n, m.config.hidden_size, dtype=m.dtype, device="cpu")  # [n, D]
        times = []
        for k in range(per_size):
            t0 = time.perf_counter()
            a.send(b.rank, Message(MsgType.ACTIVATION_TRANSFER, step, sender=a.rank, tensor=h))
            a.recv(b.rank, MsgType.ACTIVATION_RESULT, step, timeout_s=TRANSPORT_DEADLINE_S)
            if k >= timer.warmup:
                times.append((time.perf_counter() - t0) / 2)
            step += 1
        out.append((n, min(times) * 1e3))
    th.join(timeout=TRANSPORT_DEADLINE_S)
    if errors:
        raise errors[0]
    return out


def _registry_points(name: str, m, timer: _Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    """Two endpoints of a multi-process backend in this process (threads), then a ping-pong."""
    from afdserve.transport.options import free_port
    from afdserve.transport.registry import create_transport

    port = free_port()
    opts: dict[str, Any] = {"rendezvous": f"127.0.0.1:{port}", "connect_timeout_s": 10.0}
    if name == "shm":
        opts["session"] = f"afdprofile-{uuid.uuid4().hex[:12]}"
        opts["ring_bytes"] = 16 << 20
    eps: list[Any] = [None, None]
    errors: list[BaseException] = []

    def make(rank: int) -> None:
        try:
            eps[rank] = create_transport(name, rank, 2, **opts)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=make, args=(k,), daemon=True) for k in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=TRANSPORT_DEADLINE_S)
    try:
        if errors:
            raise errors[0]
        if any(e is None for e in eps):
            raise TimeoutError(f"{name} endpoints not connected within {TRANSPORT_DEADLINE_S} s")
        return _ping_pong(eps[0], eps[1], m, timer, grid, device)
    finally:
        for ep in eps:
            if ep is not None:
                ep.close()


def check_profile(data: dict[str, Any]) -> None:
    """The written profile must read back through the planner and the simulator."""
    from afdserve.planner.costs import StageCosts
    from afdserve.sim.costs import SimCosts

    StageCosts.from_profile_dict(data, origin="new profile")
    SimCosts.from_profile_dict(data, origin="new profile")
    for key in ("attention", "ffn", "comm"):
        if not math.isfinite(data[key]["r2"]):
            raise RuntimeError(f"profile {key}: fit quality is not finite")
