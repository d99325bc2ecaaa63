"""`LLM.generate` honours stop strings as vLLM's offline engine does: the text ends just before
the earliest stop string, the request stops there (finish reason "stop"), and its token ids
are those generated up to the token that completed the string."""

from __future__ import annotations

from afdserve import LLM, SamplingParams


def test_offline_stop_strings_cut_the_text_and_stop_the_request(tiny_model_dirs):
    with LLM(str(tiny_model_dirs["llama"]), mode="afd", attention_workers=2) as llm:
        free = llm.generate(["The quick brown fox"], SamplingParams(temperature=0, max_tokens=24))
        text = free[0].text
        stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if text[i : i + 2].strip())
        cut = text.index(stop)
        params = SamplingParams(temperature=0, max_tokens=24, stop=(stop, "\x00never"))
        got = llm.generate(["The quick brown fox"], params)[0]
    assert got.text == text[:cut] and got.finish_reason == "stop"
    n = len(got.token_ids)
    assert 0 < n < len(free[0].token_ids) and got.token_ids == free[0].token_ids[:n]
    assert stop in llm_text(llm_tokens=got.token_ids, tokenizer_dir=tiny_model_dirs["llama"])


def llm_text(llm_tokens, tokenizer_dir) -> str:
    """The decoded text of the generated ids: it holds the stop string (the last token
    completed it), which the returned text leaves out."""
    from afdserve.model.tokenizer import Tokenizer

    return Tokenizer(tokenizer_dir).decode(llm_tokens, skip_special_tokens=True)
