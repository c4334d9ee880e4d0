"""The dense forward with a sliced backward (``SATConfig.sparse_pass="backward"``): projections whose value is
``module(x)`` bit for bit, and whose backward runs through the kept units only.

The units are chosen after the projections ran (the MLP picks them from its own dense activations, exact ``maxip``
scores of every token), so each projection first computes its dense value without a graph, and only the kept units'
gradient graph is built afterwards, on tensors of the kept width. For a projection ``y = x W^T + b`` with W
(out, in) and kept units K::

    value, kept_rows = rows_forward(module, x)      value = module(x); kept_rows(K, total) = total[..., K] whose
                                                    backward is that of the rows K (``total``: the value, or a sum
                                                    the value is part of, e.g. a LoRA layer's output)
    cols_output(module, h, h_K, K)                  module(h), whose backward runs through h_K = h[..., K] and W[:, K]
    cols_output(module, h, g_K, K, u_K, gated)      the same for h = gated(g, u), h_K recomputed in backward

``SATConfig.sparse_pass="weight_grad"`` keeps every input gradient and slices only the base weight's gradient::

    value, graph = weight_grad_forward(module, x, by_rows)   graph(K) = value, dL/dx dense, dL/dW zero outside K
    gated_weight_grad_output(module, h, g, u, K, gated)     the same for a down projection on h = gated(g, u)

In a SAT block the gradient reaching the omitted rows of q / k / v / gate / up is zero (the output projection
passes none to omitted units), so building the kept rows' graph only is exact, and backward saves and computes
nothing of the omitted units. Dispatch mirrors ``peft_sat.sliced``: ``nn.Linear``, PEFT LoRA layers (each step of
their forward reproduced in PEFT's order, so the values match the layer's own forward), bitsandbytes ``Linear4bit``.
Anything else runs its own forward and takes the kept units' gradient from its dense graph (exact, not faster), with
a one-time warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import norm_input
from .ops import Gated, gather_linear
from .ops_backward import (
    cols_to_value,
    lora_cols_to_value,
    lora_rows_from_value,
    rows_from_value,
    weight_grad_from_value,
)
from .scatter import place
from .sliced import _is_bnb_4bit, _is_lora, _is_plain_linear

KeptRows = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (index, total value) -> (..., k) with gradient

_warned: set[str] = set()


def rows_forward(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, KeptRows]:
    """``(module(x), kept_rows)``: the dense value (no graph) and a function building the kept rows' gradient graph.

    ``kept_rows(index, total)`` returns ``total[..., index]`` with the gradient of rows ``index`` of ``module``;
    ``total`` is the value itself, or an output it is part of (a LoRA layer passes its sum to its base layer).
    """
    if _is_plain_linear(module):
        with torch.no_grad():
            value = F.linear(x, module.weight, module.bias)
        return value, lambda index, total: rows_from_value(x, module.weight, module.bias, index, total)
    if _is_lora(module) and _plain_lora(module) is not None:
        return _lora_rows_forward(module, x)
    if _is_bnb_4bit(module):
        from .bnb import linear4bit_rows_from_value

        with torch.no_grad():
            value = module(x)
        return value, lambda index, total: linear4bit_rows_from_value(module, x, index, total)
    _warn_fallback(f"{type(module).__name__} has no kernel")
    output = module(x)  # the dense graph; the kept rows take their gradient from it
    value = output.detach()

    def kept_rows(index: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        part = output.index_select(-1, index)
        return total.index_select(-1, index) + (part - part.detach())

    return value, kept_rows


def cols_output(
    module: nn.Module,
    h: torch.Tensor,
    kept_h: torch.Tensor,
    index: torch.Tensor,
    kept_up: torch.Tensor | None = None,
    gated: Gated | None = None,
) -> torch.Tensor:
    """``module(h)`` (the dense value, from ``h`` without graph) whose backward runs through ``kept_h`` =
    ``h[..., index]`` (with its graph) and the columns ``index`` only. With ``gated`` (an MLP's down projection,
    h = gated(gate, up)), ``kept_h`` is gate_K and h_K = ``gated(kept_h, kept_up)``: a plain layer and one plain LoRA
    adapter save gate_K and up_K and recompute h_K in backward; other modules get h_K with its graph."""
    if _is_plain_linear(module):
        with torch.no_grad():
            value = F.linear(h, module.weight, module.bias)
        return cols_to_value(kept_h, module.weight, module.bias, index, value, kept_up, gated)
    if _is_lora(module) and _plain_lora(module) is not None:
        return _lora_cols_output(module, h, kept_h, index, kept_up, gated)
    if gated is not None:
        kept_h = gated(kept_h, kept_up)
    if _is_bnb_4bit(module):
        from .bnb import linear4bit_cols_to_value

        with torch.no_grad():
            value = module(h)
        return linear4bit_cols_to_value(module, kept_h, index, value)
    _warn_fallback(f"{type(module).__name__} has no kernel")
    with torch.no_grad():
        value = module(h)
    scattered = place([(index, kept_h)], h.shape[-1], dim=-1)
    part = module(scattered)  # the gradient of the kept columns; omitted columns see zeros
    return value + (part - part.detach())


def _plain_lora(module: nn.Module) -> list[str] | None:
    """The active adapters of a LoRA layer whose forward ``rows_forward`` / ``cols_output`` reproduce (plain LoRA
    without bias on A), or None (variants such as DoRA)."""
    if module.disable_adapters and module.merged:
        module.unmerge()
    active = [a for a in module.active_adapters if a in module.lora_A.keys()]
    if module.disable_adapters or module.merged:
        active = []
    if any(a in getattr(module, "lora_variant", {}) for a in active) or any(
        module.lora_A[a].bias is not None for a in active
    ):
        return None
    return active


def _zero_valued(part: torch.Tensor) -> torch.Tensor:
    """0 in value, ``part``'s gradient in backward: adds a cheap branch's graph to a value computed elsewhere."""
    return part - part.detach()


def _lora_rows_forward(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, KeptRows]:
    """PEFT's LoRA forward, step by step (bit for bit the layer's value), keeping the rank-r activations A x."""
    four_bit = _is_bnb_4bit(module.base_layer)
    value, base_rows = rows_forward(module.base_layer, x)
    result_dtype = value.dtype
    if four_bit:
        value = value.clone()  # as PEFT does for 4-bit bases
    branches = []
    for adapter in _plain_lora(module):
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        scaling = module.scaling[adapter]
        convert = not four_bit or not torch.is_autocast_enabled()
        x_cast = module._cast_input_dtype(x, lora_a.weight.dtype) if convert else x
        low_rank = norm_input.linear(lora_a, module.lora_dropout[adapter](x_cast))  # (..., r), A trains
        with torch.no_grad():
            delta = lora_b(low_rank) * scaling
            value = value + (delta.to(result_dtype) if four_bit and convert else delta)
        branches.append((low_rank, lora_b, scaling))
    if not four_bit:
        value = value.to(result_dtype)

    base = module.base_layer
    fused = (  # one node for base and adapter (PEFT's defaults): no (..., k) product of the adapter in forward
        len(branches) == 1
        and _is_plain_linear(base)
        and branches[0][1].bias is None
        and len({x.dtype, base.weight.dtype, branches[0][0].dtype, branches[0][1].weight.dtype, result_dtype}) == 1
    )

    def kept_rows(index: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
        if fused:
            low_rank, lora_b, scaling = branches[0]
            return lora_rows_from_value(x, base.weight, base.bias, low_rank, lora_b.weight, index, total, scaling)
        kept = base_rows(index, total)
        for low_rank, lora_b, scaling in branches:
            part = gather_linear(low_rank, lora_b.weight, lora_b.bias, index, by_rows=True) * scaling
            kept = kept + _zero_valued(part)
        return kept

    return value, kept_rows


def _lora_cols_output(
    module: nn.Module,
    h: torch.Tensor,
    kept_h: torch.Tensor,
    index: torch.Tensor,
    kept_up: torch.Tensor | None = None,
    gated: Gated | None = None,
) -> torch.Tensor:
    """PEFT's LoRA forward on ``h`` (bit for bit), with the gradient of the kept columns: A's columns ``index`` see
    ``kept_h``; one dropout mask serves the value and the gradient. ``kept_up``, ``gated`` as in ``cols_output``."""
    four_bit = _is_bnb_4bit(module.base_layer)
    with torch.no_grad():
        value = module.base_layer(h) if four_bit else F.linear(h, module.base_layer.weight, module.base_layer.bias)
    if (fused := _single_plain_adapter(module, h, value)) is not None:  # one node, no product of the adapter
        lora_a, lora_b, scaling = fused
        with torch.no_grad():
            total = value + lora_b(lora_a(h)) * scaling  # PEFT's order: bit for bit its value
        base = module.base_layer
        return lora_cols_to_value(
            kept_h, base.weight, base.bias, lora_a.weight, lora_b.weight, index, total, scaling, kept_up, gated
        )
    if gated is not None:
        kept_h = gated(kept_h, kept_up)
    output = _base_cols_to_value(module.base_layer, kept_h, index, value)
    result_dtype = value.dtype
    if four_bit:
        output = output.clone()
    for adapter in _plain_lora(module):
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        dropout, scaling = module.lora_dropout[adapter], module.scaling[adapter]
        convert = not four_bit or not torch.is_autocast_enabled()
        h_cast = module._cast_input_dtype(h, lora_a.weight.dtype) if convert else h
        kept_cast = module._cast_input_dtype(kept_h, lora_a.weight.dtype) if convert else kept_h
        if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
            mask = dropout(torch.ones_like(h_cast))  # 0 or 1 / (1 - p)
            h_cast, kept_cast = h_cast * mask, kept_cast * mask.index_select(-1, index)
        with torch.no_grad():
            delta = lora_b(lora_a(h_cast)) * scaling
        part = F.linear(
            gather_linear(kept_cast, lora_a.weight, None, index, by_rows=False), lora_b.weight, lora_b.bias
        )
        delta = delta + _zero_valued(part * scaling)
        output = output + (delta.to(result_dtype) if four_bit and convert else delta)
    return output if four_bit else output.to(result_dtype)


def _single_plain_adapter(module: nn.Module, h: torch.Tensor, value: torch.Tensor) -> tuple | None:
    """(A, B, scaling) of a LoRA layer that one node serves (PEFT's defaults: one adapter over a plain base, no
    bias on B, no active dropout, one dtype), or None."""
    adapters = _plain_lora(module) or []  # None: a variant (DoRA, ...)
    if len(adapters) != 1 or not _is_plain_linear(module.base_layer):
        return None
    lora_a, lora_b = module.lora_A[adapters[0]], module.lora_B[adapters[0]]
    dropout = module.lora_dropout[adapters[0]]
    if lora_b.bias is not None or (isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0):
        return None
    if len({h.dtype, value.dtype, module.base_layer.weight.dtype, lora_a.weight.dtype, lora_b.weight.dtype}) != 1:
        return None
    return lora_a, lora_b, module.scaling[adapters[0]]


def _base_cols_to_value(
    base: nn.Module, kept_h: torch.Tensor, index: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    if _is_bnb_4bit(base):
        from .bnb import linear4bit_cols_to_value

        return linear4bit_cols_to_value(base, kept_h, index, value)
    return cols_to_value(kept_h, base.weight, base.bias, index, value)


def _warn_fallback(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"peft_sat: {reason} for a dense forward with a sliced backward; this projection runs its own dense "
            "passes with the gradient masked around it (exact, no speed-up).",
            stacklevel=3,
        )


# ---- sparse_pass="weight_grad": every input gradient, the kept units' weight gradients --------------------------

WeightGradGraph = Callable[[torch.Tensor], torch.Tensor]  # kept units -> the value with its gradient graph


def weight_grad_forward(module: nn.Module, x: torch.Tensor, by_rows: bool) -> tuple[torch.Tensor, WeightGradGraph]:
    """``(module(x), graph)``: the dense value (no graph), and ``graph(index)`` returning the same value whose
    backward computes every input gradient but the base weight's gradient of the units ``index`` only (output rows
    when ``by_rows``, input columns otherwise). LoRA factors and 4-bit bases (frozen) keep their whole gradient:
    their products are small or absent, there is nothing to save."""
    if _is_plain_linear(module):
        with torch.no_grad():
            value = F.linear(x, module.weight, module.bias)
        return value, lambda index: weight_grad_from_value(x, module.weight, module.bias, index, value, by_rows)
    if _is_lora(module) and _plain_lora(module) is not None and _is_plain_linear(module.base_layer):
        base_value, base_graph = weight_grad_forward(module.base_layer, x, by_rows)
        value, deltas = base_value, []
        for adapter in _plain_lora(module):
            lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
            x_cast = module._cast_input_dtype(x, lora_a.weight.dtype)
            low_rank = norm_input.linear(lora_a, module.lora_dropout[adapter](x_cast))  # one dropout draw
            # the adapters train whole whatever the units: their delta's graph needs no index, so it runs once
            delta = lora_b(low_rank) * module.scaling[adapter]
            value = value + delta.detach()
            deltas.append(delta)
        value = value.to(base_value.dtype)

        def graph(index: torch.Tensor) -> torch.Tensor:
            output = base_graph(index)
            for delta in deltas:
                output = output + delta  # the value's own sums, in the same order: the same numbers
            return output.to(base_value.dtype)

        return value, graph
    output = module(x)  # frozen 4-bit bases, variants, unknown layers: their own forward and backward
    return output.detach(), lambda index: output


def gated_weight_grad_output(
    module: nn.Module,
    hidden: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    index: torch.Tensor,
    gated: Gated,
) -> torch.Tensor:
    """``weight_grad_forward(module, gated(gate, up), by_rows=False)[1](index)`` for an MLP's down projection, from
    ``hidden`` (that input's value, no graph) and ``gate``, ``up`` with their graphs: a plain layer saves gate and
    up and recomputes h = gated(gate, up) in backward, so the forward runs the gating once (for ``hidden``) and
    keeps neither act(gate) nor h's kept columns; other modules build h's graph here."""
    if _is_plain_linear(module):
        with torch.no_grad():
            value = F.linear(hidden, module.weight, module.bias)
        return weight_grad_from_value(gate, module.weight, module.bias, index, value, False, up, gated)
    return weight_grad_forward(module, gated(gate, up), by_rows=False)[1](index)
