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
from vllm_engine.serving.protocol import APIError, ChatCompletionRequest

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


async def create_chat_completion(ctx: ServingContext, req: ChatCompletionRequest, raw_request: Request) -> Response:
    ctx.check_model(req.model)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError(400, "top_logprobs needs logprobs to be true.", param="top_logprobs")
    text = await ctx.render_chat(req.messages, req.add_generation_prompt, req.continue_final_message,
                                 req.chat_template)
    prompt = Prompt(text, await ctx.tokenize(text, add_special_tokens=req.add_special_tokens))
    max_tokens = _max_tokens(ctx, req, len(prompt.token_ids))
    logprobs = (req.top_logprobs or 0) if req.logprobs else None
    spelling = {"logprobs": "top_logprobs",
                "max_tokens": "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"}
    try:
        params = req.build_sampling_params(max_tokens, logprobs, ctx.generation_config)
    except ValueError as e:
        raise request_error(e, spelling) from e
    base_id = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await add_requests(ctx, [prompt], params, base_id, req.priority, spelling)
    head = {"id": base_id, "object": "chat.completion", "created": int(time.time()), "model": ctx.model_name}
    if req.stream:
        return streaming_response(_stream(ctx, req, prompt, streams[0], {**head, "object": "chat.completion.chunk"}))
    finals = await run_until_disconnect(raw_request, collect_finals(streams))
    if isinstance(finals, Response):
        return finals
    out = finals[0]
    choices = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        lp = None
        if req.logprobs:
            lp = {"content": chat_logprobs(ctx, c.token_ids, list(c.logprobs or []), req.top_logprobs or 0)}
        choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": lp, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    return JSONResponse({**head, "choices": choices, "usage": usage([prompt], finals)})


@dataclass
class _ChoiceState:
    text_len: int = 0
    num_tokens: int = 0
    finished: bool = False


async def _stream(ctx: ServingContext, req: ChatCompletionRequest, prompt: Prompt, stream: "RequestStream",
                  head: dict) -> AsyncIterator[dict]:
    extra = {"usage": None} if req.include_usage else {}
    states = [_ChoiceState() for _ in range(req.n)]
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
                    choice = _delta_choice(ctx, req, c, st)
                    if choice is not None:
                        choices.append(choice)
            if choices:
                yield {**head, "choices": choices, **extra}
    finally:
        stream.close()
    if req.include_usage:
        yield {**head, "choices": [], "usage": usage([prompt], [final])}


def _delta_choice(ctx: ServingContext, req: ChatCompletionRequest, c: CompletionOutput, st: _ChoiceState
                  ) -> Optional[dict]:
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
    delta = {"content": delta_text} if delta_text or finish is None else {}
    return {"index": c.index, "delta": delta, "logprobs": lp, "finish_reason": finish,
            "stop_reason": c.stop_reason if finish else None}
