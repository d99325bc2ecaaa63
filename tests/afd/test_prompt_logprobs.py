"""Prompt logprobs (`SamplingParams.prompt_logprobs`, vLLM's meaning) end to end through `LLM`:
equal to HF transformers' log-softmax of the logits on the same weights (fp32, within
HF_TOL) whether the prompt is prefilled at once or chunked; in the exact mode
(`batch_invariant=True`) the same bits in AFD as aggregated, chunked or not, under preemption;
delivered once; and asking for them never changes a sampled token."""

from __future__ import annotations

import pytest
import torch

from afdserve import LLM, SamplingParams

transformers = pytest.importorskip("transformers")

HF_TOL = 1e-4
"""|ours - HF| of every prompt token's log-probability and of its top alternatives' (fp32)."""
TOP = 5
LENGTHS = (1, 2, 9, 40, 70)


def _prompts(vocab: int, lengths=LENGTHS, seed: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


def _params(**kw) -> SamplingParams:
    return SamplingParams(
        **{"temperature": 0, "max_tokens": 6, "ignore_eos": True, "prompt_logprobs": TOP, **kw}
    )


def _generate(model_dir, prompts, params=None, **engine):
    with LLM(str(model_dir), dtype="float32", **engine) as llm:
        outs = llm.generate(prompts, params or _params())
        counters = [w.scheduler.counters for w in getattr(llm.engine, "workers", [])]
    return outs, counters


def _hf_logprobs(model_dir, prompts) -> list[torch.Tensor]:
    """Per prompt [n, V]: HF's log_softmax of the logits at every position (fp32)."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([p])).logits[0].float().log_softmax(-1) for p in prompts]


def _max_diff_vs_hf(outs, prompts, hf) -> float:
    """Checks the shape of every output's prompt logprobs against HF and returns the largest
    |ours - HF| over the prompt tokens and their top alternatives."""
    worst = 0.0
    for out, prompt, ref in zip(outs, prompts, hf, strict=True):
        plp = out.prompt_logprobs
        assert len(plp) == len(prompt) and plp[0] is None
        for j in range(1, len(prompt)):
            row, tok = ref[j - 1], prompt[j]  # the distribution of position j given 0..j-1
            entry = plp[j]
            assert next(iter(entry)) == tok  # the prompt token first, as vLLM
            got = entry[tok]
            worst = max(worst, abs(got.logprob - row[tok].item()))
            # its rank: how many tokens are at least as likely (near-ties either way)
            lo = int((row > row[tok] + HF_TOL).sum()) + 1
            hi = int((row >= row[tok] - HF_TOL).sum())
            assert lo <= got.rank <= hi, (got.rank, lo, hi)
            # the top alternatives, with the prompt token among them or before them
            assert len(entry) in (TOP, TOP + 1)
            vals = sorted((lp.logprob for lp in entry.values()), reverse=True)[:TOP]
            for v, r in zip(vals, row.topk(TOP).values.tolist(), strict=True):
                worst = max(worst, abs(v - r))
            for t, lp in entry.items():
                worst = max(worst, abs(lp.logprob - row[t].item()))
    return worst


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3-moe"])
def test_prompt_logprobs_match_hf(tiny_model_dir, arch):
    d = tiny_model_dir(arch)
    prompts = _prompts(transformers.AutoConfig.from_pretrained(d).vocab_size)
    outs, _ = _generate(d, prompts, mode="aggregated", attention_workers=1)
    diff = _max_diff_vs_hf(outs, prompts, _hf_logprobs(d, prompts))
    print(f"{arch}: max |prompt logprob - HF| = {diff:.3g}")
    assert diff <= HF_TOL


def test_prompt_logprobs_match_hf_under_chunked_prefill(tiny_model_dir):
    """A 7-token step budget splits every prompt across steps (and shares steps between
    prompts): each chunk scores its own rows, the last row of a chunk the next chunk's first
    token."""
    d = tiny_model_dir("llama")
    prompts = _prompts(transformers.AutoConfig.from_pretrained(d).vocab_size)
    outs, _ = _generate(d, prompts, mode="aggregated", max_num_batched_tokens=7)
    diff = _max_diff_vs_hf(outs, prompts, _hf_logprobs(d, prompts))
    print(f"chunked (budget 7): max |prompt logprob - HF| = {diff:.3g}")
    assert diff <= HF_TOL


@pytest.fixture(scope="module")
def exact_reference(tiny_model_dirs):
    """Aggregated, exact mode, one worker, no chunk budget: tokens and prompt logprobs."""
    cache = {}

    def get(arch: str):
        if arch not in cache:
            d = tiny_model_dirs[arch]
            prompts = _prompts(transformers.AutoConfig.from_pretrained(d).vocab_size)
            outs, _ = _generate(
                d, prompts, mode="aggregated", attention_workers=1, batch_invariant=True
            )
            cache[arch] = prompts, [(o.token_ids, o.prompt_logprobs) for o in outs]
        return cache[arch]

    return get


@pytest.mark.parametrize(
    "arch,engine",
    [
        ("llama", dict(mode="afd", attention_workers=2, microbatches=2)),
        ("qwen3-moe", dict(mode="afd", attention_workers=3, microbatches=2)),
        ("llama", dict(mode="aggregated", attention_workers=1, max_num_batched_tokens=7)),
    ],
    ids=["llama-afd-2A-M2", "qwen3-moe-afd-3A-M2", "llama-aggregated-chunked"],
)
def test_exact_mode_prompt_logprobs_are_the_same_bits(
    tiny_model_dirs, exact_reference, arch, engine
):
    prompts, want = exact_reference(arch)
    outs, _ = _generate(tiny_model_dirs[arch], prompts, batch_invariant=True, **engine)
    assert [(o.token_ids, o.prompt_logprobs) for o in outs] == want


@pytest.mark.parametrize("arch", ["llama", "qwen3-moe"])
def test_exact_mode_afd_under_preemption_and_chunking_sends_them_once(
    tiny_model_dirs, exact_reference, arch
):
    """24 blocks of 4 tokens cannot hold every sequence at once and a 16-token budget chunks
    the long prompts: sequences are preempted and recomputed, the same bits come out, once."""
    prompts, want = exact_reference(arch)
    d = tiny_model_dirs[arch]
    engine = dict(
        mode="afd",
        attention_workers=2,
        microbatches=2,
        block_size=4,
        num_kv_blocks=24,
        max_num_batched_tokens=16,
        batch_invariant=True,
    )
    with LLM(str(d), dtype="float32", **engine) as llm:
        for i, p in enumerate(prompts):
            llm.engine.add_request(f"q{i}", p, _params())
        firsts: dict[str, int] = {}
        while llm.engine.has_unfinished():
            for ev in llm.engine.step():
                if ev.prompt_logprobs is not None:
                    firsts[ev.request_id] = firsts.get(ev.request_id, 0) + 1
        preemptions = sum(w.scheduler.counters.preemptions for w in llm.engine.workers)
        outs = llm.generate(prompts, _params())
    assert preemptions > 0
    assert firsts == {f"q{i}": 1 for i in range(len(prompts))}
    assert [(o.token_ids, o.prompt_logprobs) for o in outs] == want


def test_asking_for_prompt_logprobs_never_changes_a_sampled_token(tiny_model_dirs):
    """The fast mode too: the LM head of the sampling rows runs apart from the prompt rows'."""
    d = tiny_model_dirs["qwen3-moe"]
    prompts = _prompts(384)
    # the exact mode: bit for bit holds by construction there; in the fast mode the rows an
    # FFN batch gathers from two attention workers depend on timing, and AVX-512 rounds a row
    # by what shares its GEMM (1.5e-6 apart, seen on an Intel Xeon)
    engine = dict(mode="afd", attention_workers=2, microbatches=2, batch_invariant=True)
    plain, _ = _generate(d, prompts, _params(prompt_logprobs=None, logprobs=2), **engine)
    asked, _ = _generate(d, prompts, _params(logprobs=2), **engine)
    assert [(o.token_ids, o.logprobs) for o in asked] == [(o.token_ids, o.logprobs) for o in plain]
    assert all(o.prompt_logprobs is None for o in plain)
    assert all(len(o.prompt_logprobs) == len(p) for o, p in zip(asked, prompts, strict=True))
