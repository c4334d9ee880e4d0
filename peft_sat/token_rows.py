"""Projections over every token row with a gradient through the dense rows only (``SATConfig.context_tokens=
"forward_only"``: the context rows' outputs take no gradient).

For a flat input x (N, in), dense rows D and the other (context) rows C::

    project_rows(module, x, D, C)    module(x) for every row, differentiable at the rows D only

Plain ``nn.Linear`` layers and PEFT LoRA layers over them run ONE matmul per weight over all N rows
(``peft_sat.ops.linear_token_rows``), with the value the dense forward computes. Anything else (4-bit bases, LoRA
variants, unknown layers) runs a split: ``module(x[D])`` with a graph, ``module(x[C])`` without, written back into one
tensor. A split reads every weight twice and writes its outputs twice, forward work the dense step does not do.
"""

from __future__ import annotations

import torch
from torch import nn

from .ops import linear_token_rows
from .scatter import place
from .sliced import _is_lora, _is_plain_linear
from .sliced_backward import _plain_lora


def project_rows(module: nn.Module, x: torch.Tensor, rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``module(x)`` (N, out) for a flat x (N, in), with a graph on the dense ``rows`` only (the ``context`` rows are
    the others)."""
    if _is_plain_linear(module):
        return linear_token_rows(x, module.weight, module.bias, rows)
    if _is_lora(module) and _plain_lora(module) is not None and _is_plain_linear(module.base_layer):
        return _lora_rows(module, x, rows)
    return split_rows(module, x, rows, context)


def split_rows(function, x: torch.Tensor, rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``function(x)`` for (N, in) rows as two calls: the ``rows`` with a graph, the ``context`` rows without (their
    output takes no gradient), written back into one (N, out) tensor whose backward keeps only the indices."""
    dense = function(x.index_select(0, rows))
    with torch.no_grad():
        rest = function(x.index_select(0, context))
    return place([(context, rest), (rows, dense)], x.shape[0])


def _lora_rows(module: nn.Module, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """PEFT's LoRA forward in its order (base, then each adapter's ``B(A(dropout(x))) * scaling`` added, cast back
    to the base output's dtype), each matmul over every row and differentiable at ``rows`` only."""
    base = module.base_layer
    result = linear_token_rows(x, base.weight, base.bias, rows)
    result_dtype = result.dtype
    for adapter in _plain_lora(module):
        lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
        x_cast = module._cast_input_dtype(x, lora_a.weight.dtype)
        low_rank = linear_token_rows(module.lora_dropout[adapter](x_cast), lora_a.weight, None, rows)
        result = result + linear_token_rows(low_rank, lora_b.weight, lora_b.bias, rows) * module.scaling[adapter]
    return result.to(result_dtype)
