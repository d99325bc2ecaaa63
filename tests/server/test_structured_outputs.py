"""Structured outputs and tools through the OpenAI API (server/structured.py), with the openai
client, LangChain's ChatOpenAI where installed, on the random tiny model (shape only) and on
the real SmolLM2 (sense)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from afdserve.model.tokenizer import Tokenizer
from afdserve.server.protocol import ChatMessage
from afdserve.server.structured import parse_tool_calls, template_messages
from tests.server.conftest import SERVED, live_server

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "unit": {"enum": ["c", "f"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["utc", "cet"]}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
KW = dict(model=SERVED, max_tokens=60, temperature=0.8, seed=3)


@pytest.fixture(scope="module")
def srv():
    with live_server() as s:
        yield s


def _check_call(call, tools=(WEATHER, TIME)):
    fn = {t["function"]["name"]: t["function"] for t in tools}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), fn["parameters"])
    assert call.type == "function" and call.id


def test_response_format_json_schema_and_object(srv):
    client = srv.openai()
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
    }
    for n in (1, 2):
        reply = client.chat.completions.create(messages=USER, response_format=fmt, n=n, **KW)
        for choice in reply.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMA)
    reply = client.chat.completions.create(
        messages=USER, response_format={"type": "json_object"}, **{**KW, "max_tokens": 3}
    )
    assert reply.choices[0].message.content.startswith("{")
    reply = client.completions.create(
        prompt="Hi", extra_body={"response_format": fmt}, **KW
    )  # completions take it too, as vLLM's
    jsonschema.validate(json.loads(reply.choices[0].text), SCHEMA)
    text = client.chat.completions.create(
        messages=USER, response_format={"type": "text"}, **{**KW, "max_tokens": 4}
    )
    assert text.choices[0].finish_reason == "length"


def test_vllm_guided_fields(srv):
    client = srv.openai()
    for extra, ok in (
        ({"guided_choice": ["yes", "no"]}, lambda t: t in ("yes", "no")),
        ({"guided_regex": r"[0-9]{3}-[a-z]{2}"}, lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
        ({"guided_json": SCHEMA}, lambda t: jsonschema.validate(json.loads(t), SCHEMA) is None),
        ({"guided_json": json.dumps(SCHEMA)}, lambda t: json.loads(t)["pet"] in ("cat", "dog")),
        ({"guided_grammar": 'start: "a" | "bb"'}, lambda t: t in ("a", "bb")),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        ({"structured_outputs": {"json": SCHEMA}}, lambda t: json.loads(t)["age"] <= 120),
    ):
        reply = client.chat.completions.create(messages=USER, extra_body=extra, **KW)
        text = reply.choices[0].message.content
        assert ok(text), (extra, text)
        assert reply.choices[0].finish_reason == "stop"
        comp = client.completions.create(prompt="Q:", extra_body=extra, **KW)
        assert ok(comp.choices[0].text), (extra, comp.choices[0].text)


def test_bad_constraints_are_400(srv):
    with srv.http() as http:
        for body, needle in (
            ({"guided_regex": "[a-"}, "does not compile"),
            ({"guided_json": {"type": "wat"}}, "does not compile"),
            ({"guided_json": "{"}, "not JSON"),
            ({"guided_choice": []}, "choice"),
            ({"guided_choice": ["a"], "guided_regex": "b"}, "not several"),
            ({"response_format": {"type": "json_schema"}}, "json_schema.schema"),
            ({"tool_choice": "required"}, "needs tools"),
            (
                {
                    "tools": [WEATHER],
                    "tool_choice": {"type": "function", "function": {"name": "x"}},
                },
                "not among",
            ),
        ):
            r = http.post("/v1/chat/completions", json={"model": SERVED, "messages": USER, **body})
            assert r.status_code == 400, (body, r.text)
            assert needle in r.json()["error"]["message"], (body, r.text)
    srv.wait_idle()


def test_tool_choice_required_and_named(srv):
    client = srv.openai()
    reply = client.chat.completions.create(
        messages=USER, tools=[WEATHER, TIME], tool_choice="required", **{**KW, "max_tokens": 120}
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _check_call(call)
    named = {"type": "function", "function": {"name": "get_time"}}
    reply = client.chat.completions.create(
        messages=USER, tools=[WEATHER, TIME], tool_choice=named, **KW
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and len(choice.message.tool_calls) == 1
    assert choice.message.tool_calls[0].function.name == "get_time"
    _check_call(choice.message.tool_calls[0])
    # streamed: one final delta with the whole call(s), no content
    stream = client.chat.completions.create(
        messages=USER,
        tools=[WEATHER],
        tool_choice="required",
        stream=True,
        logit_bias={str(ord("]")): 10.0},  # close the array once a call is done (byte ids)
        **{**KW, "max_tokens": 120},
    )
    deltas = [c.choices[0] for c in stream if c.choices]
    assert "".join(d.delta.content or "" for d in deltas) == ""
    assert deltas[-1].finish_reason == "tool_calls"
    calls = deltas[-1].delta.tool_calls
    assert calls and calls[0].index == 0 and calls[0].function.name == "get_weather"
    jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER["function"]["parameters"])


def test_tool_choice_auto_parses_hermes_blocks(srv):
    """The random model is made to write a Hermes block (a regex); with tool_choice auto the
    server parses it out into tool_calls, streamed or not."""
    block = r'Sure\. <tool_call>\{"name": "get_weather", "arguments": \{"city": "Paris", "unit": "c"\}\}</tool_call>'
    client = srv.openai()
    kw = dict(
        messages=USER,
        tools=[WEATHER],
        extra_body={"guided_regex": block},
        **{**KW, "max_tokens": 200},
    )
    choice = client.chat.completions.create(**kw).choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content == "Sure."
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "c"}
    deltas = [c.choices[0] for c in client.chat.completions.create(stream=True, **kw) if c.choices]
    assert "".join(d.delta.content or "" for d in deltas).strip() == "Sure."
    assert deltas[-1].finish_reason == "tool_calls"
    assert deltas[-1].delta.tool_calls[0].function.name == "get_weather"
    # no block: plain content, the finish reason as it was; "none" parses nothing
    plain = client.chat.completions.create(
        messages=USER, tools=[WEATHER], extra_body={"guided_choice": ["hello"]}, **KW
    ).choices[0]
    assert plain.message.content == "hello" and plain.message.tool_calls is None
    kw["tool_choice"] = "none"
    none = client.chat.completions.create(**kw).choices[0]
    assert none.finish_reason == "stop" and "<tool_call>" in none.message.content


def test_tool_history_reaches_the_template(srv):
    """Assistant tool_calls and tool results go through the API to the template (the tiny
    model's ChatML template renders only role and content: the request must simply work)."""
    client = srv.openai()
    history = USER + [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {
                        "name": "get_weather",
                        "arguments": '{"city": "Paris", "unit": "c"}',
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"},
    ]
    reply = client.chat.completions.create(
        messages=history, tools=[WEATHER], **{**KW, "max_tokens": 3}
    )
    assert reply.choices[0].message.content is not None


def test_template_gets_tools_and_tool_calls(tiny_model_dir, tmp_path):
    """With a template that renders tools (Hermes/Qwen style), the tools, the assistant's calls
    (arguments as a mapping, parsed from their JSON) and the tool's answer are in the prompt."""
    import shutil

    d = tmp_path / "m"
    shutil.copytree(tiny_model_dir("llama"), d)
    (d / "chat_template.jinja").write_text(
        "{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}|{% endif %}"
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function.name }} "
        "{{ c.function.arguments | tojson }}</tool_call>{% endfor %}"
        "{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %}|{% endfor %}"
    )
    msgs = [
        ChatMessage(role="user", content="hi"),
        ChatMessage(
            role="assistant",
            content=None,
            tool_calls=[
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}
            ],
        ),
        ChatMessage(role="tool", content="ok", tool_call_id="c1"),
    ]
    text = Tokenizer(d).apply_chat_template(
        template_messages(msgs), add_generation_prompt=False, tools=[WEATHER]
    )
    assert text == (
        'TOOLS:get_weather;|<user>hi|<assistant><tool_call>f {"x": 1}</tool_call>|<tool>ok[c1]|'
    )


def test_parse_tool_calls():
    content, calls = parse_tool_calls(
        'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"q": 1}}\n</tool_call>\n'
        '<tool_call>{"name": "b", "arguments": {}}'  # the last one unterminated (EOS)
    )
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("a", {"q": 1}),
        ("b", {}),
    ]
    assert parse_tool_calls("<tool_call>not json</tool_call>") == (
        "<tool_call>not json</tool_call>",
        [],
    )
    assert parse_tool_calls("just text") == ("just text", [])


def test_langchain_structured_output_and_tools(srv):
    import langchain_openai as lc

    llm = lc.ChatOpenAI(
        model=SERVED,
        base_url=srv.base_url + "/v1",
        api_key="unused",
        temperature=0.8,
        max_tokens=80,
        seed=3,
        max_retries=0,
    )
    schema = {"title": "Person", "description": "A person", **SCHEMA}
    out = llm.with_structured_output(schema, method="json_schema").invoke("Describe someone")
    jsonschema.validate(out, SCHEMA)
    msg = llm.bind_tools([WEATHER], tool_choice="required").invoke("Weather in Paris?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    jsonschema.validate(msg.tool_calls[0]["args"], WEATHER["function"]["parameters"])


@pytest.mark.slow
def test_real_model_answers_in_the_schema():
    schema = {
        "type": "object",
        "properties": {"capital": {"type": "string", "maxLength": 20}},
        "required": ["capital"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    with live_server("builtin:smollm2-135m-instruct") as s:
        reply = s.openai().chat.completions.create(
            model=SERVED,
            messages=[
                {"role": "user", "content": "What is the capital of France? Answer in JSON."}
            ],
            response_format=fmt,
            max_tokens=20,
            temperature=0,
        )
        tool = s.openai().chat.completions.create(
            model=SERVED,
            messages=USER,
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=40,
            temperature=0,
        )
    out = json.loads(reply.choices[0].message.content)
    assert out == {"capital": "Paris"}
    (call,) = tool.choices[0].message.tool_calls
    assert json.loads(call.function.arguments)["city"] == "Paris"
