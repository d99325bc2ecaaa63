"""A token's results must not depend on what else shares its batch: that is what lets AFD
(smaller per-worker batches, microbatches, a gathered FFN batch, other prefill chunkings)
reproduce the aggregated tokens exactly.

- GEMMs in the exact mode (`Kernels(batch_invariant=True)`), on model-sized shapes (hidden
  576..4096, rows 1..300): a row computed among others, at any position, under either thread
  count, equals the row computed alone, bit for bit.
- Attention, both implementations (the native kernel and the torch one), on model-sized head
  shapes: a sequence's rows are the same alone, beside others in any order, and (native) when
  its prompt is chunked differently, attended one token at a time, or run on another thread
  count.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from afdserve.model.attention import (
    Q_BLOCK,
    AttentionMetadata,
    attend_native,
    attend_torch,
    native_available,
    paged_attention,
)
from afdserve.model.kernels import Kernels

EXACT = Kernels(batch_invariant=True)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.bfloat16]


class _threads:
    """Run a block under `n` torch threads."""

    def __init__(self, n: int) -> None:
        self.n, self.old = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc) -> None:
        torch.set_num_threads(self.old)


# ---- GEMMs -----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    d_in=st.sampled_from([576, 896, 1536, 2048, 4096]),
    d_out=st.sampled_from([192, 576, 3072, 4096, 32000]),
    m=st.integers(1, 300),
    data=st.data(),
)
def test_exact_linear_rows_do_not_depend_on_the_batch(device, dtype, d_in, d_out, m, data):
    if d_in * d_out > 4096 * 4096:  # a vocabulary-sized LM head: with a hidden size up to 1536
        d_in = 1536
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))
    w = (torch.randn(d_out, d_in, generator=g) * d_in**-0.5).to(dtype).to(device)
    x = torch.randn(m, d_in, generator=g).to(dtype).to(device)
    weight = EXACT.prepare(w)
    pos = data.draw(st.integers(0, m - 1))
    threads = data.draw(st.sampled_from([1, 2]))
    with _threads(threads):
        together = EXACT.linear(x, weight)[pos]  # [d_out]
    with _threads(3 - threads):
        alone = EXACT.linear(x[pos : pos + 1], weight)[0]
        shifted = EXACT.linear(torch.cat([x[pos : pos + 1], x]), weight)[0]
    assert torch.equal(together, alone)
    assert torch.equal(shifted, alone)


def test_exact_linear_matches_a_plain_gemm_and_keeps_the_bias() -> None:
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(48, 40, generator=g), torch.randn(48, generator=g)
    x = torch.randn(37, 40, generator=g)
    for kernels in (EXACT, Kernels()):
        y = kernels.linear(x, kernels.prepare(w), b)
        torch.testing.assert_close(y, torch.nn.functional.linear(x, w, b), rtol=1e-5, atol=1e-5)
        assert y.shape == (37, 48)


# ---- attention -------------------------------------------------------------------------------

BLOCK = 16
HEADS = [(4, 2, 16), (9, 3, 64), (14, 2, 64), (8, 8, 128)]
"""(query heads, KV heads, head dim): tiny, SmolLM2, Qwen2-0.5B, MHA with head dim 128."""


def _cache(n_kv, dh, n_blocks, dtype, device, g):
    k = torch.randn(n_kv, n_blocks, BLOCK, dh, generator=g).to(dtype).to(device)
    v = torch.randn(n_kv, n_blocks, BLOCK, dh, generator=g).to(dtype).to(device)
    return k, v


def _attend(fn, seqs, q_all, k_cache, v_cache, scale):
    """Attend for `seqs` [(start, qlen, table, rows of q_all)] in one batch (the cache already
    holds every position); returns each sequence's output rows."""
    meta = AttentionMetadata.build(
        [s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs], BLOCK, q_all.device
    )
    out = fn(q_all[[r for s in seqs for r in s[3]]], k_cache, v_cache, meta, scale)
    res, at = [], 0
    for s in seqs:
        res.append(out[at : at + s[1]])
        at += s[1]
    return res


IMPLS = [
    pytest.param(attend_native, id="native"),
    pytest.param(attend_torch, id="torch"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.sampled_from(HEADS), data=st.data())
def test_attention_is_batch_invariant(impl, dtype, heads, data):
    if impl is attend_native and not native_available(torch.empty(1, 1, heads[2], dtype=dtype)):
        pytest.skip("the native kernel cannot be built here")
    n_heads, n_kv, dh = heads
    n = data.draw(st.integers(2, 5))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    seqs, next_block, next_row = [], 1, 0
    for _ in range(n):
        start = data.draw(st.integers(0, 300))
        qlen = data.draw(st.sampled_from([1, 1, 2, 3, 7, 16, 21, 100]))
        nb = -(-(start + qlen) // BLOCK)
        seqs.append(
            (
                start,
                qlen,
                list(range(next_block, next_block + nb)),
                list(range(next_row, next_row + qlen)),
            )
        )
        next_block, next_row = next_block + nb, next_row + qlen
    k_cache, v_cache = _cache(n_kv, dh, next_block + 2, dtype, "cpu", g)
    q = torch.randn(next_row, n_heads, dh, generator=g).to(dtype)
    scale = dh**-0.5
    together = _attend(impl, seqs, q, k_cache, v_cache, scale)
    order = data.draw(st.permutations(range(n)))
    shuffled = _attend(impl, [seqs[i] for i in order], q, k_cache, v_cache, scale)
    for pos, i in enumerate(order):
        alone = _attend(impl, [seqs[i]], q, k_cache, v_cache, scale)[0]
        assert torch.equal(together[i], alone)
        assert torch.equal(shuffled[pos], alone)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16])
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(heads=st.sampled_from(HEADS), data=st.data())
def test_native_attention_rows_depend_on_their_position_only(dtype, heads, data):
    """The native kernel computes a row from its own position's context in a fixed order: the
    same bits whether the prompt is one chunk, two chunks split anywhere, or fed one token at a
    time (decode), and on one or two threads."""
    if not native_available(torch.empty(1, 1, heads[2], dtype=dtype)):
        pytest.skip("the native kernel cannot be built here")
    n_heads, n_kv, dh = heads
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    start = data.draw(st.integers(0, 200))
    qlen = data.draw(st.integers(2, 80))
    table = list(range(1, 1 + -(-(start + qlen) // BLOCK)))
    k_cache, v_cache = _cache(n_kv, dh, len(table) + 2, dtype, "cpu", g)
    q = torch.randn(qlen, n_heads, dh, generator=g).to(dtype)
    scale = dh**-0.5
    rows = list(range(qlen))
    whole = _attend(attend_native, [(start, qlen, table, rows)], q, k_cache, v_cache, scale)[0]
    cut = data.draw(st.integers(1, qlen - 1))
    first, second = (
        _attend(attend_native, [(start, cut, table, rows[:cut])], q, k_cache, v_cache, scale)[0],
        _attend(
            attend_native,
            [(start + cut, qlen - cut, table, rows[cut:])],
            q,
            k_cache,
            v_cache,
            scale,
        )[0],
    )
    assert torch.equal(torch.cat([first, second]), whole)
    i = data.draw(st.integers(0, qlen - 1))
    with _threads(data.draw(st.sampled_from([1, 2]))):
        one = _attend(attend_native, [(start + i, 1, table, [i])], q, k_cache, v_cache, scale)[0]
    assert torch.equal(one[0], whole[i])


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_attention_matches_a_float64_reference(impl, dtype, tol) -> None:
    """Three sequences (a long prefill past Q_BLOCK, a short chunk after a cached prefix, a
    decode) against dense causal attention in float64."""
    if impl is attend_native and not native_available(torch.empty(1, 1, 64, dtype=dtype)):
        pytest.skip("the native kernel cannot be built here")
    n_heads, n_kv, dh = 9, 3, 64
    g = torch.Generator().manual_seed(3)
    specs = [(0, Q_BLOCK + 37), (40, 9), (300, 1)]  # (start, qlen)
    seqs, next_block, next_row = [], 1, 0
    for start, qlen in specs:
        nb = -(-(start + qlen) // BLOCK)
        seqs.append(
            (
                start,
                qlen,
                list(range(next_block, next_block + nb)),
                list(range(next_row, next_row + qlen)),
            )
        )
        next_block, next_row = next_block + nb, next_row + qlen
    k_cache, v_cache = _cache(n_kv, dh, next_block + 1, dtype, "cpu", g)
    q = torch.randn(next_row, n_heads, dh, generator=g).to(dtype)
    outs = _attend(impl, seqs, q, k_cache, v_cache, dh**-0.5)
    for (start, qlen, table, rows), out in zip(seqs, outs, strict=True):
        ctx = start + qlen
        k = torch.cat([k_cache[:, b] for b in table], 1)[:, :ctx].double()  # [Hkv, ctx, Dh]
        v = torch.cat([v_cache[:, b] for b in table], 1)[:, :ctx].double()
        rep = n_heads // n_kv
        qq = q[rows].double().transpose(0, 1)  # [H, qlen, Dh]
        scores = qq @ k.repeat_interleave(rep, 0).transpose(1, 2) * dh**-0.5  # [H, qlen, ctx]
        pos = torch.arange(ctx)
        causal = pos[None, :] <= (start + torch.arange(qlen))[:, None]
        ref = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v.repeat_interleave(rep, 0)
        torch.testing.assert_close(out.double(), ref.transpose(0, 1), rtol=tol, atol=tol)


def test_paged_attention_writes_the_new_keys_and_values_first() -> None:
    """paged_attention stores this batch's K/V at slot_mapping, then attends over them."""
    g = torch.Generator().manual_seed(1)
    k_cache, v_cache = torch.zeros(2, 4, BLOCK, 16), torch.zeros(2, 4, BLOCK, 16)
    q, k, v = (
        torch.randn(5, 4, 16, generator=g),
        torch.randn(5, 2, 16, generator=g),
        torch.randn(5, 2, 16, generator=g),
    )
    meta = AttentionMetadata.build([0], [5], [[2]], BLOCK)
    out = paged_attention(q, k, v, k_cache, v_cache, meta, 0.25)
    assert torch.equal(k_cache[:, 2, :5], k.transpose(0, 1))
    assert torch.equal(v_cache[:, 2, :5], v.transpose(0, 1))
    torch.testing.assert_close(out, attend_torch(q, k_cache, v_cache, meta, 0.25))
    # the first query sees only itself: its output is its own value row
    torch.testing.assert_close(out[0], v[0].repeat_interleave(2, 0), rtol=1e-6, atol=1e-6)
