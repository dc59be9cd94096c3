"""The OpenAPI document (/openapi.json) tells the truth: the request bodies the handlers parse
themselves, every status code with OpenAI's error body (never FastAPI's 422), the server-sent
events and Prometheus text; and real responses validate against the response models (which
forbid undocumented keys)."""

from __future__ import annotations

import json

import httpx
import pytest

from vllm_engine.serving.protocol import (
    ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse, CompletionRequest,
    CompletionResponse, CompletionStreamResponse, DetokenizeResponse, ErrorResponse, ModelList, TokenizeResponse,
    VersionResponse)

ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
USER = [{"role": "user", "content": "Hi!"}]


@pytest.fixture(scope="module")
def doc(server) -> dict:
    r = httpx.get(f"{server}/openapi.json")
    assert r.status_code == 200
    return r.json()


def _operations(doc: dict):
    for path, operations in doc["paths"].items():
        for method, op in operations.items():
            yield f"{method.upper()} {path}", op


def test_the_document_is_valid_open_api_3_1(doc):
    from openapi_spec_validator import validate

    assert doc["openapi"].startswith("3.1")
    validate(doc)


def test_the_generation_endpoints_publish_their_request_bodies(doc):
    schemas = doc["components"]["schemas"]
    for path, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest)):
        body = doc["paths"][path]["post"]["requestBody"]
        assert body["required"] is True
        assert body["content"] == {"application/json": {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}
        assert set(schemas[model.__name__]["properties"]) == set(model.model_fields)
    assert schemas["CompletionRequest"]["required"] == ["prompt"]
    assert schemas["ChatCompletionRequest"]["required"] == ["messages"]
    assert "ChatMessage" in schemas and "TextPart" in schemas  # what the bodies reference is there too


def test_errors_are_documented_in_openais_shape_and_never_as_422(doc):
    assert "HTTPValidationError" not in json.dumps(doc)
    for label, op in _operations(doc):
        responses = op["responses"]
        assert "422" not in responses, label
        for status, response in responses.items():
            if status != "200":
                assert response["content"] == {"application/json": {"schema": ERROR_REF}}, (label, status)
        expected = set()
        if label.startswith("POST"):
            expected |= {"400", "404"}  # bad parameters; an unknown model
        if label not in ("GET /health", "GET /metrics"):
            expected.add("401")  # these two stay open when the server has an API key
        if "completions" in label or label == "GET /health":
            expected.add("503")  # a full queue, a dead engine
        if "completions" in label:
            expected.add("408")  # past --request-timeout
        assert set(responses) == {"200"} | expected, label


def test_each_200_documents_its_body_and_content_type(doc):
    ok = {label: op["responses"]["200"] for label, op in _operations(doc)}
    for label, model in (("POST /v1/completions", CompletionResponse),
                         ("POST /v1/chat/completions", ChatCompletionResponse),
                         ("GET /v1/models", ModelList), ("POST /tokenize", TokenizeResponse),
                         ("POST /detokenize", DetokenizeResponse), ("GET /version", VersionResponse)):
        assert ok[label]["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{model.__name__}"}
    for label, chunk in (("POST /v1/completions", CompletionStreamResponse),
                         ("POST /v1/chat/completions", ChatCompletionStreamResponse)):
        event = ok[label]["content"]["text/event-stream"]["schema"]
        done, payload = event["properties"]["data"]["anyOf"]
        assert done == {"const": "[DONE]"}
        assert payload["contentSchema"]["anyOf"] == [{"$ref": f"#/components/schemas/{chunk.__name__}"}, ERROR_REF]
        assert chunk.__name__ in doc["components"]["schemas"]
    assert set(ok["GET /metrics"]["content"]) == {"text/plain"}
    assert "content" not in ok["GET /health"]  # an empty body
    assert "securitySchemes" not in doc["components"]  # no API key on this server


def _sse(r: httpx.Response) -> list[str]:
    events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    return [e[len("data: "):] for e in events[:-1]]


def test_real_responses_validate_against_the_response_models(server):
    post = lambda path, body: httpx.post(f"{server}{path}", json=body, timeout=60)  # noqa: E731
    base = {"model": "tiny", "max_tokens": 4, "ignore_eos": True}
    CompletionResponse.model_validate(post("/v1/completions", {**base, "prompt": ["Hi", "Yo"], "n": 2, "logprobs": 2,
                                                                "echo": True}).json())
    ChatCompletionResponse.model_validate(post("/v1/chat/completions", {**base, "messages": USER, "logprobs": True,
                                                                         "top_logprobs": 2}).json())
    for path, body, chunk, samples in (
            ("/v1/completions", {**base, "prompt": [[5, 6], [7]], "n": 2, "logprobs": 1, "echo": True},
             CompletionStreamResponse, 4),
            ("/v1/chat/completions", {**base, "messages": USER, "n": 2, "logprobs": True, "top_logprobs": 1},
             ChatCompletionStreamResponse, 2)):
        with httpx.stream("POST", f"{server}{path}", json={**body, "stream": True,
                                                           "stream_options": {"include_usage": True}}) as r:
            chunks = [chunk.model_validate_json(e) for e in _sse(r)]
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4 * samples
    ModelList.model_validate(httpx.get(f"{server}/v1/models").json())
    VersionResponse.model_validate(httpx.get(f"{server}/version").json())
    TokenizeResponse.model_validate(post("/tokenize", {"prompt": "Hello"}).json())
    TokenizeResponse.model_validate(post("/tokenize", {"messages": USER}).json())
    DetokenizeResponse.model_validate(post("/detokenize", {"tokens": [5, 6, 7]}).json())
    health = httpx.get(f"{server}/health")
    assert health.status_code == 200 and health.content == b""
    for r in (post("/v1/completions", {"prompt": "Hi", "temperature": -1}),
              post("/tokenize", {"model": "gpt-17", "prompt": "Hi"}), post("/v1/chat/completions", {"messages": "hi"})):
        assert r.status_code in (400, 404)
        ErrorResponse.model_validate(r.json())
