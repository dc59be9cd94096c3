"""The command line: ``vllm-engine serve | router | generate | chat``."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
from typing import Iterator, Optional

from vllm_engine.config import EngineArgs


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="Most tokens to generate per prompt.")
    p.add_argument("--temperature", type=float, default=None, help="Sampling temperature (default: the model's; 0 = greedy).")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true", help="Keep generating after the end-of-sequence token.")
    p.add_argument("--log-level", default="warning", help="Python log level (debug, info, warning).")


def _params(engine, args: argparse.Namespace):
    params = engine.default_sampling_params()
    params.max_tokens = args.max_tokens
    params.ignore_eos = args.ignore_eos
    for name in ("temperature", "top_p", "top_k"):
        if getattr(args, name) is not None:
            setattr(params, name, getattr(args, name))
    params._verify()
    return params


def _engine(args: argparse.Namespace):
    from vllm_engine.engine.engine import Engine

    return Engine.from_engine_args(EngineArgs.from_cli_args(args))


def cmd_generate(args: argparse.Namespace) -> int:
    engine = _engine(args)
    params = _params(engine, args)
    use_tqdm = len(args.prompts) > 1
    has_template = engine.tokenizer is not None and getattr(engine.tokenizer, "chat_template", None)
    if has_template and not args.raw:
        # An instruct model answers a question asked through its chat template.
        outs = engine.chat([[{"role": "user", "content": p}] for p in args.prompts], params, use_tqdm=use_tqdm)
    else:
        outs = engine.generate(list(args.prompts), params, use_tqdm=use_tqdm)
    for prompt, out in zip(args.prompts, outs):
        if len(args.prompts) > 1:
            print(f"### {prompt}")
        print(out.text)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    """Interactive chat: streams each reply token by token.

    Ctrl-C during a reply stops it (the request is aborted, what was shown stays in the
    conversation) and returns to the prompt; Ctrl-C or Ctrl-D at the prompt, or /exit, quits.
    """
    engine = _engine(args)
    params = _params(engine, args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = list(system)
    print("Chat with the model (Ctrl-D or /exit to quit, /reset to start over, Ctrl-C stops a reply).",
          file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            messages = list(system)
            print("(conversation reset)", file=sys.stderr)
            continue
        if not command:
            continue
        messages.append({"role": "user", "content": line})
        reply = _stream_reply(engine, f"chat-{turn}", engine.apply_chat_template(messages), params)
        turn += 1
        print()
        messages.append({"role": "assistant", "content": reply})


def _stream_reply(engine, request_id: str, prompt: str, params) -> str:
    """Generates and prints one reply; Ctrl-C stops it between two steps (never inside one, which
    would leave the engine half updated) and aborts the request, freeing its KV blocks."""
    reply = ""
    with _deferred_sigint() as interrupted:
        ids = engine.tokenize(prompt, add_special_tokens=False)  # the template holds the special tokens
        engine.add_request(request_id, {"prompt": prompt, "prompt_token_ids": ids}, params)
        while engine.has_unfinished_requests() and not interrupted:
            for out in engine.step():
                if out.request_id == request_id:
                    sys.stdout.write(out.text[len(reply):])
                    sys.stdout.flush()
                    reply = out.text
        if interrupted:
            engine.abort_request(request_id)
    return reply


@contextlib.contextmanager
def _deferred_sigint() -> Iterator[list]:
    """Within the block, Ctrl-C only appends to the yielded list (truthy once pressed)."""
    pressed: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield pressed
    finally:
        signal.signal(signal.SIGINT, previous)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-engine", description="LLM inference and serving engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="Start the OpenAI-compatible HTTP server.")
    from vllm_engine.serving.cli_serve import add_serve_args

    add_serve_args(serve)

    router = sub.add_parser("router", help="One OpenAI endpoint in front of several servers (docs/serving.md).")
    from vllm_engine.serving.launcher import add_router_args

    add_router_args(router)

    gen = sub.add_parser("generate", help="Generate completions for prompts and print them.")
    gen.add_argument("prompts", nargs="+", help="Prompt text(s).")
    gen.add_argument("--raw", action="store_true",
                     help="Complete the prompt text as is (default: ask it as a user message through the chat template, if the model has one).")
    EngineArgs.add_cli_args(gen)
    _sampling_args(gen)

    chat = sub.add_parser("chat", help="Interactive chat in the terminal (streams tokens).")
    chat.add_argument("--system", default=None, help="System prompt.")
    EngineArgs.add_cli_args(chat)
    _sampling_args(chat)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    if args.command == "serve":
        args.serve_argv = argv[argv.index("serve") + 1:]  # what --data-parallel-size hands each replica
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            from vllm_engine.serving.cli_serve import run_serve

            return run_serve(args) or 0
        if args.command == "router":
            from vllm_engine.serving.launcher import run_router

            return run_router(args)
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_chat(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while loading the model or generating: no traceback
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
