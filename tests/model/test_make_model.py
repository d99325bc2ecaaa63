"""make-model output against HF transformers: loads cleanly, holds the weights we wrote, and
decodes greedily to varied, well-separated tokens (what the equivalence tests rely on)."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from afdserve.errors import UserInputError
from afdserve.model.byte_tokenizer import VOCAB_SIZE
from afdserve.model.config import ModelConfig
from afdserve.model.loader import expected_weight_shapes
from afdserve.model.make_model import make_model, preset_config, resolve_arch
from afdserve.model.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

ARCHS = ("llama", "qwen2", "qwen3", "mixtral", "qwen3-moe")
PROMPTS = (
    "Hello world",
    "The quick brown fox jumps over the lazy dog and then",
    "a",
    "In the morning the market was quiet. People walked along the river, and the light",
)
_EXPERT = re.compile(r"^(.*)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")


def _hf_load(path: Path):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True
    )
    return model.eval(), info


def _hf_tensor(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The HF model's copy of checkpoint tensor `name`: per-expert in transformers 4, fused
    (experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I]) in transformers 5."""
    for candidate in (name, name.replace(".block_sparse_moe.", ".mlp.")):
        if candidate in state:
            return state[candidate]
    m = _EXPERT.match(name.replace(".block_sparse_moe.", ".mlp."))
    assert m, f"HF model has no tensor for {name}"
    prefix, e, kind = m.group(1), int(m.group(2)), m.group(3)
    if kind in ("w2", "down_proj"):
        return state[f"{prefix}.experts.down_proj"][e]
    gate_up = state[f"{prefix}.experts.gate_up_proj"][e]  # [2I, D]
    half = gate_up.shape[0] // 2
    return gate_up[:half] if kind in ("w1", "gate_proj") else gate_up[half:]


@pytest.mark.parametrize("arch", ARCHS)
def test_hf_loads_every_weight_we_wrote(arch: str, tiny_model_dir) -> None:
    path = tiny_model_dir(arch)
    model, info = _hf_load(path)
    assert not any(info.values()), f"HF loading info not clean: {info}"
    assert type(model).__name__ == resolve_arch(arch)
    written = load_file(str(path / "model.safetensors"))
    config = ModelConfig.from_dir(path)
    assert set(written) == set(expected_weight_shapes(config))
    state = model.state_dict()
    for name, tensor in written.items():
        torch.testing.assert_close(_hf_tensor(state, name), tensor, rtol=0, atol=0, msg=name)
    if config.tie_word_embeddings:
        assert "lm_head.weight" not in written
        torch.testing.assert_close(model.lm_head.weight, written["model.embed_tokens.weight"])


def test_config_json_matches_hf_config(tiny_model_dirs) -> None:
    """The fields the runtime reads mean the same to HF (MoE routing, dense layers, RoPE)."""
    moe = ModelConfig.from_dir(tiny_model_dirs["qwen3-moe"])
    hf = transformers.AutoConfig.from_pretrained(tiny_model_dirs["qwen3-moe"])
    assert moe.norm_topk_prob is False and hf.norm_topk_prob is False
    assert moe.moe_layers == (True, False, True) and hf.mlp_only_layers == [1]
    assert moe.num_experts == 8 and moe.num_experts_per_tok == 2
    llama = ModelConfig.from_dir(tiny_model_dirs["llama"])
    hf = transformers.AutoConfig.from_pretrained(tiny_model_dirs["llama"])
    assert llama.rope_scaling is not None and llama.rope_scaling["rope_type"] == "llama3"
    assert hf.rope_parameters["rope_type"] == "llama3"
    assert hf.rope_parameters["rope_theta"] == llama.rope_theta
    qwen3 = ModelConfig.from_dir(tiny_model_dirs["qwen3"])
    assert (
        qwen3.tie_word_embeddings
        and qwen3.head_dim * qwen3.num_attention_heads != qwen3.hidden_size
    )
    mixtral = ModelConfig.from_dir(tiny_model_dirs["mixtral"])
    assert mixtral.norm_topk_prob and mixtral.moe_layers == (True, True)
    for arch, path in tiny_model_dirs.items():
        cfg = ModelConfig.from_dir(path)
        assert cfg.vocab_size == VOCAB_SIZE, arch
        assert cfg.num_key_value_heads < cfg.num_attention_heads, arch  # GQA everywhere
        gen = json.loads((path / "generation_config.json").read_text())
        assert tuple(gen["eos_token_id"]) == cfg.eos_token_ids, arch


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_is_varied_and_well_separated(arch: str, tiny_model_dir) -> None:
    """Random models that repeat one token, or whose top-2 logits nearly tie, would make
    token-exact comparisons with HF meaningless or flaky."""
    path = tiny_model_dir(arch)
    model, _ = _hf_load(path)
    tok = Tokenizer(path)
    for prompt in PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        out = model.generate(
            ids,
            max_new_tokens=32,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
        new = out.sequences[0, ids.shape[1] :].tolist()
        assert len(new) == 32
        assert len(set(new)) >= 8, f"{arch}: {prompt!r} -> {new}"
        longest_run = max(len(list(run)) for _, run in itertools.groupby(new))
        assert longest_run < 8, f"{arch}: one token repeated: {new}"
        top2 = torch.stack([s[0].topk(2).values for s in out.scores])  # [32, 2]
        gap = (top2[:, 0] - top2[:, 1]).min().item()
        assert gap > 1e-4, f"{arch}: near-tie in greedy decoding ({gap:.2e}) for {prompt!r}"
        assert all(t not in tok.special_token_ids for t in new)
        text = tok.decode(new)
        assert "\ufffd" not in text, f"{arch}: non-printable output {text!r}"


def test_same_seed_same_files_other_seed_other_weights(tmp_path: Path) -> None:
    a = make_model("qwen2", "tiny", 7, tmp_path / "a")
    b = make_model("Qwen2ForCausalLM", "tiny", 7, tmp_path / "b")
    c = make_model("qwen2", "tiny", 8, tmp_path / "c")
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    wa, wc = load_file(str(a / "model.safetensors")), load_file(str(c / "model.safetensors"))
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_model_loads_in_hf(dtype: str, tmp_path: Path) -> None:
    path = make_model("mixtral", "tiny", 0, tmp_path / "m", dtype=dtype)
    written = load_file(str(path / "model.safetensors"))
    assert {t.dtype for t in written.values()} == {getattr(torch, dtype)}
    assert json.loads((path / "config.json").read_text())["torch_dtype"] == dtype
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), output_loading_info=True
    )
    assert not any(info.values()), info
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()


def test_sharded_model_loads_in_hf(tmp_path: Path) -> None:
    path = make_model("qwen3-moe", "tiny", 0, tmp_path / "m", shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    assert not (path / "model.safetensors").exists()
    _, info = _hf_load(path)
    assert not any(info.values()), info


def test_config_overrides_shape_the_weights(tmp_path: Path) -> None:
    path = make_model(
        "llama",
        "tiny",
        0,
        tmp_path / "m",
        config_overrides={"attention_bias": True, "vocab_size": 400},
    )
    written = load_file(str(path / "model.safetensors"))
    assert written["model.layers.0.self_attn.o_proj.bias"].shape == (64,)
    assert written["lm_head.weight"].shape == (400, 64)
    _, info = _hf_load(path)
    assert not any(info.values()), info


def test_small_presets_are_bigger() -> None:
    for arch in ARCHS:
        tiny, small = (
            preset_config(arch, "tiny", VOCAB_SIZE),
            preset_config(arch, "small", VOCAB_SIZE),
        )
        assert tiny["hidden_size"] == 64 and 256 <= small["hidden_size"] <= 512
        assert 4 <= small["num_hidden_layers"] <= 8


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"arch": "gpt2"}, "unknown architecture 'gpt2'"),
        ({"preset": "huge"}, "unknown preset"),
        ({"dtype": "int8"}, "unknown dtype"),
        ({"shards": 0}, "shards must be"),
        ({"seed": -1}, "seed must be"),
        ({"shards": 10_000}, "cannot split"),
        ({"config_overrides": {"vocab_size": 100}}, "smaller than the tokenizer"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str, tmp_path: Path) -> None:
    args = {"arch": "llama", "preset": "tiny", "seed": 0, "out": tmp_path / "m", **kwargs}
    with pytest.raises(UserInputError, match=message):
        make_model(**args)
    assert not (tmp_path / "m").exists()


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import afdserve.model.make_model as mm

    def full_disk(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(mm, "_write_weights", full_disk)
    with pytest.raises(OSError, match="No space"):
        make_model("llama", "tiny", 0, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(OSError, match="No space"):
        make_model("llama", "tiny", 0, tmp_path / "empty")
    assert list((tmp_path / "empty").iterdir()) == []


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "keep.txt").write_text("mine")
    with pytest.raises(UserInputError, match="not an empty directory"):
        make_model("llama", "tiny", 0, tmp_path / "m")
    assert (tmp_path / "m" / "keep.txt").read_text() == "mine"
