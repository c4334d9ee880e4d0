"""Sliced linear algebra: a projection restricted to kept output rows or kept input columns.

For a projection ``y = x W^T + b`` with W (out, in):

    linear_rows(module, x, rows):  y[..., rows]           = x W[rows]^T + b[rows]             (..., in) -> (..., k)
    linear_cols(module, h, cols):  y with h on cols only  = h W[:, cols]^T + b                (..., k)  -> (..., out)

computed as smaller dense matmuls (the saved FLOPs are real: no dense product is masked afterwards). Supported
``module`` types, dispatched at call time so that the projection found *now* is used (LoRA may be injected after
SAT):

- ``nn.Linear`` (with or without bias);
- PEFT LoRA layers (``lora.Linear``, ``lora.bnb.Linear4bit``): ``+ s * B[rows] A drop(x)`` for rows and
  ``+ s * B A[:, cols] drop(h)`` for columns, summed over active adapters, skipped when merged or disabled;
- bitsandbytes ``Linear4bit`` (see ``peft_sat.bnb``, imported lazily).

Anything else (DoRA and other LoRA variants, unknown layers) runs the dense projection and slices / scatters around
it, with a one-time warning: exact, but without the speed-up.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import norm_input
from .ops import _scaled, gather_linear, gather_linear_rows
from .scatter import place

_warned: set[str] = set()


def linear_rows(module: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Kept output rows of ``module(x)``: (..., in) -> (..., len(rows))."""
    return _dispatch(module, x, rows, by_rows=True)


def linear_cols(module: nn.Module, h: torch.Tensor, cols: torch.Tensor, add_bias: bool = True) -> torch.Tensor:
    """``module`` applied to an input that is non-zero on ``cols`` only: (..., len(cols)) -> (..., out).

    ``add_bias`` False leaves out every bias (base and LoRA): for a second group of columns whose output is added to
    a first group's, which already carries the bias.
    """
    return _dispatch(module, h, cols, by_rows=False, add_bias=add_bias)


def linear_rows_fused(modules: Sequence[nn.Module], x: torch.Tensor, indices: Sequence[torch.Tensor]) -> list:
    """``[linear_rows(m, x, rows) for m, rows in zip(modules, indices)]`` with the base projections of all modules
    as ONE matmul when they are plain ``nn.Linear`` layers (bare, or the base of a LoRA layer) of one dtype and
    device: q / k / v and gate / up read the same input. LoRA deltas are added per module as in ``linear_rows``.

    One (..., in) x (in, k_1 + k_2 + k_3) product instead of three, and in backward one input-gradient product
    instead of three plus two sums (``peft_sat.ops.gather_linear_rows``). Returns views of one tensor for bare
    ``nn.Linear`` modules.
    """
    bases = [_fusable_base(module) for module in modules]
    if len(modules) < 2 or any(base is None for base in bases) or not _same_layout(bases):
        return [linear_rows(module, x, rows) for module, rows in zip(modules, indices)]
    stacked = gather_linear_rows(x, [b.weight for b in bases], [b.bias for b in bases], indices)  # (..., sum k)
    parts = stacked.split([rows.numel() for rows in indices], dim=-1)
    return [
        part if module is base else _lora(module, x, rows, by_rows=True, base_result=part)
        for module, base, part, rows in zip(modules, bases, parts, indices)
    ]


def _is_plain_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear or isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def _fusable_base(module: nn.Module) -> nn.Linear | None:
    """The plain ``nn.Linear`` whose sliced product ``linear_rows`` starts from, or None (4-bit, DoRA, unknown)."""
    if _is_plain_linear(module):
        return module
    if not _is_lora(module) or not _is_plain_linear(module.base_layer):
        return None
    if module.disable_adapters and module.merged:  # `_lora` unmerges first: the base weight is about to change
        return None
    active = [a for a in module.active_adapters if a in module.lora_A.keys()]
    if any(a in getattr(module, "lora_variant", {}) for a in active):
        return None
    return module.base_layer


def _same_layout(layers: Sequence[nn.Linear]) -> bool:
    first = layers[0].weight
    return all(
        layer.weight.dtype == first.dtype
        and layer.weight.device == first.device
        and layer.weight.shape[1] == first.shape[1]
        and (layer.bias is None or layer.bias.dtype == first.dtype)
        for layer in layers
    )


def _dispatch(
    module: nn.Module, x: torch.Tensor, index: torch.Tensor, by_rows: bool, add_bias: bool = True
) -> torch.Tensor:
    if _is_plain_linear(module):
        return gather_linear(x, module.weight, module.bias if add_bias else None, index, by_rows)
    if _is_lora(module):
        return _lora(module, x, index, by_rows, add_bias=add_bias)
    if _is_bnb_4bit(module):
        from .bnb import linear4bit_sliced

        return linear4bit_sliced(module, x, index, by_rows, add_bias=add_bias)
    return _dense_fallback(
        module, x, index, by_rows, reason=f"{type(module).__name__} has no sliced kernel", add_bias=add_bias
    )


def _is_lora(module: nn.Module) -> bool:
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "scaling")


def _is_bnb_4bit(module: nn.Module) -> bool:
    """bitsandbytes ``Linear4bit`` or a subclass (``LinearNF4``, ``LinearFP4``), without importing bitsandbytes."""
    return any(c.__name__ == "Linear4bit" and c.__module__.startswith("bitsandbytes") for c in type(module).__mro__)


def _lora(
    module: nn.Module,
    x: torch.Tensor,
    index: torch.Tensor,
    by_rows: bool,
    base_result: torch.Tensor | None = None,
    add_bias: bool = True,
) -> torch.Tensor:
    """Mirror of ``peft.tuners.lora.layer.Linear.forward`` on a slice; ``base_result``: the base layer's sliced
    output when already computed (``linear_rows_fused``)."""
    if module.disable_adapters and module.merged:
        module.unmerge()
    active = [a for a in module.active_adapters if a in module.lora_A.keys()]
    if module.disable_adapters or module.merged or not active:
        return base_result if base_result is not None else _dispatch(module.base_layer, x, index, by_rows, add_bias)
    variants = [a for a in active if a in getattr(module, "lora_variant", {})]
    if variants:
        reason = f"LoRA variant (e.g. DoRA) on adapters {variants}"
        return _dense_fallback(module, x, index, by_rows, reason=reason, add_bias=add_bias)

    result = base_result if base_result is not None else _dispatch(module.base_layer, x, index, by_rows, add_bias)
    result_dtype = result.dtype
    for adapter in active:
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        dropout, scaling = module.lora_dropout[adapter], module.scaling[adapter]
        x_cast = module._cast_input_dtype(x, lora_a.weight.dtype)
        # The scaling multiplies the rank-r intermediate (..., r) rather than the (..., k) / (..., out) delta:
        # the same product, without a full-width multiply in forward and again in backward. A LoRA bias
        # (lora_bias=True) is scaled too in PEFT, so with one the scaling stays outside.
        b_bias = lora_b.bias if add_bias else None
        inner_scale, outer_scale = (scaling, 1.0) if b_bias is None else (1.0, scaling)
        if by_rows:
            # y[..., rows] += s * B[rows] A drop(x): A sees the full input, B only its kept rows.
            low_rank = _scaled(norm_input.linear(lora_a, dropout(x_cast)), inner_scale)  # (..., r)
            delta = gather_linear(low_rank, lora_b.weight, lora_b.bias, index, by_rows=True)  # (..., k)
        else:
            # y += s * B A[:, cols] drop(h): the input exists on the kept columns only.
            low_rank = gather_linear(dropout(x_cast), lora_a.weight, lora_a.bias, index, by_rows=False)  # (..., r)
            delta = F.linear(_scaled(low_rank, inner_scale), lora_b.weight, b_bias)  # (..., out)
        result = result + _scaled(delta, outer_scale)
    return result.to(result_dtype)


def _dense_fallback(
    module: nn.Module, x: torch.Tensor, index: torch.Tensor, by_rows: bool, reason: str, add_bias: bool = True
):
    """Exact but unaccelerated: dense projection, then slice its output (rows) or scatter its input (cols)."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"peft_sat: {reason}; this projection runs dense inside the sparse block (exact, no speed-up).",
            stacklevel=3,
        )
    if by_rows:
        return module(x).index_select(-1, index)
    full = x.new_zeros(*x.shape[:-1], _in_features(module))
    result = module(place([(index, x)], full.shape[-1], dim=-1))
    return result if add_bias else result - module(full)  # module(0): the biases alone


def _in_features(module: nn.Module) -> int:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    return base.in_features


# ---- read-only views of the base projection, used for importance scores ----------------------------------------


def base_layer(module: nn.Module) -> nn.Module:
    """The innermost base layer (``nn.Linear`` or ``Linear4bit``) under any LoRA wrapping."""
    while hasattr(module, "base_layer"):
        module = module.base_layer
    return module


def base_weight(module: nn.Module) -> torch.Tensor:
    """The base weight (out, in) as a dense tensor, detached; 4-bit weights are dequantized (a transient copy)."""
    layer = base_layer(module)
    if _is_bnb_4bit(layer):
        from .bnb import dequantize_weight

        return dequantize_weight(layer)
    return layer.weight.detach()


def project_base(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x W^T`` with the base weight (no bias, no adapters, no dropout), without autograd: for scoring only."""
    layer = base_layer(module)
    with torch.no_grad():
        # 4-bit: dequantize instead of calling the layer, whose no-grad CPU path may repack the weight in place
        # (see `peft_sat.bnb.disable_cpu_inference_repack`).
        weight = base_weight(layer)
        return F.linear(x.to(weight.dtype), weight)
