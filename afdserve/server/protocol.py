"""Request and response schemas of the OpenAI-compatible API (pydantic).

Requests are validated strictly from JSON (a string is not an integer, `true` is not a number),
so a wrong type is a 400 naming the field rather than a silent coercion. Ranges follow OpenAI:
temperature in [0, 2], top_p in (0, 1], max_tokens >= 1, presence and frequency penalties in
[-2, 2], logit_bias values in [-100, 100] (keys: token ids as strings). The vLLM extensions
`top_k`, `min_p`, `min_tokens`, `repetition_penalty` (> 0), `stop_token_ids`, `ignore_eos` and
`return_token_ids` are accepted, and so are structured outputs (`response_format`, vLLM's
`guided_*` and `structured_outputs`) and chat `tools` / `tool_choice` (server/structured.py).
Fields this server does not implement are rejected with a 400 when set to anything but their
neutral value (echo, suffix, best_of, bad_words), never silently ignored; unknown fields are
ignored, as OpenAI clients may send newer ones.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer

from afdserve.server.errors import BadRequest
from afdserve.types import SamplingParams

MAX_LOGPROBS = 20
MAX_N = 16


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    """Send one last chunk (with empty choices) that carries the usage."""


class JsonSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsParams(_Request):
    """vLLM's `structured_outputs` (one of the constraints; its backend options are ignored)."""

    json_: str | dict[str, Any] | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _SamplingRequest(_Request):
    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=-1)] = 0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    ignore_eos: bool = False
    n: Annotated[int, Field(ge=1, le=MAX_N)] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0.0, allow_inf_nan=False)] = 1.0
    min_p: Annotated[float, Field(ge=0.0, le=1.0)] = 0.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    logit_bias: dict[str, Annotated[float, Field(ge=-100.0, le=100.0)]] | None = None
    """Token id (a string of digits, as OpenAI's) -> bias added to its logit."""
    bad_words: list[str] | None = None
    return_token_ids: bool = False
    """vLLM extension: return `prompt_token_ids` and `token_ids` in each choice."""
    response_format: ResponseFormat | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: StructuredOutputsParams | None = None

    def check_unsupported(self) -> None:
        bad = [k for k in self.logit_bias or {} if not (k.isascii() and k.isdigit())]
        if bad:
            raise BadRequest(
                f"logit_bias keys must be token ids (strings of digits), got {bad[0]!r}",
                param="logit_bias",
            )
        if self.bad_words:
            raise BadRequest("bad_words is not supported", param="bad_words")
        if isinstance(self.stop, list) and not all(self.stop):
            raise BadRequest("stop strings must be non-empty", param="stop")
        if self.stop == "":
            raise BadRequest("stop strings must be non-empty", param="stop")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        index: int,
        defaults: Mapping[str, Any] | None = None,
    ) -> SamplingParams:
        """The engine's params for choice `index` (seeded choices get seed + index). `defaults`
        (the model's generation_config.json: ModelConfig.sampling_defaults) give temperature,
        top_p and top_k where the request leaves them out, as vLLM's server does."""
        seed = None if self.seed is None else self.seed + index
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        given = {k: getattr(self, k) for k in ("temperature", "top_p", "top_k")}
        for key in given:
            if key not in self.model_fields_set and defaults and defaults.get(key) is not None:
                given[key] = defaults[key]
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(given["temperature"]),
            top_p=float(given["top_p"]),
            top_k=given["top_k"],
            seed=seed,
            stop_token_ids=tuple(self.stop_token_ids or ()),
            stop=stop,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            presence_penalty=float(self.presence_penalty),
            frequency_penalty=float(self.frequency_penalty),
            repetition_penalty=float(self.repetition_penalty),
            min_p=float(self.min_p),
            min_tokens=self.min_tokens,
            logit_bias={int(k): float(v) for k, v in (self.logit_bias or {}).items()},
        )


class CompletionRequest(_SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    """Text, token ids, or a batch of either (one choice per prompt and n)."""
    max_tokens: Annotated[int, Field(ge=1)] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.echo:
            raise BadRequest("echo is not supported", param="echo")
        if self.suffix:
            raise BadRequest("suffix is not supported", param="suffix")
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise BadRequest("best_of is not supported (only equal to n)", param="best_of")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    """An assistant's calls ({id, type, function: {name, arguments}}), for the template."""
    tool_call_id: str | None = None
    """A tool message's answer to this call."""

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class FunctionDef(_Request):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class FunctionName(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(_SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    """None: whatever context the prompt leaves (as vLLM)."""
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    add_generation_prompt: bool = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


# ---- responses -------------------------------------------------------------------------------


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _WithTokenIds(_Response):
    """A choice that may carry the vLLM `return_token_ids` fields: omitted unless asked for."""

    @model_serializer(mode="wrap")
    def _drop_unset_token_ids(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        for key in ("prompt_token_ids", "token_ids"):
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


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


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


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
