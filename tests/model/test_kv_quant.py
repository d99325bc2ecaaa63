"""Quantised KV (model/kv_quant.py) and the attention over it (model/attention.py, the native
kernel): the round trip within the formats' error bounds, codes of a row independent of the
other rows, the native kernel reading every code as torch decodes it, and batch invariance with
quantised KV on both implementations."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afdserve.model.attention import (
    AttentionMetadata,
    attend_native,
    attend_torch,
    native_available,
    paged_attention,
)
from afdserve.model.kv_quant import FORMATS, QuantizedKV, bytes_per_row, dequantize, quantize

BLOCK = 16
INT8, FP8 = FORMATS["int8"], FORMATS["fp8"]
NATIVE = native_available(torch.empty(1, 1, 64))
needs_native = pytest.mark.skipif(not NATIVE, reason="the native kernel cannot be built here")


def _rows(n: int, dh: int, seed: int) -> torch.Tensor:
    """Rows of varied magnitude (1e-3 .. 1e3), with an outlier feature in some."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dh, generator=g) * torch.logspace(-3, 3, n)[:, None]
    x[::3, 5] *= 40
    return x


def test_int8_round_trip_is_within_half_a_step():
    x = _rows(200, 64, 0)
    codes, scale = quantize(x, INT8)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (200,)
    assert codes.abs().max() == 127  # each row's largest element lands on the last code
    back = dequantize(codes, scale, INT8, torch.float32)
    step = x.abs().amax(-1, keepdim=True) / 127
    # half a step, plus float32 rounding of the division and of the product
    assert ((back - x).abs() <= step * (0.5 + 1e-5)).all()


def test_fp8_round_trip_is_within_e4m3_rounding():
    x = _rows(200, 64, 1)
    codes, scale = quantize(x, FP8)
    assert codes.dtype == torch.uint8
    back = dequantize(codes, scale, FP8, torch.float32)
    y = x / scale[:, None]  # in units of the codes, |y| <= 448
    # e4m3: 3 mantissa bits, so half an ulp is 2^-4 relative; subnormals are 2^-9 apart
    bound = torch.maximum(y.abs() * 2.0**-4, torch.full_like(y, 2.0**-10)) * scale[:, None]
    assert ((back - x).abs() <= bound * (1 + 1e-5)).all()
    rel = ((back - x).norm(dim=-1) / x.norm(dim=-1)).max()
    assert rel < 0.04, rel  # measured 0.032 on these rows (int8: 0.021)


@pytest.mark.parametrize("fmt", [INT8, FP8], ids=["int8", "fp8"])
def test_zero_rows_and_other_dtypes(fmt):
    x = torch.zeros(3, 16)
    x[1] = torch.linspace(-2, 2, 16)
    codes, scale = quantize(x.to(torch.bfloat16), fmt)
    back = dequantize(codes, scale, fmt, torch.bfloat16)
    assert back.dtype == torch.bfloat16 and torch.isfinite(back.float()).all()
    assert not back[0].any() and not back[2].any()
    torch.testing.assert_close(back[1].float(), x[1], rtol=0.07, atol=0.02)


@pytest.mark.parametrize("fmt", [INT8, FP8], ids=["int8", "fp8"])
def test_a_rows_codes_do_not_depend_on_the_other_rows(fmt):
    x = _rows(50, 64, 2)
    codes, scale = quantize(x, fmt)
    for i in (0, 7, 49):
        c1, s1 = quantize(x[i : i + 1], fmt)
        assert torch.equal(c1[0], codes[i]) and torch.equal(s1[0], scale[i])


def test_bytes_per_row():
    assert bytes_per_row("auto", 64, 4) == 256 and bytes_per_row("auto", 64, 2) == 128
    assert bytes_per_row("int8", 64, 4) == bytes_per_row("fp8", 64, 2) == 68
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        bytes_per_row("int4", 64, 4)


def _quantized_cache(fmt, n_kv, n_blocks, dh, g) -> tuple[QuantizedKV, QuantizedKV]:
    def one() -> QuantizedKV:
        x = torch.randn(n_kv, n_blocks, BLOCK, dh, generator=g)
        codes, scale = quantize(x, fmt)
        return QuantizedKV(codes.contiguous(), scale.contiguous(), fmt)

    return one(), one()


def _meta(specs):
    """Metadata for [(start, qlen)] with consecutive fresh block tables from block 1."""
    tables, nxt = [], 1
    for start, qlen in specs:
        nb = -(-(start + qlen) // BLOCK)
        tables.append(list(range(nxt, nxt + nb)))
        nxt += nb
    meta = AttentionMetadata.build([s for s, _ in specs], [q for _, q in specs], tables, BLOCK)
    return meta, nxt


@needs_native
@pytest.mark.parametrize("fmt", [INT8, FP8], ids=["int8", "fp8"])
def test_native_reads_every_code_as_torch_decodes_it(fmt):
    """The kernel on a quantised cache equals the kernel on that cache dequantised by torch
    (float32), bit for bit, with every one of the 256 byte values (but fp8's two NaNs) in it."""
    n_heads, n_kv, dh = 9, 3, 64
    g = torch.Generator().manual_seed(5)
    meta, n_blocks = _meta([(0, 70), (40, 9), (130, 1)])
    k, v = _quantized_cache(fmt, n_kv, n_blocks + 1, dh, g)
    codes = torch.arange(256).remainder(256).to(torch.uint8)
    if fmt is FP8:
        codes = codes[(codes != 0x7F) & (codes != 0xFF)]
    every = codes.repeat(-(-k.codes.numel() // len(codes)))[: k.codes.numel()]
    every = every[torch.randperm(len(every), generator=g)].view(
        torch.int8 if fmt is INT8 else torch.uint8
    )
    k.codes.copy_(every.view(k.codes.shape))
    q = torch.randn(meta.num_tokens, n_heads, dh, generator=g)
    kf, vf = k.dequantized().contiguous(), v.dequantized().contiguous()
    got = attend_native(q, k, v, meta, dh**-0.5)
    assert torch.equal(got, attend_native(q, kf, vf, meta, dh**-0.5))
    torch.testing.assert_close(got, attend_torch(q, k, v, meta, dh**-0.5), rtol=1e-5, atol=1e-5)


IMPLS = [
    pytest.param(attend_native, id="native", marks=needs_native),
    pytest.param(attend_torch, id="torch"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("fmt", [INT8, FP8], ids=["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_attention_over_quantised_kv_is_batch_invariant(impl, fmt, dtype, data):
    n_heads, n_kv, dh = 9, 3, 64
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    n = data.draw(st.integers(2, 4))
    specs = [
        (data.draw(st.integers(0, 200)), data.draw(st.sampled_from([1, 1, 3, 16, 40])))
        for _ in range(n)
    ]
    meta, n_blocks = _meta(specs)
    k, v = _quantized_cache(fmt, n_kv, n_blocks + 1, dh, g)
    q = torch.randn(meta.num_tokens, n_heads, dh, generator=g).to(dtype)
    together = impl(q, k, v, meta, dh**-0.5)
    at = 0
    for i, (start, qlen) in enumerate(specs):
        alone_meta = AttentionMetadata.build([start], [qlen], [meta.block_tables[i]], BLOCK)
        alone = impl(q[at : at + qlen], k, v, alone_meta, dh**-0.5)
        assert torch.equal(together[at : at + qlen], alone)
        at += qlen


@pytest.mark.parametrize("fmt", [INT8, FP8], ids=["int8", "fp8"])
def test_paged_attention_quantises_what_it_writes(fmt):
    g = torch.Generator().manual_seed(1)
    n_kv, dh = 2, 16
    k_cache = QuantizedKV(
        torch.zeros(n_kv, 4, BLOCK, dh, dtype=fmt.storage), torch.zeros(n_kv, 4, BLOCK), fmt
    )
    v_cache = QuantizedKV(torch.zeros_like(k_cache.codes), torch.zeros_like(k_cache.scale), fmt)
    q, k, v = (torch.randn(5, 4, dh, generator=g), torch.randn(5, n_kv, dh, generator=g),
               torch.randn(5, n_kv, dh, generator=g))  # fmt: skip
    meta = AttentionMetadata.build([0], [5], [[2]], BLOCK)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.25)
    codes, scale = quantize(k.transpose(0, 1), fmt)  # [Hkv, 5, Dh], [Hkv, 5]
    assert torch.equal(k_cache.codes[:, 2, :5], codes) and torch.equal(
        k_cache.scale[:, 2, :5], scale
    )
    assert not k_cache.codes[:, [0, 1, 3]].any() and not k_cache.codes[:, 2, 5:].any()
    torch.testing.assert_close(out, attend_torch(q, k_cache, v_cache, meta, 0.25))
    # the first query sees only itself: its output is its own value row, dequantised
    own = v_cache.dequantized()[:, 2, 0].repeat_interleave(2, 0)  # [H, Dh]
    torch.testing.assert_close(out[0], own, rtol=1e-6, atol=1e-6)


@needs_native
def test_native_refuses_a_half_quantised_cache():
    g = torch.Generator().manual_seed(0)
    meta, n_blocks = _meta([(0, 3)])
    k, _ = _quantized_cache(INT8, 2, n_blocks + 1, 16, g)
    v = torch.zeros(2, n_blocks + 1, BLOCK, 16)
    with pytest.raises(ValueError, match="both be quantised"):
        attend_native(torch.randn(3, 4, 16), k, v, meta, 0.25)
