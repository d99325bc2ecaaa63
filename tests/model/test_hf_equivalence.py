"""The engine against HF transformers on the same weights (fp32): greedy tokens identical for
every architecture, per-step log-probabilities within a tight tolerance."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.model.make_model import make_model

transformers = pytest.importorskip("transformers")

NEW_TOKENS = 32


def _prompts(vocab: int, lengths=(3, 9, 17, 30), seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def hf_greedy(
    model_dir, prompts: list[list[int]], new_tokens: int, device: str = "cpu"
) -> tuple[list[list[int]], list[list[float]]]:
    """Batched (left-padded) HF generate; returns tokens and the log-prob of each chosen token."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.to(device).eval()
    model.generation_config.eos_token_id = None  # like ignore_eos: always new_tokens tokens
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    with torch.no_grad():
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[:, width:].tolist()
    logprobs = [
        [
            torch.log_softmax(step_logits[i].float(), -1)[tokens[i][j]].item()
            for j, step_logits in enumerate(out.logits)
        ]
        for i in range(len(prompts))
    ]
    return tokens, logprobs


def ours(
    model_dir, prompts, new_tokens: int, **engine
) -> tuple[list[list[int]], list[list[float]]]:
    with LLM(str(model_dir), dtype="float32", **engine) as llm:
        outs = llm.generate(
            prompts,
            SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, logprobs=0),
        )
    return [o.token_ids for o in outs], [o.logprobs for o in outs]


def _assert_match(model_dir, prompts, new_tokens=NEW_TOKENS, **engine):
    ref_tokens, ref_lp = hf_greedy(model_dir, prompts, new_tokens, engine.get("device", "cpu"))
    got_tokens, got_lp = ours(model_dir, prompts, new_tokens, **engine)
    # the outputs must not be degenerate, or the comparison would prove little
    assert any(len(set(t)) > 3 for t in ref_tokens), ref_tokens
    for i, (ref, got) in enumerate(zip(ref_tokens, got_tokens, strict=True)):
        assert got == ref, f"prompt {i}: tokens differ from HF\n HF:  {ref}\n ours:{got}"
    for ref, got in zip(ref_lp, got_lp, strict=True):
        assert got == pytest.approx(ref, abs=2e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral", "qwen3-moe"])
def test_greedy_matches_hf(tiny_model_dir, arch):
    d = tiny_model_dir(arch)
    cfg = transformers.AutoConfig.from_pretrained(d)
    _assert_match(
        d, _prompts(cfg.vocab_size), mode="aggregated", attention_workers=1, microbatches=1
    )


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe"])
def test_exact_mode_matches_hf(tiny_model_dir, arch):
    d = tiny_model_dir(arch)
    cfg = transformers.AutoConfig.from_pretrained(d)
    _assert_match(
        d, _prompts(cfg.vocab_size), mode="afd", attention_workers=2, batch_invariant=True
    )


@pytest.mark.parametrize("arch", ["llama", "mixtral"])
def test_afd_matches_hf(tiny_model_dir, arch):
    d = tiny_model_dir(arch)
    cfg = transformers.AutoConfig.from_pretrained(d)
    _assert_match(d, _prompts(cfg.vocab_size), mode="afd", attention_workers=2, microbatches=2)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3-moe"])
@pytest.mark.parametrize("mode", ["aggregated", "afd"])
def test_cuda_matches_hf_on_cuda(tiny_model_dir, arch, mode):
    """The engine on a GPU (aggregated, and in-process AFD 2A1F M=2) against HF on the same GPU
    (fp32; cuBLAS's fp32 matmuls, no TF32)."""
    d = tiny_model_dir(arch)
    cfg = transformers.AutoConfig.from_pretrained(d)
    workers = 1 if mode == "aggregated" else 2
    _assert_match(
        d,
        _prompts(cfg.vocab_size),
        mode=mode,
        attention_workers=workers,
        microbatches=workers,
        device="cuda",
    )


ROPE_CASES = {
    "llama3": (
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        },
    ),
    "linear": ("qwen2", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "yarn": (
        "qwen3",
        {
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 128,
            }
        },
    ),
}


@pytest.mark.parametrize("case", sorted(ROPE_CASES))
def test_rope_scaling_matches_hf(tmp_path, case):
    arch, overrides = ROPE_CASES[case]
    d = make_model(arch, "tiny", 3, tmp_path / case, config_overrides=overrides)
    cfg = transformers.AutoConfig.from_pretrained(d)
    _assert_match(
        d,
        _prompts(cfg.vocab_size, lengths=(5, 40, 90)),
        new_tokens=12,
        mode="aggregated",
        attention_workers=1,
        microbatches=1,
    )


def test_sharded_and_tied_models_match_hf(tmp_path):
    d = make_model("qwen3", "tiny", 5, tmp_path / "sharded", shards=3)
    cfg = transformers.AutoConfig.from_pretrained(d)
    _assert_match(
        d,
        _prompts(cfg.vocab_size, lengths=(4, 11)),
        new_tokens=16,
        mode="aggregated",
        attention_workers=1,
        microbatches=1,
    )


@pytest.mark.parametrize("mode", ["aggregated", "afd"])
def test_long_prompts_match_hf(tiny_model_dir, mode):
    """Prompts longer than attention's Q_BLOCK (one prefill chunk attended block by block)."""
    from afdserve.model.attention import Q_BLOCK

    d = tiny_model_dir("qwen3")
    cfg = transformers.AutoConfig.from_pretrained(d)
    workers = 1 if mode == "aggregated" else 2
    _assert_match(
        d,
        _prompts(cfg.vocab_size, lengths=(Q_BLOCK * 2 + 45, 7, Q_BLOCK + 1)),
        new_tokens=8,
        mode=mode,
        attention_workers=workers,
        microbatches=workers,
    )
