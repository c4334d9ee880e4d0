"""Gated MLP blocks ``down(act(gate(x)) * up(x))`` on kept intermediate channels.

Kept channels ``c`` (k of I): rows ``c`` of gate and up, columns ``c`` of down. Two layouts:

- ``SATMLPMixin``: separate ``gate_proj`` / ``up_proj`` / ``down_proj`` (Llama, Mistral, Qwen, Gemma, Granite, Olmo2);
- ``SATFusedMLPMixin``: Phi3's ``gate_up_proj`` (2I rows: gate then up), sliced once with rows ``[c, I + c]``.

With dense token positions D (``SATConfig.dense_tokens``) the omitted channels O run for the rows D only::

    y = down_K(act(gate_K x) * up_K x)  +  scatter_D( down_O(act(gate_O x_D) * up_O x_D) )
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .. import importance, norm_input
from ..sliced import base_layer, base_weight, linear_cols, linear_rows, linear_rows_fused, project_base
from ..sliced_backward import cols_output, gated_weight_grad_output, rows_forward, weight_grad_forward
from ..token_rows import gated_output, rows_values, split_rows, supports_rows
from .base import SATBlockMixin, assemble_rows

RowsRun = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (flat rows, dense, context) -> output


@dataclass(frozen=True)
class ChannelSelection:
    kept: torch.Tensor  # (k,) sorted kept channels; no path reads the omitted ones (their complement would sync a GPU)


class SATMLPMixin(SATBlockMixin):
    """MLP with separate gate / up / down projections."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sat_is_sparse():
            return super().forward(x)
        with norm_input.recomputable(x, self.sat_state):  # x = norm(h): saved as h (`peft_sat.norm_input`)
            return self._sat_forward(x)

    def _sat_forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.sat_dense_rows(x)  # (n,) dense token positions, or None: every token is a sparse token
        forward_only = self.sat_state.context_forward_only
        if rows is None or (not self.sat_omits_units and not forward_only):
            return (
                self._sat_sparse_tokens(x, self.sat_state.token_mask) if self.sat_omits_units else super().forward(x)
            )
        # A split batch: the dense tokens run the whole block, the others as `context_tokens` says.
        flat = x.reshape(-1, x.shape[-1])
        context = self.sat_context_rows(rows, flat.shape[0])  # positions outside the dense rows (padding included)
        if forward_only:  # nothing needs their gradient: the attention blocks cut it
            return self._sat_dense_rows_forward(x, rows, context).view_as(x)
        dense_y = super().forward(flat.index_select(0, rows))
        token_mask = self.sat_state.token_mask
        context_mask = token_mask.reshape(-1).index_select(0, context) if token_mask is not None else None
        context_y = self._sat_sparse_tokens(flat.index_select(0, context), context_mask)
        return assemble_rows(flat.shape[0], rows, dense_y, context, context_y).view_as(x)

    def _sat_dense_rows_forward(self, x: torch.Tensor, rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """The whole block on the rows of x (..., H) a split step computes (``_sat_on_live_rows``), flat (N, H),
        differentiable at the dense ``rows`` only: each projection runs once over those rows (the dense values, bit
        for bit), and the rows' graph is built on tensors of their n rows (the input's: ``norm_input.rows_input``)::

            value  = down(act(gate x) * up x)                          every row, no graph
            graph  : down's backward through h_D = act(gate_D) * up_D,  gate_D / up_D = rows D of the values above
                     (h_D recomputed in backward: ``token_rows.gated_output``)
        """
        projections = (self.gate_proj, self.up_proj, self.down_proj)
        if not all(supports_rows(p) for p in projections):  # e.g. 4-bit bases: a split (dense rows, then the rest)
            return self._sat_split_live_rows(x, rows, context, super().forward)
        x_rows = norm_input.rows_input(x, rows, self.sat_state)

        def run(flat: torch.Tensor, dense: torch.Tensor, _context: torch.Tensor) -> torch.Tensor:
            (gate, gate_rows), (up, up_rows) = rows_values((self.gate_proj, self.up_proj), flat, x_rows, dense)
            with torch.no_grad():
                hidden = self._sat_hidden(gate, up)
            return gated_output(self.down_proj, hidden, gate_rows, up_rows, dense, self._sat_hidden)

        return self._sat_on_live_rows(x, rows, context, run)

    def _sat_split_live_rows(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        context: torch.Tensor,
        forward: Callable[[torch.Tensor], torch.Tensor],
    ) -> torch.Tensor:
        """The module's own ``forward`` on the live rows of x as a split: the dense ``rows`` with a graph, the rest
        without (``token_rows.split_rows``)."""
        return self._sat_on_live_rows(
            x, rows, context, lambda flat, dense, rest: split_rows(forward, flat, dense, rest)
        )

    def _sat_on_live_rows(
        self, x: torch.Tensor, rows: torch.Tensor, context: torch.Tensor, run: RowsRun
    ) -> torch.Tensor:
        """``run(flat, dense, context)``, the block's output at the rows of ``flat``, on the rows of the block input x
        (..., H) a split step computes: every row of the flat x (N, H), or, where rows trail their sequence's last
        dense position (``SATState.live_rows``), the live ones (m, H) with ``dense`` and ``context`` indices into
        them, the (m, H) result put back as (N, H) with zeros at the trailing rows.

        Only the MLP skips them: its products are three quarters of a layer's, the attention's projections would
        pay a gather and a write-back per projection for a quarter, and its kernel needs every row of a sequence."""
        flat = x.reshape(-1, x.shape[-1])
        live = self.sat_state.live_rows(x.shape[:-1])
        if live is None:
            return run(flat, rows, context)
        return live.place(run(live.gather(flat), live.dense, live.context))

    def _sat_sparse_tokens(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """The sub-network step of ``sparse_pass`` on the tokens of ``x`` (``token_mask``: their real tokens)."""
        sparse_pass = self.sat_state.config.sparse_pass
        if sparse_pass == "backward":
            return self._sat_backward_only(x, token_mask)
        if sparse_pass == "weight_grad":
            return self._sat_weight_grad_only(x, token_mask)
        sel: ChannelSelection = self._sat_select(x, token_mask=token_mask)
        return self._sat_channels(x, sel.kept)

    def _sat_channels(self, x: torch.Tensor, channels: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
        """down(act(gate(x)) * up(x)) restricted to ``channels``: (..., H) -> (..., H)."""
        gate, up = self._sat_gate_up(x, channels)  # (..., k) each
        return linear_cols(self.down_proj, self._sat_activation(gate) * up, channels, add_bias=add_bias)

    def _sat_backward_only(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """``sparse_pass="backward"``: the module's own forward, op for op, and a backward through the kept channels,
        chosen from that forward's activations (exact scores, no sampling)."""
        gate, up, kept_gate_up = self._sat_gate_up_forward(x)  # (..., I) dense values, no graph
        with torch.no_grad():
            hidden = self._sat_hidden(gate, up)
        sel = self._sat_select(x, lambda: importance.activation_scores(hidden, token_mask), token_mask=token_mask)
        kept_gate, kept_up = kept_gate_up(sel.kept, gate, up)  # (..., k): the values, with the kept graph
        # gate_K and up_K saved, h_K recomputed in backward: two (..., k) tensors fewer kept than its graph's
        return cols_output(self.down_proj, hidden, kept_gate, sel.kept, kept_up, self._sat_hidden)

    def _sat_weight_grad_only(self, x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
        """``sparse_pass="weight_grad"``: the module's own forward and every input gradient; the base weights of the
        kept channels only get a gradient (chosen from the forward's activations, exact scores)."""
        gate, up, graph_gate_up = self._sat_gate_up_weight_grad(x)  # (..., I) dense values, no graph
        with torch.no_grad():
            hidden = self._sat_hidden(gate, up)
        sel = self._sat_select(x, lambda: importance.activation_scores(hidden, token_mask), token_mask=token_mask)
        gate_graph, up_graph = graph_gate_up(sel.kept)  # the same values, now with their graph
        return gated_weight_grad_output(self.down_proj, hidden, gate_graph, up_graph, sel.kept, self._sat_hidden)

    def _sat_hidden(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return self._sat_activation(gate) * up  # the module's own order: bit for bit its forward

    def _sat_gate_up_forward(self, x: torch.Tensor):
        """Dense gate and up values (no graph), and ``kept(index, gate, up)`` giving their kept channels' graph."""
        gate, kept_gate = rows_forward(self.gate_proj, x)
        up, kept_up = rows_forward(self.up_proj, x)
        return gate, up, lambda index, g, u: (kept_gate(index, g), kept_up(index, u))

    def _sat_gate_up_weight_grad(self, x: torch.Tensor):
        """Dense gate and up values (no graph), and ``graph(index)``: the same values with every input gradient and
        the weight gradients of the channels ``index``."""
        gate, gate_graph = weight_grad_forward(self.gate_proj, x, by_rows=True)
        up, up_graph = weight_grad_forward(self.up_proj, x, by_rows=True)
        return gate, up, lambda index: (gate_graph(index), up_graph(index))

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

    def _sat_selection(self, kept: torch.Tensor) -> ChannelSelection:
        return ChannelSelection(kept=kept)


class SATFusedMLPMixin(SATMLPMixin):
    """Phi3 MLP: ``gate, up = gate_up_proj(x).chunk(2)``; ``down_proj(up * act(gate))``."""

    @classmethod
    def sat_num_channels(cls, module) -> int:
        return base_layer(module.gate_up_proj).out_features // 2

    def _sat_dense_rows_forward(self, x: torch.Tensor, rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        forward = super(SATMLPMixin, self).forward  # Phi3MLP's own forward
        return self._sat_split_live_rows(x, rows, context, forward)

    @property
    def _sat_activation(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.activation_fn

    def _sat_gate_up(self, x: torch.Tensor, kept: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.cat([kept, kept + self.sat_num_units])  # gate rows, then the same channels' up rows
        return linear_rows(self.gate_up_proj, x, rows).chunk(2, dim=-1)

    def _sat_hidden(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return up * self._sat_activation(gate)  # Phi3MLP's own order

    def _sat_gate_up_forward(self, x: torch.Tensor):
        fused, kept_fused = rows_forward(self.gate_up_proj, x)  # (..., 2I): gate channels, then up channels
        gate, up = fused.chunk(2, dim=-1)
        channels = self.sat_num_units

        def kept(index: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return kept_fused(torch.cat([index, index + channels]), fused).chunk(2, dim=-1)

        return gate, up, kept

    def _sat_gate_up_weight_grad(self, x: torch.Tensor):
        fused, fused_graph = weight_grad_forward(self.gate_up_proj, x, by_rows=True)
        gate, up = fused.chunk(2, dim=-1)
        channels = self.sat_num_units
        return gate, up, lambda index: fused_graph(torch.cat([index, index + channels])).chunk(2, dim=-1)

    def _sat_score_views(self) -> dict[str, Callable]:
        channels = self.sat_num_units
        return dict(
            w_gate=lambda: base_weight(self.gate_up_proj)[:channels],
            w_up=lambda: base_weight(self.gate_up_proj)[channels:],
            project_gate=lambda s: project_base(self.gate_up_proj, s)[:, :channels],
            project_up=lambda s: project_base(self.gate_up_proj, s)[:, channels:],
        )
