"""`SATBlockMixin`: when a block goes sparse, and how it picks its units (score, reduce across ranks, select, cache).

Per training forward a block (1) scores its units on the micro-batch (``peft_sat.importance``), (2) keeps
``num_kept`` of them (``peft_sat.selection``), (3) runs the sliced projections (``peft_sat.sliced``). The selection
is cached per model forward so that a gradient-checkpointing re-run computes exactly the same sub-network (and
issues no collective inside backward).
"""

from __future__ import annotations

from typing import Any

import torch

from .. import importance
from ..selection import num_kept, select_units
from ..state import SATState, sum_across_ranks


class SATBlockMixin:
    """Shared selection logic of the SAT blocks. Subclasses define the units (``_sat_scores``,
    ``_sat_selection``) and the sliced forward."""

    sat_state: SATState
    sat_block_id: int
    sat_num_units: int
    sat_last_kept: torch.Tensor | None  # kept units of the latest sparse forward (for tests and statistics)

    def _sat_init(self, state: SATState, block_id: int) -> None:
        self.sat_state = state
        self.sat_block_id = block_id
        self.sat_last_kept = None
        self._sat_cache: tuple[int, float, Any] | None = None

    def sat_is_sparse(self) -> bool:
        """True when this forward computes on a sub-network: training mode, SAT enabled, rate > 0."""
        state = self.sat_state
        return self.training and state.enabled and state.omission_rate > 0.0

    # Selection is data-dependent Python (seeded generators, top-k / sampling, the per-forward cache): run it
    # eagerly under torch.compile; the compiled sliced forward gets the kept indices as tensor inputs.
    @torch.compiler.disable
    def _sat_select(self, x: torch.Tensor) -> Any:
        state = self.sat_state
        key = (state.forward_count, state.omission_rate)
        if self._sat_cache is not None and self._sat_cache[:2] == key:
            return self._sat_cache[2]  # a gradient-checkpointing re-run: same units as the first pass
        config = state.config
        with torch.no_grad():
            generator = state.generator(x.device, self.sat_block_id)
            x_valid = importance.valid_tokens(x.detach(), state.token_mask)
            x_sample = importance.sample_tokens(x_valid, config.score_tokens, generator)
            scores = self._sat_scores(config.importance, x_valid, x_sample, generator)
            if config.distributed_selection == "shared":
                scores = sum_across_ranks(scores)  # every rank keeps the same units
            kept = select_units(scores, num_kept(scores.shape[0], state.omission_rate), config.selection, generator)
        selection = self._sat_selection(kept)
        self._sat_cache = (*key, selection)
        return selection

    def _sat_scores(self, metric: str, x: torch.Tensor, x_sample: torch.Tensor, generator: torch.Generator):
        raise NotImplementedError

    def _sat_selection(self, kept: torch.Tensor) -> Any:
        raise NotImplementedError
