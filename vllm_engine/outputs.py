"""What the engine returns: RequestOutput (one per request) holding CompletionOutputs (one per sample)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

# For each generated position: {token_id: Logprob}, holding the sampled token and the top-N.
SampleLogprobs = list[dict[int, "Logprob"]]
# For each prompt position: None for the first token, else {token_id: Logprob}.
PromptLogprobs = list[Optional[dict[int, "Logprob"]]]


@dataclass
class Logprob:
    logprob: float
    rank: Optional[int] = None  # 1-based rank of this token in the distribution
    decoded_token: Optional[str] = None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: Optional[float] = None
    logprobs: Optional[SampleLogprobs] = None
    finish_reason: Optional[str] = None  # "stop" | "length" | "abort" | "error" | None while running
    stop_reason: Optional[int | str] = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: Optional[float] = None
    first_token_time: Optional[float] = None
    last_token_time: Optional[float] = None
    finished_time: Optional[float] = None


@dataclass
class RequestOutput:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: Optional[PromptLogprobs] = None
    num_cached_tokens: int = 0
    metrics: Optional[RequestMetrics] = None
    # Set (with finished=True, every sample's finish_reason "error") when a fault in this request's own
    # path ended it; the engine and the other requests carry on.
    error: Optional[str] = None

    @property
    def text(self) -> str:
        """The first completion's text (the common case: n == 1)."""
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []
