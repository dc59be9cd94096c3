"""What every model file shares: the pipeline stage of a decoder (``DecoderStack``: its layers, the
first stage's embedding and the last stage's norm, with placeholders for the rest) and the
checkpoint-name bookkeeping of ``load_weights``."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from vllm_engine.attention.backend import AttentionMetadata
from vllm_engine.distributed import IntermediateTensors, get_pp_group, get_pp_indices
from vllm_engine.layers.utils import default_weight_loader
from vllm_engine.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm_engine.quantization.base import QuantizationConfig

# (our fused parameter, the HF name of one of its shards, shard id), matched on name fragments.
StackedParamsMapping = list[tuple[str, str, Union[int, str]]]
# An fp8 KV cache's per-layer scales, named after the attention module: model.layers.N.self_attn.k_scale
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale")


class PPMissingLayer(nn.Module):
    """A layer that lives on another pipeline stage: no parameters, never called."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("this layer belongs to another pipeline stage")


def head_dim(config: Any) -> int:
    """``head_dim`` from the config when given (Qwen3, Gemma), else hidden / heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


class DecoderStack(nn.Module):
    """This pipeline stage's part of a decoder: layers [start_layer, end_layer) of the config's
    ``num_hidden_layers``, the embedding on the first stage, the final norm on the last
    (``PPMissingLayer`` stands in for what another stage holds).

    A family's ``__init__`` calls ``super().__init__(config)`` and builds its modules under the
    checkpoint's names: ``vocab_embedding`` (or ``first_stage_only``), ``stage_modules`` for the
    layers, ``add_final_norm``; it overrides ``embed`` when its input is more than ``embed_tokens``.

    ``forward``: each layer is called ``layer(positions, hidden, residual, kv_cache, attn_metadata)
    -> (hidden, residual)`` (residual None into the first layer), the final norm ``norm(hidden,
    residual) -> (out, _)``. On a stage other than the first, ``intermediate_tensors`` is the
    previous stage's output (``input_ids`` is unused); a stage other than the last returns
    ``IntermediateTensors``.

    Auxiliary hidden states (EAGLE-3): after ``keep_aux_hidden_states``, each forward also copies
    the residual stream entering chosen layers into a buffer the stack owns; without that call the
    layer loop is the plain one.
    """

    final_norm: nn.Module  # the last stage's norm (add_final_norm), a plain attribute: no Module lookup per step
    stage_layers: list[nn.Module]  # this stage's layers (stage_modules), a plain list: fast to iterate
    aux_hidden: Optional[torch.Tensor] = None  # keep_aux_hidden_states' buffer; None: nothing kept

    def __init__(self, config: Any) -> None:
        super().__init__()
        pp = get_pp_group()
        self.is_first_stage, self.is_last_stage = pp.is_first_rank, pp.is_last_rank
        self.start_layer, self.end_layer = get_pp_indices(config.num_hidden_layers, pp.rank, pp.world_size)
        self.num_hidden_layers = config.num_hidden_layers
        self.hidden_size = getattr(config, "hidden_size", None)
        self._aux_columns: dict[int, torch.Tensor] = {}  # layer index -> its view of aux_hidden

    def first_stage_only(self, build: Callable[[], nn.Module]) -> nn.Module:
        return build() if self.is_first_stage else PPMissingLayer()

    def vocab_embedding(self, config: Any, dtype: torch.dtype, quant_config: Optional[QuantizationConfig],
                        prefix: str) -> nn.Module:
        """The first stage's token embedding ([vocab_size, hidden_size], split over tensor-parallel ranks)."""
        return self.first_stage_only(lambda: VocabParallelEmbedding(config.vocab_size, config.hidden_size, dtype,
                                                                    quant_config=quant_config, prefix=prefix))

    def stage_modules(self, build: Callable[[int], nn.Module]) -> nn.ModuleList:
        """Every layer index, ``build(i)`` for this stage's; sets ``stage_layers``."""
        layers = nn.ModuleList(build(i) if self.start_layer <= i < self.end_layer else PPMissingLayer()
                               for i in range(self.num_hidden_layers))
        self.stage_layers = list(layers)[self.start_layer: self.end_layer]
        return layers

    def add_final_norm(self, name: str, build: Callable[[], nn.Module]) -> None:
        """The last stage's final norm, registered as ``name`` (its checkpoint name)."""
        norm = build() if self.is_last_stage else PPMissingLayer()
        self.add_module(name, norm)
        object.__setattr__(self, "final_norm", norm)

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The first stage's hidden states [T, hidden] for ``input_ids``."""
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[torch.Tensor],
                attn_metadata: AttentionMetadata, intermediate_tensors: Optional[IntermediateTensors] = None,
                ) -> Union[torch.Tensor, IntermediateTensors]:
        if intermediate_tensors is None:
            hidden, residual = self.embed(input_ids, positions), None
        else:
            hidden, residual = intermediate_tensors.hidden_states, intermediate_tensors.residual
        if self.aux_hidden is None:
            for i, layer in enumerate(self.stage_layers):
                hidden, residual = layer(positions, hidden, residual, kv_caches[i], attn_metadata)
        else:
            hidden, residual = self._layers_keeping_aux(positions, hidden, residual, kv_caches, attn_metadata)
        if not self.is_last_stage:
            return IntermediateTensors(hidden, residual)
        hidden, _ = self.final_norm(hidden, residual)
        return hidden

    def keep_aux_hidden_states(self, layer_ids: Sequence[int], max_tokens: int, dtype: torch.dtype,
                               device: torch.device) -> torch.Tensor:
        """From now on every forward also writes, for each token row r < T (its T tokens) and the j-th
        id of ``layer_ids``, the residual stream entering that layer (hidden + residual, vLLM's
        EAGLE-3 auxiliary hidden state; HF's ``output_hidden_states[id]``; layer 0: the embedding)
        into row r, columns [j * H, (j + 1) * H) of the returned buffer [max_tokens, len(ids) * H].

        The buffer is allocated here, once, and written in place (one copy or add per chosen layer,
        no allocation): a CUDA graph captured after this call writes it on replay. One pipeline
        stage only; a forward of more than ``max_tokens`` tokens is a RuntimeError. ValueError for
        ids outside [0, num_hidden_layers) or repeated."""
        if not (self.is_first_stage and self.is_last_stage):
            raise ValueError("auxiliary hidden states are kept with one pipeline stage only")
        ids = [int(i) for i in layer_ids]
        if not ids or len(set(ids)) != len(ids) or not all(0 <= i < self.num_hidden_layers for i in ids):
            raise ValueError(f"auxiliary hidden state layers {ids} must be distinct layer indices in "
                             f"[0, {self.num_hidden_layers})")
        h = self.hidden_size
        self.aux_hidden = torch.zeros(max_tokens, len(ids) * h, dtype=dtype, device=device)
        self._aux_columns = {i: self.aux_hidden[:, j * h: (j + 1) * h] for j, i in enumerate(ids)}
        return self.aux_hidden

    def _layers_keeping_aux(self, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                            kv_caches: list[torch.Tensor], attn_metadata: AttentionMetadata
                            ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The layer loop of ``forward``, writing ``aux_hidden`` on the way (``keep_aux_hidden_states``)."""
        n = hidden.shape[0]
        if n > self.aux_hidden.shape[0]:
            raise RuntimeError(f"a forward of {n} tokens exceeds the auxiliary hidden state buffer "
                               f"({self.aux_hidden.shape[0]} rows)")
        for i, layer in enumerate(self.stage_layers):
            out = self._aux_columns.get(self.start_layer + i)
            if out is not None:
                if residual is None:
                    out[:n].copy_(hidden)
                else:
                    torch.add(hidden, residual, out=out[:n])
            hidden, residual = layer(positions, hidden, residual, kv_caches[i], attn_metadata)
        return hidden, residual


def layer_sliding_window(config: Any, layer_idx: int) -> Optional[int]:
    """The attention window of layer ``layer_idx`` (None: full attention)."""
    window = getattr(config, "sliding_window", None)
    if not window:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return window if layer_types[layer_idx] == "sliding_attention" else None
    if hasattr(config, "use_sliding_window") and not config.use_sliding_window:
        return None
    return window


def uniform_sliding_window(config: Any) -> Optional[int]:
    """The window every attention layer shares, or None (full attention somewhere, e.g. Gemma 2's
    global layers): only then may the KV cache free the blocks that fell out of the window."""
    windows = {layer_sliding_window(config, i) for i in range(config.num_hidden_layers)}
    return windows.pop() if len(windows) == 1 else None


def missing_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Name prefixes of the model's ``PPMissingLayer`` s (``"model.layers.7."``...)."""
    return tuple(name + "." for name, m in model.named_modules() if isinstance(m, PPMissingLayer))


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]], mapping: StackedParamsMapping,
                 skip: tuple[str, ...] = ()) -> set[str]:
    """Copies HF-named checkpoint tensors into ``model``'s parameters, each through its
    ``weight_loader`` (this rank's slice; a fused parameter's shard from ``mapping``). Tensors of
    layers on other pipeline stages, and names containing any of ``skip``, are passed over. Returns
    the checkpoint names loaded. ValueError naming the tensor for an unknown name or a wrong shape."""
    params = dict(model.named_parameters())
    elsewhere = missing_prefixes(model)
    attention = attention_layers(model)
    loaded: set[str] = set()
    for name, tensor in weights:
        if any(s in name for s in skip):
            continue
        if name.endswith(KV_SCALE_SUFFIXES):
            if load_kv_scale(attention, name, tensor, elsewhere):
                loaded.add(name)
            continue
        target, shard_id = name, None
        for fused, hf, sid in mapping:
            if hf in name:
                target, shard_id = name.replace(hf, fused), sid
                break
        param = params.get(target)
        if param is None:
            if target.startswith(elsewhere):
                continue
            raise ValueError(f"Checkpoint tensor {name!r} matches no parameter of the model.")
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            if shard_id is None:
                loader(param, tensor)
            else:
                loader(param, tensor, shard_id)
        except ValueError as e:
            raise ValueError(f"Weight {name} {e}.") from None
        loaded.add(name)
    return loaded


def attention_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Each ``Attention`` layer of ``model`` under its own name and its parent's (checkpoints name
    the KV cache scales after the model's attention module: ``model.layers.N.self_attn``)."""
    from vllm_engine.layers.attention import Attention

    out: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        if isinstance(module, Attention):
            out[name] = module
            out.setdefault(name.rpartition(".")[0], module)
    return out


def load_kv_scale(attention: dict[str, nn.Module], name: str, tensor: torch.Tensor,
                  elsewhere: tuple[str, ...]) -> bool:
    """Gives checkpoint scale ``name`` (``<attention module>.k_scale`` / ``.v_scale``) to its layer;
    False for a layer on another pipeline stage. ValueError naming the tensor when no attention
    layer has that name or the scale is unusable."""
    owner, _, which = name.rpartition(".")
    layer = attention.get(owner)
    if layer is None:
        if name.startswith(elsewhere):
            return False
        raise ValueError(f"Checkpoint tensor {name!r} matches no attention layer of the model.")
    try:
        layer.load_kv_scale(which, tensor)
    except ValueError as e:
        raise ValueError(f"Weight {name} {e}.") from None
    return True


def checkpoint_row_ranges(model: nn.Module, mapping: StackedParamsMapping) -> dict[str, tuple[int, int]]:
    """{checkpoint name: rows [start, stop)} of the tensors of which this rank's weight loaders read
    only a range of rows (``checkpoint_rows`` of column-parallel layers and the vocabulary under
    tensor parallelism): a loader may skip the others. For checkpoints whose names ``load_weights``
    matches as they are (a fused parameter's shards through ``mapping``)."""
    out: dict[str, tuple[int, int]] = {}
    for module_name, module in model.named_modules():
        rows_of = getattr(module, "checkpoint_rows", None)
        if rows_of is None:
            continue
        for param_name, param in module.named_parameters(recurse=False):
            if getattr(param, "weight_loader", None) != module.weight_loader:  # a quant method's own loader
                continue
            name = f"{module_name}.{param_name}" if module_name else param_name
            shards = [(name.replace(fused, hf), sid) for fused, hf, sid in mapping if fused in name]
            for hf_name, shard_id in shards or [(name, None)]:
                rows = rows_of(param, shard_id)
                if rows is not None:
                    out[hf_name] = rows
    return out


def expected_weights(model: nn.Module, mapping: StackedParamsMapping) -> set[str]:
    """The checkpoint names ``load_weights`` must see for every parameter on this stage to be filled."""
    names: set[str] = set()
    for name, _param in model.named_parameters():
        shards = [name.replace(fused, hf) for fused, hf, _sid in mapping if fused in name]
        names.update(shards or [name])
    return names
