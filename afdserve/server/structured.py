"""Structured outputs and tool calls of the OpenAI-compatible API.

A request's output constraint comes from exactly one of (400 when several are given):
  - `response_format`: {"type": "text"} (none), {"type": "json_object"}, or {"type":
    "json_schema", "json_schema": {"name", "schema", "strict"}};
  - vLLM's `guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`, or its newer
    `structured_outputs` object ({json, regex, choice, grammar, json_object});
  - chat `tool_choice` "required" or {"type": "function", "function": {"name": ...}} (with
    `tools`), forced as vLLM forces them: "required" through a JSON schema of a non-empty array
    of {"name": one of the tools, "parameters": its parameters}, a named tool through its
    parameters' schema. The output is then the call(s): `message.tool_calls`, content null,
    finish_reason "tool_calls" for "required" and "stop" for a named tool (OpenAI's).
It becomes `SamplingParams.structured` (engine/structured.py enforces it as a logits mask on
the attention worker; the engine's admission refuses one that does not compile, a 400).

`tool_choice` "auto" (the default with `tools`) constrains nothing: the model answers freely
and Hermes/Qwen-style `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks are
parsed out of its text (`parse_tool_calls`, vLLM's hermes parser's format): content is the text
before the first block (null if empty), finish_reason "tool_calls". "none" parses nothing.
The tools go to the chat template as `tools` (transformers' argument), and assistant messages'
`tool_calls` (arguments parsed from their JSON strings, as vLLM does) and `tool` messages'
`tool_call_id` go to it as fields of those messages; a template that knows no tools ignores them.

Streaming with tools: text deltas flow until a `<tool_call>` may begin (a suffix that could
start one is held back), and the calls come as one delta with every call whole, with the
finish reason, at the end (vLLM streams the arguments piecewise; clients that concatenate
deltas see the same result). Forced calls ("required", named) stream no content, only that
final delta.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import Request

from afdserve.server.errors import BadRequest
from afdserve.types import StructuredOutput

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*)\Z", re.DOTALL)


def _guided(body: Any) -> list[tuple[str, StructuredOutput]]:
    """Every constraint the body gives, as (the field that gave it, the constraint)."""
    found: list[tuple[str, StructuredOutput]] = []

    def add(field: str, kind: str, spec: Any = "") -> None:
        try:
            found.append((field, StructuredOutput(kind, spec)))
        except ValueError as exc:
            raise BadRequest(f"{field}: {exc}", param=field.split(".")[0]) from None

    rf = getattr(body, "response_format", None)
    if rf is not None and rf.type == "json_object":
        add("response_format", "json_object")
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise BadRequest(
                "response_format json_schema needs json_schema.schema", param="response_format"
            )
        add("response_format", "json_schema", rf.json_schema.schema_)
    if body.guided_json is not None:
        schema = body.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise BadRequest(f"guided_json is not JSON: {exc}", param="guided_json") from None
        add("guided_json", "json_schema", schema)
    if body.guided_regex is not None:
        add("guided_regex", "regex", body.guided_regex)
    if body.guided_choice is not None:
        add("guided_choice", "choice", list(body.guided_choice))
    if body.guided_grammar is not None:
        add("guided_grammar", "grammar", body.guided_grammar)
    so = body.structured_outputs
    if so is not None:
        if so.json_ is not None:
            add("structured_outputs.json", "json_schema", _schema_of(so.json_))
        if so.regex is not None:
            add("structured_outputs.regex", "regex", so.regex)
        if so.choice is not None:
            add("structured_outputs.choice", "choice", list(so.choice))
        if so.grammar is not None:
            add("structured_outputs.grammar", "grammar", so.grammar)
        if so.json_object:
            add("structured_outputs.json_object", "json_object")
    return found


def _schema_of(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError as exc:
            raise BadRequest(
                f"structured_outputs.json is not JSON: {exc}", param="structured_outputs"
            ) from None
    return value


def tool_mode(body: Any) -> str | None:
    """ "auto", "required", "named" or None (no tools, or tool_choice "none")."""
    tools = getattr(body, "tools", None)
    choice = getattr(body, "tool_choice", None)
    if not tools:
        if choice not in (None, "none"):
            raise BadRequest("tool_choice needs tools", param="tool_choice")
        return None
    if choice is None or choice == "auto":
        return "auto"
    if choice == "none":
        return None
    if choice == "required":
        return "required"
    if isinstance(choice, str):
        raise BadRequest(
            f"tool_choice must be none, auto, required or a named function, got {choice!r}",
            param="tool_choice",
        )
    return "named"


def _named_tool(body: Any) -> Any:
    name = body.tool_choice.function.name
    for t in body.tools:
        if t.function.name == name:
            return t
    raise BadRequest(
        f"tool_choice names {name!r}, which is not among the tools", param="tool_choice"
    )


def _parameters(tool: Any) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object", "properties": {}}


def required_schema(tools: Sequence[Any]) -> dict[str, Any]:
    """vLLM's schema for tool_choice "required": a non-empty array of calls of the tools
    (each call closed to other keys, which vLLM's leaves open and the calls would drop)."""
    return {
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "anyOf": [
                {
                    "properties": {
                        "name": {"type": "string", "enum": [t.function.name]},
                        "parameters": _parameters(t),
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
                for t in tools
            ],
        },
    }


def structured_output(body: Any) -> StructuredOutput | None:
    """The request's one output constraint (see the module docstring), or None."""
    found = _guided(body)
    mode = tool_mode(body) if hasattr(body, "tools") else None
    if mode == "required":
        found.append(("tool_choice", StructuredOutput("json_schema", required_schema(body.tools))))
    elif mode == "named":
        tool = _named_tool(body)
        found.append(("tool_choice", StructuredOutput("json_schema", _parameters(tool))))
    if len(found) > 1:
        names = ", ".join(f for f, _ in found)
        raise BadRequest(f"give one output constraint, not several ({names})", param=found[1][0])
    return found[0][1] if found else None


# ---- the chat template's messages and tools ---------------------------------------------------


def template_messages(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """The chat messages as the template gets them: role and content (text, "" for none),
    an assistant's tool_calls with their arguments parsed from JSON, a tool's tool_call_id."""
    out = []
    for m in messages:
        d: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.name is not None:
            d["name"] = m.name
        if m.tool_calls:
            calls = []
            for c in m.tool_calls:
                fn = dict(c.get("function") or {})
                args = fn.get("arguments")
                if isinstance(args, str):
                    try:
                        fn["arguments"] = json.loads(args) if args.strip() else {}
                    except ValueError:
                        pass  # kept as the string it is
                calls.append({**c, "function": fn})
            d["tool_calls"] = calls
        if m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        out.append(d)
    return out


def template_tools(body: Any) -> list[dict[str, Any]] | None:
    if not body.tools:
        return None
    return [t.model_dump(mode="json", exclude_none=True) for t in body.tools]


# ---- tool calls out of the model's output ----------------------------------------------------


def _call(name: str, arguments: Any) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {
        "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
        "type": "function",
        "function": {"name": name, "arguments": args},
    }


def parse_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """Hermes/Qwen `<tool_call>{"name", "arguments"}</tool_call>` blocks out of `text`:
    (the content before the first block, or the whole text when no block parses; the calls)."""
    calls = []
    for m in _TOOL_CALL.finditer(text):
        raw = (m.group(1) if m.group(1) is not None else m.group(2)).strip()
        try:
            obj = json.loads(raw)
        except ValueError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, []
        calls.append(_call(obj["name"], obj.get("arguments", obj.get("parameters", {}))))
    if not calls:
        return text, []
    content = text[: text.index(TOOL_CALL_OPEN)].strip()
    return content or None, calls


def forced_tool_calls(body: Any, mode: str, text: str) -> list[dict[str, Any]] | None:
    """The calls of a forced ("required" or named) output, or None when it does not parse
    (an output cut short by max_tokens)."""
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if mode == "named":
        return [_call(body.tool_choice.function.name, obj)]
    if not isinstance(obj, list):
        return None
    return [_call(c["name"], c.get("parameters", {})) for c in obj if isinstance(c, dict)]


def message_fields(
    body: Any, mode: str | None, text: str, finish_reason: str | None
) -> tuple[str | None, list[dict[str, Any]] | None, str | None]:
    """(content, tool_calls or None, finish_reason) of one chat choice."""
    if mode is None:
        return text, None, finish_reason
    if mode == "auto":
        content, calls = parse_tool_calls(text)
        if not calls:
            return text, None, finish_reason
        return content, calls, "tool_calls"
    if finish_reason == "length":
        return text, None, finish_reason
    calls = forced_tool_calls(body, mode, text)
    if calls is None:
        return text, None, finish_reason
    return None, calls, "tool_calls" if mode == "required" else "stop"


def _held_back(text: str) -> int:
    """How much of `text`'s end may be the start of a tool call (not to be streamed yet)."""
    at = text.find(TOOL_CALL_OPEN)
    if at >= 0:
        return len(text) - at
    for k in range(min(len(TOOL_CALL_OPEN) - 1, len(text)), 0, -1):
        if TOOL_CALL_OPEN.startswith(text[-k:]):
            return k
    return 0


def stream_chat_tools(
    st: Any,
    request: Request,
    body: Any,
    rid: str,
    prompt: Any,
    handles: list[tuple[int, Any]],
    mode: str,
) -> AsyncIterator[str]:
    """stream_chat (server/streaming.py) for a request with tools (see the module docstring)."""
    import time

    from afdserve.server.logprobs import chat_logprobs
    from afdserve.server.responses import (
        ChatChunkChoice,
        ChatCompletionChunk,
        ChatDelta,
        ToolCallOut,
        Usage,
    )
    from afdserve.server.streaming import _merged, _sse, _stream

    created = int(time.time())
    texts = [""] * len(handles)
    sent = [0] * len(handles)

    def chunk(choices: list[Any], usage: Any = None) -> str:
        return _sse(
            ChatCompletionChunk(
                id=rid, created=created, model=st.model_name, choices=choices, usage=usage
            )
        )

    async def chunks() -> AsyncIterator[str]:
        for i in range(len(handles)):
            yield chunk([ChatChunkChoice(index=i, delta=ChatDelta(role="assistant", content=""))])
        n_out = 0
        async for i, out in _merged([h for _, h in handles]):
            n_out += len(out.token_ids)
            texts[i] += out.text
            lps = chat_logprobs(st, out.logprobs or []) if body.logprobs else None
            ids = out.token_ids if body.return_token_ids else None
            if out.finish_reason is None:
                delta = ""
                if mode == "auto":
                    upto = len(texts[i]) - _held_back(texts[i])
                    delta, sent[i] = texts[i][sent[i] : max(upto, sent[i])], max(upto, sent[i])
                if delta or lps is not None or ids is not None:
                    yield chunk(
                        [
                            ChatChunkChoice(
                                index=i, delta=ChatDelta(content=delta), logprobs=lps, token_ids=ids
                            )
                        ]
                    )
                continue
            content, calls, reason = message_fields(body, mode, texts[i], out.finish_reason)
            rest = None
            if (
                content is not None
                and len(content) > sent[i]
                and content.startswith(texts[i][: sent[i]])
            ):
                rest = content[sent[i] :]
            delta = ChatDelta(
                content=rest,
                tool_calls=[ToolCallOut(index=k, **c) for k, c in enumerate(calls)]
                if calls
                else None,
            )
            yield chunk(
                [
                    ChatChunkChoice(
                        index=i, delta=delta, finish_reason=reason, logprobs=lps, token_ids=ids
                    )
                ]
            )
        if body.include_usage:
            yield chunk([], Usage.of(len(prompt.token_ids) * len(handles), n_out))

    return _stream(request, [h for _, h in handles], chunks())
