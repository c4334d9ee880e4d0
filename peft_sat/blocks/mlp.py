"""Gated MLP blocks ``down(act(gate(x)) * up(x))`` on kept intermediate channels.

Kept channels ``c`` (k of I): rows ``c`` of gate and up, columns ``c`` of down. Two layouts:

- ``SATMLPMixin``: separate ``gate_proj`` / ``up_proj`` / ``down_proj`` (Llama, Mistral, Qwen, Gemma, Granite, Olmo2);
- ``SATFusedMLPMixin``: Phi3's ``gate_up_proj`` (2I rows: gate then up), sliced once with rows ``[c, I + c]``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import importance
from ..sliced import base_layer, base_weight, linear_cols, linear_rows, linear_rows_fused, project_base
from .base import SATBlockMixin


class SATMLPMixin(SATBlockMixin):
    """MLP with separate gate / up / down projections."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sat_is_sparse():
            return super().forward(x)
        kept = self._sat_select(x)  # (k,) channel indices
        gate, up = self._sat_gate_up(x, kept)  # (B, T, k) each
        return linear_cols(self.down_proj, self._sat_activation(gate) * up, kept)  # (B, T, H)

    @classmethod
    def sat_num_channels(cls, module) -> int:
        return base_layer(module.gate_proj).out_features

    @property
    def _sat_activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.act_fn

    def _sat_gate_up(self, x: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gate, up = linear_rows_fused((self.gate_proj, self.up_proj), x, (kept, kept))  # one matmul when plain
        return gate, up

    def _sat_score_views(self) -> dict[str, Callable]:
        """Base weights and no-grad projections that the importance metrics read."""
        return dict(
            w_gate=lambda: base_weight(self.gate_proj),
            w_up=lambda: base_weight(self.up_proj),
            project_gate=lambda s: project_base(self.gate_proj, s),
            project_up=lambda s: project_base(self.up_proj, s),
        )

    def _sat_scores(self, metric, x, x_sample, generator):
        return importance.channel_scores(
            metric,
            x=x,
            x_sample=x_sample,
            w_down=lambda: base_weight(self.down_proj),
            act_fn=self._sat_activation,
            num_channels=self.sat_num_units,
            generator=generator,
            **self._sat_score_views(),
        )

    def _sat_selection(self, kept: torch.Tensor) -> torch.Tensor:
        self.sat_last_kept = kept
        return kept


class SATFusedMLPMixin(SATMLPMixin):
    """Phi3 MLP: ``gate, up = gate_up_proj(x).chunk(2)``; ``down_proj(up * act(gate))``."""

    @classmethod
    def sat_num_channels(cls, module) -> int:
        return base_layer(module.gate_up_proj).out_features // 2

    @property
    def _sat_activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.activation_fn

    def _sat_gate_up(self, x: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.cat([kept, kept + self.sat_num_units])  # gate rows, then the same channels' up rows
        return linear_rows(self.gate_up_proj, x, rows).chunk(2, dim=-1)

    def _sat_score_views(self) -> dict[str, Callable]:
        channels = self.sat_num_units
        return dict(
            w_gate=lambda: base_weight(self.gate_up_proj)[:channels],
            w_up=lambda: base_weight(self.gate_up_proj)[channels:],
            project_gate=lambda s: project_base(self.gate_up_proj, s)[:, :channels],
            project_up=lambda s: project_base(self.gate_up_proj, s)[:, channels:],
        )
