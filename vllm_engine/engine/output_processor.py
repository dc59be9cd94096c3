"""OutputProcessor: turns each step's new token ids into what the user sees.

For every request (and each of its ``n`` samples) it keeps an incremental detokenizer, checks stop
strings, gathers logprobs, and builds cumulative ``RequestOutput`` objects. It never touches the KV
cache: when a stop string ends a sample it tells the engine, which finishes it in the scheduler.

Streaming and stop strings: while a sample runs, the last ``max(len(stop)) - 1`` characters are held
back (they might be the start of a stop string), so text a client has seen is never taken back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Optional

from vllm_engine.core.sched_output import ModelRunnerOutput, SampledLogprobs
from vllm_engine.engine.request import Request, RequestStatus
from vllm_engine.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from vllm_engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


@dataclass
class _Sample:
    """One of a request's n samples (one scheduler Request)."""

    index: int
    request: Request
    detokenizer: Any  # IncrementalDetokenizer or None (no tokenizer / detokenize=False)
    text: str = ""
    num_tokens_seen: int = 0
    logprobs: Optional[list[dict[int, Logprob]]] = None
    cumulative_logprob: Optional[float] = None
    finish_reason: Optional[str] = None
    stop_reason: Optional[int | str] = None
    # A stop string completed by a token before the last of a step that gave several (speculative
    # decoding): the sample's tokens end there.
    num_tokens_kept: Optional[int] = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class _RequestState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    params: SamplingParams
    samples: list[_Sample]
    metrics: RequestMetrics
    prompt_logprobs: Optional[list[Optional[dict[int, Logprob]]]] = None
    max_stop_len: int = 0
    stream: bool = True  # False: build a RequestOutput only when the request finishes (offline generate)
    # True when no per-token text work is needed (no detokenizer, no logprobs, no stop strings).
    tokens_only: bool = False
    error: Optional[str] = None  # what ended the request with finish_reason "error"

    @property
    def finished(self) -> bool:
        if len(self.samples) == 1:  # n = 1, the common case: no generator per request and step
            return self.samples[0].finished
        return all(s.finished for s in self.samples)


class OutputProcessor:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}
        self._sample_of: dict[str, tuple[_RequestState, _Sample]] = {}  # scheduler request id -> its sample
        self.num_generation_tokens_total = 0
        self.num_prompt_tokens_total = 0

    # ---- registration ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Optional[str], prompt_token_ids: list[int],
                    params: SamplingParams, samples: list[Request], arrival_time: float,
                    stream: bool = True) -> None:
        from vllm_engine.engine.detokenizer import IncrementalDetokenizer

        def detokenizer():
            if self.tokenizer is None or not params.detokenize:
                return None
            return IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params.skip_special_tokens,
                                          params.spaces_between_special_tokens)

        state = _RequestState(
            request_id=request_id, prompt=prompt, prompt_token_ids=prompt_token_ids, params=params,
            samples=[_Sample(i, r, detokenizer()) for i, r in enumerate(samples)],
            metrics=RequestMetrics(arrival_time=arrival_time),
            prompt_logprobs=[None] if params.prompt_logprobs is not None else None,
            max_stop_len=max((len(s) for s in params.stop), default=0),
            stream=stream,
        )
        state.tokens_only = (state.samples[0].detokenizer is None and params.logprobs is None
                             and not params.stop)
        for s in state.samples:
            if params.logprobs is not None:
                s.logprobs, s.cumulative_logprob = [], 0.0
            self._sample_of[s.request.request_id] = (state, s)
        self._states[request_id] = state

    def has_request(self, request_id: str) -> bool:
        return request_id in self._states

    def sample_request_ids(self, request_id: str) -> list[str]:
        state = self._states.get(request_id)
        return [s.request.request_id for s in state.samples] if state else []

    def remove(self, request_id: str) -> None:
        state = self._states.pop(request_id, None)
        if state is not None:
            for s in state.samples:
                self._sample_of.pop(s.request.request_id, None)

    # ---- one step ----------------------------------------------------------------------------------
    def process(self, updated: list[Request], runner_out: ModelRunnerOutput
                ) -> tuple[list[RequestOutput], list[str], list[str]]:
        """Returns (outputs of requests that progressed, scheduler ids of samples a stop string ended,
        scheduler ids of samples to end with an error).

        A fault in one request's own work (the runner's report in ``runner_out.failed``, or an exception
        here: detokenization, stop strings, logprobs) ends that whole request with finish_reason "error"
        and ``RequestOutput.error``; every other request is processed as usual.
        """
        now = time.time()
        touched: dict[str, _RequestState] = {}
        stopped_by_string: list[str] = []
        failed: list[str] = []
        for req_id, entries in runner_out.prompt_logprobs.items():
            pair = self._sample_of.get(req_id)
            if pair is not None and pair[0].prompt_logprobs is not None:
                state = pair[0]
                start = len(state.prompt_logprobs)
                ids = state.prompt_token_ids[start: start + len(entries)]
                state.prompt_logprobs.extend(self._logprob_dict(tok, e) for tok, e in zip(ids, entries))
        row_of: list[Optional[dict[str, int]]] = [None]  # built on first use: only requests with logprobs need it
        runner_failed = runner_out.failed
        for r in updated:
            pair = self._sample_of.get(r.request_id)
            if pair is None:
                continue
            state, sample = pair
            if sample.finished:
                continue
            if runner_failed and r.request_id in runner_failed:
                failed += self._fail(state, runner_failed[r.request_id])
                touched[state.request_id] = state
                continue
            try:
                if state.tokens_only:
                    # The common benchmark / token-id path, inline (it runs for every request of every
                    # step): no text work per token; offline generate builds outputs only when finished.
                    n = r.num_output_tokens
                    self.num_generation_tokens_total += n - sample.num_tokens_seen
                    if sample.num_tokens_seen == 0 and n:
                        self._first_token(state, r, now)
                    sample.num_tokens_seen = n
                    state.metrics.last_token_time = now
                    if r.is_finished():
                        sample.finish_reason, sample.stop_reason = r.get_finish_reason(), r.stop_reason
                    elif not state.stream:
                        continue
                elif self._process_sample(state, sample, r, runner_out, row_of, now):
                    stopped_by_string.append(r.request_id)
            except Exception as e:  # noqa: BLE001 - this request's fault: end it, keep the others
                logger.exception("request %s failed while processing its output", state.request_id)
                failed += self._fail(state, f"{type(e).__name__}: {e}")
            touched[state.request_id] = state
        outputs = []
        for state in touched.values():
            finished = state.finished
            if finished:
                state.metrics.finished_time = now
                self.remove(state.request_id)
            if finished or state.stream:
                outputs.append(self._make_output(state, finished))
        return outputs, stopped_by_string, failed

    @staticmethod
    def _fail(state: _RequestState, error: str) -> list[str]:
        """Ends every sample of the request with an error; returns the ids the scheduler must finish."""
        state.error = error
        ids = []
        for s in state.samples:
            if not s.finished:
                s.finish_reason, s.stop_reason = "error", None
                ids.append(s.request.request_id)
        return ids

    def _process_sample(self, state: _RequestState, sample: _Sample, r: Request, runner_out: ModelRunnerOutput,
                        row_of: list[Optional[dict[str, int]]], now: float) -> bool:
        """Takes in one sample's new tokens (text, logprobs, stop strings); True when a stop string ended it."""
        new_ids = r.output_token_ids[sample.num_tokens_seen:]
        sample.num_tokens_seen = r.num_output_tokens
        if new_ids:
            self.num_generation_tokens_total += len(new_ids)
            self._first_token(state, r, now)
            state.metrics.last_token_time = now
            if sample.logprobs is not None:
                if row_of[0] is None:
                    row_of[0] = {rid: i for i, rid in enumerate(runner_out.req_ids)}
                self._append_logprobs(sample, new_ids, runner_out, row_of[0].get(r.request_id))
        if self._update_text(state, sample, r, new_ids):
            return True
        if r.is_finished():
            sample.finish_reason = r.get_finish_reason()
            sample.stop_reason = r.stop_reason
        return False

    def _first_token(self, state: _RequestState, r: Request, now: float) -> None:
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
            state.metrics.first_scheduled_time = r.first_scheduled_time
            self.num_prompt_tokens_total += len(state.prompt_token_ids)

    def _update_text(self, state: _RequestState, sample: _Sample, r: Request, new_ids: list[int]) -> bool:
        """Detokenizes new tokens; True when a stop string ended the sample (text truncated there)."""
        if sample.detokenizer is None or not new_ids:
            return False
        params = state.params
        # A stop token's own text (EOS, stop_token_ids) is not part of the output unless asked for.
        if (r.status == RequestStatus.FINISHED_STOPPED and not params.include_stop_str_in_output
                and (r.stop_reason is not None or new_ids[-1] in r.eos_token_ids)):
            new_ids = new_ids[:-1]
            untexted = 1
        else:
            untexted = 0
        if not new_ids:
            return False
        if params.stop and len(new_ids) > 1:
            return self._update_text_per_token(state, sample, new_ids, untexted)
        prev_len = len(sample.text)
        sample.text += sample.detokenizer.append(new_ids)
        if not params.stop:
            return False
        return self._find_stop(state, sample, prev_len)

    def _update_text_per_token(self, state: _RequestState, sample: _Sample, new_ids: list[int],
                               untexted: int) -> bool:
        """Several new tokens (a step that verified proposals) and stop strings: the tokens are taken
        one at a time, so that a stop string completed by one of them ends the sample there, its
        later tokens (and their logprobs) dropped, as if they had come one step at a time.
        ``untexted``: tokens after ``new_ids`` that have no text (the stop token that ended it)."""
        for j, token in enumerate(new_ids):
            prev_len = len(sample.text)
            sample.text += sample.detokenizer.append([token])
            if self._find_stop(state, sample, prev_len):
                self._drop_last_tokens(sample, len(new_ids) - j - 1 + untexted)
                return True
        return False

    def _drop_last_tokens(self, sample: _Sample, n: int) -> None:
        tokens = sample.request.output_token_ids
        sample.num_tokens_kept = len(tokens) - n
        self.num_generation_tokens_total -= n
        if sample.logprobs is not None and n:
            for token, entry in zip(tokens[len(tokens) - n:], sample.logprobs[-n:]):
                if entry is not None:
                    sample.cumulative_logprob -= entry[token].logprob
            del sample.logprobs[-n:]

    @staticmethod
    def _find_stop(state: _RequestState, sample: _Sample, prev_len: int) -> bool:
        """True when a stop string occurs in the text from the last ``prev_len`` characters on (text
        truncated there, the sample finished)."""
        params = state.params
        search_from = max(0, prev_len - state.max_stop_len + 1)
        best: Optional[tuple[int, str]] = None
        for stop in params.stop:
            i = sample.text.find(stop, search_from)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return False
        i, stop = best
        sample.text = sample.text[: i + len(stop)] if params.include_stop_str_in_output else sample.text[:i]
        sample.finish_reason, sample.stop_reason = "stop", stop
        return True

    def _append_logprobs(self, sample: _Sample, new_ids: list[int], runner_out: ModelRunnerOutput,
                         row: Optional[int]) -> None:
        """The step's logprob entries, one per token it sampled, paired with the sample's newest tokens
        (the scheduler may have kept fewer tokens than the step sampled: those up to a stop)."""
        entries = runner_out.logprobs[row] if row is not None and row < len(runner_out.logprobs) else None
        if not entries:
            return
        n = min(len(new_ids), len(entries))
        for token, entry in zip(new_ids[len(new_ids) - n:], entries[:n]):
            sample.logprobs.append(self._logprob_dict(token, entry, sample.detokenizer))
            sample.cumulative_logprob += entry.sampled_logprob

    def _logprob_dict(self, token: int, e: Optional[SampledLogprobs], detok: Any = None) -> Optional[dict[int, Logprob]]:
        if e is None:
            return None
        decode = detok.decode_token if detok is not None else self._decode_one
        d = {token: Logprob(e.sampled_logprob, e.sampled_rank, decode(token))}
        for rank, (tid, lp) in enumerate(zip(e.top_token_ids, e.top_logprobs), start=1):
            if tid not in d:
                d[tid] = Logprob(lp, rank, decode(tid))
        return d

    def _decode_one(self, token_id: int) -> Optional[str]:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id])

    def _make_output(self, state: _RequestState, finished: bool) -> RequestOutput:
        completions = []
        for s in state.samples:
            text = s.text
            if not s.finished and state.max_stop_len > 1 and not state.params.include_stop_str_in_output:
                text = text[: max(0, len(text) - state.max_stop_len + 1)]
            token_ids = s.request.output_token_ids
            completions.append(CompletionOutput(
                index=s.index, text=text,
                token_ids=list(token_ids if s.num_tokens_kept is None else token_ids[: s.num_tokens_kept]),
                cumulative_logprob=s.cumulative_logprob,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason,
            ))
        first = state.samples[0].request
        return RequestOutput(
            request_id=state.request_id, prompt=state.prompt, prompt_token_ids=state.prompt_token_ids,
            outputs=completions, finished=finished,
            prompt_logprobs=list(state.prompt_logprobs) if state.prompt_logprobs is not None else None,
            num_cached_tokens=max(0, first.num_cached_tokens),
            metrics=state.metrics, error=state.error,
        )
