"""The two halves of a decoder-only model, and how HF checkpoint names map onto them.

The boundary (docs/architecture.md): the FFN side owns each layer's post_attention_layernorm and
MLP/MoE (router included); the attention side owns everything else: embeddings, each layer's
input_layernorm and attention (and hence the KV cache), the final norm and the LM head.
Aggregated serving holds both parts in one worker; AFD places them in different workers. Each
part is built from only its own tensors, so an FFN worker never loads attention weights.

Legend: T = tokens, D = hidden size, V = vocabulary.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from afdserve.errors import ModelLoadError
from afdserve.model.attention import AttentionMetadata
from afdserve.model.config import ModelConfig
from afdserve.model.kernels import Kernels, PreparedWeight
from afdserve.model.layers import AttentionBlock, FFNBlock, RMSNorm, prepare_weights
from afdserve.model.rope import RotaryEmbedding

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
_EXPERT_PROJ = {
    "gate_proj": "w_gate",
    "w1": "w_gate",
    "up_proj": "w_up",
    "w3": "w_up",
    "down_proj": "w_down",
    "w2": "w_down",
}


def is_ffn_weight(name: str) -> bool:
    """True for checkpoint tensors that belong to the FFN side."""
    m = _LAYER.match(name)
    return bool(m) and m.group(2).startswith(
        ("post_attention_layernorm.", "mlp.", "block_sparse_moe.")
    )


class AttentionPart(nn.Module):
    """Embeddings, per-layer attention blocks, final norm, LM head, and the rotary table."""

    def __init__(self, c: ModelConfig, dtype: torch.dtype, kernels: Kernels = Kernels()) -> None:
        super().__init__()
        self.config, self.kernels = c, kernels
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, dtype=dtype)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            AttentionBlock(c, dtype, kernels) for _ in range(c.num_hidden_layers)
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.lm_head: PreparedWeight | None = None  # set by load (tied or own)
        self.rotary = RotaryEmbedding(c)

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:  # [T] -> [T, D]
        return self.embed_tokens(token_ids)

    def rope(
        self, meta: AttentionMetadata, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.rotary(meta.positions, dtype)  # [T, Dh] each

    def logits(self, x: torch.Tensor) -> torch.Tensor:  # [N, D] -> [N, V] float32
        if self.lm_head is None:
            raise RuntimeError("AttentionPart used before load()")
        return self.kernels.linear(self.norm(x), self.lm_head).float()

    def load(self, weights: Mapping[str, torch.Tensor]) -> None:
        c = self.config
        own = {}
        for name, t in weights.items():
            if name == "model.embed_tokens.weight":
                own["embed_tokens.weight"] = t
            elif name == "model.norm.weight":
                own["norm.weight"] = t
            elif name == "lm_head.weight":
                continue
            elif (m := _LAYER.match(name)) and not is_ffn_weight(name):
                own[f"layers.{m.group(1)}.{m.group(2)}"] = t
        for kind in ("weight", "bias"):  # [q + 2 kv, D] (and [q + 2 kv] biases)
            proj = tuple(f"self_attn.{x}_proj.{kind}" for x in "qkv")
            _fuse(own, proj, f"self_attn.qkv_proj.{kind}", dim=0)
        _copy_into(self, own, "attention")
        if c.tie_word_embeddings:
            head = self.embed_tokens.weight.detach()
        else:
            if "lm_head.weight" not in weights:
                raise ModelLoadError(
                    "checkpoint has no lm_head.weight and tie_word_embeddings is false"
                )
            head = weights["lm_head.weight"].to(self.embed_tokens.weight)
        self.lm_head = self.kernels.prepare(head)  # [V, D], a copy when tied (packed or not)
        prepare_weights(self)


class FFNPart(nn.Module):
    """Per-layer post-attention norm plus MLP or MoE."""

    def __init__(self, c: ModelConfig, dtype: torch.dtype, kernels: Kernels = Kernels()) -> None:
        super().__init__()
        self.config, self.kernels = c, kernels
        self.layers = nn.ModuleList(
            FFNBlock(c, i, dtype, kernels) for i in range(c.num_hidden_layers)
        )

    def forward(self, layer: int, h: torch.Tensor) -> torch.Tensor:  # [T, D] -> [T, D]
        return self.layers[layer](h)

    def load(self, weights: Mapping[str, torch.Tensor]) -> None:
        own: dict[str, torch.Tensor] = {}
        experts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
        for name, t in weights.items():
            if not is_ffn_weight(name):
                continue
            layer, rest = _LAYER.match(name).groups()
            if m := _EXPERT.match(rest):
                experts.setdefault((int(layer), _EXPERT_PROJ[m.group(2)]), {})[int(m.group(1))] = t
            else:
                rest = rest.replace("block_sparse_moe.gate.", "mlp.gate.")
                own[f"layers.{layer}.{rest}"] = t
        for (layer, proj), by_expert in experts.items():
            own[f"layers.{layer}.mlp.{proj}"] = torch.stack(
                [by_expert[e] for e in sorted(by_expert)]
            )
        _fuse(own, ("mlp.w_gate", "mlp.w_up"), "mlp.w_gate_up", dim=1)  # [E, I, D] x2 -> [E, 2I, D]
        _fuse(own, ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.gate_up_proj.weight", dim=0)
        _copy_into(self, own, "FFN")
        prepare_weights(self)


def _fuse(tensors: dict[str, torch.Tensor], parts: tuple[str, ...], fused: str, dim: int) -> None:
    """Replace each layer's group of tensors (gate and up; q, k and v) by their concatenation
    along `dim`: one GEMM instead of several, which is faster at every batch size."""
    for name in [n for n in tensors if n.endswith("." + parts[0])]:
        prefix = name[: -len(parts[0])]
        if all(prefix + p in tensors for p in parts):
            tensors[prefix + fused] = torch.cat([tensors.pop(prefix + p) for p in parts], dim=dim)


def _copy_into(module: nn.Module, tensors: dict[str, torch.Tensor], side: str) -> None:
    params = dict(module.named_parameters())
    missing = sorted(set(params) - set(tensors))
    unexpected = sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise ModelLoadError(
            f"{side} weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    with torch.no_grad():
        for name, p in params.items():
            src = tensors[name]
            if tuple(src.shape) != tuple(p.shape):
                raise ModelLoadError(
                    f"{side} weight {name}: shape {tuple(src.shape)} != expected {tuple(p.shape)}"
                )
            p.copy_(src)
