"""Attention units as projection indices: which query heads, KV heads and rows a kept set of units covers.

With n_q query heads in n_kv groups of g = n_q / n_kv and head dim d, a unit is a KV group G (``kv_group``: query
heads ``G * g + j``, rows ``h * d + i`` of q / k / v) or a query head Q (``q_head``: only the KV heads
U = unique(Q // g) it reads are projected, then one K / V is gathered per kept query head).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class HeadSelection:
    """Kept attention units as indices into the projections (d = head_dim)."""

    q_heads: torch.Tensor  # (kq,) kept query heads
    q_rows: torch.Tensor  # (kq * d,) rows of q_proj = columns of o_proj
    kv_heads: torch.Tensor  # (kkv,) KV heads they read
    kv_rows: torch.Tensor  # (kkv * d,) rows of k_proj / v_proj
    kv_for_q: torch.Tensor | None  # q_head granularity: (kq,) position of each query head's KV head among kept


@dataclass(frozen=True)
class AttentionSelection:
    kept: HeadSelection
    omitted: HeadSelection | None  # None when every head is kept


# (selection, every head's flat q / k / v) -> the selection's q / k / v with their gradient graph
KeptHeads = Callable[[HeadSelection, tuple[torch.Tensor, ...]], tuple[torch.Tensor, ...]]


def query_heads(units: torch.Tensor, groups: int, granularity: str) -> torch.Tensor:
    """The query heads of the units ``units``: themselves (``q_head``) or every head of each KV group."""
    if granularity == "q_head":
        return units
    return (units[:, None] * groups + torch.arange(groups, device=units.device)).reshape(-1)


def head_selection(units: torch.Tensor, groups: int, head_dim: int, granularity: str) -> HeadSelection:
    """The projection rows of the attention units ``units`` (KV groups or query heads)."""
    offsets = torch.arange(head_dim, device=units.device)
    q_heads = query_heads(units, groups, granularity)
    if granularity == "kv_group":
        kv_heads, kv_for_q = units, None
    else:
        kv_heads, kv_for_q = torch.unique(q_heads // groups, sorted=True, return_inverse=True)
    return HeadSelection(
        q_heads=q_heads,
        q_rows=(q_heads[:, None] * head_dim + offsets).reshape(-1),
        kv_heads=kv_heads,
        kv_rows=(kv_heads[:, None] * head_dim + offsets).reshape(-1),
        kv_for_q=kv_for_q,
    )


def heads_of(flat: torch.Tensor, heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The heads ``heads`` of a flat (B, T, n * d) tensor: (B, T, len(heads) * d), copied a whole head at a time."""
    return flat.unflatten(-1, (-1, head_dim)).index_select(-2, heads).flatten(-2)


def merge_heads(kept: torch.Tensor, omitted: torch.Tensor, sel: AttentionSelection, head_dim: int) -> torch.Tensor:
    """The (B, T, n_q * d) attention output in head order from the kept and the omitted heads' flat outputs."""
    heads = sel.kept.q_heads.numel() + sel.omitted.q_heads.numel()
    whole = kept.new_empty(*kept.shape[:-1], heads, head_dim)
    whole.index_copy_(-2, sel.kept.q_heads, kept.unflatten(-1, (-1, head_dim)))
    whole.index_copy_(-2, sel.omitted.q_heads, omitted.unflatten(-1, (-1, head_dim)).to(whole.dtype))
    return whole.flatten(-2)


class GroupsOverride:
    """A read-through view of an attention module that reports ``num_key_value_groups = 1``.

    With ``q_head`` granularity K/V are already expanded to one head per kept query head, so the attention kernel
    must not repeat them again; the module itself stays untouched (no mutation inside forward).
    """

    num_key_value_groups = 1

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)
