"""What the executor tests share: engine settings, HF greedy references, and process checks."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[2]
# Small, fixed KV cache; float32 so every rank count computes the same logits to ~1e-6.
ENGINE_KWARGS = dict(dtype="float32", max_model_len=256, num_gpu_blocks_override=256, seed=0)
PROMPTS = [
    "Hello, my name is",
    "The capital of France is a city that",
    "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen",
    "a",
]
MAX_TOKENS = 12


def hf_greedy(model, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list[float], list[float]]:
    """HF transformers' greedy continuation of one prompt: (tokens, their logprobs, prompt logprobs)."""
    ids = torch.tensor([prompt_ids])
    tokens, lps = [], []
    with torch.no_grad():
        prompt = model(ids).logits[0].double().log_softmax(-1)
        prompt_lps = [prompt[i, prompt_ids[i + 1]].item() for i in range(len(prompt_ids) - 1)]
        for _ in range(max_tokens):
            lp = model(ids).logits[0, -1].double().log_softmax(-1)
            tok = int(lp.argmax())
            tokens.append(tok)
            lps.append(lp[tok].item())
            ids = torch.cat([ids, torch.tensor([[tok]])], dim=1)
    return tokens, lps, prompt_lps


def worker_pids(engine) -> list[int]:
    return [p.pid for p in engine.executor.procs]


def alive(pids: list[int]) -> list[int]:
    """The pids that are still running processes (zombies count as gone)."""
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def wait_gone(pids: list[int], timeout: float) -> list[int]:
    """Waits up to ``timeout`` s for the processes to end; returns those still alive."""
    deadline = time.monotonic() + timeout
    while alive(pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive(pids)


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def python_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python process running this checkout."""
    path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", **extra}


PYTHON = sys.executable
