"""load_weights: the happy paths (single file, shards, dtypes, tied head) and one clear
ModelLoadError for every way a model directory can be broken."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from afdserve.errors import ModelLoadError, UserInputError
from afdserve.model.config import SUPPORTED_ARCHITECTURES, ModelConfig
from afdserve.model.loader import expected_weight_shapes, load_weights
from afdserve.model.make_model import make_model


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _load(path: Path, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    return load_weights(path, ModelConfig.from_dir(path), dtype)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral", "qwen3-moe"])
def test_loads_exactly_the_expected_tensors(arch: str, tiny_model_dir) -> None:
    path = tiny_model_dir(arch)
    config = ModelConfig.from_dir(path)
    weights = _load(path)
    expected = expected_weight_shapes(config)
    assert list(weights) == list(expected)
    for name, tensor in weights.items():
        assert tuple(tensor.shape) == expected[name] and tensor.dtype == torch.float32, name
    written = load_file(str(path / "model.safetensors"))
    for name in weights:
        assert torch.equal(weights[name], written[name]), name


def test_expected_names_per_architecture(tiny_model_dirs) -> None:
    names = {
        a: set(expected_weight_shapes(ModelConfig.from_dir(p))) for a, p in tiny_model_dirs.items()
    }
    assert "model.layers.0.self_attn.q_proj.bias" in names["qwen2"]
    assert "model.layers.0.self_attn.o_proj.bias" not in names["qwen2"]
    assert "model.layers.0.self_attn.q_proj.bias" not in names["llama"]
    assert "model.layers.1.self_attn.k_norm.weight" in names["qwen3"]
    assert "lm_head.weight" not in names["qwen3"]  # tied
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names["mixtral"]
    assert "model.layers.1.block_sparse_moe.gate.weight" in names["mixtral"]
    assert "model.layers.0.mlp.experts.7.up_proj.weight" in names["qwen3-moe"]
    assert "model.layers.1.mlp.gate_proj.weight" in names["qwen3-moe"]  # mlp_only_layers=[1]
    assert not any(n.startswith("model.layers.1.mlp.experts.") for n in names["qwen3-moe"])
    config = ModelConfig.from_dir(tiny_model_dirs["qwen3"])
    shapes = expected_weight_shapes(config)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (config.q_size, config.hidden_size)
    assert shapes["model.layers.0.self_attn.o_proj.weight"] == (config.hidden_size, config.q_size)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (config.kv_size, config.hidden_size)


def test_sharded_load_equals_unsharded(tmp_path: Path) -> None:
    one = make_model("mixtral", "tiny", 3, tmp_path / "one")
    four = make_model("mixtral", "tiny", 3, tmp_path / "four", shards=4)
    assert len(list(four.glob("model-*-of-00004.safetensors"))) == 4
    a, b = _load(one), _load(four)
    assert list(a) == list(b)
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_write_and_load(dtype: torch.dtype, tmp_path: Path) -> None:
    name = str(dtype).removeprefix("torch.")
    fp32 = make_model("qwen3", "tiny", 0, tmp_path / "fp32")
    half = make_model("qwen3", "tiny", 0, tmp_path / name, dtype=name)
    assert ModelConfig.from_dir(half).dtype == name
    loaded = _load(half, dtype)
    reference = _load(fp32)
    for n, t in loaded.items():
        assert t.dtype == dtype
        assert torch.equal(t, reference[n].to(dtype)), n  # written = fp32 weights rounded once
    upcast = _load(half, torch.float32)
    assert all(
        upcast[n].dtype == torch.float32 and torch.equal(upcast[n], loaded[n].float())
        for n in upcast
    )


def test_cast_on_load(tiny_model_dir) -> None:
    weights = _load(tiny_model_dir("llama"), torch.bfloat16)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}


def test_tied_checkpoint_with_stored_head_is_accepted(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("qwen3"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    assert "lm_head.weight" not in _load(path)


def test_legacy_rotary_inv_freq_is_ignored(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(tensors, str(path / "model.safetensors"))
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in _load(path)


# ---- errors ---------------------------------------------------------------------------------


def test_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        ModelConfig.from_dir(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_weights(tmp_path / "nope", _any_config(), torch.float32)


def _any_config() -> ModelConfig:
    from afdserve.model.make_model import preset_config

    return ModelConfig.from_hf_dict(preset_config("llama", "tiny", 384))


def test_error_is_a_user_input_error(tmp_path: Path) -> None:
    with pytest.raises(UserInputError):
        ModelConfig.from_dir(tmp_path / "nope")


def test_no_config_json(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    (path / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="no config.json"):
        ModelConfig.from_dir(path)


def test_config_json_not_json(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    (path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        ModelConfig.from_dir(path)


def test_unsupported_architecture_lists_supported(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture 'GPT2LMHeadModel'") as err:
        ModelConfig.from_dir(path)
    assert all(a in str(err.value) for a in SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mlp_bias", True, "mlp_bias"),
        ("intermediate_size", 0, "intermediate_size"),
        ("rms_norm_eps", "tiny", "rms_norm_eps"),
        ("num_key_value_heads", 3, "multiple of"),
    ],
)
def test_unsupported_or_invalid_config_fields(field: str, value, message: str) -> None:
    from afdserve.model.make_model import preset_config

    d = preset_config("llama", "tiny", 384)
    d[field] = value
    with pytest.raises(ModelLoadError, match=message):
        ModelConfig.from_hf_dict(d)


def test_mixtral_sliding_window_rejected() -> None:
    from afdserve.model.make_model import preset_config

    d = preset_config("mixtral", "tiny", 384)
    d["sliding_window"] = 128
    with pytest.raises(ModelLoadError, match="sliding_window"):
        ModelConfig.from_hf_dict(d)


def test_no_weight_files(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    (path / "model.safetensors").rename(path / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="neither model.safetensors nor .*pytorch_model.bin"):
        _load(path)


def test_corrupt_safetensors_names_the_file(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"\x93garbage, not a safetensors file" * 10)
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: corrupt or truncated safetensors file"
    ):
        _load(path)


def test_empty_safetensors_file(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    (path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        _load(path)


@pytest.mark.parametrize("keep", [0.5, 0.999])
def test_truncated_safetensors_names_the_file(keep: float, tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("qwen3-moe"), tmp_path / "m")
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        _load(path)


def test_truncated_shard_names_the_shard(tmp_path: Path) -> None:
    path = make_model("llama", "tiny", 0, tmp_path / "m", shards=2)
    shard = path / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors"):
        _load(path)


def test_index_names_missing_shard(tmp_path: Path) -> None:
    path = make_model("llama", "tiny", 0, tmp_path / "m", shards=2)
    (path / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00001-of-00002.safetensors.*does not exist"):
        _load(path)


def test_index_lists_tensor_its_shard_lacks(tmp_path: Path) -> None:
    path = make_model("llama", "tiny", 0, tmp_path / "m", shards=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00002.safetensors"
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    first = load_file(str(path / "model-00001-of-00002.safetensors"))
    assert "model.norm.weight" not in first
    with pytest.raises(ModelLoadError, match="'model.norm.weight' listed in the index is absent"):
        _load(path)


def test_bad_index_json(tmp_path: Path) -> None:
    path = make_model("llama", "tiny", 0, tmp_path / "m", shards=2)
    (path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ModelLoadError, match="weight_map"):
        _load(path)


def test_missing_tensor_is_named(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("mixtral"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    del tensors["model.norm.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="2 tensor.*missing") as err:
        _load(path)
    assert "model.layers.1.block_sparse_moe.experts.2.w3.weight" in str(err.value)
    assert "model.norm.weight" in str(err.value)


def test_untied_model_without_head_is_missing_lm_head(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("qwen2"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    del tensors["lm_head.weight"]
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="missing.*lm_head.weight"):
        _load(path)


def test_wrong_shape_is_named(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("qwen2"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(48, 64)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(
        ModelLoadError,
        match=r"'model.layers.0.self_attn.k_proj.weight' has shape \[48, 64\], expected \[32, 64\]",
    ):
        _load(path)


def test_config_disagreeing_with_weights(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["intermediate_size"] = 256
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="mlp.gate_proj.weight' has shape"):
        _load(path)


def test_unexpected_tensor_is_named(tiny_model_dir, tmp_path: Path) -> None:
    path = _copy(tiny_model_dir("llama"), tmp_path / "m")
    tensors = load_file(str(path / "model.safetensors"))
    tensors["model.layers.0.mlp.shared_expert.gate_proj.weight"] = torch.zeros(4, 64)
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="unexpected tensor.*shared_expert"):
        _load(path)


@pytest.mark.gpu
def test_load_onto_cuda(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3-moe")
    weights = load_weights(path, ModelConfig.from_dir(path), torch.bfloat16, "cuda")
    assert all(t.is_cuda and t.dtype == torch.bfloat16 for t in weights.values())
