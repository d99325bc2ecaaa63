"""HF model directories as they come, end to end through `LLM` (transport local, tiny models, a
few tokens), one test per bug: a vocabulary padded past the tokenizer's, a config.json without
`architectures`, a directory without tokenizer files, generation_config.json's eos ids and
sampling defaults. HF transformers is the oracle where it can be (greedy tokens, where eos stops).
The tokenizer-level halves are in tests/model/test_hf_dirs.py, the server's in
tests/server/test_hf_dirs_server.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from afdserve import LLM, SamplingParams
from afdserve.errors import UserInputError
from afdserve.model.byte_tokenizer import VOCAB_SIZE
from afdserve.model.tokenizer import NoTokenizer
from tests.hf_dirs import TOKENIZER_FILES, copy_model, edit_json, padded_vocab_model

transformers = pytest.importorskip("transformers")

ONE = dict(mode="aggregated", attention_workers=1, microbatches=1)
AFD = dict(mode="afd", attention_workers=2, microbatches=2)
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _hf_greedy(model_dir, prompt: list[int], new_tokens: int, eos_from_dir: bool) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if not eos_from_dir:
        model.generation_config.eos_token_id = None
    with torch.no_grad():
        out = model.eval().generate(
            torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False, pad_token_id=0
        )
    return out[0, len(prompt) :].tolist()


def test_padded_vocab_ids_give_empty_text_not_a_lost_generation(tmp_path):
    d = padded_vocab_model(tmp_path / "padded")
    with LLM(str(d), **AFD) as llm:
        assert llm.tokenizer.vocab_size == VOCAB_SIZE < llm.engine.vocab_size
        outs = llm.generate([[5, 6, 7], "Hi there"], dataclasses.replace(GREEDY, logprobs=1))
    for o in outs:
        assert len(o.token_ids) == 6 and all(t >= VOCAB_SIZE for t in o.token_ids), o.token_ids
        assert o.text == "" and o.finish_reason == "length" and len(o.logprobs) == 6
    assert outs[0].token_ids == _hf_greedy(d, [5, 6, 7], 6, eos_from_dir=False)


def test_config_without_architectures_generates_as_hf(tiny_model_dir, tmp_path):
    src = tiny_model_dir("llama")
    d = copy_model(src, tmp_path / "no-arch")
    edit_json(d / "config.json", lambda c: c.pop("architectures"))
    assert transformers.AutoConfig.from_pretrained(d).architectures is None
    prompt = [5, 6, 7, 8]
    with LLM(str(d), **ONE) as llm:
        assert llm.model_config.architecture == "LlamaForCausalLM"
        got = llm.generate([prompt], GREEDY)[0].token_ids
    with LLM(str(src), **ONE) as llm:
        assert llm.generate([prompt], GREEDY)[0].token_ids == got
    assert got == _hf_greedy(d, prompt, 6, eos_from_dir=False)


def test_token_id_prompts_without_a_tokenizer(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen3-moe")
    d = copy_model(src, tmp_path / "no-tokenizer", drop=TOKENIZER_FILES)
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    with LLM(str(src), **AFD) as llm:
        want = llm.generate(prompts, GREEDY)
    assert all(o.text for o in want)
    with LLM(str(d), **AFD) as llm:
        assert isinstance(llm.tokenizer, NoTokenizer)
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == [o.token_ids for o in want]
        assert [o.text for o in outs] == ["", ""]
        with pytest.raises(UserInputError, match="a text prompt .*needs a tokenizer.* no tokeniz"):
            llm.generate([[1, 2], "hello"], GREEDY)
        with pytest.raises(UserInputError, match="stop strings .*needs a tokenizer"):
            llm.generate([[1, 2]], dataclasses.replace(GREEDY, stop=("x",)))
        assert not llm.engine.has_unfinished()  # nothing half-admitted
        assert llm.generate(prompts[:1], GREEDY)[0].token_ids == want[0].token_ids
    with LLM(str(src), skip_tokenizer_init=True, **ONE) as llm:
        outs = llm.generate(prompts, GREEDY)
        assert [o.token_ids for o in outs] == [o.token_ids for o in want]
        assert [o.text for o in outs] == ["", ""]
        with pytest.raises(UserInputError, match="skip_tokenizer_init is set"):
            llm.generate("hello", GREEDY)


def test_generation_config_eos_ids_stop_as_in_hf(tiny_model_dir, tmp_path):
    src = tiny_model_dir("qwen2")
    prompt = [5, 6, 7, 8]
    with LLM(str(src), **ONE) as llm:
        free = llm.generate([prompt], dataclasses.replace(GREEDY, max_tokens=12))[0].token_ids
    # an eos that this model emits (its config.json ones are special tokens it never emits)
    k = next(i for i in range(2, len(free)) if free[i] not in free[:i])
    d = copy_model(src, tmp_path / "gen-eos")
    edit_json(d / "generation_config.json", lambda g: g.update(eos_token_id=[free[k], 3]))
    params = SamplingParams(temperature=0, max_tokens=12)
    with LLM(str(d), **ONE) as llm:
        assert llm.model_config.eos_token_ids == (free[k], 3)
        out = llm.generate([prompt], params)[0]
        ignoring = llm.generate([prompt], dataclasses.replace(params, ignore_eos=True))[0]
    assert out.token_ids == free[: k + 1] and out.finish_reason == "stop"
    assert ignoring.token_ids == free and ignoring.finish_reason == "length"
    assert _hf_greedy(d, prompt, 12, eos_from_dir=True) == free[: k + 1]


def test_generation_config_sampling_defaults_when_no_params_are_given(tiny_model_dir, tmp_path):
    d = copy_model(tiny_model_dir("qwen2"), tmp_path / "gen-defaults")
    edit_json(d / "generation_config.json", lambda g: g.update(top_k=1, max_new_tokens=5))
    prompt = [5, 6, 7]
    with LLM(str(d), **ONE) as llm:
        assert llm.get_default_sampling_params() == SamplingParams(top_k=1, max_tokens=5)
        by_default = llm.generate([prompt])[0]  # temperature 1, top_k 1: the greedy tokens
        greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=5))[0]
        given = llm.generate([prompt], SamplingParams(max_tokens=3, seed=1))[0]
    assert by_default.token_ids == greedy.token_ids and len(greedy.token_ids) == 5
    assert len(given.token_ids) == 3  # params given are used as they are, as in vLLM
