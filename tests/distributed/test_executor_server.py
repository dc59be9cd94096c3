"""``vllm-engine serve MODEL -tp 2``: a real server process whose model runs on two worker processes
answers completions (plain, streamed, with logprobs) and chat completions exactly as the one-process
offline engine does; when a worker is killed, /health stops answering 200 (503 until the server stops
listening) and the server exits non-zero within seconds, leaving no process. Under torchrun the same
command serves from rank 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import psutil
import pytest

from distributed.executor_helpers import PYTHON, REPO, descendants, python_env, wait_gone
from serving.conftest import ENGINE_FLAGS, ENGINE_KWARGS, free_port, server_process, wait_healthy
from vllm_engine import Engine, SamplingParams

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def offline(tiny_model_dir):
    return Engine(model=str(tiny_model_dir("llama")), **ENGINE_KWARGS)


def _check_main_cases(url: str, offline) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
    prompt = "The capital of France is"
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    ref = offline.generate(prompt, greedy, use_tqdm=False)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == 12
    want = [d[t].logprob for d, t in zip(ref.outputs[0].logprobs, ref.token_ids)]
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    chunks = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text

    ref_chat = offline.chat(MESSAGES, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert chat.choices[0].message.content == ref_chat.text

    seeded = SamplingParams(temperature=1.0, max_tokens=10, seed=3, n=2, ignore_eos=True)
    ref_seeded = offline.generate(prompt, seeded, use_tqdm=False)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=1.0, top_p=1.0, seed=3,
                                  n=2, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [c.text for c in ref_seeded.outputs]


def test_server_tp2_answers_like_the_offline_engine_then_fails_fast_when_a_worker_dies(
        tiny_model_dir, tmp_path, offline):
    args = [str(tiny_model_dir("llama")), *ENGINE_FLAGS, "--served-model-name", "tiny", "-tp", "2"]
    with server_process(args, tmp_path / "server.log") as (url, proc):
        _check_main_cases(url, offline)
        workers = descendants(proc.pid)  # the fork server, and under it the two ranks
        ranks = [pid for pid in workers if psutil.Process(pid).ppid() != proc.pid]
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        t0 = time.monotonic()
        answers = []
        while proc.poll() is None and time.monotonic() - t0 < 15:
            try:
                answers.append((time.monotonic() - t0, httpx.get(f"{url}/health", timeout=1).status_code))
            except httpx.HTTPError:  # the server stopped listening: it is on its way out
                pass
            time.sleep(0.02)
        assert proc.poll() not in (None, 0), f"server still up (or exited 0) after a worker died: {answers}"
        assert time.monotonic() - t0 < 10
        # The death is noticed within ~0.2 s: from then on /health answers 503 until the server stops listening.
        assert not [t for t, code in answers if code == 200 and t > 1.0], answers
        assert wait_gone(workers, 10) == []
        assert "worker rank" in (tmp_path / "server.log").read_text()


def test_server_under_torchrun(tiny_model_dir, tmp_path, offline):
    port = free_port()
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "vllm_engine.cli",
           "serve", str(tiny_model_dir("llama")), *ENGINE_FLAGS, "--served-model-name", "tiny", "-tp", "2",
           "--host", "127.0.0.1", "--port", str(port)]
    log = open(tmp_path / "torchrun.log", "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=python_env(), stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            wait_healthy(url, proc, timeout=120)
        except (RuntimeError, TimeoutError):
            pytest.fail((tmp_path / "torchrun.log").read_text()[-5000:])
        _check_main_cases(url, offline)
        ranks = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)  # torchrun passes it to every rank
        proc.wait(30)
        assert wait_gone(ranks, 10) == []
    finally:
        log.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("process-tree checks use Linux semantics")
