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
from afdserve.server.protocol import ChatCompletionRequest, ChatTemplateFields
from afdserve.server.state import ServingState
from afdserve.server.structured import structured_output, template_messages, template_tools


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


def check_text_length(st: ServingState, text: str, param: str) -> None:
    """Refuse, before encoding it, a text too long to fit the context whatever its tokens: no
    token stands for more than `max_token_chars` characters, so a text of more than
    `max_model_len * max_token_chars` characters has more tokens than the context holds."""
    limit = st.max_model_len
    most = limit * st.tokenizer.max_token_chars
    if len(text) > most:
        raise BadRequest(
            f"This model's maximum context length is {limit} tokens; the prompt has "
            f"{len(text)} characters, more than {limit} tokens can hold (no token is longer "
            f"than {st.tokenizer.max_token_chars} characters). Please shorten the prompt.",
            param=param,
        )


def completion_prompts(
    st: ServingState, prompt: Any, add_special_tokens: bool = True
) -> list[Prompt]:
    """The prompts of a completion request, text ones encoded (blocking: run it off the loop)."""
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
            check_text_length(st, item, "prompt")
            out.append(Prompt(item, st.tokenizer.encode(item, add_special_tokens)))
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


def render_chat(st: ServingState, body: ChatTemplateFields) -> str:
    """The prompt text of chat messages, as the chat template renders it (blocking)."""
    template = st.chat_template
    if body.chat_template is not None:
        if not st.options.trust_request_chat_template:
            raise BadRequest(
                "this server does not take a chat_template from requests (start it with "
                "--trust-request-chat-template, or give --chat-template)",
                param="chat_template",
            )
        template = body.chat_template
    return st.tokenizer.apply_chat_template(
        template_messages(body.messages),
        add_generation_prompt=body.add_generation_prompt,
        tools=template_tools(body),
        chat_template=template,
        continue_final_message=body.continue_final_message,
        **body.template_kwargs(),
    )


def chat_prompt(st: ServingState, body: ChatTemplateFields, limit_length: bool = True) -> Prompt:
    """Render, check the length of, and encode a chat request's prompt (blocking: run it off
    the loop)."""
    text = render_chat(st, body)
    if limit_length:
        check_text_length(st, text, "messages")
    return Prompt(text, st.tokenizer.encode(text, body.add_special_tokens))


async def admit(
    st: ServingState,
    body: Any,
    prompts: Sequence[Prompt],
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
) -> list[tuple[int, RequestHandle]]:
    """Check lengths, then add one engine request per (prompt, n); all or nothing (each add
    runs off the event loop)."""
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
    requests = []
    owners = []  # the prompt index of each engine request
    for pi, (p, mt) in enumerate(zip(prompts, plan, strict=True)):
        for i in range(body.n):
            params = body.sampling_params(mt, logprobs, i, ae.sampling_defaults, prompt_logprobs)
            if structured is not None:
                params = dataclasses.replace(params, structured=structured)
            requests.append((f"{base}-{len(requests)}", p.token_ids, params))
            owners.append(pi)
    handles = list(zip(owners, await ae.add_requests(requests), strict=True))
    st.metrics.on_admitted(len(prompts), body.n)
    return handles
