"""Byte-level BPE tokenizer: built for generated models, loaded from any HF-format model dir.

Two parts (the tokenizer generated models ship is built in model/byte_tokenizer.py):

- `Tokenizer` is the thin runtime wrapper the engine and server use: encode, decode, eos, chat
  template. `IncrementalDetokenizer` turns a stream of token ids into a stream of text deltas
  that never splits a UTF-8 character, for streaming responses.
- `load_tokenizer()` is how front ends get one: a `Tokenizer`, or, for a directory without
  tokenizer files or with `skip_tokenizer_init` (vLLM's option), a `NoTokenizer` that serves
  token ids only: text prompts, chat and stop strings are a clear UserInputError, output text is
  "" (as vLLM's with skip_tokenizer_init).

Model directories are read as HF transformers reads them: the chat template comes from
chat_template.jinja (where transformers >= 4.43 saves it), else tokenizer_config.json, else the
legacy processor file chat_template.json; ids the tokenizer does not know (a model vocabulary
padded past the tokenizer's, as Qwen2's 151936 rows for 151665 tokens) decode to "", as HF's
`tokenizers` decodes them, so a sampled padding id never loses a generation.
"""

from __future__ import annotations

import codecs
import dataclasses
import functools
import json
import logging
import operator
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from afdserve.errors import ModelLoadError, UserInputError
from afdserve.model.byte_tokenizer import CHATML_TEMPLATE, bytes_to_unicode
from afdserve.types import SamplingParams

TOKENIZER_FILE = "tokenizer.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
"""Where transformers >= 4.43 saves a tokenizer's chat template (and 5 always)."""
CHAT_TEMPLATE_DIR = "additional_chat_templates"
"""transformers' named templates, NAME.jinja; `default.jinja` there counts as the template."""
LEGACY_CHAT_TEMPLATE_FILE = "chat_template.json"
"""transformers' older processor file, {"chat_template": "..."}."""
OTHER_TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "tokenizer.tiktoken",
    "tekken.json",
)
"""Tokenizer formats afdserve does not read: a directory with one of these but no
tokenizer.json is refused (its tokenizer would be silently lost), not served token-ids-only."""

log = logging.getLogger("afdserve.tokenizer")


class Tokenizer:
    """Runtime tokenizer of one model directory (tokenizer.json + tokenizer_config.json).

    `encode` adds no special tokens (chat formatting is the template's job); `decode` keeps
    special tokens unless asked to skip them, as HF does, and drops ids the tokenizer does not
    know (padding ids of a larger model vocabulary), as HF's `tokenizers` does. The chat
    template comes from chat_template.jinja, tokenizer_config.json or chat_template.json, in
    transformers' order, or is ChatML (`CHATML_TEMPLATE`) when the model ships none.
    """

    available = True
    """A real tokenizer (False for `NoTokenizer`)."""

    def __init__(self, model_dir: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.model_dir = Path(model_dir)
        path = self.model_dir / TOKENIZER_FILE
        if not path.is_file():
            raise ModelLoadError(f"{str(self.model_dir)!r} has no tokenizer.json")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust library raises plain Exception on bad files
            raise ModelLoadError(f"{path}: not a valid tokenizer.json ({exc})") from None
        cfg = _read_json(self.model_dir / "tokenizer_config.json")
        template, source = _find_chat_template(self.model_dir, cfg)
        self.chat_template: str = template or CHATML_TEMPLATE
        """The template `apply_chat_template` renders."""
        self.chat_template_source: str = source if template else "ChatML (the model has none)"
        """Where `chat_template` came from: a file of the directory, or ChatML."""
        self.eos_token: str | None = _token_content(cfg.get("eos_token"))
        self.bos_token: str | None = _token_content(cfg.get("bos_token"))
        self.eos_token_id: int | None = self._id_of(self.eos_token)
        self.bos_token_id: int | None = self._id_of(self.bos_token)
        added = self._tok.get_added_tokens_decoder()
        self.special_token_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._inverse_alphabet: dict[str, int] | None = (
            {c: b for b, c in bytes_to_unicode().items()} if _has_byte_level_decoder(path) else None
        )
        self._bytes_cache: dict[int, bytes] = {}
        self._max_token_chars: int | None = None

    @property
    def is_byte_level(self) -> bool:
        return self._inverse_alphabet is not None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; `add_special_tokens` runs the tokenizer's post-processor (a BOS,
        say), as HF's does; off by default: chat templates write their own special tokens."""
        if not isinstance(text, str):
            raise UserInputError(f"text to encode must be a str, got {type(text).__name__}")
        try:
            return self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:  # lone surrogates (e.g. "\ud800" from JSON) are not encodable text
            raise UserInputError("text is not valid unicode (it has lone surrogates)") from None

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of `ids`; ids at or past `vocab_size` (a padded model vocabulary) add none."""
        ids = _check_ids(ids)
        n = self.vocab_size
        return self._tok.decode([i for i in ids if i < n], skip_special_tokens=skip_special_tokens)

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        """The vocabulary's own string of each id (HF's `convert_ids_to_tokens`: "Ġthe", not
        " the")."""
        out = []
        for i in ids:
            piece = self._tok.id_to_token(i)
            if piece is None:
                raise UserInputError(f"token id {i} out of range [0, {self.vocab_size})")
            out.append(piece)
        return out

    @property
    def max_token_chars(self) -> int:
        """An upper bound on the characters one token stands for: a text longer than
        `n * max_token_chars` characters has more than `n` tokens, known without encoding it."""
        if self._max_token_chars is None:
            n = 1
            for i in range(self.vocab_size):
                raw = self.token_bytes(i)  # a character is at least one byte
                n = max(n, len(raw) if raw is not None else len(self._tok.decode([i], False)))
            self._max_token_chars = n
        return self._max_token_chars

    def token_bytes(self, token_id: int) -> bytes | None:
        """The exact bytes one token stands for, or None if the tokenizer is not byte-level."""
        if self._inverse_alphabet is None:
            return None
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        _check_ids([token_id])
        piece = self._tok.id_to_token(token_id)
        if piece is None:  # an id the tokenizer does not know (padded vocabulary): no text
            return b""
        if token_id in self.special_token_ids or any(
            c not in self._inverse_alphabet for c in piece
        ):
            data = piece.encode()  # special or plain-text added token: its text as is
        else:
            data = bytes(self._inverse_alphabet[c] for c in piece)
        self._bytes_cache[token_id] = data
        return data

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **template_kwargs: Any,
    ) -> str:
        """Render chat messages ([{"role": ..., "content": ...}], plus any other fields such as
        an assistant's `tool_calls` or a tool's `tool_call_id`) to the prompt text.

        `tools` (OpenAI's [{"type": "function", "function": {...}}]) is passed to the template
        as transformers passes it; a message's content None (an assistant's tool calls) is "".
        `chat_template` overrides the model's; `template_kwargs` are more variables for the
        template (`enable_thinking`, `documents`, ...), as HF's `apply_chat_template` passes
        them. `continue_final_message` leaves the last message open (no end-of-turn after it),
        so that the model continues it: the text is cut right after that message's content.
        """
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            raise UserInputError("messages must be a non-empty list of {role, content} objects")
        rendered = []
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise UserInputError(f"messages[{i}] must be an object with a string 'role'")
            content = m.get("content")
            if content is None and m.get("tool_calls"):
                content = ""
            if not isinstance(content, str):
                raise UserInputError(f"messages[{i}].content must be a string")
            rendered.append({**m, "content": content})
        if continue_final_message and add_generation_prompt:
            raise UserInputError(
                "continue_final_message and add_generation_prompt cannot both be true"
            )
        from jinja2 import TemplateError

        if continue_final_message:  # mark where the final message's content ends
            rendered[-1]["content"] = rendered[-1]["content"] + _FINAL_MARK
        variables = {
            "bos_token": self.bos_token or "",
            "eos_token": self.eos_token or "",
            **template_kwargs,
            "messages": rendered,
            "tools": list(tools) if tools else None,
            "add_generation_prompt": add_generation_prompt,
        }
        try:
            text = _compile_template(chat_template or self.chat_template).render(**variables)
        except TemplateError as exc:
            raise UserInputError(f"chat template failed: {exc}") from None
        if continue_final_message:
            cut = text.rfind(_FINAL_MARK)
            if cut < 0:
                raise UserInputError(
                    "continue_final_message: the chat template does not show the final "
                    "message's content, so it cannot be continued"
                )
            text = text[:cut]
        return text


_FINAL_MARK = "\ue000afdserve-final-message-end\ue000"
"""Appended to the final message for `continue_final_message` (private-use characters)."""


@functools.lru_cache(maxsize=16)
def _compile_template(source: str) -> Any:
    """A chat template compiled once, in a sandbox, with the helpers HF's renderer gives
    templates (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII, and
    `{% break %}`/`{% continue %}`)."""
    from jinja2 import TemplateError
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise UserInputError(f"chat template: {message}")

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(x: Any, ensure_ascii: bool = False, **kw: Any) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, **kw)  # indent, separators, sort_keys

    # the environment transformers renders templates in: published templates use {% break %},
    # tojson without HTML escaping and strftime_now (Llama 3.x's date line)
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.filters["tojson"] = tojson
    try:
        return env.from_string(source)
    except TemplateError as exc:
        raise UserInputError(f"chat template failed: {exc}") from None


def check_chat_template(source: str) -> None:
    """Raise UserInputError unless `source` compiles as a chat template."""
    _compile_template(source)


class NoTokenizer(Tokenizer):
    """Stands in for the tokenizer of a model served by token ids only: a directory without
    tokenizer files, or `skip_tokenizer_init` (vLLM's option).

    Whatever needs text (encoding a prompt, a chat template, stop strings) raises a
    UserInputError that says why there is no tokenizer; decoding gives "" for every id, so
    outputs carry their token ids and empty text, as vLLM's do with skip_tokenizer_init.
    `vocab_size` is the model's: every id the model has is a valid (textless) token.
    """

    available = False

    def __init__(self, model_dir: str | Path, vocab_size: int, reason: str) -> None:
        self.model_dir = Path(model_dir)
        self.reason = reason
        """Why there is no tokenizer, for error messages."""
        self.chat_template = ""
        self.chat_template_source = "none"
        self.eos_token = self.bos_token = None
        self.eos_token_id = self.bos_token_id = None
        self.special_token_ids = frozenset()
        self._inverse_alphabet = None
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def unavailable(self, what: str) -> UserInputError:
        return UserInputError(f"{what} needs a tokenizer, and {self.reason}")

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise self.unavailable("a text prompt (give the prompt as token ids instead)")

    def token_strs(self, ids: Sequence[int]) -> list[str]:
        raise self.unavailable("token strings")

    @property
    def max_token_chars(self) -> int:
        raise self.unavailable("a text prompt (give the prompt as token ids instead)")

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        _check_ids(ids)
        return ""

    def token_bytes(self, token_id: int) -> bytes | None:
        return None

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **kwargs: Any,
    ) -> str:
        raise self.unavailable("chat (its template and the prompt's text)")


def load_tokenizer(
    model_dir: str | Path, model_vocab_size: int, skip_tokenizer_init: bool = False
) -> Tokenizer:
    """The tokenizer front ends use for `model_dir`: a `Tokenizer`, or a `NoTokenizer` when
    `skip_tokenizer_init` is set or the directory has no tokenizer files at all (then a warning
    is logged: the model serves token-id prompts only). A directory with tokenizer files in a
    format afdserve does not read (tokenizer.model, vocab.json, ...) but no tokenizer.json is a
    ModelLoadError rather than a silent loss of its tokenizer."""
    path = Path(model_dir)
    if skip_tokenizer_init:
        return NoTokenizer(path, model_vocab_size, "skip_tokenizer_init is set")
    if (path / TOKENIZER_FILE).is_file():
        return Tokenizer(path)
    others = [name for name in OTHER_TOKENIZER_FILES if (path / name).is_file()]
    if others:
        raise ModelLoadError(
            f"{str(path)!r} has a tokenizer in a format afdserve does not read ({', '.join(others)}) "
            "and no tokenizer.json; save it as tokenizer.json (transformers' fast tokenizer, "
            "tokenizer.save_pretrained), or serve token-id prompts only with skip_tokenizer_init "
            "(--skip-tokenizer-init)"
        )
    log.warning(
        "%s has no tokenizer files: serving token-id prompts only, outputs carry token ids and "
        "empty text (as with skip_tokenizer_init)",
        path,
    )
    return NoTokenizer(path, model_vocab_size, f"{str(path)!r} has no tokenizer.json")


def with_tokenizer_eos(params: SamplingParams, tokenizer: Tokenizer) -> SamplingParams:
    """`params` that also stop at the tokenizer's eos token (unless `ignore_eos`), as vLLM's
    front end adds it to the model's eos ids (generation_config.json / config.json, which the
    scheduler applies); a model whose tokenizer_config names an eos the generation config
    lacks then still stops there."""
    eos = tokenizer.eos_token_id
    if eos is None or params.ignore_eos or eos in params.stop_token_ids:
        return params
    return dataclasses.replace(params, stop_token_ids=(*params.stop_token_ids, eos))


class IncrementalDetokenizer:
    """Token ids in, text deltas out, never splitting a UTF-8 character across deltas.

    For byte-level tokenizers each token's bytes go through an incremental UTF-8 decoder, which
    holds back an incomplete trailing character until its last byte arrives (exact, O(1) per
    token). Other tokenizers fall back to re-decoding a short window of recent ids and emitting
    the new suffix once it no longer ends in U+FFFD (the approach of vLLM and TGI). Either way
    the concatenation of all `push` results and `flush()` equals `decode(all ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._textless = not tokenizer.available  # NoTokenizer: every delta is ""
        self._utf8 = (
            codecs.getincrementaldecoder("utf-8")(errors="replace")
            if tokenizer.is_byte_level
            else None
        )
        self._ids: list[int] = []
        self._prefix = 0  # window start: ids before it are fully emitted as text
        self._read = 0  # ids before it are emitted; [prefix, read) is context for the next decode

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (may be "")."""
        if self._textless:
            return ""
        if self._utf8 is not None:
            if self._skip and token_id in self._tok.special_token_ids:
                return ""
            data = self._tok.token_bytes(token_id)
            assert data is not None
            return self._utf8.decode(data)
        self._ids.append(token_id)
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        after = self._tok.decode(self._ids[self._prefix :], self._skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """At the end of the stream: whatever was held back (as U+FFFD if incomplete)."""
        if self._textless:
            return ""
        if self._utf8 is not None:
            return self._utf8.decode(b"", final=True)
        before = self._tok.decode(self._ids[self._prefix : self._read], self._skip)
        after = self._tok.decode(self._ids[self._prefix :], self._skip)
        self._prefix = self._read = len(self._ids)
        return after[len(before) :]


def _check_ids(ids: Sequence[int]) -> list[int]:
    """`ids` as a list of ints; a UserInputError for anything that is not a token id at all
    (negative, not an integer). Ids past the vocabulary are the caller's: they decode to nothing."""
    try:
        out = [operator.index(i) for i in ids]
    except TypeError:
        raise UserInputError(f"token ids must be integers, got {list(ids)[:5]}") from None
    bad = [i for i in out if i < 0]
    if bad:
        raise UserInputError(f"token ids must be non-negative, got {bad[:5]}")
    return out


def _find_chat_template(
    model_dir: Path, tokenizer_config: dict[str, Any]
) -> tuple[str | None, str]:
    """(template, the file it came from), in transformers' order: chat_template.jinja (and
    additional_chat_templates/default.jinja), which override tokenizer_config.json's
    `chat_template`; then chat_template.json, the processors' legacy file. (None, "none") when
    the directory has no template."""
    for path in (model_dir / CHAT_TEMPLATE_FILE, model_dir / CHAT_TEMPLATE_DIR / "default.jinja"):
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8"), str(path.relative_to(model_dir))
            except (OSError, UnicodeDecodeError) as exc:
                raise ModelLoadError(f"{path}: cannot read the chat template ({exc})") from None
    template = _template_from(tokenizer_config.get("chat_template"))
    if template is not None:
        return template, "tokenizer_config.json"
    legacy = _read_json(model_dir / LEGACY_CHAT_TEMPLATE_FILE)
    template = _template_from(legacy.get("chat_template"))
    if template is not None:
        return template, LEGACY_CHAT_TEMPLATE_FILE
    return None, "none"


def _has_byte_level_decoder(path: Path) -> bool:
    try:
        decoder = json.loads(path.read_text()).get("decoder") or {}
    except (OSError, ValueError):
        return False
    return decoder.get("type") == "ByteLevel"


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|im_end|>", ...} in older tokenizer configs
        value = value.get("content")
    return value if isinstance(value, str) else None


def _template_from(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # named templates: [{"name": "default", "template": "..."}]
        for entry in value:
            if isinstance(entry, dict) and entry.get("name") == "default":
                return entry.get("template")
    return None
