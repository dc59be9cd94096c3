"""Under torchrun (``TorchrunExecutor``): each process it starts is one rank, rank 0 runs the engine.
Two 'machines' on this host (two torchrun agents, ``--nnodes 2``, rendezvous on 127.0.0.1), one
pipeline stage each, give the one-process engine's tokens; so does ``vllm-engine generate -tp 2``
under ``torchrun --nproc-per-node 2``; every process exits 0."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from distributed.executor_helpers import ENGINE_KWARGS, PYTHON, REPO, python_env
from serving.conftest import free_port
from vllm_engine import Engine, SamplingParams

PROMPTS = [[1, 5, 9, 23, 44], [1, 7, 8, 100, 3, 4, 200, 31]]
SCRIPT = textwrap.dedent("""
    import json, os, sys
    from vllm_engine import Engine, SamplingParams

    # Every rank runs this; Engine() returns only on rank 0 (the others serve it, then exit).
    engine = Engine(model=sys.argv[1], pipeline_parallel_size=2, **json.loads(sys.argv[2]))
    outs = engine.generate(json.loads(sys.argv[3]), SamplingParams(temperature=0.0, max_tokens=10, logprobs=1),
                           use_tqdm=False)
    print("RESULT", json.dumps([[o.token_ids, [next(iter(d.values())).logprob for d in o.outputs[0].logprobs]]
                                for o in outs]), flush=True)
    engine.shutdown()
""")


def _torchrun(*args: str) -> list[str]:
    return [PYTHON, "-m", "torch.distributed.run", *args]


def test_two_machines_one_stage_each(tiny_model_dir, tmp_path):
    path = str(tiny_model_dir("llama"))
    script = tmp_path / "generate.py"
    script.write_text(SCRIPT)
    port = free_port()
    procs = []
    for node_rank in (0, 1):  # static rendezvous: node 0's agent hosts the store, its process is rank 0
        cmd = _torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node_rank),
                        "--master-addr", "127.0.0.1", "--master-port", str(port),
                        str(script), path, json.dumps(ENGINE_KWARGS), json.dumps(PROMPTS))
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=python_env(), stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=120)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    results = [line for line in logs[0].splitlines() if line.startswith("RESULT")]
    assert len(results) == 1 and not any(line.startswith("RESULT") for line in logs[1].splitlines())
    got = json.loads(results[0].split(" ", 1)[1])

    ref = Engine(model=path, **ENGINE_KWARGS).generate(
        PROMPTS, SamplingParams(temperature=0.0, max_tokens=10, logprobs=1), use_tqdm=False)
    assert [g[0] for g in got] == [o.token_ids for o in ref]
    for (_, lps), o in zip(got, ref):
        want = [d[t].logprob for d, t in zip(o.outputs[0].logprobs, o.token_ids)]
        assert lps == pytest.approx(want, abs=1e-4)


def test_cli_generate_with_tp2_under_torchrun(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    flags = ["--model", path, "--dtype", "float32", "--max-model-len", "256", "--num-gpu-blocks-override", "64",
             "--temperature", "0", "--max-tokens", "8", "--raw"]
    prompt = "The capital of France is"
    cmd = _torchrun("--standalone", "--nproc-per-node", "2", "-m", "vllm_engine.cli", "generate", prompt, "-tp", "2",
                    *flags)
    res = subprocess.run(cmd, cwd=REPO, env=python_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    engine = Engine(model=path, dtype="float32", max_model_len=256, num_gpu_blocks_override=64)
    params = engine.default_sampling_params()  # what the CLI starts from
    params.temperature, params.max_tokens = 0.0, 8
    ref = engine.generate(prompt, params, use_tqdm=False)
    assert res.stdout == ref.text + "\n" and ref.token_ids
