"""SAT blocks: the model's own MLP / attention instances, re-classed in place to a subclass with a sliced forward.

Why re-classing and not a wrapper: PEFT skips every module nested under a tuner-layer wrapper, so LoRA applied
after SAT would find no targets, and LoRA applied before it would get ``.base_layer.`` in its checkpoint keys
(STACK_NOTES). Changing ``__class__`` keeps module paths, state-dict keys, ``isinstance`` checks and LoRA
injection untouched, in either order. ``SATLlamaMLP`` is ``(SATMLPMixin, LlamaMLP)``: eval mode, rate 0 or a
disabled SAT call the original ``forward`` unchanged.

Per training forward a block (1) scores its units on the micro-batch (``peft_sat.importance``), (2) keeps
``num_kept`` of them (``peft_sat.selection``), (3) runs the sliced projections (``peft_sat.sliced``). The selection
is cached per model forward so that a gradient-checkpointing re-run computes exactly the same sub-network.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import importance
from .selection import num_kept, select_units
from .sliced import base_layer, base_weight, linear_cols, linear_rows, project_base
from .state import SATState, sum_across_ranks

SUPPORTED_FAMILIES = ("Llama", "Mistral", "Qwen2", "Qwen3")
SUPPORTED_MLP = tuple(f"{family}MLP" for family in SUPPORTED_FAMILIES)
SUPPORTED_ATTENTION = tuple(f"{family}Attention" for family in SUPPORTED_FAMILIES)


class SATBlockMixin:
    """Shared selection logic: when to go sparse, scoring, caching. Subclasses define the units."""

    sat_state: SATState
    sat_block_id: int
    sat_num_units: int
    sat_last_kept: torch.Tensor | None  # kept units of the latest sparse forward (for tests and statistics)

    def _sat_init(self, state: SATState, block_id: int) -> None:
        self.sat_state = state
        self.sat_block_id = block_id
        self.sat_last_kept = None
        self._sat_cache: tuple[int, float, Any] | None = None

    def sat_is_sparse(self) -> bool:
        """True when this forward computes on a sub-network: training mode, SAT enabled, rate > 0."""
        state = self.sat_state
        return self.training and state.enabled and state.omission_rate > 0.0

    def _sat_select(self, x: torch.Tensor) -> Any:
        state = self.sat_state
        key = (state.forward_count, state.omission_rate)
        if self._sat_cache is not None and self._sat_cache[:2] == key:
            return self._sat_cache[2]  # a gradient-checkpointing re-run: same units as the first pass
        config = state.config
        with torch.no_grad():
            generator = state.generator(x.device, self.sat_block_id)
            x_valid = importance.valid_tokens(x.detach(), state.token_mask)
            x_sample = importance.sample_tokens(x_valid, config.score_tokens, generator)
            scores = self._sat_scores(config.importance, x_valid, x_sample, generator)
            if config.distributed_selection == "shared":
                scores = sum_across_ranks(scores)  # every rank keeps the same units
            kept = select_units(scores, num_kept(scores.shape[0], state.omission_rate), config.selection, generator)
        selection = self._sat_selection(kept)
        self._sat_cache = (*key, selection)
        return selection

    def _sat_scores(self, metric: str, x: torch.Tensor, x_sample: torch.Tensor, generator: torch.Generator):
        raise NotImplementedError

    def _sat_selection(self, kept: torch.Tensor) -> Any:
        raise NotImplementedError


class SATMLPMixin(SATBlockMixin):
    """Gated MLP ``down(act(gate(x)) * up(x))`` on kept intermediate channels: rows of gate/up, columns of down."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.sat_is_sparse():
            return super().forward(x)
        kept = self._sat_select(x)  # (k,) channel indices
        hidden = self.act_fn(linear_rows(self.gate_proj, x, kept)) * linear_rows(self.up_proj, x, kept)  # (B, T, k)
        return linear_cols(self.down_proj, hidden, kept)  # (B, T, H)

    def _sat_scores(self, metric, x, x_sample, generator):
        return importance.channel_scores(
            metric,
            x=x,
            x_sample=x_sample,
            w_gate=lambda: base_weight(self.gate_proj),
            w_up=lambda: base_weight(self.up_proj),
            w_down=lambda: base_weight(self.down_proj),
            project_gate=lambda s: project_base(self.gate_proj, s),
            project_up=lambda s: project_base(self.up_proj, s),
            act_fn=self.act_fn,
            num_channels=self.sat_num_units,
            generator=generator,
        )

    def _sat_selection(self, kept):
        self.sat_last_kept = kept
        return kept


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


class SATAttentionMixin(SATBlockMixin):
    """Self-attention on kept heads: rows of q/k/v, columns of o. Llama layout, with the optional per-head q/k
    norms of Qwen3 and the sliding windows of Mistral / Qwen2."""

    _sat_eager_attention: Any  # the model file's own eager kernel (e.g. softcapping variants)
    _sat_apply_rotary: Any

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        if not self.sat_is_sparse():
            return super().forward(
                hidden_states,
                position_embeddings=position_embeddings,
                attention_mask=attention_mask,
                cache=cache,
                **kwargs,
            )
        # The KV cache is not updated: sliced keys of a sub-network must never serve generation, and training
        # forwards do not read a cache.
        kwargs.pop("past_key_values", None)
        sel: HeadSelection = self._sat_select(hidden_states)
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)

        query = linear_rows(self.q_proj, hidden_states, sel.q_rows).view(hidden_shape)  # (B, T, kq, d)
        key = linear_rows(self.k_proj, hidden_states, sel.kv_rows).view(hidden_shape)  # (B, T, kkv, d)
        value = linear_rows(self.v_proj, hidden_states, sel.kv_rows).view(hidden_shape)
        if hasattr(self, "q_norm"):  # Qwen3: RMSNorm over head_dim, per head, so slicing heads is exact
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, heads, T, d)

        cos, sin = position_embeddings
        query, key = self._sat_apply_rotary(query, key, cos, sin)

        module: Any = self
        if sel.kv_for_q is not None:
            key, value = key[:, sel.kv_for_q], value[:, sel.kv_for_q]  # (B, kq, T, d): one KV per query head
            module = _GroupsOverride(self)

        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._sat_eager_attention)
        sliding_window = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
        attn_output, attn_weights = attention(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            sliding_window=sliding_window,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()  # (B, T, kq * d)
        return linear_cols(self.o_proj, attn_output, sel.q_rows), attn_weights

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
            w_q=lambda: base_weight(self.q_proj),
            w_o=lambda: base_weight(self.o_proj),
            project_q=lambda s: project_base(self.q_proj, s),
            project_v=lambda s: project_base(self.v_proj, s),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            generator=generator,
        )
        return scores if self.sat_head_granularity == "q_head" else importance.group_scores(scores, num_kv_heads)

    def _sat_selection(self, kept: torch.Tensor) -> HeadSelection:
        _, _, head_dim = self._sat_shape
        groups = self.num_key_value_groups
        offsets = torch.arange(head_dim, device=kept.device)
        if self.sat_head_granularity == "kv_group":
            kv_heads = kept
            q_heads = (kv_heads[:, None] * groups + torch.arange(groups, device=kept.device)).reshape(-1)
            kv_for_q = None
        else:
            q_heads = kept
            kv_heads, kv_for_q = torch.unique(q_heads // groups, sorted=True, return_inverse=True)
        self.sat_last_kept = q_heads
        return HeadSelection(
            q_heads=q_heads,
            q_rows=(q_heads[:, None] * head_dim + offsets).reshape(-1),
            kv_rows=(kv_heads[:, None] * head_dim + offsets).reshape(-1),
            kv_for_q=kv_for_q,
        )


# ---- re-classing ---------------------------------------------------------------------------------------------

_SAT_CLASSES: dict[type, type] = {}


def block_kind(module: nn.Module) -> str | None:
    """ "mlp" / "attention" for a supported block (or one already converted), else None."""
    cls = getattr(type(module), "_sat_original_class", type(module))
    if cls.__name__ in SUPPORTED_MLP:
        return "mlp"
    if cls.__name__ in SUPPORTED_ATTENTION:
        return "attention"
    return None


def unsupported_block_error(module: nn.Module, name: str) -> TypeError:
    return TypeError(
        f"peft_sat cannot sparsify `{name}` of type {type(module).__name__}. Supported blocks: "
        f"{', '.join(SUPPORTED_MLP + SUPPORTED_ATTENTION)} (model families: {', '.join(SUPPORTED_FAMILIES)})."
    )


def sat_class(original: type) -> type:
    """The cached subclass ``SAT<Original>`` of a supported block class."""
    if original not in _SAT_CLASSES:
        kind = "mlp" if original.__name__ in SUPPORTED_MLP else "attention"
        namespace: dict[str, Any] = {"_sat_original_class": original, "__module__": __name__}
        if kind == "attention":
            source = sys.modules[original.__module__]
            namespace["_sat_eager_attention"] = staticmethod(source.eager_attention_forward)
            namespace["_sat_apply_rotary"] = staticmethod(source.apply_rotary_pos_emb)
        mixin = SATMLPMixin if kind == "mlp" else SATAttentionMixin
        cls = type(f"SAT{original.__name__}", (mixin, original), namespace)
        globals()[cls.__name__] = cls  # importable by name, so pickling a converted model works
        _SAT_CLASSES[original] = cls
    return _SAT_CLASSES[original]


def convert_block(module: nn.Module, state: SATState, block_id: int, head_granularity: str) -> None:
    """Turn a supported block into its SAT subclass in place (idempotent: re-binds state of a converted one)."""
    original = getattr(type(module), "_sat_original_class", type(module))
    module.__class__ = sat_class(original)
    module._sat_init(state, block_id)
    if block_kind(module) == "mlp":
        module.sat_num_units = base_layer(module.gate_proj).out_features  # intermediate channels
    else:
        module.sat_head_granularity = head_granularity
        num_heads, num_kv_heads, _ = module._sat_shape
        module.sat_num_units = num_heads if head_granularity == "q_head" else num_kv_heads


def restore_block(module: nn.Module) -> None:
    """Undo ``convert_block``: the original class, no SAT attributes."""
    original = getattr(type(module), "_sat_original_class", None)
    if original is None:
        return
    module.__class__ = original
    for name in ("sat_state", "sat_block_id", "sat_last_kept", "_sat_cache", "sat_num_units", "sat_head_granularity"):
        module.__dict__.pop(name, None)
