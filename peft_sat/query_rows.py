"""Attention at the dense rows' queries: the token positions of a split batch that run the whole block
(``SATConfig.dense_tokens``). Pure tensor code, no model imports.

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

Two uses:

- ``SATConfig.context_tokens="sparse"``: the dense rows see every head, so the omitted heads' attention runs for them
  (``QueryRows.queries``, ``QueryRows.mask``); over every query it would also save the omitted heads' queries and
  outputs at the context rows, which no gradient needs.
- ``"forward_only"``: every query's attention runs, but only the dense rows' outputs take a gradient
  (``attention_grad_at_slots``): the backward runs for the slots' queries only, where the kernel's own backward
  would run for every query, the context rows' with a zero output gradient.
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
    padding: torch.Tensor | None  # (B * L,) bool, True at the padding slots; None: none
    _masks: dict = field(default_factory=dict, compare=False, repr=False)  # made by `mask` / `additive`

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
        ends = rows.index_select(0, (first + counts - 1).clamp(min=0)) if rows.numel() else counts
        last = torch.where(counts > 0, ends % seq, seq - 1)
        positions = last[:, None].expand(batch, slots).clone()
        positions[sequence, slot] = rows % seq
        offsets = torch.arange(batch, device=rows.device)[:, None] * seq
        valid, padding = None, None
        if rows.numel() < batch * slots:
            valid = sequence * slots + slot
            padding = torch.ones(batch * slots, dtype=torch.bool, device=rows.device).index_fill_(0, valid, False)
        gather = (positions + offsets).reshape(-1)
        return cls(rows=rows, positions=positions, gather=gather, valid=valid, padding=padding)

    @property
    def slots(self) -> int:
        return self.positions.shape[1]

    def queries(self, query: torch.Tensor, zero_padding: bool = False) -> torch.Tensor:
        """(B, heads, T, d) -> (B, heads, L, d): the queries of the slots (a copy; saves only the indices), the
        padding slots' zeroed if ``zero_padding``."""
        batch, heads, seq, dim = query.shape
        flat = query.transpose(1, 2).reshape(batch * seq, heads, dim)
        slots = flat.index_select(0, self.gather)
        if zero_padding and self.padding is not None:
            slots = slots.masked_fill(self.padding[:, None, None], 0)
        return slots.view(batch, self.slots, heads, dim).transpose(1, 2)

    def scatter(self, per_slot: torch.Tensor, seq: int) -> torch.Tensor:
        """(B, heads, L, d) -> (B, heads, T, d): the slots' values at their rows, zeros elsewhere."""
        batch, heads, _, dim = per_slot.shape
        flat = per_slot.new_zeros(batch * seq, heads, dim)
        flat.index_copy_(0, self.rows, self.dense(per_slot.transpose(1, 2).reshape(-1, heads, dim)))
        return flat.view(batch, seq, heads, dim).transpose(1, 2)

    def additive(self, attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
        """The model's whole mask as an additive ``dtype`` mask (0 where a query attends, -inf elsewhere), made once
        per forward; None stays None."""
        if attention_mask is None or attention_mask.dtype == dtype:
            return attention_mask
        key = ("additive", id(attention_mask), dtype)
        return self._once(key, attention_mask, lambda: _additive(attention_mask, dtype))

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
        if attention_mask is None and not causal_if_none:
            return None

        def make() -> torch.Tensor:
            if attention_mask is None:
                keys = torch.arange(num_keys, device=self.positions.device)
                rows = (keys <= self.positions[..., None])[:, None]
            else:
                expanded = attention_mask.expand(self.positions.shape[0], -1, -1, -1)
                rows = torch.take_along_dim(expanded, self.positions[:, None, :, None], dim=2)
            return rows if dtype is None else _additive(rows, dtype)

        key = ("rows", None if attention_mask is None else id(attention_mask), num_keys, dtype)
        return self._once(key, attention_mask, make)

    def _once(self, key: tuple, attention_mask: torch.Tensor | None, make) -> torch.Tensor:
        """``make()``, kept for this forward under ``key`` (a key holding ``id(attention_mask)`` is checked against
        the mask itself: an id can be reused once its tensor is freed)."""
        cached = self._masks.get(key)
        if cached is None or cached[0] is not attention_mask:
            cached = (attention_mask, make())
            self._masks[key] = cached
        return cached[1]

    def dense(self, per_slot: torch.Tensor) -> torch.Tensor:
        """(B * L, ...) values of the slots -> (n, ...) values of ``rows``, in their order."""
        return per_slot if self.valid is None else per_slot.index_select(0, self.valid)


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True: attend) or an additive one as an additive ``dtype`` mask."""
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


class _AttentionGradAtSlots(torch.autograd.Function):
    """Every query's attention (torch's CPU flash kernel); backward for the slots' queries only."""

    @staticmethod
    def forward(ctx, query, key, value, mask, slots: QueryRows, slot_mask, scale):
        output, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, mask is None, attn_mask=mask, scale=scale
        )
        ctx.slots, ctx.scale, ctx.seq = slots, scale, query.shape[-2]
        # saved: the slots' queries, outputs and log-sum-exps only (L of T rows), keys and values whole
        slot_logsumexp = slots.queries(logsumexp.unsqueeze(-1)).squeeze(-1)
        ctx.save_for_backward(slots.queries(query), key, value, slots.queries(output), slot_logsumexp, slot_mask)
        return output

    @staticmethod
    def backward(ctx, grad):
        query, key, value, output, logsumexp, slot_mask = ctx.saved_tensors
        slots: QueryRows = ctx.slots
        grad_query, grad_key, grad_value = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            slots.queries(grad, zero_padding=True),  # a padding slot repeats a row: it must add nothing
            query,
            key,
            value,
            output,
            logsumexp,
            0.0,
            False,
            attn_mask=slot_mask,
            scale=ctx.scale,
        )
        return slots.scatter(grad_query, ctx.seq), grad_key, grad_value, None, None, None, None


def attention_grad_at_slots(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    slots: QueryRows,
    scale: float | None,
) -> torch.Tensor:
    """Causal attention of every query, (B, heads, T, d), whose backward runs for the queries of ``slots`` only.

    Exact where the other queries' outputs take no gradient (the context rows of ``context_tokens="forward_only"``):
    with dO_i = 0 a query adds dS_ij = P_ij (dO_i . V_j - dO_i . O_i) = 0 to every key and value gradient, so the
    kernel's backward over those queries computes zeros. A CPU tensor op, without dropout; keys and values may have
    fewer heads than queries (grouped). ``attention_mask``: the model's (B, 1, T, T) mask (bool or additive) or None
    for causal attention.
    """
    device = query.device.type
    if torch.is_autocast_enabled(device):  # as SDPA under autocast: the kernel runs in the autocast dtype
        dtype = torch.get_autocast_dtype(device)
        query, key, value = (t.to(dtype) for t in (query, key, value))
    mask = slots.additive(attention_mask, query.dtype)
    slot_mask = slots.mask(attention_mask, key.shape[-2], causal_if_none=True, dtype=query.dtype)
    return _AttentionGradAtSlots.apply(query, key, value, mask, slots, slot_mask, scale)
