"""Request admission: from a validated body to engine requests, or a 400/404 before any.

The served model name is checked (404), completion prompts and logit_bias are checked against
the vocabulary, every prompt's length and max_tokens against the context (400), and only then
is one engine request added per (prompt, n): all or nothing, so a refused request (429, 503)
leaves no engine work behind. Apart from the routes so that they read as the protocol alone.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from afdserve.server.async_engine import RequestHandle
from afdserve.server.errors import BadRequest, NotFound
from afdserve.server.protocol import ChatCompletionRequest
from afdserve.server.state import ServingState
from afdserve.server.structured import structured_output


@dataclass
class Prompt:
    text: str | None
    token_ids: list[int]


def check_model(st: ServingState, model: str | None) -> None:
    if model is not None and model != st.model_name:
        raise NotFound(
            f"The model `{model}` does not exist; this server serves `{st.model_name}`.",
            param="model",
        )


def completion_prompts(st: ServingState, prompt: Any) -> list[Prompt]:
    if isinstance(prompt, str):
        items: list[Any] = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        items = [list(prompt)]
    else:
        items = list(prompt)
    if not items:
        raise BadRequest("prompt must not be empty", param="prompt")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(Prompt(item, st.tokenizer.encode(item)))
        else:
            out.append(Prompt(None, list(item)))
    for p in out:
        if not p.token_ids:
            raise BadRequest("prompt must not be empty", param="prompt")
        bad = [t for t in p.token_ids if not 0 <= t < st.vocab_size]
        if bad:
            raise BadRequest(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {st.vocab_size})",
                param="prompt",
            )
    return out


def admit(
    st: ServingState,
    body: Any,
    prompts: Sequence[Prompt],
    max_tokens: int | None,
    logprobs: int | None,
) -> list[tuple[int, RequestHandle]]:
    """Check lengths, then add one engine request per (prompt, n); all or nothing."""
    out_of_vocab = [k for k in body.logit_bias or {} if int(k) >= st.vocab_size]
    if out_of_vocab:
        raise BadRequest(
            f"logit_bias token id {out_of_vocab[0]} is outside the vocabulary [0, {st.vocab_size})",
            param="logit_bias",
        )
    structured = structured_output(body)
    limit = st.max_model_len
    plan = []
    for p in prompts:
        n = len(p.token_ids)
        if n >= limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens; the prompt has {n} tokens, "
                "which leaves no room to generate. Please shorten the prompt.",
                param="messages" if isinstance(body, ChatCompletionRequest) else "prompt",
            )
        mt = max_tokens if max_tokens is not None else limit - n
        if n + mt > limit:
            raise BadRequest(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{n + mt} tokens ({n} in the prompt, {mt} in the completion). Please reduce the "
                "length of the prompt or max_tokens.",
                param="max_tokens",
            )
        if body.min_tokens > mt:
            raise BadRequest(
                f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({mt})",
                param="min_tokens",
            )
        plan.append(mt)
    base = f"{'chatcmpl' if isinstance(body, ChatCompletionRequest) else 'cmpl'}-{uuid.uuid4().hex}"
    ae = st.async_engine
    handles: list[tuple[int, RequestHandle]] = []
    try:
        for pi, (p, mt) in enumerate(zip(prompts, plan, strict=True)):
            for i in range(body.n):
                params = body.sampling_params(mt, logprobs, i, ae.sampling_defaults)
                if structured is not None:
                    params = dataclasses.replace(params, structured=structured)
                handles.append((pi, ae.add_request(f"{base}-{len(handles)}", p.token_ids, params)))
    except BaseException:
        for _, h in handles:
            h.abort()
        raise
    st.metrics.on_admitted(len(prompts), body.n)
    return handles
