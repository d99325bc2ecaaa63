"""Read and validate the weights of an HF-format model directory.

`expected_weight_shapes(config)` is the single list of tensor names and shapes each supported
architecture has (HF hub naming); `make_model` writes exactly these, and `load_weights` checks a
checkpoint against them before handing tensors to the model code, so that a bad file is one
clear `ModelLoadError` naming the file and the tensor, never a shape error deep in a forward.

Weight names per architecture (L = layer, E = expert):
    model.embed_tokens.weight, model.norm.weight, lm_head.weight (absent when tied)
    model.layers.L.{input_layernorm,post_attention_layernorm}.weight
    model.layers.L.self_attn.{q,k,v,o}_proj.weight       (+ .bias on q/k/v: Qwen2, attention_bias)
    model.layers.L.self_attn.{q,k}_norm.weight            (Qwen3, Qwen3-MoE)
    dense MLP:  model.layers.L.mlp.{gate,up,down}_proj.weight
    Mixtral:    model.layers.L.block_sparse_moe.gate.weight
                model.layers.L.block_sparse_moe.experts.E.{w1,w2,w3}.weight  (w1 gate, w3 up, w2 down)
    Qwen3-MoE:  model.layers.L.mlp.gate.weight
                model.layers.L.mlp.experts.E.{gate,up,down}_proj.weight
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from afdserve.errors import ModelLoadError
from afdserve.model.config import ModelConfig

if TYPE_CHECKING:
    import torch

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tensors some published checkpoints carry that no supported model reads (old Llama exports
# stored RoPE's inverse frequencies); they are skipped rather than rejected.
_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")


def expected_weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor the architecture needs, HF name -> shape, in checkpoint order."""
    d, v = config.hidden_size, config.vocab_size
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for layer in range(config.num_hidden_layers):
        p = f"model.layers.{layer}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (config.q_size, d)
        shapes[p + "self_attn.k_proj.weight"] = (config.kv_size, d)
        shapes[p + "self_attn.v_proj.weight"] = (config.kv_size, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, config.q_size)
        if config.qkv_bias:
            shapes[p + "self_attn.q_proj.bias"] = (config.q_size,)
            shapes[p + "self_attn.k_proj.bias"] = (config.kv_size,)
            shapes[p + "self_attn.v_proj.bias"] = (config.kv_size,)
        if config.o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (d,)
        if config.qk_norm:
            shapes[p + "self_attn.q_norm.weight"] = (config.head_dim,)
            shapes[p + "self_attn.k_norm.weight"] = (config.head_dim,)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes.update(_ffn_shapes(config, layer))
    shapes["model.norm.weight"] = (d,)
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def _ffn_shapes(config: ModelConfig, layer: int) -> dict[str, tuple[int, ...]]:
    d = config.hidden_size
    if not config.is_moe_layer(layer):
        i = config.intermediate_size
        p = f"model.layers.{layer}.mlp."
        return {
            p + "gate_proj.weight": (i, d),
            p + "up_proj.weight": (i, d),
            p + "down_proj.weight": (d, i),
        }
    i, n = config.moe_intermediate_size, config.num_experts
    if config.architecture == "MixtralForCausalLM":
        p = f"model.layers.{layer}.block_sparse_moe."
        gate, up, down = "w1", "w3", "w2"
    else:
        p = f"model.layers.{layer}.mlp."
        gate, up, down = "gate_proj", "up_proj", "down_proj"
    shapes: dict[str, tuple[int, ...]] = {p + "gate.weight": (n, d)}
    for e in range(n):
        shapes[f"{p}experts.{e}.{gate}.weight"] = (i, d)
        shapes[f"{p}experts.{e}.{up}.weight"] = (i, d)
        shapes[f"{p}experts.{e}.{down}.weight"] = (d, i)
    return shapes


def weight_files(model_dir: str | Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the index or the single file.

    Like HF, a single model.safetensors wins over an index when both exist.
    """
    root = Path(model_dir)
    if not root.is_dir():
        raise ModelLoadError(f"model directory {str(root)!r} does not exist or is not a directory")
    single, index = root / SINGLE_FILE, root / INDEX_FILE
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    if index.is_file():
        return _read_index(index)
    others = sorted(p.name for p in root.glob("*.bin")) + sorted(
        p.name for p in root.glob("*.safetensors")
    )
    hint = f" (found {', '.join(others[:3])}; only safetensors are supported)" if others else ""
    raise ModelLoadError(f"{str(root)!r} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")


def _read_index(index: Path) -> dict[str, Path]:
    try:
        data = json.loads(index.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{index}: not valid JSON ({exc})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelLoadError(f"{index}: no 'weight_map' object mapping tensor names to files")
    files: dict[str, Path] = {}
    for name, fname in weight_map.items():
        if not isinstance(fname, str) or "/" in fname or fname.startswith("."):
            raise ModelLoadError(f"{index}: bad file name {fname!r} for tensor {name!r}")
        files[name] = index.parent / fname
    for path in sorted(set(files.values())):
        if not path.is_file():
            raise ModelLoadError(f"{index} names shard {path.name!r}, which does not exist")
    return files


def _open(path: Path):  # -> safetensors safe_open handle
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # SafetensorError, OSError: corrupt header, truncated body, ...
        raise ModelLoadError(f"{path}: corrupt or truncated safetensors file ({exc})") from None


def _tensor_names(path: Path) -> list[str]:
    with _open(path) as f:
        return list(f.keys())


def load_weights(
    model_dir: str | Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: str | torch.device = "cpu",
    select: Callable[[str], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """All tensors of `expected_weight_shapes(config)`, HF name -> tensor cast to `dtype`.

    Validates before loading anything: every expected tensor present with its exact shape, no
    unknown tensors (they would mean an architecture variant this code would silently compute
    wrongly). With tied embeddings the result has no `lm_head.weight` (a stored copy is
    ignored): the model code uses `model.embed_tokens.weight` for the LM head.
    """
    files = weight_files(model_dir)
    expected = expected_weight_shapes(config)
    ignorable = {n for n in files if _IGNORED.match(n)}
    if config.tie_word_embeddings:
        ignorable.add("lm_head.weight")
    missing = [n for n in expected if n not in files]
    if missing:
        raise ModelLoadError(
            f"{model_dir}: {len(missing)} tensor(s) missing for {config.architecture}: "
            f"{_few(missing)}"
        )
    unexpected = [n for n in files if n not in expected and n not in ignorable]
    if unexpected:
        raise ModelLoadError(
            f"{model_dir}: {len(unexpected)} unexpected tensor(s) for {config.architecture} "
            f"(unsupported variant?): {_few(unexpected)}"
        )

    if select is not None:  # e.g. an FFN worker reads only the FFN tensors
        expected = {n: shape for n, shape in expected.items() if select(n)}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    out: dict[str, torch.Tensor] = {}
    for path, names in by_file.items():
        with _open(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise ModelLoadError(f"{path}: tensor {name!r} listed in the index is absent")
                shape = tuple(f.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ModelLoadError(
                        f"{path}: tensor {name!r} has shape {list(shape)}, expected "
                        f"{list(expected[name])} from config.json"
                    )
            for name in names:
                try:
                    tensor = f.get_tensor(name)
                except Exception as exc:  # truncated data the header did not reveal
                    raise ModelLoadError(f"{path}: cannot read tensor {name!r} ({exc})") from None
                out[name] = tensor.to(device=device, dtype=dtype)
    return {name: out[name] for name in expected}


def _few(names: Iterable[str], n: int = 5) -> str:
    names = list(names)
    more = f", ... ({len(names) - n} more)" if len(names) > n else ""
    return ", ".join(names[:n]) + more
