"""Building blocks: RMSNorm, the attention sub-block, the dense MLP and the MoE block.

Legend: T = tokens, D = hidden size, H = query heads, Hkv = KV heads, Dh = head dim,
I = intermediate size, E = experts, k = experts per token.

Parameters are created uninitialised (`torch.empty`): every one is overwritten by the loader,
and random init of a large model would only cost time.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from afdserve.model.attention import AttentionMetadata, paged_attention
from afdserve.model.config import ModelConfig
from afdserve.model.experts import ExpertSet, combine, route, token_pairs
from afdserve.model.kernels import Kernels, PreparedWeight
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


class MoE(nn.Module):
    """Top-k routed experts (Mixtral, Qwen3-MoE): the router (`gate`) and an `ExpertSet`.

    Routing follows HF (model/experts.py `route`); the T*k (token, slot) pairs run through the
    experts grouped by expert (the exact mode: each expert on fixed row tiles; the fast mode: a
    grouped batched GEMM when experts get few rows), and each token sums its k weighted outputs
    in slot order, so a token's result does not depend on which other tokens share its batch.
    `expert_ids` (default all E) are the experts this block holds: an FFN worker under expert
    parallelism holds only its share, and then serves pairs the attention side routed.
    """

    def __init__(
        self,
        c: ModelConfig,
        dtype: torch.dtype,
        kernels: Kernels,
        expert_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        d, inter, e = c.hidden_size, c.moe_intermediate_size, c.num_experts
        self.num_experts, self.top_k, self.norm_topk_prob = (
            e,
            c.num_experts_per_tok,
            c.norm_topk_prob,
        )
        self.expert_ids = tuple(range(e)) if expert_ids is None else tuple(sorted(expert_ids))
        n = len(self.expert_ids)
        self.gate = Linear(d, e, False, dtype, kernels)
        self.kernels = kernels
        self.w_gate_up = _param(n, 2 * inter, d, dtype=dtype)  # [n, 2I, D]: gate rows, then up
        self.w_down = _param(n, d, inter, dtype=dtype)  # [n, D, I]
        self.experts: ExpertSet | None = None

    @property
    def prepared(self) -> ExpertSet | None:
        """Set once the weights are in the kernels' form (what `prepare_weights` looks for)."""
        return self.experts

    def prepare(self) -> None:
        """The weights in the kernels' form; the plain stacked copies are dropped."""
        self.experts = ExpertSet(
            self.expert_ids,
            self.w_gate_up.detach(),
            self.w_down.detach(),
            self.num_experts,
            self.kernels,
        )
        self.w_gate_up = self.w_down = None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] (normalised) -> (weights [T, k], experts [T, k])."""
        return route(self.gate(x), self.top_k, self.norm_topk_prob, x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        if self.experts is None:
            raise RuntimeError("MoE used before prepare_weights() (load the part first)")
        weights, experts = self.route(x)  # [T, k] each
        rows, ids = token_pairs(experts)  # [T*k] each
        return combine(self.experts.run(x, rows, ids), weights)


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

    def __init__(
        self,
        c: ModelConfig,
        layer: int,
        dtype: torch.dtype,
        kernels: Kernels,
        expert_ids: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.mlp: nn.Module = (
            MoE(c, dtype, kernels, expert_ids)
            if c.is_moe_layer(layer)
            else MLP(c.hidden_size, c.intermediate_size, dtype, kernels)
        )

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        return self.mlp(self.post_attention_layernorm(h))
