"""GGUF files (llama.cpp's format) turned into the HF-format directory the loader reads.

A `.gguf` file holds the weights (often quantised: Q4_0, Q4_1, Q8_0, K-quants), the model's
hyper-parameters and its tokenizer in one file. `gguf_to_hf_dir` reads it with the `gguf`
library that llama.cpp maintains, dequantises every tensor to float32 with that library's own
dequantisers, undoes llama.cpp's rotary permutation of the Llama q/k projections, and writes
config.json, model.safetensors, tokenizer.json, tokenizer_config.json and
generation_config.json. Everything downstream (validation, partitioning into attention and FFN
halves, dtype casting at load) is then the one HF path, so a GGUF model is served exactly like
the same weights in HF format. `resolve_gguf` caches the converted directory next to the
built-in models, keyed by the file's size and modification time.

Supported GGUF architectures: llama (LlamaForCausalLM), qwen2, qwen3, qwen3moe. The tokenizer
must be GPT-2 style byte-level BPE (`tokenizer.ggml.model = gpt2`), the kind these models use.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from afdserve.errors import ModelLoadError

GGUF_FORMAT = 1
"""Bump when the converted directory's layout changes, so stale cached copies are not reused."""

ARCHITECTURES: Mapping[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
}
"""GGUF `general.architecture` -> HF architecture."""

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
_LAYER_TENSORS: Mapping[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}
_EXPERT_TENSORS: Mapping[str, str] = {
    "ffn_gate_exps.weight": "gate_proj",
    "ffn_up_exps.weight": "up_proj",
    "ffn_down_exps.weight": "down_proj",
}
"""Stacked expert tensors [E, out, in] -> model.layers.N.mlp.experts.E.<proj>.weight."""

# Pre-tokenizer regexes of llama.cpp's `tokenizer.ggml.pre` names (llama-vocab.cpp), as HF
# `tokenizers` pre-tokenizer steps. GPT-2's own split is ByteLevel(use_regex=True).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: Mapping[str, tuple[str, ...]] = {
    "default": ("gpt2",),
    "gpt2": ("gpt2",),
    "smollm": ("digits", "gpt2"),
    "qwen2": ("qwen2",),
}


def is_gguf_file(path: str | Path) -> bool:
    p = Path(path)
    return p.is_file() and p.suffix.lower() == ".gguf"


def resolve_gguf(path: str | Path, cache: Path) -> Path:
    """The HF-format directory converted from GGUF file `path`, made under `cache` on first use.

    The key includes the file's resolved path, size and modification time, so an edited or
    replaced file is converted again. Conversion writes into a private temporary directory and
    renames it into place: a reader never sees a half-written model.
    """
    src = Path(path).expanduser().resolve()
    st = src.stat()
    key = hashlib.sha256(f"{src}|{st.st_size}|{st.st_mtime_ns}|{GGUF_FORMAT}".encode()).hexdigest()
    final = cache / f"gguf-{src.stem}-{key[:12]}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".gguf-{src.stem}-", dir=final.parent))
    try:
        gguf_to_hf_dir(src, tmp)
        try:
            tmp.rename(final)  # atomic; fails if another process got there first
        except OSError as exc:
            if not (final / "config.json").is_file():
                raise ModelLoadError(
                    f"cannot write the converted model to {final} ({exc}); remove that directory"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def gguf_to_hf_dir(path: str | Path, out: str | Path) -> None:
    """Convert GGUF file `path` into an HF-format model directory `out` (float32 weights)."""
    reader = _open(Path(path))
    meta = _Metadata(reader, Path(path))
    arch = meta.get("general.architecture", str)
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: GGUF architecture {arch!r} is not supported; supported: "
            + ", ".join(ARCHITECTURES)
        )
    config = _hf_config(meta, arch, {t.name for t in reader.tensors})
    tensors = _hf_tensors(reader, config, arch, Path(path))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    _write_tokenizer(meta, out, config)


class _Metadata:
    """Typed access to a GGUF file's key-value metadata, with errors that name the key."""

    def __init__(self, reader: Any, path: Path) -> None:
        self._fields, self.path = reader.fields, path

    def has(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, kind: type, default: Any = ...) -> Any:
        if key not in self._fields:
            if default is ...:
                raise ModelLoadError(f"{self.path}: GGUF metadata has no {key!r}")
            return default
        value = self._fields[key].contents()
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            # GGUF stores float32: take its shortest decimal (1e-05, not 9.999999747378752e-06)
            import numpy as np

            value = float(str(np.float32(value)))
        if kind is list:
            ok = isinstance(value, list)
        else:
            ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if not ok:
            raise ModelLoadError(
                f"{self.path}: GGUF metadata {key!r} should be {kind.__name__}, "
                f"got {type(value).__name__}"
            )
        return value


def _open(path: Path) -> Any:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise ModelLoadError(
            "reading GGUF files needs the gguf package (pip install gguf)"
        ) from None
    from gguf import GGUFReader

    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError / struct.error / OSError on bad files
        raise ModelLoadError(f"{path}: not a readable GGUF file ({exc})") from None


def _hf_config(meta: _Metadata, arch: str, names: set[str]) -> dict[str, Any]:
    def key(k: str, kind: type, default: Any = ...) -> Any:
        return meta.get(f"{arch}.{k}", kind, default)

    hidden = key("embedding_length", int)
    heads = key("attention.head_count", int)
    head_dim = key("attention.key_length", int, hidden // heads)
    n_vocab = len(meta.get("tokenizer.ggml.tokens", list))
    cfg: dict[str, Any] = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}.get(arch, "qwen3_moe"),
        "vocab_size": key("vocab_size", int, n_vocab),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length", int, 0),
        "num_hidden_layers": key("block_count", int),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", int, heads),
        "head_dim": head_dim,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", float),
        "max_position_embeddings": key("context_length", int),
        "rope_theta": key("rope.freq_base", float, 10000.0),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if key("rope.dimension_count", int, head_dim) != head_dim:
        raise ModelLoadError(f"{meta.path}: partial rotary embeddings are not supported")
    scaling = key("rope.scaling.type", str, "none")
    if scaling not in ("none", ""):
        if scaling != "linear":
            raise ModelLoadError(f"{meta.path}: GGUF rope scaling {scaling!r} is not supported")
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor", float)}
    if arch == "llama":
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    if arch == "qwen3moe":
        cfg["num_experts"] = key("expert_count", int)
        cfg["num_experts_per_tok"] = key("expert_used_count", int)
        cfg["moe_intermediate_size"] = key("expert_feed_forward_length", int)
        cfg["norm_topk_prob"] = True
        cfg["decoder_sparse_step"] = 1
        cfg["mlp_only_layers"] = []
    for name, tid in (("bos_token_id", "bos"), ("eos_token_id", "eos")):
        value = meta.get(f"tokenizer.ggml.{tid}_token_id", int, None)
        if value is not None:
            cfg[name] = value
    return cfg


def _hf_tensors(reader: Any, config: dict[str, Any], arch: str, path: Path) -> dict[str, Any]:
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    out: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        try:
            data = dequantize(t.data, GGMLQuantizationType(t.tensor_type))
        except (NotImplementedError, ValueError) as exc:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} of type {t.tensor_type!r} cannot be dequantised ({exc})"
            ) from None
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions innermost first
        arr = np.array(data, dtype=np.float32).reshape(shape)  # a writable copy
        for name, tensor in _rename(t.name, torch.from_numpy(arr), path):
            if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
                tensor = _unpermute(tensor, heads if "q_proj" in name else kv_heads)
            out[name] = tensor.contiguous()
    return out


def _rename(name: str, tensor: Any, path: Path) -> list[tuple[str, Any]]:
    """HF name(s) of one GGUF tensor; a stacked expert tensor becomes one tensor per expert."""
    top = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if name in top:
        return [(top[name], tensor)]
    if name.startswith("blk.") and name.count(".") >= 2:
        _, layer, rest = name.split(".", 2)
        if layer.isdigit():
            if rest in _LAYER_TENSORS:
                return [(f"model.layers.{layer}.{_LAYER_TENSORS[rest]}", tensor)]
            if rest in _EXPERT_TENSORS:
                proj = _EXPERT_TENSORS[rest]
                return [
                    (f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight", tensor[e])
                    for e in range(tensor.shape[0])
                ]
    if name == "rope_freqs.weight":
        raise ModelLoadError(f"{path}: GGUF rope_freqs (llama3 rope scaling) is not supported")
    raise ModelLoadError(f"{path}: unexpected GGUF tensor {name!r} (unsupported variant?)")


def _unpermute(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's q/k permutation: its converter reorders each head's rows from HF's
    rotate-half layout (first half, second half) to interleaved pairs; this is the inverse."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _write_tokenizer(meta: _Metadata, out: Path, config: dict[str, Any]) -> None:
    from tokenizers import AddedToken, Regex, decoders, pre_tokenizers, processors
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    model = meta.get("tokenizer.ggml.model", str)
    if model != "gpt2":
        raise ModelLoadError(
            f"{meta.path}: GGUF tokenizer {model!r} is not supported (only gpt2-style BPE); "
            "put the model's tokenizer.json beside a converted copy instead"
        )
    tokens = meta.get("tokenizer.ggml.tokens", list)
    types = meta.get("tokenizer.ggml.token_type", list, [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", list)]
    pre = meta.get("tokenizer.ggml.pre", str, "default")
    if pre not in _PRE_TOKENIZERS:
        raise ModelLoadError(
            f"{meta.path}: GGUF pre-tokenizer {pre!r} is not supported; supported: "
            + ", ".join(_PRE_TOKENIZERS)
        )
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = HFTokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    steps = []
    for step in _PRE_TOKENIZERS[pre]:
        if step == "digits":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        elif step == "gpt2":
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            steps.append(pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"))
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tok.pre_tokenizer = steps[0] if len(steps) == 1 else pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    # llama.cpp token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    special = [
        AddedToken(tokens[i], special=True, normalized=False) for i, k in enumerate(types) if k == 3
    ]
    user = [
        AddedToken(tokens[i], special=False, normalized=False)
        for i, k in enumerate(types)
        if k == 4
    ]
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    tok.save(str(out / "tokenizer.json"))

    def token(tid: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{tid}_token_id", int, None)
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tcfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config["max_position_embeddings"],
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": meta.get("tokenizer.ggml.add_bos_token", bool, False),
    }
    template = meta.get("tokenizer.chat_template", str, None)
    if template:
        tcfg["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
