"""Ping-pong overlap of the multi-process pipeline: 1A1F in two single-threaded processes
pinned to two cores, attention and FFN shaped to take about the same time.

For a batch of B sequences decoding in lockstep at context ~C, it measures in this process (one
thread) T_attn (the attention worker's whole step: metadata, embedding, every layer's attention
block, LM head, sampling) and T_ffn (every layer's FFN on the B tokens), then runs the real
multi-process engine (`transport`, pinned, 1 thread per worker) with M = 1, 2, 3 microbatches
and reports its decode step time against T_attn + T_ffn (no overlap) and max(T_attn, T_ffn) (perfect overlap).

    python benchmarks/bench_pipeline_overlap.py --transport shm
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def measure_parts(model_dir: Path, batch: int, context: int, repeats: int) -> tuple[float, float]:
    """(T_attn, T_ffn) in seconds for one decode step of `batch` sequences at `context`.

    T_attn is everything the attention worker computes in a step: `AttentionRunner.execute`
    (metadata, embedding, every layer's attention block, LM head, sampling) with an FFN link
    that costs nothing; T_ffn is every layer's FFN on the batch. Both bound the pipeline: its
    step can be no shorter than either."""
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

    def best(fn) -> float:
        with torch.inference_mode():
            fn()
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)

    return best(attn), best(ffn)


def measure_pipeline(
    model_dir: Path, transport: str, m: int, batch: int, prompt: int, steps: int
) -> float:
    """Median decode step time of the real 1A1F multi-process engine with M microbatches."""
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
        while eng.has_unfinished():
            evs = eng.step()
            if evs:
                stamps.append(time.perf_counter())
    gaps = [b - a for a, b in zip(stamps[1:], stamps[2:], strict=False)]  # decode steps only
    return statistics.median(gaps)


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
    print(f"T_attn {t_attn * 1e3:.2f} ms, T_ffn {t_ffn * 1e3:.2f} ms (one thread, in-process)")
    no_overlap, perfect = t_attn + t_ffn, max(t_attn, t_ffn)
    print(
        f"no overlap (T_attn + T_ffn): {no_overlap * 1e3:.2f} ms; perfect overlap (max): {perfect * 1e3:.2f} ms"
    )
    print(f"{'M':>2} {'step ms':>8} {'/ perfect':>9} {'/ no-overlap':>12}")
    for m in (1, 2, 3):
        step = measure_pipeline(model_dir, args.transport, m, args.batch, args.prompt, args.steps)
        print(f"{m:>2} {step * 1e3:8.2f} {step / perfect:9.2f} {step / no_overlap:12.2f}")


if __name__ == "__main__":
    main()
