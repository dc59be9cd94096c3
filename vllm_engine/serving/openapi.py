"""The OpenAPI document (``GET /openapi.json``): what every endpoint takes and really returns.

FastAPI derives most of it from the routes and the ``responses=`` of each; ``install_openapi`` adds
what FastAPI cannot see:

- the request bodies of /v1/completions and /v1/chat/completions: their handlers take the raw
  request (its receive channel feeds the client-disconnect watcher) and parse the body themselves,
  so the models are registered here and referenced from the operations' ``openapi_extra``;
- the chunk models of the ``text/event-stream`` variants. Open API 3.1 cannot describe events (3.2
  adds ``itemSchema``); the ``schema`` here describes one event, as schemathesis and other tools
  read it for event streams: its ``data`` is ``[DONE]``, or a JSON chunk or error;
- bearer auth, when the server has an API key;

and takes out what this server never sends: FastAPI's 422 ``HTTPValidationError`` (every invalid
request is a 400 with OpenAI's error body).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.encoders import jsonable_encoder
from fastapi.openapi.models import Schema
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from vllm_engine.serving.protocol import (
    ChatCompletionRequest, ChatCompletionStreamResponse, CompletionRequest, CompletionStreamResponse, ErrorResponse)

REF = "#/components/schemas/{model}"
# Models only the hand-written parts of the document reference (FastAPI registers the others).
EXTRA_MODELS: tuple[type[BaseModel], ...] = (
    CompletionRequest, ChatCompletionRequest, CompletionStreamResponse, ChatCompletionStreamResponse, ErrorResponse)
OPEN_PATHS = ("/health", "/metrics")  # never behind the API key
SECURITY_SCHEME = "APIKey"


def ref(model: type[BaseModel]) -> dict:
    return {"$ref": REF.format(model=model.__name__)}


def error(description: str) -> dict:
    """A documented error response: OpenAI's error body."""
    return {"model": ErrorResponse, "description": description}


BAD_REQUEST = {400: error("Invalid request: a parameter out of range (`param` names it), malformed JSON, a wrong "
                          "type, or a prompt that does not fit the context (code `context_length_exceeded`).")}
UNAUTHORIZED = {401: {**error("Missing or wrong API key (only when the server runs with --api-key); "
                              "send `Authorization: Bearer KEY`."),
                      "headers": {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}}}}
MODEL_NOT_FOUND = {404: error("`model` is not the served model (code `model_not_found`).")}
TIMEOUT = {408: error("The request outlived the server's `--request-timeout` (code `request_timeout`); it was "
                      "aborted.")}
UNAVAILABLE = {503: {**error("Too many requests are waiting (`--max-waiting-requests`), or the engine died "
                             "(code `engine_dead`)."),
                     "headers": {"Retry-After": {"description": "Seconds to wait (only when requests wait).",
                                                 "schema": {"type": "integer"}}}}}


def json_body(model: type[BaseModel]) -> dict:
    """``openapi_extra`` of an operation whose handler parses a ``model`` JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref(model)}}}}


def event_stream(chunk: type[BaseModel]) -> dict:
    """The ``text/event-stream`` content: each event's ``data`` is a JSON ``chunk``, an error, or ``[DONE]``."""
    return {"schema": {
        "type": "object",
        "description": f"One server-sent event (`data: <json>`): a {chunk.__name__}; an error after the 200 was "
                       "sent is an event with an ErrorResponse; the last event is `data: [DONE]`.",
        "required": ["data"],
        "properties": {"data": {"anyOf": [
            {"const": "[DONE]"},
            {"type": "string", "contentMediaType": "application/json",
             "contentSchema": {"anyOf": [ref(chunk), ref(ErrorResponse)]}},
        ]}},
    }}


def generation_responses(response: type[BaseModel], chunk: type[BaseModel]) -> dict:
    """``responses=`` of a generation endpoint: JSON, or server-sent events with ``"stream": true``."""
    ok = {"model": response, "description": f"A {response.__name__}; with `\"stream\": true`, server-sent events.",
          "content": {"text/event-stream": event_stream(chunk)}}
    return {200: ok, **BAD_REQUEST, **UNAUTHORIZED, **MODEL_NOT_FOUND, **TIMEOUT, **UNAVAILABLE}


def add_component_schemas(components: dict, model: type[BaseModel]) -> None:
    """Registers ``model`` and the models it uses under components/schemas, written as FastAPI writes
    the ones it registers (no null-valued keys), so a model both register comes out the same."""
    schema = model.model_json_schema(ref_template=REF)
    defs = schema.pop("$defs", {})
    for name, s in {**defs, model.__name__: schema}.items():
        s = jsonable_encoder(Schema(**s), by_alias=True, exclude_none=True)
        if components.setdefault(name, s) != s:
            raise RuntimeError(f"two different schemas named {name!r} in the OpenAPI document")


def _drop_validation_errors(doc: dict) -> None:
    """FastAPI documents a 422 for every operation with a body; this server answers those with a 400."""
    for operations in doc.get("paths", {}).values():
        for op in operations.values():
            op.get("responses", {}).pop("422", None)
    schemas = doc.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


def _require_bearer(doc: dict) -> None:
    doc["components"]["securitySchemes"] = {SECURITY_SCHEME: {
        "type": "http", "scheme": "bearer", "description": "The server's --api-key."}}
    for path, operations in doc.get("paths", {}).items():
        if path not in OPEN_PATHS:
            for op in operations.values():
                op["security"] = [{SECURITY_SCHEME: []}]


def install_openapi(app: FastAPI, api_key: bool) -> None:
    """Makes ``app.openapi()`` (served at /openapi.json) the complete document, built once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = doc.setdefault("components", {}).setdefault("schemas", {})
            for model in EXTRA_MODELS:
                add_component_schemas(components, model)
            _drop_validation_errors(doc)
            if api_key:
                _require_bearer(doc)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

