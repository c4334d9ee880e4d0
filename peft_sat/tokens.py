"""Which token positions run the whole block (``SATConfig.dense_tokens``): pure tensor code, no model imports.

Notation, for one micro-batch: labels ``y`` (B, T) with -100 where a token is no target. transformers' causal-LM loss
at position t predicts the NEXT token::

    loss_t = CE(logits_t, s_t),   s_t = y_{t+1} (shift_labels),   s_{T-1} = -100

so position t *carries loss* iff ``s_t != -100``. A position is a *sequence end* when its sequence has no next
token: t = T - 1, the next position is padding, or the next position starts another packed sequence
(``position_ids == 0``: TRL's padding-free batches). Sequence ends never carry loss, whatever the data.

    dense_tokens="loss"   D = {t : s_t != -100}
    dense_tokens="auto"   D as for "loss" when a position that is NOT a sequence end carries no loss (prompt /
                          completion or assistant-only data: context tokens exist); else no split, every token
                          sparse (continual pre-training, plain-text SFT: all tokens carry loss, and splitting
                          would silently make the whole step dense)
    dense_tokens="none"   no split

Returned positions are flat row indices into the (B * T, H) view of a block's hidden states.

With ``context_tokens="forward_only"`` the positions after their sequence's last dense position carry no loss and,
where attention is causal, feed no position that does: a split step skips them (``LiveRows``, ``live_rows``; not
with a bidirectional attention block, ``SATState.causal_attention``). In a padded SFT batch they are mostly the
padding after each shorter sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .scatter import place

IGNORE_INDEX = -100


def loss_positions(labels: torch.Tensor | None, shift_labels: torch.Tensor | None = None) -> torch.Tensor | None:
    """(B, T) bool: True where position t carries loss (``s_t != -100``); None without labels.

    ``shift_labels`` (already shifted, as some trainers pass them) wins over ``labels``.

    Example:
        >>> loss_positions(torch.tensor([[-100, -100, 5, 6]])).tolist()
        [[False, True, True, False]]
    """
    if shift_labels is not None:
        return shift_labels != IGNORE_INDEX
    if labels is None:
        return None
    carries = torch.zeros_like(labels, dtype=torch.bool)
    carries[..., :-1] = labels[..., 1:] != IGNORE_INDEX
    return carries


def sequence_ends(
    shape: torch.Size, device: torch.device, token_mask: torch.Tensor | None, position_ids: torch.Tensor | None
) -> torch.Tensor:
    """(B, T) bool: True at positions whose sequence has no next token (see the module docstring)."""
    ends = torch.zeros(shape, dtype=torch.bool, device=device)
    ends[..., -1] = True
    if token_mask is not None and token_mask.shape == shape:
        ends[..., :-1] |= ~token_mask[..., 1:].bool()
    if position_ids is not None and position_ids.shape[-1] == shape[-1]:
        ends[..., :-1] |= (position_ids[..., 1:] == 0).expand(shape[0], -1)
    return ends


def dense_rows(
    mode: str,
    carries_loss: torch.Tensor | None,
    token_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Flat indices (n,) int64 of the positions that run the whole block, or None for no split.

    Args:
        mode: ``"none"``, ``"loss"`` or ``"auto"`` (``SATConfig.dense_tokens``).
        carries_loss: (B, T) from ``loss_positions``; None (no labels) means no split.
        token_mask: (B, T), 1 at real tokens (padding never runs dense); None: every token is real.
        position_ids: (B, T) or (1, T) of packed batches; None when the batch is not packed.

    Example:
        >>> carries = loss_positions(torch.tensor([[-100, -100, 5, 6]]))
        >>> dense_rows("auto", carries).tolist()  # the prompt position 0 carries no loss: split
        [1, 2]
    """
    if mode == "none" or carries_loss is None:
        return None
    dense = carries_loss.bool()
    if token_mask is not None and token_mask.shape == dense.shape:
        dense = dense & token_mask.bool()
    if mode == "auto":
        real = token_mask.bool() if token_mask is not None and token_mask.shape == dense.shape else True
        context = ~dense & real & ~sequence_ends(dense.shape, dense.device, token_mask, position_ids)
        if not bool(context.any()):
            return None
    return dense.reshape(-1).nonzero().squeeze(1)


@dataclass(frozen=True)
class LiveRows:
    """The rows a split step computes: each sequence's positions up to its last dense position.

    For N flat rows, dense rows D and live rows R (m of them, D a subset)::

        rows      (m,)      R, ascending
        dense     (n,)      where D sits in R (R[dense] = D)
        context   (m - n,)  the other positions of R
        trailing  (N - m,)  the rows outside R: after their sequence's last dense position, carrying no loss, and
                            read by no later position under causal attention
    """

    rows: torch.Tensor
    dense: torch.Tensor
    context: torch.Tensor
    trailing: torch.Tensor

    @property
    def size(self) -> int:
        return self.rows.numel() + self.trailing.numel()

    def gather(self, flat: torch.Tensor) -> torch.Tensor:
        """(N, ...) -> (m, ...): the live rows (with their graph, if any)."""
        return flat.index_select(0, self.rows)

    def place(self, values: torch.Tensor) -> torch.Tensor:
        """(m, ...) -> (N, ...): ``values`` at the live rows, zeros at the trailing ones (backward: the live rows'
        gradient)."""
        zeros = values.new_zeros(()).expand(self.trailing.numel(), *values.shape[1:])
        return place([(self.rows, values), (self.trailing, zeros)], self.size)


def live_rows(rows: torch.Tensor, batch: int, seq: int) -> LiveRows | None:
    """The live rows of the flat ascending dense ``rows`` (n,) of a (``batch``, ``seq``) grid; None where every row
    is live (each sequence's last position is dense).

    Example:
        >>> live = live_rows(torch.tensor([1, 2, 5]), batch=2, seq=4)  # last dense positions: 2 and 1
        >>> live.rows.tolist(), live.dense.tolist(), live.context.tolist(), live.trailing.tolist()
        ([0, 1, 2, 4, 5], [1, 2, 4], [0, 3], [3, 6, 7])
    """
    last = torch.full((batch,), -1, dtype=rows.dtype, device=rows.device)
    last = last.scatter_reduce(0, rows // seq, rows % seq, "amax")
    alive = (torch.arange(seq, device=rows.device) <= last[:, None]).reshape(-1)
    if bool(alive.all()):
        return None
    live = alive.nonzero().squeeze(1)
    dense = torch.searchsorted(live, rows)
    is_context = torch.ones(live.numel(), dtype=torch.bool, device=rows.device).index_fill_(0, dense, False)
    return LiveRows(
        rows=live, dense=dense, context=is_context.nonzero().squeeze(1), trailing=(~alive).nonzero().squeeze(1)
    )
