"""Self-attention blocks on kept heads: rows of q / k / v, columns of o, honouring GQA.

Units (``SATConfig.head_granularity``; their projection rows in ``heads``): whole KV groups (``kv_group``,
``num_key_value_groups`` unchanged) or single query heads (``q_head``: only the KV heads they read are projected,
then one K / V is gathered per kept query head, so the kernel sees ``num_key_value_groups = 1``).

One forward covers the Llama layout and its relatives: optional per-head q / k norms (Qwen3, Gemma3), sliding
windows (Mistral, Qwen2), logit softcapping (Gemma2), each model file's own eager kernel. Phi3's fused
``qkv_proj``: ``attention_fused.SATFusedAttentionMixin``, which overrides the projection steps only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .. import importance, norm_input
from ..query_rows import QueryRows, attention_grad_at_slots
from ..scatter import add_at, place
from ..sliced import base_weight, linear_cols, linear_rows, linear_rows_fused, project_base
from ..sliced_backward import cols_output, rows_forward, weight_grad_forward
from ..token_rows import project_all_rows, project_rows, project_together, supports_rows
from .base import SATBlockMixin, omitted_units
from .heads import (
    AttentionSelection,
    GroupsOverride,
    HeadSelection,
    KeptHeads,
    head_selection,
    heads_of,
    merge_heads,
    query_heads,
)


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
        with norm_input.recomputable(hidden_states, self.sat_state):  # saved as the norm's input (`norm_input`)
            return self._sat_forward(hidden_states, position_embeddings, attention_mask, dense, kwargs)

    def _sat_forward(self, hidden_states, position_embeddings, attention_mask, dense: dict, kwargs: dict):
        rows = self.sat_dense_rows(hidden_states)  # (n,) dense token positions, or None
        config = self.sat_state.config
        if rows is not None and self.sat_state.context_forward_only:
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
        if rows is None and config.sparse_pass == "backward":
            return self._sat_attend_kept_grad(hidden_states, sel, **attend)
        if rows is None and config.sparse_pass == "weight_grad":
            return self._sat_attend_weight_grad(hidden_states, sel.kept, **attend)
        if rows is None or rows.numel() == 0 or sel.omitted is None:
            return self._sat_attend(hidden_states, sel.kept, **attend)  # (B, T, H): kept heads, every token
        # Dense tokens run the whole block: they add the omitted heads, whose keys and values are every position's.
        kept_kv, omitted_kv = self._sat_split_kv(hidden_states, sel)
        output, weights = self._sat_attend(hidden_states, sel.kept, kv=kept_kv, **attend)
        extra, _ = self._sat_attend(hidden_states, sel.omitted, rows=rows, add_bias=False, kv=omitted_kv, **attend)
        flat = add_at(output.reshape(-1, output.shape[-1]), rows, extra)  # (n, H) added at the dense rows
        return flat.view_as(output), weights

    def _sat_split_kv(self, x: torch.Tensor, sel: AttentionSelection) -> tuple[tuple | None, tuple | None]:
        """The flat keys and values of the kept and of the omitted heads of a split batch, or None for each where
        ``_sat_attend`` projects its own. Every KV head runs on every position once: whole KV groups split into
        disjoint sets, but with ``q_head`` units a KV head may serve kept and omitted query heads alike, so every
        KV head is projected once and each side takes its own."""
        if self.sat_head_granularity != "q_head":
            return None, None
        key, value = self._sat_kv(x, None)
        d = self.head_dim
        return tuple(tuple(heads_of(t, part.kv_heads, d) for t in (key, value)) for part in (sel.kept, sel.omitted))

    def _sat_attend(
        self,
        hidden_states: torch.Tensor,
        sel: HeadSelection,
        position_embeddings,
        attention_mask,
        kwargs: dict,
        rows: torch.Tensor | None = None,
        add_bias: bool = True,
        kv: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """Attention of the heads in ``sel`` through the o-projection, for every query or, with ``rows`` (flat token
        positions), for those only: (N or n, hidden). ``kv``: the heads' flat keys and values, projected by the
        caller."""
        if rows is None and kv is None:
            qkv = self._sat_qkv(hidden_states, sel)
        else:  # the rows' queries read the keys and values of every position, but no other position's query
            query = (
                self._sat_q(hidden_states, sel.q_rows) if rows is None else self._sat_q_at(hidden_states, sel, rows)
            )
            qkv = (query, *(kv if kv is not None else self._sat_kv(hidden_states, sel)))
        queries = None if rows is None else self._sat_query_rows(rows, hidden_states.shape[:2])
        attend = (position_embeddings, attention_mask, kwargs)
        attn_output, attn_weights = self._sat_core(qkv, sel.kv_for_q, *attend, queries=queries)  # (B, T or L, kq*d)
        if queries is not None:  # the o-projection at the dense rows' slots, the padding slots left out
            slots = attn_output.reshape(-1, attn_output.shape[-1])
            if queries.valid is not None:
                # torch's CPU kernel keeps its output for backward, and the slots are a view of it: the o-projection
                # saves that instead of a copy of the rows (`rows_of_kept`); other kernels' outputs are copies
                kept = self._sat_cpu_sdpa(slots.device)
                slots = norm_input.rows_of_kept(slots, queries.valid) if kept else queries.dense(slots)
            return linear_cols(self.o_proj, slots, sel.q_rows, add_bias=add_bias), attn_weights
        if rows is not None:
            attn_output = attn_output.reshape(-1, attn_output.shape[-1]).index_select(0, rows)  # (n, kq * d)
        return linear_cols(self.o_proj, attn_output, sel.q_rows, add_bias=add_bias), attn_weights

    def _sat_attend_kept_grad(
        self, hidden_states: torch.Tensor, sel: AttentionSelection, position_embeddings, attention_mask, kwargs: dict
    ) -> tuple[torch.Tensor, Any]:
        """``sparse_pass="backward"``: the module's own forward value, and a gradient graph of the kept heads only.

        The projections compute every head's value first (``peft_sat.sliced_backward.rows_forward``); the kept heads
        then attend with their graph, the omitted ones without, and the o-projection's value is computed from every
        head's output while its backward runs through the kept heads' columns only. Each head's attention is
        computed on its own in the kernels, so the value is the dense forward's, bit for bit; backward (and what it
        saves) covers the kept heads only.
        """
        values, kept_graph = self._sat_qkv_forward(hidden_states)  # (B, T, heads * d) each, no graph
        attend = (position_embeddings, attention_mask, kwargs)
        kept_qkv = kept_graph(sel.kept, values)
        kept_output, kept_weights = self._sat_core(kept_qkv, sel.kept.kv_for_q, *attend)  # (B, T, kq * d)
        omitted = sel.omitted
        if omitted is None:  # every head kept: the kept output is the whole one, in head order
            return cols_output(self.o_proj, kept_output, kept_output, sel.kept.q_rows), kept_weights
        with torch.no_grad():
            query, key, value = values
            d = self.head_dim
            omitted_qkv = (heads_of(query, omitted.q_heads, d), heads_of(key, omitted.kv_heads, d),
                           heads_of(value, omitted.kv_heads, d))  # fmt: skip
            omitted_output, omitted_weights = self._sat_core(omitted_qkv, omitted.kv_for_q, *attend)
            whole = merge_heads(kept_output.detach(), omitted_output, sel, d)  # (B, T, n_q * d)
            weights = None
            if kept_weights is not None and omitted_weights is not None:  # (B, heads, T, T): eager kernels
                shape = list(kept_weights.shape)
                shape[1] = query.shape[-1] // d
                weights = kept_weights.new_empty(shape).index_copy_(1, sel.kept.q_heads, kept_weights.detach())
                weights.index_copy_(1, omitted.q_heads, omitted_weights)
        return cols_output(self.o_proj, whole, kept_output, sel.kept.q_rows), weights

    def _sat_attend_weight_grad(
        self, hidden_states: torch.Tensor, sel: HeadSelection, position_embeddings, attention_mask, kwargs: dict
    ) -> tuple[torch.Tensor, Any]:
        """``sparse_pass="weight_grad"``: the dense forward and every input gradient; the projections' base weights
        get their gradient on the rows (q / k / v) and columns (o) of the kept heads only."""
        qkv = self._sat_qkv_weight_grad(hidden_states, sel)
        attn_output, attn_weights = self._sat_core(qkv, None, position_embeddings, attention_mask, kwargs)
        _, output = weight_grad_forward(self.o_proj, attn_output, by_rows=False)
        return output(sel.q_rows), attn_weights

    # -- layout-specific parts ---------------------------------------------------------------------------------

    def _sat_qkv(self, x: torch.Tensor, sel: HeadSelection) -> tuple[torch.Tensor, ...]:
        """Flat (B, T, heads * d) query, key and value of the kept heads."""
        # q and k as one matmul when they are plain nn.Linear (or LoRA over one): they read the same input. Not v:
        # the attention kernel saves v for backward, and a view of a fused output would keep q and k alive with it.
        query, key = linear_rows_fused((self.q_proj, self.k_proj), x, (sel.q_rows, sel.kv_rows))
        return query, key, linear_rows(self.v_proj, x, sel.kv_rows)

    def _sat_q(self, x: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
        """The flat (B, T, kq * d) query of the heads whose q_proj rows are ``q_rows``."""
        return linear_rows(self.q_proj, x, q_rows)

    def _sat_q_at(self, x: torch.Tensor, sel: HeadSelection, rows: torch.Tensor) -> torch.Tensor:
        """``_sat_q`` computed at the flat token positions ``rows`` only, zero elsewhere: (B, T, kq * d). Where the
        block input is not recomputable from its norm's input (``norm_input.rows_of``; e.g. layer 0 over frozen
        embeddings), at every position: a projection of the rows would save a copy of them."""
        x_rows = norm_input.rows_of(x, rows)
        if x_rows is None:
            return self._sat_q(x, sel.q_rows)
        query = self._sat_q(x_rows, sel.q_rows)  # (n, kq * d)
        return place([(rows, query)], x.shape[:-1].numel()).view(*x.shape[:-1], -1)

    def _sat_kv(self, x: torch.Tensor, sel: HeadSelection | None) -> tuple[torch.Tensor, torch.Tensor]:
        """The flat (B, T, kkv * d) key and value of the KV heads of ``sel`` (None: every KV head, still through the
        sliced kernels: they save the block input as the norm's input, ``peft_sat.norm_input``)."""
        _, num_kv_heads, head_dim = self._sat_shape
        kv_rows = sel.kv_rows if sel is not None else torch.arange(num_kv_heads * head_dim, device=x.device)
        return linear_rows(self.k_proj, x, kv_rows), linear_rows(self.v_proj, x, kv_rows)

    def _sat_query_rows(self, rows: torch.Tensor, grid: torch.Size) -> QueryRows | None:
        """The query slots of the dense ``rows`` (made once per forward, with the rows), or None where the kernel
        takes no per-query mask rows (flash, flex and hub kernels) or there are no rows: every query runs."""
        if self.config._attn_implementation not in ("sdpa", "eager") or rows.numel() == 0:
            return None
        cache = self.sat_state.batch.dense_rows_cache
        key = ("query_rows", tuple(grid))
        if key not in cache or cache[key].rows is not rows:
            cache[key] = QueryRows.of(rows, *grid)
        return cache[key]

    def _sat_core(
        self,
        qkv: tuple[torch.Tensor, ...],
        kv_for_q,
        position_embeddings,
        attention_mask,
        kwargs: dict,
        queries: QueryRows | None = None,
        grad_at: QueryRows | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """The module's attention on flat (B, T, heads * d) query, key and value: per-head norms, rotary embedding,
        the attention kernel; returns (B, T, heads * d) and the kernel's weights. With ``queries``, the queries of
        its slots only, (B, L, heads * d), each with its own mask row; with ``grad_at``, every query, with a
        backward for its slots' queries only (``attention_grad_at_slots``: the others' outputs take no gradient)."""
        input_shape = qkv[0].shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query, key, value = (t.view(hidden_shape) for t in qkv)  # (B, T, heads, d)
        if hasattr(self, "q_norm"):  # per-head RMSNorm over head_dim (Qwen3, Gemma3): slicing heads is exact
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, heads, T, d)

        cos, sin = position_embeddings
        query, key = self._sat_apply_rotary(query, key, cos, sin)
        if queries is not None:
            query = queries.queries(query)  # (B, heads, L, d)
            input_shape = (input_shape[0], queries.slots)

        module: Any = self
        if kv_for_q is not None:
            key, value = key[:, kv_for_q], value[:, kv_for_q]  # (B, kq, T, d): one KV per query head
            module = GroupsOverride(self)

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._sat_eager_attention)
        if hasattr(self, "attn_logit_softcapping"):  # Gemma2
            kwargs["softcap"] = self.attn_logit_softcapping
        if grad_at is not None:
            output = attention_grad_at_slots(query, key, value, attention_mask, grad_at, self.scaling)
            return output.transpose(1, 2).reshape(*input_shape, -1), None
        kernel = attention if queries is None else self._sat_slots_kernel(attention, queries)
        attn_output, attn_weights = kernel(
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

    def _sat_slots_kernel(self, attention: Callable, queries: QueryRows) -> Callable:
        """``attention`` for the (B, heads, L, d) queries of ``queries``' slots against every key, each query with
        its own mask row (``QueryRows.mask``)."""
        sdpa = self.config._attn_implementation == "sdpa"

        def kernel(module, query, key, value, attention_mask, dropout, scaling, **kwargs):
            if self._sat_cpu_sdpa(query.device):
                # torch's own call: given a mask, transformers' SDPA wrapper repeats K / V per query head, and the
                # kernel saves the copies; torch's CPU kernel takes the mask with `enable_gqa` and saves them as
                # they are. The additive mask is made once for every layer (a bool one is converted and saved anew).
                mask = queries.mask(attention_mask, key.shape[-2], causal_if_none=True, dtype=query.dtype)
                groups = module.num_key_value_groups
                output = F.scaled_dot_product_attention(
                    query, key, value, mask, dropout, scale=scaling, enable_gqa=groups > 1
                )
                return output.transpose(1, 2), None  # (B, L, heads, d), as transformers' kernels return it
            mask = queries.mask(attention_mask, key.shape[-2], causal_if_none=sdpa)
            return attention(module, query, key, value, mask, dropout=dropout, scaling=scaling, **kwargs)

        return kernel

    def _sat_cpu_sdpa(self, device: torch.device) -> bool:
        """Whether this attention runs transformers' SDPA on a CPU, where SAT may call torch's kernel itself; not with
        softcapping, which SDPA lacks (transformers' wrapper raises)."""
        implementation = self.config._attn_implementation
        return (
            implementation == "sdpa" and device.type == "cpu" and getattr(self, "attn_logit_softcapping", None) is None
        )

    def _sat_context_cut(self, hidden_states, rows, position_embeddings, attention_mask, kwargs) -> tuple:
        """``context_tokens="forward_only"``: every head, forward; the context rows give keys and values whose
        projections train, and take no gradient themselves (no query or output graph, no input gradient)."""
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        context = self.sat_context_rows(rows, flat.shape[0])
        x_rows = norm_input.rows_input(hidden_states, rows, self.sat_state)  # with their graph: shared by q, k, v
        qkv = self._sat_cut_qkv(flat, x_rows, rows, context)
        shape = hidden_states.shape[:-1]
        # On a CPU the attention's backward runs for the dense rows' queries only (without dropout, whose draws a
        # backward of its own could not repeat); the context rows' outputs take no gradient.
        dropout = self.training and self.attention_dropout > 0
        grad_at = self._sat_query_rows(rows, shape) if self._sat_cpu_sdpa(flat.device) and not dropout else None
        attn_output, attn_weights = self._sat_core(
            tuple(t.view(*shape, -1) for t in qkv), None, position_embeddings, attention_mask, kwargs, grad_at=grad_at
        )
        output = project_rows(self.o_proj, attn_output.reshape(-1, attn_output.shape[-1]), rows, context)
        return output.view(*shape, -1), attn_weights

    def _sat_cut_qkv(self, flat, x_rows, rows, context) -> tuple[torch.Tensor, ...]:
        """Flat (N, heads * d) query (a graph on the dense rows only), key and value (their weights learn from every
        row, their input gradient reaches the dense rows only)."""
        projections = (self.q_proj, self.k_proj, self.v_proj)
        if all(supports_rows(p) for p in projections):  # the query's graph on the dense rows, the keys' on all
            return tuple(project_together(projections, (False, True, True), flat, x_rows, None, rows, context))
        query = project_rows(self.q_proj, flat, rows, context, x_rows)
        kv = (self.k_proj, self.v_proj)
        # the context rows as constants, one copy shared by k and v
        x_context = flat.detach().index_select(0, context)
        if not all(supports_rows(p) for p in kv):  # 4-bit bases, LoRA variants: one input copy serves both
            cut = place([(context, x_context), (rows, x_rows)], flat.shape[0])
            return query, self.k_proj(cut), self.v_proj(cut)
        return query, *(project_all_rows(p, flat, x_rows, x_context, rows, context) for p in kv)

    def _sat_qkv_forward(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], KeptHeads]:
        """The query, key and value of EVERY head, flat (B, T, heads * d), as the module's own projections compute
        them (no graph), and ``kept(sel, values)`` giving those of the heads of ``sel`` with their gradient graph."""
        (query, kept_q), (key, kept_k), (value, kept_v) = (
            rows_forward(p, x) for p in (self.q_proj, self.k_proj, self.v_proj)
        )

        def kept(sel: HeadSelection, values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            q, k, v = values
            return kept_q(sel.q_rows, q), kept_k(sel.kv_rows, k), kept_v(sel.kv_rows, v)

        return (query, key, value), kept

    def _sat_qkv_weight_grad(self, x: torch.Tensor, sel: HeadSelection) -> tuple[torch.Tensor, ...]:
        """Flat (B, T, heads * d) query, key and value of EVERY head, whose projections' base weights get their
        gradient on the kept heads' rows only."""
        rows = (sel.q_rows, sel.kv_rows, sel.kv_rows)
        projections = (self.q_proj, self.k_proj, self.v_proj)
        return tuple(weight_grad_forward(p, x, by_rows=True)[1](r) for p, r in zip(projections, rows, strict=True))

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
        return query_heads(kept, self.num_key_value_groups, self.sat_head_granularity)

    def _sat_heads(self, units: torch.Tensor) -> HeadSelection:
        """The projection rows of the attention units ``units`` (KV groups or query heads)."""
        return head_selection(units, self.num_key_value_groups, self.head_dim, self.sat_head_granularity)
