"""Engine.shutdown() lets go of the in-process rank (model, KV cache, CUDA graphs): nothing keeps it
alive afterwards, so on a GPU its memory returns and another engine can start in the same process
at the default gpu_memory_utilization (structured_throughput.py and the spec-decode tests do)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from vllm_engine import Engine, SamplingParams

PARAMS = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)


def test_shutdown_drops_the_model_runner(tiny_model_dir):
    engine = Engine(model=str(tiny_model_dir("llama")), dtype="float32", max_model_len=128, seed=0)
    engine.generate(["Hello there"], PARAMS, use_tqdm=False)
    runner = weakref.ref(engine.model_runner)
    kv = weakref.ref(engine.model_runner.kv_cache.gpu_caches[0])
    engine.shutdown()
    engine.shutdown()  # idempotent
    gc.collect()
    assert runner() is None and kv() is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_shutdown_returns_the_device_memory(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    torch.cuda.empty_cache()
    before = torch.cuda.memory_reserved()
    engine = Engine(model=path, dtype="float32", max_model_len=128, seed=0)
    first = engine.generate(["Hello there"], PARAMS, use_tqdm=False)[0].token_ids
    engine.shutdown()
    assert torch.cuda.memory_reserved() - before < 2**30  # its KV cache (most of the device) is gone
    engine = Engine(model=path, dtype="float32", max_model_len=128, seed=0)  # the default share again
    assert engine.generate(["Hello there"], PARAMS, use_tqdm=False)[0].token_ids == first
    engine.shutdown()
