"""POST /v1/completions: prompts (text, token ids, or batches of either) -> text completions.

A batch of P prompts with ``n`` samples each becomes P engine requests; choice ``i * n + j`` is
sample ``j`` of prompt ``i`` (as OpenAI and vLLM number them). Text and token ids from the engine
are cumulative; streaming sends what is new since the last chunk of that choice.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, AsyncIterator, Optional

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from vllm_engine.outputs import CompletionOutput, Logprob, RequestOutput
from vllm_engine.sampling_params import SamplingParams, SamplingParamsError
from vllm_engine.serving.api_server import (
    ServingContext, merge_streams, run_until_disconnect, sse_stream, to_api_error)
from vllm_engine.serving.protocol import APIError, CompletionRequest

if TYPE_CHECKING:
    from vllm_engine.engine.async_engine import RequestStream

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SPELLING = {"prompt_logprobs": "logprobs"}  # SamplingParams field -> this API's name for it


@dataclass
class Prompt:
    text: Optional[str]  # None for token-id prompts (decoded lazily, for echo)
    token_ids: list[int]


def usage(prompts: list[Prompt], finals: list[Optional[RequestOutput]]) -> dict:
    """Exact token counts: the prompts' ids and every sample's generated ids."""
    prompt_tokens = sum(len(p.token_ids) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for o in finals if o is not None for c in o.outputs)
    cached = sum(o.num_cached_tokens for o in finals if o is not None)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens, "prompt_tokens_details": {"cached_tokens": cached}}


def request_error(e: BaseException, spelling: Optional[dict[str, str]] = None) -> APIError:
    """The HTTP error for what building or queueing a request raised; a bad sampling field is named
    as the client spelled it (``spelling``: our field -> the request's, e.g. chat's max_completion_tokens)."""
    if isinstance(e, SamplingParamsError):
        e = e.renamed((spelling or {}).get(e.param, e.param))
        return APIError(400, str(e), "invalid_request_error", param=e.param)
    return to_api_error(e)


async def add_requests(ctx: ServingContext, prompts: list[Prompt], params: SamplingParams, base_id: str,
                       priority: int, spelling: Optional[dict[str, str]] = None) -> list["RequestStream"]:
    """Queues one engine request per prompt; on any failure, aborts those already queued and raises APIError."""
    streams: list[RequestStream] = []
    try:
        for i, p in enumerate(prompts):
            rid = base_id if len(prompts) == 1 else f"{base_id}-{i}"
            prompt = {"prompt": p.text, "prompt_token_ids": p.token_ids}
            streams.append(await ctx.async_engine.add_request(prompt, params.clone(), rid, priority))
    except BaseException as e:
        for s in streams:
            s.close()
        raise request_error(e, spelling) from e
    return streams


async def collect_finals(streams: list["RequestStream"]) -> list[RequestOutput]:
    """The final output of every stream (closing them all if cancelled midway)."""
    finals: list[Optional[RequestOutput]] = [None] * len(streams)
    try:
        async for i, out in merge_streams(streams):
            finals[i] = out
    finally:
        for s in streams:
            s.close()
    if any(f is None or not f.finished for f in finals):
        raise APIError(500, "a request ended without a final output", "internal_error")
    return finals  # type: ignore[return-value]


def streaming_response(chunks: AsyncIterator[dict]) -> StreamingResponse:
    return StreamingResponse(sse_stream(chunks), media_type="text/event-stream", headers=SSE_HEADERS)


def _token_str(ctx: ServingContext, token_id: int, lp: Optional[Logprob]) -> str:
    if lp is not None and lp.decoded_token is not None:
        return lp.decoded_token
    tok = ctx.tokenizer
    return tok.decode([token_id]) if tok is not None else f"token_id:{token_id}"


def completion_logprobs(ctx: ServingContext, token_ids: list[int], entries: list[Optional[dict[int, Logprob]]],
                        text_offset: int) -> tuple[dict, int]:
    """OpenAI's completions logprobs for these positions; returns (logprobs, next text offset)."""
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, entry in zip(token_ids, entries):
        chosen = entry.get(tid) if entry else None
        token = _token_str(ctx, tid, chosen)
        out["tokens"].append(token)
        out["token_logprobs"].append(chosen.logprob if chosen else None)
        top: Optional[dict[str, float]] = None
        if entry:
            top = {}
            for t, lp in sorted(entry.items(), key=lambda kv: -kv[1].logprob):
                top.setdefault(_token_str(ctx, t, lp), lp.logprob)  # ids that decode alike: keep the likelier
        out["top_logprobs"].append(top)
        out["text_offset"].append(text_offset)
        text_offset += len(token)
    return out, text_offset


async def _prompts(ctx: ServingContext, req: CompletionRequest) -> list[Prompt]:
    raw = req.prompt
    if isinstance(raw, str):
        items: list[Any] = [raw]
    elif raw and isinstance(raw[0], int):
        items = [raw]
    else:
        items = list(raw)
    if not items:
        raise APIError(400, "prompt must not be empty.", param="prompt")
    prompts = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise APIError(400, "prompt must not be an empty string.", param="prompt")
            prompts.append(Prompt(item, await ctx.tokenize(item, add_special_tokens=True)))
        else:
            vocab = ctx.engine.model_config.vocab_size
            bad = [t for t in item if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt token id {bad[0]} is outside the vocabulary (size {vocab}).",
                               param="prompt")
            prompts.append(Prompt(None, list(item)))
    return prompts


def _max_tokens(ctx: ServingContext, req: CompletionRequest, prompts: list[Prompt]) -> Optional[int]:
    longest = max(len(p.token_ids) for p in prompts)
    for p in prompts:
        explicit = req.max_tokens if "max_tokens" in req.model_fields_set else None
        ctx.check_lengths(len(p.token_ids), explicit)
    if "max_tokens" not in req.model_fields_set:  # the default 16, shortened to what fits
        return max(1, min(16, ctx.max_model_len - longest))
    return req.max_tokens


async def create_completion(ctx: ServingContext, req: CompletionRequest, raw_request: Request) -> Response:
    ctx.check_model(req.model)
    if req.suffix:
        raise APIError(400, "suffix is not supported.", param="suffix")
    if req.best_of is not None and req.best_of != req.n:
        raise APIError(400, "best_of is not supported (other than best_of == n).", param="best_of")
    prompts = await _prompts(ctx, req)
    max_tokens = _max_tokens(ctx, req, prompts)
    try:
        constraint, constraint_param = req.structured_outputs_params()
        if constraint is not None:
            await ctx.compile_grammar(constraint, constraint_param)
        params = req.build_sampling_params(max_tokens, req.logprobs, ctx.generation_config,
                                           prompt_logprobs=req.logprobs if req.echo else None,
                                           structured_outputs=constraint)
    except ValueError as e:
        raise request_error(e, SPELLING) from e
    if req.echo:
        for p in prompts:
            if p.text is None:
                p.text = await ctx.detokenize(p.token_ids)
    base_id = f"cmpl-{uuid.uuid4().hex}"
    streams = await add_requests(ctx, prompts, params, base_id, req.priority, SPELLING)
    head = {"id": base_id, "object": "text_completion", "created": int(time.time()), "model": ctx.model_name}
    if req.stream:
        return streaming_response(_stream(ctx, req, prompts, streams, head))
    finals = await run_until_disconnect(raw_request, collect_finals(streams))
    if isinstance(finals, Response):
        return finals
    choices = []
    for i, (p, out) in enumerate(zip(prompts, finals)):
        for c in sorted(out.outputs, key=lambda c: c.index):
            choices.append(_choice(ctx, req, p, out, c, i * req.n + c.index))
    return JSONResponse({**head, "choices": choices, "usage": usage(prompts, finals)})


def _choice(ctx: ServingContext, req: CompletionRequest, p: Prompt, out: RequestOutput, c: CompletionOutput,
            index: int) -> dict:
    text = c.text
    logprobs = None
    if req.echo:
        text = (p.text or "") + text
    if req.logprobs is not None:
        ids, entries = [], []
        if req.echo:
            ids += p.token_ids
            entries += _prompt_entries(out, len(p.token_ids))
        ids += c.token_ids
        entries += list(c.logprobs or [])
        logprobs, _ = completion_logprobs(ctx, ids, entries, 0)
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason}


def _prompt_entries(out: RequestOutput, num_prompt_tokens: int) -> list[Optional[dict[int, Logprob]]]:
    """One prompt-logprobs entry per prompt token (None where the engine has none: the first token,
    and any it did not report, which are the leading ones)."""
    entries = list(out.prompt_logprobs or [])
    return [None] * (num_prompt_tokens - len(entries)) + entries[-num_prompt_tokens:]


@dataclass
class _ChoiceState:
    text_len: int = 0
    num_tokens: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False


async def _stream(ctx: ServingContext, req: CompletionRequest, prompts: list[Prompt],
                  streams: list["RequestStream"], head: dict) -> AsyncIterator[dict]:
    states: dict[int, _ChoiceState] = {}
    finals: list[Optional[RequestOutput]] = [None] * len(prompts)
    extra = {"usage": None} if req.include_usage else {}
    try:
        async for i, out in merge_streams(streams):
            p = prompts[i]
            if out.finished:
                finals[i] = out
            choices = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                index = i * req.n + c.index
                st = states.setdefault(index, _ChoiceState())
                if st.finished:
                    continue
                choice = _delta_choice(ctx, req, p, out, c, index, st)
                if choice is not None:
                    choices.append(choice)
            if choices:
                yield {**head, "choices": choices, **extra}
    finally:
        for s in streams:
            s.close()
    if req.include_usage:
        yield {**head, "choices": [], "usage": usage(prompts, finals)}


def _delta_choice(ctx: ServingContext, req: CompletionRequest, p: Prompt, out: RequestOutput, c: CompletionOutput,
                  index: int, st: _ChoiceState) -> Optional[dict]:
    """What is new in choice ``index`` since its last chunk (None when nothing is)."""
    delta_text = c.text[st.text_len:]
    new_ids = c.token_ids[st.num_tokens:]
    logprobs = None
    if not st.started and req.echo:
        delta_text = (p.text or "") + delta_text
    if req.logprobs is not None:
        ids, entries = [], []
        if not st.started and req.echo:
            ids += p.token_ids
            entries += _prompt_entries(out, len(p.token_ids))
        # Logprobs arrive with their tokens (one entry per generated token id).
        lps = c.logprobs or []
        ids += new_ids[: max(0, len(lps) - st.num_tokens)]
        entries += lps[st.num_tokens: st.num_tokens + len(new_ids)]
        if ids:
            logprobs, st.text_offset = completion_logprobs(ctx, ids, entries, st.text_offset)
    finish = c.finish_reason
    if not delta_text and logprobs is None and finish is None:
        return None
    st.started = True
    st.text_len, st.num_tokens = len(c.text), len(c.token_ids)
    st.finished = finish is not None
    return {"index": index, "text": delta_text, "logprobs": logprobs, "finish_reason": finish,
            "stop_reason": c.stop_reason if finish else None}
