"""Structured outputs and tool calls through the server, with the official ``openai`` SDK and httpx
against a real ``vllm-engine serve`` process on SmolLM2; outputs checked with jsonschema and re."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import httpx
import jsonschema
import pytest
from pydantic import BaseModel, Field

from .schemas import SCHEMAS

pytestmark = pytest.mark.slow

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                   "required": ["city"], "additionalProperties": False}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


class Capital(BaseModel):
    country: Literal["France", "Germany", "Italy"]
    capital: str = Field(max_length=12)
    population_millions: int = Field(ge=0, le=40)


def test_parse_returns_a_pydantic_object(smol_client):
    r = smol_client.chat.completions.parse(
        model="smol", messages=[{"role": "user", "content": "What is the capital of France?"}],
        response_format=Capital, max_tokens=40, temperature=0)
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, Capital) and r.choices[0].finish_reason == "stop"
    assert Capital.model_validate_json(r.choices[0].message.content) == parsed


def test_thirty_schemas_validate(smol_client):
    def ask(item):
        name, schema, _ = item
        r = smol_client.chat.completions.create(
            model="smol", messages=[{"role": "user", "content": f"Give me an example {name.replace('_', ' ')} "
                                                                f"as JSON."}],
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}},
            max_tokens=64, temperature=0)
        return name, schema, r.choices[0]

    with ThreadPoolExecutor(len(SCHEMAS)) as pool:  # one batch: the engine runs them side by side
        results = list(pool.map(ask, SCHEMAS))
    for name, schema, choice in results:
        assert choice.finish_reason == "stop", (name, choice.message.content)
        jsonschema.validate(json.loads(choice.message.content), schema)


def test_regex_choice_and_completions_json(smol_server, smol_client):
    r = smol_client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "When was the moon landing?"}], max_tokens=16,
        temperature=0, extra_body={"guided_regex": r"(19|20)[0-9]{2}-[0-9]{2}-[0-9]{2}"})
    assert re.fullmatch(r"(19|20)[0-9]{2}-[0-9]{2}-[0-9]{2}", r.choices[0].message.content)
    r = smol_client.chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Is water wet?"}], max_tokens=8, temperature=0,
        extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].message.content in ("yes", "no") and r.choices[0].finish_reason == "stop"
    r = smol_client.completions.create(model="smol", prompt="A user record in JSON:", max_tokens=40, temperature=0,
                                       extra_body={"response_format": {"type": "json_schema", "json_schema": {
                                           "name": "person", "schema": SCHEMAS[0][1]}}})
    jsonschema.validate(json.loads(r.choices[0].text), SCHEMAS[0][1])
    body = {"prompt": "Colour:", "max_tokens": 8, "temperature": 0,
            "structured_outputs": {"grammar": 'root ::= "red" | "green"'}}
    r = httpx.post(f"{smol_server}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] in ("red", "green")


def test_json_object_guided_json_and_guided_grammar(smol_server, smol_client):
    question = [{"role": "user", "content": "Describe a cat."}]
    r = smol_client.chat.completions.create(model="smol", messages=question, max_tokens=48, temperature=0,
                                            response_format={"type": "json_object"})
    _check_json_object(r.choices[0].message.content, r.choices[0].finish_reason)
    r = smol_client.completions.create(model="smol", prompt="A cat:", max_tokens=48, temperature=0,
                                       extra_body={"response_format": {"type": "json_object"}})
    _check_json_object(r.choices[0].text, r.choices[0].finish_reason)
    name, schema = SCHEMAS[0][0], SCHEMAS[0][1]
    r = smol_client.chat.completions.create(model="smol", messages=question, max_tokens=80, temperature=0,
                                            extra_body={"guided_json": schema})
    assert r.choices[0].finish_reason == "stop", (name, r.choices[0].message.content)
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = smol_client.chat.completions.create(model="smol", messages=question, max_tokens=8, temperature=0,
                                            extra_body={"guided_grammar": 'root ::= ("purr" | "meow") "s"?'})
    assert r.choices[0].message.content in ("purr", "meow", "purrs", "meows"), r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"


def _check_json_object(text: str, finish_reason: str) -> None:
    """A JSON object, or the start of one cut by max_tokens."""
    if finish_reason == "stop":
        assert isinstance(json.loads(text), dict), text
    else:
        assert finish_reason == "length" and text.lstrip().startswith("{"), text


def _calls(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def _streamed(stream) -> tuple[str, list[dict], str]:
    """Content, tool calls assembled from their deltas as OpenAI clients assemble them, finish reason."""
    content, calls, finish = "", [], None
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        content += ch.delta.content or ""
        for d in ch.delta.tool_calls or []:
            if d.index == len(calls):
                assert d.id and d.type == "function" and d.function.name
                calls.append({"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""})
            else:
                assert d.id is None and d.function.name is None
                calls[d.index]["arguments"] += d.function.arguments or ""
        finish = ch.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("tool_choice, finish", [
    ("required", "tool_calls"),
    ({"type": "function", "function": {"name": "get_weather"}}, "stop"),
])
def test_enforced_tool_calls_stream_and_not(smol_client, tool_choice, finish):
    kw = dict(model="smol", messages=QUESTION, tools=TOOLS, tool_choice=tool_choice, max_tokens=60, temperature=0)
    r = smol_client.chat.completions.create(**kw)
    choice = r.choices[0]
    calls = _calls(choice.message)
    assert choice.finish_reason == finish and choice.message.content is None and len(calls) >= 1
    for name, args in calls:
        tool = {"get_weather": WEATHER_TOOL, "get_time": TIME_TOOL}[name]
        jsonschema.validate(args, tool["function"]["parameters"])
    if isinstance(tool_choice, dict):
        assert [n for n, _ in calls] == ["get_weather"]
    content, streamed, stream_finish = _streamed(smol_client.chat.completions.create(**kw, stream=True))
    assert content == "" and stream_finish == finish
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == calls
    assert [c["arguments"] for c in streamed] == [c.function.arguments for c in choice.message.tool_calls]


def test_required_without_parallel_calls_makes_one(smol_client):
    r = smol_client.chat.completions.create(model="smol", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                            parallel_tool_calls=False, max_tokens=60, temperature=0)
    assert len(r.choices[0].message.tool_calls) == 1


AUTO_CALL = (r'<tool_call>\n\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{1,10}", '
             r'"unit": "(celsius|fahrenheit)"\}\}\n</tool_call>')


def test_auto_parses_hermes_calls_and_round_trips(smol_client):
    """tool_choice auto: the reply is parsed for Hermes <tool_call> blocks. SmolLM2-135M rarely calls
    a tool by itself, so a regex makes it write one; then the call and its result go back to the
    model in the conversation."""
    kw = dict(model="smol", messages=QUESTION, tools=TOOLS, tool_choice="auto", max_tokens=60, temperature=0,
              extra_body={"guided_regex": AUTO_CALL})
    r = smol_client.chat.completions.create(**kw)
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and msg.content is None
    (name, args), = _calls(msg)
    assert name == "get_weather" and set(args) == {"city", "unit"}
    content, streamed, finish = _streamed(smol_client.chat.completions.create(**kw, stream=True))
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], c["arguments"]) for c in streamed] == [(name, msg.tool_calls[0].function.arguments)]
    # the round trip: the assistant's call and the tool's answer, then the model replies in text
    follow = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [tc.model_dump() for tc in msg.tool_calls]},
        {"role": "tool", "tool_call_id": msg.tool_calls[0].id, "content": "21 degrees, sunny"}]
    r2 = smol_client.chat.completions.create(model="smol", messages=follow, tools=TOOLS, max_tokens=8,
                                             temperature=0)
    assert r2.choices[0].message.content and r2.choices[0].message.tool_calls is None
    # without tools, or with tool_choice "none", the text is never parsed for calls
    for extra in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        r3 = smol_client.chat.completions.create(model="smol", messages=QUESTION, max_tokens=60, temperature=0,
                                                 extra_body={"guided_regex": AUTO_CALL}, **extra)
        assert r3.choices[0].message.content.startswith("<tool_call>") and r3.choices[0].message.tool_calls is None
        assert r3.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"guided_regex": "[a-"}, "guided_regex"),
    ({"guided_grammar": "root ::= "}, "guided_grammar"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
    ({"guided_regex": "a+", "guided_choice": ["a"]}, "guided_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "required", "guided_regex": "a+"}, "guided_regex"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"guided_json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "guided_json"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {"type": "null"}}}}},
     "response_format"),
])
def test_bad_constraints_are_400_naming_the_field(smol_server, body, param):
    r = httpx.post(f"{smol_server}/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4, **body},
                   timeout=60)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error", err
    r = httpx.get(f"{smol_server}/health", timeout=10)
    assert r.status_code == 200


def test_length_ends_an_unfinished_tool_call_as_text(smol_client):
    r = smol_client.chat.completions.create(model="smol", messages=QUESTION, tools=TOOLS, tool_choice="required",
                                            max_tokens=5, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls is None
    assert choice.message.content.startswith("[")


def test_openapi_documents_the_fields_and_responses_match_it(smol_server):
    """The document lists the new request fields; real tool-call responses and chunks fit the
    documented response models (which forbid undocumented keys)."""
    from vllm_engine.serving.protocol import ChatCompletionResponse, ChatCompletionStreamResponse

    doc = httpx.get(f"{smol_server}/openapi.json", timeout=30).json()
    schemas = doc["components"]["schemas"]
    for model in ("ChatCompletionRequest", "CompletionRequest"):
        assert {"response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar",
                "structured_outputs"} <= set(schemas[model]["properties"])
    assert {"tools", "tool_choice", "parallel_tool_calls"} <= set(schemas["ChatCompletionRequest"]["properties"])
    assert "tool_calls" in schemas["ChatResponseMessage"]["properties"]
    assert "tool_calls" in schemas["ChatDelta"]["properties"]
    body = {"messages": QUESTION, "tools": TOOLS, "tool_choice": "required", "max_tokens": 60, "temperature": 0}
    r = httpx.post(f"{smol_server}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200
    ChatCompletionResponse.model_validate(r.json())
    with httpx.stream("POST", f"{smol_server}/v1/chat/completions", json={**body, "stream": True}, timeout=120) as s:
        events = [line[6:] for line in s.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [ChatCompletionStreamResponse.model_validate_json(e) for e in events[:-1]]
    assert any(c.choices and c.choices[0].delta.tool_calls for c in chunks)
