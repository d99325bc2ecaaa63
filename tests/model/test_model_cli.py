"""`afdserve make-model` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from afdserve.cli import main
from afdserve.model.config import ModelConfig


def test_make_model_by_alias_and_class_name(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "make-model",
                "--arch",
                "qwen3-moe",
                "--preset",
                "tiny",
                "--seed",
                "1",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert "wrote Qwen3MoeForCausalLM" in capsys.readouterr().out
    assert (
        main(
            [
                "make-model",
                "--arch",
                "MixtralForCausalLM",
                "--out",
                str(tmp_path / "b"),
                "--dtype",
                "bfloat16",
                "--shards",
                "2",
            ]
        )
        == 0
    )
    config = ModelConfig.from_dir(tmp_path / "b")
    assert config.architecture == "MixtralForCausalLM" and config.dtype == "bfloat16"
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ):
        assert (tmp_path / "a" / name).is_file()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--arch", "gpt2"], "unknown architecture 'gpt2'"),
        (["--arch", "llama", "--shards", "0"], "shards must be a positive integer"),
    ],
)
def test_bad_input_is_one_line_exit_2(
    args: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["make-model", *args, "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_existing_output_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "x").write_text("x")
    assert main(["make-model", "--arch", "llama", "--out", str(tmp_path / "m")]) == 2
    assert "not an empty directory" in capsys.readouterr().err


def test_bad_choice_is_argparse_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["make-model", "--arch", "llama", "--preset", "huge", "--out", str(tmp_path)])
    assert exc.value.code == 2
