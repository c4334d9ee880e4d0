"""The dense forward with a sliced backward (``SATConfig.sparse_pass="backward"``): projections whose output is
``module(x)`` bit for bit, and whose backward runs through the kept units only.

For a projection ``y = x W^T + b`` with W (out, in) and kept units K::

    linear_rows_kept_grad(module, x, K)   y = module(x)     dL/dx = g[..., K] W[K];   dL/dW, dL/db zero outside rows K
    linear_cols_kept_grad(module, h, K)   y = module(h)     dL/dh zero outside columns K;  dL/dW zero outside columns K

where g = dL/dy. In a SAT block the gradient reaching the omitted rows of q / k / v / gate / up is already zero (the
output projection passes none to omitted units), so reading ``g[..., K]`` only is exact and skips their products.
Dispatch mirrors ``peft_sat.sliced``: ``nn.Linear``, PEFT LoRA layers (each step of their forward reproduced in
PEFT's order, so the values match the layer's own forward), bitsandbytes ``Linear4bit``. Anything else runs its own
forward with the gradient masked around it (exact, not faster), with a one-time warning.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from .ops import dense_linear_kept_grad, lora_cols_kept_grad
from .sliced import _is_bnb_4bit, _is_lora, _is_plain_linear

_warned: set[str] = set()


def linear_rows_kept_grad(module: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``module(x)`` (..., in) -> (..., out), with a backward through the output ``rows`` only."""
    return _dispatch(module, x, rows, by_rows=True)


def linear_cols_kept_grad(module: nn.Module, h: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``module(h)`` (..., in) -> (..., out), with a backward through the input ``cols`` only."""
    return _dispatch(module, h, cols, by_rows=False)


def _dispatch(module: nn.Module, x: torch.Tensor, index: torch.Tensor, by_rows: bool) -> torch.Tensor:
    if _is_plain_linear(module):
        return dense_linear_kept_grad(x, module.weight, module.bias, index, by_rows)
    if _is_lora(module):
        return _lora(module, x, index, by_rows)
    if _is_bnb_4bit(module):
        from .bnb import linear4bit_kept_grad

        return linear4bit_kept_grad(module, x, index, by_rows)
    return _masked_fallback(module, x, index, by_rows, reason=f"{type(module).__name__} has no kernel")


def _lora(module: nn.Module, x: torch.Tensor, index: torch.Tensor, by_rows: bool) -> torch.Tensor:
    """PEFT's ``lora.Linear.forward`` / ``lora.bnb.Linear4bit.forward``, step by step, with kept-unit backward."""
    if module.disable_adapters and module.merged:
        module.unmerge()
    active = [a for a in module.active_adapters if a in module.lora_A.keys()]
    if module.disable_adapters or module.merged or not active:
        return _dispatch(module.base_layer, x, index, by_rows)
    variants = [a for a in active if a in getattr(module, "lora_variant", {})]
    if variants or any(module.lora_A[a].bias is not None for a in active):
        return _masked_fallback(module, x, index, by_rows, reason=f"LoRA adapters {active} of a variant or with bias")
    four_bit = _is_bnb_4bit(module.base_layer)
    result = _dispatch(module.base_layer, x, index, by_rows)
    result_dtype = result.dtype
    if four_bit:
        result = result.clone()  # as PEFT does for 4-bit bases
    for adapter in active:
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        dropout, scaling = module.lora_dropout[adapter], module.scaling[adapter]
        convert = not four_bit or not torch.is_autocast_enabled()
        x_cast = module._cast_input_dtype(x, lora_a.weight.dtype) if convert else x
        if by_rows:
            # B's rows follow the output units; A sees the whole input.
            delta = dense_linear_kept_grad(lora_a(dropout(x_cast)), lora_b.weight, lora_b.bias, index, by_rows=True)
        else:
            delta = lora_cols_kept_grad(dropout(x_cast), lora_a.weight, lora_b.weight, lora_b.bias, index)
        delta = delta * scaling
        if four_bit:
            result = result + (delta.to(result_dtype) if convert else delta)
        else:
            result = result + delta
    return result if four_bit else result.to(result_dtype)


class _MaskGradient(torch.autograd.Function):
    """Identity in forward; backward keeps the gradient on ``index`` of the last dimension only."""

    @staticmethod
    def forward(ctx, x, index):
        ctx.save_for_backward(index)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (index,) = ctx.saved_tensors
        return torch.zeros_like(grad).index_copy_(-1, index, grad.index_select(-1, index)), None


def _masked_fallback(module: nn.Module, x: torch.Tensor, index: torch.Tensor, by_rows: bool, reason: str):
    """Exact, without the saving: rows mask the output's gradient; columns split the input into the kept columns
    (with gradient) and the rest (without), ``y = m(h_K) + stopgrad(m(h) - m(h_K))``."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(
            f"peft_sat: {reason} for a dense forward with a sliced backward; this projection runs its own dense "
            "passes with the gradient masked around it (exact, no speed-up).",
            stacklevel=3,
        )
    if by_rows:
        return _MaskGradient.apply(module(x), index)
    mask = torch.zeros(x.shape[-1], dtype=x.dtype, device=x.device).index_fill_(0, index, 1)
    kept = module(x * mask)
    with torch.no_grad():
        rest = module(x) - kept
    return kept + rest
