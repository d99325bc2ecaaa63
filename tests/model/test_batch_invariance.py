"""A sequence's attention and FFN outputs must not depend on what else shares its batch: that
is what lets AFD (smaller per-worker batches, microbatches, a gathered FFN batch) reproduce the
aggregated tokens exactly."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from afdserve.model.attention import AttentionMetadata, paged_attention
from afdserve.model.kernels import Kernels

linear = Kernels(batch_invariant=True).linear

BLOCK = 4
N_BLOCKS = 64
H, HKV, DH = 4, 2, 8


def _attend(seqs, q_all, k_all, v_all, cache_k, cache_v):
    """Run attention for `seqs` [(start, qlen, table, rows)] in one batch; return per-seq outputs."""
    rows = [r for s in seqs for r in s[3]]
    meta = AttentionMetadata.build(
        [s[0] for s in seqs], [s[1] for s in seqs], [s[2] for s in seqs], BLOCK, q_all.device
    )
    out = paged_attention(
        q_all[rows], k_all[rows], v_all[rows], cache_k.clone(), cache_v.clone(), meta, DH**-0.5
    )
    res, at = [], 0
    for s in seqs:
        res.append(out[at : at + s[1]])
        at += s[1]
    return res


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_attention_is_batch_invariant(device, dtype, data):
    n = data.draw(st.integers(2, 5))
    seqs, next_block, next_row = [], 1, 0
    for _ in range(n):
        start = data.draw(st.integers(0, 40))
        qlen = data.draw(st.sampled_from([1, 1, 2, 3, 7, 16, 21]))
        nb = -(-(start + qlen) // BLOCK)
        table = list(range(next_block, next_block + nb))
        next_block += nb
        seqs.append((start, qlen, table, list(range(next_row, next_row + qlen))))
        next_row += qlen
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10**6)))
    q = torch.randn(next_row, H, DH, generator=g).to(dtype).to(device)
    k = torch.randn(next_row, HKV, DH, generator=g).to(dtype).to(device)
    v = torch.randn(next_row, HKV, DH, generator=g).to(dtype).to(device)
    ck = torch.randn(HKV, N_BLOCKS, BLOCK, DH, generator=g).to(dtype).to(device)
    cv = torch.randn(HKV, N_BLOCKS, BLOCK, DH, generator=g).to(dtype).to(device)
    together = _attend(seqs, q, k, v, ck, cv)
    order = data.draw(st.permutations(range(n)))
    shuffled = _attend([seqs[i] for i in order], q, k, v, ck, cv)
    for pos, i in enumerate(order):
        alone = _attend([seqs[i]], q, k, v, ck, cv)[0]
        assert torch.equal(together[i], alone)
        assert torch.equal(shuffled[pos], alone)


def test_attention_matches_reference_softmax():
    # one sequence, prefill of 5 after 3 cached tokens, against a dense causal computation
    g = torch.Generator().manual_seed(0)
    ck = torch.zeros(HKV, 8, BLOCK, DH)
    cv = torch.zeros(HKV, 8, BLOCK, DH)
    kk, vv = torch.randn(8, HKV, DH, generator=g), torch.randn(8, HKV, DH, generator=g)
    qq = torch.randn(8, H, DH, generator=g)
    table = [3, 5]
    for p in range(3):  # the cached prefix
        ck[:, table[p // BLOCK], p % BLOCK], cv[:, table[p // BLOCK], p % BLOCK] = kk[p], vv[p]
    meta = AttentionMetadata.build([3], [5], [table], BLOCK)
    out = paged_attention(qq[3:], kk[3:], vv[3:], ck, cv, meta, DH**-0.5)
    kr = kk.repeat_interleave(H // HKV, dim=1)  # [8, H, DH]
    vr = vv.repeat_interleave(H // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", qq[3:], kr) * DH**-0.5  # [H, 5, 8]
    causal = torch.arange(8)[None, :] <= torch.arange(3, 8)[:, None]
    ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), vr)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(48, 32), (4096, 1024)])
def test_linear_rows_do_not_depend_on_batch_size(device, dtype, shape):
    """(4096, 1024): on an H100, plain fp32 F.linear rows differ between M = 4 and M = 12."""
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(*shape, generator=g) * shape[1] ** -0.5).to(dtype).to(device)
    x = torch.randn(300, shape[1], generator=g).to(dtype).to(device)
    row = x[7:8]
    ref = linear(row, w)
    for m in [*range(1, 40), 127, 128, 129, 299]:
        batch = torch.cat([x[:m], row])
        assert torch.equal(linear(batch, w)[m:], ref), m


@pytest.mark.parametrize("device", DEVICES)
def test_long_prefill_is_attended_in_blocks_exactly(device):
    """Queries beyond Q_BLOCK are attended Q_BLOCK at a time: the result matches a dense causal
    reference, and a long sequence gives the same bits alone and beside short ones."""
    from afdserve.model.attention import Q_BLOCK

    g = torch.Generator().manual_seed(3)
    start, qlen = 9, Q_BLOCK * 2 + 37  # bucket 4 * Q_BLOCK: two full blocks, one partial, one empty
    n_blocks = -(-(start + qlen) // BLOCK)
    ck = torch.zeros(HKV, n_blocks + 40, BLOCK, DH)
    cv = torch.zeros(HKV, n_blocks + 40, BLOCK, DH)
    kk = torch.randn(start + qlen, HKV, DH, generator=g)
    vv = torch.randn(start + qlen, HKV, DH, generator=g)
    qq = torch.randn(start + qlen, H, DH, generator=g)
    table = list(range(1, n_blocks + 1))
    for p in range(start):  # the cached prefix
        ck[:, table[p // BLOCK], p % BLOCK], cv[:, table[p // BLOCK], p % BLOCK] = kk[p], vv[p]
    ck, cv, kk, vv, qq = (t.to(device) for t in (ck, cv, kk, vv, qq))
    meta = AttentionMetadata.build([start], [qlen], [table], BLOCK, device)
    out = paged_attention(
        qq[start:], kk[start:], vv[start:], ck.clone(), cv.clone(), meta, DH**-0.5
    )
    kr = kk.repeat_interleave(H // HKV, dim=1)  # [S, H, DH]
    vr = vv.repeat_interleave(H // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", qq[start:], kr) * DH**-0.5  # [H, qlen, S]
    pos = torch.arange(start + qlen, device=device)
    causal = pos[None, :] <= pos[start:, None]
    ref = torch.einsum("hqk,khd->qhd", scores.masked_fill(~causal, float("-inf")).softmax(-1), vr)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # beside two short sequences (their own blocks after the long one's), the long one's rows
    # are bit-identical to its rows alone
    s_tables = [list(range(n_blocks + 1, n_blocks + 3)), list(range(n_blocks + 3, n_blocks + 5))]
    extra_q = torch.randn(8, H, DH, generator=g).to(device)
    extra_k = torch.randn(8, HKV, DH, generator=g).to(device)
    extra_v = torch.randn(8, HKV, DH, generator=g).to(device)
    meta2 = AttentionMetadata.build([start, 0, 2], [qlen, 3, 5], [table, *s_tables], BLOCK, device)
    out2 = paged_attention(
        torch.cat([qq[start:], extra_q]),
        torch.cat([kk[start:], extra_k]),
        torch.cat([vv[start:], extra_v]),
        ck.clone(),
        cv.clone(),
        meta2,
        DH**-0.5,
    )
    assert torch.equal(out2[:qlen], out)
