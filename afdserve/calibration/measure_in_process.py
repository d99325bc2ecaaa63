"""In-process measurements, on the model's own parts: attention sub-blocks in decode and prefill,
FFN sub-blocks, the per-step work that grows with a step's tokens, and the runtime's own
`Engine.step()` (aggregated and AFD). Each returns its points as tuples whose last field is the
time in ms; `fit_in_process` fits them.
"""

from __future__ import annotations

from afdserve.calibration.grid import ProfileGrid
from afdserve.calibration.timing import Timer, blocks_for

ENGINE_STEP_REPEATS = 31
"""Engine steps are timed at least this many times (they are cheap, and noise matters more)."""


def attention_decode_points(m, timer: Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    import torch

    from afdserve.engine.kv_cache import KVCache
    from afdserve.model.attention import AttentionMetadata

    cfg, part = m.config, m.attention
    bs = 16
    L = cfg.num_hidden_layers
    out = []
    for b in grid.decode_batches:
        for c in grid.decode_contexts:
            nb = blocks_for(c, bs)
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


def attention_prefill_points(m, timer: Timer, grid: ProfileGrid, device: str) -> list[tuple]:
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
                nb = blocks_for(d + n, bs)
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


def ffn_points(m, timer: Timer, grid: ProfileGrid, device: str) -> list[tuple]:
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


def step_token_points(m, timer: Timer, grid: ProfileGrid, device: str) -> list[tuple]:
    """The runtime's per-step work that grows with the tokens of a step (one sequence of n new
    tokens): attention metadata, token ids, embedding and rotary tables. Its slope per token is
    `step.prefill_token_ms`; decode steps have it in the per-sequence term already."""
    import torch

    from afdserve.model.attention import AttentionMetadata

    part = m.attention
    vocab = m.config.vocab_size
    out = []
    for n in grid.prefill_chunks:
        table = list(range(1, blocks_for(n, 16) + 1))

        def run(n=n, table=table) -> None:
            meta = AttentionMetadata.build([0], [n], [table], 16, device)
            ids = torch.tensor(  # [n] any valid token ids
                [3 + i % (vocab - 3) for i in range(n)], dtype=torch.int64, device=device
            )
            part.embed(ids)
            part.rope(meta, m.dtype)

        out.append((n, timer.best_ms(run)))
    return out


def engine_step_points(
    m, model: str, mode: str, timer: Timer, grid: ProfileGrid, device: str
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
    timer = Timer(device, max(timer.repeats, ENGINE_STEP_REPEATS), timer.warmup)
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
            num_kv_blocks=N * blocks_for(max_len, 16) + 2,
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
