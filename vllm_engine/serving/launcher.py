"""Replicas as child processes behind the router: ``vllm-engine serve --data-parallel-size N`` and
``vllm-engine router [--backend URL ...] [--serve "SERVE ARGS" ...] [--config FILE]``.

Each replica is ``python -m vllm_engine.cli serve ARGS --host 127.0.0.1 --port P`` on a free port.
With CUDA devices visible, replica i gets its own ``CUDA_VISIBLE_DEVICES`` slice of tp * pp devices
(in order; ValueError when there are not enough); on a CPU-only host every replica runs on the CPU.
The router starts once every launched replica answers /health (a replica that exits first is an
error), and stops them when it stops. A replica that dies later is marked down by the health checks
and its traffic goes to the others.

The YAML file (``--config``) describes several models on one endpoint::

    host: 127.0.0.1          # optional; flags given on the command line win
    port: 8000
    api_key: sk-local        # optional: clients must send it; the replicas get it too
    backends: [http://10.0.0.5:8000]        # optional: servers already running elsewhere
    models:
      - args: path/to/llama --served-model-name llama --max-model-len 4096     # `serve` arguments
        data_parallel_size: 2                                                   # optional (1)
      - args: [path/to/qwen, --served-model-name, qwen]                         # or as a list
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

logger = logging.getLogger("vllm_engine.serving.launcher")


@dataclass
class ReplicaProcess:
    argv: list[str]  # the replica's `serve` arguments (without --host/--port)
    url: str
    proc: subprocess.Popen


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def strip_flags(argv: list[str], flags: set[str]) -> list[str]:
    """``argv`` without the given value-taking flags (``--flag V`` and ``--flag=V``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif a.split("=", 1)[0] not in flags:
            out.append(a)
    return out


def world_size(argv: list[str]) -> int:
    """GPUs one replica started with these `serve` arguments uses (tensor x pipeline parallel size)."""
    from vllm_engine.serving.cli_serve import add_serve_args

    args, _ = add_serve_args(argparse.ArgumentParser(add_help=False)).parse_known_args(argv)
    return args.tensor_parallel_size * args.pipeline_parallel_size


def device_slices(sizes: list[int]) -> list[Optional[str]]:
    """``CUDA_VISIBLE_DEVICES`` for each replica (None everywhere on a host without CUDA devices)."""
    if not sizes:  # a router over running servers only: no need to import torch
        return []
    import torch

    if not torch.cuda.is_available():
        return [None] * len(sizes)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else \
        [str(i) for i in range(torch.cuda.device_count())]
    if sum(sizes) > len(ids):
        raise ValueError(f"the replicas need {sum(sizes)} GPUs ({' + '.join(map(str, sizes))}), "
                         f"{len(ids)} are visible")
    out, start = [], 0
    for n in sizes:
        out.append(",".join(ids[start:start + n]))
        start += n
    return out


def launch(argvs: list[list[str]], host: str = "127.0.0.1") -> list[ReplicaProcess]:
    """Starts one `serve` process per argument list (output goes to this process's stdout/stderr)."""
    replicas = []
    for argv, devices in zip(argvs, device_slices([world_size(a) for a in argvs])):
        port = free_port(host)
        env = dict(os.environ)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        cmd = [sys.executable, "-m", "vllm_engine.cli", "serve", *argv, "--host", host, "--port", str(port)]
        logger.info("starting replica on port %d%s: %s", port, f" (GPUs {devices})" if devices else "",
                    shlex.join(argv))
        proc = subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent)
        replicas.append(ReplicaProcess(argv, f"http://{host}:{port}", proc))
    return replicas


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launching process dies, even by SIGKILL (Linux)."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_ready(replicas: list[ReplicaProcess], timeout: float) -> None:
    """Returns once every replica answers /health with 200; RuntimeError if one exits or the time runs out."""
    import httpx

    deadline = time.time() + timeout
    pending = list(replicas)
    while pending:
        for r in list(pending):
            if r.proc.poll() is not None:
                raise RuntimeError(f"replica {r.url} ({shlex.join(r.argv)}) exited with status {r.proc.returncode}")
            try:
                if httpx.get(f"{r.url}/health", timeout=2).status_code == 200:
                    pending.remove(r)
            except httpx.HTTPError:
                pass
        if pending and time.time() > deadline:
            raise RuntimeError(f"replicas not ready after {timeout:g} s: {', '.join(r.url for r in pending)}")
        time.sleep(0.2)


def stop(replicas: list[ReplicaProcess], grace: float = 20.0) -> None:
    """Terminates the replicas (SIGTERM, then SIGKILL after ``grace`` seconds)."""
    for r in replicas:
        if r.proc.poll() is None:
            r.proc.terminate()
    deadline = time.time() + grace
    for r in replicas:
        try:
            r.proc.wait(max(0.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            r.proc.kill()
            r.proc.wait()


def serve_replicas(argvs: list[list[str]], backends: list[str], host: str, port: int, api_key: Optional[str],
                   log_level: str = "info", startup_timeout: float = 1800.0, **router_kwargs: Any) -> int:
    """Launches a replica per argument list, then runs the router over them and ``backends`` until it stops;
    returns 1 at once if a replica exits (or is not ready after ``startup_timeout``) first."""
    import uvicorn

    from vllm_engine.serving.router import create_router_app

    # uvicorn re-raises the SIGTERM it caught once it has shut down: make that an exception, so that
    # the replicas are stopped below instead of the process dying on the spot.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    replicas = launch(argvs)
    try:
        try:
            wait_ready(replicas, startup_timeout)
        except RuntimeError as e:  # a replica could not start (its own log says why, above)
            logger.error("%s", e)
            return 1
        urls = [r.url for r in replicas] + list(backends)
        app = create_router_app(urls, api_key=api_key, pids={r.url: r.proc.pid for r in replicas}, **router_kwargs)
        logger.info("router at http://%s:%d/v1 over %d replicas", host, port, len(urls))
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        stop(replicas)
    return 0


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def load_config(path: str) -> dict:
    """The router's YAML file (module docstring), checked; ``models[i].args`` become lists."""
    import yaml

    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    unknown = set(cfg) - {"host", "port", "api_key", "backends", "models"}
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    models = []
    for i, m in enumerate(cfg.get("models") or []):
        if not isinstance(m, dict) or "args" not in m or set(m) - {"args", "data_parallel_size"}:
            raise ValueError(f"{path}: models[{i}] needs `args` (and optionally `data_parallel_size`), got {m!r}")
        args = shlex.split(m["args"]) if isinstance(m["args"], str) else [str(a) for a in m["args"]]
        dp = m.get("data_parallel_size", 1)
        if not isinstance(dp, int) or dp < 1:
            raise ValueError(f"{path}: models[{i}].data_parallel_size must be a positive integer, got {dp!r}")
        models.append({"args": args, "data_parallel_size": dp})
    backends = cfg.get("backends") or []
    if not isinstance(backends, list) or not all(isinstance(b, str) for b in backends):
        raise ValueError(f"{path}: backends must be a list of URLs")
    return {**cfg, "models": models, "backends": backends}


def add_router_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--backend", action="append", default=[], metavar="URL",
                        help="A running vllm-engine server to route to (repeatable).")
    parser.add_argument("--serve", action="append", default=[], metavar="ARGS",
                        help='Start a replica with these `vllm-engine serve` arguments, e.g. '
                             '--serve "path/to/model --served-model-name a" (repeatable).')
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML file of models and backends "
                        "(docs/serving.md).")
    parser.add_argument("--host", default=None, help="Address to listen on (default 127.0.0.1).")
    parser.add_argument("--port", type=int, default=None, help="Port to listen on (default 8000).")
    parser.add_argument("--api-key", default=None, help="Require `Authorization: Bearer KEY`; also sent to "
                        "the replicas for the router's own calls (default: $VLLM_ENGINE_API_KEY).")
    parser.add_argument("--balance-slack-tokens", type=int, default=2048, help="Prefix affinity yields to the "
                        "least loaded replica when it has this many fewer outstanding tokens.")
    parser.add_argument("--health-interval", type=float, default=2.0, help="Seconds between health checks.")
    parser.add_argument("--startup-timeout", type=float, default=1800.0,
                        help="Seconds the launched replicas may take to load.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"])
    return parser


def run_router(args: argparse.Namespace) -> int:
    """``vllm-engine router``: launches what --serve and --config ask for, then routes."""
    from vllm_engine import envs

    cfg = load_config(args.config) if args.config else {"models": [], "backends": []}
    argvs = [m["args"] for m in cfg["models"] for _ in range(m["data_parallel_size"])]
    argvs += [shlex.split(s) for s in args.serve]
    backends = list(cfg["backends"]) + list(args.backend)
    if not argvs and not backends:
        raise ValueError("nothing to route to: give --backend URL, --serve ARGS or --config FILE")
    api_key = args.api_key or cfg.get("api_key") or envs.api_key()
    return serve_replicas(argvs, backends, args.host or cfg.get("host") or "127.0.0.1",
                          args.port or cfg.get("port") or 8000, api_key, args.log_level, args.startup_timeout,
                          balance_slack_tokens=args.balance_slack_tokens, health_interval=args.health_interval)


def run_data_parallel(args: argparse.Namespace) -> int:
    """``vllm-engine serve --data-parallel-size N``: N replicas of this same command behind the router."""
    argv = getattr(args, "serve_argv", None)
    if argv is None:
        raise ValueError("--data-parallel-size needs the command line (run it through `vllm-engine serve`)")
    replica_argv = strip_flags(argv, {"--data-parallel-size", "-dp", "--host", "--port"})
    return serve_replicas([replica_argv] * args.data_parallel_size, [], args.host, args.port, args.api_key,
                          args.log_level)
