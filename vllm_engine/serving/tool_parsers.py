"""Tool calls in generated text: the formats, a scanner for JSON still being written, and the
streaming diff into OpenAI's ``tool_calls`` deltas.

Formats (``ToolCallParser.mode``):

- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` blocks, text before the
  first block is content (Qwen2.5/3, Hermes, SmolLM2 templates; also what this server's own tool
  prompt asks for when the template has no tool support).
- ``llama3_json``: the whole reply is ``{"name": ..., "parameters": {...}}`` (optionally after
  ``<|python_tag|>``), several separated by ``;`` (Llama 3.1/3.2).
- ``required``: ``tool_choice="required"``: the grammar forces a JSON array of
  ``{"name": ..., "parameters": {...}}``.
- ``named``: ``tool_choice`` names a function: the grammar forces its arguments object; the whole
  reply is the arguments.

A call's ``arguments`` is the JSON text of its arguments exactly as generated, streamed or not,
so the concatenated stream deltas equal the non-streamed string.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Optional

HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
ARGUMENT_KEYS = ("arguments", "parameters")


@dataclass
class CallDraft:
    """A tool call as far as the text goes: ``name`` once its string is complete, ``arguments`` the
    text of the arguments value so far, ``done`` once the whole call object is closed."""

    name: Optional[str] = None
    arguments: str = ""
    arguments_done: bool = False
    done: bool = False
    end: Optional[int] = None  # index just past the call object, once done


# ---- scanning JSON that may still be incomplete ---------------------------------------------------------
def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i


def _scan_string(s: str, i: int) -> Optional[int]:
    """``s[i]`` is '"': the index past the closing quote, None if the string is not closed yet."""
    i += 1
    while i < len(s):
        c = s[i]
        if c == "\\":
            i += 2
            continue
        if c == '"':
            return i + 1
        i += 1
    return None


def _scan_value(s: str, i: int) -> Optional[int]:
    """The index past the JSON value starting at ``s[i]``, None if it is not complete yet."""
    if i >= len(s):
        return None
    c = s[i]
    if c == '"':
        return _scan_string(s, i)
    if c in "{[":
        depth = 0
        while i < len(s):
            c = s[i]
            if c == '"':
                end = _scan_string(s, i)
                if end is None:
                    return None
                i = end
                continue
            if c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
            i += 1
        return None
    j = i  # a number or literal: complete only once something follows it
    while j < len(s) and s[j] not in ",}] \t\r\n":
        j += 1
    return j if j < len(s) else None


def scan_call(s: str, i: int) -> Optional[CallDraft]:
    """Scans a call object ``{"name": ..., "arguments" | "parameters": ...}`` starting at ``s[i]``
    (whitespace skipped first). None when ``s[i:]`` cannot be such an object."""
    i = _skip_ws(s, i)
    if i >= len(s):
        return CallDraft()
    if s[i] != "{":
        return None
    draft = CallDraft()
    i += 1
    while True:
        i = _skip_ws(s, i)
        if i >= len(s):
            return draft
        if s[i] == "}":
            draft.done, draft.end = True, i + 1
            return draft
        if s[i] == ",":
            i += 1
            continue
        if s[i] != '"':
            return None
        key_end = _scan_string(s, i)
        if key_end is None:
            return draft
        key = json.loads(s[i:key_end])
        i = _skip_ws(s, key_end)
        if i >= len(s):
            return draft
        if s[i] != ":":
            return None
        i = _skip_ws(s, i + 1)
        end = _scan_value(s, i)
        if key == "name":
            if end is None:
                return draft
            value = json.loads(s[i:end])
            if not isinstance(value, str):
                return None
            draft.name = value
        elif key in ARGUMENT_KEYS:
            draft.arguments = s[i:end] if end is not None else s[i:]
            draft.arguments_done = end is not None
        if end is None:
            return draft
        i = end


def _holdback(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


# ---- the formats -----------------------------------------------------------------------------------------
@dataclass
class Parsed:
    """What the text so far holds: ``content`` safe to show (never taken back later) and the calls."""

    content: str
    calls: list[CallDraft] = field(default_factory=list)


def parse_hermes(text: str) -> Parsed:
    start = text.find(HERMES_START)
    if start < 0:
        return Parsed(text[: len(text) - _holdback(text, HERMES_START)])
    calls, pos = [], start
    while pos >= 0:
        body_start = pos + len(HERMES_START)
        draft = scan_call(text, body_start)
        if draft is None:
            break
        calls.append(draft)
        if not draft.done:
            break
        pos = text.find(HERMES_START, draft.end)
    return Parsed(text[:start], calls)


def parse_llama3_json(text: str) -> Parsed:
    body = text.lstrip()
    if PYTHON_TAG.startswith(body) and len(body) < len(PYTHON_TAG):
        return Parsed("")  # maybe the tag is coming
    offset = len(text) - len(body)
    if body.startswith(PYTHON_TAG):
        offset += len(PYTHON_TAG)
    elif not body.startswith("{"):
        return Parsed(text)
    calls, pos = [], offset
    while True:
        draft = scan_call(text, pos)
        if draft is None:
            return Parsed(text) if not calls else Parsed("", calls)
        calls.append(draft)
        if not draft.done:
            break
        pos = _skip_ws(text, draft.end)
        if pos >= len(text) or text[pos] != ";":
            break
        pos += 1
    return Parsed("", calls)


def parse_required(text: str) -> Parsed:
    i = _skip_ws(text, 0)
    if i >= len(text) or text[i] != "[":
        return Parsed("")
    calls, pos = [], i + 1
    while True:
        pos = _skip_ws(text, pos)
        if pos < len(text) and text[pos] in ",":
            pos += 1
            continue
        if pos >= len(text) or text[pos] == "]":
            break
        draft = scan_call(text, pos)
        if draft is None:
            break
        calls.append(draft)
        if not draft.done:
            break
        pos = draft.end
    return Parsed("", calls)


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json, "required": parse_required}


def parser_for_template(template: Optional[str]) -> str:
    """The auto-mode format of a chat template: Llama 3.1's JSON form when it speaks ipython, else Hermes."""
    if template and ("<|python_tag|>" in template or "ipython" in template) and HERMES_START not in template:
        return "llama3_json"
    return "hermes"


# ---- one choice's tool calls, whole or streamed ----------------------------------------------------------
def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallParser:
    """Tool calls of one choice. ``mode``: hermes | llama3_json | required | named (``function_name``).

    ``parse(text)`` on the final text -> (content or None, OpenAI tool_calls); ``delta(text)`` on the
    text so far -> (content delta, tool_calls deltas) since the previous call: a call's first delta
    carries its index, id, type and name (arguments ""), the later ones its arguments' new text.
    """

    def __init__(self, mode: str, function_name: Optional[str] = None) -> None:
        if mode == "named" and not function_name:
            raise ValueError("the named mode needs the function's name")
        self.mode, self.function_name = mode, function_name
        self._content_sent = 0
        self._ids: list[str] = []
        self._args_sent: list[int] = []

    def _scan(self, text: str) -> Parsed:
        if self.mode == "named":
            return Parsed("", [CallDraft(self.function_name, text.strip())])
        return PARSERS[self.mode](text)

    def parse(self, text: str) -> tuple[Optional[str], list[dict]]:
        """The final text's content and complete tool calls; ([], the whole text) when the calls do not
        parse (a reply cut by max_tokens, a malformed call)."""
        parsed = self._scan(text)
        calls = []
        for i, d in enumerate(parsed.calls):
            if d.name is None or not (d.done or self.mode == "named") or not _is_json(d.arguments or "{}"):
                return text, []
            calls.append({"id": self._call_id(i), "type": "function",
                          "function": {"name": d.name, "arguments": d.arguments or "{}"}})
        if not calls:
            return text, []
        content = parsed.content.strip() if self.mode == "hermes" else ""
        return content or None, calls

    @property
    def num_calls_sent(self) -> int:
        return len(self._args_sent)

    def delta(self, text: str, final: bool = False) -> tuple[str, list[dict]]:
        """``final``: the reply is complete; text held back as a possible start of a call is content
        after all when no call came."""
        parsed = self._scan(text)
        shown = text if final and not parsed.calls and self.mode in ("hermes", "llama3_json") else parsed.content
        content = shown[self._content_sent:]
        self._content_sent = max(self._content_sent, len(shown))
        deltas = []
        for i, d in enumerate(parsed.calls):
            if d.name is None:
                break
            if i == len(self._args_sent):
                self._args_sent.append(0)
                deltas.append({"index": i, "id": self._call_id(i), "type": "function",
                               "function": {"name": d.name, "arguments": ""}})
            new = d.arguments[self._args_sent[i]:]
            if new:
                self._args_sent[i] = len(d.arguments)
                deltas.append({"index": i, "function": {"arguments": new}})
        return content, deltas

    def _call_id(self, i: int) -> str:
        while len(self._ids) <= i:
            self._ids.append(new_call_id())
        return self._ids[i]


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True
