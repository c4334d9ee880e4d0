"""Autograd kernels of ``SATConfig.sparse_pass="backward"``: the dense forward, a backward through the kept units
only (pure tensor code, no model imports).

With W (out, in), b (out,) or None and ``index`` (k,) int64 distinct units:

    dense_linear_kept_grad(x, W, b, index, by_rows)   forward  y = x W^T + b           (the dense product, bit for bit)
                                                      backward through W[index] / W[:, index] only
    lora_cols_kept_grad(h, A, B, b_B, index)          forward  y = (h A^T) B^T + b_B   (a LoRA branch, bit for bit)
                                                      backward as if h were zero outside ``index``

and, when the dense forward already computed the values (every unit's output), only the gradient graph of the
kept units, on tensors of the kept width (nothing full-size but the weight gradients):

    rows_from_value(x, W, b, index, y)                returns y[..., index]   backward of x W[index]^T + b[index]
    cols_to_value(h_K, W, b, index, y)                returns y               backward of h_K W[:, index]^T + b

Weight gradients are full-size and zero outside the kept rows / columns, laid out as in ``peft_sat.ops``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import _gather_cols, _padded_product, _product, _scatter_cols, _source_map, _stack_rows


class _DenseLinearKeptGrad(torch.autograd.Function):
    """``F.linear(x, W, b)`` whose backward treats every unit outside ``index`` as absent; see the module docstring.

    Rows (output units): the incoming gradient is read at ``index`` only, dL/dx = g[..., index] W[index] and dL/dW,
    dL/db are zero outside rows ``index``. Columns (input units): dL/dx is zero outside ``index`` and dL/dW is zero
    outside columns ``index``; the bias is no unit and gets its whole gradient. Saved for backward: ``x`` for rows
    (it is alive anyway: the other projections of the block read it), the kept columns ``x[..., index]`` for
    columns, never a gathered weight (backward re-gathers it).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, index, by_rows):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.by_rows = by_rows
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.in_shape = x.shape
        ctx.weight_shape = weight.shape
        kept_x = None
        if need_w:
            kept_x = x if by_rows else x.index_select(-1, index)
        ctx.save_for_backward(kept_x, weight if need_x else None, index)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        kept_x, weight, index = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        out_features, in_features = ctx.weight_shape
        grad_x = grad_w = grad_b = None
        if ctx.by_rows:
            kept_grad = grad_out.index_select(-1, index)  # (..., k)
            grad_2d = kept_grad.reshape(-1, index.numel())  # (N, k)
            if need_x:
                kept_weight = _stack_rows((weight,), (index,), transient_out=True)  # (k, in)
                grad_x = kept_grad.matmul(kept_weight.to(kept_grad.dtype)).to(x_dtype)
                del kept_weight  # the transient buffer is reused below
            if need_w or need_b:
                source = _source_map(index, out_features, 0, index.numel())
            if need_w:
                x_2d = kept_x.reshape(-1, in_features).to(grad_2d.dtype)
                grad_w = _padded_product(grad_2d, x_2d, w_dtype).index_select(0, source)  # (out, in)
            if need_b:
                grad_b = F.pad(grad_2d.sum(0), (0, 1)).index_select(0, source).to(b_dtype)
            return grad_x, grad_w, grad_b, None, None
        grad_2d = grad_out.reshape(-1, out_features)  # (N, out)
        if need_x:
            kept = grad_out.matmul(_gather_cols(weight, index, transient_out=True).to(grad_out.dtype))  # (..., k)
            grad_x = kept.new_zeros(ctx.in_shape, dtype=x_dtype).index_copy_(-1, index, kept.to(x_dtype))
        if need_w:
            x_2d = kept_x.reshape(-1, index.numel()).to(grad_2d.dtype)  # (N, k)
            grad_w = _scatter_cols(_product(grad_2d, x_2d), index, in_features, w_dtype)
        if need_b:
            grad_b = grad_2d.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None, None


def dense_linear_kept_grad(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, by_rows: bool
) -> torch.Tensor:
    """The dense ``F.linear(x, W, b)`` whose backward runs through the units ``index`` only.

    Args:
        x: (..., in).
        weight: (out, in), trainable or frozen.
        bias: (out,) or None.
        index: (k,) int64 distinct kept rows (``by_rows``: output units) or columns (input units) of ``weight``.
        by_rows: whether ``index`` names output rows or input columns.

    Returns:
        (..., out), equal bit for bit to ``F.linear(x, weight, bias)``.

    Example:
        >>> w = torch.ones(2, 2, requires_grad=True)
        >>> dense_linear_kept_grad(torch.ones(1, 2), w, None, torch.tensor([1]), by_rows=True).sum().backward()
        >>> w.grad
        tensor([[0., 0.],
                [1., 1.]])
    """
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x, weight, bias)
    return _DenseLinearKeptGrad.apply(x, weight, bias, index, by_rows)


class _LoraColsKeptGrad(torch.autograd.Function):
    """``F.linear(F.linear(h, A), B, b_B)`` (a LoRA branch on a column-sliced projection) whose backward sees only
    the columns ``index`` of ``h``: dL/dB = g^T (h_K A_K^T), dL/dA = zero outside columns K, dL/dh = zero outside K,
    with h_K = h[..., index] and A_K = A[:, index] (the gradient of ``F.linear(h_K, A_K)`` fed to B)."""

    @staticmethod
    def forward(ctx, h, weight_a, weight_b, bias_b, index):
        ctx.dtypes = (h.dtype, weight_a.dtype, weight_b.dtype, None if bias_b is None else bias_b.dtype)
        ctx.in_shape = h.shape
        kept_h = h.index_select(-1, index)  # (..., k)
        ctx.save_for_backward(kept_h, weight_a, weight_b, index)
        return F.linear(F.linear(h, weight_a), weight_b, bias_b)

    @staticmethod
    def backward(ctx, grad_out):
        kept_h, weight_a, weight_b, index = ctx.saved_tensors
        need_h, need_a, need_b, need_bias = ctx.needs_input_grad[:4]
        h_dtype, a_dtype, b_dtype, bias_dtype = ctx.dtypes
        kept_a = weight_a.index_select(1, index)  # (r, k)
        low_rank = F.linear(kept_h.to(kept_a.dtype), kept_a)  # (..., r): what B saw from the kept columns
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        grad_low = grad_out.matmul(weight_b.to(grad_out.dtype))  # (..., r)
        grad_h = grad_a = grad_b = grad_bias = None
        if need_h:
            kept = grad_low.matmul(kept_a.to(grad_low.dtype))  # (..., k)
            grad_h = kept.new_zeros(ctx.in_shape, dtype=h_dtype).index_copy_(-1, index, kept.to(h_dtype))
        if need_a:
            kept_grad = (
                grad_low.reshape(-1, grad_low.shape[-1]).t().mm(kept_h.reshape(-1, index.numel()).to(grad_low.dtype))
            )  # (r, k)
            grad_a = kept_grad.new_zeros(weight_a.shape, dtype=a_dtype).index_copy_(1, index, kept_grad.to(a_dtype))
        if need_b:
            grad_b = grad_2d.t().mm(low_rank.reshape(-1, low_rank.shape[-1]).to(grad_2d.dtype)).to(b_dtype)
        if need_bias:
            grad_bias = grad_2d.sum(0).to(bias_dtype)
        return grad_h, grad_a, grad_b, grad_bias, None


def lora_cols_kept_grad(
    h: torch.Tensor,
    weight_a: torch.Tensor,
    weight_b: torch.Tensor,
    bias_b: torch.Tensor | None,
    index: torch.Tensor,
) -> torch.Tensor:
    """A LoRA branch ``B (A h) + b_B`` on the dense input ``h``, whose backward sees only the columns ``index``.

    Args:
        h: (..., in) the (dropped-out) input of the projection.
        weight_a: (r, in) LoRA A (no bias). weight_b: (out, r) LoRA B. bias_b: (out,) or None.
        index: (k,) int64 distinct kept input columns.

    Returns:
        (..., out), equal bit for bit to ``lora_B(lora_A(h))``.
    """
    if not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in (h, weight_a, weight_b, bias_b)
    ):
        return F.linear(F.linear(h, weight_a), weight_b, bias_b)
    return _LoraColsKeptGrad.apply(h, weight_a, weight_b, bias_b, index)


class _RowsFromValue(torch.autograd.Function):
    """``value[..., index]`` (the kept outputs of a dense product already computed) with the gradient of
    ``x W[index]^T + b[index]``: dL/dx = g W[index]; dL/dW, dL/db zero outside rows ``index``."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, value):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.out_features = weight.shape[0]
        ctx.save_for_backward(x if need_w else None, weight if need_x else None, index)
        return value.index_select(-1, index)

    @staticmethod
    def backward(ctx, grad_kept):
        x, weight, index = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
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
        return grad_x, grad_w, grad_b, None, None


def rows_from_value(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """``value[..., index]`` (k,) of ``value = F.linear(x, W, b)`` computed beforehand, with the gradient of the kept
    rows: (..., out) -> (..., k). Saves ``x`` (for dL/dW) and nothing of the kept width."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return value.index_select(-1, index)
    return _RowsFromValue.apply(x, weight, bias, index, value)


class _ColsToValue(torch.autograd.Function):
    """``value`` (the output of a dense product already computed) with the gradient of ``h_K W[:, index]^T + b``:
    dL/dh_K = g W[:, index]; dL/dW zero outside columns ``index``; the bias gets its whole gradient."""

    @staticmethod
    def forward(ctx, kept_h, weight, bias, index, value):
        need_h, need_w = ctx.needs_input_grad[:2]
        ctx.dtypes = (kept_h.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.in_features = weight.shape[1]
        ctx.save_for_backward(kept_h if need_w else None, weight if need_h else None, index)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad_out):
        kept_h, weight, index = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
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
        return grad_h, grad_w, grad_b, None, None


def cols_to_value(
    kept_h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """``value`` (= ``F.linear(h, W, b)`` computed beforehand on the whole input ``h``) with the gradient of the kept
    columns only: ``kept_h`` (..., k) is ``h[..., index]`` with its graph. Saves ``kept_h``."""
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (kept_h, weight, bias)):
        return value
    return _ColsToValue.apply(kept_h, weight, bias, index, value)
