"""The kernels under the engine, timed on their own: attention and GEMMs.

- Attention (one layer, SmolLM2's heads: 9 query / 3 KV heads of 64): a decode step of 48
  sequences with contexts uniform in [100, 700], and a prefill of 4 prompts (128-512 tokens),
  for the native kernel (model/csrc/paged_attention.c) and the torch implementation;
  `--kv-dtypes auto int8 fp8` also over a quantised cache (model/kv_quant.py).
- `--alternatives`: the library kernels tried before writing ours, on the same decode step:
  torch's SDPA (its flash-attention CPU kernel) over the KV blocks gathered into a padded copy,
  and FlexAttention (torch.compile'd, its CPU template) reading the paged cache in place
  through a block mask, with 128-token pages as its CPU template wants (compile time excluded).
- GEMMs on SmolLM2's layer shapes (fused qkv 576->960, o 576->576, gate_up 576->3072, down
  1536->576, LM head 576->49152) at several row counts: plain F.linear (MKL), the fast mode's
  prepared weight (oneDNN's packed layout), and the exact mode (16-row tiles of it).

    python benchmarks/bench_kernels.py --threads 2
"""

from __future__ import annotations

import argparse
import random
import time

import torch
import torch.nn.functional as F

from afdserve.engine.kv_cache import new_cache_tensor
from afdserve.model.attention import AttentionMetadata, attend_native, attend_torch
from afdserve.model.kernels import Kernels

H, HKV, DH = 9, 3, 64
BLOCK_SIZES = (16, 64, 128)
"""KV block sizes timed for the decode step (the engine's default is 64)."""
SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)]


def _ms(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def _tables(lengths: list[int], rng: random.Random, bs: int) -> tuple[list[list[int]], int]:
    need = [-(-n // bs) for n in lengths]
    blocks = list(range(1, sum(need) + 1))
    rng.shuffle(blocks)  # a cache that has seen traffic: blocks out of order
    tables, at = [], 0
    for n in need:
        tables.append(blocks[at : at + n])
        at += n
    return tables, sum(need) + 1


def _cache(shape: tuple[int, ...], dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """A KV cache tensor as the engine allocates it (huge pages where Linux allows), random."""
    t = new_cache_tensor(shape, dtype, "cpu")
    t.copy_(torch.randn(shape, generator=g))
    return t


def _quantised(kc: torch.Tensor, kv: str):
    """`kc` as a quantised cache layer (codes and scales on huge pages, as the engine's)."""
    from afdserve.model.kv_quant import FORMATS, QuantizedKV, quantize

    fmt = FORMATS[kv]
    codes, scale = quantize(kc, fmt)
    out = QuantizedKV(
        new_cache_tensor(codes.shape, codes.dtype, "cpu"),
        new_cache_tensor(scale.shape, scale.dtype, "cpu"),
        fmt,
    )
    out.codes.copy_(codes)
    out.scale.copy_(scale)
    return out


def attention(dtype: torch.dtype, reps: int, kv: str = "auto") -> None:
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    ctx = [rng.randint(100, 700) for _ in range(48)]
    prompts = [128, 256, 300, 512]
    cases = [
        (f"decode, 48 seqs, ctx 100-700, block {bs}", [c - 1 for c in ctx], [1] * len(ctx), bs)
        for bs in BLOCK_SIZES
    ] + [("prefill, 4 prompts of 128-512, block 64", [0] * len(prompts), prompts, 64)]
    for label, starts, qlens, bs in cases:
        tables, nblocks = _tables([s + q for s, q in zip(starts, qlens, strict=True)], rng, bs)
        kc, vc = (_cache((HKV, nblocks, bs, DH), dtype, g) for _ in range(2))
        q = torch.randn(sum(qlens), H, DH, generator=g).to(dtype)
        meta = AttentionMetadata.build(starts, qlens, tables, bs)
        row = DH * kc.itemsize
        if kv != "auto":
            kc, vc, row = _quantised(kc, kv), _quantised(vc, kv), DH + 4
        kv_mb = 2 * HKV * row * sum(s + n for s, n in zip(starts, qlens, strict=True))
        args = (q, kc, vc, meta, DH**-0.5)
        native = _ms(lambda a=args: attend_native(*a), reps)
        torch_ms = _ms(lambda a=args: attend_torch(*a), reps)
        print(
            f"attention {str(dtype)[6:]:9s} KV {kv:5s} {label:42s} native {native:7.2f} ms   torch "
            f"{torch_ms:7.2f} ms   ({torch_ms / native:4.1f}x; KV read {kv_mb / 1e6:.1f} MB)"
        )


def alternatives(reps: int) -> None:
    """Decode attention (48 sequences, fp32) through SDPA on a gathered copy and FlexAttention
    on the paged cache, beside the native kernel on the same contexts."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    ctx = [rng.randint(100, 700) for _ in range(48)]
    q = torch.randn(len(ctx), H, DH, generator=g)
    # SDPA: the blocks of a 16-token-page cache gathered into [B, Hkv, K, Dh], padded, masked
    bs = 16  # the engine's block size before it became 64
    tables, nblocks = _tables(ctx, rng, bs)
    kc = torch.randn(HKV, nblocks, bs, DH, generator=g)
    vc = torch.randn(HKV, nblocks, bs, DH, generator=g)
    width = max(len(t) for t in tables)
    flat = torch.tensor([t + [0] * (width - len(t)) for t in tables]).view(-1)  # [B * nb]
    valid = torch.arange(width * bs)[None, :] < torch.tensor(ctx)[:, None]  # [B, K]

    def sdpa() -> torch.Tensor:
        k = kc.index_select(1, flat).view(HKV, len(ctx), -1, DH).transpose(0, 1)
        v = vc.index_select(1, flat).view(HKV, len(ctx), -1, DH).transpose(0, 1)
        return F.scaled_dot_product_attention(
            q[:, :, None], k, v, attn_mask=valid[:, None, None, :], enable_gqa=True
        )

    meta = AttentionMetadata.build([c - 1 for c in ctx], [1] * len(ctx), tables, bs)
    native = _ms(lambda: attend_native(q, kc, vc, meta, DH**-0.5), reps)
    print(f"alternatives, fp32 decode of 48 seqs: native {native:.2f} ms")
    print(f"  SDPA over a gathered, padded copy: {_ms(sdpa, reps):.2f} ms")
    # FlexAttention on a flat cache [1, Hkv, slots, Dh] of 128-token pages, one query per seq
    page = 128
    need = [-(-c // page) for c in ctx]
    order = list(range(sum(need)))
    rng.shuffle(order)
    pages, at = [], 0
    for n in need:
        pages.append(order[at : at + n])
        at += n
    npages = sum(need)
    kf = torch.randn(1, HKV, npages * page, DH, generator=g)
    vf = torch.randn(1, HKV, npages * page, DH, generator=g)
    owner = torch.full((npages * page,), -1)
    logical = torch.zeros(npages * page, dtype=torch.long)
    for s, t in enumerate(pages):
        for j, p in enumerate(t):
            owner[p * page : (p + 1) * page] = s
            logical[p * page : (p + 1) * page] = torch.arange(j * page, (j + 1) * page)
    ctx_t = torch.tensor(ctx)

    def mask_mod(b, h, qi, kv):
        return (owner[kv] == qi) & (logical[kv] < ctx_t[qi])

    kv_num = torch.tensor([len(t) for t in pages], dtype=torch.int32)[None, None]
    kv_idx = torch.zeros(1, 1, len(ctx), npages, dtype=torch.int32)
    for s, t in enumerate(pages):
        kv_idx[0, 0, s, : len(t)] = torch.tensor(t, dtype=torch.int32)
    mask = BlockMask.from_kv_blocks(
        kv_num,
        kv_idx,
        BLOCK_SIZE=(1, page),
        mask_mod=mask_mod,
        seq_lengths=(len(ctx), npages * page),
    )
    flex = torch.compile(flex_attention, dynamic=False)
    qf = q.transpose(0, 1)[None]  # [1, H, B, Dh]
    t0 = time.perf_counter()
    flex(qf, kf, vf, block_mask=mask, enable_gqa=True)
    compile_s = time.perf_counter() - t0
    flex_ms = _ms(lambda: flex(qf, kf, vf, block_mask=mask, enable_gqa=True), reps)
    print(
        f"  FlexAttention, paged, in place: {flex_ms:.2f} ms (first call, compiling: {compile_s:.0f} s)"
    )


def gemms(dtype: torch.dtype, rows: list[int], reps: int) -> None:
    g = torch.Generator().manual_seed(0)
    fast, exact = Kernels(), Kernels(batch_invariant=True)
    for d_in, d_out in SHAPES:
        w = (torch.randn(d_out, d_in, generator=g) * d_in**-0.5).to(dtype)
        prepared = fast.prepare(w)
        for m in rows:
            if d_out > 10_000 and m > 256:
                continue  # the LM head runs on sampled rows only
            x = torch.randn(m, d_in, generator=g).to(dtype)
            gflop = 2 * m * d_in * d_out / 1e9
            plain = _ms(lambda x=x, w=w: F.linear(x, w), reps)
            f = _ms(lambda x=x, p=prepared: fast.linear(x, p), reps)
            e = _ms(lambda x=x, p=prepared: exact.linear(x, p), reps)
            print(
                f"gemm {str(dtype)[6:]:9s} {d_in:5d}->{d_out:5d} M={m:5d}: F.linear "
                f"{gflop / plain * 1e3:6.1f}  fast {gflop / f * 1e3:6.1f}  exact "
                f"{gflop / e * 1e3:6.1f} GFLOP/s"
            )


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--rows", nargs="+", type=int, default=[16, 48, 256, 2048])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument(
        "--kv-dtypes", nargs="+", default=["auto"], help="KV caches to time: auto, int8, fp8"
    )
    ap.add_argument("--no-gemms", action="store_true", help="time attention only")
    ap.add_argument("--alternatives", action="store_true", help="also time SDPA and FlexAttention")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    for name in args.dtypes:
        for kv in args.kv_dtypes:
            attention(getattr(torch, name), args.reps, kv)
    if args.alternatives:
        alternatives(args.reps)
    for name in () if args.no_gemms else args.dtypes:
        gemms(getattr(torch, name), args.rows, args.reps)


if __name__ == "__main__":
    main()
