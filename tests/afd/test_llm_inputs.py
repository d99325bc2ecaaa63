"""Bad input through the public entry points (LLM, `afdserve generate`) is one clear error, and
the engine keeps serving afterwards."""

from __future__ import annotations

import pytest

from afdserve import LLM, SamplingParams
from afdserve.cli import main
from afdserve.errors import ModelLoadError, UserInputError

OK = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_model_dirs):
    with LLM(
        str(tiny_model_dirs["qwen3-moe"]),
        mode="afd",
        attention_workers=2,
        microbatches=2,
        max_model_len=64,
    ) as engine:
        yield engine


def test_a_live_request_id_is_refused_at_admission(llm):
    llm.engine.add_request("dup", [1, 2, 3], OK)
    try:
        with pytest.raises(UserInputError, match="duplicate request id 'dup'"):
            llm.engine.add_request("dup", [4, 5], OK)
        assert llm.engine.owner("dup") is not None  # the first one still runs
    finally:
        llm.engine.abort("dup")
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    "prompts,match",
    [
        ([""], "prompt must not be empty"),
        ([], "prompts must be"),
        ([[3, 4], [1] * 65], "prompt has 65 tokens"),
        ([[10**6]], "outside the vocabulary"),
        ([[1, 2], "x", 3.5], "text or a list of token ids"),
    ],
)
def test_bad_prompts_are_clear_errors_and_the_engine_keeps_serving(llm, prompts, match):
    reference = llm.generate([[5, 6, 7]], OK)[0].token_ids
    with pytest.raises(UserInputError, match=match):
        llm.generate(prompts, OK)
    assert not llm.engine.has_unfinished()  # nothing half-admitted is left behind
    assert llm.generate([[5, 6, 7]], OK)[0].token_ids == reference


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer"),
    ],
)
def test_bad_sampling_params_are_clear_errors(kwargs, match):
    with pytest.raises(UserInputError, match=match):
        SamplingParams(**kwargs)


def test_bad_models_are_clear_errors(tmp_path, tiny_model_dirs):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLM(str(tmp_path / "missing"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ModelLoadError, match="supported: LlamaForCausalLM"):
        LLM(str(bad))
    with pytest.raises(UserInputError, match="unknown LLM option"):
        LLM(str(tiny_model_dirs["llama"]), attention_wrkers=2)


def test_bad_devices_are_clear_errors(tiny_model_dirs):
    import torch

    with pytest.raises(UserInputError, match="device must be cpu, cuda or cuda:N"):
        LLM(str(tiny_model_dirs["llama"]), device="gpu0")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last (cuda:0 on a CPU host)
    with pytest.raises(UserInputError, match="CUDA device"):
        LLM(str(tiny_model_dirs["llama"]), device=missing)


@pytest.mark.parametrize(
    "args,match",
    [
        (["--model", "/nonexistent/model", "--prompt", "hi"], "does not exist"),
        (["--prompt", "hi", "--device", "tpu"], "device must be cpu, cuda or cuda:N"),
        (["--prompt-token-ids", "1,x"], "comma-separated integers"),
        (["--prompt", "hi", "--max-tokens", "0"], "max_tokens must be at least 1"),
        (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
        ([], "give at least one of"),
    ],
)
def test_generate_cli_bad_input_is_one_line_and_exit_2(tiny_model_dirs, capsys, args, match):
    if "--model" not in args:
        args = ["--model", str(tiny_model_dirs["llama"]), *args]
    assert main(["generate", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("afdserve generate: error:"), err
    assert match in err[0] or __import__("re").search(match, err[0])


def test_generate_cli_json(tiny_model_dirs, capsys):
    import json

    assert (
        main(
            [
                "generate",
                "--model",
                str(tiny_model_dirs["llama"]),
                "--prompt-token-ids",
                "1,2,3",
                "--prompt",
                "hello",
                "--max-tokens",
                "5",
                "--ignore-eos",
                "--json",
                "--mode",
                "afd",
                "--attention-workers",
                "2",
                "--microbatches",
                "2",
            ]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["hello", None]
    assert rows[1]["prompt_token_ids"] == [1, 2, 3]
    assert all(len(r["token_ids"]) == 5 and r["finish_reason"] == "length" for r in rows)
