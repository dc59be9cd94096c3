"""What the model-family tests share: a tiny random HF checkpoint built with transformers' own config
class and ``save_pretrained``, and two checks against HF transformers on it.

* ``paged_logits_match_hf``: our model, run through the paged KV cache in a ragged batch of prefill
  chunks on cached prefixes and decodes (conftest's ``check_paged_logits_against_hf``), gives HF's
  logits at every position.
* ``engine_greedy_matches_hf``: the whole engine (scheduler, block manager, model runner, sampler)
  with small blocks, a small token budget (chunked prefill), prefix caching and a KV cache too small
  for every request at once (preemption) gives HF's greedy tokens token for token, and prompt
  logprobs within tolerance.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

from tests.e2e.test_engine_vs_hf import hf_greedy

PROMPTS = ["Hello, my name is", "The capital of France is a city that", "In the beginning",
           "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen"]
MAX_TOKENS = 10


def tiny_checkpoint(config: Any, out_dir: Path, tokenizer_dir: Path, seed: int = 0, norm_center: float = 1.0,
                    std: float = 0.1) -> Path:
    """Saves a random model of ``config`` (an HF config object) to ``out_dir`` with the tokenizer files
    of ``tokenizer_dir``. Weights normal(0, std); norm gains ``norm_center`` + normal(0, std) (Gemma
    stores w of a 1 + w gain: center 0); biases normal(0, std)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            is_norm = ("norm" in name or ".ln_" in name or name.startswith("ln_")) and name.endswith("weight")
            p.copy_(norm_center + noise if is_norm else noise)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    for f in tokenizer_dir.iterdir():
        if "token" in f.name or f.name == "generation_config.json":
            shutil.copy(f, out_dir / f.name)
    return out_dir


def checkpoint_factory(tiny_model_dir: Callable[[str], Path], tmp_path_factory: Any,
                       config_for: Callable[[str, Path], Any], edit: Optional[Callable[[Path], None]] = None,
                       **checkpoint_kw: Any) -> Callable[[str], Path]:
    """A module fixture's factory: ``make(variant)`` -> the tiny checkpoint of ``config_for(variant,
    tokenizer_dir)`` (``tiny_checkpoint`` with ``checkpoint_kw``, then ``edit(path)`` where given),
    built once per variant with the shared tiny tokenizer."""
    built: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in built:
            tiny = tiny_model_dir("llama")
            path = tiny_checkpoint(config_for(variant, tiny), tmp_path_factory.mktemp(variant), tiny, **checkpoint_kw)
            if edit is not None:
                edit(path)
            built[variant] = path
        return built[variant]

    return make


def spread_the_router(path: Path) -> None:
    """A mixture of experts' router weights (``...gate.weight``) x 10 and a visible correction bias
    (DeepSeek-V3's ``e_score_correction_bias``): clearly separated expert choices (no near-ties
    between HF and us)."""
    from safetensors.torch import load_file, save_file

    f = path / "model.safetensors"
    tensors = load_file(str(f))
    g = torch.Generator().manual_seed(3)
    for name in list(tensors):
        if name.endswith(".gate.weight"):
            tensors[name] = tensors[name] * 10
        if name.endswith("e_score_correction_bias"):
            tensors[name] = torch.randn(tensors[name].shape, generator=g) * 0.5
    save_file(tensors, str(f), metadata={"format": "pt"})


def parallel_matches_one_rank_and_hf(tmp_path: Path, jobs: list[tuple[str, str, str]], tp: int = 2,
                                     pp: int = 1) -> None:
    """Each (name, checkpoint path, load format) job run over tp x pp gloo processes gives the logits
    and greedy tokens of one process, and of HF transformers unless its weights are "dummy" (drawn,
    not the checkpoint's)."""
    from tests.distributed.test_tp_model import check_against_one_rank_and_hf, run_parallel

    got = run_parallel(tmp_path, tp=tp, pp=pp, jobs=jobs)
    for name, path, fmt in jobs:
        check_against_one_rank_and_hf(got[name], path, fmt, hf_check=fmt != "dummy")


def tokenizer_ids(tiny_dir: Path) -> dict:
    """vocab_size, bos/eos/pad ids of the shared tiny tokenizer, for a config's constructor."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    return dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=0)


def load_hf_reference(path: Path, **overrides: Any) -> Any:
    """HF transformers' model of ``path`` in float32 with its eager attention: the reference
    implementation of every family. (transformers 5.17 picks SDPA for Gemma 2 by default, which
    drops the attention soft cap; later releases refuse SDPA there.)"""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, attn_implementation="eager",
                                                **overrides).eval()


def load_ours_and_hf(path: Path, max_model_len: int = 256) -> tuple[Any, Any, Any]:
    """(our model on the CPU in float32 with the torch attention backend, its ModelConfig, HF's model)."""
    from vllm_engine.attention.torch_ref import TorchAttentionBackend
    from vllm_engine.config import EngineArgs
    from vllm_engine.model_loader import get_model

    cfg = EngineArgs(model=str(path), dtype="float32", device="cpu",
                     max_model_len=max_model_len).create_engine_config().model
    model = get_model(cfg, torch.device("cpu"), TorchAttentionBackend())
    return model, cfg, load_hf_reference(path)


# Three sequences: chunks on cached prefixes, whole prompts and decodes mixed in each step.
LENS = [39, 21, 7]
SCHEDULE = [[20, 0, 5], [12, 18, 1], [1, 1, 1], [1, 1, 0], [1, 1, 0], [1, 0, 0], [3, 0, 0]]


def paged_logits_match_hf(path: Path, paged_vs_hf: Any, tol: float = 1e-4) -> None:
    model, cfg, hf = load_ours_and_hf(path)
    paged_vs_hf(model, cfg, hf, LENS, SCHEDULE, tol=tol)


def engine_greedy_matches_hf(path: Path, tol: float = 1e-4, num_gpu_blocks: int = 14) -> Any:
    """Greedy tokens and prompt logprobs of the whole engine (block size 4, an 8-token budget so
    prompts are chunked, ``num_gpu_blocks`` (14) for 4 requests so some are preempted) against HF; then prompts
    again, one at a time (the repeated one finds its prefix in the cache). Returns the scheduler's stats."""
    from vllm_engine import Engine, SamplingParams

    hf = load_hf_reference(path)
    engine = Engine(model=str(path), dtype="float32", max_model_len=128, seed=0, block_size=4,
                    max_num_batched_tokens=8, max_num_seqs=4, num_gpu_blocks_override=num_gpu_blocks,
                    enable_prefix_caching=True)
    ids = [engine.tokenize(p) for p in PROMPTS]
    want = [hf_greedy(hf, prompt_ids, MAX_TOKENS) for prompt_ids in ids]
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True, prompt_logprobs=1)
    outs = engine.generate(PROMPTS, params, use_tqdm=False)
    for out, prompt_ids, (tokens, _, prompt_lps) in zip(outs, ids, want):
        assert out.token_ids == tokens
        got = [d[t].logprob for d, t in zip(out.prompt_logprobs[1:], prompt_ids[1:])]
        assert got == pytest.approx(prompt_lps, abs=tol)
    # Prompt logprobs need every prompt position computed: without them the prefix cache serves.
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for i in (3, 1, 1):  # the second PROMPTS[1] finds the first one's blocks
        assert engine.generate([PROMPTS[i]], params, use_tqdm=False)[0].token_ids == want[i][0]
    engine.scheduler.check_integrity()
    return engine.scheduler.get_stats()
