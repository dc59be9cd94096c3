"""Compiling constraints (cached by their text, on a background thread) and matching them per request.

The engine submits a request's constraint when the request arrives (``StructuredOutputManager.submit``):
the compile runs on one of the manager's two threads, and the scheduler leaves the request waiting until its
future is done, so nothing on the engine loop waits for a compile. The model runner then builds a
``RequestGrammar`` (a matcher) per request from the cached result, advances it with the tokens the
request samples, and fills its row of the step's token bitmask.

Why xgrammar: on the SmolLM2 tokenizer (49,152 tokens) and the 30 test schemas, a mask takes 0.9 us
p50 / 13 us p99 (llguidance: 9.2 / 437 us); a cold compile 5-10 ms (llguidance compiles lazily,
0.3 ms, paying later in the masks). ``tests/benchmarks/grammar_bench.py`` measures both.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Iterable, Optional

import numpy as np

from vllm_engine.sampling_params import SamplingParamsError, StructuredOutputsParams
from vllm_engine.structured_output.bitmask import bitmask_width
from vllm_engine.structured_output.schema_support import unsupported_schema_feature

logger = logging.getLogger(__name__)

# xgrammar's C++ errors start with "[time] /path/file.cc:line: ": the client needs only the rest.
_CPP_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


def _import_xgrammar() -> Any:
    try:
        import xgrammar
    except ImportError as e:
        raise ValueError("structured outputs need the xgrammar package: pip install 'vllm-engine[structured]'.") from e
    return xgrammar


def choice_grammar(choices: list[str]) -> str:
    """EBNF whose only sentences are ``choices`` (JSON string escapes are xgrammar's literal escapes)."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


class StructuredOutputManager:
    """Compiles ``StructuredOutputsParams`` for one tokenizer; thread-safe.

    ``tokenizer``: a HF tokenizer; ``vocab_size``: the model's (the logits' width, which may exceed
    the tokenizer's: the masks cover ``grammar_vocab_size`` tokens); ``stop_token_ids``: what ends a
    finished constraint (the model's EOS ids). Compiled grammars are kept by
    ``StructuredOutputsParams.key``: the most recent, up to ``cache_size`` of them and
    ``cache_bytes`` of their memory (a grammar's token-mask cache grows with the vocabulary: ~40 KB
    for the test schemas on SmolLM2's, 2 MB for ``[a-z]{0,500}``).
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: Iterable[int], cache_size: int = 1024,
                 cache_bytes: int = 512 << 20) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(set(stop_token_ids))
        # The grammars' vocabulary: the tokenizer's tokens. A model's padding past them (the logits'
        # extra width) is left out of the masks, which stop there (apply_token_bitmask blocks the rest):
        # given to xgrammar as tokens that never match, it makes every mask inside a string ~25x
        # slower (100k padding tokens: 149 instead of 6 us on the CI CPU).
        self.grammar_vocab_size = max(min(vocab_size, tokenizer_vocab_size(tokenizer) or vocab_size),
                                      max(self.stop_token_ids, default=-1) + 1)
        self.bitmask_width = bitmask_width(self.grammar_vocab_size)
        self.stop_row = stop_token_row(self.stop_token_ids, self.bitmask_width)  # a terminated grammar's mask
        self.cache_size, self.cache_bytes = cache_size, cache_bytes
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._sizes: dict[tuple[str, str], int] = {}  # memory of the compiled ones in the cache
        self._lock = threading.Lock()  # the cache
        # Two threads: one slow compile (a schema of thousands of properties takes seconds) does not hold
        # up every other new grammar. xgrammar's compiler is safe to share between threads.
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="vllm-engine-grammar")
        # Built here, on the caller's thread: reading the vocabulary from a tokenizer another thread is
        # using is not safe (HF fast tokenizers). Without xgrammar, a compile raises the install hint.
        self._compiler: Any = None
        self._compiler_error: Optional[Exception] = None
        try:
            self._compiler = self._make_compiler()
        except Exception as e:  # noqa: BLE001 - reported by every compile (400), the server still starts
            logger.warning("structured outputs unavailable: %s", e)
            self._compiler_error = e

    @classmethod
    def from_model_config(cls, model_config: Any) -> "StructuredOutputManager":
        """A manager for a worker process that has no engine beside it (loads the tokenizer itself)."""
        from vllm_engine.model_loader.tokenizer import get_eos_token_ids, get_tokenizer

        tokenizer = get_tokenizer(model_config)
        eos = get_eos_token_ids(tokenizer, model_config.hf_config, dict(model_config.generation_config))
        return cls(tokenizer, model_config.vocab_size, eos)

    # ---- compiling ---------------------------------------------------------------------------------
    def submit(self, params: StructuredOutputsParams) -> Future:
        """The compile of ``params`` (started now, or the cached one): a Future of the compiled grammar,
        whose exception is a ``SamplingParamsError`` naming ``structured_outputs.<field>``."""
        key = params.key
        with self._lock:
            fut = self._cache.get(key)
            if fut is not None:
                self._cache.move_to_end(key)
                return fut
            fut = self._pool.submit(self._compile, key)
            self._cache[key] = fut
            self._evict()
        return fut

    def _evict(self) -> None:
        """Drops the least recently used grammars over the count or byte budget (never the newest)."""
        cache, sizes = self._cache, self._sizes
        while len(cache) > 1 and (len(cache) > self.cache_size or sum(sizes.values()) > self.cache_bytes):
            key, _ = cache.popitem(last=False)
            sizes.pop(key, None)

    def compile(self, params: StructuredOutputsParams) -> Any:
        """The compiled grammar (waits for the compile). Raises SamplingParamsError for a bad constraint."""
        return self.submit(params).result()

    def _compile(self, key: tuple[str, str]) -> Any:
        compiled = self._compile_uncached(key)
        with self._lock:  # counted before the Future completes: its waiters see the cache within budget
            if key in self._cache:
                self._sizes[key] = compiled.memory_size_bytes
                self._evict()
        return compiled

    def _compile_uncached(self, key: tuple[str, str]) -> Any:
        kind, text = key
        compiler = self._get_compiler()
        if kind == "json":
            feature = unsupported_schema_feature(json.loads(text))
            if feature is not None:
                raise SamplingParamsError("structured_outputs.json", feature)
        try:
            if kind == "json":
                return compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "json_object":
                return compiler.compile_json_schema('{"type": "object", "additionalProperties": true}',
                                                    any_whitespace=False)
            if kind == "regex":
                return compiler.compile_regex(text)
            if kind == "choice":
                return compiler.compile_grammar(choice_grammar(json.loads(text)))
            return compiler.compile_grammar(text)
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError for every bad input
            message = _CPP_PREFIX.sub("", str(e).strip()).strip() or type(e).__name__
            raise SamplingParamsError(f"structured_outputs.{kind}", f"cannot be compiled: {message}") from None

    def _get_compiler(self) -> Any:
        err = self._compiler_error
        if err is not None:
            raise err if isinstance(err, ValueError) else ValueError(f"structured outputs are unavailable: {err}")
        return self._compiler

    def _make_compiler(self) -> Any:
        xgr = _import_xgrammar()
        info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.grammar_vocab_size,
                                                  stop_token_ids=self.stop_token_ids)
        return xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)

    # ---- matching ----------------------------------------------------------------------------------
    def new_grammar(self, params: StructuredOutputsParams) -> "RequestGrammar":
        """A fresh matcher for one request (the compile is normally done by now: a cache hit)."""
        xgr = _import_xgrammar()
        return RequestGrammar(xgr.GrammarMatcher(self.compile(params)), self.stop_token_ids, self.stop_row)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class RequestGrammar:
    """One request's constraint: a matcher fed with the request's output tokens as they become known.

    The model runner calls ``advance(output_token_ids)`` (the whole list: the grammar remembers how
    many it has taken) before ``fill_bitmask``. Once the grammar has accepted a stop token it is
    terminated (``is_terminated``): its mask then allows only the stop tokens (``stop_row``; a request
    that ignores EOS runs on until max_tokens), and later tokens are not fed to it.
    """

    def __init__(self, matcher: Any, stop_token_ids: list[int], stop_row: np.ndarray) -> None:
        self.matcher = matcher
        self.stop_token_ids = stop_token_ids
        self.stop_row = stop_row  # [W] int32: the mask of a terminated grammar
        self._stops = frozenset(stop_token_ids)
        self.num_accepted = 0  # output tokens taken in so far
        self.is_terminated = False  # a stop token was taken in (kept here: no call into xgrammar to ask)
        self.rejected: Optional[int] = None  # a token the grammar refused (a bug elsewhere: the mask allows none)

    def advance(self, output_token_ids: list[int]) -> None:
        """Feeds the tokens after ``num_accepted`` (all must be real ids, no placeholders)."""
        start = self.num_accepted
        if start == len(output_token_ids):
            return
        self.num_accepted = len(output_token_ids)
        matcher = self.matcher
        for token in output_token_ids[start:]:
            if self.is_terminated:
                return
            if not matcher.accept_token(token):
                self._refused(token, start)
            elif token in self._stops:
                self.is_terminated = matcher.is_terminated()

    def _refused(self, token: int, position: int) -> None:
        if self.rejected is None:
            self.rejected = token
            logger.warning("grammar refused token %d (output so far: %d tokens)", token, position)

    def fill_draft_bitmasks(self, draft_token_ids: list[int], bitmask: np.ndarray, row: int) -> None:
        """For speculative decoding: rows ``row .. row + len(draft_token_ids)`` get the masks after
        accepting ``draft_token_ids[:j]`` (j = 0 .. k), so each proposed token, and the bonus token
        after them, can be checked against the grammar; the grammar's state is left as it was. From
        the first draft token the grammar refuses on, the rows repeat the mask of that position."""
        matcher, taken, refused = self.matcher, 0, False
        for j, token in enumerate(draft_token_ids):
            self.fill_bitmask(bitmask, row + j)
            if not refused and not matcher.is_terminated() and matcher.accept_token(token):
                taken += 1
            else:
                refused = True
        self.fill_bitmask(bitmask, row + len(draft_token_ids))
        if taken:
            matcher.rollback(taken)

    def fill_bitmask(self, bitmask: np.ndarray, row: int) -> None:
        """Writes the allowed next tokens into ``bitmask[row]`` (an int32 array [R, W]), for the
        matcher's state as it is (proposals taken in or not)."""
        if self.matcher.is_terminated():
            bitmask[row] = self.stop_row
        else:
            self.matcher.fill_next_token_bitmask(bitmask, row)


class BatchFiller:
    """One step of many grammars, split into parts of consecutive rows: the calling thread takes in
    each part's new tokens (one call into xgrammar per token), writes its terminated grammars' rows
    (the stop-token row, one array assignment), and hands its live grammars' masks to xgrammar in
    one call, on a worker thread while it goes on to the next part (xgrammar releases the GIL; the
    last part is filled on the calling thread). Gives the same rows as ``advance`` + ``fill_bitmask``
    on each grammar.

    Threads of our own, kept: xgrammar's batch matcher would start its threads afresh on every call
    (on the H200 machine's host 150-500 us a call with its default count, more than 64 masks take on
    one thread). ``max_parts``: at most this many parts (default: a quarter of the CPUs this process
    may run on, 1 to 4); ``rows_per_part``: the fewest rows that make a part of their own.
    """

    def __init__(self, max_parts: Optional[int] = None, rows_per_part: int = 16) -> None:
        if max_parts is None:
            max_parts = min(4, max(1, len(os.sched_getaffinity(0)) // 4))
        self.max_parts, self.rows_per_part = max_parts, rows_per_part
        xgr = _import_xgrammar()
        self._batches = [xgr.BatchGrammarMatcher(1) for _ in range(max_parts)]  # one a part: no sharing
        self._pool: Optional[ThreadPoolExecutor] = None  # max_parts - 1 workers, made on first use

    def fill(self, grammars: list[RequestGrammar], outputs: list[list[int]], bitmask: np.ndarray) -> None:
        """``grammars[k]`` takes the new tokens of ``outputs[k]`` and fills ``bitmask[k]`` (int32 [R, W],
        R >= len(grammars); the grammars share one stop-token row, as those of one manager do)."""
        n = len(grammars)
        parts = max(1, min(self.max_parts, n // self.rows_per_part))
        futures: list[Future] = []
        try:
            for p in range(parts):
                live, rows = self._take_tokens(grammars, outputs, bitmask, n * p // parts, n * (p + 1) // parts)
                if not live:
                    continue
                if p < parts - 1:
                    futures.append(self._workers().submit(self._batches[p].batch_fill_next_token_bitmask,
                                                          live, bitmask, rows))
                else:
                    self._batches[p].batch_fill_next_token_bitmask(live, bitmask, rows)
        finally:
            wait(futures)  # no worker writes into bitmask after this returns or raises
        for f in futures:
            f.result()

    @staticmethod
    def _take_tokens(grammars: list[RequestGrammar], outputs: list[list[int]], bitmask: np.ndarray, lo: int,
                     hi: int) -> tuple[list[Any], list[int]]:
        """Rows ``lo:hi``: advances the grammars and writes the terminated ones' rows; returns the live
        matchers and their rows."""
        live, rows, done = [], [], []
        for k in range(lo, hi):
            g, out = grammars[k], outputs[k]
            if len(out) != g.num_accepted:
                g.advance(out)
            if g.is_terminated:
                done.append(k)
            else:
                live.append(g.matcher)
                rows.append(k)
        if done:
            bitmask[done] = grammars[done[0]].stop_row
        return live, rows

    def _workers(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.max_parts - 1, thread_name_prefix="vllm-engine-grammar-fill")
        return self._pool


def tokenizer_vocab_size(tokenizer: Any) -> Optional[int]:
    """How many token ids ``tokenizer`` has (the highest id + 1; None when it cannot say)."""
    try:
        vocab = tokenizer.get_vocab()
        return max(len(vocab), max(vocab.values()) + 1) if vocab else None
    except Exception:  # noqa: BLE001 - not a HF tokenizer: the model's vocabulary size stands
        return None


def stop_token_row(stop_token_ids: Iterable[int], width: int) -> np.ndarray:
    """The bitmask row [width] int32 that allows exactly ``stop_token_ids``."""
    bits = np.zeros(width * 32, dtype=np.uint8)
    bits[list(stop_token_ids)] = 1
    return np.packbits(bits, bitorder="little").view(np.int32).copy()
