"""Batched attention over a paged KV cache, for mixed prefill/decode batches.

Legend: T = tokens in the (micro)batch, S = sequences, B = sequences in a group, Q = padded
query length, K = padded context length, H = query heads, Hkv = KV heads, Dh = head dim.

The KV cache of one layer is a pair of tensors [Hkv, num_blocks, block_size, Dh]. A sequence's
token at position p lives in slot block_table[p // block_size] * block_size + p % block_size.

Two implementations of one contract, both batch-invariant (a sequence's result does not depend
on which other sequences share its batch, or AFD, which splits the batch across workers and
microbatches, could not give exactly the aggregated tokens):

- On a CPU, the native kernel (csrc/paged_attention.c, built on first use by model/native.py)
  reads each sequence's blocks in place and computes every query row from its own q and its own
  sequence's keys and values in an order fixed by its position alone. It is invariant by
  construction: to the batch, to how a prompt was chunked, to the thread count, to the CPU.
- On a GPU, or where the kernel cannot be built, torch ops: sequences are grouped by shape
  bucket and each group runs one batched attention over keys gathered from the cache with a
  padded slot index. Kernels block their reductions by the padded lengths, so a sequence is
  always padded to a size that depends only on itself: Q to the next power of two (1 for
  decode), K to the next of 4 steps per octave of its context (16, 20, 24, 28, 32, 40, ..., at
  most 25% padding; at least 16). Sequences with equal buckets share one batched matmul; the
  batch dimension itself does not change results. Padding slots point at slot 0; the mask hides
  them.

A quantised cache (`--kv-cache-dtype int8|fp8`, model/kv_quant.py) stands in a `QuantizedKV`
for each tensor: the write quantises each new (token, KV head) row on its own, and both
implementations dequantise what they read (the native kernel row by row as it loads keys and
values, the torch one the gathered blocks) to float32 values, code * scale, before the same
math as above. Dequantisation is elementwise, so batch invariance holds as it does unquantised.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from afdserve.model import native
from afdserve.model.kv_quant import QuantizedKV

KVLayer = torch.Tensor | QuantizedKV
"""One layer's K or V cache: [Hkv, num_blocks, block_size, Dh] in the model dtype, or quantised."""


@dataclass(frozen=True)
class AttentionGroup:
    token_index: torch.Tensor  # [B, Q] int64: row of each query in the flat batch (pad: 0)
    token_valid: torch.Tensor  # [B, Q] bool
    kv_blocks: (
        torch.Tensor
    )  # [B, nb] int64: KV blocks of each sequence, K = nb * block_size (pad: 0)
    masked_out: (
        torch.Tensor
    )  # [B, 1, Q, K] bool: True where the query may NOT attend (broadcasts over Hkv, rep)
    out_rows: torch.Tensor  # [n_valid] int64 = token_index[token_valid]
    max_query_len: int = 1
    """The longest query run in the group (Q is its power-of-two bucket)."""


@dataclass(frozen=True)
class AttentionMetadata:
    """Everything attention needs about one (micro)batch; built once, used by every layer."""

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64: where each new token's K/V is written
    num_tokens: int
    start_positions: tuple[int, ...]
    query_lens: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...]
    block_size: int
    device: torch.device
    min_block: int = 0
    max_block: int = 0
    """The smallest and largest block any table names (checked against the cache)."""
    _groups: list[tuple[AttentionGroup, ...]] = field(default_factory=list, repr=False)
    _native: list[tuple[torch.Tensor, ...]] = field(default_factory=list, repr=False)

    @property
    def groups(self) -> tuple[AttentionGroup, ...]:
        """The shape-bucket groups of the torch implementation, built on first use."""
        if not self._groups:
            self._groups.append(_build_groups(self))
        return self._groups[0]

    @property
    def native_inputs(self) -> tuple[torch.Tensor, ...]:
        """(block tables [S, nb], first row [S], query length [S], start position [S]), int64
        on the CPU, for the native kernel; built on first use."""
        if not self._native:
            if self.min_block < 0:
                raise ValueError(f"block table names block {self.min_block}")
            nb = max((len(t) for t in self.block_tables), default=1) or 1
            tables = torch.zeros(len(self.block_tables), nb, dtype=torch.int64)
            for i, t in enumerate(self.block_tables):
                tables[i, : len(t)] = torch.tensor(t, dtype=torch.int64)
            rows = [0]
            for n in self.query_lens[:-1]:
                rows.append(rows[-1] + n)
            self._native.append(
                (
                    tables,
                    torch.tensor(rows, dtype=torch.int64),
                    torch.tensor(self.query_lens, dtype=torch.int64),
                    torch.tensor(self.start_positions, dtype=torch.int64),
                )
            )
        return self._native[0]

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
        tables: list[tuple[int, ...]] = []
        for start, qlen, table in zip(start_positions, query_lens, block_tables, strict=True):
            need = -(-(start + qlen) // block_size)
            if len(table) < need:
                raise ValueError(f"block table of {len(table)} blocks, {need} needed")
            tables.append(tuple(table[:need]))
            for p in range(start, start + qlen):
                positions.append(p)
                slots.append(table[p // block_size] * block_size + p % block_size)
        return cls(
            positions=torch.tensor(positions, dtype=torch.int64, device=device),
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            num_tokens=len(positions),
            start_positions=tuple(start_positions),
            query_lens=tuple(query_lens),
            block_tables=tuple(tables),
            block_size=block_size,
            device=torch.device(device),
            min_block=min((min(t) for t in tables if t), default=0),
            max_block=max((max(t) for t in tables if t), default=0),
        )


def _build_groups(meta: AttentionMetadata) -> tuple[AttentionGroup, ...]:
    starts, qlens = meta.start_positions, meta.query_lens
    offsets, at = [], 0
    for n in qlens:
        offsets.append(at)
        at += n
    buckets: dict[tuple[int, int], list[int]] = {}
    for i, (start, qlen) in enumerate(zip(starts, qlens, strict=True)):
        buckets.setdefault((_bucket(qlen, 1), _k_bucket(start + qlen)), []).append(i)
    return tuple(
        _build_group(
            idx, q_b, k_b, starts, qlens, meta.block_tables, offsets, meta.block_size, meta.device
        )
        for (q_b, k_b), idx in sorted(buckets.items())
    )


MIN_K_BUCKET = 16
Q_BLOCK = 256
"""Longest run of queries attended in one matmul. A longer prefill chunk is attended Q_BLOCK
queries at a time, so its scores take Hkv x B x rep x Q_BLOCK x K floats, not x Q: without it, a
2048-token chunk at a 32K context of a 32-head model would need 8.6 GB of fp32 scores (32 x 2048
x 32768 x 4 bytes).
Q buckets are powers of two, so every block is full, and a sequence is always split the same
way whatever shares its batch (batch invariance holds)."""


def _bucket(n: int, minimum: int) -> int:
    """The next power of two >= max(n, minimum)."""
    return 1 << (max(n, minimum) - 1).bit_length()


def _k_bucket(n: int) -> int:
    """The next size >= max(n, MIN_K_BUCKET) of the form 2^e * {1, 1.25, 1.5, 1.75}."""
    n = max(n, MIN_K_BUCKET)
    step = max(1, 1 << max(0, (n - 1).bit_length() - 3))  # a quarter of the enclosing octave's base
    return -(-n // step) * step


def _build_group(
    idx: list[int],
    q_max: int,
    k_max: int,
    starts: Sequence[int],
    qlens: Sequence[int],
    tables: Sequence[Sequence[int]],
    offsets: list[int],
    block_size: int,
    device: torch.device | str,
) -> AttentionGroup:
    ctx = [starts[i] + qlens[i] for i in idx]
    n_blocks = -(-k_max // block_size)
    table = torch.zeros(len(idx), n_blocks, dtype=torch.int64)  # [B, nb], padded with block 0
    for row, i in enumerate(idx):
        nb = -(-ctx[row] // block_size)
        table[row, :nb] = torch.tensor(tables[i][:nb], dtype=torch.int64)
    pos = torch.arange(n_blocks * block_size)  # [K]
    ctx_t = torch.tensor(ctx)  # [B]
    q_off = torch.arange(q_max)  # [Q]
    qlen_t = torch.tensor([qlens[i] for i in idx])  # [B]
    start_t = torch.tensor([starts[i] for i in idx])  # [B]
    token_valid = q_off[None, :] < qlen_t[:, None]  # [B, Q]
    token_index = torch.tensor([offsets[i] for i in idx])[:, None] + q_off[None, :]  # [B, Q]
    token_index = torch.where(token_valid, token_index, 0)
    q_pos = start_t[:, None] + q_off[None, :]  # [B, Q] absolute position of each query
    # built once per step for every layer, and inverted here so no layer has to invert it
    masked_out = (pos[None, None, :] > q_pos[:, :, None]) | (
        pos[None, None, :] >= ctx_t[:, None, None]
    )
    return AttentionGroup(
        token_index=token_index.to(device),
        token_valid=token_valid.to(device),
        kv_blocks=table.to(device),
        masked_out=masked_out[:, None].to(device),  # [B, 1, Q, K]
        out_rows=token_index[token_valid].to(device),
        max_query_len=max(qlens[i] for i in idx),
    )


def paged_attention(
    q: torch.Tensor,  # [T, H, Dh]
    k: torch.Tensor,  # [T, Hkv, Dh]
    v: torch.Tensor,  # [T, Hkv, Dh]
    k_cache: KVLayer,  # [Hkv, num_blocks, block_size, Dh]
    v_cache: KVLayer,  # [Hkv, num_blocks, block_size, Dh]
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, Dh]
    """Write this batch's K/V into the cache (quantised, for a quantised cache), then attend
    over each sequence's whole context: with the native kernel on a CPU where it builds, with
    torch ops otherwise."""
    if isinstance(k_cache, QuantizedKV) and isinstance(v_cache, QuantizedKV):
        k_cache.write(meta.slot_mapping, k)
        v_cache.write(meta.slot_mapping, v)
    else:
        n_kv, dh = k.shape[1], k.shape[2]
        k_flat = k_cache.view(n_kv, -1, dh)  # [Hkv, S, Dh], S = num_blocks * block_size
        v_flat = v_cache.view(n_kv, -1, dh)
        k_flat.index_copy_(1, meta.slot_mapping, k.transpose(0, 1))
        v_flat.index_copy_(1, meta.slot_mapping, v.transpose(0, 1))
    if native_available(q):
        return attend_native(q, k_cache, v_cache, meta, scale)
    return attend_torch(q, k_cache, v_cache, meta, scale)


def native_available(q: torch.Tensor) -> bool:
    """Whether the native kernel can attend for queries like `q` here."""
    return (
        q.device.type == "cpu"
        and q.shape[-1] <= native.MAX_HEAD_DIM
        and q.dtype in native.KINDS
        and native.paged_attention_kernel() is not None
    )


def attend_torch(
    q: torch.Tensor,  # [T, H, Dh]
    k_cache: KVLayer,  # [Hkv, num_blocks, block_size, Dh]
    v_cache: KVLayer,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, Dh]
    """Attention with torch ops, one batched matmul per shape bucket (the module docstring).

    The cache is head-major, so gathering a group's blocks yields [Hkv, B, K, Dh] with (Dh)
    rows contiguous: matmul reads it in place, with no transposing copy of the context. A
    quantised cache's gathered blocks are dequantised to q's dtype first.
    """
    n_kv, dh = k_cache.shape[0], k_cache.shape[3]
    out = torch.empty_like(q)
    for g in meta.groups:  # one per shape bucket, a handful at most
        b, q_len = g.token_index.shape
        # index_select on the flat block list: the same copy as k_cache[:, kv_blocks], about
        # twice as fast on CPU (a scratch timing on the dev VM, fp32, 8-22 MB gathers)
        blocks = g.kv_blocks.view(-1)  # [B * nb]
        kg = _gather(k_cache, blocks, q.dtype).view(n_kv, b, -1, dh)  # [Hkv, B, K, Dh]
        vg = _gather(v_cache, blocks, q.dtype).view(n_kv, b, -1, dh)  # [Hkv, B, K, Dh]
        if q_len <= Q_BLOCK:
            _attend_block(
                q, kg, vg, g.token_index, g.token_valid, g.masked_out, g.out_rows, out, scale
            )
            continue
        for q0 in range(0, g.max_query_len, Q_BLOCK):  # long prefill: bounded score memory
            index = g.token_index[:, q0 : q0 + Q_BLOCK]  # [B, Q_BLOCK]
            valid = g.token_valid[:, q0 : q0 + Q_BLOCK]
            masked_out = g.masked_out[:, :, q0 : q0 + Q_BLOCK]  # [B, 1, Q_BLOCK, K]
            _attend_block(q, kg, vg, index, valid, masked_out, index[valid], out, scale)
    return out


def _gather(
    cache: KVLayer,  # [Hkv, num_blocks, block_size, Dh]
    blocks: torch.Tensor,  # [n] int64
    dtype: torch.dtype,
) -> torch.Tensor:  # [Hkv, n, block_size, Dh]
    if isinstance(cache, QuantizedKV):
        return cache.gather(blocks, dtype)
    return cache.index_select(1, blocks)


def _native_kv(
    k_cache: KVLayer, v_cache: KVLayer, q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int, int, int]:
    """(K data, V data, their kv_kind, K scales pointer, V scales pointer; 0 when not
    quantised), checked: C cannot check pointers."""
    shape = k_cache.shape
    if isinstance(k_cache, QuantizedKV) or isinstance(v_cache, QuantizedKV):
        if not (isinstance(k_cache, QuantizedKV) and isinstance(v_cache, QuantizedKV)):
            raise ValueError("K and V caches must both be quantised, or neither")
        if k_cache.fmt != v_cache.fmt or v_cache.shape != shape:
            raise ValueError("K and V caches disagree in format or shape")
        for c in (k_cache, v_cache):
            if not (
                c.codes.is_contiguous()
                and c.scale.is_contiguous()
                and c.codes.dtype == c.fmt.storage
                and c.scale.dtype == torch.float32
                and c.scale.shape == shape[:3]
            ):
                raise ValueError(
                    "quantised KV must be contiguous codes [Hkv, num_blocks, block_size, Dh] "
                    "and float32 scales [Hkv, num_blocks, block_size]"
                )
        return (
            k_cache.codes,
            v_cache.codes,
            k_cache.fmt.native_kind,
            k_cache.scale.data_ptr(),
            v_cache.scale.data_ptr(),
        )
    if not (k_cache.is_contiguous() and v_cache.is_contiguous() and v_cache.shape == shape):
        raise ValueError("KV cache tensors must be contiguous [Hkv, num_blocks, block_size, Dh]")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError("queries and KV cache disagree in dtype")
    return k_cache, v_cache, native.KINDS[q.dtype], 0, 0


def attend_native(
    q: torch.Tensor,  # [T, H, Dh]
    k_cache: KVLayer,  # [Hkv, num_blocks, block_size, Dh]
    v_cache: KVLayer,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:  # [T, H, Dh]
    """Attention with the native kernel (csrc/paged_attention.c), which dequantises a quantised
    cache as it reads it. What it is given is checked here, since C cannot check pointers."""
    lib = native.paged_attention_kernel()
    if lib is None:
        raise RuntimeError("the native paged-attention kernel is not available here")
    q = q.contiguous()
    tables, rows, qlens, starts = meta.native_inputs
    n_kv, num_blocks, block_size, dh = k_cache.shape
    k_data, v_data, kv_kind, k_scale, v_scale = _native_kv(k_cache, v_cache, q)
    if q.shape[0] != meta.num_tokens:
        raise ValueError("queries and attention metadata disagree in token count")
    if q.shape[1] % n_kv or q.shape[2] != dh or block_size != meta.block_size:
        raise ValueError("query heads, head dim or block size do not match the KV cache")
    if meta.max_block >= num_blocks:
        raise ValueError(f"block table names block {meta.max_block}, the cache has {num_blocks}")
    out = torch.empty_like(q)
    rc = lib.afd_paged_attention(
        q.data_ptr(),
        k_data.data_ptr(),
        v_data.data_ptr(),
        tables.data_ptr(),
        tables.shape[1],
        rows.data_ptr(),
        qlens.data_ptr(),
        starts.data_ptr(),
        len(meta.query_lens),
        q.shape[1],
        n_kv,
        dh,
        num_blocks,
        block_size,
        scale,
        out.data_ptr(),
        native.KINDS[q.dtype],
        torch.get_num_threads(),
        kv_kind,
        k_scale,
        v_scale,
    )
    if rc == -1:
        raise MemoryError("native paged attention could not allocate its scratch memory")
    if rc != 0:
        raise ValueError(f"native paged attention refused its arguments (code {rc})")
    return out


def _attend_block(
    q: torch.Tensor,  # [T, H, Dh]
    kg: torch.Tensor,  # [Hkv, B, K, Dh]
    vg: torch.Tensor,  # [Hkv, B, K, Dh]
    token_index: torch.Tensor,  # [B, Q]
    token_valid: torch.Tensor,  # [B, Q]
    masked_out: torch.Tensor,  # [B, 1, Q, K] bool, True: may not attend
    out_rows: torch.Tensor,  # [n_valid]
    out: torch.Tensor,  # [T, H, Dh], written at out_rows
    scale: float,
) -> None:
    """Attention of one group's queries (or one Q_BLOCK of them) over the gathered context."""
    n_kv, b, _, dh = kg.shape
    n_heads = q.shape[1]
    rep = n_heads // n_kv  # query heads per KV head (GQA); head h reads KV head h // rep
    q_len = token_index.shape[1]
    # [B, Q, H, Dh] -> [Hkv, B, rep*Q, Dh], contiguous: matmul picks its kernel by layout
    qg = q[token_index].view(b, q_len, n_kv, rep, dh).permute(2, 0, 3, 1, 4)
    qg = qg.reshape(n_kv, b, rep * q_len, dh)
    # in place on the fresh scores: the same values as `* scale` and `masked_fill`, two fewer
    # allocations of the largest tensor here
    scores = torch.matmul(qg, kg.transpose(2, 3)).mul_(scale)  # [Hkv, B, rep*Q, K]
    scores = scores.view(n_kv, b, rep, q_len, -1).masked_fill_(masked_out, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)  # [Hkv, B, rep, Q, K]
    og = torch.matmul(probs.view(n_kv, b, rep * q_len, -1), vg)  # [Hkv, B, rep*Q, Dh]
    og = og.view(n_kv, b, rep, q_len, dh).permute(1, 3, 0, 2, 4)  # [B, Q, Hkv, rep, Dh]
    out[out_rows] = og[token_valid].reshape(-1, n_heads, dh)  # [n_valid, H, Dh]
