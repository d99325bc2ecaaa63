"""HF model directories as they come, read as transformers reads them (it is the oracle where it
can be): the chat template in chat_template.jinja, a config.json without `architectures`,
generation_config.json's eos ids and sampling defaults, ids past the tokenizer's vocabulary, and
a directory without tokenizer files. End to end through LLM and the server: the tests of the same
name in tests/afd/test_llm_hf_dirs.py and tests/server/test_hf_dirs_server.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afdserve.errors import ModelLoadError, UserInputError
from afdserve.model.byte_tokenizer import CHATML_TEMPLATE, VOCAB_SIZE, write_tokenizer_files
from afdserve.model.config import MODEL_TYPES, ModelConfig
from afdserve.model.make_model import preset_config
from afdserve.model.tokenizer import IncrementalDetokenizer, NoTokenizer, Tokenizer, load_tokenizer
from tests.hf_dirs import JINJA_TEMPLATE, TOKENIZER_FILES, edit_json

transformers = pytest.importorskip("transformers")

MESSAGES = [
    {"role": "system", "content": "Be terse, «please» 🌤"},
    {"role": "user", "content": "Why is the sky blue?"},
    {"role": "assistant", "content": "Rayleigh."},
    {"role": "user", "content": "And at night?"},
]


@pytest.fixture
def tok_dir(tmp_path: Path) -> Path:
    write_tokenizer_files(tmp_path, model_max_length=2048)
    return tmp_path


def _hf_chat(path: Path, add_generation_prompt: bool) -> str:
    hf = transformers.AutoTokenizer.from_pretrained(path)
    return hf.apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt
    )


# ---- chat_template.jinja ---------------------------------------------------------------------


def test_chat_template_jinja_renders_as_hf(tok_dir: Path) -> None:
    edit_json(tok_dir / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    (tok_dir / "chat_template.jinja").write_text(JINJA_TEMPLATE)
    tok = Tokenizer(tok_dir)
    assert tok.chat_template == JINJA_TEMPLATE
    assert tok.chat_template_source == "chat_template.jinja"
    for gen in (True, False):
        ours = tok.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        assert ours == _hf_chat(tok_dir, gen)
    assert ours.startswith('SYSTEM "Be terse, «please» 🌤"\n[1] user: Why')  # tojson, unescaped


def test_chat_template_jinja_wins_over_tokenizer_config_as_in_hf(tok_dir: Path) -> None:
    (tok_dir / "chat_template.jinja").write_text(JINJA_TEMPLATE)  # tokenizer_config has ChatML
    tok = Tokenizer(tok_dir)
    assert tok.chat_template == JINJA_TEMPLATE
    assert tok.apply_chat_template(MESSAGES) == _hf_chat(tok_dir, True)


def test_directory_saved_by_transformers_keeps_its_template(tok_dir: Path, tmp_path: Path) -> None:
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    hf.chat_template = JINJA_TEMPLATE
    out = tmp_path / "saved"
    hf.save_pretrained(out)
    tok = Tokenizer(out)
    assert tok.chat_template == JINJA_TEMPLATE  # wherever this transformers saved it
    if not json.loads((out / "tokenizer_config.json").read_text()).get("chat_template"):
        assert tok.chat_template_source == "chat_template.jinja"  # transformers 5 does so
    assert tok.apply_chat_template(MESSAGES) == _hf_chat(out, True)


def test_chat_template_json_is_the_last_file_looked_at(tok_dir: Path) -> None:
    """transformers reads chat_template.json (legacy) only for processors; for a tokenizer-only
    directory afdserve takes it rather than fall back to ChatML, after the other two places."""
    edit_json(tok_dir / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    (tok_dir / "chat_template.json").write_text(json.dumps({"chat_template": JINJA_TEMPLATE}))
    tok = Tokenizer(tok_dir)
    assert tok.chat_template == JINJA_TEMPLATE and tok.chat_template_source == "chat_template.json"
    edit_json(tok_dir / "tokenizer_config.json", lambda c: c.update(chat_template=CHATML_TEMPLATE))
    assert Tokenizer(tok_dir).chat_template == CHATML_TEMPLATE  # tokenizer_config comes first


# ---- model_type fallback ---------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "mixtral", "qwen3-moe"])
def test_config_without_architectures_uses_model_type_as_hf(arch: str) -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    d = preset_config(arch, "tiny", VOCAB_SIZE)
    del d["architectures"]
    cfg = ModelConfig.from_hf_dict(d)
    assert cfg.architecture == MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[d["model_type"]]
    assert cfg == ModelConfig.from_hf_dict(preset_config(arch, "tiny", VOCAB_SIZE))


def test_model_types_agree_with_hf() -> None:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert {t: MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[t] for t in MODEL_TYPES} == dict(MODEL_TYPES)


@pytest.mark.parametrize(
    "fields,match",
    [
        ({"model_type": "gpt2"}, r"no 'architectures' entry and its model_type 'gpt2'"),
        ({}, r"no 'architectures' entry and no 'model_type' either"),
        ({"architectures": [], "model_type": "bert"}, r"model_type 'bert'"),
        ({"architectures": ["GPT2LMHeadModel"], "model_type": "llama"}, "unsupported architec"),
    ],
)
def test_unidentified_architecture_is_a_clear_error(fields, match) -> None:
    d = preset_config("llama", "tiny", VOCAB_SIZE)
    del d["architectures"], d["model_type"]
    with pytest.raises(UserInputError, match=match) as info:
        ModelConfig.from_hf_dict({**d, **fields})
    if "architectures" not in fields or not fields["architectures"]:
        assert "llama, qwen2, qwen3, mixtral, qwen3_moe" in str(info.value)


# ---- generation_config.json ------------------------------------------------------------------


def _config_dir(tmp_path: Path, config_eos, generation: dict | None) -> Path:
    d = preset_config("qwen3", "tiny", VOCAB_SIZE)
    d.update(eos_token_id=config_eos, bos_token_id=VOCAB_SIZE - 3)
    (tmp_path / "config.json").write_text(json.dumps(d))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def _hf_eos(path: Path) -> tuple[int, ...]:
    try:
        gen = transformers.GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: HF derives it from config.json
        gen = transformers.GenerationConfig.from_model_config(
            transformers.AutoConfig.from_pretrained(path)
        )
    eos = gen.eos_token_id
    return () if eos is None else tuple(eos if isinstance(eos, list) else [eos])


@pytest.mark.parametrize(
    "config_eos,generation,want",
    [
        (10, {"eos_token_id": [20, 21]}, (20, 21)),  # generation_config wins, a list
        ([10, 11], {"eos_token_id": 20}, (20,)),  # an int
        (10, None, (10,)),  # no generation_config.json: config.json's
        (10, {"bos_token_id": 1}, (10,)),  # one without eos: config.json's
    ],
)
def test_eos_ids_come_from_generation_config_as_in_hf(tmp_path, config_eos, generation, want):
    path = _config_dir(tmp_path, config_eos, generation)
    assert ModelConfig.from_dir(path).eos_token_ids == want
    if generation is None or "eos_token_id" in generation:
        assert _hf_eos(path) == want


def test_sampling_defaults_from_generation_config(tmp_path: Path) -> None:
    gen = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 7, "do_sample": True}
    gen |= {"repetition_penalty": 1.05}  # not an afdserve sampling parameter: not taken
    cfg = ModelConfig.from_dir(_config_dir(tmp_path, 10, gen))
    assert cfg.sampling_defaults == {
        "temperature": 0.6,
        "top_p": 0.95,
        "top_k": 20,
        "max_new_tokens": 7,
    }
    assert ModelConfig.from_dir(_config_dir(tmp_path, 10, {})).sampling_defaults == {}


@pytest.mark.parametrize(
    "gen,match",
    [
        ({"top_p": 0.0}, r"generation_config.json: top_p must be in"),
        ({"temperature": "hot"}, r"generation_config.json: temperature must be a number"),
        ({"eos_token_id": "</s>"}, r"generation_config.json: eos_token_id must be a token id"),
    ],
)
def test_bad_generation_config_fails_the_load(tmp_path, gen, match) -> None:
    with pytest.raises(ModelLoadError, match=match):
        ModelConfig.from_dir(_config_dir(tmp_path, 10, gen))
    (tmp_path / "generation_config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)


# ---- ids past the tokenizer's vocabulary -----------------------------------------------------


def test_ids_past_the_tokenizer_decode_to_nothing_as_hf(tok_dir: Path) -> None:
    tok = Tokenizer(tok_dir)
    hf = transformers.AutoTokenizer.from_pretrained(tok_dir)
    pad = [VOCAB_SIZE, VOCAB_SIZE + 15, 151_935]
    ids = [72, pad[0], 105, pad[1], 33, pad[2]]
    assert tok.decode(ids) == hf.decode(ids) == "Hi!"
    assert tok.decode(pad) == hf.decode(pad) == ""
    assert tok.token_bytes(VOCAB_SIZE) == b""
    for skip in (False, True):
        detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
        assert "".join([detok.push(i) for i in ids] + [detok.flush()]) == "Hi!"
        detok._utf8 = None  # the generic (non byte-level) path too
        assert "".join(detok.push(i) for i in ids) + detok.flush() == "Hi!"
    with pytest.raises(UserInputError, match="non-negative"):
        tok.decode([1, -1])
    with pytest.raises(UserInputError, match="must be integers"):
        tok.decode([1, "2"])  # type: ignore[list-item]


# ---- no tokenizer ----------------------------------------------------------------------------


def test_directory_without_tokenizer_files_gets_a_no_tokenizer(tok_dir: Path, caplog) -> None:
    for name in TOKENIZER_FILES:
        (tok_dir / name).unlink()
    with caplog.at_level("WARNING", logger="afdserve.tokenizer"):
        tok = load_tokenizer(tok_dir, model_vocab_size=400)
    assert "serving token-id prompts only" in caplog.text
    assert isinstance(tok, NoTokenizer) and not tok.available
    assert tok.vocab_size == 400 and tok.eos_token_id is None
    assert tok.decode([1, 2, 399]) == "" and tok.token_bytes(5) is None
    detok = IncrementalDetokenizer(tok)
    assert detok.push(65) == "" and detok.flush() == ""
    with pytest.raises(UserInputError, match="a text prompt .* needs a tokenizer, and .* has no"):
        tok.encode("hello")
    with pytest.raises(UserInputError, match="chat .* needs a tokenizer"):
        tok.apply_chat_template(MESSAGES)


def test_skip_tokenizer_init_ignores_the_tokenizer(tok_dir: Path) -> None:
    assert isinstance(load_tokenizer(tok_dir, 400), Tokenizer)
    tok = load_tokenizer(tok_dir, 400, skip_tokenizer_init=True)
    assert isinstance(tok, NoTokenizer)
    with pytest.raises(UserInputError, match="skip_tokenizer_init is set"):
        tok.encode("hello")


def test_tokenizer_afdserve_cannot_read_is_refused_not_dropped(tok_dir: Path) -> None:
    (tok_dir / "tokenizer.json").unlink()
    (tok_dir / "vocab.json").write_text("{}")
    (tok_dir / "merges.txt").write_text("")
    with pytest.raises(ModelLoadError, match=r"vocab.json, merges.txt\) and no tokenizer.json"):
        load_tokenizer(tok_dir, 400)
    assert isinstance(load_tokenizer(tok_dir, 400, skip_tokenizer_init=True), NoTokenizer)
