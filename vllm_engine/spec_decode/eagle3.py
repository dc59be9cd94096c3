"""EAGLE-3 heads: a one-layer draft that reads three of the target's layers and has its own
vocabulary.

Checkpoint (the published layout, e.g. yuhuili/EAGLE3-LLaMA3.1-Instruct-8B): the config.json of a
Llama with ``num_hidden_layers`` 1 (architectures such as ``LlamaForCausalLMEagle3``), maybe
``draft_vocab_size`` (absent: ``vocab_size``), ``target_hidden_size``, ``norm_before_residual`` and
``eagle_aux_hidden_state_layer_ids``; tensors (a ``model.`` prefix is dropped, ``midlayer.`` is
``layers.0.``):

- ``fc.weight`` [H, 3 H_target]: the three auxiliary hidden states, concatenated, to one feature;
- ``midlayer.input_layernorm`` / ``midlayer.hidden_norm`` [H]: the norms of the token embedding and
  of the feature; ``midlayer.self_attn.{q,k,v}_proj`` over their concatenation (input 2H),
  ``o_proj``, ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``: a Llama layer otherwise;
- ``norm.weight`` [H], ``lm_head.weight`` [draft_vocab, H]: the head's own final norm and LM head;
- ``d2t`` [draft_vocab] int64: draft id i is target id i + d2t[i] (required when the draft
  vocabulary is smaller); ``t2d`` [vocab] bool (unused: the map above is all a proposal needs);
- maybe ``embed_tokens.weight`` [vocab, H]: then the head embeds with it (as vLLM does), else with
  the target's embedding.

Auxiliary hidden states (vLLM's and the EAGLE repository's definition): the residual stream entering
target layers (2, L // 2, L - 3) of L, or the config's ``eagle_aux_hidden_state_layer_ids``; HF's
``output_hidden_states[i]``. The target's decoder writes them into a buffer it owns
(``DecoderStack.keep_aux_hidden_states``, asked for by ``Eagle3Proposer``).

The layer, for a token embedding e and a feature h (both [H]):
``x = [input_layernorm(e); hidden_norm(h)]``, ``r = h`` (``norm_before_residual``: ``hidden_norm(h)``),
``a = o_proj(attn(qkv_proj(x)))``, ``r' = a + r``, ``out = mlp(post_attention_layernorm(r')) + r'``.
``out`` is the head's output g (the next draft step's feature, no fc); the logits are
``lm_head(norm(g))`` over the draft vocabulary, placed at their target ids (-inf elsewhere), so the
argmax and the proposal distribution are the target's ids.

Positions, the per-step forward and proposing are EAGLE-1's (spec_decode/eagle.py, ``EagleProposer``):
the feature of position p is ``fc(aux_p)`` instead of the target's last hidden state.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

import torch
from torch import nn

from vllm_engine.attention.backend import AttentionMetadata
from vllm_engine.layers.layernorm import RMSNorm
from vllm_engine.layers.linear import QKVParallelLinear, ReplicatedLinear
from vllm_engine.layers.rotary import get_rope
from vllm_engine.layers.vocab_parallel_embedding import LogitsProcessor, ParallelLMHead, VocabParallelEmbedding
from vllm_engine.models import utils
from vllm_engine.models.causal_lm import LLAMA_STYLE_MAPPING
from vllm_engine.models.llama import LlamaDecoderLayer
from vllm_engine.spec_decode.config import eagle3_aux_layer_ids
from vllm_engine.spec_decode.eagle import EagleProposer, load_head

if TYPE_CHECKING:
    from vllm_engine.config import EngineConfig, ModelConfig
    from vllm_engine.distributed import IntermediateTensors
    from vllm_engine.worker.model_runner import StepInputs
    from vllm_engine.worker.request_states import CachedRequestState


class Eagle3DecoderLayer(LlamaDecoderLayer):
    """The head's layer: a Llama layer whose attention reads [input_layernorm(embeds); hidden_norm(hidden)]."""

    def __init__(self, config: Any, attn_backend, rotary_emb, dtype: torch.dtype, quant_config: Any,
                 prefix: str = "layers.0") -> None:
        super().__init__(config, 0, attn_backend, rotary_emb, dtype, quant_config, prefix)
        attn, hidden = self.self_attn, config.hidden_size
        qkv_bias = attn.options(config)[0]
        attn.qkv_proj = QKVParallelLinear(2 * hidden, utils.head_dim(config), config.num_attention_heads,
                                          getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                                          bias=qkv_bias, params_dtype=dtype, quant_config=quant_config,
                                          prefix=f"{prefix}.self_attn.qkv_proj")
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps, dtype)
        self.norm_before_residual = bool(getattr(config, "norm_before_residual", False))

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor, hidden: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """(the MLP's output, the residual stream before it): their sum is the head's output."""
        normed = self.hidden_norm(hidden)
        residual = normed if self.norm_before_residual else hidden
        x = torch.cat([self.input_layernorm(embeds), normed], dim=-1)
        attn = self.self_attn(positions, self.self_attn.qkv_proj(x), kv_cache, attn_metadata)
        gate_up, residual = self.mlp.gate_up_proj.forward_norm(attn, residual, self.post_attention_layernorm)
        return self.mlp(gate_up), residual


class Eagle3Head(nn.Module):
    """``forward(...) -> g [n, H]`` (the layer's output, before the final norm) from the features
    ``intermediate_tensors.hidden_states`` [n, H] (``fc`` already applied to the target's);
    ``compute_logits(g) -> [n, vocab]`` over the target's ids (draft ids mapped by ``d2t``, -inf
    where no draft id lands). ``target`` (not a submodule) embeds unless the head has its own."""

    def __init__(self, config: Any, target: nn.Module, attn_backend, max_position: int, dtype: torch.dtype,
                 quant_config: Any, num_aux: int) -> None:
        super().__init__()
        hidden = self.hidden_size = config.hidden_size
        self.num_aux = num_aux
        self.target_hidden_size = getattr(config, "target_hidden_size", None) or hidden
        self.vocab_size = config.vocab_size
        self.draft_vocab_size = getattr(config, "draft_vocab_size", None) or config.vocab_size
        self.fc = ReplicatedLinear(num_aux * self.target_hidden_size, hidden, bias=False, params_dtype=dtype,
                                   quant_config=quant_config, prefix="fc")
        self.rotary_emb = get_rope(config, utils.head_dim(config), max_position)
        self.layers = nn.ModuleList([Eagle3DecoderLayer(config, attn_backend, self.rotary_emb, dtype, quant_config)])
        self.norm = RMSNorm(hidden, config.rms_norm_eps, dtype)
        self.lm_head = ParallelLMHead(self.draft_vocab_size, hidden, dtype, quant_config=quant_config,
                                      prefix="lm_head")
        self.logits_processor = LogitsProcessor(self.draft_vocab_size)
        self.embed_tokens: Optional[nn.Module] = None  # the checkpoint's own embedding, when it has one
        # The target id of each draft id; None: the same ids (a full draft vocabulary, d2t zero).
        self.draft_to_target: Optional[torch.Tensor] = None
        self.set_vocab_map(torch.zeros(self.draft_vocab_size, dtype=torch.int64))
        self._dtype = dtype
        object.__setattr__(self, "target", target)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate_tensors: "IntermediateTensors") -> torch.Tensor:
        embeds = (self.embed_tokens(input_ids) if self.embed_tokens is not None
                  else self.target.base_model.embed(input_ids, positions))
        out, residual = self.layers[0](positions, embeds, intermediate_tensors.hidden_states, kv_caches[0],
                                       attn_metadata)
        return out + residual

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.logits_processor(self.lm_head, self.norm(hidden))
        if self.draft_to_target is None:
            return logits
        out = logits.new_full((logits.shape[0], self.vocab_size), float("-inf"))
        return out.index_copy_(1, self.draft_to_target, logits)

    def set_vocab_map(self, d2t: torch.Tensor) -> None:
        """``draft_to_target`` from the checkpoint's ``d2t`` (target id = draft id + d2t[draft id]).
        ValueError unless it has draft_vocab_size entries mapping to distinct ids below vocab_size."""
        if tuple(d2t.shape) != (self.draft_vocab_size,) or d2t.is_floating_point():
            raise ValueError(f"d2t has shape {list(d2t.shape)} ({d2t.dtype}): the head's draft_vocab_size is "
                             f"{self.draft_vocab_size}, so d2t must be {self.draft_vocab_size} integers.")
        ids = torch.arange(self.draft_vocab_size, device=d2t.device) + d2t.to(torch.int64)
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size or ids.unique().numel() != ids.numel():
            raise ValueError(f"d2t maps draft ids outside [0, vocab_size {self.vocab_size}) or two to one target id.")
        full = self.draft_vocab_size == self.vocab_size and bool((d2t == 0).all())
        self.draft_to_target = None if full else ids

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The head's tensors under their published names (module docstring); returns the names
        loaded (``layers.0.*`` for ``midlayer.*``). ValueError for an fc of the wrong width, a
        wrong or (with a smaller draft vocabulary) missing ``d2t``, an embedding of the wrong shape."""
        loaded: set[str] = set()
        d2t: list[torch.Tensor] = []

        def renamed() -> Iterable[tuple[str, torch.Tensor]]:
            for name, tensor in weights:
                name = name.removeprefix("model.").replace("midlayer.", "layers.0.")
                if name == "d2t":
                    d2t.append(tensor)
                elif name == "t2d":
                    continue
                elif name == "embed_tokens.weight":
                    self._load_own_embedding(tensor)
                    loaded.add(name)
                else:
                    if name == "fc.weight":
                        self._check_fc(tensor)
                    yield name, tensor

        loaded |= utils.load_weights(self, renamed(), LLAMA_STYLE_MAPPING, skip=("rotary_emb.",))
        if d2t:
            self.set_vocab_map(d2t[0])
        elif self.draft_vocab_size != self.vocab_size:
            raise ValueError(f"lacks d2t: its draft_vocab_size {self.draft_vocab_size} < vocab_size "
                             f"{self.vocab_size} needs the draft -> target id map.")
        return loaded

    def _check_fc(self, tensor: torch.Tensor) -> None:
        want = [self.hidden_size, self.num_aux * self.target_hidden_size]
        if list(tensor.shape) != want:
            raise ValueError(f"fc.weight has shape {list(tensor.shape)}: an EAGLE-3 head over {self.num_aux} "
                             f"target layers of hidden size {self.target_hidden_size} needs {want}.")

    def _load_own_embedding(self, tensor: torch.Tensor) -> None:
        want = [self.vocab_size, self.hidden_size]
        if list(tensor.shape) != want:
            raise ValueError(f"embed_tokens.weight has shape {list(tensor.shape)}, not {want}.")
        with torch.device(tensor.device):
            self.embed_tokens = VocabParallelEmbedding(self.vocab_size, self.hidden_size, self._dtype,
                                                       prefix="embed_tokens")
        self.embed_tokens.weight.weight_loader(self.embed_tokens.weight, tensor)


def load_eagle3_head(model_config: "ModelConfig", target: nn.Module, device: torch.device, attn_backend,
                     num_aux: int) -> Eagle3Head:
    """The head of ``model_config`` (its checkpoint, or dummy weights: then d2t is zero) over ``target``."""
    from vllm_engine.quantization import get_quant_config

    quant_config = get_quant_config(model_config.hf_config, device, None)
    with torch.device(device):
        head = Eagle3Head(model_config.hf_config, target, attn_backend, model_config.max_model_len,
                          model_config.dtype, quant_config, num_aux)
    return load_head(head, model_config, device)


class Eagle3Proposer(EagleProposer):
    """An EAGLE-3 head on the worker: ``EagleProposer``'s bookkeeping with the features
    ``fc(aux)`` of the target's auxiliary hidden states, which the target writes into its buffer
    ``aux_hidden`` [max_num_batched_tokens, 3 H] every forward (asked for here, once)."""

    def __init__(self, config: "EngineConfig", device: torch.device, attn_backend, target: nn.Module) -> None:
        spec = config.speculative
        self.aux_layer_ids = eagle3_aux_layer_ids(spec.model, spec.draft_model_config.hf_config,
                                                  config.model.hf_config.num_hidden_layers)
        super().__init__(config, device, attn_backend, target)
        self.aux_hidden = target.base_model.keep_aux_hidden_states(
            self.aux_layer_ids, config.scheduler.max_num_batched_tokens, self.model_config.dtype, device)

    def _build_model(self, target: nn.Module) -> nn.Module:
        return load_eagle3_head(self.model_config, target, self.device, self.attn_backend, len(self.aux_layer_ids))

    def forward_step(self, inputs: "StepInputs", hidden: torch.Tensor, states: Sequence["CachedRequestState"],
                     verified) -> None:
        """``EagleProposer.forward_step`` with the features fc(aux) of the step's rows (``hidden``,
        the target's output, gives only their number)."""
        features = self.model.fc(self.aux_hidden[: hidden.shape[0]])
        super().forward_step(inputs, features, states, verified)
