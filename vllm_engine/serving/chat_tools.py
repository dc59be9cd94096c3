"""OpenAI ``tools`` / ``tool_choice`` on chat requests: the prompt, the constraint, the parser.

- The tools reach the model through its chat template (``tools=``). A template that never mentions
  ``tools`` (SmolLM2's GGUF template, many others) gets a Hermes-style system prompt instead, which
  asks for ``<tool_call>`` blocks; earlier assistant calls and tool results are written in that form.
- ``tool_choice``: "none" (tools left out of the prompt, no parsing), "auto" (the reply is parsed:
  Hermes blocks, or Llama 3.1's JSON form for templates that speak ipython), "required" (a grammar
  forces a JSON array of ``{"name", "parameters"}`` calls, one or more; just one when
  ``parallel_tool_calls`` is false), or a named function (a grammar forces its arguments object).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Optional

from vllm_engine.sampling_params import StructuredOutputsParams
from vllm_engine.serving.protocol import APIError, ChatCompletionRequest, ChatMessage, ChatTool
from vllm_engine.serving.tool_parsers import HERMES_END, HERMES_START, ToolCallParser, parser_for_template

ANY_OBJECT = {"type": "object"}


@dataclass
class ToolUse:
    """What a chat request's tools mean for its prompt and its reply."""

    tools: list[dict]  # the OpenAI tool definitions, as dicts for the chat template
    mode: str  # hermes | llama3_json | required | named
    function_name: Optional[str] = None  # the named function
    constraint: Optional[StructuredOutputsParams] = None

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self.mode, self.function_name)

    @property
    def finish_reason(self) -> str:
        """What a reply that made calls ends with: OpenAI answers a forced named call with "stop"."""
        return "stop" if self.mode == "named" else "tool_calls"


def template_supports_tools(template: Optional[str]) -> bool:
    return bool(template) and "tools" in template


def tool_use(req: ChatCompletionRequest, template: Optional[str]) -> Optional[ToolUse]:
    """The request's tool use, None when it has none (no tools, or tool_choice "none").
    APIError 400 (param tool_choice) for a choice the tools cannot satisfy."""
    choice = req.tool_choice
    if not req.tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools.", param="tool_choice")
        return None
    if choice == "none":
        return None
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice is None or choice == "auto":
        return ToolUse(tools, parser_for_template(template))
    if choice == "required":
        return ToolUse(tools, "required", constraint=StructuredOutputsParams(
            json=required_schema(req.tools, req.parallel_tool_calls)))
    name = choice.function.name
    match = [t for t in req.tools if t.function.name == name]
    if not match:
        raise APIError(400, f"tool_choice names the function {name!r}, which is not in tools.", param="tool_choice")
    return ToolUse(tools, "named", name, StructuredOutputsParams(json=match[0].function.parameters or ANY_OBJECT))


def required_schema(tools: list[ChatTool], parallel: bool) -> dict:
    """A JSON array of one or more calls (exactly one unless ``parallel``), each of a listed function
    with its parameters."""
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "parameters": t.function.parameters or ANY_OBJECT},
              "required": ["name", "parameters"], "additionalProperties": False} for t in tools]
    items = calls[0] if len(calls) == 1 else {"anyOf": calls}
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": items}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def hermes_system_prompt(tools: list[dict]) -> str:
    """The tool prompt of Hermes-2-Pro (and Qwen2.5's template), for templates without tool support."""
    listed = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return ("You are a function calling AI model. You may call one or more functions to assist with the user "
            f"query. Don't make assumptions about what values to plug into functions. Here are the available tools: "
            f"<tools>\n{listed}\n</tools>\nFor each function call, return a json object with the function name and "
            f"arguments within {HERMES_START}{HERMES_END} XML tags:\n"
            f'{HERMES_START}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n{HERMES_END}')


def conversation(messages: list[ChatMessage], tools: Optional[list[dict]], native_tools: bool) -> list[dict]:
    """The messages as the chat template takes them. ``native_tools``: the template renders ``tools``,
    assistant ``tool_calls`` and tool results itself; otherwise they are written as Hermes text."""
    convo = []
    for m in messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.text()}
        if m.tool_calls:
            calls = [{"id": c.id, "type": "function",
                      "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments)}}
                     for c in m.tool_calls]
            if native_tools:
                msg["tool_calls"] = calls
            else:
                blocks = [f"{HERMES_START}\n" + json.dumps({"name": c["function"]["name"],
                                                            "arguments": c["function"]["arguments"]},
                                                           ensure_ascii=False) + f"\n{HERMES_END}" for c in calls]
                msg["content"] = "\n".join(([msg["content"]] if msg["content"] else []) + blocks)
        if m.role == "tool":
            if native_tools:
                if m.tool_call_id is not None:
                    msg["tool_call_id"] = m.tool_call_id
            else:
                msg["content"] = f"<tool_response>\n{msg['content']}\n</tool_response>"
        if m.name is not None:
            msg["name"] = m.name
        convo.append(msg)
    if tools and not native_tools:
        prompt = hermes_system_prompt(tools)
        if convo and convo[0]["role"] == "system":
            convo[0] = {**convo[0], "content": f"{convo[0]['content']}\n\n{prompt}"}
        else:
            convo.insert(0, {"role": "system", "content": prompt})
    return convo


def _arguments(text: str) -> Any:
    """A call's arguments as an object for the template (templates write them with ``tojson``)."""
    try:
        return json.loads(text)
    except ValueError:
        return text
