"""Autograd kernels for gathered-weight matmuls (pure tensor code, no model imports).

With W (out, in), b (out,) or None and ``index`` (k,) int64:

    gather_linear(x, W, b, index, by_rows=True)    (..., in) -> (..., k)    y = x W[index]^T + b[index]
    gather_linear(x, W, b, index, by_rows=False)   (..., k)  -> (..., out)  y = x W[:, index]^T + b
    gather_linear_rows(x, [W_1, W_2], [b_1, b_2], [i_1, i_2])
                                                   (..., in) -> (..., k_1 + k_2)
                                                   y = x [W_1[i_1]; W_2[i_2]]^T + [b_1[i_1]; b_2[i_2]]

``recompute_gated(gated, gate, up, ...)`` serves the kernels that save an MLP's gate and up values instead of its
hidden value h = gated(gate, up): it recomputes h in backward and takes dL/dh through the gating.

The kernels of ``SATConfig.sparse_pass="backward"`` (a dense forward, a backward through the kept units) live in
``peft_sat.ops_backward``, those of token rows (a value over every row, a gradient through some) in
``peft_sat.ops_rows``.

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
- memory: autograd would keep every layer's gathered copy alive from forward to backward (half the model's weights
  at r = 0.5, more than the activations SAT saves); backward re-gathers it from W instead (``REGATHER_DEVICES``),
  so a step saves only what the dense step saves, restricted to the kept units.

Transient buffers (the gathered weights, the kept part of a weight gradient) live in one reusable per-thread buffer
on CPUs (``transient``), never in fresh memory: the allocator returns big blocks to the OS when they are freed, and
touching fresh pages costs about as much as copying them (docs/results.md, "Kernel choices").

Indices must hold distinct entries (``peft_sat.selection`` returns sorted unique indices).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from .norm_input import load_input, save_input

# Devices where backward re-gathers the kept weight from W instead of keeping the gathered copy from forward: all of
# them. Keeping it costs memory: every layer's copy lives from forward to backward (half the model's weights at
# r = 0.5, e.g. ~6.5 GB for a 7B model in bf16), more than the activations a sparse step saves. Re-gathering costs one
# copy of the kept weight per projection (into the reused buffer of `transient` on CPUs). A set, so that a device
# can opt out (tests compare both paths).
REGATHER_DEVICES = {"cpu", "cuda", "xpu", "mps", "hpu", "npu", "meta"}


class _Workspace(threading.local):
    def __init__(self) -> None:
        self.buffers: dict[torch.dtype, torch.Tensor] = {}


_WORKSPACE = _Workspace()


def transient(shape: Sequence[int], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialized tensor of ``shape`` on ``like``'s device, valid until the next ``transient`` call.

    On CPUs it is a view of one per-thread buffer per dtype, grown to the largest request and then reused: the
    gathered weights and weight-gradient parts below are written and read once per call, and fresh memory for them
    would be page-faulted in again every time (the allocator returns big blocks to the OS when they are freed).
    Elsewhere (and under ``torch.compile``) it is a fresh tensor: accelerator allocators cache blocks themselves.
    The buffer holds the largest request: a kept weight of one call (e.g. gate and up at r = 0.25) or the dense
    rows' gradient of an LM head (``linear_token_rows``); it is never saved for backward nor returned.
    """
    dtype = dtype or like.dtype
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return like.new_empty(shape, dtype=dtype)
    numel = math.prod(shape)
    buffer = _WORKSPACE.buffers.get(dtype)
    if buffer is None or buffer.numel() < numel:
        _WORKSPACE.buffers.pop(dtype, None)  # free the smaller one first
        buffer = _WORKSPACE.buffers[dtype] = like.new_empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def select_last(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``tensor[..., index]`` (same values as ``index_select(-1, index)``), gathered along the second dimension of
    the (N, last) view: on a CPU, ``index_select`` along the last dimension of a (4, 128, 1536) tensor took about
    twice as long as along the second of its (512, 1536) view."""
    if tensor.dim() <= 2 or not tensor.is_contiguous():  # a reshape would copy the whole tensor first
        return tensor.index_select(-1, index)
    kept = tensor.reshape(-1, tensor.shape[-1]).index_select(1, index)
    return kept.view(*tensor.shape[:-1], index.numel())


class _GatherLinearRows(torch.autograd.Function):
    """``F.linear`` with the stacked rows ``[W_1[i_1]; ...; W_n[i_n]]``; inputs flattened as
    ``(x, n, W_1..W_n, b_1..b_n, i_1..i_n)`` so that autograd sees every weight and bias."""

    @staticmethod
    def forward(ctx, x, count, *tensors):
        weights, biases, indices = tensors[:count], tensors[count : 2 * count], tensors[2 * count :]
        ctx.regather = weights[0].device.type in REGATHER_DEVICES
        keep = ctx.needs_input_grad[0] and not ctx.regather
        stacked = _stack_rows(weights, indices, transient_out=not keep)  # (sum k, in)
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
        # Saved: x for the weight gradients (the dense step saves it too; a norm's input when x is recomputable,
        # `peft_sat.norm_input`) and W itself for dL/dx, re-gathered in backward; the gathered copy only where a
        # device opts out of REGATHER_DEVICES.
        for_x = (weights if ctx.regather else (stacked,)) if need_x else ()
        ctx.save_for_backward(save_input(ctx, x) if any(need_weights) else None, *indices, *for_x)
        ctx.need = (need_x, need_weights, need_biases)
        return F.linear(x, stacked, _stack_biases(biases, indices, ctx.sizes, stacked))

    @staticmethod
    def backward(ctx, grad_out):
        count, sizes = ctx.count, ctx.sizes
        saved = ctx.saved_tensors
        x, indices, for_x = load_input(ctx, saved[0]), saved[1 : 1 + count], saved[1 + count :]
        need_x, need_weights, need_biases = ctx.need
        grad_x = None
        if need_x:
            stacked = _stack_rows(for_x, indices, transient_out=True) if ctx.regather else for_x[0]
            grad_x = grad_out.matmul(stacked.to(grad_out.dtype)).to(ctx.x_dtype)  # (..., sum k) @ (sum k, in)
            del stacked  # the transient buffer is reused below
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
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        ctx.regather = weight.device.type in REGATHER_DEVICES
        kept_weight = _gather_cols(weight, index, transient_out=not need_x or ctx.regather)  # (out, k)
        ctx.in_features = weight.shape[1]
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        # Saved: the kept columns of the input (what the dense step saves, restricted to them; a tensor autograd
        # keeps anyway where x is rows of it, `peft_sat.norm_input.rows_of_kept`) and W itself.
        for_x = (weight if ctx.regather else kept_weight) if need_x else None
        ctx.save_for_backward(save_input(ctx, x) if need_w else None, for_x, index)
        return F.linear(x, kept_weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, for_x, index = ctx.saved_tensors  # for_x: W (re-gather) or the gathered W[:, index]
        x = load_input(ctx, x)
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes  # differ from grad_out's under autocast
        grad_x = grad_w = grad_b = None
        if need_x:
            kept_weight = _gather_cols(for_x, index, transient_out=True) if ctx.regather else for_x
            grad_x = grad_out.matmul(kept_weight.to(grad_out.dtype)).to(x_dtype)  # (..., out) @ (out, k)
            del kept_weight  # the transient buffer is reused below
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        if need_w:
            x_2d = x.reshape(-1, x.shape[-1]).to(grad_2d.dtype)  # (N, k)
            grad_w = _scatter_cols(_product(grad_2d, x_2d), index, ctx.in_features, w_dtype)
        if need_b:
            grad_b = grad_2d.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None


def _stack_rows(
    weights: Sequence[torch.Tensor], indices: Sequence[torch.Tensor], transient_out: bool = False
) -> torch.Tensor:
    """``[W_1[i_1]; ...; W_n[i_n]]`` (sum k, in), gathered straight into one buffer (``transient`` or fresh)."""
    shape = (sum(index.numel() for index in indices), weights[0].shape[1])
    stacked = transient(shape, weights[0]) if transient_out else weights[0].new_empty(shape)
    offset = 0
    for weight, index in zip(weights, indices):
        torch.index_select(weight, 0, index, out=stacked[offset : offset + index.numel()])
        offset += index.numel()
    return stacked


def _gather_cols(weight: torch.Tensor, index: torch.Tensor, transient_out: bool = False) -> torch.Tensor:
    """``W[:, index]`` (out, k), into the ``transient`` buffer or fresh memory."""
    shape = (weight.shape[0], index.numel())
    return torch.index_select(weight, 1, index, out=transient(shape, weight) if transient_out else None)


def _product(grad_2d: torch.Tensor, x_2d: torch.Tensor) -> torch.Tensor:
    """``grad_2d^T x_2d`` (k_out, k_in) into the ``transient`` buffer."""
    return torch.mm(grad_2d.t(), x_2d, out=transient((grad_2d.shape[1], x_2d.shape[1]), grad_2d))


def _scatter_cols(kept_grad: torch.Tensor, index: torch.Tensor, in_features: int, dtype: torch.dtype):
    """The full-size (out, in) gradient of ``dtype``, ``kept_grad`` (out, k) at columns ``index``, zero elsewhere.

    Not the padded-buffer layout of the rows: writing the product with row stride k + 1 slows it down by more than
    this column scatter costs (docs/results.md, "Kernel choices").
    """
    full = torch.zeros(kept_grad.shape[0], in_features, dtype=dtype, device=kept_grad.device)
    return full.index_add_(1, index, kept_grad.to(dtype))


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
    """``grad_2d^T x_2d`` (k, in) in a (k + 1, in) ``transient`` buffer of ``dtype`` whose last row is zero."""
    kept_rows = grad_2d.shape[1]
    buffer = transient((kept_rows + 1, x_2d.shape[1]), grad_2d, dtype)
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
        stacked = _stack_rows(weights, indices, transient_out=True)
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
        return F.linear(x, _gather_cols(weight, index, transient_out=True), bias)
    return _GatherLinearCols.apply(x, weight, bias, index)


def _scaled(tensor: torch.Tensor, scale: float) -> torch.Tensor:
    return tensor if scale == 1.0 else tensor * scale


Gated = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (gate, up) -> h, e.g. act(gate) * up
GradsOfInputs = Callable[[torch.Tensor | None], tuple[torch.Tensor | None, torch.Tensor | None]]


def recompute_gated(
    gated: Gated,
    gate: torch.Tensor,
    up: torch.Tensor,
    need_gate: bool,
    need_up: bool,
) -> tuple[torch.Tensor, GradsOfInputs]:
    """For a backward that saved ``gate`` and ``up`` instead of ``h = gated(gate, up)`` and the gating's own saved
    tensors (e.g. act(gate)): ``(h, grads)``, h recomputed (no graph) by the same operations as the forward's, so
    the same values, and ``grads(dL/dh)`` = (dL/dgate, dL/dup) (None where not needed or dL/dh is None) through
    those operations' own backward: the gradients the forward's graph would give."""
    with torch.enable_grad():
        gate = gate.detach().requires_grad_(need_gate)
        up = up.detach().requires_grad_(need_up)
        hidden = gated(gate, up)
    inputs = [t for t, need in ((gate, need_gate), (up, need_up)) if need]

    def grads(grad_hidden: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if grad_hidden is None or not inputs:
            return None, None
        found = iter(torch.autograd.grad(hidden, inputs, grad_hidden))
        return next(found) if need_gate else None, next(found) if need_up else None

    return hidden.detach(), grads
