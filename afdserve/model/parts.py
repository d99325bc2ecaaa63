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
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from afdserve.errors import ModelLoadError
from afdserve.model.attention import AttentionMetadata
from afdserve.model.config import ModelConfig
from afdserve.model.experts import ExpertSet, route
from afdserve.model.kernels import Kernels, PreparedWeight
from afdserve.model.layers import (
    AttentionBlock,
    FFNBlock,
    Linear,
    MoE,
    RMSNorm,
    prepare_weights,
)
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
    """Per-layer post-attention norm plus MLP or MoE.

    `held` (expert parallelism): for each MoE layer, the experts this part holds; the others
    are neither loaded nor kept. None: every expert of every layer.
    """

    def __init__(
        self,
        c: ModelConfig,
        dtype: torch.dtype,
        kernels: Kernels = Kernels(),
        held: Mapping[int, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.config, self.kernels = c, kernels
        self.layers = nn.ModuleList(
            FFNBlock(c, i, dtype, kernels, None if held is None else held.get(i, ()))
            for i in range(c.num_hidden_layers)
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
            want = self.layers[layer].mlp.expert_ids
            if not set(want) <= set(by_expert):
                raise ModelLoadError(
                    f"layer {layer}: experts {sorted(set(want) - set(by_expert))} missing"
                )
            own[f"layers.{layer}.mlp.{proj}"] = torch.stack([by_expert[e] for e in want])
        _fuse(own, ("mlp.w_gate", "mlp.w_up"), "mlp.w_gate_up", dim=1)  # [E, I, D] x2 -> [E, 2I, D]
        for i, block in enumerate(self.layers):  # a worker holding none of a layer's experts
            if isinstance(block.mlp, MoE) and not block.mlp.expert_ids:
                own[f"layers.{i}.mlp.w_gate_up"] = block.mlp.w_gate_up.detach()
                own[f"layers.{i}.mlp.w_down"] = block.mlp.w_down.detach()
        _fuse(own, ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "mlp.gate_up_proj.weight", dim=0)
        _copy_into(self, own, "FFN")
        prepare_weights(self)


class RouterPart(nn.Module):
    """The attention side's copy of each MoE layer's post-attention norm and router, for expert
    parallelism: the attention worker routes each token, so it sends it only to the FFN
    workers that hold its top-k experts (afd/expert_dispatch.py). Dense layers have no entry."""

    def __init__(self, c: ModelConfig, dtype: torch.dtype, kernels: Kernels = Kernels()) -> None:
        super().__init__()
        self.config = c
        self.layers = nn.ModuleDict(
            {
                str(i): _Router(c, dtype, kernels)
                for i in range(c.num_hidden_layers)
                if c.is_moe_layer(i)
            }
        )

    @classmethod
    def of(cls, ffn: FFNPart) -> RouterPart:
        """A RouterPart sharing the norms and routers of an FFN part (in-process engines,
        which hold both sides: no second copy)."""
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.config = ffn.config
        out.layers = nn.ModuleDict()
        for i, block in enumerate(ffn.layers):
            if ffn.config.is_moe_layer(i):
                r = _Router.__new__(_Router)
                nn.Module.__init__(r)
                r.post_attention_layernorm, r.gate = block.post_attention_layernorm, block.mlp.gate
                r.top_k, r.norm_topk_prob = block.mlp.top_k, block.mlp.norm_topk_prob
                out.layers[str(i)] = r
        return out

    def route(self, layer: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h [T, D] -> (x = norm(h) [T, D], weights [T, k], experts [T, k])."""
        r = self.layers[str(layer)]
        x = r.post_attention_layernorm(h)
        return (x, *route(r.gate(x), r.top_k, r.norm_topk_prob, x.dtype))

    def load(self, weights: Mapping[str, torch.Tensor]) -> None:
        own = {}
        for name, t in weights.items():
            if is_router_weight(name):
                layer, rest = _LAYER.match(name).groups()
                if layer in self.layers:
                    rest = rest.replace("block_sparse_moe.gate.", "gate.").replace(
                        "mlp.gate.", "gate."
                    )
                    own[f"layers.{layer}.{rest}"] = t
        _copy_into(self, own, "router")
        prepare_weights(self)


class _Router(nn.Module):
    def __init__(self, c: ModelConfig, dtype: torch.dtype, kernels: Kernels) -> None:
        super().__init__()
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, dtype)
        self.gate = Linear(c.hidden_size, c.num_experts, False, dtype, kernels)
        self.top_k, self.norm_topk_prob = c.num_experts_per_tok, c.norm_topk_prob


def is_router_weight(name: str) -> bool:
    """True for the tensors a RouterPart needs: each layer's post-attention norm and MoE gate."""
    m = _LAYER.match(name)
    return bool(m) and (
        m.group(2).startswith("post_attention_layernorm.")
        or m.group(2) in ("mlp.gate.weight", "block_sparse_moe.gate.weight")
    )


def expert_sets(
    weights: Mapping[str, torch.Tensor], c: ModelConfig, kernels: Kernels
) -> dict[int, ExpertSet]:
    """The routed experts among `weights` (checkpoint names), as one ExpertSet per layer:
    what an FFN worker loads when a re-placement gives it experts it lacks."""
    parts: dict[tuple[int, str], dict[int, torch.Tensor]] = {}
    for name, t in weights.items():
        at = expert_of(name)
        if at is not None:
            proj = _EXPERT_PROJ[_EXPERT.match(_LAYER.match(name).group(2)).group(2)]
            parts.setdefault((at[0], proj), {})[at[1]] = t
    out = {}
    for layer in sorted({layer for layer, _ in parts}):
        ids = sorted(parts[layer, "w_down"])
        for proj in ("w_gate", "w_up"):
            if sorted(parts.get((layer, proj), {})) != ids:
                raise ModelLoadError(f"layer {layer}: expert {proj} tensors do not match w_down's")
        gate_up = torch.stack(
            [torch.cat([parts[layer, "w_gate"][e], parts[layer, "w_up"][e]]) for e in ids]
        )  # [n, 2I, D]
        down = torch.stack([parts[layer, "w_down"][e] for e in ids])  # [n, D, I]
        out[layer] = ExpertSet(ids, gate_up, down, c.num_experts, kernels)
    return out


def expert_of(name: str) -> tuple[int, int] | None:
    """(layer, expert) of a routed expert's tensor, None for any other tensor."""
    m = _LAYER.match(name)
    e = _EXPERT.match(m.group(2)) if m else None
    return (int(m.group(1)), int(e.group(1))) if e else None


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
