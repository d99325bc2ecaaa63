"""The tokenizer routes, in vLLM's shapes: POST /tokenize, POST /detokenize, GET /tokenizer_info.

lm-eval's `local-completions` with `tokenizer_backend="remote"` uses exactly these: it reads
/tokenizer_info (it needs `eos_token`, and `chat_template` to render chats itself), encodes
with `{"prompt": text, "add_special_tokens": false}` and decodes with `{"tokens": [...]}`.
/tokenize takes a prompt or chat messages (rendered as chat completions would render them)
and answers the ids, their count and the context length; it has no length limit of its own
(a harness tokenises whole documents to cut them into windows), only the request body's.
/tokenizer_info is the model's tokenizer_config.json as HF loads it, with the chat template
the server renders with; vLLM serves it only when asked (--enable-tokenizer-info-endpoint).
"""

from __future__ import annotations

import json
from typing import Any

from afdserve.errors import UserInputError
from afdserve.server.admission import chat_prompt
from afdserve.server.errors import BadRequest
from afdserve.server.protocol import (
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
)
from afdserve.server.responses import DetokenizeResponse, TokenizeResponse
from afdserve.server.state import ServingState


def tokenize(
    st: ServingState, body: TokenizeCompletionRequest | TokenizeChatRequest
) -> TokenizeResponse:
    """Blocking (encodes, maybe renders a template): run it off the loop."""
    if isinstance(body, TokenizeChatRequest):
        ids = chat_prompt(st, body, limit_length=False).token_ids
    else:
        ids = st.tokenizer.encode(body.prompt, body.add_special_tokens)
    return TokenizeResponse(
        count=len(ids),
        max_model_len=st.max_model_len,
        tokens=ids,
        token_strs=st.tokenizer.token_strs(ids) if body.return_token_strs else None,
    )


def detokenize(st: ServingState, body: DetokenizeRequest) -> DetokenizeResponse:
    """Blocking: run it off the loop. Special tokens are kept, as vLLM's /detokenize keeps them."""
    bad = [t for t in body.tokens if t >= st.tokenizer.vocab_size]
    if bad:
        raise BadRequest(
            f"token id {bad[0]} is outside the vocabulary [0, {st.tokenizer.vocab_size})",
            param="tokens",
        )
    return DetokenizeResponse(prompt=st.tokenizer.decode(body.tokens))


def tokenizer_info(st: ServingState) -> dict[str, Any]:
    """tokenizer_config.json as HF's `init_kwargs` hold it: file paths dropped, token objects
    as their text, plus `tokenizer_class` and the chat template this server renders with."""
    path = st.tokenizer.model_dir / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if path.is_file():
        try:
            loaded = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(loaded, dict):
            config = loaded
    for key in ("vocab_file", "merges_file", "tokenizer_file"):
        config.pop(key, None)
    config = _plain(config)
    tok = st.tokenizer
    for key, value in (("eos_token", tok.eos_token), ("bos_token", tok.bos_token)):
        config.setdefault(key, value)  # present even when None: lm-eval checks for eos_token
    config.setdefault("model_max_length", st.max_model_len)
    config["tokenizer_class"] = config.get("tokenizer_class") or "PreTrainedTokenizerFast"
    config["chat_template"] = st.chat_template
    return config


def _plain(value: Any) -> Any:
    """Token entries ({"content": "<|im_end|>", ...}) become their text, as vLLM shows them."""
    if isinstance(value, dict):
        token = "special" in value or value.get("__type") == "AddedToken"
        if token and isinstance(value.get("content"), str):
            return value["content"]
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
