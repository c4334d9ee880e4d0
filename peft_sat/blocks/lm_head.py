"""The LM head under ``SATConfig.context_tokens="forward_only"``: the logits of context positions carry no loss, so
they take no gradient; computing them without a graph skips their share of the head's backward (exact).

The head (``model.get_output_embeddings()``, an ``nn.Linear`` whatever ties it to the embeddings) is re-classed in
place like the blocks, so its weights, checkpoint keys and tying stay as they are.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from ..ops_rows import linear_token_rows
from ..state import SATState
from ..token_rows import split_rows
from .base import omitted_units


class SATLMHeadMixin:
    """An LM head whose context rows (positions whose next-token label is ignored) run without a graph."""

    sat_state: SATState
    _sat_original_class: type  # the head's class before SAT re-classed it

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        state = self.sat_state
        active = self.training and state.enabled and state.omission_rate > 0 and not state.batch.uses_cache
        carries = state.batch.carries_loss
        if not active or carries is None or tuple(carries.shape) != tuple(hidden_states.shape[:-1]):
            return super().forward(hidden_states)
        rows = state.dense_rows(hidden_states.shape[:-1])
        if rows is None:
            return super().forward(hidden_states)
        state.head_split_forwards += 1
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        if self._sat_original_class is nn.Linear:  # one matmul over every row, a graph on the dense rows
            logits = linear_token_rows(flat, self.weight, self.bias, rows)
        else:
            logits = split_rows(super().forward, flat, rows, omitted_units(rows, flat.shape[0]))
        return logits.view(*hidden_states.shape[:-1], -1)


_HEAD_CLASSES: dict[type, type] = {}


def convert_lm_head(head: nn.Module, state: SATState) -> None:
    """Re-class ``head`` in place (idempotent; ``registry.restore_block`` undoes it)."""
    original = getattr(type(head), "_sat_original_class", type(head))
    if original not in _HEAD_CLASSES:
        namespace = {"_sat_original_class": original, "__module__": __name__}
        cls = type(f"SATLMHead{original.__name__}", (SATLMHeadMixin, original), namespace)
        setattr(sys.modules[__name__], cls.__name__, cls)  # importable by name, so pickling works
        _HEAD_CLASSES[original] = cls
    head.__class__ = _HEAD_CLASSES[original]
    head.sat_state = state
