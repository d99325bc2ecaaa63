"""Model catalog: per-layer sizes the roofline needs, from HF config.json fields.

Each catalog entry is the subset of the model's public `config.json` (Hugging Face hub) that
matters for cost and memory, plus a `source` note and the checkpoint's weight dtype. A local
config.json (or a directory holding one) goes through the same `ModelSpec.from_hf_config`, so the
planner handles any Llama/Qwen2/Qwen3/Mixtral/Qwen3-MoE/DeepSeek-V3-shaped model.

Per-layer numbers are averages over the layers (DeepSeek-V3 has 3 dense-FFN layers before 58 MoE
layers); norms, biases and rotary tables are ignored (well under 0.1% of the bytes).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from afdserve.errors import UserInputError

DTYPE_BYTES: Mapping[str, float] = {
    "fp32": 4.0,
    "float32": 4.0,
    "bf16": 2.0,
    "bfloat16": 2.0,
    "fp16": 2.0,
    "float16": 2.0,
    "fp8": 1.0,
    "int8": 1.0,
}


@dataclass(frozen=True)
class ModelSpec:
    """Sizes of one model, per layer (averaged over layers) unless the name says otherwise."""

    name: str
    source: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    attention_params: float
    """Attention projection parameters per layer (q, k, v, o; MLA's low-rank projections)."""
    kv_elems_per_token: float
    """KV-cache elements per context token per layer (K and V, or MLA's latent + rope key)."""
    attention_flops_per_context_token: float
    """FLOPs one query token spends per context token per layer (scores and weighted sum)."""
    ffn_params_total: float
    """FFN parameters per layer resident on the FFN side (all experts, shared ones, router)."""
    ffn_params_active: float
    """FFN parameters per layer one token touches (top-k experts, shared ones, router)."""
    ffn_activation_elems_per_token: float
    """Working activations per token in one FFN layer (input, gate/up outputs, output)."""
    lm_head_params: float
    """Output projection (vocab x hidden), once per step on the attention side."""
    embedding_params: float
    """Input embeddings held on the attention side (0 extra when tied to the LM head)."""
    num_experts: int = 0
    experts_per_token: int = 0
    weight_dtype: str = "bf16"
    """Checkpoint weight dtype: bf16, fp16, fp8 or fp32."""
    ffn_params_routed: float = 0.0
    """Routed-expert parameters per layer (all E experts; no shared experts, router or dense
    layers), averaged over layers: the part expert parallelism spreads over the FFN devices."""

    def __post_init__(self) -> None:
        if self.weight_dtype not in DTYPE_BYTES:
            raise UserInputError(
                f"model {self.name}: weight dtype {self.weight_dtype!r} is not one of "
                f"{', '.join(DTYPE_BYTES)}"
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def weight_bytes(self) -> float:
        return DTYPE_BYTES[self.weight_dtype]

    @property
    def total_params(self) -> float:
        per_layer = self.attention_params + self.ffn_params_total
        return self.num_layers * per_layer + self.lm_head_params + self.embedding_params

    @classmethod
    def from_hf_config(
        cls, cfg: Mapping[str, Any], name: str, source: str, weight_dtype: str | None = None
    ) -> ModelSpec:
        """Derive the spec from HF config.json fields; missing required fields raise UserInputError."""

        def need(key: str) -> Any:
            v = cfg.get(key)
            if v is None:
                raise UserInputError(f"model {name}: config has no {key!r}")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                raise UserInputError(f"model {name}: {key} must be a positive number, got {v!r}")
            return v

        L = int(need("num_hidden_layers"))
        h = int(need("hidden_size"))
        vocab = int(need("vocab_size"))
        n_heads = int(need("num_attention_heads"))
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)

        if cfg.get("kv_lora_rank"):  # multi-head latent attention (DeepSeek-V2/V3)
            kv_rank = int(need("kv_lora_rank"))
            rope = int(need("qk_rope_head_dim"))
            nope = int(need("qk_nope_head_dim"))
            v_dim = int(need("v_head_dim"))
            q_rank = cfg.get("q_lora_rank")
            q_out = n_heads * (nope + rope)
            q_params = h * q_rank + q_rank * q_out if q_rank else h * q_out
            attention_params = (
                q_params
                + h * (kv_rank + rope)
                + kv_rank * n_heads * (nope + v_dim)
                + n_heads * v_dim * h
            )
            kv_elems = kv_rank + rope
            # weight-absorbed decode: scores over (latent + rope key), weighted sum over latent
            attn_flops = 2 * n_heads * (kv_rank + rope) + 2 * n_heads * kv_rank
        elif cfg.get("share_q_dim"):  # Step-3's multi-matrix factorization attention (MFA)
            # q: hidden -> share_q_dim (low rank) -> heads x head_dim; one shared K and V head
            # per attention group (num_attention_groups, 1 in Step-3), so KV is 2 x head_dim
            head_dim = int(need("head_dim"))
            q_rank = int(need("share_q_dim"))
            groups = int(cfg.get("num_attention_groups") or 1)
            q_size, kv_size = n_heads * head_dim, groups * head_dim
            attention_params = h * q_rank + q_rank * q_size + 2 * h * kv_size + q_size * h
            kv_elems = 2 * kv_size
            attn_flops = 4 * q_size
        else:
            head_dim = int(cfg.get("head_dim") or h // n_heads)
            q_size, kv_size = n_heads * head_dim, n_kv * head_dim
            attention_params = h * q_size + 2 * h * kv_size + q_size * h
            kv_elems = 2 * kv_size
            attn_flops = 4 * q_size

        num_experts = int(
            cfg.get("num_experts")
            or cfg.get("num_local_experts")
            or cfg.get("n_routed_experts")
            or cfg.get("moe_num_experts")  # Step-3
            or 0
        )
        top_k = int(cfg.get("num_experts_per_tok") or cfg.get("moe_top_k") or 0)
        dense_inter = int(cfg.get("intermediate_size") or 0)
        if num_experts:
            if not 1 <= top_k <= num_experts:
                raise UserInputError(
                    f"model {name}: need 1 <= num_experts_per_tok <= experts, got {top_k}"
                )
            expert_inter = int(cfg.get("moe_intermediate_size") or dense_inter)
            if expert_inter <= 0:
                raise UserInputError(f"model {name}: MoE config has no moe_intermediate_size")
            shared_inter = (
                int(cfg.get("n_shared_experts") or 0) * expert_inter
                + int(cfg.get("shared_expert_intermediate_size") or 0)
                + int(cfg.get("share_expert_dim") or 0)  # Step-3: one shared expert
            )
            moe_routed = 3 * h * num_experts * expert_inter
            moe_total = 3 * h * (num_experts * expert_inter + shared_inter) + h * num_experts
            moe_active = 3 * h * (top_k * expert_inter + shared_inter) + h * num_experts
            moe_act = 2 * h + 2 * (top_k * expert_inter + shared_inter)
            moe_flags = [_is_moe_layer(cfg, i) for i in range(L)]
        else:
            moe_total = moe_active = moe_act = moe_routed = 0
            moe_flags = [False] * L
        if dense_inter <= 0 and not all(moe_flags):
            raise UserInputError(f"model {name}: config has no intermediate_size for dense layers")
        dense = 3 * h * dense_inter
        n_moe = sum(moe_flags)
        n_dense = L - n_moe
        tied = bool(cfg.get("tie_word_embeddings", False))
        dtype = weight_dtype or _config_dtype(cfg)
        return cls(
            name=name,
            source=source,
            num_layers=L,
            hidden_size=h,
            vocab_size=vocab,
            attention_params=float(attention_params),
            kv_elems_per_token=float(kv_elems),
            attention_flops_per_context_token=float(attn_flops),
            ffn_params_total=(n_moe * moe_total + n_dense * dense) / L,
            ffn_params_active=(n_moe * moe_active + n_dense * dense) / L,
            ffn_activation_elems_per_token=(n_moe * moe_act + n_dense * (2 * h + 2 * dense_inter))
            / L,
            lm_head_params=float(vocab * h),
            embedding_params=0.0 if tied else float(vocab * h),
            num_experts=num_experts,
            experts_per_token=top_k if num_experts else 0,
            weight_dtype=dtype,
            ffn_params_routed=n_moe * moe_routed / L,
        )


def _is_moe_layer(cfg: Mapping[str, Any], i: int) -> bool:
    if cfg.get("moe_layers_enum") is not None:  # Step-3: the MoE layers listed by index
        return i in {int(x) for x in cfg["moe_layers_enum"]}
    if "first_k_dense_replace" in cfg:  # DeepSeek: dense FFN in the first k layers
        freq = int(cfg.get("moe_layer_freq") or 1)
        return i >= int(cfg["first_k_dense_replace"]) and i % freq == 0
    if i in set(cfg.get("mlp_only_layers") or ()):  # Qwen-MoE
        return False
    step = int(cfg.get("decoder_sparse_step") or 1)
    return (i + 1) % step == 0


def _config_dtype(cfg: Mapping[str, Any]) -> str:
    quant = cfg.get("quantization_config")
    if isinstance(quant, Mapping) and str(quant.get("quant_method", "")).lower() == "fp8":
        return "fp8"
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").lower()
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, "bf16")


@dataclass(frozen=True)
class CatalogModel:
    """A catalog entry: the public config fields and where they come from."""

    name: str
    source: str
    config: Mapping[str, Any]
    weight_dtype: str = "bf16"

    def spec(self) -> ModelSpec:
        return ModelSpec.from_hf_config(self.config, self.name, self.source, self.weight_dtype)


def model_catalog() -> dict[str, CatalogModel]:
    """Catalog entries by lower-case name (built per call: no module-level mutable state)."""
    entries = (
        CatalogModel(
            name="llama-3.1-8b",
            source="meta-llama/Llama-3.1-8B config.json (Hugging Face hub)",
            config={
                "num_hidden_layers": 32,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "vocab_size": 128256,
                "tie_word_embeddings": False,
            },
        ),
        CatalogModel(
            name="llama-3.1-70b",
            source="meta-llama/Llama-3.1-70B config.json (Hugging Face hub)",
            config={
                "num_hidden_layers": 80,
                "hidden_size": 8192,
                "intermediate_size": 28672,
                "num_attention_heads": 64,
                "num_key_value_heads": 8,
                "head_dim": 128,
                "vocab_size": 128256,
                "tie_word_embeddings": False,
            },
        ),
        CatalogModel(
            name="qwen3-30b-a3b",
            source="Qwen/Qwen3-30B-A3B config.json (Hugging Face hub)",
            config={
                "num_hidden_layers": 48,
                "hidden_size": 2048,
                "intermediate_size": 6144,
                "moe_intermediate_size": 768,
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "num_attention_heads": 32,
                "num_key_value_heads": 4,
                "head_dim": 128,
                "vocab_size": 151936,
                "tie_word_embeddings": False,
            },
        ),
        CatalogModel(
            name="qwen3-235b-a22b",
            source="Qwen/Qwen3-235B-A22B config.json (Hugging Face hub)",
            config={
                "num_hidden_layers": 94,
                "hidden_size": 4096,
                "intermediate_size": 12288,
                "moe_intermediate_size": 1536,
                "num_experts": 128,
                "num_experts_per_tok": 8,
                "decoder_sparse_step": 1,
                "mlp_only_layers": [],
                "num_attention_heads": 64,
                "num_key_value_heads": 4,
                "head_dim": 128,
                "vocab_size": 151936,
                "tie_word_embeddings": False,
            },
        ),
        CatalogModel(
            name="mixtral-8x7b",
            source="mistralai/Mixtral-8x7B-v0.1 config.json (Hugging Face hub)",
            config={
                "num_hidden_layers": 32,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "vocab_size": 32000,
                "tie_word_embeddings": False,
            },
        ),
        CatalogModel(
            name="deepseek-v3",
            source=(
                "deepseek-ai/DeepSeek-V3 config.json (Hugging Face hub); weights are FP8 "
                "(quantization_config fp8, 128x128 blocks); the multi-token-prediction layer "
                "(num_nextn_predict_layers) is not counted"
            ),
            config={
                "num_hidden_layers": 61,
                "hidden_size": 7168,
                "intermediate_size": 18432,
                "moe_intermediate_size": 2048,
                "n_routed_experts": 256,
                "n_shared_experts": 1,
                "num_experts_per_tok": 8,
                "first_k_dense_replace": 3,
                "moe_layer_freq": 1,
                "num_attention_heads": 128,
                "num_key_value_heads": 128,
                "q_lora_rank": 1536,
                "kv_lora_rank": 512,
                "qk_nope_head_dim": 128,
                "qk_rope_head_dim": 64,
                "v_head_dim": 128,
                "vocab_size": 129280,
                "tie_word_embeddings": False,
            },
            weight_dtype="fp8",
        ),
        CatalogModel(
            name="step3",
            source=(
                "stepfun-ai/step3 text_config (Hugging Face hub; the same values are the "
                "defaults of vLLM's Step3TextConfig, vllm/transformers_utils/configs/step3_vl.py) "
                "and the model card's table (61 layers, 5 dense, hidden 7168, MFA with low-rank "
                "query 2048, 64 query heads of 256, 48 experts, top-3, 1 shared expert; 316B LLM "
                "parameters, 38B active); Step-3 report arXiv 2507.19427. Checkpoints are bf16 "
                "and block-FP8 (stepfun-ai/step3-fp8); the vision encoder is not counted"
            ),
            config={
                "num_hidden_layers": 61,
                "hidden_size": 7168,
                "intermediate_size": 18432,
                "num_attention_heads": 64,
                "num_attention_groups": 1,
                "share_q_dim": 2048,
                "head_dim": 256,
                "moe_intermediate_size": 5120,
                "moe_num_experts": 48,
                "moe_top_k": 3,
                "share_expert_dim": 5120,
                "moe_layers_enum": list(range(4, 60)),
                "vocab_size": 128815,
                "tie_word_embeddings": False,
            },
        ),
    )
    return {e.name: e for e in entries}


_ALIASES = {
    "llama3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b": "llama-3.1-8b",
    "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "llama-3.1-8b-instruct": "llama-3.1-8b",
    "llama3.1-70b": "llama-3.1-70b",
    "meta-llama/llama-3.1-70b": "llama-3.1-70b",
    "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
    "llama-3.1-70b-instruct": "llama-3.1-70b",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b",
    "qwen/qwen3-235b-a22b": "qwen3-235b-a22b",
    "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "mixtral-8x7b-v0.1": "mixtral-8x7b",
    "deepseek-ai/deepseek-v3": "deepseek-v3",
    "stepfun-ai/step3": "step3",
    "step-3": "step3",
}


def load_model(name_or_path: str | os.PathLike[str], weight_dtype: str | None = None) -> ModelSpec:
    """A catalog model by name, or a local HF config.json (file, or a directory holding one)."""
    text = os.fspath(name_or_path)
    key = _ALIASES.get(text.lower(), text.lower())
    catalog = model_catalog()
    if key in catalog:
        entry = catalog[key]
        return ModelSpec.from_hf_config(
            entry.config, entry.name, entry.source, weight_dtype or entry.weight_dtype
        )
    path = Path(text)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise UserInputError(
            f"unknown model {text!r}: not in the catalog ({', '.join(catalog)}) and not a "
            "config.json or a directory holding one"
        )
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise UserInputError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    if not isinstance(cfg, dict):
        raise UserInputError(f"{path}: expected a JSON object")
    if isinstance(cfg.get("text_config"), dict):  # multimodal wrappers keep the LM inside
        cfg = {**cfg["text_config"], **{k: v for k, v in cfg.items() if k == "quantization_config"}}
    return ModelSpec.from_hf_config(
        cfg, str(path.parent.name or path), f"local {path}", weight_dtype
    )
