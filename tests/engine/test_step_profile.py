"""The engine's step profile: each step's phases, and the host's own work apart from its wait for the GPU."""

from __future__ import annotations

import time

import pytest
import torch

from vllm_engine import Engine, SamplingParams
from vllm_engine.core.sched_output import ModelRunnerOutput
from vllm_engine.worker.model_runner import ModelRunner, StepHandle


class SlowEvent:
    """Stands in for the CUDA event of the sampled ids' device-to-host copy: the GPU takes 30 ms."""

    def synchronize(self) -> None:
        time.sleep(0.03)


def test_collect_measures_its_wait_for_the_copy():
    out = ModelRunnerOutput(req_ids=["a", "b", "c"], sampled_token_ids=[[], [], []])
    handle = StepHandle(output=out, sampled=torch.tensor([7, 9]), sample_req_indices=[0, 2],
                        sampled_host=torch.tensor([7, 9]), copied=SlowEvent())
    assert ModelRunner.collect(handle).sampled_token_ids == [[7], [], [9]]
    assert 0.03 <= handle.wait_s < 1.0


def test_collect_without_a_copy_does_not_wait():
    out = ModelRunnerOutput(req_ids=["a"], sampled_token_ids=[[]])
    handle = StepHandle(output=out, sampled=torch.tensor([5]), sample_req_indices=[0])
    assert ModelRunner.collect(handle).sampled_token_ids == [[5]] and handle.wait_s == 0.0


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_step_profile_splits_the_step_into_host_work_and_wait(tiny_model_dir, async_scheduling, monkeypatch):
    engine = Engine(model=str(tiny_model_dir("llama")), dtype="float32", max_model_len=128, seed=0,
                    async_scheduling=async_scheduling)
    # Every launched step's copy "takes" 30 ms on the device, as a CUDA event would.
    launch = engine.model_runner.launch

    def slow_launch(sched):
        handle = launch(sched)
        if handle.sampled is not None:
            handle.sampled_host, handle.copied = handle.sampled.clone(), SlowEvent()
        return handle

    monkeypatch.setattr(engine.model_runner, "launch", slow_launch)
    prof = engine.enable_step_profile()
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = engine.generate([[1, 2, 3, 4, 5], [6, 7, 8]], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4]
    assert prof and all(r["host_ms"] + r["wait_ms"] == pytest.approx(r["total_ms"]) for r in prof)
    # Each sampling step is waited for once, in the step that launched it (sync) or in the next one (async).
    waits = [r["wait_ms"] for r in prof]
    assert sum(w >= 30 for w in waits) == 4 and all(w == 0 or w >= 30 for w in waits)
    assert all(r["host_ms"] < r["total_ms"] for r in prof if r["wait_ms"])
