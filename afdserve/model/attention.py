"""Batched attention over a paged KV cache, for mixed prefill/decode batches.

Legend: T = tokens in the (micro)batch, B = sequences in a group, Q = padded query length,
K = padded context length, H = query heads, Hkv = KV heads, Dh = head dim.

The KV cache of one layer is a pair of tensors [num_blocks, block_size, Hkv, Dh]. A sequence's
token at position p lives in slot block_table[p // block_size] * block_size + p % block_size.
Sequences are grouped (decode rows with Q = 1, prefill chunks with Q > 1) and each group runs one
scaled_dot_product_attention over keys gathered from the cache with a padded slot index: no
Python loop over sequences on the hot path. Padding slots point at slot 0; the mask hides them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AttentionGroup:
    token_index: torch.Tensor  # [B, Q] int64: row of each query in the flat batch (pad: 0)
    token_valid: torch.Tensor  # [B, Q] bool
    kv_slots: torch.Tensor  # [B, K] int64: flat cache slot of each context position (pad: 0)
    mask: torch.Tensor  # [B, 1, Q, K] bool: True where the query may attend
    out_rows: torch.Tensor  # [n_valid] int64 = token_index[token_valid]


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs about one (micro)batch; built once, used by every layer."""

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    groups: tuple[AttentionGroup, ...]
    num_tokens: int

    @classmethod
    def build(
        cls,
        start_positions: Sequence[int],
        query_lens: Sequence[int],
        block_tables: Sequence[Sequence[int]],
        block_size: int,
        device: torch.device | str = "cpu",
    ) -> AttentionMetadata:
        """Metadata for sequences whose `query_lens[i]` new tokens follow `start_positions[i]`
        tokens already in the cache; tokens are laid out sequence after sequence."""
        positions: list[int] = []
        slots: list[int] = []
        offsets: list[int] = []
        for start, qlen, table in zip(start_positions, query_lens, block_tables, strict=True):
            offsets.append(len(positions))
            for p in range(start, start + qlen):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
        decode = [i for i, q in enumerate(query_lens) if q == 1]
        prefill = [i for i, q in enumerate(query_lens) if q > 1]
        groups = tuple(
            _build_group(idx, start_positions, query_lens, block_tables, offsets, block_size, device)
            for idx in (decode, prefill)
            if idx
        )
        return cls(
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            groups=groups,
            num_tokens=len(positions),
        )


def _build_group(
    idx: list[int],
    starts: Sequence[int],
    qlens: Sequence[int],
    tables: Sequence[Sequence[int]],
    offsets: list[int],
    block_size: int,
    device: torch.device | str,
) -> AttentionGroup:
    q_max = max(qlens[i] for i in idx)
    ctx = [starts[i] + qlens[i] for i in idx]
    k_max = max(ctx)
    n_blocks = (k_max + block_size - 1) // block_size
    table = torch.zeros(len(idx), n_blocks, dtype=torch.int64)  # [B, nb]
    for row, i in enumerate(idx):
        nb = (ctx[row] + block_size - 1) // block_size
        table[row, :nb] = torch.tensor(tables[i][:nb], dtype=torch.int64)
    pos = torch.arange(k_max)  # [K]
    kv_slots = table[:, pos // block_size] * block_size + pos % block_size  # [B, K]
    ctx_t = torch.tensor(ctx)  # [B]
    kv_slots = torch.where(pos[None, :] < ctx_t[:, None], kv_slots, 0)
    q_off = torch.arange(q_max)  # [Q]
    qlen_t = torch.tensor([qlens[i] for i in idx])  # [B]
    start_t = torch.tensor([starts[i] for i in idx])  # [B]
    token_valid = q_off[None, :] < qlen_t[:, None]  # [B, Q]
    token_index = torch.tensor([offsets[i] for i in idx])[:, None] + q_off[None, :]  # [B, Q]
    token_index = torch.where(token_valid, token_index, 0)
    q_pos = start_t[:, None] + q_off[None, :]  # [B, Q] absolute position of each query
    mask = (pos[None, None, :] <= q_pos[:, :, None]) & (pos[None, None, :] < ctx_t[:, None, None])
    return AttentionGroup(
        token_index=token_index.to(device),
        token_valid=token_valid.to(device),
        kv_slots=kv_slots.to(device),
        mask=mask[:, None].to(device),  # [B, 1, Q, K]
        out_rows=token_index[token_valid].to(device),
    )


def paged_attention(
    q: torch.Tensor,  # [T, H, Dh]
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    v_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, Dh]
    """Write this batch's K/V into the cache, then attend over each sequence's whole context."""
    n_kv, dh = k.shape[1], k.shape[2]
    k_flat = k_cache.view(-1, n_kv, dh)  # [S, Hkv, Dh], S = num_blocks * block_size
    v_flat = v_cache.view(-1, n_kv, dh)
    k_flat.index_copy_(0, meta.slot_mapping, k)
    v_flat.index_copy_(0, meta.slot_mapping, v)
    out = torch.empty_like(q)
    for g in meta.groups:  # at most two: decode rows, then prefill chunks
        qg = q[g.token_index].transpose(1, 2)  # [B, H, Q, Dh]
        kg = k_flat[g.kv_slots].transpose(1, 2)  # [B, Hkv, K, Dh]
        vg = v_flat[g.kv_slots].transpose(1, 2)  # [B, Hkv, K, Dh]
        og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask, scale=scale, enable_gqa=True)
        out[g.out_rows] = og.transpose(1, 2)[g.token_valid]  # [n_valid, H, Dh]
    return out
