"""Faults and lifetimes of the worker processes (``MultiprocExecutor``): a killed worker makes the
engine raise within seconds with an error naming its rank (idle or mid-step), the async engine dies
with it; shutdown, a dropped engine, and an engine process that is killed, terminated or interrupted
leave no worker behind; a configuration every rank refuses surfaces as the ValueError it is."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import textwrap
import threading
import time

import pytest

from distributed.executor_helpers import (ENGINE_KWARGS, PYTHON, REPO, alive, descendants, python_env, wait_gone,
                                         worker_pids)
from vllm_engine import Engine, SamplingParams
from vllm_engine.executor import WorkerDiedError

LONG = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)


@pytest.fixture
def engine(tiny_model_dir):
    engine = Engine(model=str(tiny_model_dir("llama")), tensor_parallel_size=2, **ENGINE_KWARGS)
    yield engine
    engine.shutdown()


def test_worker_killed_while_idle(engine):
    pids = worker_pids(engine)
    os.kill(pids[1], signal.SIGKILL)
    time.sleep(0.5)  # the monitor notices at once; the engine learns it at its next step
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"worker rank 1 \(pid \d+\) was killed by SIGKILL") as info:
        engine.generate([[1, 2, 3]], LONG, use_tqdm=False)
    assert info.value.rank == 1 and time.monotonic() - t0 < 2
    assert wait_gone(pids, 5) == []
    with pytest.raises(WorkerDiedError):  # the engine stays failed
        engine.check_health()


def test_worker_killed_mid_generation(engine):
    pids = worker_pids(engine)
    killed_at = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(pids[0], signal.SIGKILL)

    timer = threading.Timer(0.3, kill)
    timer.start()
    with pytest.raises(WorkerDiedError, match=r"^worker rank 0 \(pid \d+\) was killed by SIGKILL"):
        for _ in range(200):  # far longer than 0.3 s of steps
            engine.generate([[1, 2, 3]] * 4, LONG, use_tqdm=False)
    timer.join()
    assert time.monotonic() - killed_at[0] < 5
    assert wait_gone(pids, 5) == []


def test_async_engine_dies_when_an_idle_worker_dies(engine):
    """No step waits on the dead worker: the executor's monitor thread must end the engine (the
    server's /health then answers 503 and it exits: tests/distributed/test_executor_server.py)."""
    from vllm_engine.engine.async_engine import AsyncEngine

    async_engine = AsyncEngine(engine)
    died = threading.Event()
    async_engine.add_dead_callback(lambda err: died.set())
    try:
        assert async_engine.is_healthy
        os.kill(worker_pids(engine)[1], signal.SIGKILL)
        assert died.wait(5)
        assert not async_engine.is_healthy and "worker rank 1" in str(async_engine.dead_error)
    finally:
        async_engine.shutdown()


def test_shutdown_and_a_dropped_engine_leave_no_process(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    engine = Engine(model=path, tensor_parallel_size=2, **ENGINE_KWARGS)
    pids = worker_pids(engine)
    assert len(alive(pids)) == 2
    engine.shutdown()
    assert alive(pids) == []
    engine.shutdown()  # idempotent

    dropped = Engine(model=path, tensor_parallel_size=2, **ENGINE_KWARGS)
    pids = worker_pids(dropped)
    del dropped
    gc.collect()
    assert wait_gone(pids, 10) == []


ENGINE_SCRIPT = textwrap.dedent("""
    import sys
    from vllm_engine import Engine, SamplingParams

    if __name__ == "__main__":
        engine = Engine(model=sys.argv[1], tensor_parallel_size=2, dtype="float32", max_model_len=256,
                        num_gpu_blocks_override=64)
        print("WORKERS", *[p.pid for p in engine.executor.procs], flush=True)
        params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)
        while True:  # busy until signalled
            engine.generate([[1, 2, 3]], params, use_tqdm=False)
""")


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM", "Ctrl-C"])
def test_no_orphan_when_the_engine_process_ends(tiny_model_dir, tmp_path, how):
    """The engine's process ends without shutdown(): killed, terminated, or interrupted (Ctrl-C sends
    SIGINT to the terminal's whole process group, workers included). Its workers (and the fork
    server) follow."""
    script = tmp_path / "engine.py"
    script.write_text(ENGINE_SCRIPT)
    # spawn once (the workers' parent is the engine itself), else a fork server between them
    env = python_env(VLLM_ENGINE_WORKER_MULTIPROC_METHOD="spawn" if how == "SIGKILL" else "forkserver")
    proc = subprocess.Popen([PYTHON, str(script), str(tiny_model_dir("llama"))], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        line = ""
        while not line.startswith("WORKERS"):
            line = proc.stdout.readline()
            assert line or proc.poll() is None, "the engine script ended before starting its workers"
        pids = [int(p) for p in line.split()[1:]]
        pids += [pid for pid in descendants(proc.pid) if pid not in pids]  # the fork server too
        time.sleep(0.5)  # generating
        if how == "Ctrl-C":
            os.killpg(proc.pid, signal.SIGINT)
        else:
            proc.send_signal(getattr(signal, how))
        proc.wait(20)
        assert wait_gone(pids, 10) == [], f"processes outlived the engine ({how})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_configuration_every_rank_refuses_is_a_value_error(tiny_model_dir):
    with pytest.raises(ValueError, match="No memory left for the KV cache"):
        Engine(model=str(tiny_model_dir("llama")), tensor_parallel_size=2, dtype="float32", max_model_len=256,
               cpu_kv_cache_space=1e-9)
