"""Response schemas of the OpenAI-compatible API (pydantic): what the server sends back.

Strict about their own shape (`extra="forbid"`), so a field that is not OpenAI's or vLLM's
cannot slip into a response; vLLM's optional fields (`prompt_token_ids`, `token_ids`,
`prompt_logprobs`, `tool_calls`) are left out unless set. The request schemas are in
server/protocol.py.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _WithTokenIds(_Response):
    """A choice (or a chat response) that may carry the vLLM fields `prompt_token_ids`,
    `token_ids` (`return_token_ids`) and `prompt_logprobs`: omitted unless asked for."""

    @model_serializer(mode="wrap")
    def _drop_unset_token_ids(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in ("prompt_token_ids", "token_ids", "prompt_logprobs"):
            if data.get(key, 0) is None:
                del data[key]
        return data


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class PromptLogprobOut(_Response):
    """vLLM's `Logprob` of one token in `prompt_logprobs`."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptLogprobOut] | None]
"""vLLM's `prompt_logprobs`: per prompt token None (the first) or {token id: its Logprob}, the
prompt token first, then the top alternatives."""


class CompletionLogprobs(_Response):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] | None = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(_WithTokenIds):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None
    prompt_logprobs: PromptLogprobs | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None = None


class FunctionCallOut(_Response):
    name: str
    arguments: str
    """The arguments as JSON text (OpenAI's)."""


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut
    index: int | None = None
    """In a streamed delta only."""

    @model_serializer(mode="wrap")
    def _drop_unset_index(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("index", 0) is None:
            del data["index"]
        return data


class _WithToolCalls(_Response):
    """A message or delta whose `tool_calls` is omitted when there are none."""

    @model_serializer(mode="wrap")
    def _drop_unset_tool_calls(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        if data.get("tool_calls", 0) is None:
            del data["tool_calls"]
        return data


class ChatMessageOut(_WithToolCalls):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_WithTokenIds):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_WithTokenIds):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None
    """vLLM puts a chat request's prompt logprobs here, beside the choices."""


class ChatDelta(_WithToolCalls):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChunkChoice(_WithTokenIds):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "afdserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int
    """Context length requests may use (prompt + max_tokens), as vLLM reports it."""
    vocab_size: int
    """Token ids a prompt may contain are [0, vocab_size) (used by `afdserve bench`)."""


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
