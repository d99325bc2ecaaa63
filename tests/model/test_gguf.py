"""GGUF models: a GGUF file written here (as llama.cpp's converter writes one) is converted back
to the HF tensors exactly (F32), matches transformers' own GGUF loader when quantised (Q8_0),
generates HF's tokens, and keeps its tokenizer; bad files are one clear ModelLoadError."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from afdserve import LLM, SamplingParams
from afdserve.errors import ModelLoadError
from afdserve.model.builtin import resolve_model
from afdserve.model.gguf import gguf_to_hf_dir
from afdserve.model.make_model import make_model

gguf = pytest.importorskip("gguf")

_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter's q/k permutation (rotate-half rows -> interleaved pairs)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_llama_gguf(hf_dir: Path, out: Path, quant: str = "F32") -> Path:
    """Write HF Llama directory `hf_dir` as a GGUF file, the way convert_hf_to_gguf.py does."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tensors = load_file(str(hf_dir / "model.safetensors"))
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_vocab_size(cfg["vocab_size"])
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    added = {t["id"]: t["content"] for t in tok["added_tokens"]}
    tokens = [added.get(i, t) for t, i in vocab] + [
        added[i] for i in sorted(added) if i >= len(vocab)
    ]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), cfg["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if i in added else 1 for i in range(len(tokens))])
    merges = tok["model"]["merges"]
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(added_id(tok, "<|im_start|>"))
    w.add_eos_token_id(added_id(tok, "<|im_end|>"))
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for name, t in tensors.items():
        arr = t.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{_NAMES[rest]}"
            if rest == "self_attn.q_proj.weight":
                arr = _permute(arr, cfg["num_attention_heads"])
            elif rest == "self_attn.k_proj.weight":
                arr = _permute(arr, cfg["num_key_value_heads"])
        if arr.ndim == 2 and quant != "F32":  # llama.cpp keeps norms (1-D) in F32
            w.add_tensor(gname, gguf.quants.quantize(arr, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(arr))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def added_id(tok: dict, content: str) -> int:
    return next(t["id"] for t in tok["added_tokens"] if t["content"] == content)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    """A small random Llama without RoPE scaling (GGUF stores llama3 scaling as a tensor)."""
    root = make_model("llama", "tiny", 0, tmp_path_factory.mktemp("gguf-src") / "llama")
    cfg = json.loads((root / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    (root / "config.json").write_text(json.dumps(cfg))
    return root


def test_f32_gguf_converts_back_to_the_hf_tensors_exactly(llama_dir, tmp_path) -> None:
    path = write_llama_gguf(llama_dir, tmp_path / "m.gguf")
    gguf_to_hf_dir(path, tmp_path / "hf")
    original = load_file(str(llama_dir / "model.safetensors"))
    converted = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert set(converted) == set(original)
    for name, t in original.items():
        assert torch.equal(converted[name], t.float()), name  # q/k permutation undone too
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    src = json.loads((llama_dir / "config.json").read_text())
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "intermediate_size",
        "vocab_size",
        "rms_norm_eps",
        "rope_theta",
    ):
        assert cfg[key] == src[key], key
    # the tokenizer encodes as the original does, special tokens included
    from afdserve.model.tokenizer import Tokenizer

    ours, theirs = Tokenizer(tmp_path / "hf"), Tokenizer(llama_dir)
    for text in ["The quick brown fox", "naïve  café 123\n\n", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == theirs.encode(text)
        assert ours.decode(ours.encode(text)) == text
    assert ours.eos_token == "<|im_end|>"


def test_quantised_gguf_matches_transformers_and_generates_its_tokens(llama_dir, tmp_path):
    pytest.importorskip("accelerate")  # transformers' GGUF loading needs it
    transformers = pytest.importorskip("transformers")
    path = write_llama_gguf(llama_dir, tmp_path / "q8.gguf", quant="Q8_0")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path), gguf_file=path.name, dtype=torch.float32
    ).eval()
    model_dir = resolve_model(path)  # a .gguf path converts (and caches) on first use
    assert resolve_model(path) == model_dir
    converted = load_file(str(model_dir / "model.safetensors"))
    theirs = hf.state_dict()
    for name, t in converted.items():
        assert torch.equal(t, theirs[name]), name
    assert not torch.equal(
        converted["model.layers.0.mlp.up_proj.weight"],
        load_file(str(llama_dir / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"],
    )  # it really is quantised
    prompt = [5, 17, 99, 250, 31]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            min_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    with LLM(str(path), dtype="float32", mode="afd", attention_workers=2) as llm:
        out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    assert out[0].token_ids == ref


def test_bad_gguf_files_are_clear_errors(llama_dir, tmp_path) -> None:
    path = write_llama_gguf(llama_dir, tmp_path / "m.gguf")
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ModelLoadError, match="cut.gguf"):
        gguf_to_hf_dir(truncated, tmp_path / "out1")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        gguf_to_hf_dir(garbage, tmp_path / "out2")
    other = tmp_path / "other.gguf"
    w = gguf.GGUFWriter(str(other), "mamba")
    w.add_tensor("x", np.zeros(4, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelLoadError, match="architecture 'mamba' is not supported"):
        gguf_to_hf_dir(other, tmp_path / "out3")
