"""A compile worker of ``parallel_compile.CompileWorkers``: compiles Triton kernel variants into
Triton's cache directory, for the target each job names, without a GPU.

    python -m vllm_engine.layers.compile_worker

Reads one JSON line per variant on stdin, ``[backend, arch, warp size, module, kernel name,
specialization]`` (the specialization as ``JITFunction.preload`` takes it), and answers each with
one JSON line on stdout: null, or the error. Ends at the end of its input.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> int:
    answers = os.fdopen(os.dup(1), "w")  # our answers; anything else printed goes to stderr
    os.dup2(2, 1)
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    # The modules most variants come from, imported while the engine starts (the others on demand).
    import vllm_engine.attention.triton_kernels  # noqa: F401
    import vllm_engine.layers.fused_ops  # noqa: F401
    import vllm_engine.layers.triton_linear  # noqa: F401
    from vllm_engine.layers.parallel_compile import TargetDriver, _preload

    target = None
    for line in sys.stdin:
        backend, arch, warp_size, module, name, spec = json.loads(line)
        if target is None or (target.backend, target.arch, target.warp_size) != (backend, arch, warp_size):
            target = GPUTarget(backend, arch, warp_size)
            driver.set_active(TargetDriver(target))  # never the GPU's: this process only compiles
        answers.write(json.dumps(_preload(module, name, spec)) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
