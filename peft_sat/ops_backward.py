"""Autograd kernels of ``SATConfig.sparse_pass="backward"`` (a dense forward, a backward through the kept units
only): pure tensor code, no model imports.

The dense forward already computed the values (every unit's output); these build only the gradient graph of the
kept units, on tensors of the kept width (nothing full-size but the weight gradients). With W (out, in), b (out,) or
None and ``index`` (k,) int64 distinct units:

    rows_from_value(x, W, b, index, y)                returns y[..., index]   backward of x W[index]^T + b[index]
    lora_rows_from_value(x, W, b, Ax, B, index, y, s) returns y[..., index]   ... + s (Ax) B[index]^T (A's graph in Ax)
    cols_to_value(h_K, W, b, index, y)                returns y               backward of h_K W[:, index]^T + b
    lora_cols_to_value(h_K, W, b, A, B, index, y, s)  returns y               ... + s (h_K A[:, index]^T) B^T

Given ``kept_up`` and ``gated`` (an MLP's down projection), the ``cols`` kernels take gate_K in place of h_K and
recompute h_K = gated(gate_K, up_K) in backward: they save gate_K and up_K, two (..., k) tensors fewer than the
gating's graph and h_K.

and for ``sparse_pass="weight_grad"`` (the forward and every input gradient dense, the weight gradients of the
kept units only):

    weight_grad_from_value(x, W, b, index, y, by_rows)  returns y   dL/dx = g W;  dL/dW zero outside rows / columns

Weight gradients are full-size and zero outside the kept rows / columns, laid out as in ``peft_sat.ops``; the kept
weight is re-gathered in backward, never saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .norm_input import load_input, save_input
from .ops import (
    Gated,
    _gather_cols,
    _padded_product,
    _product,
    _scaled,
    _scatter_cols,
    _source_map,
    _stack_rows,
    recompute_gated,
    select_last,
)


class _RowsFromValue(torch.autograd.Function):
    """``value[..., index]`` (the kept outputs of a dense product already computed) with the gradient of
    ``x W[index]^T + b[index]``: dL/dx = g W[index]; dL/dW, dL/db zero outside rows ``index``."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, value):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.out_features = weight.shape[0]
        ctx.save_for_backward(save_input(ctx, x) if need_w else None, weight if need_x else None, index)
        return select_last(value, index)

    @staticmethod
    def backward(ctx, grad_kept):
        x, weight, index = ctx.saved_tensors
        x = load_input(ctx, x)
        grad_x, grad_w, grad_b = _rows_backward(grad_kept, x, weight, index, ctx, *ctx.needs_input_grad[:3])
        return grad_x, grad_w, grad_b, None, None


def rows_from_value(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """``value[..., index]`` (k,) of ``value = F.linear(x, W, b)`` computed beforehand, with the gradient of the kept
    rows: (..., out) -> (..., k). Saves ``x`` (for dL/dW) and nothing of the kept width."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return select_last(value, index)
    return _RowsFromValue.apply(x, weight, bias, index, value)


class _LoraRowsFromValue(torch.autograd.Function):
    """``value[..., index]`` with the gradient of rows ``index`` of a LoRA layer ``x W^T + b + s (x A^T) B^T``, its
    rank-r activations ``low_rank`` = x A^T (A's graph) computed beforehand: the base's rows as in
    ``_RowsFromValue``, and dL/d low_rank = (s g) B[index], dL/dB zero outside rows ``index``. The adapter's kept
    rows need no forward product: their value is already in ``value``."""

    @staticmethod
    def forward(ctx, x, weight, bias, low_rank, lora_b, index, value, scale):
        need_x, need_w, _, need_low_rank, need_lora_b = ctx.needs_input_grad[:5]
        ctx.scale = scale
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.out_features = weight.shape[0]
        ctx.save_for_backward(
            save_input(ctx, x) if need_w else None,
            weight if need_x else None,
            low_rank if need_lora_b else None,
            lora_b if need_low_rank else None,
            index,
        )
        return select_last(value, index)

    @staticmethod
    def backward(ctx, grad_kept):
        x, weight, low_rank, lora_b, index = ctx.saved_tensors
        x = load_input(ctx, x)
        need_x, need_w, need_b, need_low_rank, need_lora_b = ctx.needs_input_grad[:5]
        grad_x, grad_w, grad_b = _rows_backward(grad_kept, x, weight, index, ctx, need_x, need_w, need_b)
        grad_low_rank = grad_lora_b = None
        scaled = _scaled(grad_kept, ctx.scale)  # the order of the chain ``gather_linear(low_rank, B) * s``
        if need_low_rank:
            grad_low_rank = scaled.matmul(lora_b.index_select(0, index))  # (..., k) @ (k, r)
        if need_lora_b:
            kept_grad = scaled.reshape(-1, index.numel()).t().matmul(low_rank.reshape(-1, low_rank.shape[-1]))
            grad_lora_b = kept_grad.new_zeros(ctx.out_features, kept_grad.shape[1]).index_copy_(0, index, kept_grad)
        return grad_x, grad_w, grad_b, grad_low_rank, grad_lora_b, None, None, None


def _rows_backward(grad_kept, x, weight, index, ctx, need_x: bool, need_w: bool, need_b: bool):
    """dL/dx, dL/dW, dL/db of ``x W[index]^T + b[index]`` from the kept rows' gradient (..., k); the weight and
    bias gradients full-size, zero outside rows ``index``."""
    x_dtype, w_dtype, b_dtype = ctx.dtypes
    grad_2d = grad_kept.reshape(-1, index.numel())  # (N, k)
    grad_x = grad_w = grad_b = None
    if need_x:
        kept_weight = _stack_rows((weight,), (index,), transient_out=True)  # (k, in)
        grad_x = grad_kept.matmul(kept_weight.to(grad_kept.dtype)).to(x_dtype)
        del kept_weight  # the transient buffer is reused below
    if need_w or need_b:
        source = _source_map(index, ctx.out_features, 0, index.numel())
    if need_w:
        x_2d = x.reshape(-1, x.shape[-1]).to(grad_2d.dtype)
        grad_w = _padded_product(grad_2d, x_2d, w_dtype).index_select(0, source)
    if need_b:
        grad_b = F.pad(grad_2d.sum(0), (0, 1)).index_select(0, source).to(b_dtype)
    return grad_x, grad_w, grad_b


def lora_rows_from_value(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    low_rank: torch.Tensor,
    lora_b: torch.Tensor,
    index: torch.Tensor,
    value: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``value[..., index]`` (k,) of a LoRA layer's output ``value`` computed beforehand, with the gradient of its
    rows ``index`` (base and adapter; ``low_rank`` = the adapter's A x with A's graph, B without bias): (..., out) ->
    (..., k). Saves ``x`` for a trained base weight, W for dL/dx, ``low_rank`` for dL/dB and B for A's gradient."""
    tensors = (x, weight, bias, low_rank, lora_b)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return select_last(value, index)
    return _LoraRowsFromValue.apply(x, weight, bias, low_rank, lora_b, index, value, scale)


class _ColsToValue(torch.autograd.Function):
    """``value`` (the output of a dense product already computed) with the gradient of ``h_K W[:, index]^T + b``:
    dL/dh_K = g W[:, index]; dL/dW zero outside columns ``index``; the bias gets its whole gradient. With ``gated``,
    the first input is gate_K and h_K = gated(gate_K, up_K) is recomputed in backward (``_kept_input``)."""

    @staticmethod
    def forward(ctx, kept_h, weight, bias, index, value, kept_up, gated):
        need_w = ctx.needs_input_grad[1]
        need_h = ctx.needs_input_grad[0] or ctx.needs_input_grad[5]
        ctx.dtypes = (kept_h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.in_features = weight.shape[1]
        ctx.gated = gated
        saves_kept = need_w or (gated is not None and need_h)
        ctx.save_for_backward(kept_h if saves_kept else None, kept_up, weight if need_h else None, index)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad_out):
        first, kept_up, weight, index = ctx.saved_tensors
        need_first, need_w, need_b, _, _, need_up = ctx.needs_input_grad[:6]
        kept_h, grads_of_inputs = _kept_input(ctx, first, kept_up, need_first, need_up)
        need_h = need_first or need_up
        grad_h, grad_w, grad_b = _cols_backward(grad_out, kept_h, weight, index, ctx, need_h, need_w, need_b)
        grad_first, grad_up = grads_of_inputs(grad_h)
        return grad_first, grad_w, grad_b, None, None, grad_up, None


def _kept_input(ctx, first, kept_up, need_first: bool, need_up: bool) -> tuple:
    """``(h, grads)`` for a columns backward: h as saved (``first``), dL/dh its own gradient; or, with ``ctx.gated``,
    h = gated(gate, up) (gate = ``first``) recomputed from the two saved tensors, which replace what the forward's
    graph would keep (gate, act(gate), up, h), and dL/dh taken through the gating to (dL/dgate, dL/dup)
    (``ops.recompute_gated``)."""
    if ctx.gated is None or first is None:  # None: nothing of h is needed (only the bias takes a gradient)
        return first, lambda grad_h: (grad_h, None)
    return recompute_gated(ctx.gated, first, kept_up, need_first, need_up)


def cols_to_value(
    kept_h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    value: torch.Tensor,
    kept_up: torch.Tensor | None = None,
    gated: Gated | None = None,
) -> torch.Tensor:
    """``value`` (= ``F.linear(h, W, b)`` computed beforehand on the whole input ``h``) with the gradient of the kept
    columns only: ``kept_h`` (..., k) is ``h[..., index]`` with its graph. Saves ``kept_h``. With ``gated``, h_K is
    ``gated(kept_h, kept_up)`` (``kept_h`` then holds gate_K): saves gate_K and up_K, recomputes h_K in backward."""
    tensors = (kept_h, weight, bias, kept_up)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return value
    return _ColsToValue.apply(kept_h, weight, bias, index, value, kept_up, gated)


class _LoraColsToValue(torch.autograd.Function):
    """``value`` (a LoRA layer's output ``h W^T + b + s (h A^T) B^T``, computed beforehand) with the gradient of the
    kept columns ``index`` only, through ``kept_h`` = h[..., index]: the base's as in ``_ColsToValue``, and the
    adapter's ``s (h_K A[:, index]^T) B^T`` (dL/dA zero outside columns ``index``). The adapter's product needs no
    forward: its value is already in ``value``; backward recomputes the rank-r h_K A[:, index]^T. ``gated`` as in
    ``_ColsToValue``."""

    @staticmethod
    def forward(ctx, kept_h, weight, bias, lora_a, lora_b, index, value, scale, kept_up, gated):
        ctx.scale, ctx.gated = scale, gated
        ctx.dtypes = (kept_h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.in_features = weight.shape[1]
        ctx.save_for_backward(kept_h, kept_up, weight, lora_a, lora_b, index)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad_out):
        first, kept_up, weight, lora_a, lora_b, index = ctx.saved_tensors
        need_first, need_w, need_b, need_a, need_lora_b = ctx.needs_input_grad[:5]
        need_up = ctx.needs_input_grad[8]
        need_h = need_first or need_up
        kept_h, grads_of_inputs = _kept_input(ctx, first, kept_up, need_first, need_up)
        grad_h, grad_w, grad_b = _cols_backward(grad_out, kept_h, weight, index, ctx, need_h, need_w, need_b)
        grad_a = grad_lora_b = None
        if need_h or need_a or need_lora_b:  # the chain's order: F.linear(h_K A_K^T, B) * s
            kept_a = lora_a.index_select(1, index)  # (r, k)
            scaled = _scaled(grad_out, ctx.scale)
            grad_low_rank = scaled.matmul(lora_b)  # (..., r)
            if need_lora_b:
                low_rank = F.linear(kept_h, kept_a)
                grad_lora_b = scaled.reshape(-1, scaled.shape[-1]).t().matmul(low_rank.reshape(-1, kept_a.shape[0]))
            if need_a:
                grad_2d = grad_low_rank.reshape(-1, kept_a.shape[0])
                kept_2d = kept_h.reshape(-1, index.numel())
                grad_a = _scatter_cols(grad_2d.t().matmul(kept_2d), index, ctx.in_features, lora_a.dtype)
            if need_h:
                from_adapter = grad_low_rank.matmul(kept_a)
                grad_h = from_adapter if grad_h is None else grad_h + from_adapter
        grad_first, grad_up = grads_of_inputs(grad_h)
        return grad_first, grad_w, grad_b, grad_a, grad_lora_b, None, None, None, grad_up, None


def _cols_backward(grad_out, kept_h, weight, index, ctx, need_h: bool, need_w: bool, need_b: bool):
    """dL/dh_K, dL/dW, dL/db of ``h_K W[:, index]^T + b``; the weight gradient full-size, zero outside columns
    ``index``."""
    h_dtype, w_dtype, b_dtype = ctx.dtypes
    grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
    grad_h = grad_w = grad_b = None
    if need_h:
        kept_weight = _gather_cols(weight, index, transient_out=True)  # (out, k)
        grad_h = grad_out.matmul(kept_weight.to(grad_out.dtype)).to(h_dtype)  # (..., k)
        del kept_weight  # the transient buffer is reused below
    if need_w:
        kept_2d = kept_h.reshape(-1, index.numel()).to(grad_2d.dtype)  # (N, k)
        grad_w = _scatter_cols(_product(grad_2d, kept_2d), index, ctx.in_features, w_dtype)
    if need_b:
        grad_b = grad_2d.sum(0).to(b_dtype)
    return grad_h, grad_w, grad_b


def lora_cols_to_value(
    kept_h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    index: torch.Tensor,
    value: torch.Tensor,
    scale: float,
    kept_up: torch.Tensor | None = None,
    gated: Gated | None = None,
) -> torch.Tensor:
    """``value`` (a LoRA layer's output on the whole input h, computed beforehand; B without bias) with the gradient
    of the kept columns only, base and adapter, through ``kept_h`` = h[..., index]. Saves ``kept_h``, W, A and B;
    ``kept_up`` and ``gated`` as in ``cols_to_value``."""
    tensors = (kept_h, weight, bias, lora_a, lora_b, kept_up)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return value
    return _LoraColsToValue.apply(kept_h, weight, bias, lora_a, lora_b, index, value, scale, kept_up, gated)


class _WeightGradRows(torch.autograd.Function):
    """``value`` (a dense product computed beforehand) with every unit's input gradient and the weight gradient of
    rows ``index`` only: dL/dx = g W (all rows); dL/dW, dL/db zero outside rows ``index``."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, value):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.out_features = weight.shape[0]
        ctx.save_for_backward(save_input(ctx, x) if need_w else None, weight if need_x else None, index)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, index = ctx.saved_tensors
        x = load_input(ctx, x)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = grad_out.matmul(weight.to(grad_out.dtype)).to(x_dtype)  # every unit's input gradient
        if need_w or need_b:
            kept_grad = select_last(grad_out, index).reshape(-1, index.numel())  # (N, k)
            source = _source_map(index, ctx.out_features, 0, index.numel())
        if need_w:
            x_2d = x.reshape(-1, x.shape[-1]).to(kept_grad.dtype)
            grad_w = _padded_product(kept_grad, x_2d, w_dtype).index_select(0, source)
        if need_b:
            grad_b = F.pad(kept_grad.sum(0), (0, 1)).index_select(0, source).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None


class _WeightGradCols(torch.autograd.Function):
    """``value`` (a dense product of the input ``h`` computed beforehand) with every unit's input gradient and the
    weight gradient of columns ``index`` only: dL/dh = g W; dL/dW zero outside columns ``index``. Saves the kept
    columns ``h[..., index]`` only (what the kept weight gradient reads). With ``gated``, the first input is gate
    and h = gated(gate, up) is recomputed in backward from gate and up (saved instead of act(gate) and h_K)."""

    @staticmethod
    def forward(ctx, h, weight, bias, index, value, up, gated):
        need_w = ctx.needs_input_grad[1]
        need_h = ctx.needs_input_grad[0] or ctx.needs_input_grad[5]
        ctx.dtypes = (h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.in_features = weight.shape[1]
        ctx.gated = gated
        if gated is None:
            saved = select_last(h, index) if need_w else None
        else:
            saved = h if need_w or need_h else None
        ctx.save_for_backward(saved, up, weight if need_h else None, index)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad_out):
        first, up, weight, index = ctx.saved_tensors
        need_first, need_w, need_b, _, _, need_up = ctx.needs_input_grad[:6]
        h_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_h = grad_w = grad_b = None
        kept_h, grads_of_inputs = _kept_input(ctx, first, up, need_first, need_up)
        if ctx.gated is not None and need_w:
            kept_h = select_last(kept_h, index)  # the recomputed h is every column's
        if need_first or need_up:
            grad_h = grad_out.matmul(weight.to(grad_out.dtype)).to(h_dtype)
        if need_w:
            kept_2d = kept_h.reshape(-1, index.numel()).to(grad_2d.dtype)  # (N, k)
            grad_w = _scatter_cols(_product(grad_2d, kept_2d), index, ctx.in_features, w_dtype)
        if need_b:
            grad_b = grad_2d.sum(0).to(b_dtype)
        grad_first, grad_up = grads_of_inputs(grad_h)
        return grad_first, grad_w, grad_b, None, None, grad_up, None


def weight_grad_from_value(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: torch.Tensor,
    value: torch.Tensor,
    by_rows: bool,
    up: torch.Tensor | None = None,
    gated: Gated | None = None,
) -> torch.Tensor:
    """``value`` (= ``F.linear(x, W, b)`` computed beforehand) with the input gradient of every unit and the weight
    gradient of the units ``index`` only (rows: output units; columns: input units). Columns only: with ``gated``,
    the input is ``gated(x, up)`` (``x`` then holds an MLP's gate), recomputed in backward from ``x`` and ``up``."""
    if gated is not None and by_rows:
        raise ValueError("weight_grad_from_value: a gated input applies to columns (by_rows=False) only")
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias, up)):
        return value
    if by_rows:
        return _WeightGradRows.apply(x, weight, bias, index, value)
    return _WeightGradCols.apply(x, weight, bias, index, value, up, gated)
