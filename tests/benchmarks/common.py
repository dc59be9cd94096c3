"""Shared pieces of the benchmarks: workloads, the memory-bandwidth floor, the HF baseline, JSON/tables.

Run from the repository root, e.g. ``PYTHONPATH=. python tests/benchmarks/throughput.py --help``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch


@dataclass
class Workload:
    name: str
    prompts: list[list[int]]  # token ids
    output_lens: list[int]

    @property
    def input_lens(self) -> list[int]:
        return [len(p) for p in self.prompts]


def make_workload(dataset: str, vocab_size: int, num_prompts: int, input_len: int, output_len: int,
                  seed: int = 0) -> Workload:
    """``nano``: input and output lengths each uniform in [100, 1024] (nano-vllm's benchmark);
    ``random``: fixed lengths. Token ids are uniform random (with dummy weights content does not matter)."""
    rng = np.random.default_rng(seed)
    if dataset == "nano":
        in_lens = rng.integers(100, 1025, size=num_prompts)
        out_lens = rng.integers(100, 1025, size=num_prompts)
    elif dataset == "random":
        in_lens = np.full(num_prompts, input_len)
        out_lens = np.full(num_prompts, output_len)
    else:
        raise ValueError(f"unknown dataset {dataset!r}: nano or random")
    prompts = [rng.integers(0, vocab_size, size=int(n)).tolist() for n in in_lens]
    return Workload(dataset, prompts, [int(n) for n in out_lens])


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def measure_bandwidth_gbs(size_mib: int = 1024, iters: int = 20) -> Optional[float]:
    """Achieved device memory bandwidth of a large copy (read + write bytes / time), GB/s; None on CPU."""
    if not torch.cuda.is_available():
        return None
    n = size_mib * 2**20 // 2
    from vllm_engine.layers.triton_linear import cuda_time_s  # imports triton: only when measuring on a GPU

    a = torch.empty(n, dtype=torch.float16, device="cuda")
    b = torch.empty_like(a)
    return 2 * a.numel() * a.element_size() / cuda_time_s(lambda: b.copy_(a), reps=iters, flush_bytes=0) / 1e9


def weight_bytes(hf_config: Any, bytes_per_param: int = 2, num_tokens: Optional[int] = None) -> int:
    """Bytes of the weights read by one decode step of ``num_tokens`` tokens (all layers + LM head;
    embedding rows are negligible); of a mixture of experts only the experts expected to be touched
    (None: all). Per family: model_costs.py."""
    import model_costs

    return model_costs.weight_bytes(hf_config, bytes_per_param, num_tokens)


def kv_bytes_per_token(hf_config: Any, bytes_per_elem: int = 2) -> int:
    import model_costs

    return model_costs.kv_bytes_per_token(hf_config, bytes_per_elem)


def decode_floor_seconds(input_lens: list[int], output_lens: list[int], hf_config: Any, bandwidth_gbs: float,
                         max_num_seqs: int) -> float:  # the floor: bytes only, prefill not counted
    """Lower bound on the decode time of a workload: every step reads all weights once plus the KV of
    every running sequence, at the measured bandwidth. Requests start as soon as a slot frees (FCFS)."""
    kvt = kv_bytes_per_token(hf_config)
    bw = bandwidth_gbs * 1e9
    return sum((weight_bytes(hf_config, num_tokens=n) + kvt * context) / bw
               for n, context in fcfs_decode_steps(input_lens, output_lens, max_num_seqs))


def fcfs_decode_steps(input_lens: list[int], output_lens: list[int], max_num_seqs: int):
    """The decode steps of a workload when requests start as soon as a slot frees (FCFS): yields
    (running sequences, their summed context length) per step."""
    pending = list(zip(input_lens, output_lens))[::-1]
    running: list[list[int]] = []  # [context, remaining]
    while pending or running:
        while pending and len(running) < max_num_seqs:
            i, o = pending.pop()
            running.append([i, o])
        yield len(running), sum(r[0] for r in running)
        for r in running:
            r[0] += 1
            r[1] -= 1
        running = [r for r in running if r[1] > 0]


def linear_flops_per_token(hf_config: Any) -> int:
    """FLOPs of the decoder layers' matmuls for one token (2 per multiply-add; its top-k experts; no LM
    head, no attention)."""
    import model_costs

    return model_costs.linear_flops_per_token(hf_config)


def attention_flops(hf_config: Any, start: int, end: int) -> int:
    """Causal attention FLOPs (QK^T and PV) of the tokens at positions start..end-1, all layers."""
    heads = hf_config.num_attention_heads
    hd = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
    keys = (end * (end + 1) - start * (start + 1)) // 2  # sum of (p + 1) over the positions
    return 4 * hf_config.num_hidden_layers * heads * hd * keys


def roofline_floor_seconds(input_lens: list[int], output_lens: list[int], hf_config: Any, bandwidth_gbs: float,
                           peak_tflops: float, max_num_seqs: int) -> float:
    """A tighter lower bound than ``decode_floor_seconds``: it adds the prefill, and lets a step be
    bound by compute where that is slower than reading the weights.

    Prefill: every prompt's matmul and attention FLOPs at ``peak_tflops`` (the measured dense GEMM
    rate). Decode steps (FCFS as in decode_floor_seconds): max(weight read, the step's matmul FLOPs at
    peak) + the running sequences' KV read. Prefill and decode are not overlapped.
    """
    peak = peak_tflops * 1e12
    lin = linear_flops_per_token(hf_config)
    lm_head = 2 * hf_config.vocab_size * hf_config.hidden_size
    prefill = sum(n * lin + lm_head + attention_flops(hf_config, 0, n) for n in input_lens) / peak
    kvt = kv_bytes_per_token(hf_config)
    bw = bandwidth_gbs * 1e9
    decode = sum(max(weight_bytes(hf_config, num_tokens=n) / bw, n * (lin + lm_head) / peak) + kvt * context / bw
                 for n, context in fcfs_decode_steps(input_lens, output_lens, max_num_seqs))
    return prefill + decode


def measure_gemm_tflops(n: int = 8192, iters: int = 20) -> Optional[float]:
    """Achieved dense bf16 GEMM rate (n x n x n, median), TFLOPS; None on CPU."""
    if not torch.cuda.is_available():
        return None
    from vllm_engine.layers.triton_linear import cuda_time_s

    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / cuda_time_s(lambda: a @ b, reps=iters, flush_bytes=0) / 1e12

def linear_choices(engine: Any) -> Optional[dict]:
    """What the engine's LinearPicker chose per shape (None without one: CPU, or VLLM_ENGINE_LINEAR=cublas)."""
    from vllm_engine.quantization import linear_picker

    if engine.model_runner is None:  # the ranks run in worker processes
        return None
    picker = linear_picker(engine.model_runner.model)
    if picker is None:
        return None
    return {"summary": picker.summary(),
            "decisions": {str(key[:-2]): {"choice": choice, "us": {c: round(t * 1e6, 2) for c, t in times.items()}}
                          for key, (choice, times) in picker.decisions.items()}}


def percentiles(values: list[float], ps=(50, 90, 99)) -> dict[str, float]:
    if not values:
        return {f"p{p}": float("nan") for p in ps}
    arr = np.asarray(values, dtype=np.float64)
    return {f"p{p}": float(np.percentile(arr, p)) for p in ps}


# Phases of a step in the engine's step profile (Engine.enable_step_profile). host_ms is the host's own
# work (the step minus its wait for the GPU); with async scheduling it overlaps the GPU's previous step.
STEP_PHASES = ("schedule_ms", "prepare_inputs_ms", "execute_ms", "update_and_output_ms", "wait_ms", "host_ms",
               "total_ms")


def decode_step_medians(profile: list[dict], min_seqs: int, max_seqs: Optional[int] = None) -> dict:
    """Median of each phase over the decode-only steps of ``min_seqs`` to ``max_seqs`` sequences."""
    steps = [r for r in profile if r["num_tokens"] == r["num_seqs"] and r["num_seqs"] >= min_seqs
             and (max_seqs is None or r["num_seqs"] <= max_seqs)]
    if not steps:
        return {"steps": 0}
    return {"steps": len(steps), **{k: statistics.median(r[k] for r in steps) for k in STEP_PHASES}}


def step_costs(profile: list[dict], timeline: list | None) -> dict:
    """Median phases (the engine's step profile, ms) of the steps that verified proposals and of
    the plain decode steps, and each kind's median GPU time from step start to its last launched
    work (the runner's CUDA events; absent off CUDA): where a verifying step's time goes."""
    out = {}
    kinds = {"verify_step": lambda r: r["num_draft_tokens"] > 0,
             "plain_step": lambda r: r["num_draft_tokens"] == 0 and r["num_tokens"] == r["num_seqs"]}
    for name, is_kind in kinds.items():
        steps = [r for r in profile if is_kind(r)]
        out[name] = {"steps": len(steps), **({k: statistics.median(r[k] for r in steps) for k in STEP_PHASES}
                                              if steps else {})}
    if timeline:
        torch.cuda.synchronize()
        for name, multi in (("verify_step", True), ("plain_step", False)):
            gpu = [start.elapsed_time(end) for n, t, start, _, end in timeline if (t > n) == multi]
            out[name]["gpu_ms"] = statistics.median(gpu) if gpu else None
    return out


def write_json(path: Optional[str], data: dict) -> None:
    data = {"device": device_name(), "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"), **data}
    text = json.dumps(data, indent=2, default=str)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.1f}" if abs(v) >= 100 else f"{v:.3g}"
    return str(v)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def hf_model_from_config(hf_config: Any, dtype: torch.dtype, device: str):
    """HF transformers model with random weights of the same shape (the baseline for dummy-weight runs)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, torch_dtype=dtype)
    return model.eval()


def hf_static_generate(model: Any, workload: Workload, batch_size: int, device: str) -> tuple[float, int]:
    """HF ``generate`` in static batches (left-padded, each batch runs to its longest output).
    Returns (seconds, useful output tokens: each request's own output length)."""
    pad = 0
    total_tokens, t0 = 0, time.perf_counter()
    for s in range(0, len(workload.prompts), batch_size):
        prompts = workload.prompts[s: s + batch_size]
        outs = workload.output_lens[s: s + batch_size]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        with torch.inference_mode():
            model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max(outs),
                           min_new_tokens=max(outs), do_sample=False, pad_token_id=pad)
        total_tokens += sum(outs)
    sync()
    return time.perf_counter() - t0, total_tokens


def hf_generate_batch(model: Any, workload: Workload) -> Optional[tuple[float, int]]:
    """HF's continuous-batching ``generate_batch`` (transformers >= 4.56), if this version has it."""
    if not hasattr(model, "generate_batch"):
        return None
    from transformers import GenerationConfig

    max_out = max(workload.output_lens)
    cfg = GenerationConfig(max_new_tokens=max_out, do_sample=False, eos_token_id=-1, pad_token_id=0,
                           use_cuda_graph=False, scheduler="fifo")
    t0 = time.perf_counter()
    with torch.no_grad():  # its static buffers are updated in place outside inference mode
        results = model.generate_batch(inputs=workload.prompts, generation_config=cfg, progress_bar=False)
    sync()
    elapsed = time.perf_counter() - t0
    tokens = sum(len(getattr(r, "generated_tokens", None) or []) for r in (results or {}).values())
    if tokens == 0:
        raise RuntimeError("generate_batch produced no tokens (its generation loop failed; see the log)")
    return elapsed, tokens


def graph_time_s(fn, reps: int) -> float:
    """Median seconds of one replay of a CUDA graph of ``fn`` (timed like the linear picker's
    candidates, without an L2 flush: the graph's layers read distinct weights or caches)."""
    from vllm_engine.layers.triton_linear import cuda_time_s  # imports triton: only when measuring on a GPU

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    t = cuda_time_s(g.replay, reps=reps, flush_bytes=0)
    del g
    return t
