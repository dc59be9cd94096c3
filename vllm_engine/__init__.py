"""vllm-engine: a high-throughput LLM inference and serving engine.

    from vllm_engine import Engine, SamplingParams
    engine = Engine()                      # the built-in SmolLM2-135M-Instruct
    print(engine.generate("The capital of France is", SamplingParams(max_tokens=16)).text)
"""

from vllm_engine.outputs import CompletionOutput, RequestOutput
from vllm_engine.sampling_params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

__all__ = ["Engine", "LLM", "EngineArgs", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput",
           "__version__"]


def __getattr__(name: str):
    # Import the engine lazily: `import vllm_engine` stays fast (no torch model code) for the CLI and tools.
    if name in ("Engine", "LLM"):
        from vllm_engine.engine.engine import Engine

        return Engine
    if name == "EngineArgs":
        from vllm_engine.config import EngineArgs

        return EngineArgs
    raise AttributeError(f"module 'vllm_engine' has no attribute {name!r}")
