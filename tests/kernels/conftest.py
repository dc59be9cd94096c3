"""Kernel tests run the Triton kernels through the interpreter on CPU when there is no GPU.

``triton.jit`` decides interpreted-or-compiled when a function is defined, and triton.language's
own helpers (``tl.sum``, ``tl.max``...) are defined when triton is first imported. So
TRITON_INTERPRET must be set before anything imports triton. In a CPU session nothing else
imports it (models use the fused ops only on CUDA), so setting it here is early enough. If triton
was imported first anyway, the interpreter cannot work in this process: the kernel tests are then
skipped with that reason (set TRITON_INTERPRET=1 in the root conftest or the environment).
"""

import os
import sys

import pytest
import torch

_STALE_TRITON = False
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    _STALE_TRITON = "triton" in sys.modules
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    if not _STALE_TRITON:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    skip = pytest.mark.skip(reason="triton was imported before TRITON_INTERPRET=1 was set; "
                                   "run with TRITON_INTERPRET=1 in the environment")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
