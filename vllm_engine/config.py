"""Frozen engine configuration, and EngineArgs: every user-facing knob, its CLI flag and its check, in one place.

``EngineArgs`` holds what the user said (Python kwargs or CLI flags, named as in vLLM).
``EngineArgs.create_engine_config()`` resolves the model (local path, GGUF, hub id, built-in
default), validates everything with a clear ``ValueError``, and returns an ``EngineConfig`` of
frozen dataclasses. Values only known at run time (number of KV blocks, EOS ids) are not stored here.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from vllm_engine.sampling_params import MAX_N

DEFAULT_MODEL = "SmolLM2-135M-Instruct"

_DTYPES = {
    "float32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass(frozen=True)
class ModelConfig:
    model: str  # what the user asked for
    model_path: str  # resolved local directory (HF checkpoint or bundled config) or GGUF file
    load_format: str  # "safetensors" | "gguf" | "dummy"
    hf_config: Any  # a transformers PretrainedConfig
    dtype: torch.dtype
    max_model_len: int
    seed: int
    served_model_name: str
    tokenizer: Optional[str] = None  # tokenizer source (directory / GGUF file / hub id); None: no tokenizer
    gguf_file: Optional[str] = None
    quantization: Optional[str] = None  # the quant method the weights are loaded with (None: unquantized)
    # Sampling defaults from the checkpoint's generation_config.json (temperature, top_p, eos_token_id, ...).
    generation_config: dict = field(default_factory=dict, compare=False, hash=False)

    @property
    def architecture(self) -> str:
        archs = getattr(self.hf_config, "architectures", None) or ["LlamaForCausalLM"]
        return archs[0]

    @property
    def vocab_size(self) -> int:
        return self.hf_config.vocab_size

    @property
    def num_layers(self) -> int:
        return self.hf_config.num_hidden_layers

    @property
    def num_heads(self) -> int:
        return self.hf_config.num_attention_heads

    @property
    def num_kv_heads(self) -> int:
        return getattr(self.hf_config, "num_key_value_heads", None) or self.num_heads

    @property
    def head_dim(self) -> int:
        return getattr(self.hf_config, "head_dim", None) or self.hf_config.hidden_size // self.num_heads


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    swap_space_gib: float = 4.0
    enable_prefix_caching: bool = True
    num_gpu_blocks_override: Optional[int] = None
    cpu_kv_cache_space_gib: float = 2.0  # KV cache size when running on the CPU
    # The attention window all layers share (Mistral v0.1, Phi-3): blocks before it are freed.
    sliding_window: Optional[int] = None
    # Models mixing attention kinds (Gemma 2/3: sliding-window and full layers): the layers' KV cache
    # groups (core/kv_cache_groups.py), each with its own block table per request. Empty: one group.
    kv_cache_groups: tuple = ()
    cache_dtype: Optional[torch.dtype] = None  # None: the model's dtype; torch.float8_e4m3fn for fp8


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 8192
    policy: str = "fcfs"  # "fcfs" | "priority"
    preemption_mode: str = "recompute"  # "recompute" | "swap"
    max_waiting_requests: Optional[int] = None
    max_n: int = 128  # the most samples one request may ask for


@dataclass(frozen=True)
class DeviceConfig:
    device: torch.device = torch.device("cpu")
    enforce_eager: bool = False
    attention_backend: Optional[str] = None  # None: triton on CUDA, torch elsewhere
    startup_cache: bool = True  # reuse the linear-kernel choices of earlier starts (worker/startup_cache.py)
    # Schedule step N+1 while the GPU runs step N (sampled tokens stay on the device); see engine.py.
    async_scheduling: bool = False


@dataclass(frozen=True)
class ParallelConfig:
    """How one model is spread over processes: ``tensor_parallel_size`` ranks split each layer,
    ``pipeline_parallel_size`` stages split the layers; world size = tp * pp.

    ``distributed_executor_backend``: "uni" (this process: one GPU or the CPU), "mp" (one process
    per rank, started by the engine), "torchrun" (the command itself was started by torchrun on
    one or several machines; each process is one rank). None picks "uni" for world size 1, else
    "torchrun" when torchrun's environment is present, else "mp".
    """

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    distributed_executor_backend: str = "uni"

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig
    cache: CacheConfig
    scheduler: SchedulerConfig
    device: DeviceConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: Optional[Any] = None  # spec_decode.SpeculativeConfig, None: off


# --kv-cache-dtype values -> the cache's element type (None: the model's dtype).
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def _arg(help: str, flag: Optional[str] = None, **kw) -> Any:
    """Field metadata: the CLI flag's help (and extra argparse options)."""
    return {"help": help, "flag": flag, **kw}


def _check_heads_split(hf_config: Any, tp: int, prefix: str = "") -> None:
    """ValueError (``prefix`` + what is wrong) unless ``tp`` ranks can split the model's attention
    heads evenly and its KV heads either split evenly or are replicated (``tp`` a multiple of them)."""
    heads = getattr(hf_config, "num_attention_heads", 1)
    if heads % tp:
        raise ValueError(f"{prefix}tensor_parallel_size={tp} must divide the model's {heads} attention heads.")
    kv_heads = getattr(hf_config, "num_key_value_heads", None) or heads
    if kv_heads % tp and tp % kv_heads:
        raise ValueError(f"{prefix}tensor_parallel_size={tp} and the model's {kv_heads} KV heads must divide "
                         "one another.")


def _check_draft_tp(draft_tp: Optional[int], tp: int) -> None:
    """A draft model or EAGLE head runs on the target's ranks, sharded as the target is (vLLM V1's
    rule): ``draft_tensor_parallel_size`` unset or equal to ``tensor_parallel_size``; any other
    value (1 under a tp > 1 target included) is a ValueError naming the field."""
    if draft_tp is not None and draft_tp != tp:
        raise ValueError(f"speculative_config.draft_tensor_parallel_size must be unset or equal to "
                         f"tensor_parallel_size ({tp}): the draft runs on the target's ranks, got {draft_tp}.")


@dataclass
class EngineArgs:
    model: Optional[str] = field(default=None, metadata=_arg(
        f"HF model directory, GGUF file, hub id, or a bundled config name with --load-format dummy (default: {DEFAULT_MODEL})."))
    tokenizer: Optional[str] = field(default=None, metadata=_arg("Tokenizer directory or hub id (default: the model's)."))
    dtype: str = field(default="auto", metadata=_arg(
        "Compute dtype: auto (float32 on CPU; the config's 16-bit dtype on GPU), float32, float16, bfloat16.",
        choices=["auto", "float32", "float", "float16", "half", "bfloat16"]))
    max_model_len: Optional[int] = field(default=None, metadata=_arg("Context length (default: the model's)."))
    max_num_seqs: int = field(default=256, metadata=_arg("Most sequences in one step."))
    max_num_batched_tokens: Optional[int] = field(default=None, metadata=_arg("Token budget of one step (default 8192)."))
    block_size: int = field(default=16, metadata=_arg("Tokens per KV cache block.", choices=[1, 8, 16, 32, 64, 128]))
    kv_cache_dtype: str = field(default="auto", metadata=_arg(
        "KV cache element type: auto (the model's dtype) or fp8 (e4m3, per-tensor scale 1, values clamped to "
        "+-448: half the bytes per block).", choices=list(KV_CACHE_DTYPES)))
    gpu_memory_utilization: float = field(default=0.9, metadata=_arg("This engine's fraction of GPU memory (weights, activations, KV cache), as in vLLM: two engines at 0.45 share a GPU."))
    swap_space: float = field(default=4.0, metadata=_arg("CPU swap space for preempted requests' KV blocks, GiB."))
    cpu_kv_cache_space: float = field(default=2.0, metadata=_arg("KV cache size on the CPU, GiB."))
    num_gpu_blocks_override: Optional[int] = field(default=None, metadata=_arg("Use this many KV blocks instead of profiling."))
    enable_prefix_caching: bool = field(default=True, metadata=_arg("Reuse KV blocks of shared prefixes.", action=argparse.BooleanOptionalAction))
    scheduling_policy: str = field(default="fcfs", metadata=_arg("fcfs or priority (lower priority value runs first).", choices=["fcfs", "priority"]))
    preemption_mode: str = field(default="recompute", metadata=_arg("What preemption does with KV blocks.", choices=["recompute", "swap"]))
    max_waiting_requests: Optional[int] = field(default=None, metadata=_arg(
        "Reject new requests (503) when this many sequences wait (a request with n samples counts n)."))
    max_n: int = field(default=128, metadata=_arg("The most samples (n) one request may ask for (OpenAI's limit is 128)."))
    seed: int = field(default=0, metadata=_arg("Random seed."))
    quantization: Optional[str] = field(default=None, metadata=_arg(
        "Quantization method of the weights: gptq, awq, compressed-tensors, fp8, gguf, squeezellm (default: the checkpoint's "
        "quantization_config, if any; fp8 also quantizes an unquantized checkpoint at load; gguf keeps a GGUF "
        "file's blocks quantized instead of dequantizing them at load). docs/quantization.md.", flag=("--quantization", "-q")))
    load_format: str = field(default="auto", metadata=_arg("auto, safetensors, gguf, or dummy (random weights).", choices=["auto", "safetensors", "gguf", "dummy"]))
    served_model_name: Optional[str] = field(default=None, metadata=_arg("Model name in the API (default: the model argument)."))
    device: str = field(default="auto", metadata=_arg("auto, cpu or cuda.", choices=["auto", "cpu", "cuda"]))
    enforce_eager: bool = field(default=False, metadata=_arg("Disable CUDA graphs.", action="store_true"))
    startup_cache: bool = field(default=True, metadata=_arg(
        "Reuse the linear-kernel choices and Triton kernels of earlier starts on this GPU and software (under the "
        "cache directory; --no-startup-cache times every shape and compiles every kernel again).",
        action=argparse.BooleanOptionalAction))
    attention_backend: Optional[str] = field(default=None, metadata=_arg("torch (reference) or triton.", choices=["torch", "triton"]))
    async_scheduling: Optional[bool] = field(default=None, metadata=_arg(
        "Overlap the CPU work of the next step with the GPU work of this one (default: on with CUDA).",
        action=argparse.BooleanOptionalAction))
    tensor_parallel_size: int = field(default=1, metadata=_arg(
        "Ranks that split each layer (tensor parallelism).", flag=("--tensor-parallel-size", "-tp")))
    pipeline_parallel_size: int = field(default=1, metadata=_arg(
        "Stages that split the layers (pipeline parallelism).", flag=("--pipeline-parallel-size", "-pp")))
    distributed_executor_backend: Optional[str] = field(default=None, metadata=_arg(
        "uni (this process), mp (one process per rank) or torchrun (started by torchrun); default: uni for "
        "one rank, torchrun under torchrun, else mp.", choices=["uni", "mp", "torchrun"]))

    speculative_config: Optional[Any] = field(default=None, metadata=_arg(
        "Speculative decoding as vLLM's JSON, e.g. '{\"method\": \"ngram\", \"num_speculative_tokens\": 4, "
        "\"prompt_lookup_max\": 4, \"prompt_lookup_min\": 2}' (docs/speculative_decoding.md).",
        flag="--speculative-config"))

    # ---- CLI ----------------------------------------------------------------------------------
    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> argparse.ArgumentParser:
        for f in dataclasses.fields(cls):
            if f.name in skip:
                continue
            meta = dict(f.metadata)
            flag = meta.pop("flag", None) or "--" + f.name.replace("_", "-")
            flags = flag if isinstance(flag, tuple) else (flag,)
            kw: dict[str, Any] = {"default": f.default, "help": meta.pop("help")}
            kw.update(meta)
            if "action" not in kw:
                base = f.type if isinstance(f.type, type) else str(f.type)
                kw["type"] = int if "int" in str(base) else float if "float" in str(base) else str
            parser.add_argument(*flags, dest=f.name, **kw)
        return parser

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "EngineArgs":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(args).items() if k in names})

    # ---- validation and resolution -----------------------------------------------------------
    def _check(self) -> None:
        def positive_int(name: str, value, allow_none: bool = False) -> None:
            if value is None and allow_none:
                return
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")

        positive_int("max_num_seqs", self.max_num_seqs)
        positive_int("max_num_batched_tokens", self.max_num_batched_tokens, allow_none=True)
        positive_int("max_model_len", self.max_model_len, allow_none=True)
        positive_int("block_size", self.block_size)
        positive_int("num_gpu_blocks_override", self.num_gpu_blocks_override, allow_none=True)
        positive_int("max_waiting_requests", self.max_waiting_requests, allow_none=True)
        positive_int("max_n", self.max_n)
        if self.max_n > MAX_N:
            raise ValueError(f"max_n must be at most {MAX_N}, got {self.max_n}.")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}.")
        if self.swap_space < 0 or self.cpu_kv_cache_space <= 0:
            raise ValueError("swap_space must be >= 0 and cpu_kv_cache_space > 0 (GiB).")
        if self.dtype not in ("auto", *_DTYPES):
            raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {self.dtype!r}.")
        for name, allowed in (
            ("scheduling_policy", ("fcfs", "priority")),
            ("preemption_mode", ("recompute", "swap")),
            ("load_format", ("auto", "safetensors", "gguf", "dummy")),
            ("device", ("auto", "cpu", "cuda")),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}.")
        if self.attention_backend not in (None, "torch", "triton"):
            raise ValueError(f"attention_backend must be 'torch' or 'triton', got {self.attention_backend!r}.")
        positive_int("tensor_parallel_size", self.tensor_parallel_size)
        positive_int("pipeline_parallel_size", self.pipeline_parallel_size)
        if self.distributed_executor_backend not in (None, "uni", "mp", "torchrun"):
            raise ValueError(f"distributed_executor_backend must be uni, mp or torchrun, got "
                             f"{self.distributed_executor_backend!r}.")

    def _parallel(self, hf_config: Any) -> ParallelConfig:
        """The parallel layout, checked against the model (heads and layers must split evenly)."""
        import os

        tp, pp = self.tensor_parallel_size, self.pipeline_parallel_size
        _check_heads_split(hf_config, tp)
        layers = getattr(hf_config, "num_hidden_layers", 1)
        if pp > layers:
            raise ValueError(f"pipeline_parallel_size={pp} is more than the model's {layers} layers.")
        backend = self.distributed_executor_backend
        if backend is None:
            backend = "uni" if tp * pp == 1 else "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "mp"
        if backend == "uni" and tp * pp > 1:
            raise ValueError("distributed_executor_backend='uni' runs one rank: use 'mp' or 'torchrun' for "
                             f"tensor_parallel_size * pipeline_parallel_size = {tp * pp}.")
        return ParallelConfig(tp, pp, backend)

    def _device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' was asked for, but no CUDA GPU is available.")
        return torch.device(self.device)

    def _dtype(self, hf_config: Any, device: torch.device) -> torch.dtype:
        if self.dtype != "auto":
            return _DTYPES[self.dtype]
        if device.type == "cpu":
            return torch.float32
        cfg = getattr(hf_config, "torch_dtype", None) or getattr(hf_config, "dtype", None)
        if isinstance(cfg, str):
            cfg = _DTYPES.get(cfg)
        return cfg if cfg in (torch.float16, torch.bfloat16) else torch.bfloat16

    def _quantization(self, hf_config: Any, load_format: str, device: torch.device) -> Optional[str]:
        """The quant method (checked against the checkpoint), its settings checked now: an unsupported
        combination is a ValueError at start, never at the first forward."""
        from vllm_engine.quantization import get_quant_config, resolve_quantization

        name = resolve_quantization(self.quantization, hf_config, load_format)
        if name is not None and name != "gguf":  # gguf: the file's tensor types, read when loading
            get_quant_config(hf_config, device, name)
        return name

    def _kv_cache_dtype(self, device: torch.device) -> Optional[torch.dtype]:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype must be one of {sorted(KV_CACHE_DTYPES)}, got {self.kv_cache_dtype!r}")
        dtype = KV_CACHE_DTYPES[self.kv_cache_dtype]
        return dtype

    def _speculative(self, parallel: ParallelConfig, model: ModelConfig, device: torch.device) -> Optional[Any]:
        """The checked SpeculativeConfig (None: off), and what this engine serves of it; a draft
        model is resolved here (``SpeculativeConfig.with_draft_model``)."""
        from vllm_engine.spec_decode import SpeculativeConfig

        spec = SpeculativeConfig.from_user(self.speculative_config)
        if spec is None:
            return None
        if parallel.pipeline_parallel_size > 1:
            raise ValueError("speculative_config cannot be combined with pipeline_parallel_size > 1 yet.")
        if spec.method in ("draft_model", "eagle", "eagle3"):
            _check_draft_tp(spec.draft_tensor_parallel_size, parallel.tensor_parallel_size)
            spec = spec.with_draft_model(model, device)
            _check_heads_split(spec.draft_model_config.hf_config, parallel.tensor_parallel_size,
                               f"speculative_config.model: the draft {spec.model!r}: ")
        return spec

    def create_engine_config(self) -> EngineConfig:
        from vllm_engine.model_loader.resolve import resolve_model

        self._check()
        device = self._device()
        resolved = resolve_model(self.model or DEFAULT_MODEL, load_format=self.load_format, tokenizer=self.tokenizer)
        hf_config = resolved.hf_config
        model_max = getattr(hf_config, "max_position_embeddings", None) or 2048
        max_model_len = self.max_model_len or model_max
        if max_model_len > model_max:
            raise ValueError(
                f"max_model_len={max_model_len} is larger than the model's max_position_embeddings={model_max}."
            )
        quantization = self._quantization(hf_config, resolved.load_format, device)
        max_batched = self.max_num_batched_tokens or max(8192, self.max_num_seqs)
        if max_batched < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({max_batched}) must be >= max_num_seqs ({self.max_num_seqs})."
            )
        model = ModelConfig(
            model=self.model or DEFAULT_MODEL,
            model_path=resolved.model_path,
            load_format=resolved.load_format,
            hf_config=hf_config,
            dtype=self._dtype(hf_config, device),
            max_model_len=max_model_len,
            seed=self.seed,
            served_model_name=self.served_model_name or self.model or DEFAULT_MODEL,
            tokenizer=resolved.tokenizer,
            gguf_file=resolved.gguf_file,
            quantization=quantization,
            generation_config=dict(resolved.generation_config or {}),
        )
        from vllm_engine.core.kv_cache_groups import make_kv_cache_groups
        from vllm_engine.models.utils import layer_sliding_window, uniform_sliding_window

        kv_cache_groups = make_kv_cache_groups([layer_sliding_window(model.hf_config, i)
                                                for i in range(model.hf_config.num_hidden_layers)])

        cache = CacheConfig(
            block_size=self.block_size,
            gpu_memory_utilization=self.gpu_memory_utilization,
            swap_space_gib=self.swap_space,
            enable_prefix_caching=self.enable_prefix_caching,
            num_gpu_blocks_override=self.num_gpu_blocks_override,
            cpu_kv_cache_space_gib=self.cpu_kv_cache_space,
            sliding_window=uniform_sliding_window(model.hf_config),
            kv_cache_groups=kv_cache_groups if len(kv_cache_groups) > 1 else (),
            cache_dtype=self._kv_cache_dtype(device),
        )
        scheduler = SchedulerConfig(
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=max_batched,
            max_model_len=max_model_len,
            policy=self.scheduling_policy,
            preemption_mode=self.preemption_mode,
            max_waiting_requests=self.max_waiting_requests,
            max_n=self.max_n,
        )
        dev = DeviceConfig(device=device, enforce_eager=self.enforce_eager or device.type != "cuda",
                           attention_backend=self.attention_backend, startup_cache=self.startup_cache,
                           async_scheduling=(device.type == "cuda" if self.async_scheduling is None
                                             else bool(self.async_scheduling)))
        parallel = self._parallel(hf_config)
        return EngineConfig(model=model, cache=cache, scheduler=scheduler, device=dev, parallel=parallel,
                            speculative=self._speculative(parallel, model, device))
