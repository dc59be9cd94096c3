"""POST /v1/chat/completions: messages -> the model's chat template -> one engine request with n samples.

The rendered template already holds the special tokens (BOS), so it is tokenized without adding
them again (``add_special_tokens`` false by default, as in vLLM). Without max_completion_tokens /
max_tokens the reply may use whatever fits in the context (or the model's generation_config
max_new_tokens, when it sets one).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from vllm_engine.outputs import CompletionOutput, Logprob
from vllm_engine.serving.api_server import ServingContext, run_until_disconnect
from vllm_engine.serving.completions import (
    Prompt, _token_str, add_requests, collect_finals, request_error, streaming_response, usage)
from vllm_engine.sampling_params import SamplingParamsError, StructuredOutputsParams
from vllm_engine.serving.chat_tools import ToolUse, tool_use
from vllm_engine.serving.protocol import APIError, ChatCompletionRequest
from vllm_engine.serving.tool_parsers import ToolCallParser

if TYPE_CHECKING:
    from vllm_engine.engine.async_engine import RequestStream


def _max_tokens(ctx: ServingContext, req: ChatCompletionRequest, num_prompt_tokens: int) -> Optional[int]:
    explicit, param = req.max_completion_tokens, "max_completion_tokens"
    if explicit is None:
        explicit, param = req.max_tokens, "max_tokens"
    ctx.check_lengths(num_prompt_tokens, explicit, param)
    if explicit is not None:
        return explicit
    default = ctx.generation_config.get("max_new_tokens")
    if default:
        return max(1, min(int(default), ctx.max_model_len - num_prompt_tokens))
    return None  # the engine lets it run to the end of the context


def chat_logprobs(ctx: ServingContext, token_ids: list[int], entries: list[Optional[dict[int, Logprob]]],
                  top_n: int) -> list[dict]:
    """OpenAI's chat ``logprobs.content`` entries: token, logprob, bytes, and the top ``top_n``."""
    content = []
    for tid, entry in zip(token_ids, entries):
        entry = entry or {}
        chosen = entry.get(tid)
        token = _token_str(ctx, tid, chosen)
        top = sorted((lp.rank or 0, t, lp) for t, lp in entry.items() if lp.rank is not None and lp.rank <= top_n)
        content.append({
            "token": token, "logprob": chosen.logprob if chosen else float("-inf"),
            "bytes": list(token.encode("utf-8")),
            "top_logprobs": [{"token": (s := _token_str(ctx, t, lp)), "logprob": lp.logprob,
                              "bytes": list(s.encode("utf-8"))} for _, t, lp in top],
        })
    return content


async def _constraint(ctx: ServingContext, req: ChatCompletionRequest, tools: Optional[ToolUse]
                      ) -> Optional[StructuredOutputsParams]:
    """The reply's constraint (response_format / guided_* / tool_choice), compiled: a bad one is a 400."""
    try:
        spec, param = req.structured_outputs_params()
    except SamplingParamsError as e:
        raise request_error(e) from e
    if tools is not None and tools.constraint is not None:
        if spec is not None:
            raise APIError(400, f"{param} cannot be combined with tool_choice {tools.mode!r}.", param=param)
        spec, param = tools.constraint, "tools"
    if spec is not None:
        await ctx.compile_grammar(spec, param)
    return spec


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw_request: Request) -> Response:
    ctx.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs to be true.", param="top_logprobs")
    tools = tool_use(req, ctx.effective_chat_template(req.chat_template))
    text = await ctx.render_chat(req.messages, req.add_generation_prompt, req.continue_final_message,
                                 req.chat_template, tools.tools if tools is not None else None)
    prompt = Prompt(text, await ctx.tokenize(text, add_special_tokens=req.add_special_tokens))
    max_tokens = _max_tokens(ctx, req, len(prompt.token_ids))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    spelling = {"logprobs": "top_logprobs",
                "max_tokens": "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"}
    constraint = await _constraint(ctx, req, tools)
    try:
        params = req.build_sampling_params(max_tokens, logprobs, ctx.generation_config,
                                           structured_outputs=constraint)
    except ValueError as e:
        raise request_error(e, spelling) from e
    base_id = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await add_requests(ctx, [prompt], params, base_id, req.priority, spelling)
    head = {"id": base_id, "object": "chat.completion", "created": int(time.time()), "model": ctx.model_name}
    if req.stream:
        return streaming_response(_stream(ctx, req, prompt, streams[0], {**head, "object": "chat.completion.chunk"},
                                          tools))
    finals = await run_until_disconnect(raw_request, collect_finals(streams))
    if isinstance(finals, Response):
        return finals
    out = finals[0]
    choices = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        lp = None
        if req.logprobs:
            lp = {"content": chat_logprobs(ctx, c.token_ids, list(c.logprobs or []), req.top_logprobs or 0)}
        message, finish = _message(c, tools)
        choices.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": finish,
                        "stop_reason": c.stop_reason})
    return JSONResponse({**head, "choices": choices, "usage": usage([prompt], finals)})


def _message(c: CompletionOutput, tools: Optional[ToolUse]) -> tuple[dict, Optional[str]]:
    """A finished choice's message and finish reason: its tool calls parsed out when it may have some."""
    if tools is None:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    content, calls = tools.parser().parse(c.text)
    if not calls:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    finish = tools.finish_reason if c.finish_reason == "stop" else c.finish_reason
    return {"role": "assistant", "content": content, "tool_calls": calls}, finish


@dataclass
class _ChoiceState:
    text_len: int = 0
    num_tokens: int = 0
    finished: bool = False
    tool_parser: Optional[ToolCallParser] = None


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, prompt: Prompt, stream: "RequestStream",
                  head: dict, tools: Optional[ToolUse]) -> AsyncIterator[dict]:
    extra = {"usage": None} if req.include_usage else {}
    states = [_ChoiceState(tool_parser=tools.parser() if tools is not None else None) for _ in range(req.n)]
    final = None
    try:
        # The role comes first, in its own chunk per choice, as OpenAI sends it.
        yield {**head, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None} for j in range(req.n)], **extra}
        async for out in stream:
            if out.finished:
                final = out
            choices = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                st = states[c.index]
                if not st.finished:
                    choice = _delta_choice(ctx, req, c, st, tools)
                    if choice is not None:
                        choices.append(choice)
            if choices:
                yield {**head, "choices": choices, **extra}
    finally:
        stream.close()
    if req.include_usage:
        yield {**head, "choices": [], "usage": usage([prompt], [final])}


def _delta_choice(ctx: ServingContext, req: ChatCompletionRequest, c: CompletionOutput, st: _ChoiceState,
                  tools: Optional[ToolUse]) -> Optional[dict]:
    delta_text = c.text[st.text_len:]
    new_ids = c.token_ids[st.num_tokens:]
    lp = None
    if req.logprobs and new_ids:
        entries = list(c.logprobs or [])[st.num_tokens: st.num_tokens + len(new_ids)]
        lp = {"content": chat_logprobs(ctx, new_ids[: len(entries)], entries, req.top_logprobs or 0)}
    finish = c.finish_reason
    if not delta_text and lp is None and finish is None:
        return None
    st.text_len, st.num_tokens, st.finished = len(c.text), len(c.token_ids), finish is not None
    if st.tool_parser is None:
        delta = {"content": delta_text} if delta_text or finish is None else {}
    else:
        delta = _tool_delta(st.tool_parser, c.text, finish is not None)
        if finish == "stop" and st.tool_parser.num_calls_sent:
            finish = tools.finish_reason
        if not delta and lp is None and finish is None:
            return None
    return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish,
            "stop_reason": c.stop_reason if finish else None}


def _tool_delta(parser: ToolCallParser, text: str, final: bool) -> dict:
    """A streamed delta of a choice that may call tools: new content, and tool_calls deltas as OpenAI
    streams them (a call's id, type and name first, then pieces of its arguments)."""
    content, calls = parser.delta(text, final)
    delta: dict = {}
    if content:
        delta["content"] = content
    if calls:
        delta["tool_calls"] = calls
    return delta
