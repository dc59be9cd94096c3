"""Kernel tests run the Triton kernels through the interpreter on CPU when there is no GPU.

``triton.jit`` decides interpreted-or-compiled when a kernel is defined, so TRITON_INTERPRET must be
set before our kernel modules are imported; if another test package imported them first, they are
reloaded here so their kernels are redefined under the interpreter.
"""

import importlib
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
    for _name in ("vllm_engine.attention.triton_kernels", "vllm_engine.layers.fused_ops"):
        if _name in sys.modules:
            importlib.reload(sys.modules[_name])
