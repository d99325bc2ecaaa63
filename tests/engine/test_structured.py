"""Structured outputs (engine/structured.py): the grammar mask forces a tiny random model's
output into a regex, a JSON schema, a choice or a Lark grammar; the mask's row state lives per
sequence and survives preemption; bad specs and models without tokenizer.json are refused at
admission."""

from __future__ import annotations

import json
import re
import shutil

import jsonschema
import pytest
import torch

from afdserve import LLM
from afdserve.engine.sampler import sample
from afdserve.engine.structured import Grammars, check
from afdserve.errors import UserInputError
from afdserve.model.tokenizer import Tokenizer
from afdserve.types import SamplingParams, ScheduledChunk, StructuredOutput

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,5}-[0-9]{3}"
CHOICES = ["apple", "banana", "cherry pie"]
LARK = 'start: "(" num (" + " num)* ")"\nnum: /[0-9]{1,2}/'


def _chunk(seq_id: int, params: SamplingParams, output_index: int) -> ScheduledChunk:
    return ScheduledChunk(seq_id, (1,), 0, (1,), True, params, 7, output_index)


def _run(
    vocab_dir, spec: StructuredOutput, temperature: float, steps: int = 60, complete: bool = True
) -> list[int]:
    """Sample from random logits (seeded) under the grammar until it stops (or `steps` tokens
    when not `complete`); the tokens."""
    tok = Tokenizer(vocab_dir)
    grammars = Grammars(vocab_dir / "tokenizer.json", tok.vocab_size, [tok.eos_token_id])
    params = SamplingParams(max_tokens=steps, temperature=temperature, structured=spec)
    gen = torch.Generator().manual_seed(3)
    out: list[int] = []
    for i in range(steps):
        logits = torch.randn(2, tok.vocab_size, generator=gen) * 3  # row 1: unconstrained
        chunks = [_chunk(0, params, i), _chunk(1, SamplingParams(temperature=0), i)]
        raw = logits.clone()
        got = sample(logits, chunks, grammars=grammars)
        assert torch.equal(logits, raw)  # the raw logits are left alone
        assert got[1].token_id == int(raw[1].argmax()) and not got[1].stop
        out.append(got[0].token_id)
        if got[0].stop:
            return out
    if not complete:
        return out
    raise AssertionError(f"the grammar did not complete in {steps} tokens: {tok.decode(out)!r}")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampler_mask_forces_every_kind(tiny_model_dir, temperature):
    d = tiny_model_dir("llama")
    tok = Tokenizer(d)
    text = tok.decode(_run(d, StructuredOutput("regex", REGEX), temperature))
    assert re.fullmatch(REGEX, text), text
    text = tok.decode(_run(d, StructuredOutput("json_schema", SCHEMA), temperature, 120))
    jsonschema.validate(json.loads(text), SCHEMA)
    text = tok.decode(_run(d, StructuredOutput("choice", CHOICES), temperature))
    assert text in CHOICES
    text = tok.decode(_run(d, StructuredOutput("grammar", LARK), temperature))
    assert re.fullmatch(r"\([0-9]{1,2}( \+ [0-9]{1,2})*\)", text), text
    # any object: random logits wander in its free-form keys, so only its start is checked
    ids = _run(d, StructuredOutput("json_object"), temperature, 10, complete=False)
    assert tok.decode(ids)[0] == "{"


def test_grammar_state_is_per_sequence_and_dropped(tiny_model_dir):
    d = tiny_model_dir("llama")
    tok = Tokenizer(d)
    grammars = Grammars(d / "tokenizer.json", tok.vocab_size, [tok.eos_token_id])
    params = SamplingParams(temperature=0, structured=StructuredOutput("choice", ["ab", "cd"]))
    logits = torch.zeros(2, tok.vocab_size)
    logits[:, ord("c")] = 5.0  # both would pick "c"...
    logits[0, ord("a")] = 9.0  # ...but sequence 0 prefers "a"
    got = sample(logits, [_chunk(0, params, 0), _chunk(1, params, 0)], grammars=grammars)
    assert [t.token_id for t in got] == [ord("a"), ord("c")]
    assert len(grammars) == 2
    logits = torch.zeros(2, tok.vocab_size)
    logits[:, ord("d")] = 9.0  # "d" only fits sequence 1
    got = sample(logits, [_chunk(0, params, 1), _chunk(1, params, 1)], grammars=grammars)
    assert tok.decode([ord("a"), got[0].token_id]) == "ab" and got[0].stop
    assert got[1].token_id == ord("d") and got[1].stop
    grammars.retain({1})
    assert len(grammars) == 1
    with pytest.raises(RuntimeError, match="no grammar state"):
        sample(logits[:1], [_chunk(0, params, 2)], grammars=grammars)


def test_check_refuses_bad_specs():
    check(StructuredOutput("json_schema", SCHEMA))
    with pytest.raises(UserInputError, match="regex"):
        check(StructuredOutput("regex", "[a-z"))
    with pytest.raises(UserInputError, match="json_schema"):
        check(StructuredOutput("json_schema", '{"type": "nonsense"}'))
    with pytest.raises(UserInputError, match="not valid JSON"):
        check(StructuredOutput("json_schema", "{"))
    with pytest.raises(UserInputError):
        check(StructuredOutput("grammar", "start: undefined_rule"))
    with pytest.raises(UserInputError, match="choice"):
        StructuredOutput("choice", [])
    with pytest.raises(UserInputError, match="kind"):
        StructuredOutput("xml", "<a/>")


def test_llm_outputs_follow_the_grammar_and_end_with_stop(tiny_model_dir):
    with LLM(str(tiny_model_dir("qwen3")), seed=1) as llm:
        specs = [
            StructuredOutput("json_schema", SCHEMA),
            StructuredOutput("regex", REGEX),
            StructuredOutput("choice", CHOICES),
        ]
        params = [
            SamplingParams(max_tokens=80, temperature=t, seed=5, structured=s)
            for s in specs
            for t in (0.0, 0.9)
        ]
        outs = llm.generate(["Hello there"] * len(params), params)
        with pytest.raises(UserInputError, match="does not compile"):
            llm.generate("x", SamplingParams(structured=StructuredOutput("regex", "(")))
    for o, p in zip(outs, params, strict=True):
        assert o.finish_reason == "stop", o
        if p.structured.kind == "json_schema":
            jsonschema.validate(json.loads(o.text), SCHEMA)
        elif p.structured.kind == "regex":
            assert re.fullmatch(REGEX, o.text)
        else:
            assert o.text in CHOICES


def test_structured_requests_survive_preemption(tiny_model_dir):
    """Few KV blocks: the requests preempt one another and are recomputed; each still gets the
    tokens it gets alone (exact kernels), its grammar state untouched by the recompute."""
    spec = StructuredOutput("json_schema", SCHEMA)
    params = [
        SamplingParams(max_tokens=60, temperature=0.8, seed=s, structured=spec) for s in range(4)
    ]
    prompts = [[5 + s] * 20 for s in range(4)]
    cfg = dict(batch_invariant=True, block_size=16, seed=2)
    with LLM(str(tiny_model_dir("llama")), num_kv_blocks=6, **cfg) as llm:
        together = llm.generate(prompts, params)
        assert sum(w.counters["preemptions"] for w in llm.engine.state(afd=False).workers) > 0
    with LLM(str(tiny_model_dir("llama")), **cfg) as llm:
        alone = [llm.generate([p], [q])[0] for p, q in zip(prompts, params, strict=True)]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    for o in together:
        jsonschema.validate(json.loads(o.text), SCHEMA)


def test_a_model_without_tokenizer_json_refuses_structured_requests(tiny_model_dir, tmp_path):
    d = tmp_path / "no-tokenizer"
    shutil.copytree(tiny_model_dir("llama"), d)
    (d / "tokenizer.json").unlink()
    with LLM(str(d)) as llm:
        with pytest.raises(UserInputError, match="tokenizer.json"):
            llm.engine.add_request(
                "r", [1, 2], SamplingParams(structured=StructuredOutput("json_object"))
            )
        llm.engine.add_request("ok", [1, 2], SamplingParams(max_tokens=2))  # others still run
