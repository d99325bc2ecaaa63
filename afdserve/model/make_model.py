"""Write randomly initialised models in the HF hub checkpoint format (`afdserve make-model`).

No hub is reachable from where afdserve is developed and tested, so demos, tests and benchmarks
get their models from here: config.json, model.safetensors (or shards plus an index),
generation_config.json and a byte-level tokenizer, laid out exactly as the published Llama,
Qwen2, Qwen3, Mixtral and Qwen3-MoE checkpoints are, so HF transformers loads them unchanged and
serves as the oracle for afdserve's own model code.

Initialisation is chosen for a useful *random* model, not a trainable one. With the usual
std 0.02 a tiny model's logits are nearly flat, greedy decoding hits near-ties (two tokens whose
logits differ by rounding error, so two correct implementations disagree), and the next token
depends only on the current one, so output falls into one repeated token. Instead:
- every projection has std 1/sqrt(fan_in), and those that write into the residual stream
  (o_proj, down_proj, w2) OUTPUT_GAIN times that, so attention mixes the context in;
- the LM head gives logits with std LOGIT_STD (top-1 well separated from top-2), each token's
  head row leans away from its own embedding (untied) or the final norm has random signs
  (tied), so a token rarely predicts itself;
- head rows of `quiet_token_ids` (non-printable bytes, special tokens) are scaled down, so the
  output decodes to printable ASCII and never hits EOS: generation runs to max_tokens;
- norm weights scatter around 1 (a norm loaded wrongly shows), router logits have std
  ROUTER_LOGIT_STD (top-k expert choice is not a near-tie either).
tests/model/test_make_model.py checks the result with HF transformers generate.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from afdserve.errors import UserInputError
from afdserve.model.config import DTYPES, MODEL_TYPES, SUPPORTED_ARCHITECTURES, ModelConfig

if TYPE_CHECKING:
    import torch

ARCH_ALIASES: Mapping[str, str] = MappingProxyType(
    {
        "llama": "LlamaForCausalLM",
        "qwen2": "Qwen2ForCausalLM",
        "qwen3": "Qwen3ForCausalLM",
        "mixtral": "MixtralForCausalLM",
        "qwen3-moe": "Qwen3MoeForCausalLM",
    }
)
"""Short name -> HF architecture class name, as `--arch` accepts either."""

PRESETS: tuple[str, ...] = ("tiny", "small")

_MODEL_TYPE = MappingProxyType({arch: mt for mt, arch in MODEL_TYPES.items()})

LOGIT_STD = 4.0
"""Target std of a random model's logits: top-1 vs top-2 gaps far above rounding error."""
ROUTER_LOGIT_STD = 2.0
NORM_WEIGHT_STD = 0.1
BIAS_STD = 0.1
OUTPUT_GAIN = 2.0
"""Gain on o_proj / down_proj: context outweighs the current token's embedding."""
QUIET_SCALE = 0.25
SELF_AVERSION = 1.0
_RESIDUAL_WRITERS = ("o_proj.weight", "down_proj.weight", ".w2.weight")


def resolve_arch(arch: str) -> str:
    """HF class name or alias (llama, qwen2, qwen3, mixtral, qwen3-moe) -> HF class name."""
    key = arch.strip()
    if key in SUPPORTED_ARCHITECTURES:
        return key
    alias = ARCH_ALIASES.get(key.lower().replace("_", "-"))
    if alias is None:
        raise UserInputError(
            f"unknown architecture {arch!r}; use one of {', '.join(ARCH_ALIASES)} or "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return alias


def preset_config(arch: str, preset: str, vocab_size: int) -> dict[str, Any]:
    """config.json fields (without token ids and dtype) of one architecture and size preset.

    tiny: hidden 64, 4 heads / 2 KV heads (GQA), for tests. Each tiny preset also covers one
    feature: Llama uses llama3 RoPE scaling, Qwen3 ties embeddings and has head_dim 32 !=
    hidden/heads, Qwen3-MoE skips top-k renormalisation and has a dense layer among MoE ones.
    small: hidden 256, 6 layers, for benchmarks; shaped like the published models.
    """
    arch = resolve_arch(arch)
    if preset not in PRESETS:
        raise UserInputError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    tiny = preset == "tiny"
    c: dict[str, Any] = {
        "architectures": [arch],
        "model_type": _MODEL_TYPE[arch],
        "vocab_size": vocab_size,
        "hidden_size": 64 if tiny else 256,
        "intermediate_size": 128 if tiny else 768,
        "num_hidden_layers": 2 if tiny else 6,
        "num_attention_heads": 4 if tiny else 8,
        "num_key_value_heads": 2 if tiny else 4,
        "head_dim": 16 if tiny else 32,
        "hidden_act": "silu",
        "max_position_embeddings": 2048 if tiny else 4096,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_dropout": 0.0,
        "tie_word_embeddings": False,
        "use_cache": True,
    }
    if arch == "LlamaForCausalLM":
        c.update(
            rms_norm_eps=1e-5,
            rope_theta=500000.0,
            attention_bias=False,
            mlp_bias=False,
            pretraining_tp=1,
        )
        if tiny:  # Llama 3.1's scaling; with head_dim 16 all three frequency bands occur
            c["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            }
    elif arch == "Qwen2ForCausalLM":
        c.update(
            use_sliding_window=False, sliding_window=None, max_window_layers=c["num_hidden_layers"]
        )
    elif arch == "Qwen3ForCausalLM":
        c.update(attention_bias=False, use_sliding_window=False, sliding_window=None)
        if tiny:
            c.update(head_dim=32, tie_word_embeddings=True)
    elif arch == "MixtralForCausalLM":
        c.update(
            num_local_experts=4 if tiny else 8,
            num_experts_per_tok=2,
            intermediate_size=64 if tiny else 384,
            sliding_window=None,
            router_aux_loss_coef=0.02,
            output_router_logits=False,
        )
    elif arch == "Qwen3MoeForCausalLM":
        c.update(
            attention_bias=False,
            use_sliding_window=False,
            sliding_window=None,
            num_experts=8 if tiny else 16,
            num_experts_per_tok=2 if tiny else 4,
            moe_intermediate_size=32 if tiny else 128,
            norm_topk_prob=not tiny,
            decoder_sparse_step=1,
            mlp_only_layers=[1] if tiny else [],
            router_aux_loss_coef=0.001,
            output_router_logits=False,
        )
        if tiny:
            c["num_hidden_layers"] = 3
    return c


def make_model(
    arch: str,
    preset: str,
    seed: int,
    out: str | Path,
    dtype: str = "float32",
    shards: int = 1,
    config_overrides: Mapping[str, Any] | None = None,
    router_skew: float = 0.0,
) -> Path:
    """Write a random model of `arch` (class name or alias) and `preset` into `out`; return it.

    `out` must not exist or be empty. The same (arch, preset, seed, dtype, overrides) always
    gives the same files. `shards` > 1 writes model-0000K-of-0000N.safetensors plus
    model.safetensors.index.json. `config_overrides` replaces config.json fields before the
    weights are shaped from it (e.g. {"rope_scaling": {...}} or {"mlp_only_layers": [0]}).
    `router_skew` > 0 (MoE only) makes a few experts hot (`skew_router`), for load balancing.
    """
    from afdserve.model.byte_tokenizer import VOCAB_SIZE

    if dtype not in DTYPES:
        raise UserInputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    if not isinstance(seed, int) or seed < 0:
        raise UserInputError(f"seed must be a non-negative integer, got {seed!r}")
    if not isinstance(shards, int) or shards < 1:
        raise UserInputError(f"shards must be a positive integer, got {shards!r}")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserInputError(f"{str(out)!r} already exists and is not an empty directory")

    hf = preset_config(arch, preset, VOCAB_SIZE)
    hf.update(dict(config_overrides or {}))
    config = ModelConfig.from_hf_dict({**hf, "torch_dtype": dtype})
    if config.vocab_size < VOCAB_SIZE:
        raise UserInputError(
            f"vocab_size {config.vocab_size} is smaller than the tokenizer's {VOCAB_SIZE} ids"
        )
    tensors = random_weights(config, seed, quiet_token_ids(config.vocab_size))
    if router_skew:
        skew_router(tensors, config, router_skew, seed)
    if shards > len(tensors):
        raise UserInputError(f"cannot split {len(tensors)} tensors into {shards} shards")

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write_files(out, hf, config, tensors, dtype, shards)
    except BaseException:
        # leave no half-written model behind (an existing `out` was empty: all of it is ours)
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            for child in out.iterdir():
                child.unlink(missing_ok=True)
        raise
    return out


def skew_router(
    tensors: dict[str, torch.Tensor], config: ModelConfig, strength: float, seed: int
) -> None:
    """Make experts 0..E/8 (at least one) hot in every MoE layer, as trained routers often have
    a few: every token embedding gets a shared component along one direction u, and the hot
    experts' router rows lean along u, so their logits rise for every token. `strength` ~ 1
    puts the hot experts in most tokens' top-k. Only the embeddings and routers change."""
    import torch

    if not config.is_moe:
        raise UserInputError("router_skew needs a MoE architecture (mixtral, qwen3-moe)")
    if not strength > 0:
        raise UserInputError(f"router_skew must be > 0, got {strength!r}")
    gen = torch.Generator().manual_seed(seed + 7919)
    d = config.hidden_size
    u = torch.randn(d, generator=gen)
    u /= u.norm()  # [D] unit
    emb = tensors["model.embed_tokens.weight"]  # [V, D]
    row = float(emb.norm(dim=1).mean())
    tensors["model.embed_tokens.weight"] = emb + strength * row * u
    hot = max(1, config.num_experts // 8)
    for name, t in tensors.items():
        if name.endswith(".gate.weight"):  # MoE router [E, D]
            t[:hot] += strength * 4 * ROUTER_LOGIT_STD * u


def _write_files(
    out: Path,
    hf: dict[str, Any],
    config: ModelConfig,
    tensors: dict[str, torch.Tensor],
    dtype: str,
    shards: int,
) -> None:
    from afdserve.model.byte_tokenizer import write_tokenizer_files

    ids = write_tokenizer_files(out, model_max_length=config.max_position_embeddings)
    eos = [ids["im_end"], ids["endoftext"]]
    hf.update(bos_token_id=ids["endoftext"], eos_token_id=eos, torch_dtype=dtype)
    _write_json(out / "config.json", hf)
    generation = {
        "bos_token_id": ids["endoftext"],
        "eos_token_id": eos,
        "pad_token_id": ids["endoftext"],
    }
    _write_json(out / "generation_config.json", generation)
    _write_weights(out, {n: t.to(_torch_dtype(dtype)) for n, t in tensors.items()}, shards)


def quiet_token_ids(vocab_size: int) -> list[int]:
    """Ids a random model should not emit: bytes that are not printable ASCII (they would decode
    to U+FFFD or control characters), the special tokens (so generation runs to max_tokens, as
    benchmarks want) and any padding ids past the tokenizer's vocabulary."""
    from afdserve.model.byte_tokenizer import SPECIAL_TOKENS, VOCAB_SIZE

    odd_bytes = [b for b in range(256) if not (0x20 <= b < 0x7F or b == 0x0A)]
    specials = range(VOCAB_SIZE - len(SPECIAL_TOKENS), VOCAB_SIZE)
    return [*odd_bytes, *specials, *range(VOCAB_SIZE, vocab_size)]


def random_weights(
    config: ModelConfig, seed: int, quiet_token_ids: Sequence[int] = ()
) -> dict[str, torch.Tensor]:
    """float32 tensors for every name of `expected_weight_shapes(config)`; see module doc.

    The LM head rows of `quiet_token_ids` are scaled by QUIET_SCALE, so that greedy decoding
    practically never picks them.
    """
    import torch

    from afdserve.model.loader import expected_weight_shapes

    gen = torch.Generator().manual_seed(seed)
    head_std = LOGIT_STD / math.sqrt(config.hidden_size)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape in expected_weight_shapes(config).items():
        if name == "model.embed_tokens.weight":
            std = head_std if config.tie_word_embeddings else 1.0
            t = torch.randn(shape, generator=gen) * std
        elif name == "lm_head.weight":
            t = torch.randn(shape, generator=gen) * head_std
        elif name.endswith("norm.weight"):
            t = 1.0 + torch.randn(shape, generator=gen) * NORM_WEIGHT_STD
        elif name.endswith(".bias"):
            t = torch.randn(shape, generator=gen) * BIAS_STD
        elif name.endswith(".gate.weight"):  # MoE router [E, D]
            t = torch.randn(shape, generator=gen) * (ROUTER_LOGIT_STD / math.sqrt(shape[1]))
        elif name.endswith(_RESIDUAL_WRITERS):  # projections that add into the residual
            t = torch.randn(shape, generator=gen) * (OUTPUT_GAIN / math.sqrt(shape[1]))
        else:  # projection [out, in]
            t = torch.randn(shape, generator=gen) / math.sqrt(shape[1])
        tensors[name] = t
    if config.tie_word_embeddings:
        # With a tied head the current token's own embedding scores highest (E.E >> E.E'), and
        # decoding repeats it; random signs on the final norm make that self-score average 0.
        signs = torch.randint(0, 2, (config.hidden_size,), generator=gen) * 2.0 - 1.0  # [D]
        tensors["model.norm.weight"] *= signs
    else:
        # Untied: lean each token's head row away from its own embedding, so that a token is
        # unlikely to predict itself and greedy decoding rarely settles into one repeated token.
        tensors["lm_head.weight"] -= SELF_AVERSION * head_std * tensors["model.embed_tokens.weight"]
    head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
    quiet = torch.tensor(sorted(set(quiet_token_ids)), dtype=torch.long)
    tensors[head][quiet] *= QUIET_SCALE  # [V, D], rows of quiet tokens
    return tensors


def _torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    from safetensors.torch import save_file

    from afdserve.model.loader import INDEX_FILE, SINGLE_FILE

    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(out / SINGLE_FILE), metadata=metadata)
        return
    names = list(tensors)
    sizes = [tensors[n].numel() * tensors[n].element_size() for n in names]
    total = sum(sizes)
    # cut in checkpoint order where the running size crosses k/shards of the total, leaving at
    # least one tensor for every remaining shard
    groups: list[list[str]] = [[] for _ in range(shards)]
    running, k = 0, 0
    for i, (name, size) in enumerate(zip(names, sizes, strict=True)):
        left = len(names) - i
        if (
            groups[k]
            and k < shards - 1
            and (running >= total * (k + 1) / shards or left <= shards - 1 - k)
        ):
            k += 1
        groups[k].append(name)
        running += size
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out / fname), metadata=metadata)
        weight_map.update({n: fname for n in group})
    _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
