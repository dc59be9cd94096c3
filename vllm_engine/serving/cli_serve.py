"""``vllm-engine serve``: the server's command-line flags and the function that runs it.

``cli.py`` calls ``add_serve_args(parser)`` and ``run_serve(args)``; ``python -m
vllm_engine.serving.cli_serve ...`` does the same on its own. Every engine flag comes from
``EngineArgs.add_cli_args``; the server adds MODEL (positional, optional), --host, --port,
--api-key, --chat-template, --trust-request-chat-template, --request-timeout, --data-parallel-size
and --log-level.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Optional

from vllm_engine import envs
from vllm_engine.config import EngineArgs

logger = logging.getLogger("vllm_engine.serving")


def add_serve_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                        help="Model to serve (HF directory, GGUF file, hub id); default: the built-in "
                             "SmolLM2-135M-Instruct. Same as --model.")
    parser.add_argument("--host", default="127.0.0.1", help="Address to listen on (0.0.0.0: every interface).")
    parser.add_argument("--port", type=int, default=8000, help="Port to listen on.")
    parser.add_argument("--api-key", default=envs.api_key(),
                        help="Require `Authorization: Bearer KEY` (default: $VLLM_ENGINE_API_KEY). "
                             "/health and /metrics stay open.")
    parser.add_argument("--chat-template", default=None, metavar="FILE",
                        help="Jinja chat template file (or the template itself) replacing the model's.")
    parser.add_argument("--trust-request-chat-template", action="store_true",
                        help="Accept a chat_template field in chat requests (off: a request's template runs "
                             "on the server and can stall it).")
    parser.add_argument("--request-timeout", type=positive_seconds, default=None, metavar="SECONDS",
                        help="Abort a request still unfinished this long after it arrived (HTTP 408, or an error "
                             "event in a stream); its KV blocks are freed. Default: no deadline.")
    parser.add_argument("--data-parallel-size", "-dp", type=int, default=1, metavar="N",
                        help="Start N replicas of this command (each with its own GPUs, or CPU processes) behind "
                             "a cache-aware router on --host/--port (docs/serving.md).")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"],
                        help="Log level of the server and of uvicorn.")
    EngineArgs.add_cli_args(parser)
    return parser


def positive_seconds(value: str) -> float:
    """argparse type: a positive, finite number of seconds."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {value!r}") from None
    if not 0 < seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {value}")
    return seconds


def load_chat_template(value: Optional[str]) -> Optional[str]:
    """--chat-template: a file's contents, or the value itself when it is an inline Jinja template."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if path.is_file():
        return path.read_text()
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template: no such file: {value}")


def build_server(app: Any, host: str, port: int, log_level: str = "info") -> Any:
    """A uvicorn Server for ``app`` that stops by itself when the app's engine dies (``app``: the
    FastAPI app, or a ``StartingApp`` whose engine is still being built)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5,
                            timeout_keep_alive=5)
    server = uvicorn.Server(config)

    def on_dead(err: BaseException) -> None:
        logger.error("the engine died (%s): shutting the server down", err)
        server.should_exit = True  # read by uvicorn's main loop (checked every 0.1 s)

    add_dead_callback = getattr(app, "add_dead_callback", None) or app.state.async_engine.add_dead_callback
    add_dead_callback(on_dead)
    return server


def run_server(app: Any, host: str, port: int, log_level: str = "info") -> int:
    """Runs uvicorn until shutdown; returns 1 if the engine died (the server then stops at once), else 0."""
    server = build_server(app, host, port, log_level)
    server.run()
    return 1 if app.state.async_engine.dead_error is not None else 0


def run_serve(args: argparse.Namespace) -> int:
    """Loads the model, then serves it; returns the process exit status."""
    from vllm_engine.engine.async_engine import AsyncEngine
    from vllm_engine.engine.engine import Engine
    from vllm_engine.serving.api_server import create_app
    from vllm_engine.serving.startup import StartingApp
    from vllm_engine.utils import freeze_gc

    if args.data_parallel_size < 1:
        raise ValueError(f"--data-parallel-size must be at least 1, not {args.data_parallel_size}")
    if args.data_parallel_size > 1:
        from vllm_engine.serving.launcher import run_data_parallel

        return run_data_parallel(args)
    if getattr(args, "model_tag", None):
        if args.model and args.model != args.model_tag:
            raise ValueError(f"two models given: {args.model_tag!r} and --model {args.model!r}")
        args.model = args.model_tag
    chat_template = load_chat_template(args.chat_template)
    engine_args = EngineArgs.from_cli_args(args)
    config = engine_args.create_engine_config()  # a bad setting is an error now, before the server listens

    def build_app() -> Any:
        engine = Engine.from_engine_args(engine_args)
        cache = engine.config.cache
        num_blocks = getattr(engine, "num_gpu_blocks", None)
        logger.info("model %s (served as %r), max_model_len %d; KV cache: %s blocks x %d tokens = %s tokens",
                    engine.model_config.model, engine.served_model_name, engine.max_model_len, num_blocks,
                    cache.block_size, num_blocks * cache.block_size if num_blocks is not None else "?")
        async_engine = AsyncEngine(engine, request_timeout=args.request_timeout)
        app = create_app(async_engine, chat_template=chat_template, api_key=args.api_key, owns_engine=True,
                         trust_request_chat_template=args.trust_request_chat_template)
        # This process keeps this engine for its lifetime: what is alive now need never be scanned
        # again by the garbage collector (a full collection over it stalls a step for 50-200 ms).
        logger.info("garbage collector: %d startup objects frozen", freeze_gc())
        return app

    if config.parallel.distributed_executor_backend == "torchrun":
        # Every torchrun process builds the engine; only rank 0 returns from it (the others serve
        # their rank until shutdown), so only rank 0 may go on to listen.
        return run_server(build_app(), args.host, args.port, args.log_level)
    # Listen at once: /health answers 503 ("starting") until the engine is built (serving/startup.py).
    starting = StartingApp(build_app)
    server = build_server(starting, args.host, args.port, args.log_level)
    logger.info("OpenAI-compatible API at http://%s:%d/v1 (auth: %s); loading the model", args.host, args.port,
                "API key" if args.api_key else "none")
    starting.start()
    server.run()
    if isinstance(starting.error, ValueError):  # the engine refused the configuration
        print(f"error: {starting.error}", file=sys.stderr)
        return 2
    return 1 if starting.failed else 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = add_serve_args(argparse.ArgumentParser(prog="vllm-engine serve",
                                                    description="Serve a model with an OpenAI-compatible API."))
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.serve_argv = argv
    logging.basicConfig(level=getattr(logging, args.log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run_serve(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
