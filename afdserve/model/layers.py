"""Building blocks: RMSNorm, the attention sub-block, the dense MLP and the MoE block.

Legend: T = tokens, D = hidden size, H = query heads, Hkv = KV heads, Dh = head dim,
I = intermediate size, E = experts, k = experts per token.

Parameters are created uninitialised (`torch.empty`): every one is overwritten by the loader,
and random init of a large model would only cost time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from afdserve.model.attention import AttentionMetadata, paged_attention
from afdserve.model.config import ModelConfig
from afdserve.model.kernels import Kernels, PreparedWeight, compute_dtype
from afdserve.model.rope import apply_rotary


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T + b. The loader fills `weight`; `prepare()` then turns it into the kernels'
    form (model/kernels.py) and drops the plain copy."""

    def __init__(
        self, d_in: int, d_out: int, bias: bool, dtype: torch.dtype, kernels: Kernels
    ) -> None:
        super().__init__()
        self.weight = _param(d_out, d_in, dtype=dtype)
        self.bias = _param(d_out, dtype=dtype) if bias else None
        self.kernels = kernels
        self.prepared: PreparedWeight | None = None

    def prepare(self) -> None:
        self.prepared = self.kernels.prepare(self.weight.detach())
        self.weight = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, in] -> [T, out]
        if self.prepared is None:
            raise RuntimeError("Linear used before prepare_weights() (load the part first)")
        return self.kernels.linear(x, self.prepared, self.bias)


def prepare_weights(module: nn.Module) -> None:
    """Prepare every GEMM weight under `module` for its kernels, once, after loading."""
    for m in module.modules():
        if isinstance(m, Linear | MoE) and getattr(m, "prepared", None) is None:
            m.prepare()


class RMSNorm(nn.Module):
    """HF's LlamaRMSNorm: normalise in float32, cast back, then scale."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _param(dim, dtype=dtype)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype, kernels: Kernels) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_size, self.kv_size = c.q_size, c.kv_size
        # q, k and v in one GEMM: the loader stores HF's three projections as its row blocks
        self.qkv_proj = Linear(c.hidden_size, c.q_size + 2 * c.kv_size, c.qkv_bias, dtype, kernels)
        self.o_proj = Linear(c.q_size, c.hidden_size, c.o_bias, dtype, kernels)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype) if c.qk_norm else None
        self.scale = c.head_dim**-0.5

    def forward(
        self,
        x: torch.Tensor,  # [T, D]
        meta: AttentionMetadata,
        cos: torch.Tensor,  # [T, Dh]
        sin: torch.Tensor,  # [T, Dh]
        k_cache: torch.Tensor,  # [num_blocks, block_size, Hkv, Dh]
        v_cache: torch.Tensor,
    ) -> torch.Tensor:  # [T, D]
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.n_heads, self.head_dim)  # [T, H, Dh]
        k = k.view(t, self.n_kv, self.head_dim)  # [T, Hkv, Dh]
        v = v.view(t, self.n_kv, self.head_dim)  # [T, Hkv, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)  # [T, H, Dh]
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one [2I, D] GEMM.

    The loader stores HF's gate_proj and up_proj as the two halves of `gate_up_proj`.
    """

    def __init__(self, d: int, inter: int, dtype: torch.dtype, kernels: Kernels) -> None:
        super().__init__()
        self.gate_up_proj = Linear(d, 2 * inter, False, dtype, kernels)
        self.down_proj = Linear(inter, d, False, dtype, kernels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [T, I] each, views of one output
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))  # in place: same values


GROUPED_ROWS = 64
"""Fast mode: below this many (token, expert) pairs per expert on average, all experts run as
one batched GEMM per projection (rows padded to the busiest expert's) instead of a loop of
per-expert GEMMs, whose Python and call overhead dominates at decode sizes."""


class MoE(nn.Module):
    """Top-k routed experts (Mixtral, Qwen3-MoE); experts are stacked for fast indexing.

    Routing follows HF: softmax in float32 over all experts, top-k, optional renormalisation,
    cast to the activation dtype. The T*k (token, expert) pairs are sorted by expert so each
    expert runs one GEMM on a contiguous slice (the exact mode: each on fixed row tiles; the
    fast mode: a grouped batched GEMM when experts get few rows); results go back to (token,
    slot) order and each token sums its k weighted outputs in slot order, so a token's result
    does not depend on which other tokens share its batch.
    """

    def __init__(self, c: ModelConfig, dtype: torch.dtype, kernels: Kernels) -> None:
        super().__init__()
        d, inter, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
        self.num_experts, self.top_k, self.norm_topk_prob = (
            e,
            c.num_experts_per_tok,
            c.norm_topk_prob,
        )
        self.gate = Linear(d, e, False, dtype, kernels)
        self.kernels = kernels
        self.w_gate_up = _param(e, 2 * inter, d, dtype=dtype)  # [E, 2I, D]: gate rows, then up rows
        self.w_down = _param(e, d, inter, dtype=dtype)  # [E, D, I]
        self.prepared: tuple[list[PreparedWeight], list[PreparedWeight]] | None = None
        self.stacked: tuple[torch.Tensor, torch.Tensor] | None = None
        """Fast mode: [E, D, 2I] and [E, I, D] in the compute dtype, for batched GEMMs."""

    def prepare(self) -> None:
        """The weights in the kernels' form; the plain stacked copies are dropped. The exact
        mode keeps one prepared weight per expert (tiled GEMMs), the fast mode one stacked
        tensor per projection (grouped and per-expert GEMMs both read it)."""
        if self.kernels.batch_invariant:
            self.prepared = (
                [self.kernels.prepare(w) for w in self.w_gate_up.detach()],  # E x [2I, D]
                [self.kernels.prepare(w) for w in self.w_down.detach()],  # E x [D, I]
            )
        else:
            dtype = compute_dtype(self.w_down)
            self.stacked = (
                self.w_gate_up.detach().to(dtype).transpose(1, 2).contiguous(),  # [E, D, 2I]
                self.w_down.detach().to(dtype).transpose(1, 2).contiguous(),  # [E, I, D]
            )
        self.w_gate_up = self.w_down = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        t, d = x.shape
        router_logits = self.gate(x)  # [T, E]
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [T, k], [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        flat = experts.flatten()  # [T*k] expert of each (token, slot) pair
        order = torch.argsort(flat, stable=True)  # [T*k] pairs grouped by expert
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # [E]
        xs = x[order // self.top_k]  # [T*k, D] token rows in expert order
        if self.prepared is not None:
            ys = self._experts_tiled(xs, counts)
        elif self.stacked is not None:
            ys = self._experts_fast(xs, counts, flat[order])
        else:
            raise RuntimeError("MoE used before prepare_weights() (load the part first)")
        y = torch.empty_like(ys)
        y[order] = ys  # back to (token, slot) order
        y = y.view(t, self.top_k, d) * weights[:, :, None]  # [T, k, D]
        out = y[:, 0]
        for j in range(1, self.top_k):  # fixed order: slot 0 (highest weight) first
            out = out + y[:, j]
        return out  # [T, D]

    def _experts_tiled(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The exact mode: each expert's slice of `xs` [T*k, D] through its own GEMMs."""
        w_gate_up, w_down = self.prepared
        ys = torch.empty_like(xs)  # [T*k, D]
        start = 0
        for e, n in enumerate(counts):
            if n:
                gate, up = self.kernels.linear(xs[start : start + n], w_gate_up[e]).chunk(
                    2, dim=-1
                )  # [n, I]
                ys[start : start + n] = self.kernels.linear(F.silu(gate) * up, w_down[e])
                start += n
        return ys

    def _experts_fast(
        self, xs: torch.Tensor, counts: list[int], expert_of: torch.Tensor
    ) -> torch.Tensor:
        """The fast mode: `xs` [T*k, D] (grouped by expert; `expert_of` [T*k]) through the
        stacked weights, as one grouped GEMM per projection when experts get few rows."""
        w_gate_up, w_down = self.stacked  # [E, D, 2I], [E, I, D]
        dtype = xs.dtype
        xc = xs.to(w_gate_up.dtype)
        active = sum(1 for n in counts if n)
        if xs.shape[0] < GROUPED_ROWS * active:
            e, rows = self.num_experts, max(counts)
            starts = torch.tensor([0, *counts[:-1]], device=xs.device).cumsum(0)  # [E]
            within = torch.arange(xs.shape[0], device=xs.device) - starts[expert_of]  # [T*k]
            dest = expert_of * rows + within  # [T*k] row in the padded [E * rows] grid
            xp = xc.new_zeros(e * rows, xc.shape[1])  # [E * rows, D]
            xp[dest] = xc
            h = torch.bmm(xp.view(e, rows, -1), w_gate_up)  # [E, rows, 2I]
            gate, up = h.chunk(2, dim=-1)  # [E, rows, I]
            o = torch.bmm(F.silu(gate, inplace=True).mul_(up), w_down)  # [E, rows, D]
            return o.view(e * rows, -1)[dest].to(dtype)  # [T*k, D]
        ys = torch.empty_like(xc)  # [T*k, D]
        start = 0
        for ex, n in enumerate(counts):
            if n:
                gate, up = (xc[start : start + n] @ w_gate_up[ex]).chunk(2, dim=-1)  # [n, I]
                ys[start : start + n] = F.silu(gate, inplace=True).mul_(up) @ w_down[ex]
                start += n
        return ys.to(dtype)


class AttentionBlock(nn.Module):
    """The attention side of one decoder layer: h = x + attn(input_layernorm(x))."""

    def __init__(self, c: ModelConfig, dtype: torch.dtype, kernels: Kernels) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.self_attn = SelfAttention(c, dtype, kernels)

    def forward(self, x, meta, cos, sin, k_cache, v_cache) -> torch.Tensor:  # [T, D] -> [T, D]
        return x + self.self_attn(self.input_layernorm(x), meta, cos, sin, k_cache, v_cache)


class FFNBlock(nn.Module):
    """The FFN side of one decoder layer: y = mlp(post_attention_layernorm(h)); caller adds h."""

    def __init__(self, c: ModelConfig, layer: int, dtype: torch.dtype, kernels: Kernels) -> None:
        super().__init__()
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp: nn.Module = (
            MoE(c, dtype, kernels)
            if c.is_moe_layer(layer)
            else MLP(c.hidden_size, c.intermediate_size, dtype, kernels)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        return self.mlp(self.post_attention_layernorm(h))
