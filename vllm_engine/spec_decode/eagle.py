"""EAGLE-1 heads: a one-layer draft that reads the target's hidden states.

Checkpoint (the published layout, e.g. yuhuili/EAGLE-LLaMA3-Instruct-8B): the config.json of a
Llama with ``num_hidden_layers`` 1; ``fc.weight`` [H, 2H] (and ``fc.bias`` when the head has one)
over [token embedding; target feature]; ``layers.0.*``: a Llama decoder layer without its input
norm; maybe ``embed_tokens.weight`` (the target's: not loaded); no final norm, no LM head: the
target's embedding and LM head serve the head. Safetensors or ``pytorch_model.bin``.

Positions. The target's feature h_p (its final-norm output at position p) predicts token p + 1.
The head at position p reads (h_p, token p + 1) and predicts token p + 2; its output g_p stands in
for h_(p+1) when it goes on alone. Its K/V for position p is in the slot of position p: the head's
cache uses the target's block ids, as a draft model's does (spec_decode/draft_model.py).

Each step (``forward_step``), for a request whose step computed positions [s, e): the head runs at
positions s - 1 .. e - 2 over the step's tokens s .. e - 1, with the features h_(s-1) (kept from
the request's previous step) and h_s .. h_(e-2) (this step's). Without a kept h_(s-1) (a prompt's
first chunk, a prefix-cache hit, after a preemption) it starts at s. Then the request's feature of
its last kept position is kept: e - 1, or in a verifying step the last token before the first
rejection (read on the device from the rejection sampler's output). The head lags the target by
one position: a block cached when a request ends lacks the head's K/V in its last slot, so after a
prefix hit the proposals there are worse (the outputs never change: verification decides).

Proposing (``DraftModelRunner.propose`` with ``position_offset`` -1): a request with L tokens (L - 1
computed) runs the head at L - 2 over (h_(L-2), token L - 1) -> d1, at L - 1 over (g_(L-2), d1) ->
d2, ...: k forwards, writing slots L - 2 .. L + k - 3, all the request's (L - 2 is computed: its
value there is the one the step's own forward writes).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from vllm_engine.attention.backend import AttentionMetadata
from vllm_engine.layers.linear import ReplicatedLinear
from vllm_engine.layers.rotary import get_rope
from vllm_engine.models import utils
from vllm_engine.models.causal_lm import LLAMA_STYLE_MAPPING
from vllm_engine.models.llama import LlamaDecoderLayer
from vllm_engine.spec_decode.draft_model import DraftModelRunner, ProposeContext

if TYPE_CHECKING:
    from vllm_engine.config import EngineConfig, ModelConfig
    from vllm_engine.distributed import IntermediateTensors
    from vllm_engine.worker.model_runner import StepInputs
    from vllm_engine.worker.request_states import CachedRequestState

_VERIFIED = -2  # a kept feature's position after a verifying step: len(token_ids) - 2 at its next use


class EagleDecoderLayer(LlamaDecoderLayer):
    """Layer 0 of an EAGLE-1 head: a Llama decoder layer without its input norm."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        del self.input_layernorm

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                kv_cache: torch.Tensor, attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        attn = self.self_attn(positions, self.self_attn.qkv_proj(hidden), kv_cache, attn_metadata)
        gate_up, residual = self.mlp.gate_up_proj.forward_norm(attn, hidden, self.post_attention_layernorm)
        return self.mlp(gate_up), residual


class EagleHead(nn.Module):
    """fc([embed(token); feature]) -> one decoder layer -> output features [n, H] (no final norm);
    the target's embedding and LM head (``target``, not a submodule: its weights stay the target's)."""

    def __init__(self, config: Any, target: nn.Module, attn_backend, max_position: int, dtype: torch.dtype,
                 quant_config: Any = None) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.fc = ReplicatedLinear(2 * hidden, hidden, bias=True, params_dtype=dtype, quant_config=quant_config,
                                   prefix="fc")
        self.rotary_emb = get_rope(config, utils.head_dim(config), max_position)
        self.layers = nn.ModuleList([EagleDecoderLayer(config, 0, attn_backend, self.rotary_emb, dtype, quant_config,
                                                       "layers.0")])
        object.__setattr__(self, "target", target)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate_tensors: "IntermediateTensors") -> torch.Tensor:
        """``intermediate_tensors.hidden_states``: the features [n, H] the tokens go with."""
        embeds = self.target.base_model.embed(input_ids, positions)
        x = self.fc(torch.cat([embeds, intermediate_tensors.hidden_states], dim=-1))
        out, residual = self.layers[0](positions, x, None, kv_caches[0], attn_metadata)
        return out + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.target.compute_logits(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The head's tensors under their published names (a ``model.`` prefix is dropped; the
        embedding, LM head and final norm, the target's, are skipped)."""
        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = name.removeprefix("model.")
                if name.split(".")[0] not in ("embed_tokens", "lm_head", "norm"):
                    yield name, tensor

        return utils.load_weights(self, renamed(), LLAMA_STYLE_MAPPING, skip=("rotary_emb.",))


def load_eagle_head(model_config: "ModelConfig", target: nn.Module, device: torch.device, attn_backend) -> EagleHead:
    """The head of ``model_config`` (its checkpoint, or dummy weights) over ``target``."""
    from vllm_engine.quantization import get_quant_config

    quant_config = get_quant_config(model_config.hf_config, device, None)
    with torch.device(device):
        head = EagleHead(model_config.hf_config, target, attn_backend, model_config.max_model_len,
                         model_config.dtype, quant_config)
    with torch.no_grad():
        head.fc.bias.zero_()  # heads without one
    return load_head(head, model_config, device, optional={"fc.bias"})


def load_head(head: nn.Module, model_config: "ModelConfig", device: torch.device,
              optional: frozenset[str] | set[str] = frozenset()) -> nn.Module:
    """``head`` (built on ``device``; its ``load_weights`` takes the checkpoint's (name, tensor)
    pairs and returns the names it loaded) filled from ``model_config``'s checkpoint, or with dummy
    weights when its load_format is "dummy"; processed after loading, in eval mode. A tensor the
    head refuses, or a parameter left without one (but those in ``optional``), is a ValueError
    naming ``speculative_config.model``."""
    from vllm_engine.model_loader import process_weights_after_loading

    with torch.no_grad():
        if model_config.load_format == "dummy":
            from vllm_engine.model_loader.weights import init_dummy_weights

            init_dummy_weights(head, model_config.seed)
        else:
            try:
                loaded = head.load_weights(_checkpoint_tensors(Path(model_config.model_path), device,
                                                               model_config.dtype))
            except ValueError as e:
                if str(e).startswith("speculative_config."):
                    raise
                raise ValueError(f"speculative_config.model: {model_config.model!r}: {e}") from e
            missing = sorted(utils.expected_weights(head, LLAMA_STYLE_MAPPING) - loaded - set(optional))
            if missing:
                raise ValueError(f"speculative_config.model: {model_config.model!r} lacks the EAGLE head's "
                                 f"{', '.join(missing[:6])}.")
    process_weights_after_loading(head)
    return head.eval()


def _checkpoint_tensors(path: Path, device: torch.device, dtype: torch.dtype) -> Iterable[tuple[str, torch.Tensor]]:
    """The checkpoint's (name, tensor) pairs on ``device``, floating tensors cast to ``dtype``
    (integer ones, an EAGLE-3 head's ``d2t``, keep theirs)."""
    if any(path.glob("*.safetensors")):
        from vllm_engine.model_loader.weights import iter_safetensors

        yield from iter_safetensors(path, device, dtype)
        return
    bins = sorted(path.glob("*.bin"))
    if not bins:
        raise ValueError(f"speculative_config.model: no *.safetensors or *.bin weights in {str(path)!r}.")
    for f in bins:
        for name, tensor in torch.load(f, map_location="cpu", weights_only=True).items():
            yield name, tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


class EagleProposer(DraftModelRunner):
    """An EAGLE-1 head on the worker: its KV cache on the target's block ids (as a draft model's),
    the target's feature of each request's last kept position, and the per-step forward above."""

    takes_hidden = True
    position_offset = -1

    def __init__(self, config: "EngineConfig", device: torch.device, attn_backend, target: nn.Module) -> None:
        super().__init__(config, device, attn_backend, target)
        hf = self.model_config.hf_config
        self.features = torch.zeros(16, hf.hidden_size, dtype=self.model_config.dtype, device=device)
        self._row: dict[str, int] = {}  # request id -> its row of ``features``
        self._free = list(range(15, -1, -1))
        self._pos: dict[str, int] = {}  # request id -> the position of its kept feature (or _VERIFIED)

    def _build_model(self, target: nn.Module) -> nn.Module:
        return load_eagle_head(self.model_config, target, self.device, self.attn_backend)

    def finish(self, req_ids) -> None:
        for rid in req_ids:
            row = self._row.pop(rid, None)
            if row is not None:
                self._free.append(row)
            self._pos.pop(rid, None)

    # ---- kept features -------------------------------------------------------------------------
    def _feature_position(self, st: "CachedRequestState") -> Optional[int]:
        pos = self._pos.get(st.req_id)
        return len(st.token_ids) - 2 if pos == _VERIFIED else pos

    def _rows(self, states: Sequence["CachedRequestState"]) -> np.ndarray:
        """Each request's row of ``features`` (new ones get one; the buffer doubles when full)."""
        out = np.empty(len(states), dtype=np.int64)
        for i, st in enumerate(states):
            row = self._row.get(st.req_id)
            if row is None:
                if not self._free:
                    n = self.features.shape[0]
                    self.features = torch.cat([self.features, torch.zeros_like(self.features)])
                    self._free = list(range(2 * n - 1, n - 1, -1))
                row = self._row[st.req_id] = self._free.pop()
            out[i] = row
        return out

    def _first_hidden(self, props: list["CachedRequestState"], ctx: ProposeContext) -> torch.Tensor:
        """h_(L-2) of each proposing request; zeros (and no K/V kept) where it is not known."""
        valid = np.fromiter((self._feature_position(st) == st.num_computed_tokens - 1 for st in props),
                            dtype=np.bool_, count=len(props))
        ctx.no_first_write |= ~valid
        rows_d, valid_d = self.staging.stage(self._rows(props), valid)
        return self.features.index_select(0, rows_d) * valid_d.unsqueeze(1).to(self.features.dtype)

    def _propose_one(self, ctx: ProposeContext, last: np.ndarray, drafts: torch.Tensor, j: int) -> None:
        if j == 0 and (ctx.pos0 < 0).any():  # a one-token prompt: no position before it
            ctx.no_first_write |= ctx.pos0 < 0
            ctx.pos0 = np.maximum(ctx.pos0, 0)
        super()._propose_one(ctx, last, drafts, j)

    # ---- the step's forward --------------------------------------------------------------------
    def forward_step(self, inputs: "StepInputs", hidden: torch.Tensor, states: Sequence["CachedRequestState"],
                     verified) -> None:
        """The head over the step's tokens with the target's features ``hidden`` [T, H] (module
        docstring), then each request's feature of its last kept position."""
        meta = inputs.attn_metadata
        qsl = np.asarray(meta.query_start_loc_cpu, dtype=np.int64)
        lens = np.asarray(meta.seq_lens_cpu, dtype=np.int64)
        starts = lens - (qsl[1:] - qsl[:-1])
        prev_ok = np.fromiter((self._feature_position(st) == s - 1 for st, s in zip(states, starts)),
                              dtype=np.bool_, count=len(states))
        rows = self._rows(states)
        first = starts - prev_ok
        n = np.maximum(lens - 1 - first, 0)  # head positions first .. e - 2
        if n.any():
            self._run_head(inputs, hidden, states, qsl, lens, starts, first, n, rows)
        self._keep(inputs, hidden, states, qsl, lens, rows, verified)

    def _run_head(self, inputs: "StepInputs", hidden: torch.Tensor, states: Sequence["CachedRequestState"],
                  qsl: np.ndarray, lens: np.ndarray, starts: np.ndarray, first: np.ndarray, n: np.ndarray,
                  rows: np.ndarray) -> None:
        sel = np.flatnonzero(n > 0)
        n_sel = n[sel]
        req = np.repeat(sel, n_sel)
        hq = np.zeros(sel.size + 1, dtype=np.int64)
        np.cumsum(n_sel, out=hq[1:])
        pos = first[req] + np.arange(int(hq[-1]), dtype=np.int64) - np.repeat(hq[:-1], n_sel)
        tok_rows = qsl[req] + pos + 1 - starts[req]  # the step's row of token pos + 1
        from_step = pos >= starts[req]
        feat_rows = np.where(from_step, qsl[req] + pos - starts[req], 0)  # h_pos among the step's rows
        prev = np.flatnonzero(~from_step)  # the head rows that take a kept feature
        seq_lens = lens[sel] - 1
        (tok_d, pos_d, qsl_d, lens_d, sel_d, req_d, feat_d, prev_d, prev_rows_d) = self.staging.stage(
            tok_rows, pos, hq.astype(np.int32), seq_lens.astype(np.int32), sel, req, feat_rows, prev,
            rows[req[prev]])
        # The step's block tables (its requests' rows, on the device) give the slots.
        bs = self.block_size
        step_tables = inputs.attn_metadata.block_tables
        slots_d = step_tables[req_d, pos_d // bs].to(torch.int64) * bs + pos_d % bs
        tables_d = step_tables.index_select(0, sel_d)
        feats = hidden.index_select(0, feat_d)
        if prev.size:
            feats.index_copy_(0, prev_d, self.features.index_select(0, prev_rows_d))
        head_meta = AttentionMetadata(
            num_actual_tokens=int(hq[-1]), num_seqs=int(sel.size), query_start_loc=qsl_d, seq_lens=lens_d,
            block_tables=tables_d, slot_mapping=slots_d, max_query_len=int(n_sel.max()),
            max_seq_len=int(seq_lens.max()), query_start_loc_cpu=hq.tolist(), seq_lens_cpu=seq_lens.tolist())
        self._run(inputs.input_ids.index_select(0, tok_d), pos_d, head_meta, feats)

    def _keep(self, inputs: "StepInputs", hidden: torch.Tensor, states: Sequence["CachedRequestState"],
              qsl: np.ndarray, lens: np.ndarray, rows: np.ndarray, verified) -> None:
        """Each request's feature of its last kept position into ``features``."""
        src = qsl[1:] - 1
        for st, e in zip(states, lens):
            self._pos[st.req_id] = int(e) - 1
        if verified is not None:
            k = np.asarray(inputs.num_draft_tokens, dtype=np.int64)
            idx = np.asarray(verified.req_indices, dtype=np.int64)
            src[idx] -= k  # the last token's row; its accepted drafts after it
            for i in idx:
                self._pos[states[i].req_id] = _VERIFIED
        src_d, rows_d = self.staging.stage(src, rows)
        if verified is not None:
            accepted = verified.accepted_counts()  # [B verified], on the device
            idx_d = self.staging.stage(idx)[0]
            src_d = src_d.clone().index_add_(0, idx_d, accepted)
        self.features.index_copy_(0, rows_d, hidden.index_select(0, src_d).to(self.features.dtype))
