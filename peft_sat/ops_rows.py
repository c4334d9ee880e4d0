"""Autograd kernels for token rows: a value computed over every row of a flat (N, in) input, a gradient through the
rows ``rows`` (n,) only (pure tensor code, no model imports; ``SATConfig.context_tokens="forward_only"``)::

    linear_token_rows(x, W, b, rows)               (N, in) -> (N, out)  y = x W^T + b for every row; the gradient
                                                   flows through the rows ``rows`` only (the others act as constants)
    linear_of_value(x, W, b, y)                    returns y, computed beforehand; backward of x W^T + b
    lora_of_value(x, W, b, A, B, x A^T, y, s)      returns y; backward of x W^T + b + s (x A^T) B^T
    rows_into(y, rows, g, [rows_2, g_2, ...])      returns y (N, out); backward hands grad[rows] to g (n, out),
                                                   grad[rows_2] to g_2, ...
    projection_at_rows(y, x_D, W, b, rows, ...)    returns y (N, out); backward of x W^T + b (+ LoRA) on grad[rows],
                                                   with x_D = x[rows] (and, given x, the weights' on every row)
    gated_rows_output(y, gate_D, up_D, f, W, ...)  the same for a down projection on h_D = f(gate_D, up_D),
                                                   recomputed in backward
    rows_placeholder(y, rows)                      a zero-stride (n, out) stand-in for a value only the gradient
                                                   of which matters

``peft_sat.token_rows`` builds the projections of a split block from them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import Gated, _scaled, recompute_gated, transient


class _LinearOfValue(torch.autograd.Function):
    """``value`` (computed beforehand) with the gradient of ``scale * F.linear(x, W, b)`` added to its own."""

    @staticmethod
    def forward(ctx, x, weight, bias, value, scale):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.scale = scale
        ctx.save_for_backward(x if need_w else None, weight if need_x else None)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_value = ctx.needs_input_grad[:4]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = _scaled(grad.matmul(weight.to(grad.dtype)), ctx.scale).to(x_dtype)
        grad_2d = grad.reshape(-1, grad.shape[-1])
        if need_w:
            x_2d = x.reshape(-1, x.shape[-1]).to(grad_2d.dtype)
            grad_w = _scaled(grad_2d.t().matmul(x_2d), ctx.scale).to(w_dtype)
        if need_b:
            grad_b = _scaled(grad_2d.sum(0), ctx.scale).to(b_dtype)
        return grad_x, grad_w, grad_b, grad if need_value else None, None


class _LoraOfValue(torch.autograd.Function):
    """``value`` with the gradient of a LoRA layer ``x W^T + b + scale * (x A^T) B^T`` added to its own, its rank-r
    value ``low_rank`` = ``x A^T`` computed beforehand: one autograd node instead of three ``_LinearOfValue``s."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, low_rank, value, scale):
        need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[:5]
        ctx.scale = scale
        ctx.save_for_backward(
            x if need_w or need_a else None,
            weight if need_x else None,
            lora_a if need_x else None,
            lora_b if need_x or need_a else None,
            low_rank if need_b else None,
        )
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        x, weight, lora_a, lora_b, low_rank = ctx.saved_tensors
        *needs, _, need_value = ctx.needs_input_grad[:7]
        grads = _projection_grads(grad, grad, x, weight, (lora_a, lora_b, low_rank, ctx.scale), needs)
        return *grads, None, grad if need_value else None, None


class _ProjectionAtRows(torch.autograd.Function):
    """``value`` (N, out) with the backward of ``x W^T + b [+ scale (x A^T) B^T]`` on its gradient's rows ``rows``
    (input ``x_rows``) or, ``every_row``, the weights' on every row: what ``rows_into`` over ``lora_of_value`` (and a
    second such node on the other rows) computes, in one node. Saves ``x_all`` (N, in) instead of ``x_rows`` when
    given."""

    @staticmethod
    def forward(ctx, value, x_rows, weight, bias, lora_a, lora_b, low_rank, rows, x_all, every_row, scale):
        need_x, need_w, _, need_a, need_b = ctx.needs_input_grad[1:6]
        ctx.scale, ctx.every_row, ctx.whole_input = scale, every_row, x_all is not None
        ctx.save_for_backward(
            rows,
            (x_rows if x_all is None else x_all) if need_w or need_a else None,
            weight if need_x else None,
            lora_a if need_x else None,
            lora_b if need_x or need_a else None,
            low_rank if need_b else None,  # (N, r): the rows it needs are picked in backward, not copied here
        )
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        rows, x, weight, lora_a, lora_b, low_rank = ctx.saved_tensors
        need_value, *needs = ctx.needs_input_grad[:6]
        grad_rows = grad.index_select(0, rows)
        # the rows the weights learn from: every row's gradient where keys and values train on the context rows too
        grad_weights = grad.reshape(-1, grad.shape[-1]) if ctx.every_row else grad_rows
        if not ctx.every_row:
            low_rank = None if low_rank is None else low_rank.index_select(0, rows)
            x = x.index_select(0, rows) if ctx.whole_input and x is not None else x
        lora = (lora_a, lora_b, low_rank, ctx.scale)
        grads = _projection_grads(grad_rows, grad_weights, x, weight, lora, needs, rows if ctx.every_row else None)
        return grad if need_value else None, *grads, None, None, None, None, None


class _GatedRowsOutput(torch.autograd.Function):
    """``value`` (N, out) = down(hidden), computed beforehand, with the backward of down on the rows ``rows`` of
    ``hidden = gated(gate, up)`` and of ``gated`` on their ``gate_rows``, ``up_rows`` (n, I): the rows' hidden
    values are recomputed from those two in backward, not saved."""

    @staticmethod
    def forward(ctx, value, gate_rows, up_rows, weight, bias, lora_a, lora_b, low_rank, rows, gated, scale):
        ctx.gated, ctx.scale = gated, scale
        low_rank = low_rank if ctx.needs_input_grad[6] else None  # (N, r): only B's gradient reads it
        ctx.save_for_backward(rows, gate_rows, up_rows, weight, lora_a, lora_b, low_rank)
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        rows, gate_rows, up_rows, weight, lora_a, lora_b, low_rank = ctx.saved_tensors
        need_value, need_gate, need_up, *needs = ctx.needs_input_grad[:7]
        hidden, grads_of_inputs = recompute_gated(ctx.gated, gate_rows, up_rows, need_gate, need_up)
        grad_rows = grad.index_select(0, rows)
        low_rank = None if low_rank is None else low_rank.index_select(0, rows)
        lora = (lora_a, lora_b, low_rank, ctx.scale)
        grad_hidden, *grads = _projection_grads(
            grad_rows, grad_rows, hidden, weight, lora, [need_gate or need_up, *needs]
        )
        return grad if need_value else None, *grads_of_inputs(grad_hidden), *grads, None, None, None, None


def _projection_grads(grad_rows, grad_weights, x, weight, lora, needs, every_row_index=None) -> tuple:
    """(dL/dx at the rows, dL/dW, dL/db, dL/dA, dL/dB) of ``x W^T + b + s (x A^T) B^T`` (``lora`` = (A, B,
    x A^T, s), A and B None for a plain layer), for ``needs`` = which of the five: the input gradient from
    ``grad_rows``, the weights' from ``grad_weights`` with ``x`` and ``x A^T`` (the same rows, or every row: then
    ``every_row_index`` picks the rows' part of the rank-r gradient). The products, in order, of the chain
    base <- A <- B of ``_LinearOfValue`` nodes: bit for bit on the rows alone."""
    lora_a, lora_b, low_rank, scale = lora
    need_x, need_w, need_bias, need_a, need_b = needs
    grad_x = grad_w = grad_bias = grad_a = grad_b = None
    grad_low_rank = None
    if lora_b is not None and (need_x or need_a):
        grad_low_rank = _scaled(grad_weights.matmul(lora_b), scale)
    if need_b:
        grad_b = _scaled(grad_weights.t().matmul(low_rank), scale)
    if need_a:
        grad_a = grad_low_rank.t().matmul(x)
    if need_x:
        grad_x = grad_rows.matmul(weight)
        if lora_a is not None:
            rows_low_rank = (
                grad_low_rank if every_row_index is None else grad_low_rank.index_select(0, every_row_index)
            )
            grad_x = grad_x + rows_low_rank.matmul(lora_a)
    if need_w:
        grad_w = grad_weights.t().matmul(x)
    if need_bias:
        grad_bias = grad_weights.sum(0)
    return grad_x, grad_w, grad_bias, grad_a, grad_b


class _RowsInto(torch.autograd.Function):
    """``value`` (N, out); backward hands its gradient's rows ``rows_i`` to ``graph_i`` (n_i, out), for each pair."""

    @staticmethod
    def forward(ctx, value, *pairs):
        ctx.save_for_backward(*pairs[::2])
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad):
        grads = [None]
        for rows, needs in zip(ctx.saved_tensors, ctx.needs_input_grad[2::2], strict=True):
            grads += [None, grad.index_select(0, rows) if needs else None]
        return tuple(grads)


def linear_of_value(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, value: torch.Tensor, scale: float = 1.0
) -> torch.Tensor:
    """``value``, whose backward also runs that of ``scale * F.linear(x, weight, bias)``; saves ``x`` (for dL/dW).

    ``value`` holds that product computed beforehand (e.g. without a graph), possibly plus other terms; its own
    graph, if any, gets the gradient unchanged, so calls chain (a LoRA layer: B's backward on the adapter's rank-r
    input, then the base's). Where only the gradient matters, ``value`` may be a zero-stride placeholder
    (``rows_placeholder``).
    """
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return value
    return _LinearOfValue.apply(x, weight, bias, value, scale)


def lora_of_value(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    low_rank: torch.Tensor,
    value: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """``value``, whose backward also runs that of a LoRA layer on 2-D ``x`` (n, in): base ``W``, ``b``, adapter
    ``A`` (r, in), ``B`` (out, r) without biases, ``scale``, and ``low_rank`` = ``x A^T`` (n, r) from the forward::

        dL/dB = scale g^T (x A^T)    dL/dA = (scale g B)^T x    dL/dx = g W + (scale g B) A    (g = dL/dvalue)

    The same gradients as ``linear_of_value`` chained over A, B and the base, with one autograd node. Every
    tensor in one dtype (the caller checks).
    """
    tensors = (x, weight, bias, lora_a, lora_b)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return value
    return _LoraOfValue.apply(x, weight, bias, lora_a, lora_b, low_rank, value, scale)


def rows_into(value: torch.Tensor, rows: torch.Tensor, graph: torch.Tensor, *more: torch.Tensor) -> torch.Tensor:
    """``value`` (N, out), computed beforehand; its gradient's rows ``rows`` flow into ``graph`` (n, out), whose
    value is not used (``rows_placeholder``), and the other rows take none. ``more``: further disjoint
    ``rows_2, graph_2, ...`` pairs, fed the same way."""
    pairs = (rows, graph, *more)
    if not torch.is_grad_enabled() or not any(g.requires_grad for g in pairs[1::2]):
        return value
    return _RowsInto.apply(value, *pairs)


def projection_at_rows(
    value: torch.Tensor,
    x_rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
    x_all: torch.Tensor | None = None,
    every_row: bool = False,
) -> torch.Tensor:
    """``value`` (N, out), computed beforehand, whose backward runs that of ``x W^T + b`` (a LoRA layer's, given
    ``lora`` = (A (r, in), B (out, r), x A^T (N, r), scale)) on its gradient's rows ``rows``, with input ``x_rows``
    (n, in) = ``x[rows]``; ``every_row``: the weights learn from every row's gradient, the input still from the rows
    ``rows`` only::

        dL/dx_rows = g_D W + s (g_D B) A        dL/dW = g'^T x'    dL/dB = s g'^T (x' A^T)    dL/dA = (s g' B)^T x'

    (g = dL/dvalue, g_D its rows ``rows``; g', x' = g_D, x_rows, or, ``every_row``, g, x). ``x_all``: x (N, in)
    without its graph, saved instead of ``x_rows`` (needed with ``every_row``; for projections sharing an input
    that one of them saves whole anyway, as an attention's q beside k and v). One autograd node: ``rows_into``
    over ``lora_of_value`` computes the same with two, and with ``every_row`` with four and a copy of the other
    rows' input. Every tensor in one dtype, no adapter bias (the caller checks).
    """
    if every_row and x_all is None:
        raise ValueError("projection_at_rows: every_row needs the whole input x_all")
    lora_a, lora_b, low_rank, scale = lora if lora is not None else (None, None, None, 1.0)
    tensors = (x_rows, weight, bias, lora_a, lora_b)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return value
    return _ProjectionAtRows.apply(
        value, x_rows, weight, bias, lora_a, lora_b, low_rank, rows, x_all, every_row, scale
    )


def gated_rows_output(
    value: torch.Tensor,
    gate_rows: torch.Tensor,
    up_rows: torch.Tensor,
    gated: Gated,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows: torch.Tensor,
    lora: tuple[torch.Tensor, torch.Tensor, torch.Tensor, float] | None = None,
) -> torch.Tensor:
    """``value`` (N, out) = down(gated(gate, up)), computed beforehand, whose backward runs down's (``x W^T + b``,
    a LoRA layer's given ``lora`` = (A, B, h A^T (N, r), scale)) and ``gated``'s on the rows ``rows``, from the
    rows' ``gate_rows`` and ``up_rows`` (n, I) with their graphs::

        h_D = gated(gate_D, up_D)   recomputed in backward    dL/dh_D = g_D W + s (g_D B) A    then gated's backward

    What a graph of ``gated(gate_rows, up_rows)`` under ``projection_at_rows`` computes, in one node that saves
    gate_D and up_D only (the activation's output and h_D: two (n, I) tensors fewer, an elementwise pass over them
    in backward instead of the forward). Every tensor in one dtype, no adapter bias (the caller checks).
    """
    lora_a, lora_b, low_rank, scale = lora if lora is not None else (None, None, None, 1.0)
    tensors = (gate_rows, up_rows, weight, bias, lora_a, lora_b)
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors):
        return value
    return _GatedRowsOutput.apply(
        value, gate_rows, up_rows, weight, bias, lora_a, lora_b, low_rank, rows, gated, scale
    )


def rows_placeholder(value: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A zero-stride (n, out) tensor of ``value``'s dtype: what ``linear_of_value`` chains on when only the
    gradient of the rows ``rows`` matters (no memory)."""
    return value.new_zeros(()).expand(rows.numel(), value.shape[-1])


class _LinearTokenRows(torch.autograd.Function):
    """``F.linear(x, W, b)`` over every row, differentiable at the rows ``rows`` only."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows):
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.num_rows = x.shape[0]
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        # Saved: the rows' inputs (what a graph on those rows alone saves) and W for dL/dx.
        ctx.save_for_backward(x.index_select(0, rows) if need_w else None, weight if need_x else None, rows)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x_rows, weight, rows = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        # The rows' gradient, in the reused buffer: for an LM head it is logits-sized, and fresh memory for it
        # would be page-faulted in at every step.
        grad = torch.index_select(grad_out, 0, rows, out=transient((rows.numel(), grad_out.shape[1]), grad_out))
        grad_x = grad_w = grad_b = None
        if need_x:
            grad_x = grad_out.new_zeros(ctx.num_rows, weight.shape[1], dtype=x_dtype)
            grad_x.index_copy_(0, rows, grad.matmul(weight.to(grad.dtype)).to(x_dtype))
        if need_w:
            grad_w = grad.t().matmul(x_rows.to(grad.dtype)).to(w_dtype)
        if need_b:
            grad_b = grad.sum(0).to(b_dtype)
        return grad_x, grad_w, grad_b, None


def linear_token_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor):
    """``F.linear(x, weight, bias)`` for every row of ``x`` (N, in), as ONE matmul, with a gradient through the rows
    ``rows`` only: the other rows' outputs act as constants, as if computed without a graph.

    Why not the two matmuls of a split (``rows`` with a graph, the others without): each reads the whole weight,
    and both partial outputs are written again into the result, forward work a dense step does not do (for an LM
    head, 49k x 576 on SmolLM2, that is two extra logits-sized writes per step). The same math as ``rows_into`` over
    ``linear_of_value``, in one node, so that the rows' gradient can live in the reused ``transient`` buffer (it is
    read before the node returns): the LM head's, logits-sized.

    Example:
        >>> w = torch.ones(2, 3, requires_grad=True)
        >>> linear_token_rows(torch.ones(4, 3), w, None, torch.tensor([1, 3])).sum().backward()
        >>> w.grad  # two rows took part
        tensor([[2., 2., 2.],
                [2., 2., 2.]])
    """
    if not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return F.linear(x, weight, bias)
    return _LinearTokenRows.apply(x, weight, bias, rows)
