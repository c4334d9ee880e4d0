"""Attention at some query positions only: the dense rows of a split batch (``SATConfig.dense_tokens``), where the
omitted heads run. Pure tensor code, no model imports.

For flat dense rows D (n,) of a (B, T) batch, sequence b holds n_b of them; with L = max_b n_b::

    positions  (B, L)   the positions t of sequence b's dense rows, in order, then padding slots that repeat its
                        last one (T - 1 for a sequence without any)
    gather     (B * L,) flat rows b * T + positions[b, j]: (B, heads, T, d) queries -> (B, heads, L, d)
    valid      (n,)     the slots b * L + j that hold D, in D's order (None when no slot is padding)

The L queries attend to all T keys with their own rows of the mask: the model's 4-D mask gathered at
``positions``, or, where the model passes none and relies on SDPA's ``is_causal``, the causal rows
``k <= positions[b, j]`` (``is_causal`` aligns a short query block with the first keys, wrong here). A padding slot
repeats a real query of its sequence, with a mask row the dense forward computes too, and its output is dropped:
it adds nothing to any gradient.

Why: the dense rows see every head, so the omitted heads' attention runs for them; over every query it would also
save the omitted heads' queries and outputs at the context rows, which no gradient needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class QueryRows:
    """Where the dense rows ``rows`` of a (batch, seq) token grid sit as (batch, L) query slots."""

    rows: torch.Tensor  # (n,) flat dense rows, ascending
    positions: torch.Tensor  # (B, L) position of each slot
    gather: torch.Tensor  # (B * L,) flat row of each slot
    valid: torch.Tensor | None  # (n,) the slots of ``rows``; None: every slot is one
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # made by `mask`, per forward

    @classmethod
    def of(cls, rows: torch.Tensor, batch: int, seq: int) -> QueryRows:
        """The slots of the flat ascending ``rows`` (n,) of a (``batch``, ``seq``) grid.

        Example:
            >>> q = QueryRows.of(torch.tensor([2, 3, 7]), batch=2, seq=4)
            >>> q.positions.tolist(), q.valid.tolist()  # sequence 1 has one dense row: its slot 1 repeats it
            ([[2, 3], [3, 3]], [0, 1, 2])
        """
        sequence = rows // seq
        counts = torch.bincount(sequence, minlength=batch)
        slots = int(counts.max()) if rows.numel() else 0
        first = torch.cumsum(counts, 0) - counts  # index in ``rows`` of each sequence's first dense row
        slot = torch.arange(rows.numel(), device=rows.device) - first[sequence]
        last = torch.where(counts > 0, rows.index_select(0, (first + counts - 1).clamp(min=0)) % seq, seq - 1)
        positions = last[:, None].expand(batch, slots).clone()
        positions[sequence, slot] = rows % seq
        offsets = torch.arange(batch, device=rows.device)[:, None] * seq
        valid = None if rows.numel() == batch * slots else sequence * slots + slot
        return cls(rows=rows, positions=positions, gather=(positions + offsets).reshape(-1), valid=valid)

    @property
    def slots(self) -> int:
        return self.positions.shape[1]

    def queries(self, query: torch.Tensor) -> torch.Tensor:
        """(B, heads, T, d) -> (B, heads, L, d): the queries of the slots (a copy; saves only the indices)."""
        batch, heads, seq, dim = query.shape
        flat = query.transpose(1, 2).reshape(batch * seq, heads, dim)
        return flat.index_select(0, self.gather).view(batch, self.slots, heads, dim).transpose(1, 2)

    def mask(
        self,
        attention_mask: torch.Tensor | None,
        num_keys: int,
        causal_if_none: bool,
        dtype: torch.dtype | None = None,
    ) -> torch.Tensor | None:
        """The mask rows of the slots, (B, 1 or heads, L, keys): ``attention_mask`` (B or 1, 1 or heads, T, keys)
        gathered, or, when it is None, the causal rows if ``causal_if_none`` (SDPA) and None otherwise (a kernel
        that masks nothing without a mask masks nothing here either). ``dtype``: additive (0 where a query attends,
        -inf elsewhere) in that dtype instead of a bool mask.

        Made once per mask and forward, for every layer: torch's CPU attention turns a bool mask into an additive
        one and saves it, so a mask per layer would be saved once per layer.
        """
        key = (None if attention_mask is None else id(attention_mask), num_keys, causal_if_none, dtype)
        cached = self._masks.get(key)
        if cached is not None and cached[0] is attention_mask:
            return cached[1]
        if attention_mask is None:
            if not causal_if_none:
                return None
            keys = torch.arange(num_keys, device=self.positions.device)
            rows = (keys <= self.positions[..., None])[:, None]
        else:
            expanded = attention_mask.expand(self.positions.shape[0], -1, -1, -1)
            rows = torch.take_along_dim(expanded, self.positions[:, None, :, None], dim=2)
        if dtype is not None and rows.dtype == torch.bool:
            rows = torch.zeros(rows.shape, dtype=dtype, device=rows.device).masked_fill_(~rows, float("-inf"))
        elif dtype is not None:
            rows = rows.to(dtype)
        self._masks[key] = (attention_mask, rows)
        return rows

    def dense(self, per_slot: torch.Tensor) -> torch.Tensor:
        """(B * L, ...) values of the slots -> (n, ...) values of ``rows``, in their order."""
        return per_slot if self.valid is None else per_slot.index_select(0, self.valid)
