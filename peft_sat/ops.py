"""Autograd kernels for gathered-weight matmuls (pure tensor code).

``gather_linear(x, W, b, index, by_rows)`` computes ``x W[index]^T + b[index]`` (rows) or ``x W[:, index]^T + b``
(columns). Gradients w.r.t. W are exactly zero outside the gathered rows / columns.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def gather_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], index: torch.Tensor, by_rows: bool
) -> torch.Tensor:
    """Linear map restricted to ``index``: (..., in) -> (..., k) for rows, (..., k) -> (..., out) for columns."""
    if by_rows:
        return F.linear(x, weight.index_select(0, index), None if bias is None else bias.index_select(0, index))
    return F.linear(x, weight.index_select(1, index), bias)
