"""Sampler: turns the last position's logits of each request into one token id (and its logprobs).

Order of the logit transforms, per row (as vLLM):

1. ``logit_bias``                    logits[t] += bias[t]
2. ``min_tokens``                    EOS ids (unless ``ignore_eos``) and ``stop_token_ids`` -> -inf
                                     while ``len(output) < min_tokens``
3. ``repetition_penalty`` (HF)       over prompt + output tokens: positive logits / r, negative * r
4. frequency / presence (OpenAI)     over output tokens only: logit -= freq * count + pres * (count > 0)
5. greedy rows (temperature < 1e-5): argmax. Other rows: / temperature -> top_k -> top_p -> min_p
   -> sample by the exponential race ``argmax(probs / q)``, ``q ~ Exp(1)``.

Before all of them, a structured-output request's row keeps only the tokens its grammar allows
(``grammar_bitmask``: the other tokens become -inf; the other rows are untouched).

Logprobs are computed from the RAW logits (``log_softmax`` of the model output, before any of the
transforms above), as vLLM does by default: they describe the model, not the sampling rule.

Seeded rows draw ``q`` with their own ``torch.Generator``, so a seeded request yields the same tokens
whatever else is in the batch; the other rows share one batched draw.

Everything stays on the device: the only host sync is the caller's ``.tolist()`` of the sampled ids
(plus one ``.tolist()`` here when some row asked for logprobs).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
import torch
from torch import nn

from vllm_engine.core.sched_output import SampledLogprobs
from vllm_engine.sampling_params import SamplingParams
from vllm_engine.structured_output.bitmask import apply_token_bitmask
from vllm_engine.utils import host_to_device

if TYPE_CHECKING:
    from vllm_engine.worker.staging import HostStaging

_SAMPLING_EPS = 1e-5
# Up to this k a partial torch.topk beats a full sort of the vocabulary.
_PARTIAL_TOPK_MAX = 1024


def _padded_ids(rows: Sequence[Sequence[int]], use: Sequence[bool], pad: int) -> np.ndarray:
    """[B, L] int64 token ids of the rows where ``use`` is set, padded with ``pad`` (other rows: all
    padding). Built in numpy: a nested Python list through torch.tensor is several times slower."""
    width = max((len(r) for r, u in zip(rows, use) if u), default=0)
    arr = np.full((len(rows), max(width, 1)), pad, dtype=np.int64)
    for i, (r, u) in enumerate(zip(rows, use)):
        if u and len(r):
            arr[i, : len(r)] = r
    return arr


@dataclass
class SamplingMetadata:
    """Per-batch sampling tensors, built once per step. A field is None when no row uses it.

    Shapes: B = number of rows (requests sampled this step), V = vocab size.
    """

    num_rows: int
    vocab_size: int
    all_greedy: bool
    all_random: bool
    temperature: Optional[torch.Tensor]  # [B] float32; 1.0 on greedy rows (they are argmaxed anyway)
    greedy_mask: Optional[torch.Tensor]  # [B] bool, only for mixed batches
    top_k: Optional[torch.Tensor]  # [B] int64 in [1, V] (V = disabled)
    max_top_k: Optional[int]  # the largest enabled top_k (host int), None when top_k is None
    top_p: Optional[torch.Tensor]  # [B] float32 in (0, 1]
    min_p: Optional[torch.Tensor]  # [B] float32 in [0, 1]
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row -> generator (seeded rows)
    # Sparse updates by flat index row * V + token (index_add_ / index_fill_ never sync with the host):
    bias_index: Optional[torch.Tensor] = None  # [nnz] int64: logits.view(-1)[bias_index] += bias_values
    bias_values: Optional[torch.Tensor] = None  # [nnz] float32
    min_tokens_index: Optional[torch.Tensor] = None  # [nnz] int64: logits.view(-1)[...] = -inf (EOS/stop ids)
    repetition_penalty: Optional[torch.Tensor] = None  # [B] float32 (1.0 = off)
    frequency_penalty: Optional[torch.Tensor] = None  # [B] float32
    presence_penalty: Optional[torch.Tensor] = None  # [B] float32
    prompt_token_ids: Optional[torch.Tensor] = None  # [B, Lp] int64, padded with V (only for repetition)
    output_token_ids: Optional[torch.Tensor] = None  # [B, Lo] int64, padded with V (only for penalties)
    max_num_logprobs: Optional[int] = None  # max over rows of params.logprobs; None: no row asked
    # Structured outputs (set by the model runner): rows grammar_rows may only sample the tokens whose
    # bits are set in grammar_bitmask (structured_output/bitmask.py); None when no row is constrained.
    grammar_bitmask: Optional[torch.Tensor] = None  # [R, ceil(V / 32)] int32
    grammar_rows: Optional[torch.Tensor] = None  # [R] int64

    @property
    def no_penalties(self) -> bool:
        return (self.repetition_penalty is None and self.frequency_penalty is None
                and self.presence_penalty is None)

    @classmethod
    def from_requests(cls, params: list[SamplingParams], output_token_ids: list[list[int]],
                      prompt_token_ids: list[list[int]], eos_token_ids: list[set[int]],
                      generators: dict[int, torch.Generator], vocab_size: int,
                      device: torch.device, staging: Optional["HostStaging"] = None) -> "SamplingMetadata":
        """Builds the tensors for one step; rows are in the order of ``params``.

        Cheap by design: one list pass and at most one array per field that some row uses. The
        arrays go to the device together: in one copy through ``staging`` (the runner's
        worker/staging.HostStaging) when given, else one ``host_to_device`` each.
        """
        device = torch.device(device)
        V = vocab_size
        B = len(params)
        greedy = [p.temperature < _SAMPLING_EPS for p in params]
        all_greedy, all_random = all(greedy), not any(greedy)
        arrays: dict[str, np.ndarray] = {}  # field name -> host array, sent to the device at the end

        max_top_k = None
        if not all_greedy:
            arrays["temperature"] = np.array([1.0 if g else p.temperature for p, g in zip(params, greedy)],
                                             dtype=np.float32)
            if not all_random:
                arrays["greedy_mask"] = np.array(greedy, dtype=np.bool_)
            # Filters only matter on random rows; greedy rows are argmaxed before them.
            ks = [p.top_k for p, g in zip(params, greedy) if 0 < p.top_k < V and not g]
            if ks:
                max_top_k = max(ks)
                arrays["top_k"] = np.array([min(p.top_k, V) if p.top_k > 0 else V for p in params], dtype=np.int64)
            if any(p.top_p < 1.0 and not g for p, g in zip(params, greedy)):
                arrays["top_p"] = np.array([p.top_p for p in params], dtype=np.float32)
            if any(p.min_p > 0.0 and not g for p, g in zip(params, greedy)):
                arrays["min_p"] = np.array([p.min_p for p in params], dtype=np.float32)
            seeded = {r: g for r, g in generators.items() if not greedy[r]}
        else:
            seeded = {}

        # logit_bias: sparse (flat index, value) pairs.
        if any(p.logit_bias for p in params):
            index, vals = [], []
            for r, p in enumerate(params):
                if p.logit_bias:
                    for tok, b in p.logit_bias.items():
                        if 0 <= tok < V:
                            index.append(r * V + tok)
                            vals.append(b)
            if index:
                arrays["bias_index"] = np.array(index, dtype=np.int64)
                arrays["bias_values"] = np.array(vals, dtype=np.float32)

        # min_tokens: the ids that would end the request too early.
        if any(p.min_tokens > len(out) for p, out in zip(params, output_token_ids)):
            index = []
            for r, (p, out) in enumerate(zip(params, output_token_ids)):
                if p.min_tokens > len(out):
                    banned = set(p.stop_token_ids or ())
                    if not p.ignore_eos:
                        banned |= set(eos_token_ids[r])
                    index.extend(r * V + t for t in sorted(banned) if 0 <= t < V)
            if index:
                arrays["min_tokens_index"] = np.array(index, dtype=np.int64)

        # Penalties: tensors only when some row uses them, token ids only of the rows that do.
        rep_rows = [p.repetition_penalty != 1.0 for p in params]
        freq_rows = [p.frequency_penalty != 0.0 for p in params]
        pres_rows = [p.presence_penalty != 0.0 for p in params]
        if any(rep_rows):
            arrays["repetition_penalty"] = np.array([p.repetition_penalty for p in params], dtype=np.float32)
            arrays["prompt_token_ids"] = _padded_ids(prompt_token_ids, rep_rows, V)
        if any(freq_rows):
            arrays["frequency_penalty"] = np.array([p.frequency_penalty for p in params], dtype=np.float32)
        if any(pres_rows):
            arrays["presence_penalty"] = np.array([p.presence_penalty for p in params], dtype=np.float32)
        if any(rep_rows) or any(freq_rows) or any(pres_rows):
            used = [a or b or c for a, b, c in zip(rep_rows, freq_rows, pres_rows)]
            arrays["output_token_ids"] = _padded_ids(output_token_ids, used, V)

        meta = cls(num_rows=B, vocab_size=V, all_greedy=all_greedy, all_random=all_random, temperature=None,
                   greedy_mask=None, top_k=None, max_top_k=max_top_k, top_p=None, min_p=None, generators=seeded)
        if arrays:
            if staging is not None:
                tensors = staging.stage(*arrays.values())
            else:
                tensors = [host_to_device(torch.from_numpy(a), device) for a in arrays.values()]
            for name, t in zip(arrays, tensors):
                setattr(meta, name, t)

        asked = [p.logprobs for p in params if p.logprobs is not None]
        meta.max_num_logprobs = max(asked) if asked else None
        return meta


@dataclass
class SamplerOutput:
    sampled_token_ids: torch.Tensor  # [B] int64 on the device
    # Per row when any row asked for logprobs (top-N, N = the max asked; the caller trims), else None.
    logprobs: Optional[list[SampledLogprobs]]


class Sampler(nn.Module):
    """``forward(logits [B, V] (any float dtype; computed on as float32), meta) -> SamplerOutput``.
    Never modifies ``logits``. Its only
    state is the host RNG that seeds the one-pass sampler of unseeded temperature-only batches."""

    def forward(self, logits: torch.Tensor, meta: SamplingMetadata) -> SamplerOutput:
        # Logprobs come from the raw model output, before any transform.
        raw_logprobs = None
        if meta.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits.float(), dim=-1)

        if meta.grammar_bitmask is not None:  # before every path below, after the raw logprobs
            logits = apply_token_bitmask(logits, meta.grammar_bitmask, meta.grammar_rows)
        needs_transform = (meta.bias_index is not None or meta.min_tokens_index is not None
                           or not meta.no_penalties)
        if meta.all_greedy and not needs_transform:
            sampled = logits.argmax(dim=-1)  # fast path: plain greedy decoding
        elif logits.is_cuda and self._one_pass_ok(meta, needs_transform):
            # Temperature only, no seeds: one Triton pass over the logits (layers/triton_sampler.py).
            from vllm_engine.layers.triton_sampler import gumbel_sample

            temp = meta.temperature if meta.greedy_mask is None else meta.temperature.masked_fill(meta.greedy_mask, 0.0)
            sampled = gumbel_sample(logits, temp, self._rng.getrandbits(31))
        else:
            # One private copy; every later step works in place on it.
            logits = logits.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
            apply_logit_bias_and_min_tokens(logits, meta)
            apply_penalties(logits, meta)
            sampled = self._sample(logits, meta)

        logprobs = None
        if raw_logprobs is not None:
            logprobs = _gather_logprobs(raw_logprobs, sampled, meta.max_num_logprobs)
        return SamplerOutput(sampled_token_ids=sampled, logprobs=logprobs)

    def __init__(self) -> None:
        super().__init__()
        import random

        self._rng = random.Random(0)  # per-step seeds of the one-pass sampler (unseeded requests only)

    @staticmethod
    def _one_pass_ok(meta: SamplingMetadata, needs_transform: bool) -> bool:
        return (not needs_transform and not meta.generators and meta.top_k is None and meta.top_p is None
                and meta.min_p is None)

    @staticmethod
    def _sample(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
        """logits: [B, V] float32 (already penalised; modified in place). Returns [B] int64."""
        if meta.all_greedy:
            return logits.argmax(dim=-1)
        greedy_ids = logits.argmax(dim=-1) if not meta.all_random else None
        logits.div_(meta.temperature.unsqueeze(1))
        apply_top_k_top_p(logits, meta.top_k, meta.top_p, meta.max_top_k)
        if meta.min_p is not None:
            apply_min_p(logits, meta.min_p)
        probs = torch.softmax(logits, dim=-1)
        random_ids = exponential_race(probs, meta.generators)
        if greedy_ids is None:
            return random_ids
        return torch.where(meta.greedy_mask, greedy_ids, random_ids)


# ---- the transforms (each works in place on a [B, V] float32 tensor) -------------------------------
def apply_logit_bias_and_min_tokens(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """logits: contiguous [B, V] float32, modified in place."""
    flat = logits.view(-1)
    if meta.bias_index is not None:
        flat.index_add_(0, meta.bias_index, meta.bias_values)
    if meta.min_tokens_index is not None:
        flat.index_fill_(0, meta.min_tokens_index, float("-inf"))


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, L] ids padded with ``vocab_size`` -> [B, V] int32 counts (the padding column is dropped)."""
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.int32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def _token_mask(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, L] ids padded with ``vocab_size`` -> [B, V] bool: which ids occur."""
    mask = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.bool, device=token_ids.device)
    mask.scatter_(1, token_ids, True)
    return mask[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, meta: SamplingMetadata) -> None:
    """Repetition (HF, prompt + output) then frequency / presence (OpenAI, output only)."""
    if meta.no_penalties:
        return
    V = logits.shape[1]
    out_counts = _token_counts(meta.output_token_ids, V)
    if meta.repetition_penalty is not None:
        seen = _token_mask(meta.prompt_token_ids, V) | (out_counts > 0)
        penalty = torch.where(seen, meta.repetition_penalty.unsqueeze(1), 1.0)
        # HF semantics: push a seen token's logit towards "less likely" whatever its sign.
        logits.copy_(torch.where(logits > 0, logits / penalty, logits * penalty))
    if meta.frequency_penalty is not None:
        logits.sub_(meta.frequency_penalty.unsqueeze(1) * out_counts)
    if meta.presence_penalty is not None:
        logits.sub_(meta.presence_penalty.unsqueeze(1) * (out_counts > 0))


def apply_top_k_top_p(logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor],
                      max_top_k: Optional[int] = None) -> None:
    """Masks (to -inf) what top-k, then top-p over the renormalised remainder, leave out. One sort.

    top_k: [B] int64 in [1, V] (V keeps all); ties with the k-th value are kept. max_top_k: the
    largest k < V in ``top_k`` (a host int, lets top-k alone use a partial ``topk`` instead of a sort).
    top_p: [B] float32; keeps the smallest set of most likely tokens whose probability reaches p
    (a token stays when the mass strictly above it is < p). The most likely token always stays.
    """
    if top_k is None and top_p is None:
        return
    V = logits.shape[1]
    if top_p is None and max_top_k is not None and max_top_k <= _PARTIAL_TOPK_MAX:
        # No full sort: the k-th largest value is a threshold, which a partial top-k up to the
        # largest k asked for gives. Rows without top-k (k = V) get threshold -inf.
        kth = logits.topk(max_top_k, dim=-1).values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
        thresh = torch.where(top_k.unsqueeze(1) >= V, float("-inf"), kth)
        logits.masked_fill_(logits < thresh, float("-inf"))
        return
    sorted_logits, sorted_idx = torch.sort(logits, dim=-1, descending=False)
    if top_k is not None:
        thresh = sorted_logits.gather(1, (V - top_k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < thresh, float("-inf"))
    if top_p is not None:
        probs = torch.softmax(sorted_logits, dim=-1)
        cum = torch.cumsum(probs, dim=-1)  # mass at-or-below each position (ascending order)
        drop = cum <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    logits.scatter_(1, sorted_idx, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Masks tokens whose probability is below ``min_p * max probability`` (on the tempered logits).

    p_i < min_p * p_max  <=>  logit_i - logit_max < log(min_p); min_p = 0 gives -inf (keeps all).
    """
    max_logit = logits.amax(dim=-1, keepdim=True)
    logits.masked_fill_(logits - max_logit < torch.log(min_p).unsqueeze(1), float("-inf"))


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Samples one index per row of ``probs`` [B, V]: argmax(probs / q), q ~ Exp(1) i.i.d.

    P(argmax = i) = probs_i exactly (the first arrival of independent exponential clocks). Seeded
    rows draw their q from their own generator, so they do not depend on the rest of the batch.
    """
    q = torch.empty_like(probs)
    if len(generators) < probs.shape[0]:
        q.exponential_()
    for row, gen in generators.items():
        q[row].exponential_(generator=gen)
    # Exp(1) can round to 0; 0/0 would be NaN (which argmax picks), so keep q strictly positive.
    q.clamp_min_(torch.finfo(q.dtype).tiny)
    return probs.div_(q).argmax(dim=-1)


# ---- logprobs ------------------------------------------------------------------------------------------
def _gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[SampledLogprobs]:
    """logprobs: [N, V] float32 log_softmax; token_ids: [N] int64. One host transfer in all."""
    token_ids = token_ids.to(torch.int64)
    sampled_lp = logprobs.gather(1, token_ids.unsqueeze(1))  # [N, 1]
    rank = (logprobs > sampled_lp).sum(dim=-1, keepdim=True) + 1  # 1-based
    k = min(max(int(k), 0), logprobs.shape[1])
    top_lp, top_ids = logprobs.topk(k, dim=-1) if k > 0 else (logprobs[:, :0], token_ids[:, None][:, :0])
    # Pack everything into one float64 tensor so the host sees one copy (ids < 2^53 are exact).
    packed = torch.cat([sampled_lp.double(), rank.double(), top_ids.double(), top_lp.double()], dim=1).tolist()
    out = []
    for row in packed:
        out.append(SampledLogprobs(sampled_logprob=row[0], sampled_rank=int(row[1]),
                                   top_token_ids=[int(t) for t in row[2: 2 + k]], top_logprobs=row[2 + k:]))
    return out


def compute_logprobs_topk(logits: torch.Tensor, token_ids: torch.Tensor, k: int) -> list[SampledLogprobs]:
    """Logprobs of ``token_ids`` [N] under ``logits`` [N, V] (raw model output), with their 1-based
    ranks and the top-``k`` alternatives of each row (``k`` may be 0)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return _gather_logprobs(logprobs, token_ids.to(logits.device), k)
