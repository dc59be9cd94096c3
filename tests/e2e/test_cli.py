"""The CLI's chat and generate commands on a tiny model, against the offline API; and the step log."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

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
