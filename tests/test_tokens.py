"""Which token positions run the whole block (``peft_sat.tokens``, ``SATConfig.dense_tokens``) for the batch layouts
TRL produces: prompt / completion, plain text, padding, padding-free packing."""

from __future__ import annotations

import torch

from peft_sat.tokens import dense_rows, loss_positions, sequence_ends

IGNORE = -100


def _rows(mode, labels, token_mask=None, position_ids=None):
    labels = torch.tensor(labels)
    rows = dense_rows(
        mode,
        loss_positions(labels),
        None if token_mask is None else torch.tensor(token_mask),
        None if position_ids is None else torch.tensor(position_ids),
    )
    return None if rows is None else rows.tolist()


def test_a_position_carries_the_loss_of_the_next_label():
    labels = torch.tensor([[IGNORE, IGNORE, 7, 8, 9]])
    assert loss_positions(labels).tolist() == [[False, True, True, True, False]]
    shifted = torch.tensor([[IGNORE, 7, IGNORE, IGNORE, IGNORE]])
    assert loss_positions(labels, shift_labels=shifted).tolist() == [[False, True, False, False, False]]
    assert loss_positions(None) is None


def test_prompt_completion_splits_in_loss_and_auto_modes():
    labels = [[IGNORE, IGNORE, IGNORE, 4, 5, 6], [IGNORE, 2, 3, 4, 5, 6]]
    assert _rows("loss", labels) == [2, 3, 4, 6, 7, 8, 9, 10]
    assert _rows("auto", labels) == [2, 3, 4, 6, 7, 8, 9, 10]
    assert _rows("none", labels) is None


def test_every_token_carrying_loss_is_not_split_by_auto():
    """Continual pre-training: only the last position lacks a label; "auto" must not make the step dense."""
    labels = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert _rows("auto", labels) is None
    assert _rows("loss", labels) == [0, 1, 2, 4, 5, 6]  # asked for explicitly: every position with a next label


def test_padding_is_never_dense_and_ends_no_split():
    labels = [[IGNORE, 2, 3, 4], [5, 6, IGNORE, IGNORE]]
    mask = [[0, 1, 1, 1], [1, 1, 0, 0]]  # left padding, right padding: both end sequences, carry no loss
    assert _rows("auto", labels, mask) is None
    assert _rows("loss", labels, mask) == [1, 2, 4]


def test_padding_free_packing():
    """TRL packs sequences into one row and labels each sequence start -100 (position_ids restart at 0)."""
    cpt = [[1, 2, 3, IGNORE, 5, 6]]
    positions = [[0, 1, 2, 0, 1, 2]]
    assert sequence_ends(torch.Size([1, 6]), torch.device("cpu"), None, torch.tensor(positions)).tolist() == [
        [False, False, True, False, False, True]
    ]
    assert _rows("auto", cpt, position_ids=positions) is None  # packed plain text: no context tokens
    sft = [[IGNORE, IGNORE, 3, IGNORE, IGNORE, 6]]  # two packed prompt / completion pairs
    assert _rows("auto", sft, position_ids=positions) == [1, 4]
