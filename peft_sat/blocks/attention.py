"""Self-attention blocks on kept heads: rows of q / k / v, columns of o, honouring GQA.

Units (``SATConfig.head_granularity``), with n_q query heads in n_kv groups of g = n_q / n_kv, head dim d:

- ``kv_group``: keep whole groups G; query heads ``G * g + j``; ``num_key_value_groups`` is unchanged.
- ``q_head``: keep any query heads Q; project only the KV heads U = unique(Q // g) they use, then gather one K/V
  per kept query head, so the kernel sees ``num_key_value_groups = 1``.

One forward covers the Llama layout and its relatives: optional per-head q / k norms (Qwen3, Gemma3), sliding
windows (Mistral, Qwen2), logit softcapping (Gemma2), each model file's own eager kernel. Phi3's fused
``qkv_proj`` is sliced once with the q, k and v rows concatenated (``SATFusedAttentionMixin``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import importance
from ..sliced import base_weight, linear_cols, linear_rows, linear_rows_fused, project_base
from ..sliced_backward import linear_cols_kept_grad, linear_rows_kept_grad, weight_grad_forward
from .base import SATBlockMixin, omitted_units, rows_split


@dataclass(frozen=True)
class HeadSelection:
    """Kept attention units as indices into the projections (d = head_dim)."""

    q_heads: torch.Tensor  # (kq,) kept query heads
    q_rows: torch.Tensor  # (kq * d,) rows of q_proj = columns of o_proj
    kv_rows: torch.Tensor  # (kkv * d,) rows of k_proj / v_proj
    kv_for_q: torch.Tensor | None  # q_head granularity: (kq,) position of each query head's KV head among kept


class _GroupsOverride:
    """A read-through view of an attention module that reports ``num_key_value_groups = 1``.

    With ``q_head`` granularity K/V are already expanded to one head per kept query head, so the attention kernel
    must not repeat them again; the module itself stays untouched (no mutation inside forward).
    """

    num_key_value_groups = 1

    def __init__(self, module: nn.Module) -> None:
        self._module = module

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


@dataclass(frozen=True)
class AttentionSelection:
    kept: HeadSelection
    omitted: HeadSelection | None  # None when every head is kept


class SATAttentionMixin(SATBlockMixin):
    """Attention with separate ``q_proj`` / ``k_proj`` / ``v_proj`` / ``o_proj``.

    With dense token positions D (``SATConfig.dense_tokens``) the omitted heads run too, and their output reaches
    the o-projection at the rows D only: dense-token queries see every head, and the keys and values they read are
    those of every position (the omitted heads' K / V are computed for all of them).
    """

    _sat_eager_attention: Any  # the model file's own eager kernel (softcapping variants differ)
    _sat_apply_rotary: Any
    sat_head_granularity: str

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        dense = dict(position_embeddings=position_embeddings, attention_mask=attention_mask, cache=cache, **kwargs)
        if not self.sat_is_sparse():
            return super().forward(hidden_states, **dense)
        rows = self.sat_dense_rows(hidden_states)  # (n,) dense token positions, or None
        config = self.sat_state.config
        if rows is not None and config.context_tokens == "forward_only":
            # Context tokens feed the keys and values with their values only: no gradient reaches their residual
            # stream, so below this layer they need no backward at all (their MLP rows run without a graph).
            return self._sat_context_cut(hidden_states, rows, position_embeddings, attention_mask, kwargs)
        if not self.sat_omits_units:  # converted only to cut the gradient of context tokens
            return super().forward(hidden_states, **dense)
        # A sparse forward never touches a KV cache (forwards given one run dense, see `sat_is_sparse`): sliced keys
        # of a sub-network must never serve generation.
        kwargs.pop("past_key_values", None)
        sel: AttentionSelection = self._sat_select(hidden_states)
        attend = dict(position_embeddings=position_embeddings, attention_mask=attention_mask, kwargs=kwargs)
        if rows is None and config.sparse_pass != "forward_backward":
            return self._sat_attend(hidden_states, sel.kept, dense_forward=config.sparse_pass, **attend)
        output, weights = self._sat_attend(hidden_states, sel.kept, **attend)  # (B, T, H): kept heads, every token
        if rows is None or rows.numel() == 0 or sel.omitted is None:
            return output, weights
        # Dense tokens run the whole block: they add the omitted heads, whose keys and values are every position's.
        extra, _ = self._sat_attend(hidden_states, sel.omitted, rows=rows, add_bias=False, **attend)  # (n, H)
        flat = output.reshape(-1, output.shape[-1]).index_add(0, rows, extra.to(output.dtype))
        return flat.view_as(output), weights

    def _sat_attend(
        self,
        hidden_states: torch.Tensor,
        sel: HeadSelection,
        position_embeddings,
        attention_mask,
        kwargs: dict,
        rows: torch.Tensor | None = None,
        add_bias: bool = True,
        dense_forward: str | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Attention of the heads in ``sel`` for every query, through the o-projection at ``rows`` (flat token
        positions; None: every token). ``kept_grad``: every head runs in forward (the module's own computation, op
        for op) and the backward runs through the heads of ``sel`` only."""
        if dense_forward is not None:
            qkv = self._sat_qkv_dense(hidden_states, sel, self._sat_dense_projection(dense_forward, by_rows=True))
        else:
            qkv = self._sat_qkv(hidden_states, sel)
        kv_for_q = sel.kv_for_q if dense_forward is None else None
        attn_output, attn_weights = self._sat_core(qkv, kv_for_q, position_embeddings, attention_mask, kwargs)
        if dense_forward is not None:
            project = self._sat_dense_projection(dense_forward, by_rows=False)
            return project(self.o_proj, attn_output, sel.q_rows), attn_weights
        if rows is not None:
            attn_output = attn_output.reshape(-1, attn_output.shape[-1]).index_select(0, rows)  # (n, kq * d)
        return linear_cols(self.o_proj, attn_output, sel.q_rows, add_bias=add_bias), attn_weights

    # -- layout-specific parts ---------------------------------------------------------------------------------

    def _sat_qkv(self, x: torch.Tensor, sel: HeadSelection) -> tuple[torch.Tensor, ...]:
        """Flat (B, T, heads * d) query, key and value of the kept heads."""
        # one matmul for the three when they are plain nn.Linear (or LoRA over one): they read the same input
        projections, rows = (self.q_proj, self.k_proj, self.v_proj), (sel.q_rows, sel.kv_rows, sel.kv_rows)
        return tuple(linear_rows_fused(projections, x, rows))

    def _sat_core(
        self, qkv: tuple[torch.Tensor, ...], kv_for_q, position_embeddings, attention_mask, kwargs: dict
    ) -> tuple[torch.Tensor, Any]:
        """The module's attention on flat (B, T, heads * d) query, key and value: per-head norms, rotary embedding,
        the attention kernel; returns (B, T, heads * d) and the kernel's weights."""
        input_shape = qkv[0].shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = (t.view(hidden_shape) for t in qkv)  # (B, T, heads, d)
        if hasattr(self, "q_norm"):  # per-head RMSNorm over head_dim (Qwen3, Gemma3): slicing heads is exact
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, heads, T, d)

        cos, sin = position_embeddings
        query, key = self._sat_apply_rotary(query, key, cos, sin)

        module: Any = self
        if kv_for_q is not None:
            key, value = key[:, kv_for_q], value[:, kv_for_q]  # (B, kq, T, d): one KV per query head
            module = _GroupsOverride(self)

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._sat_eager_attention)
        if hasattr(self, "attn_logit_softcapping"):  # Gemma2
            kwargs["softcap"] = self.attn_logit_softcapping
        attn_output, attn_weights = attention(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=getattr(self, "sliding_window", getattr(self.config, "sliding_window", None)),
            **kwargs,
        )
        return attn_output.reshape(*input_shape, -1).contiguous(), attn_weights  # (B, T, heads * d)

    def _sat_context_cut(self, hidden_states, rows, position_embeddings, attention_mask, kwargs) -> tuple:
        """``context_tokens="forward_only"``: every head, forward; the context rows give keys and values whose
        projections train, and take no gradient themselves (no query or output graph, no input gradient)."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        context = omitted_units(rows, flat.shape[0])
        cut = flat.detach().index_copy(0, rows, flat.index_select(0, rows))  # keys / values: weights train only
        qkv = self._sat_cut_qkv(flat, cut, rows, context)
        shape = hidden_states.shape[:-1]
        attn_output, attn_weights = self._sat_core(
            tuple(t.view(*shape, -1) for t in qkv), None, position_embeddings, attention_mask, kwargs
        )
        output = rows_split(self.o_proj, attn_output.reshape(-1, attn_output.shape[-1]), rows, context)
        return output.view(*shape, -1), attn_weights

    def _sat_cut_qkv(self, flat, cut, rows, context) -> tuple[torch.Tensor, ...]:
        """Flat (N, heads * d) query (a graph on the dense rows only), key and value (of the cut input)."""
        return rows_split(self.q_proj, flat, rows, context), self.k_proj(cut), self.v_proj(cut)

    @staticmethod
    def _sat_dense_projection(sparse_pass: str, by_rows: bool) -> Callable:
        """``(module, x, index) -> module(x)`` whose backward follows ``sparse_pass`` ("backward": through the units
        ``index`` only; "weight_grad": every input gradient, the weight gradient of ``index`` only)."""
        if sparse_pass == "backward":
            return linear_rows_kept_grad if by_rows else linear_cols_kept_grad
        return lambda module, x, index: weight_grad_forward(module, x, by_rows)[1](index)

    def _sat_qkv_dense(self, x: torch.Tensor, sel: HeadSelection, project: Callable) -> tuple[torch.Tensor, ...]:
        """Flat (B, T, heads * d) query, key and value of EVERY head, each projection called as the module's own
        forward calls it, with the backward of ``project`` for the kept heads' rows."""
        return (
            project(self.q_proj, x, sel.q_rows),
            project(self.k_proj, x, sel.kv_rows),
            project(self.v_proj, x, sel.kv_rows),
        )

    def _sat_score_views(self) -> dict[str, Callable]:
        return dict(
            w_q=lambda: base_weight(self.q_proj),
            project_q=lambda s: project_base(self.q_proj, s),
            project_v=lambda s: project_base(self.v_proj, s),
        )

    # -- units ------------------------------------------------------------------------------------------------

    @property
    def _sat_shape(self) -> tuple[int, int, int]:
        num_heads = self.config.num_attention_heads
        return num_heads, num_heads // self.num_key_value_groups, self.head_dim

    def _sat_scores(self, metric, x, x_sample, generator):
        num_heads, num_kv_heads, head_dim = self._sat_shape
        if metric == "uniform":  # draw per unit so that kv_group and q_head are both uniformly random
            return importance.uniform_scores(self.sat_num_units, generator)
        scores = importance.head_scores(
            metric,
            x=x,
            x_sample=x_sample,
            w_o=lambda: base_weight(self.o_proj),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            generator=generator,
            **self._sat_score_views(),
        )
        return scores if self.sat_head_granularity == "q_head" else importance.group_scores(scores, num_kv_heads)

    def _sat_selection(self, kept: torch.Tensor) -> AttentionSelection:
        omitted = omitted_units(kept, self.sat_num_units)
        return AttentionSelection(
            kept=self._sat_heads(kept), omitted=self._sat_heads(omitted) if omitted.numel() else None
        )

    def _sat_last_kept(self, kept: torch.Tensor) -> torch.Tensor:
        return self._sat_query_heads(kept)  # kept query heads, whatever the granularity

    def _sat_query_heads(self, units: torch.Tensor) -> torch.Tensor:
        if self.sat_head_granularity == "q_head":
            return units
        groups = self.num_key_value_groups
        return (units[:, None] * groups + torch.arange(groups, device=units.device)).reshape(-1)

    def _sat_heads(self, units: torch.Tensor) -> HeadSelection:
        """The projection rows of the attention units ``units`` (KV groups or query heads)."""
        _, _, head_dim = self._sat_shape
        groups = self.num_key_value_groups
        offsets = torch.arange(head_dim, device=units.device)
        q_heads = self._sat_query_heads(units)
        if self.sat_head_granularity == "kv_group":
            kv_heads, kv_for_q = units, None
        else:
            kv_heads, kv_for_q = torch.unique(q_heads // groups, sorted=True, return_inverse=True)
        return HeadSelection(
            q_heads=q_heads,
            q_rows=(q_heads[:, None] * head_dim + offsets).reshape(-1),
            kv_rows=(kv_heads[:, None] * head_dim + offsets).reshape(-1),
            kv_for_q=kv_for_q,
        )


class SATFusedAttentionMixin(SATAttentionMixin):
    """Phi3 attention: ``qkv_proj`` rows are [q (n_q * d) | k (n_kv * d) | v (n_kv * d)]."""

    def _sat_qkv(self, x: torch.Tensor, sel: HeadSelection) -> tuple[torch.Tensor, ...]:
        num_heads, num_kv_heads, head_dim = self._sat_shape
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        rows = torch.cat([sel.q_rows, q_size + sel.kv_rows, q_size + kv_size + sel.kv_rows])
        kept_kv = sel.kv_rows.numel()
        return linear_rows(self.qkv_proj, x, rows).split([sel.q_rows.numel(), kept_kv, kept_kv], dim=-1)

    def _sat_cut_qkv(self, flat, cut, rows, context) -> tuple[torch.Tensor, ...]:
        num_heads, num_kv_heads, head_dim = self._sat_shape
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        return self.qkv_proj(cut).split([q_size, kv_size, kv_size], dim=-1)  # one projection: one input

    def _sat_qkv_dense(self, x: torch.Tensor, sel: HeadSelection, project: Callable) -> tuple[torch.Tensor, ...]:
        num_heads, num_kv_heads, head_dim = self._sat_shape
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        rows = torch.cat([sel.q_rows, q_size + sel.kv_rows, q_size + kv_size + sel.kv_rows])
        qkv = project(self.qkv_proj, x, rows)
        return qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]

    def _sat_score_views(self) -> dict[str, Callable]:
        num_heads, num_kv_heads, head_dim = self._sat_shape
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        return dict(
            w_q=lambda: base_weight(self.qkv_proj)[:q_size],
            project_q=lambda s: project_base(self.qkv_proj, s)[:, :q_size],
            project_v=lambda s: project_base(self.qkv_proj, s)[:, q_size + kv_size :],
        )
