"""Process groups for tensor and pipeline parallelism (torch.distributed: NCCL on CUDA, gloo on CPU)."""

from vllm_engine.distributed.parallel_state import (
    GroupCoordinator,
    destroy_distributed,
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    get_tp_group,
    init_distributed,
    override_parallel_state,
)
from vllm_engine.distributed.utils import IntermediateTensors, divide, get_pp_indices, kv_heads_per_rank

__all__ = [
    "GroupCoordinator", "IntermediateTensors", "destroy_distributed", "divide", "get_pp_group", "get_pp_indices",
    "get_tensor_model_parallel_rank", "get_tensor_model_parallel_world_size", "get_tp_group", "init_distributed",
    "kv_heads_per_rank", "override_parallel_state",
]
