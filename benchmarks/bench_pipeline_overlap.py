"""Ping-pong overlap of the multi-process pipeline: 1A1F in two single-threaded processes
pinned to two cores, attention and FFN shaped to take about the same time.

For a batch of B sequences decoding in lockstep at context ~C, it measures in this process (one
thread) T_attn (the attention worker's whole step: metadata, embedding, every layer's attention
block, LM head, sampling) and T_ffn (every layer's FFN on the B tokens), then runs the real
multi-process engine (`transport`, pinned, 1 thread per worker) with M = 1, 2, 3 microbatches
and reports its decode step time against T_attn + T_ffn (no overlap) and max(T_attn, T_ffn) (perfect overlap). It also
times each part while the other runs on the other core in a second process (`contended`): the
cost of a stage when the two really run at once on this machine.

    python benchmarks/bench_pipeline_overlap.py --transport shm
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def part_fns(model_dir: Path, batch: int, context: int) -> tuple[Callable, Callable]:
    """(attention step, FFN step) of one decode step of `batch` sequences at `context`.

    The attention step is everything the attention worker computes in a step:
    `AttentionRunner.execute` (metadata, embedding, every layer's attention block, LM head,
    sampling) with an FFN link that costs nothing; the FFN step is every layer's FFN on the
    batch. Both bound the pipeline: its step can be no shorter than either."""
    from afdserve.afd.attention_runner import AttentionRunner
    from afdserve.afd.ffn_link import FFNLink
    from afdserve.afd.stats import AFDStats
    from afdserve.engine.kv_cache import KVCache
    from afdserve.launch.local import load_model
    from afdserve.types import SamplingParams, ScheduledChunk, StepPlan

    class FreeFFN(FFNLink):
        """Returns zeros at once: the attention side's work alone."""

        def __init__(self) -> None:
            self.stats = AFDStats()
            self._zeros: torch.Tensor | None = None

        def begin_step(self, step, tokens_per_microbatch, seq_ids) -> None:
            pass

        def submit(self, step, layer, microbatch, h) -> None:
            if self._zeros is None or self._zeros.shape != h.shape:
                self._zeros = torch.zeros_like(h)

        def result(self, step, layer, microbatch) -> torch.Tensor:
            assert self._zeros is not None
            return self._zeros

    m = load_model(str(model_dir), "float32")
    cfg, bs = m.config, 16
    nb = -(-(context + 1) // bs)
    kv = KVCache(cfg, batch * nb + 1, bs, torch.float32)
    for cache in (*kv.k, *kv.v):  # written, as a real cache is: untouched zero pages of a
        cache.normal_()  # fresh allocation all map one physical page and read unrealistically fast
    params = SamplingParams(temperature=0, max_tokens=1)
    plan = StepPlan(
        0,
        tuple(
            ScheduledChunk(
                seq_id=i,
                token_ids=(5,),
                start_pos=context,
                block_table=tuple(range(1 + i * nb, 1 + (i + 1) * nb)),
                sample=True,
                params=params,
                sampling_seed=i,
                output_index=0,
            )
            for i in range(batch)
        ),
    )
    runner = AttentionRunner(m.attention, kv, FreeFFN())
    x = torch.randn(batch, cfg.hidden_size)

    def attn() -> None:
        runner.execute(plan, 0)

    def ffn() -> None:
        for layer in range(cfg.num_hidden_layers):
            m.ffn(layer, x)

    return attn, ffn


def median_s(fn: Callable, repeats: int) -> float:
    with torch.inference_mode():
        fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_parts(model_dir: Path, batch: int, context: int, repeats: int) -> tuple[float, float]:
    """(T_attn, T_ffn) in seconds, each alone on this machine (one thread), pinned to the first
    core like the pinned attention worker (unpinned, a process may migrate between cores, or
    NUMA nodes on a large host, and time slower than the worker it is a reference for)."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        attn, ffn = part_fns(model_dir, batch, context)
        return median_s(attn, repeats), median_s(ffn, repeats)
    finally:
        os.sched_setaffinity(0, allowed)


def _neighbour(model_dir: str, batch: int, context: int, which: str, cpu: int, stop, ready) -> None:
    """Run one part in a loop on core `cpu` until `stop` (the other half of a pipeline)."""
    os.sched_setaffinity(0, {cpu})
    torch.set_num_threads(1)
    attn, ffn = part_fns(Path(model_dir), batch, context)
    fn = attn if which == "attn" else ffn
    with torch.inference_mode():
        fn()
        ready.set()
        while not stop.is_set():
            fn()


def measure_contended(
    model_dir: Path, batch: int, context: int, repeats: int
) -> tuple[float, float]:
    """(T_attn, T_ffn) in seconds, each timed on core 0 while the other part runs in a loop in
    another process on core 1: what each stage costs when the two really overlap (pipelined
    workers share the machine's caches and memory bandwidth, and on a VM perhaps a core)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    allowed = os.sched_getaffinity(0)
    cpus = sorted(allowed)
    attn, ffn = part_fns(model_dir, batch, context)
    out = []
    try:
        os.sched_setaffinity(0, {cpus[0]})
        for fn, other in ((attn, "ffn"), (ffn, "attn")):
            stop, ready = ctx.Event(), ctx.Event()
            proc = ctx.Process(
                target=_neighbour,
                args=(str(model_dir), batch, context, other, cpus[1 % len(cpus)], stop, ready),
            )
            proc.start()
            try:
                if not ready.wait(120):
                    raise RuntimeError("the neighbour process did not start")
                out.append(median_s(fn, repeats))
            finally:
                stop.set()
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
    finally:
        os.sched_setaffinity(0, allowed)
    return out[0], out[1]


def measure_pipeline(
    model_dir: Path, transport: str, m: int, batch: int, prompt: int, steps: int
) -> tuple[float, float, float]:
    """(median decode step, attention worker's own compute per step, FFN worker's busy time per
    step) of the real 1A1F multi-process engine with M microbatches, in seconds. The last two
    come from the workers' own AFD counters over the same decode steps (attention: time in its
    step minus time blocked on the FFN; FFN: time in its loop minus time waiting for work), so
    they bound the step with the machine's speed of that very run."""
    from afdserve import LLM, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=steps, ignore_eos=True)
    prompts = [[(7 * i + j) % 200 + 3 for j in range(prompt)] for i in range(batch)]
    with LLM(
        str(model_dir),
        mode="afd",
        attention_workers=1,
        microbatches=m,
        transport=transport,
        pin_workers=True,
        worker_threads=1,
        max_num_seqs=batch,
        max_num_batched_tokens=batch * prompt,
    ) as llm:
        llm.generate(prompts[:1], SamplingParams(temperature=0, max_tokens=2))  # warm-up
        eng = llm.engine
        for i, p in enumerate(prompts):
            eng.add_request(f"b{i}", p, params)
        stamps: list[float] = []
        marks = []
        while eng.has_unfinished():
            evs = eng.step()
            if evs:
                stamps.append(time.perf_counter())
                if len(stamps) == 2:  # the prefill is done; let a report after it arrive
                    time.sleep(0.6)  # workers ship stats every STATS_EVERY_S (0.5 s)
                    marks.append(_busy(eng))
        time.sleep(1.0)  # both workers ship their final stats within STATS_EVERY_S
        marks.append(_busy(eng))
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]  # decode steps only
    (na0, nf0, a0, f0), (na1, nf1, a1, f1) = marks
    # layer-0 work items per step: M microbatches (the FFN serves each as one batch)
    return statistics.median(gaps), (a1 - a0) * m / (na1 - na0), (f1 - f0) * m / (nf1 - nf0)


def _busy(eng) -> tuple[int, int, float, float]:
    """(attention worker's layer-0 submits, FFN's layer-0 batches, attention own compute s, FFN
    busy s) as of the workers' latest reports. Each snapshot counts its own layer-0 work, so
    a per-step figure divides by work of the same snapshot (reports ship every ~0.5 s)."""
    from afdserve.afd.stats import A2F

    eng.poll_idle()
    st = eng.state(afd=True)
    a, f = st.attention[0], st.ffn[0]
    n_a = sum(
        sum(h.counts) for (d, layer), h in a.transfer_seconds.items() if d == A2F and layer == 0
    )
    n_f = sum(sum(h.counts) for (layer, _), h in f.ffn_batch_tokens.items() if layer == 0)
    return n_a, n_f, a.active_s - a.idle_s, f.active_s - f.idle_s


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--transport", default="shm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument(
        "--prompt", type=int, default=500, help="prompt tokens (sets the attention context)"
    )
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument(
        "--intermediate", type=int, default=0, help="FFN width (0: chosen so T_ffn ~ T_attn)"
    )
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from afdserve.model.make_model import make_model

    tmp = tempfile.mkdtemp(prefix="afd-overlap-")
    context = args.prompt + args.steps // 2

    def build(inter: int) -> tuple[Path, float, float]:
        d = make_model(
            "llama",
            "small",
            0,
            Path(tmp) / f"m{inter}",
            config_overrides={
                "hidden_size": args.hidden,
                "intermediate_size": inter,
                "num_hidden_layers": args.layers,
                "max_position_embeddings": 4096,
                "rope_scaling": None,
            },
        )
        return (d, *measure_parts(d, args.batch, context, repeats=20))

    if args.intermediate:
        model_dir, t_attn, t_ffn = build(args.intermediate)
    else:  # FFN time grows about linearly with its width: probe, size it to attention, refine
        inter = 1024
        for _ in range(3):
            model_dir, t_attn, t_ffn = build(inter)
            if abs(t_ffn / t_attn - 1) < 0.1:
                break
            inter = max(64, round(inter * t_attn / t_ffn / 64) * 64)
        args.intermediate = int(
            __import__("json").loads((model_dir / "config.json").read_text())["intermediate_size"]
        )
    print(
        f"llama-like: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers; batch "
        f"{args.batch}, context ~{context}; transport {args.transport}; cores {os.cpu_count()}"
    )
    c_attn, c_ffn = measure_contended(model_dir, args.batch, context, repeats=20)
    steps = {
        m: measure_pipeline(model_dir, args.transport, m, args.batch, args.prompt, args.steps)
        for m in (1, 2, 3)
    }
    # the references again after the runs: each keeps its lower median (a shared machine only
    # ever slows a measurement down, and a low reference makes the ratios below conservative)
    a2, f2 = measure_parts(model_dir, args.batch, context, repeats=20)
    ca2, cf2 = measure_contended(model_dir, args.batch, context, repeats=20)
    t_attn, t_ffn, c_attn, c_ffn = (
        min(t_attn, a2),
        min(t_ffn, f2),
        min(c_attn, ca2),
        min(c_ffn, cf2),
    )
    print(
        f"T_attn {t_attn * 1e3:.2f} ms, T_ffn {t_ffn * 1e3:.2f} ms (one thread, in-process; "
        "lower of the medians before and after the runs)"
    )
    no_overlap, perfect, contended = t_attn + t_ffn, max(t_attn, t_ffn), max(c_attn, c_ffn)
    print(
        f"no overlap (T_attn + T_ffn): {no_overlap * 1e3:.2f} ms; perfect overlap (max): "
        f"{perfect * 1e3:.2f} ms"
    )
    print(
        f"each with the other part busy on the other core: T_attn {c_attn * 1e3:.2f} ms, "
        f"T_ffn {c_ffn * 1e3:.2f} ms; contended perfect overlap (max): {contended * 1e3:.2f} ms"
    )
    print(
        f"{'M':>2} {'step ms':>8} {'/ perfect':>9} {'/ contended':>11} {'/ no-overlap':>12} | "
        f"{'attn own':>8} {'ffn busy':>8} {'/ max':>6} {'/ sum':>6}"
    )
    for m, (step, own, busy) in steps.items():
        print(
            f"{m:>2} {step * 1e3:8.2f} {step / perfect:9.2f} {step / contended:11.2f} "
            f"{step / no_overlap:12.2f} | {own * 1e3:8.2f} {busy * 1e3:8.2f} "
            f"{step / max(own, busy):6.2f} {step / (own + busy):6.2f}"
        )
    print(
        "attn own / ffn busy: each worker's compute per decode step in that run, from its own "
        "counters; '/ max' is the step against perfect overlap of those, '/ sum' against none"
    )


if __name__ == "__main__":
    main()
