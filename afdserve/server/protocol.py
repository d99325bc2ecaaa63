"""Request and response schemas of the OpenAI-compatible API (pydantic).

Requests are validated strictly from JSON (a string is not an integer, `true` is not a number),
so a wrong type is a 400 naming the field rather than a silent coercion. Ranges follow OpenAI:
temperature in [0, 2], top_p in (0, 1], max_tokens >= 1 (0 only with completions' `echo`: the
prompt alone, for legacy loglikelihood clients), presence and frequency penalties in [-2, 2],
logit_bias values in [-100, 100] (keys: token ids as strings). JSON `null` for an optional
field means its default (`"temperature": null` is what leaving it out gives: 1, or the model's
generation_config.json), as OpenAI's spec allows; a field whose type has a `None` of its own
(max_tokens: the rest of the context) keeps that meaning.

The vLLM extensions `top_k`, `min_p`, `min_tokens`, `repetition_penalty` (> 0),
`stop_token_ids`, `ignore_eos`, `return_token_ids`, `prompt_logprobs`, `add_special_tokens`,
`stream_options.continuous_usage_stats` and, on chat, `echo`, `continue_final_message`,
`chat_template`, `chat_template_kwargs` and `documents` are served, and so are structured
outputs (`response_format`, vLLM's `guided_*` and `structured_outputs`) and chat `tools` /
`tool_choice` (server/structured.py). Fields clients send that this server does not implement
yet (`NOT_SUPPORTED`: suffix, beam search, bad_words, ...) are a 400 naming the field when set
to anything but their neutral value, never silently ignored; fields nobody here knows of are
ignored (logged), as OpenAI clients may send newer ones.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from afdserve.server.errors import BadRequest
from afdserve.types import SamplingParams

log = logging.getLogger("afdserve.server")

MAX_LOGPROBS = 20
MAX_N = 16


def _nullable(annotation: Any) -> bool:
    return annotation is type(None) or type(None) in typing.get_args(annotation)


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """Drop `null` for optional fields that have no None of their own (the default then
        applies); log fields this schema does not know."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        unknown = [k for k in data if k not in fields]
        if unknown:
            log.warning("%s: ignoring unknown fields %s", cls.__name__, sorted(unknown))
        return {
            k: v
            for k, v in data.items()
            if not (
                v is None
                and k in fields
                and not fields[k].is_required()
                and not _nullable(fields[k].annotation)
            )
        }


class StreamOptions(_Request):
    include_usage: bool = False
    """Send one last chunk (with empty choices) that carries the usage."""
    continuous_usage_stats: bool = False
    """vLLM extension: with include_usage, every chunk also carries its choice's usage so far."""


class _NotSupported(_Request):
    """Fields clients send that this server does not implement yet.

    `NOT_SUPPORTED` maps each to the values that mean "off" (its neutral values); a request
    that sets one to anything else is a 400 naming it. Implementing a field is deleting its
    line there (the field itself stays, typed), then passing it on in `sampling_params`.
    """

    NOT_SUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        # structured outputs are served (server/structured.py); their backend options are not
        "guided_decoding_backend": (None,),
        "guided_whitespace_pattern": (None,),
        # beam search
        "use_beam_search": (False,),
        "length_penalty": (1.0,),
        # other vLLM sampling and output options
        "include_stop_str_in_output": (False,),
        "skip_special_tokens": (True,),
        "spaces_between_special_tokens": (True,),
        "truncate_prompt_tokens": (None,),
        "allowed_token_ids": (None,),
        "bad_words": (None, []),
        "logprob_token_ids": (None,),
        "return_tokens_as_token_ids": (None, False),
        "logits_processors": (None,),
        "priority": (0,),
        "request_id": (None,),
        "vllm_xargs": (None,),
        "kv_transfer_params": (None,),
        "mm_processor_kwargs": (None, {}),
    }

    guided_decoding_backend: Any = None
    guided_whitespace_pattern: Any = None
    use_beam_search: Any = False
    length_penalty: Any = 1.0
    include_stop_str_in_output: Any = False
    skip_special_tokens: Any = True
    spaces_between_special_tokens: Any = True
    truncate_prompt_tokens: Any = None
    allowed_token_ids: Any = None
    logprob_token_ids: Any = None
    return_tokens_as_token_ids: Any = None
    logits_processors: Any = None
    priority: Any = 0
    request_id: Any = None
    vllm_xargs: Any = None
    kv_transfer_params: Any = None
    mm_processor_kwargs: Any = None

    @classmethod
    def not_supported(cls) -> dict[str, tuple[Any, ...]]:
        """Every class's table along the MRO, merged (subclasses add their own)."""
        out: dict[str, tuple[Any, ...]] = {}
        for klass in reversed(cls.__mro__):
            out.update(klass.__dict__.get("NOT_SUPPORTED", {}))
        return out

    def check_unsupported(self) -> None:
        for name, neutral in self.not_supported().items():
            value = getattr(self, name)
            if not any(_same(value, n) for n in neutral):
                raise BadRequest(f"{name} is not supported yet (only {_show(neutral)})", param=name)


def _same(value: Any, neutral: Any) -> bool:
    # True == 1 and 1 == 1.0 in Python: a bool only matches a bool
    return isinstance(value, bool) == isinstance(neutral, bool) and value == neutral


def _show(values: tuple[Any, ...]) -> str:
    import json

    return " or ".join(json.dumps(v) for v in values)


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


class _SamplingRequest(_NotSupported):
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
    """A tag for the end user (OpenAI uses it for abuse monitoring): accepted, unused."""
    cache_salt: str | None = None
    """vLLM: salts the prefix cache; this engine has none to salt, so there is nothing to do."""
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
    prompt_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    """vLLM extension: each prompt token's logprob and this many top alternatives (not with
    stream, as vLLM)."""

    def check_unsupported(self) -> None:
        super().check_unsupported()
        bad = [k for k in self.logit_bias or {} if not (k.isascii() and k.isdigit())]
        if bad:
            raise BadRequest(
                f"logit_bias keys must be token ids (strings of digits), got {bad[0]!r}",
                param="logit_bias",
            )
        if isinstance(self.stop, list) and not all(self.stop):
            raise BadRequest("stop strings must be non-empty", param="stop")
        if self.stop == "":
            raise BadRequest("stop strings must be non-empty", param="stop")
        if self.prompt_logprobs is not None and self.stream:
            raise BadRequest(
                "prompt_logprobs are not available when stream is true", param="prompt_logprobs"
            )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk (vLLM: only together with include_usage)."""
        return self.include_usage and bool(
            self.stream_options and self.stream_options.continuous_usage_stats
        )

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        index: int,
        defaults: Mapping[str, Any] | None = None,
        prompt_logprobs: int | None = None,
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
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(_SamplingRequest):
    NOT_SUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "suffix": (None, ""),
        "prompt_embeds": (None,),
    }

    prompt: str | list[int] | list[str] | list[list[int]]
    """Text, token ids, or a batch of either (one choice per prompt and n)."""
    max_tokens: Annotated[int, Field(ge=0)] | None = 16
    """0 only with echo (the prompt alone; the engine still runs one token, as vLLM)."""
    """None (JSON null): whatever context the prompt leaves (as vLLM)."""
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    """Prepend the prompt to the text (and, with logprobs, its tokens' logprobs)."""
    suffix: str | None = None
    best_of: int | None = None
    prompt_embeds: Any = None
    add_special_tokens: bool = True
    """vLLM: run the tokenizer's post-processor (a BOS, say) on text prompts."""

    def check_unsupported(self) -> None:
        super().check_unsupported()
        if self.max_tokens == 0 and not self.echo:
            raise BadRequest(
                "max_tokens must be at least 1 (0 is allowed only with echo)", param="max_tokens"
            )
        if self.best_of not in (None, 1) and self.best_of != self.n:
            raise BadRequest("best_of is not supported (only equal to n)", param="best_of")

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the answer is the prompt alone."""
        return self.echo and self.max_tokens == 0

    @property
    def engine_max_tokens(self) -> int | None:
        return 1 if self.echo_only else self.max_tokens

    @property
    def engine_prompt_logprobs(self) -> int | None:
        """vLLM's: the field when set, else logprobs when echo asks for the prompt's."""
        if self.prompt_logprobs is not None:
            return self.prompt_logprobs
        return self.logprobs if self.echo else None


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


RESERVED_TEMPLATE_KWARGS = frozenset(
    {"messages", "add_generation_prompt", "continue_final_message", "chat_template", "tools"}
)
"""Template variables that have a request field of their own."""


class ChatTemplateFields(_Request):
    """How chat messages become the prompt: shared by chat completions and /tokenize."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    """Leave the final message open for the model to continue (prefill); needs
    add_generation_prompt false, as in vLLM."""
    add_special_tokens: bool = False
    """vLLM: special tokens on top of the template's own (off: the template writes them)."""
    chat_template: str | None = None
    """A Jinja template for this request only (needs --trust-request-chat-template)."""
    chat_template_kwargs: dict[str, Any] | None = None
    """More variables for the template (e.g. {"enable_thinking": false})."""
    documents: list[dict[str, str]] | None = None
    """RAG documents, passed to the template as `documents`."""

    def check_template_fields(self) -> None:
        if self.continue_final_message and self.add_generation_prompt:
            raise BadRequest(
                "continue_final_message and add_generation_prompt cannot both be true "
                "(set add_generation_prompt to false)",
                param="continue_final_message",
            )
        clash = sorted(RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs or {}))
        if clash:
            raise BadRequest(
                f"chat_template_kwargs may not set {', '.join(clash)} (a request field of its own)",
                param="chat_template_kwargs",
            )

    def template_kwargs(self) -> dict[str, Any]:
        kw = dict(self.chat_template_kwargs or {})
        if self.documents is not None:
            kw["documents"] = self.documents
        return kw


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


class ChatCompletionRequest(ChatTemplateFields, _SamplingRequest):
    NOT_SUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {
        "functions": (None, []),
        "function_call": (None, "none"),
        "reasoning_effort": (None,),
        "thinking_token_budget": (None,),
        "include_reasoning": (True,),
        "modalities": (None, ["text"]),
        "audio": (None,),
        "prediction": (None,),
        "web_search_options": (None,),
        "store": (None, False),
        "service_tier": (None, "auto", "default"),
        "verbosity": (None,),
    }

    max_tokens: Annotated[int, Field(ge=1)] | None = None
    """None: whatever context the prompt leaves (as vLLM)."""
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool = False
    """vLLM: the answer starts with the last message's content when that message is the
    assistant's (with continue_final_message: the whole continued message)."""
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """With tools: "auto" (the default) parses Hermes/Qwen <tool_call> blocks out of the
    answer; "required" and a named function force a call through a JSON schema."""
    parallel_tool_calls: bool | None = None
    """Accepted; a "required" answer may hold several calls either way."""
    functions: Any = None
    function_call: Any = None
    reasoning_effort: Any = None
    thinking_token_budget: Any = None
    include_reasoning: Any = True
    modalities: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None
    store: Any = None
    metadata: dict[str, str] | None = None
    """Only used with store (not supported): accepted."""
    service_tier: Any = None
    verbosity: Any = None

    def check_unsupported(self) -> None:
        super().check_unsupported()
        self.check_template_fields()
        if self.top_logprobs and not self.logprobs:
            raise BadRequest("top_logprobs needs logprobs: true", param="top_logprobs")

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )


class TokenizeCompletionRequest(_Request):
    """POST /tokenize with a prompt (vLLM's shape)."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(ChatTemplateFields):
    """POST /tokenize with chat messages: the prompt chat completions would run."""

    model: str | None = None
    return_token_strs: bool = False
    tools: list[Tool] | None = None
    """Passed to the template, as chat completions does."""

    def check_unsupported(self) -> None:
        self.check_template_fields()


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]
