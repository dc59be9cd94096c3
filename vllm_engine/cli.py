"""The command line: ``vllm-engine serve | generate | chat``."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from vllm_engine.config import EngineArgs


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", type=int, default=256, help="Most tokens to generate per prompt.")
    p.add_argument("--temperature", type=float, default=None, help="Sampling temperature (default: the model's; 0 = greedy).")
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--log-level", default="warning", help="Python log level (debug, info, warning).")


def _params(engine, args: argparse.Namespace):
    params = engine.default_sampling_params()
    params.max_tokens = args.max_tokens
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
    """Interactive chat: streams each reply token by token."""
    engine = _engine(args)
    params = _params(engine, args)
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("Chat with the model (Ctrl-D or /exit to quit, /reset to start over).", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        text = engine.apply_chat_template(messages)
        request_id = f"chat-{turn}"
        turn += 1
        engine.add_request(request_id, {"prompt": text, "prompt_token_ids": engine.tokenize(text, add_special_tokens=False)}, params)
        shown = 0
        reply = ""
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                reply = out.text
                sys.stdout.write(reply[shown:])
                sys.stdout.flush()
                shown = len(reply)
        print()
        messages.append({"role": "assistant", "content": reply})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-engine", description="LLM inference and serving engine.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="Start the OpenAI-compatible HTTP server.")
    from vllm_engine.serving.cli_serve import add_serve_args

    add_serve_args(serve)

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
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper(), logging.WARNING),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "serve":
            from vllm_engine.serving.cli_serve import run_serve

            return run_serve(args) or 0
        if args.command == "generate":
            return cmd_generate(args)
        return cmd_chat(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
