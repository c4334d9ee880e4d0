"""`SATBlockMixin`: when a block goes sparse, and how it picks its units (score, reduce across ranks, select, cache).

Per training forward a block (1) scores its units on the micro-batch (``peft_sat.importance``), (2) keeps
``num_kept`` of them (``peft_sat.selection``), (3) runs the sliced projections (``peft_sat.sliced``). The selection
is cached per model forward so that a gradient-checkpointing re-run computes exactly the same sub-network (and
issues no collective inside backward).

How a sparse block computes, with K the kept units, O the omitted ones and D the dense token positions
(``SATConfig.dense_tokens``, ``peft_sat.tokens``)::

    sparse_pass       D             every position                          positions in D also run
    forward_backward  none          K (forward and backward)                -
    forward_backward  split         K (forward and backward)                O (forward and backward)
    backward          none          all units forward, K in backward        -           (the dense forward, bit for bit)
    backward          split         K (forward and backward)                O forward only (no gradient)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .. import importance
from ..scatter import place
from ..selection import num_kept, select_units
from ..state import SATState, sum_across_ranks


class SATBlockMixin:
    """Shared selection logic of the SAT blocks. Subclasses define the units (``_sat_scores``,
    ``_sat_selection``) and the sliced forward."""

    sat_state: SATState
    sat_block_id: int
    sat_num_units: int
    sat_last_kept: torch.Tensor | None  # kept units of the latest sparse forward (for tests and statistics)
    sat_omits_units: bool  # False: converted only to cut the gradient of context tokens

    def _sat_init(self, state: SATState, block_id: int) -> None:
        self.sat_state = state
        self.sat_block_id = block_id
        self.sat_last_kept = None
        self._sat_cache: tuple[int, float, Any] | None = None

    def sat_is_sparse(self) -> bool:
        """True when this forward computes on a sub-network: training mode, SAT enabled, rate > 0, and no KV cache
        in use (a forward that reads or fills a cache is generation, which must see the dense model)."""
        state = self.sat_state
        return self.training and state.enabled and state.omission_rate > 0.0 and not state.batch.uses_cache

    def sat_dense_rows(self, x: torch.Tensor) -> torch.Tensor | None:
        """Flat row indices of the positions of ``x`` (..., H) that run the whole block, or None (no split)."""
        return self.sat_state.dense_rows(x.shape[:-1])

    def sat_context_rows(self, rows: torch.Tensor, num_rows: int) -> torch.Tensor:
        """The flat positions outside the dense ``rows`` among ``num_rows`` (padding included), made once per forward
        for all blocks: every block of a forward splits the same rows, and on an accelerator ``nonzero`` waits for
        the device."""
        cache = self.sat_state.batch.dense_rows_cache
        key = ("context", num_rows)
        if key not in cache or cache[key][0] is not rows:
            cache[key] = (rows, omitted_units(rows, num_rows))
        return cache[key][1]

    @property
    def sat_backward_only(self) -> bool:
        """``sparse_pass="backward"``: the omitted units skip the backward only."""
        return self.sat_state.config.sparse_pass == "backward"

    # Selection is data-dependent Python (seeded generators, top-k / sampling, the per-forward cache): run it
    # eagerly under torch.compile; the compiled sliced forward gets the kept indices as tensor inputs.
    @torch.compiler.disable
    def _sat_select(
        self,
        x: torch.Tensor,
        activation_scores: Callable[[], torch.Tensor] | None = None,
        token_mask: torch.Tensor | None | str = "batch",
    ) -> Any:
        """The selection of this forward (cached: a gradient-checkpointing re-run gets the same units).

        ``activation_scores``: for ``maxip``, a thunk giving the scores from activations the block already computed
        (the dense forward of ``sparse_pass="backward"`` / ``"weight_grad"`` has every unit's activation on every
        token: exact scores, no sampling, no extra product); otherwise the scores come from ``score_tokens`` sampled
        inputs. ``token_mask``: the real tokens of ``x`` ("batch": the padding mask of the model's batch).
        """
        state = self.sat_state
        key = (state.forward_count, state.omission_rate)
        if self._sat_cache is not None and self._sat_cache[:2] == key:
            return self._sat_cache[2]  # a gradient-checkpointing re-run: same units as the first pass
        config = state.config
        with torch.no_grad():
            generator = state.generator(x.device, self.sat_block_id)
            if activation_scores is not None and config.importance == "maxip":
                scores = activation_scores().float()
            else:
                mask = state.token_mask if isinstance(token_mask, str) else token_mask
                x_valid = importance.valid_tokens(x.detach(), mask)
                x_sample = importance.sample_tokens(x_valid, config.score_tokens, generator)
                scores = self._sat_scores(config.importance, x_valid, x_sample, generator)
            if config.distributed_selection == "shared" and state.batch.collective_ok:
                scores = sum_across_ranks(scores)  # every rank keeps the same units
            kept = select_units(scores, num_kept(scores.shape[0], state.omission_rate), config.selection, generator)
        self.sat_last_kept = self._sat_last_kept(kept)
        selection = self._sat_selection(kept)
        self._sat_cache = (*key, selection)
        return selection

    def _sat_last_kept(self, kept: torch.Tensor) -> torch.Tensor:
        return kept

    def _sat_scores(self, metric: str, x: torch.Tensor, x_sample: torch.Tensor, generator: torch.Generator):
        raise NotImplementedError

    def _sat_selection(self, kept: torch.Tensor) -> Any:
        """The selection object the sliced forward reads (the attention's also holds the omitted heads); pure."""
        raise NotImplementedError


def omitted_units(kept: torch.Tensor, num_units: int) -> torch.Tensor:
    """The sorted complement (n - k,) int64 of the sorted ``kept`` indices among ``num_units``."""
    mask = torch.ones(num_units, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().squeeze(1)


def assemble_rows(num_rows: int, rows, dense: torch.Tensor, context, rest: torch.Tensor) -> torch.Tensor:
    """(num_rows, out) with ``dense`` at ``rows`` and ``rest`` at ``context``, written into one new buffer
    (out-of-place copies would move the whole tensor twice: 100 MB per step for a 49k-token vocabulary's logits);
    backward keeps only the indices (``peft_sat.scatter``)."""
    return place([(context, rest), (rows, dense)], num_rows)
