"""The model runner's side of structured outputs: a grammar per constrained request, and each
step's token bitmask for the sampler.

The bitmask of step N+1 needs the token sampled at step N. With async scheduling that token is
still on the device when N+1 is launched, so ``fill`` runs after N+1's forward pass is queued: it
waits for N's token copy (queued before N+1's forward, so it does not wait for that forward),
advances the grammars, and fills the mask while the GPU runs N+1's forward; only N+1's sampling
waits for the mask. Steps without a constrained request do none of this.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional

import numpy as np

from vllm_engine.engine.request import PLACEHOLDER_TOKEN_ID
from vllm_engine.structured_output.manager import BatchFiller, RequestGrammar, StructuredOutputManager

if TYPE_CHECKING:
    from vllm_engine.core.sched_output import NewRequestData
    from vllm_engine.layers.sampler import SamplingMetadata
    from vllm_engine.worker.request_states import CachedRequestState
    from vllm_engine.worker.staging import HostStaging

logger = logging.getLogger(__name__)


class WorkerGrammars:
    """Grammars by request id. ``manager``: the engine's (same process) or None (built on first use
    from ``model_config``, e.g. in a worker process: its first compile of a grammar then waits).
    ``filler``: the step's batch path (default: ``BatchFiller()``, made on first use)."""

    def __init__(self, model_config: Any, manager: Optional[StructuredOutputManager] = None,
                 filler: Optional[BatchFiller] = None) -> None:
        self.model_config = model_config
        self.manager = manager
        self.grammars: dict[str, RequestGrammar] = {}
        self._filler = filler
        # When a list (benchmarks): one (constrained rows, seconds) per step: advancing the grammars,
        # filling and staging the mask (not the wait for the previous step's tokens).
        self.fill_seconds: Optional[list[tuple[int, float]]] = None

    def __bool__(self) -> bool:
        return bool(self.grammars)

    def add(self, new_requests: Iterable["NewRequestData"], failed: dict[str, str]) -> None:
        """A grammar for each new request with ``structured_outputs``; a constraint that does not compile
        is that request's fault (``failed``: the engine ends it with an error)."""
        for data in new_requests:
            spec = data.sampling_params.structured_outputs
            if spec is None:
                continue
            try:
                if self.manager is None:
                    self.manager = StructuredOutputManager.from_model_config(self.model_config)
                self.grammars[data.req_id] = self.manager.new_grammar(spec)
            except Exception as e:  # noqa: BLE001 - this request's fault: the engine ends it, the batch runs
                failed[data.req_id] = f"{type(e).__name__}: {e}"

    def finish(self, req_ids: Iterable[str]) -> None:
        for rid in req_ids:
            self.grammars.pop(rid, None)

    def fill(self, reqs: list["CachedRequestState"], meta: "SamplingMetadata", staging: "HostStaging",
             read_pending_tokens: Callable[[], None], failed: dict[str, str]) -> None:
        """Sets ``meta.grammar_bitmask`` / ``grammar_rows`` for the constrained rows of ``reqs`` (the
        step's sampled requests, in row order). ``read_pending_tokens``: brings the previous launch's
        sampled ids to the host (written over the placeholders), called only when a grammar needs one.
        A grammar that refused a token (none should reach it) is its request's fault (``failed``)."""
        grammars = self.grammars
        rows, step_grammars, outputs, pending = [], [], [], False
        for i, r in enumerate(reqs):
            g = grammars.get(r.req_id)
            if g is not None:
                out = r.output_token_ids
                rows.append(i)
                step_grammars.append(g)
                outputs.append(out)
                # A request's last token may be the previous launch's, still on the device (async scheduling).
                pending = pending or (bool(out) and out[-1] == PLACEHOLDER_TOKEN_ID)
        if not rows:
            return
        if pending:
            read_pending_tokens()
        t0 = time.perf_counter() if self.fill_seconds is not None else 0.0
        if self._filler is None:
            self._filler = BatchFiller()
        # The masks go straight into the staging buffer (no host copy of up to a few MB a step).
        meta.grammar_bitmask, meta.grammar_rows = staging.stage_filled(
            (len(rows), self.manager.bitmask_width), np.int32,
            lambda bitmask: self._filler.fill(step_grammars, outputs, bitmask), np.array(rows, dtype=np.int64))
        for i, g in zip(rows, step_grammars):
            if g.rejected is not None:
                failed[reqs[i].req_id] = f"the grammar refused token {g.rejected}"
        if self.fill_seconds is not None:
            self.fill_seconds.append((len(rows), time.perf_counter() - t0))

    def fill_verify(self, reqs: list["CachedRequestState"], num_draft_tokens: list[int],
                    draft_token_ids: dict[str, list[int]], staging: "HostStaging",
                    read_pending_tokens: Callable[[], None], failed: dict[str, str]
                    ) -> Optional[tuple[Any, Any]]:
        """For a step that verifies proposals (spec_decode/verify.py): ``reqs[b]`` owns
        ``num_draft_tokens[b] + 1`` consecutive logits rows; a constrained request's rows get the masks
        after each of its proposals (``RequestGrammar.fill_draft_bitmasks``). Returns the device
        (bitmask, rows) for the verification's SamplingMetadata, or None when no row is constrained."""
        grammars = self.grammars
        constrained = [b for b, r in enumerate(reqs) if r.req_id in grammars]
        if not constrained:
            return None
        if any(reqs[b].output_token_ids[-1:] == [PLACEHOLDER_TOKEN_ID] for b in constrained):
            read_pending_tokens()
        first_row = np.concatenate([[0], np.cumsum(np.asarray(num_draft_tokens) + 1)[:-1]]).astype(np.int64)
        rows = np.concatenate([first_row[b] + np.arange(num_draft_tokens[b] + 1) for b in constrained])

        def fill(bitmask: np.ndarray) -> None:
            at = 0
            for b in constrained:
                r, k = reqs[b], num_draft_tokens[b]
                grammar = grammars[r.req_id]
                grammar.advance(r.output_token_ids)
                if grammar.rejected is not None:
                    failed[r.req_id] = f"the grammar refused token {grammar.rejected}"
                grammar.fill_draft_bitmasks(draft_token_ids.get(r.req_id, [])[:k], bitmask, at)
                at += k + 1

        mask_dev, rows_dev = staging.stage_filled((len(rows), self.manager.bitmask_width), np.int32, fill,
                                                  rows.astype(np.int64))
        return mask_dev, rows_dev
