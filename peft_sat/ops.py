"""Autograd kernels for gathered-weight matmuls (pure tensor code, no model imports).

With W (out, in), b (out,) or None and ``index`` (k,) int64:

    gather_linear(x, W, b, index, by_rows=True)    (..., in) -> (..., k)    y = x W[index]^T + b[index]
    gather_linear(x, W, b, index, by_rows=False)   (..., k)  -> (..., out)  y = x W[:, index]^T + b
    gather_linear_rows(x, [W_1, W_2], [b_1, b_2], [i_1, i_2])
                                                   (..., in) -> (..., k_1 + k_2)
                                                   y = x [W_1[i_1]; W_2[i_2]]^T + [b_1[i_1]; b_2[i_2]]

For ``SATConfig.sparse_pass="backward"`` (the dense forward, the backward through kept units only):

    dense_linear_kept_grad(x, W, b, index, by_rows)   forward  y = x W^T + b           (the dense product, bit for bit)
                                                      backward through W[index] / W[:, index] only
    lora_cols_kept_grad(h, A, B, b_B, index)          forward  y = (h A^T) B^T + b_B   (a LoRA branch, bit for bit)
                                                      backward as if h were zero outside ``index``

and, when the dense forward already computed the values (every unit's output), only the gradient graph of the
kept units, on tensors of the kept width (nothing full-size but the weight gradients):

    rows_from_value(x, W, b, index, y)                returns y[..., index]   backward of x W[index]^T + b[index]
    cols_to_value(h_K, W, b, index, y)                returns y               backward of h_K W[:, index]^T + b

``gather_linear_rows`` serves several projections of the same input (q / k / v, gate / up) with ONE matmul in
forward and one per gradient in backward, and no sum of per-projection input gradients.

Gradients are those of the gathered formula: dL/dx is exact; dL/dW and dL/db are full-size (W's and b's shapes)
and exactly zero outside the gathered rows / columns, returned through autograd (so ``AccumulateGrad``, gradient
accumulation over micro-batches and DDP / FSDP hooks behave as for any parameter). A frozen W or b
(``requires_grad=False``) gets no gradient and costs nothing in backward.

Why custom ``autograd.Function``s instead of ``F.linear(x, W.index_select(0, index))`` (the same numbers):

- backward writes each full-size row-sliced weight gradient once: the kept rows go into a buffer with one extra
  zero row, and one ``index_select`` lays out the full tensor. Autograd's ``IndexSelectBackward`` zero-fills the
  tensor and then scatters into it with ``index_add_``: twice the writes, and for rows a kernel that on a CPU
  shared with other processes stalls in parallel regions waiting for a descheduled thread (measurements: the
  "Kernel choices" section of docs/results.md);
- several row-sliced projections of one input (q / k / v, gate / up) run as one matmul (``gather_linear_rows``);
- memory on accelerators: autograd keeps every layer's gathered copy alive from forward to backward (half the
  model's weights at r = 0.5); there backward re-gathers it from W instead (``REGATHER_DEVICES``).

Indices must hold distinct entries (``peft_sat.selection`` returns sorted unique indices).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

# Devices where backward re-gathers the kept weight from W instead of keeping the gathered copy from forward. Keeping
# it costs memory: every layer's copy lives from forward to backward (half the model's weights at r = 0.5, e.g.
# ~6.5 GB for a 7B model in bf16); re-gathering costs one more copy kernel per projection: negligible on a GPU, but
# on a CPU one more parallel region, and on a CPU shared with other processes each region may wait a whole
# scheduler slice for a descheduled thread, which made CPU steps slower (docs/results.md, "Kernel choices").
REGATHER_DEVICES = {"cuda", "xpu", "mps", "hpu", "npu", "meta"}


class _GatherLinearRows(torch.autograd.Function):
    """``F.linear`` with the stacked rows ``[W_1[i_1]; ...; W_n[i_n]]``; inputs flattened as
    ``(x, n, W_1..W_n, b_1..b_n, i_1..i_n)`` so that autograd sees every weight and bias."""

    @staticmethod
    def forward(ctx, x, count, *tensors):
        weights, biases, indices = tensors[:count], tensors[count : 2 * count], tensors[2 * count :]
        stacked = _stack_rows(weights, indices)  # (sum k, in)
        needs = ctx.needs_input_grad
        need_x = needs[0]
        need_weights = needs[2 : 2 + count]
        need_biases = needs[2 + count : 2 + 2 * count]
        ctx.count = count
        ctx.sizes = [index.numel() for index in indices]
        ctx.out_features = [w.shape[0] for w in weights]
        ctx.weight_dtypes = [w.dtype for w in weights]
        ctx.bias_dtypes = [None if b is None else b.dtype for b in biases]
        ctx.x_dtype = x.dtype
        ctx.regather = weights[0].device.type in REGATHER_DEVICES
        for_x = (weights if ctx.regather else (stacked,)) if need_x else ()
        ctx.save_for_backward(x if any(need_weights) else None, *indices, *for_x)
        ctx.need = (need_x, need_weights, need_biases)
        return F.linear(x, stacked, _stack_biases(biases, indices, ctx.sizes, stacked))

    @staticmethod
    def backward(ctx, grad_out):
        count, sizes = ctx.count, ctx.sizes
        saved = ctx.saved_tensors
        x, indices, for_x = saved[0], saved[1 : 1 + count], saved[1 + count :]
        need_x, need_weights, need_biases = ctx.need
        grad_x = None
        if need_x:
            stacked = _stack_rows(for_x, indices) if ctx.regather else for_x[0]
            grad_x = grad_out.matmul(stacked.to(grad_out.dtype)).to(ctx.x_dtype)  # (..., sum k) @ (sum k, in)
        grad_weights, grad_biases = [None] * count, [None] * count
        if any(need_weights) or any(need_biases):
            grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (N, sum k)
            total, offsets = sum(sizes), [sum(sizes[:j]) for j in range(count)]
            sources = [  # (out_j,) rows of the padded product below, `total` for the omitted (zero) rows
                _source_map(index, rows, offset, total)
                for index, rows, offset in zip(indices, ctx.out_features, offsets)
            ]
        if any(need_weights):
            x_2d = x.reshape(-1, x.shape[-1]).to(grad_2d.dtype)
            # All sum k rows, even those of a frozen weight among trainable ones (a mix no SAT block produces).
            padded = _padded_product(grad_2d, x_2d, ctx.weight_dtypes[0])  # (sum k + 1, in), last row zero
            for j in range(count):
                if need_weights[j]:
                    grad_weights[j] = padded.index_select(0, sources[j]).to(ctx.weight_dtypes[j])  # (out_j, in)
        if any(need_biases):
            padded_bias = F.pad(grad_2d.sum(0), (0, 1))  # (sum k + 1,)
            for j in range(count):
                if need_biases[j]:
                    grad_biases[j] = padded_bias.index_select(0, sources[j]).to(ctx.bias_dtypes[j])
        return grad_x, None, *grad_weights, *grad_biases, *([None] * count)


class _GatherLinearCols(torch.autograd.Function):
    """``F.linear(x, W[:, index], b)``; see the module docstring."""

    @staticmethod
    def forward(ctx, x, weight, bias, index):
        kept_weight = weight.index_select(1, index)  # (out, k)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.in_features = weight.shape[1]
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.regather = weight.device.type in REGATHER_DEVICES
        for_x = (weight if ctx.regather else kept_weight) if need_x else None
        ctx.save_for_backward(x if need_w else None, for_x, index)
        return F.linear(x, kept_weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, for_x, index = ctx.saved_tensors  # for_x: W (re-gather) or the gathered W[:, index]
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes  # differ from grad_out's under autocast
        grad_x = grad_w = grad_b = None
        if need_x:
            kept_weight = for_x.index_select(1, index) if ctx.regather else for_x
            grad_x = grad_out.matmul(kept_weight.to(grad_out.dtype)).to(x_dtype)  # (..., out) @ (out, k)
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        if need_w:
            x_2d = x.reshape(-1, x.shape[-1]).to(grad_2d.dtype)  # (N, k)
            kept_grad = grad_2d.t().mm(x_2d).to(w_dtype)  # (out, k)
            # Not the padded-buffer layout of the rows: writing the product with row stride k + 1 slows it down by
            # more than this column scatter costs (docs/results.md, "Kernel choices").
            grad_w = kept_grad.new_zeros(kept_grad.shape[0], ctx.in_features).index_add_(1, index, kept_grad)
        if need_b:
            grad_b = grad_2d.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None


def _stack_rows(weights: Sequence[torch.Tensor], indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[W_1[i_1]; ...; W_n[i_n]]`` (sum k, in), gathered straight into one buffer."""
    if len(weights) == 1:
        return weights[0].index_select(0, indices[0])
    stacked = weights[0].new_empty(sum(index.numel() for index in indices), weights[0].shape[1])
    offset = 0
    for weight, index in zip(weights, indices):
        torch.index_select(weight, 0, index, out=stacked[offset : offset + index.numel()])
        offset += index.numel()
    return stacked


def _stack_biases(biases, indices, sizes, like: torch.Tensor) -> torch.Tensor | None:
    if all(b is None for b in biases):
        return None
    parts = [like.new_zeros(k) if b is None else b.index_select(0, i) for b, i, k in zip(biases, indices, sizes)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _source_map(index: torch.Tensor, size: int, offset: int, zero_at: int) -> torch.Tensor:
    """(size,) int64: for each full row / column, ``offset`` + its position in ``index``, or ``zero_at`` (the
    padded zero row / column) when it was not kept."""
    source = torch.full((size,), zero_at, dtype=torch.long, device=index.device)
    return source.index_copy_(0, index, torch.arange(offset, offset + index.numel(), device=index.device))


def _padded_product(grad_2d: torch.Tensor, x_2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad_2d^T x_2d`` (k, in) in a (k + 1, in) buffer of ``dtype`` whose last row is zero."""
    kept_rows = grad_2d.shape[1]
    buffer = grad_2d.new_empty(kept_rows + 1, x_2d.shape[1], dtype=dtype)
    if dtype == grad_2d.dtype:
        torch.mm(grad_2d.t(), x_2d, out=buffer[:kept_rows])
    else:  # autocast: the product in the compute dtype, the gradient in the weight's dtype
        buffer[:kept_rows].copy_(grad_2d.t().mm(x_2d))
    buffer[kept_rows].zero_()
    return buffer


def gather_linear_rows(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    indices: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Kept output rows of several projections of the same input, as one matmul: (..., in) -> (..., sum k_j).

    Args:
        x: (..., in).
        weights: n >= 1 weights (out_j, in), one dtype and device; each trainable or frozen.
        biases: n biases (out_j,) or None.
        indices: n int64 index tensors (k_j,) of distinct rows.

    Returns:
        (..., k_1 + ... + k_n): the kept outputs of projection 1, then of projection 2, ...; split with
        ``torch.split(y, [k_1, ..., k_n], dim=-1)``.

    Example:
        >>> w = torch.arange(6.0).reshape(3, 2)
        >>> gather_linear_rows(torch.ones(1, 2), [w, w], [None, None], [torch.tensor([0]), torch.tensor([1, 2])])
        tensor([[1., 5., 9.]])
    """
    tensors = (*weights, *biases, *indices)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, *weights, *biases)):
        sizes = [index.numel() for index in indices]
        stacked = _stack_rows(weights, indices)
        return F.linear(x, stacked, _stack_biases(biases, indices, sizes, stacked))
    return _GatherLinearRows.apply(x, len(weights), *tensors)


def gather_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, index: torch.Tensor, by_rows: bool
) -> torch.Tensor:
    """Linear map restricted to ``index``: (..., in) -> (..., k) for rows, (..., k) -> (..., out) for columns.

    Args:
        x: input; its last dimension is ``in`` (rows) or ``k = len(index)`` (columns).
        weight: (out, in), trainable or frozen.
        bias: (out,) or None; with columns it is added whole.
        index: (k,) int64 distinct rows or columns of ``weight``, on its device (sorted reads memory in order).
        by_rows: gather rows (output units) or columns (input units).

    Returns:
        (..., k) for rows, (..., out) for columns, in ``x``'s dtype.

    Example:
        >>> w = torch.arange(6.0).reshape(3, 2)
        >>> gather_linear(torch.ones(1, 2), w, None, torch.tensor([0, 2]), by_rows=True)
        tensor([[1., 9.]])
    """
    if by_rows:
        return gather_linear_rows(x, (weight,), (bias,), (index,))
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x, weight.index_select(1, index), bias)
    return _GatherLinearCols.apply(x, weight, bias, index)


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
                grad_x = kept_grad.matmul(weight.index_select(0, index).to(kept_grad.dtype)).to(x_dtype)
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
            kept = grad_out.matmul(weight.index_select(1, index).to(grad_out.dtype))  # (..., k)
            grad_x = kept.new_zeros(ctx.in_shape, dtype=x_dtype).index_copy_(-1, index, kept.to(x_dtype))
        if need_w:
            x_2d = kept_x.reshape(-1, index.numel()).to(grad_2d.dtype)  # (N, k)
            kept_grad = grad_2d.t().mm(x_2d).to(w_dtype)  # (out, k)
            grad_w = kept_grad.new_zeros(out_features, in_features).index_copy_(1, index, kept_grad)
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
            grad_x = grad_kept.matmul(weight.index_select(0, index).to(grad_kept.dtype)).to(x_dtype)
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
            grad_h = grad_out.matmul(weight.index_select(1, index).to(grad_out.dtype)).to(h_dtype)  # (..., k)
        if need_w:
            kept_grad = grad_2d.t().mm(kept_h.reshape(-1, index.numel()).to(grad_2d.dtype)).to(w_dtype)  # (out, k)
            grad_w = kept_grad.new_zeros(kept_grad.shape[0], ctx.in_features).index_copy_(1, index, kept_grad)
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

