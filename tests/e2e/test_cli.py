"""The CLI's chat and generate commands on a tiny model, against the offline API; and the step log."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vllm_engine import Engine, SamplingParams

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "vllm_engine.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=env)


def test_chat_streams_the_same_reply_as_the_api(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    res = _cli("chat", "--model", model, "--temperature", "0", "--max-tokens", "12", "--max-model-len", "256",
               stdin="Hello there\n/exit\n")
    assert res.returncode == 0, res.stderr[-2000:]
    engine = Engine(model=model, max_model_len=256)
    params = engine.default_sampling_params()
    params.temperature, params.max_tokens = 0.0, 12
    want = engine.chat([{"role": "user", "content": "Hello there"}], params, use_tqdm=False).text
    assert want and res.stdout == f"> {want}\n> "  # the prompt, the streamed reply, the next prompt


def test_generate_raw_prints_completions(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    res = _cli("generate", "--raw", "--model", model, "--temperature", "0", "--max-tokens", "8", "one", "two")
    assert res.returncode == 0, res.stderr[-2000:]
    engine = Engine(model=model)
    outs = engine.generate(["one", "two"], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    for o in outs:
        assert f"### {o.prompt}\n{o.text}\n" in res.stdout


def test_bad_flag_value_is_a_clear_error(tiny_model_dir):
    res = _cli("generate", "--model", str(tiny_model_dir("llama")), "--max-num-seqs", "0", "hi")
    assert res.returncode == 2 and "max_num_seqs" in res.stderr


def test_step_log_reports_preemptions(tiny_model_dir, caplog):
    engine = Engine(model=str(tiny_model_dir("llama")), block_size=4, num_gpu_blocks_override=12, max_model_len=128)
    with caplog.at_level(logging.INFO, logger="vllm_engine.engine.engine"):
        engine.generate([[5 + i] * 9 for i in range(4)], SamplingParams(max_tokens=20, ignore_eos=True), use_tqdm=False)
    assert engine.get_stats().num_preemptions_total > 0
    assert any("preempted" in r.getMessage() for r in caplog.records)


class ChatProcess:
    """`vllm-engine chat` in a subprocess, fed line by line, its stdout read as it comes."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "vllm_engine.cli", "chat", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        self.out = bytearray()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        while chunk := self.proc.stdout.read1(4096):
            self.out.extend(chunk)

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition(bytes(self.out)):
            assert self.proc.poll() is None, f"chat exited ({self.proc.returncode}) waiting for {what}: " \
                                             f"{self.proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, f"no {what} after {timeout} s; stdout: {bytes(self.out)[-300:]!r}"
            time.sleep(0.01)

    def send(self, line: str) -> None:
        self.proc.stdin.write(f"{line}\n".encode())
        self.proc.stdin.flush()

    def reply_starts_then_ctrl_c(self, line: str) -> None:
        """Sends ``line``; once the reply streams, Ctrl-C; the prompt must be back at once (a whole
        reply would take many seconds)."""
        before = len(self.out)
        self.send(line)
        self.wait_for(lambda out: len(out) > before + 3, 60, "reply")
        self.proc.send_signal(signal.SIGINT)
        self.wait_for(lambda out: out.endswith(b"\n> "), 5, "prompt after Ctrl-C")


@pytest.fixture(scope="module")
def long_context_model(tiny_model_dir, tmp_path_factory):
    """The tiny Llama with an 8k context, so an --ignore-eos reply runs long enough to interrupt."""
    model = shutil.copytree(tiny_model_dir("llama"), tmp_path_factory.mktemp("chat") / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 8192}))
    return str(model)


LONG_REPLY = ["--max-model-len", "8192", "--max-tokens", "8000", "--ignore-eos", "--temperature", "0",
              "--num-gpu-blocks-override", "1024"]


def test_chat_ctrl_c_stops_the_reply_and_returns_to_the_prompt(long_context_model):
    chat = ChatProcess("--model", long_context_model, *LONG_REPLY)
    try:
        chat.wait_for(lambda out: out == b"> ", 120, "first prompt")
        chat.reply_starts_then_ctrl_c("Hello there")
        chat.send("/reset")
        chat.reply_starts_then_ctrl_c("Tell me more")  # the engine serves the next request
        chat.proc.stdin.close()  # Ctrl-D
        assert chat.proc.wait(30) == 0
    finally:
        if chat.proc.poll() is None:
            chat.proc.kill()
    err = chat.proc.stderr.read().decode()
    assert "Traceback" not in err and "(conversation reset)" in err, err[-2000:]


def test_chat_ctrl_c_at_the_prompt_quits_cleanly(long_context_model):
    chat = ChatProcess("--model", long_context_model, *LONG_REPLY)
    try:
        chat.wait_for(lambda out: out == b"> ", 120, "first prompt")
        chat.proc.send_signal(signal.SIGINT)
        assert chat.proc.wait(30) == 0
    finally:
        if chat.proc.poll() is None:
            chat.proc.kill()
    assert "Traceback" not in chat.proc.stderr.read().decode()
