"""The multiprocess executor: one process per rank on this machine, started by the engine.

Every rank runs in a process of its own (torch.multiprocessing: forked from a fork server), so the engine's process
holds no torch.distributed state: several engines can live in one process, and the engine never
blocks inside a collective. Each worker has a pipe to the engine: the engine writes each message
(``executor/messages.py``) once pickled to every pipe; the output rank (tensor rank 0 of the last
stage) answers on its pipe. Tensors between ranks go through torch.distributed (NCCL / gloo).

Faults: the engine waits on the output rank's pipe *and* on every worker's process sentinel, so a
worker that dies mid-step ends the wait at once with ``WorkerDiedError`` naming its rank; a monitor
thread notices a death while the engine is idle and runs the failure callbacks (the server then
reports 503 and exits). The other workers are then stopped. Workers exit by themselves when the
engine's process is gone (they watch their parent), and ignore Ctrl-C (the engine stops them).
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import weakref
from dataclasses import dataclass
from multiprocessing import connection as mpc
from typing import Any, Optional

import torch.multiprocessing as torch_mp

from vllm_engine.config import EngineConfig
from vllm_engine.core.sched_output import ModelRunnerOutput
from vllm_engine.executor.base import Executor, WorkerDiedError
from vllm_engine.executor.messages import (CollectStep, DetermineNumBlocks, InitializeCache, LaunchStep, Reply,
                                           Shutdown, WorkerFailure, WorkerReady)

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT_S = 5.0  # a worker gets this long to leave after Shutdown before it is terminated
PARENT_CHECK_INTERVAL_S = 1.0  # a worker checks this often that its parent is alive
HEALTH_POLL_S = 1.0  # a wait for a worker's answer checks the monitor's findings this often
FAILURE_LINGER_S = 3.0  # a failed worker waits this long at most for the engine to read its report


@dataclass
class StepHandle:
    """A step launched on the workers; ``wait_s``: how long ``collect`` waited for its output."""

    wait_s: float = 0.0


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        from vllm_engine.worker.worker import output_rank

        self.config = config
        self.world_size = config.parallel.world_size
        self.output_rank = output_rank(config)
        self._closing = False
        self._stop_lock = threading.Lock()  # the engine's thread and the monitor both stop workers, read exit codes
        self._store_dir = tempfile.mkdtemp(prefix="vllm-engine-dist-")
        init_method = f"file://{os.path.join(self._store_dir, 'store')}"
        ctx = _mp_context(config)
        self.procs, self.conns = [], []
        # Collected before the first worker starts: a finalizer that stops them whatever happens next.
        self._finalizer = weakref.finalize(self, _stop_workers, self.procs, self.conns, self._store_dir,
                                           self._stop_lock, graceful=False, close=True)
        log_level = logging.getLogger("vllm_engine").getEffectiveLevel()
        for rank in range(self.world_size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_worker_main, name=f"vllm-engine-worker-{rank}", daemon=True,
                               args=(config, rank, init_method, theirs, rank == self.output_rank, log_level))
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        for rank in range(self.world_size):
            msg = self._recv(rank, others_may_speak=True)
            assert isinstance(msg, WorkerReady), msg
        logger.info("%d worker processes ready (pids %s)", self.world_size, [p.pid for p in self.procs])
        # The thread holds only a weak reference: an engine dropped without shutdown() is still collected
        # (and its finalizer stops the workers).
        threading.Thread(target=_watch_workers, args=(weakref.ref(self), [p.sentinel for p in self.procs]),
                         name="vllm-engine-worker-monitor", daemon=True).start()

    # ---- the interface ---------------------------------------------------------------------------
    def initialize(self) -> tuple[int, int]:
        self._send(DetermineNumBlocks())
        num_gpu_blocks, num_cpu_blocks = self._reply()
        self._send(InitializeCache(num_gpu_blocks, num_cpu_blocks))
        self._reply()
        return num_gpu_blocks, num_cpu_blocks

    def launch(self, request: Any) -> StepHandle:
        self._send(LaunchStep(request))
        return StepHandle()

    def collect(self, handle: StepHandle) -> ModelRunnerOutput:
        self._send(CollectStep())
        t0 = time.perf_counter()
        output = self._reply()
        handle.wait_s = time.perf_counter() - t0
        return output

    def shutdown(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._finalizer.detach()
        _stop_workers(self.procs, self.conns, self._store_dir, self._stop_lock, graceful=self._failure is None,
                      close=True)

    # ---- messages ----------------------------------------------------------------------------------
    def _send(self, msg: Any) -> None:
        self.check_health()
        if self._closing:
            raise RuntimeError("the executor was shut down")
        data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)  # once, for every worker
        try:
            for conn in self.conns:
                conn.send_bytes(data)
        except OSError:  # a worker's end of the pipe is closed: it is gone
            raise self._fail() from None

    def _reply(self) -> Any:
        msg = self._recv(self.output_rank)
        if not isinstance(msg, Reply):
            raise RuntimeError(f"worker rank {self.output_rank} answered {type(msg).__name__}")
        return msg.value

    def _recv(self, rank: int, others_may_speak: bool = False) -> Any:
        """The next message from ``rank``. A failure raises instead: a worker's exception, a dead
        process, or (unless ``others_may_speak``: startup) a message from a rank that only speaks
        when it fails."""
        conn = self.conns[rank]
        while True:
            self.check_health()  # the monitor thread may have found a dead worker already
            if self._closing:
                raise RuntimeError("the executor was shut down")
            watched = [conn] + [p.sentinel for p in self.procs]
            if not others_may_speak:
                watched += [c for c in self.conns if c is not conn]
            try:
                ready = mpc.wait(watched, timeout=HEALTH_POLL_S)
            except (OSError, ValueError):  # the pipes were closed under us: by the monitor, on a failure
                self.check_health()
                raise
            if ready == [conn]:
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    raise self._fail() from None
                if not isinstance(msg, WorkerFailure):
                    return msg
                raise self._fail(first=msg)
            if ready:
                raise self._fail()

    # ---- faults ------------------------------------------------------------------------------------
    def _fail(self, first: Optional[WorkerFailure] = None) -> BaseException:
        """The error naming the failed rank(s); records it and stops every worker."""
        if self._failure is not None:
            return self._failure
        if self._closing:  # workers leaving because shutdown() asked them to
            return RuntimeError("the executor was shut down")
        dead_first = {r for r, code in enumerate(_exit_codes(self.procs, self._stop_lock)) if code is not None}
        time.sleep(0.2)  # let a death's consequences (peers' broken collectives) land before reading them
        failures = [first] if first is not None else []
        for conn in self.conns:
            while _poll(conn):
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    break
                if isinstance(msg, WorkerFailure):
                    failures.append(msg)
        codes = _exit_codes(self.procs, self._stop_lock)
        error = self._report_failure(_failure_error(self.procs, codes, failures, dead_first))
        _stop_workers(self.procs, self.conns, self._store_dir, self._stop_lock, graceful=False, close=False)
        return error


def _watch_workers(ref: "weakref.ref[MultiprocExecutor]", sentinels: list[int]) -> None:
    """The monitor thread: waits for any worker process to end; one ending before shutdown is a
    failure (reported through the executor's failure callbacks)."""
    mpc.wait(sentinels)
    executor = ref()
    if executor is None or executor._closing or executor._failure is not None:
        return
    procs = executor.procs
    dead_first = {r for r, code in enumerate(_exit_codes(procs, executor._stop_lock)) if code is not None}
    time.sleep(0.2)  # as in _fail: the first to go is the cause, those after it its consequences
    if executor._closing:
        return
    executor._report_failure(_failure_error(procs, _exit_codes(procs, executor._stop_lock), [], dead_first))
    _stop_workers(procs, executor.conns, executor._store_dir, executor._stop_lock, graceful=False, close=False)


def _poll(conn: Any) -> bool:
    try:
        return conn.poll(0)
    except (EOFError, OSError):
        return False


def _exit_codes(procs: list, lock: threading.Lock) -> list[Optional[int]]:
    """The workers' exit codes (None: still running), read under ``lock``. A fork server's child
    reports its exit status once, through a pipe: two threads reading it at once would leave one of
    them with multiprocessing's 255 ("unknown") instead of, say, the signal that killed it."""
    with lock:
        return [proc.exitcode for proc in procs]


def _failure_error(procs: list, codes: list[Optional[int]], failures: list[WorkerFailure],
                   dead_first: set[int]) -> BaseException:
    """One error for what went wrong, the likely cause first: the ranks already dead when the failure
    was noticed, then those killed by a signal, then the exceptions and exits that followed.
    ``codes``: the processes' exit codes (:func:`_exit_codes`)."""
    reported = {f.rank: f for f in failures}
    parts = []
    for rank, (proc, code) in enumerate(zip(procs, codes)):
        if rank in reported:
            lines = reported[rank].traceback.strip().splitlines()
            what = f"worker rank {rank} (pid {proc.pid}) failed: {lines[-1] if lines else '?'}"
        elif code is not None:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
            what = f"worker rank {rank} (pid {proc.pid}) {how}"
        else:
            continue
        order = 0 if rank in dead_first else 1 if code is not None and code < 0 and rank not in reported else 2
        parts.append((order, rank, what))
    if not parts:
        return WorkerDiedError("a worker's connection to the engine broke")
    parts.sort()
    config_errors = [f.error for f in failures if isinstance(f.error, ValueError)]
    if config_errors and len(failures) == len(parts):  # the ranks refused the configuration: say why
        return ValueError(f"{config_errors[0]} (worker rank {failures[0].rank})")
    return WorkerDiedError("; ".join(p[2] for p in parts) + " (see the worker's log)", parts[0][1])


def _stop_workers(procs: list, conns: list, store_dir: str, lock: threading.Lock, graceful: bool,
                  close: bool) -> None:
    """Stops the worker processes (Shutdown first when ``graceful``), then terminates, then kills
    what is left; removes the rendezvous directory, and closes the pipes when ``close``."""
    with lock:
        if graceful:
            data = pickle.dumps(Shutdown())
            for conn in conns:
                try:
                    conn.send_bytes(data)
                except (OSError, ValueError):
                    pass
            deadline = time.monotonic() + SHUTDOWN_TIMEOUT_S
            for proc in procs:
                proc.join(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        for proc in procs:
            proc.join(2.0)
            if proc.is_alive():
                proc.kill()
                proc.join(2.0)
        if close:
            for conn in conns:
                conn.close()
        shutil.rmtree(store_dir, ignore_errors=True)


# ---- the worker process ------------------------------------------------------------------------------
def _worker_main(config: EngineConfig, rank: int, init_method: str, conn: Any, is_output_rank: bool,
                 log_level: int) -> None:
    """A worker process: builds rank ``rank``'s Worker, then serves the engine's messages."""
    from vllm_engine.worker.worker import Worker, run_worker_loop

    # Ctrl-C reaches every process of the terminal's process group: the engine decides when we stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s worker{rank} %(name)s: %(message)s")
    _exit_with_parent(os.getppid())
    if config.device.device.type == "cpu":
        import torch

        # The ranks share the machine's cores: without this each would start one thread per core.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.parallel.world_size))
    worker = None
    try:
        worker = Worker(config, rank, local_rank=rank, distributed_init_method=init_method)
        conn.send(WorkerReady(rank, os.getpid()))
        run_worker_loop(worker, conn.recv, conn.send if is_output_rank else None)
    except (EOFError, BrokenPipeError, ConnectionResetError):
        os._exit(0)  # the engine is gone: nobody to report to
    except BaseException as e:  # noqa: BLE001 - reported to the engine, then this process ends
        tb = traceback.format_exc()
        logging.getLogger(__name__).error("worker rank %d failed:\n%s", rank, tb)
        try:
            conn.send(WorkerFailure(rank, tb, _picklable(e)))
            # Stay until the engine has read it (it then stops us) or a while has passed: exiting at
            # once would let the monitor see a bare exit code before the engine sees the reason.
            conn.poll(FAILURE_LINGER_S)
        except Exception:  # noqa: BLE001 - the engine may be gone too
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(1)
    if worker is not None:
        worker.shutdown()


def _mp_context(config: EngineConfig) -> Any:
    """By default a fork server's context: each worker is forked from a clean process (no CUDA, no
    threads of ours) that imported the worker code and transformers' config module once, so a worker
    starts in a fraction of a second instead of importing them again (``spawn`` on request:
    ``VLLM_ENGINE_WORKER_MULTIPROC_METHOD``). Either way a child runs the parent's ``__main__``
    module: a script needs the ``if __name__ == "__main__":`` guard."""
    from vllm_engine import envs

    method = envs.worker_multiproc_method()
    ctx = torch_mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["vllm_engine.worker.worker", type(config.model.hf_config).__module__])
    return ctx


def _picklable(e: BaseException) -> Optional[BaseException]:
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:  # noqa: BLE001
        return None


def _exit_with_parent(parent_pid: int) -> None:
    """A daemon thread that ends this process when its parent is gone: the engine's process (spawn) or
    the fork server, which exits with it; e.g. the engine was killed before it could stop us (SIGKILL,
    a crash). No worker outlives the engine."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(1)
            time.sleep(PARENT_CHECK_INTERVAL_S)

    threading.Thread(target=watch, name="vllm-engine-parent-watch", daemon=True).start()
