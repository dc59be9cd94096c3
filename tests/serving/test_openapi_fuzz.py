"""Fuzzing the HTTP API from its own OpenAPI document (schemathesis, in process over ASGI).

For every operation, requests that fit the document (positive) and requests that break it
(negative: wrong types, missing fields, out-of-schema values) go to the app serving the tiny random
Llama. Every response must be documented: no 5xx, a documented status code and content type, a body
(JSON, or each server-sent event) matching the schema. Afterwards the engine must be idle: nothing
running or waiting, every KV block free, and the scheduler's integrity check passing.

Three passes per operation that takes input:

- ``negative``: bodies that break the document (wrong types, missing fields, not an object);
- ``positive``: bodies that fit it, values drawn from anywhere (most break a range: validation);
- ``valid``: positive bodies with every sampling field mapped into its valid range (``make_valid``),
  so that generation, streaming, logprobs, echo and n > 1 run and their responses are checked.

Generation is the cost: in every pass, valid ``max_tokens`` / ``max_completion_tokens`` / ``n`` are
mapped into small ranges (``bound``; negative bodies too: they may break the schema in a way the
server accepts, e.g. ``"n": "2"``); values the server must reject (0, negative, beyond the context or
the ``n`` limit) are sent as drawn. The run is seeded (reproducible in CI);
``VLLM_ENGINE_FUZZ_SEED`` and ``VLLM_ENGINE_FUZZ_SCALE`` (a factor on the example counts) explore
further.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import hypothesis
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance, response_headers_conformance, response_schema_conformance, status_code_conformance)

from vllm_engine import Engine
from vllm_engine.engine.async_engine import AsyncEngine
from vllm_engine.serving.api_server import create_app

from .conftest import ENGINE_KWARGS

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
SEED = int(os.environ.get("VLLM_ENGINE_FUZZ_SEED", "0"))
SCALE = float(os.environ.get("VLLM_ENGINE_FUZZ_SCALE", "1"))
# Examples per pass of each operation that takes input; the others have a single request to draw,
# which Hypothesis sends once.
EXAMPLES = {
    "POST /v1/completions": 100,
    "POST /v1/chat/completions": 100,
    "POST /tokenize": 55,
    "POST /detokenize": 55,
}
OPERATIONS = sorted([*EXAMPLES, "GET /health", "GET /version", "GET /v1/models", "GET /metrics"])
MIN_REQUESTS = 780  # across all operations and passes
MAX_MODEL_LEN = ENGINE_KWARGS["max_model_len"]
# Valid values above the bound are mapped into [1, bound]; the limit is where the server rejects them.
BOUNDS = {"max_tokens": (4, MAX_MODEL_LEN), "max_completion_tokens": (4, MAX_MODEL_LEN), "n": (2, 128)}


def bound(body: Any) -> Any:
    """Keeps valid generation lengths and sample counts small (the run's cost); invalid ones stay."""
    if isinstance(body, dict):
        for key, (cap, limit) in BOUNDS.items():
            v = body.get(key)
            if _is_int(v) and cap < v <= limit:
                body[key] = 1 + v % cap
    return body


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _clamp(lo: float, hi: float):
    return lambda v, vocab: min(hi, max(lo, v)) if _is_number(v) else v


def _token_ids(v: Any, vocab: int) -> Any:
    if isinstance(v, list):
        return [_token_ids(x, vocab) for x in v]
    return v % vocab if _is_int(v) else v


def _prompt(v: Any, vocab: int) -> Any:
    """Token ids into the vocabulary, and no empty prompt (a string, a list, or one in a batch)."""
    if isinstance(v, str):
        return v or "Hello"
    if not isinstance(v, list):
        return v
    if not v:
        return [1]
    return _token_ids(v, vocab) if _is_int(v[0]) else [_prompt(x, vocab) for x in v]


# Field -> its value mapped into what the server accepts (clamped numbers, token ids in the
# vocabulary); None: the field is dropped (it has no valid value worth drawing).
VALID = {
    "model": lambda v, vocab: "tiny",
    "n": _clamp(1, 2), "max_tokens": _clamp(1, 4), "max_completion_tokens": _clamp(1, 4), "min_tokens": _clamp(0, 1),
    "temperature": _clamp(0.0, 2.0), "top_p": _clamp(0.05, 1.0), "top_k": _clamp(-1, 20), "min_p": _clamp(0.0, 1.0),
    "presence_penalty": _clamp(-2.0, 2.0), "frequency_penalty": _clamp(-2.0, 2.0),
    "repetition_penalty": _clamp(0.5, 2.0), "seed": _clamp(0, 2**32),
    "logprobs": _clamp(0, 5), "top_logprobs": _clamp(0, 5),
    "logit_bias": lambda v, vocab: ({str(i % vocab): min(100.0, max(-100.0, b)) for i, b in enumerate(v.values())}
                                    if isinstance(v, dict) else v),
    "stop_token_ids": _token_ids, "prompt": _prompt, "tokens": _token_ids,
    "continue_final_message": lambda v, vocab: False,
    "best_of": None, "suffix": None, "chat_template": None,
}


def make_valid(body: Any, vocab: int) -> Any:
    """A positive body with every field the server range-checks mapped into its valid range; half of
    the generation requests stream (the drawn bodies seldom ask to)."""
    if isinstance(body, dict):
        for key, fix in VALID.items():
            if key in body:
                if fix is None:
                    del body[key]
                else:
                    body[key] = fix(body[key], vocab)
        if body.get("top_logprobs") is not None and isinstance(body.get("logprobs", False), bool):
            body["logprobs"] = True  # chat: top_logprobs needs logprobs
        body.setdefault("stream", len(body) % 2 == 0)
    return body


PASSES = {  # name: (generation mode, what is done to each drawn body)
    "negative": (GenerationMode.NEGATIVE, lambda body, vocab: bound(body)),
    "positive": (GenerationMode.POSITIVE, lambda body, vocab: bound(body)),
    "valid": (GenerationMode.POSITIVE, make_valid),
}


def _passes(label: str) -> list[str]:
    """Operations without input have one request to send."""
    return list(PASSES) if label in EXAMPLES else ["positive"]


def _fuzz(operation: Any, label: str, vocab: int, sent: dict[str, int]) -> None:
    """Runs every pass over ``operation``, counting the requests in ``sent[label]``."""
    sent[label] = 0
    for name in _passes(label):
        mode, prepare = PASSES[name]

        @hypothesis.seed(SEED)
        @settings(max_examples=max(1, round(EXAMPLES.get(label, 1) * SCALE)), deadline=None, database=None,
                  phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy(generation_mode=mode))
        def fuzz(case) -> None:
            case.body = prepare(case.body, vocab)
            sent[label] += 1
            case.call_and_validate(checks=CHECKS)

        fuzz()


def _assert_idle(engine: Engine, async_engine: AsyncEngine, timeout: float = 30.0) -> None:
    """Nothing running or waiting, every KV block free, the scheduler's books consistent (aborts
    of cut streams reach the loop thread asynchronously: wait for them)."""
    deadline = time.monotonic() + timeout
    stats = asyncio.run(async_engine.get_stats())
    while (stats.num_running or stats.num_waiting or async_engine.num_in_flight) and time.monotonic() < deadline:
        time.sleep(0.05)
        stats = asyncio.run(async_engine.get_stats())
    assert stats.num_running == stats.num_waiting == 0 and async_engine.num_in_flight == 0
    assert engine.num_running == engine.num_waiting == 0 and not engine.has_unfinished_requests()
    assert stats.num_free_blocks == stats.num_total_blocks
    engine.scheduler.check_integrity()  # the loop thread is idle: it sleeps until a request comes


@pytest.fixture(scope="module")
def fuzz_target(tiny_dir):
    engine = Engine(model=str(tiny_dir), served_model_name="tiny", **ENGINE_KWARGS)
    async_engine = AsyncEngine(engine)
    app = create_app(async_engine)
    yield engine, async_engine, schemathesis.openapi.from_asgi("/openapi.json", app)
    async_engine.shutdown()


def test_every_operation_is_fuzzed(fuzz_target):
    _, _, schema = fuzz_target
    assert sorted(result.ok().label for result in schema.get_all_operations()) == OPERATIONS


def test_fuzz_every_operation(fuzz_target, subtests):
    engine, async_engine, schema = fuzz_target
    sent: dict[str, int] = {}
    for label in OPERATIONS:
        with subtests.test(msg=label):
            method, path = label.split(" ", 1)
            _fuzz(schema[path][method], label, engine.model_config.vocab_size, sent)
            _assert_idle(engine, async_engine)
    assert sum(sent.values()) >= MIN_REQUESTS * min(SCALE, 1), sent
