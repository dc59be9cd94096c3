"""A compile worker of ``parallel_compile.CompileWorkers``: compiles Triton kernel variants into
Triton's cache directory, for the target named on its command line, without a GPU.

    python -m vllm_engine.layers.compile_worker cuda 90 32     # backend, arch, warp size

Reads one JSON line per variant on stdin, ``[module, kernel name, specialization]`` (the
specialization as ``JITFunction.preload`` takes it), and answers each with one JSON line on stdout:
null, or the error. Ends at the end of its input.
"""

from __future__ import annotations

import json
import os
import sys


class TargetDriver:
    """What ``JITFunction.preload`` asks Triton's driver, answered for a fixed target (no GPU)."""

    def __init__(self, target) -> None:
        self.target = target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        return self.target


def main(argv: list[str]) -> int:
    answers = os.fdopen(os.dup(1), "w")  # our answers; anything else printed goes to stderr
    os.dup2(2, 1)
    from triton.backends.compiler import GPUTarget
    from triton.runtime.driver import driver

    backend, arch, warp_size = argv
    driver.set_active(TargetDriver(GPUTarget(backend, int(arch) if arch.isdigit() else arch, int(warp_size))))
    from vllm_engine.layers.parallel_compile import _preload
    # The modules most variants come from, imported while the engine starts (the others on demand).
    import vllm_engine.attention.triton_kernels  # noqa: F401
    import vllm_engine.layers.fused_ops  # noqa: F401
    import vllm_engine.layers.triton_linear  # noqa: F401

    for line in sys.stdin:
        module, name, spec = json.loads(line)
        answers.write(json.dumps(_preload(module, name, spec)) + "\n")
        answers.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
