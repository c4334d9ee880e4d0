"""Index writes whose backward keeps only the indices (pure tensor code, no model imports).

With disjoint index tensors ``i_j`` (k_j,) int64 and values ``v_j`` of size k_j along ``dim``::

    place([(i_1, v_1), (i_2, v_2)], size, dim)    out[i_j] = v_j along dim, zero where no part writes
    add_at(base, i, v, dim)                       out = base, plus v at i along dim

The gradients are those of ``index_copy`` / ``index_add``: ``dL/dv_j = grad.index_select(dim, i_j)`` and, for
``add_at``, ``dL/dbase = grad``. Why not ``index_copy`` / ``index_add`` themselves: their autograd formulas keep the
written values alive until backward (only to read their shape), so a block that splits its rows into two groups and
writes them back saves a full copy of its output that backward never reads. A SAT step with dense loss tokens
(``SATConfig.dense_tokens``) does that in every attention and MLP block and in the LM head, and saved more for
backward than the dense step (docs/results.md, "Activation memory").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class _Place(torch.autograd.Function):
    @staticmethod
    def forward(ctx, size: int, dim: int, *pairs: torch.Tensor) -> torch.Tensor:
        indices, values = pairs[0::2], pairs[1::2]
        shape = list(values[0].shape)
        shape[dim] = size
        covered = sum(index.numel() for index in indices) == size  # disjoint indices: every position written
        out = values[0].new_empty(shape) if covered else values[0].new_zeros(shape)
        for index, value in zip(indices, values, strict=True):
            out.index_copy_(dim, index, value.to(out.dtype))
        ctx.dim = dim
        ctx.dtypes = [value.dtype for value in values]
        ctx.save_for_backward(*indices)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grads: list[torch.Tensor | None] = [None, None]
        for k, (index, dtype) in enumerate(zip(ctx.saved_tensors, ctx.dtypes, strict=True)):
            needed = ctx.needs_input_grad[3 + 2 * k]
            grads += [None, grad.index_select(ctx.dim, index).to(dtype) if needed else None]
        return tuple(grads)


class _AddAt(torch.autograd.Function):
    @staticmethod
    def forward(ctx, base: torch.Tensor, dim: int, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        ctx.dim, ctx.dtype = dim, values.dtype
        ctx.save_for_backward(index)
        return base.index_add(dim, index, values.to(base.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (index,) = ctx.saved_tensors
        values_grad = grad.index_select(ctx.dim, index).to(ctx.dtype) if ctx.needs_input_grad[3] else None
        return grad if ctx.needs_input_grad[0] else None, None, None, values_grad


def place(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], size: int, dim: int = 0) -> torch.Tensor:
    """A new tensor of ``size`` along ``dim`` with each part's values at its indices, zero elsewhere.

    Args:
        parts: ``(index, values)`` pairs: disjoint int64 indices (k_j,) and values of size k_j along ``dim``, equal
            elsewhere; the result has the first values' dtype.
        size: the result's size along ``dim``.
        dim: the dimension the indices address.

    Example:
        >>> place([(torch.tensor([2, 0]), torch.tensor([[1.0], [2.0]])), (torch.tensor([1]), torch.tensor([[3.0]]))], 3)
        tensor([[2.],
                [3.],
                [1.]])
    """
    if not parts:
        raise ValueError("`place` needs at least one (index, values) part.")
    pairs = [t for index, values in parts for t in (index, values)]
    return _Place.apply(size, dim, *pairs)


def add_at(base: torch.Tensor, index: torch.Tensor, values: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """``base.index_add(dim, index, values)`` (a new tensor, in ``base``'s dtype) whose backward keeps only ``index``.

    Example:
        >>> add_at(torch.zeros(3), torch.tensor([2]), torch.tensor([5.0]))
        tensor([0., 0., 5.])
    """
    return _AddAt.apply(base, dim, index, values)
