"""Model directories as they come from HF, built from make-model output for the tests of
tests/model/test_hf_dirs.py, tests/afd/test_llm_hf_dirs.py and tests/server/test_hf_dirs_server.py:
a copy with files removed or edited, and a model whose vocabulary is padded past its tokenizer's
(as Qwen2's 151936 embedding rows for 151665 tokens) with a head that prefers the padding."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
PAD = 16
"""Padding rows past the tokenizer's VOCAB_SIZE ids in `padded_vocab_model`."""

# not ChatML, and using what published templates use: namespace, {% continue %} (loopcontrols),
# tojson (unicode unescaped), eos_token
JINJA_TEMPLATE = (
    "{%- set ns = namespace(turn=0) %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'system' %}{{- 'SYSTEM ' + m['content'] | tojson + '\\n' }}{%- continue %}"
    "{%- endif %}"
    "{%- set ns.turn = ns.turn + 1 %}"
    "{{- '[' ~ ns.turn ~ '] ' + m['role'] + ': ' + m['content'] + eos_token + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '[' ~ (ns.turn + 1) ~ '] assistant:' }}{%- endif %}"
)


def copy_model(src: Path, dst: Path, drop: Iterable[str] = ()) -> Path:
    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    return dst


def edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    edit(data)
    path.write_text(json.dumps(data, indent=2) + "\n")


def with_jinja_template(src: Path, dst: Path, template: str = JINJA_TEMPLATE) -> Path:
    """A copy of `src` laid out as transformers >= 4.43 saves it: the chat template in
    chat_template.jinja, none in tokenizer_config.json."""
    copy_model(src, dst)
    edit_json(dst / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    (dst / "chat_template.jinja").write_text(template)
    return dst


def padded_vocab_model(out: Path) -> Path:
    """A tiny Qwen2 with PAD embedding rows past the tokenizer's ids, whose LM head makes every
    greedy token a padding id: all rows zero but VOCAB_SIZE (v) and the last (-v), so one of the
    two scores |h.v| > 0 and the rest 0."""
    import torch
    from safetensors.torch import load_file, save_file

    from afdserve.model.byte_tokenizer import VOCAB_SIZE
    from afdserve.model.make_model import make_model

    make_model("qwen2", "tiny", 0, out, config_overrides={"vocab_size": VOCAB_SIZE + PAD})
    tensors = load_file(out / "model.safetensors")
    head = tensors["lm_head.weight"]  # [V, D]
    v = torch.randn(head.shape[1], generator=torch.Generator().manual_seed(0))
    head.zero_()
    head[VOCAB_SIZE] = v
    head[-1] = -v
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
