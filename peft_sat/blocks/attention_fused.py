"""Phi3's attention: one fused ``qkv_proj``, sliced once with the kept q, k and v rows concatenated; everything else
is ``SATAttentionMixin``'s."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..sliced import base_weight, linear_rows, project_base
from ..sliced_backward import rows_forward, weight_grad_forward
from ..token_rows import project_all_rows
from .attention import SATAttentionMixin
from .heads import HeadSelection, KeptHeads


class SATFusedAttentionMixin(SATAttentionMixin):
    """Phi3 attention: ``qkv_proj`` rows are [q (n_q * d) | k (n_kv * d) | v (n_kv * d)]."""

    def _sat_qkv(self, x: torch.Tensor, sel: HeadSelection) -> tuple[torch.Tensor, ...]:
        num_heads, num_kv_heads, head_dim = self._sat_shape
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        rows = torch.cat([sel.q_rows, q_size + sel.kv_rows, q_size + kv_size + sel.kv_rows])
        kept_kv = sel.kv_rows.numel()
        return linear_rows(self.qkv_proj, x, rows).split([sel.q_rows.numel(), kept_kv, kept_kv], dim=-1)

    def _sat_q(self, x: torch.Tensor, q_rows: torch.Tensor) -> torch.Tensor:
        return linear_rows(self.qkv_proj, x, q_rows)

    def _sat_kv(self, x: torch.Tensor, sel: HeadSelection | None) -> tuple[torch.Tensor, torch.Tensor]:
        num_heads, num_kv_heads, head_dim = self._sat_shape
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        kv_rows = torch.arange(kv_size, device=x.device) if sel is None else sel.kv_rows
        rows = torch.cat([q_size + kv_rows, q_size + kv_size + kv_rows])
        key, value = linear_rows(self.qkv_proj, x, rows).split(kv_rows.numel(), dim=-1)
        return key, value

    def _sat_cut_qkv(self, flat, x_rows, rows, context) -> tuple[torch.Tensor, ...]:
        num_heads, num_kv_heads, head_dim = self._sat_shape
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        # one projection: the query's context rows train it too (their output takes no gradient: zero terms)
        qkv = project_all_rows(self.qkv_proj, flat, x_rows, None, rows, context)
        return qkv.split([q_size, kv_size, kv_size], dim=-1)

    def _sat_qkv_forward(self, x: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], KeptHeads]:
        num_heads, num_kv_heads, head_dim = self._sat_shape
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        qkv, kept_qkv = rows_forward(self.qkv_proj, x)  # (B, T, q_size + 2 kv_size)
        values = qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]

        def kept(sel: HeadSelection, _values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            rows = torch.cat([sel.q_rows, q_size + sel.kv_rows, q_size + kv_size + sel.kv_rows])
            kept_kv = sel.kv_rows.numel()
            return kept_qkv(rows, qkv).split([sel.q_rows.numel(), kept_kv, kept_kv], dim=-1)

        return values, kept

    def _sat_qkv_weight_grad(self, x: torch.Tensor, sel: HeadSelection) -> tuple[torch.Tensor, ...]:
        num_heads, num_kv_heads, head_dim = self._sat_shape
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        rows = torch.cat([sel.q_rows, q_size + sel.kv_rows, q_size + kv_size + sel.kv_rows])
        qkv = weight_grad_forward(self.qkv_proj, x, by_rows=True)[1](rows)
        return qkv[..., :q_size], qkv[..., q_size : q_size + kv_size], qkv[..., q_size + kv_size :]

    def _sat_score_views(self) -> dict[str, Callable]:
        num_heads, num_kv_heads, head_dim = self._sat_shape
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        return dict(
            w_q=lambda: base_weight(self.qkv_proj)[:q_size],
            project_q=lambda s: project_base(self.qkv_proj, s)[:, :q_size],
            project_v=lambda s: project_base(self.qkv_proj, s)[:, q_size + kv_size :],
        )
