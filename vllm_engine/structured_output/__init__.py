"""Structured outputs: constraints (JSON Schema, regex, choice, EBNF grammar) compiled by xgrammar,
matched per request on the worker, and applied in the sampler as a token bitmask (docs/structured_outputs.md).

xgrammar is an optional dependency (``pip install vllm-engine[structured]``); nothing here imports it
until a request asks for a constraint.
"""

from vllm_engine.structured_output.manager import RequestGrammar, StructuredOutputManager
from vllm_engine.structured_output.bitmask import apply_token_bitmask, bitmask_width

__all__ = ["StructuredOutputManager", "RequestGrammar", "apply_token_bitmask", "bitmask_width"]
