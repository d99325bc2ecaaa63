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
from afdserve.model.rope import apply_rotary

ROW_MULTIPLE = 4


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the row count padded to a multiple of ROW_MULTIPLE ([M, in] -> [M, out]).

    Batch invariance: CPU GEMM kernels compute the 1-3 leftover rows of a matrix with a
    different micro-kernel, so a token's output would depend on how many tokens share its batch
    (measured: fp32 rows differ in the last bits for M = 1, 2, 3). Padding with zero rows makes
    every row go through the same kernel, so AFD's smaller per-worker batches give exactly the
    aggregated result.
    """
    m = x.shape[0]
    pad = -m % ROW_MULTIPLE
    if not pad:
        return F.linear(x, weight, bias)
    return F.linear(F.pad(x, (0, 0, 0, pad)), weight, bias)[:m]


def _param(*shape: int, dtype: torch.dtype) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    def __init__(self, d_in: int, d_out: int, bias: bool, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = _param(d_out, d_in, dtype=dtype)
        self.bias = _param(d_out, dtype=dtype) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


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
    def __init__(self, c: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = (
            c.num_attention_heads,
            c.num_key_value_heads,
            c.head_dim,
        )
        self.q_proj = Linear(c.hidden_size, c.q_size, c.qkv_bias, dtype)
        self.k_proj = Linear(c.hidden_size, c.kv_size, c.qkv_bias, dtype)
        self.v_proj = Linear(c.hidden_size, c.kv_size, c.qkv_bias, dtype)
        self.o_proj = Linear(c.q_size, c.hidden_size, c.o_bias, dtype)
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
        q = self.q_proj(x).view(t, self.n_heads, self.head_dim)  # [T, H, Dh]
        k = self.k_proj(x).view(t, self.n_kv, self.head_dim)  # [T, Hkv, Dh]
        v = self.v_proj(x).view(t, self.n_kv, self.head_dim)  # [T, Hkv, Dh]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        o = paged_attention(q, k, v, k_cache, v_cache, meta, self.scale)  # [T, H, Dh]
        return self.o_proj(o.reshape(t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, d: int, inter: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.gate_proj = Linear(d, inter, False, dtype)
        self.up_proj = Linear(d, inter, False, dtype)
        self.down_proj = Linear(inter, d, False, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Top-k routed experts (Mixtral, Qwen3-MoE); experts are stacked for fast indexing.

    Routing follows HF: softmax in float32 over all experts, top-k, optional renormalisation,
    cast to the activation dtype. Each token's expert outputs are accumulated in expert order,
    so a token's result does not depend on which other tokens share its batch.
    """

    def __init__(self, c: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        d, inter, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
        self.top_k, self.norm_topk_prob = c.num_experts_per_tok, c.norm_topk_prob
        self.gate = Linear(d, e, False, dtype)
        self.w_gate = _param(e, inter, d, dtype=dtype)  # [E, I, D]
        self.w_up = _param(e, inter, d, dtype=dtype)  # [E, I, D]
        self.w_down = _param(e, d, inter, dtype=dtype)  # [E, D, I]

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        router_logits = self.gate(x)  # [T, E]
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
        weights, experts = torch.topk(probs, self.top_k, dim=-1)  # [T, k], [T, k]
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)  # [T, D]
        for e in torch.unique(experts).tolist():  # only the experts this batch routes to
            rows, slot = torch.where(experts == e)  # [n_e], [n_e]
            h = x[rows]  # [n_e, D]
            y = linear(F.silu(linear(h, self.w_gate[e])) * linear(h, self.w_up[e]), self.w_down[e])
            out.index_add_(0, rows, y * weights[rows, slot, None])
        return out


class AttentionBlock(nn.Module):
    """The attention side of one decoder layer: h = x + attn(input_layernorm(x))."""

    def __init__(self, c: ModelConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.self_attn = SelfAttention(c, dtype)

    def forward(self, x, meta, cos, sin, k_cache, v_cache) -> torch.Tensor:  # [T, D] -> [T, D]
        return x + self.self_attn(self.input_layernorm(x), meta, cos, sin, k_cache, v_cache)


class FFNBlock(nn.Module):
    """The FFN side of one decoder layer: y = mlp(post_attention_layernorm(h)); caller adds h."""

    def __init__(self, c: ModelConfig, layer: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp: nn.Module = (
            MoE(c, dtype)
            if c.is_moe_layer(layer)
            else MLP(c.hidden_size, c.intermediate_size, dtype)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        return self.mlp(self.post_attention_layernorm(h))
