"""The OpenAI-compatible server: ``create_api_server(model=..., **engine_kwargs)`` returns the FastAPI app."""

from vllm_engine.serving.api_server import create_api_server, create_app

__all__ = ["create_api_server", "create_app"]
