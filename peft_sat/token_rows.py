"""Projections over every token row with a gradient through the dense rows only (``SATConfig.context_tokens=
"forward_only"``: the context rows' outputs take no gradient).

For a flat input x (N, in), dense rows D (n of them) and the other (context) rows C::

    project_rows(module, x, D, C)            module(x) (N, out), differentiable at the rows D only
    value, value_D = rows_value(module, x, x_D, D)
                                             value = module(x) (N, out) without a graph, and value_D = value[D]
                                             with the backward of module(x_D) (x_D = x[D], with its graph)
    rows_output(module, h, h_D, D)           module(h) (N, out) whose backward runs through h_D = h[D] only
    gated_output(module, h, gate_D, up_D, D, f)
                                             module(h) (N, out), h = f(gate, up), whose backward runs through the
                                             rows' gate_D and up_D (h_D = f(gate_D, up_D) recomputed in backward)
    project_all_rows(module, x, x_D, x_C, D, C)
                                             module(x) (N, out), every row differentiable: the weights learn from
                                             every row, the input takes its gradient at the rows D only (keys and
                                             values: the context rows' keys train, their hidden states do not)

Plain ``nn.Linear`` layers and PEFT LoRA layers over them run ONE matmul per weight over all N rows (the value the
dense forward computes, bit for bit), and the backward of the rows D in one autograd node
(``peft_sat.ops_rows.projection_at_rows``; for ``project_all_rows`` the weights' backward over every row, the
input's over the rows D). ``rows_value`` and ``rows_output`` let a block compute its dense values once and build
the graph of the rows D on tensors of n rows, as the MLP does (its down projection through ``gated_output``);
``rows_values`` and ``project_together`` serve several projections of one input (an MLP's gate and up, an
attention's q, k and v), every product first. Layers with several adapters, dropout or adapter biases chain
``linear_of_value`` nodes, handed the rows' gradient by ``rows_into``. Anything else (4-bit bases, LoRA variants,
unknown layers) runs a split: ``module(x[D])`` with a graph, ``module(x[C])`` without, written back into one
tensor; a split reads every weight twice and writes its outputs twice, forward work the dense step does not do.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ops import Gated
from .ops_rows import (
    gated_rows_output,
    linear_of_value,
    lora_of_value,
    projection_at_rows,
    rows_into,
    rows_placeholder,
)
from .scatter import place
from .sliced import _is_lora, _is_plain_linear
from .sliced_backward import _plain_lora


def supports_rows(module: nn.Module) -> bool:
    """Whether ``module`` runs one pass over every row here (plain ``nn.Linear``, plain LoRA over one)."""
    if _is_plain_linear(module):
        return True
    return _is_lora(module) and _plain_lora(module) is not None and _is_plain_linear(module.base_layer)


def project_rows(
    module: nn.Module, x: torch.Tensor, rows: torch.Tensor, context: torch.Tensor, x_rows: torch.Tensor | None = None
) -> torch.Tensor:
    """``module(x)`` (N, out) for a flat x (N, in), with a graph on the dense ``rows`` only (the ``context`` rows are
    the others); ``x_rows``: ``x[rows]`` when the caller has it."""
    if supports_rows(module):
        return rows_output(module, x, x.index_select(0, rows) if x_rows is None else x_rows, rows)
    return split_rows(module, x, rows, context)


def rows_value(module: nn.Module, x: torch.Tensor, x_rows: torch.Tensor, rows: torch.Tensor):
    """``(module(x), value_rows)``: the value (N, out) without a graph, and its rows ``rows`` (n, out) with the
    backward of ``module(x_rows)``. ``module`` must be ``supports_rows``."""
    return rows_values((module,), x, x_rows, rows)[0]


def rows_values(modules: Sequence[nn.Module], x: torch.Tensor, x_rows: torch.Tensor, rows: torch.Tensor) -> list:
    """``rows_value`` of several ``supports_rows`` projections of one input, their products first: back to back
    they read ``x`` while it is still in cache, as the dense forward's projections do."""
    values = [_value(module, x) for module in modules]
    return [
        (value, _graph(module, x_rows, value.index_select(0, rows), branches, rows))
        for module, (value, branches) in zip(modules, values, strict=True)
    ]


def rows_output(module: nn.Module, h: torch.Tensor, h_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``module(h)`` (N, out), computed over every row, whose backward runs through ``h_rows`` = ``h[rows]`` only.
    ``module`` must be ``supports_rows``."""
    value, branches = _value(module, h)
    return _rows_graph(module, value, branches, h_rows, rows)


def gated_output(
    module: nn.Module,
    hidden: torch.Tensor,
    gate_rows: torch.Tensor,
    up_rows: torch.Tensor,
    rows: torch.Tensor,
    gated: Gated,
) -> torch.Tensor:
    """``module(hidden)`` (N, out) for ``hidden = gated(gate, up)`` (N, I) computed over every row, whose backward
    runs through the dense rows' ``gate_rows`` and ``up_rows`` (n, I, with their graphs): ``rows_output`` on
    ``gated(gate_rows, up_rows)``, in one node that recomputes those rows' hidden values in backward where the
    module is one node (``ops_rows.gated_rows_output``: two (n, I) tensors fewer saved)."""
    value, branches = _value(module, hidden)
    lora = _one_node_lora(module, branches, gate_rows, value)
    if lora is False:
        return _rows_graph(module, value, branches, gated(gate_rows, up_rows), rows)
    base = _base(module)
    return gated_rows_output(value, gate_rows, up_rows, gated, base.weight, base.bias, rows, lora)


def project_all_rows(
    module: nn.Module,
    x: torch.Tensor,
    x_rows: torch.Tensor,
    x_context: torch.Tensor | None,
    rows: torch.Tensor,
    context: torch.Tensor,
) -> torch.Tensor:
    """``module(x)`` (N, out) for a flat x (N, in) whose weights get the gradient of every row and whose input gets
    it at the dense ``rows`` only (through ``x_rows`` = ``x[rows]``; ``x_context`` = ``x[context]`` detached, or None
    to make it where needed): the input gradient of the ``context`` rows is never computed. Modules other than
    ``supports_rows`` run on the two parts put back together."""
    if not supports_rows(module):
        x_context = x.detach().index_select(0, context) if x_context is None else x_context
        return module(place([(context, x_context), (rows, x_rows)], x.shape[0]))
    value, branches = _value(module, x)
    return _rows_graph(module, value, branches, x_rows, rows, x, context, x_context)


def project_together(
    modules: Sequence[nn.Module],
    all_rows: Sequence[bool],
    x: torch.Tensor,
    x_rows: torch.Tensor,
    x_context: torch.Tensor | None,
    rows: torch.Tensor,
    context: torch.Tensor,
) -> list[torch.Tensor]:
    """For ``supports_rows`` projections of one flat input x (N, in): ``project_all_rows`` where ``all_rows`` says
    so, else ``project_rows``, with every product first (back to back they read ``x`` while it is still in cache, as
    the dense forward's projections do), then the rows' graphs."""
    values = [_value(module, x) for module in modules]
    # where one projection saves all of x for its weights, the others save it too instead of copies of its rows
    whole_input = any(all_rows)
    return [
        _rows_graph(module, value, branches, x_rows, rows, x, context if every_row else None, x_context, whole_input)
        for module, (value, branches), every_row in zip(modules, values, all_rows, strict=True)
    ]


def _rows_graph(
    module, value, branches, x_rows, rows, x=None, context=None, x_context=None, whole_input=False
) -> torch.Tensor:
    """``value`` (N, out) whose backward runs the module's on ``x_rows`` (the rows ``rows``) and, given the flat
    input ``x`` and the other rows ``context``, the weights' on every row (``x_context`` = ``x[context]`` detached,
    made here when the caller has none). A plain layer or one plain LoRA adapter is one node
    (``projection_at_rows``; ``whole_input``: it saves ``x``, kept by other projections, not ``x_rows``), anything
    else a graph per part handed its rows by ``rows_into``."""
    lora = _one_node_lora(module, branches, x_rows, value)
    if lora is not False:
        base = _base(module)
        every_row = context is not None
        x_all = x.detach() if every_row or whole_input else None
        return projection_at_rows(value, x_rows, base.weight, base.bias, rows, lora, x_all, every_row)
    pairs = [rows, _graph(module, x_rows, rows_placeholder(value, rows), branches, rows)]
    if context is not None:
        x_context = x.detach().index_select(0, context) if x_context is None else x_context
        pairs += [context, _graph(module, x_context, rows_placeholder(value, context), branches, context)]
    return rows_into(value, *pairs)


def _one_node_lora(module, branches, x_rows, value):
    """What ``projection_at_rows`` takes for the module: None for a plain layer, (A, B, x A^T, scale) for one LoRA
    adapter without dropout or biases; False where it does not apply (several adapters, dropout, adapter biases,
    mixed dtypes, e.g. fp32 adapters on a 16-bit base, or the value's under autocast, the compute dtype: the chain
    casts)."""
    base = _base(module)
    dtypes = {x_rows.dtype, base.weight.dtype, value.dtype}
    if not branches:
        return None if len(dtypes) == 1 else False
    if len(branches) != 1:
        return False
    dropout_mask, low_rank, lora_a, lora_b, scaling = branches[0]
    dtypes |= {lora_a.weight.dtype, lora_b.weight.dtype}
    if dropout_mask is not None or lora_a.bias is not None or lora_b.bias is not None or len(dtypes) != 1:
        return False
    return lora_a.weight, lora_b.weight, low_rank, scaling


def split_rows(function, x: torch.Tensor, rows: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """``function(x)`` for (N, in) rows as two calls: the ``rows`` with a graph, the ``context`` rows without (their
    output takes no gradient), written back into one (N, out) tensor whose backward keeps only the indices."""
    dense = function(x.index_select(0, rows))
    with torch.no_grad():
        rest = function(x.index_select(0, context))
    return place([(context, rest), (rows, dense)], x.shape[0])


def _base(module: nn.Module) -> nn.Linear:
    return module if _is_plain_linear(module) else module.base_layer


def _value(module: nn.Module, x: torch.Tensor):
    """The module's forward without a graph, and per LoRA adapter what the rows' graph needs: its dropout mask (None
    without dropout), its rank-r value ``A(dropout(x))`` (N, r), A, B and the scaling (none for a plain layer). A
    LoRA layer runs PEFT's order: base, then each adapter's ``B(A(dropout(x))) * scaling`` added, cast back to the
    base output's dtype."""
    base = _base(module)
    branches = []
    with torch.no_grad():
        result = F.linear(x, base.weight, base.bias)
        result_dtype = result.dtype
        for adapter in [] if base is module else _plain_lora(module):
            lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
            x_cast = module._cast_input_dtype(x, lora_a.weight.dtype)
            dropout = module.lora_dropout[adapter]
            mask = None
            if isinstance(dropout, nn.Dropout) and dropout.training and dropout.p > 0:
                mask = dropout(torch.ones_like(x_cast))  # 0 or 1 / (1 - p): one draw for the value and the graph
                x_cast = x_cast * mask
            low_rank = lora_a(x_cast)
            result = result + lora_b(low_rank) * module.scaling[adapter]
            branches.append((mask, low_rank, lora_a, lora_b, module.scaling[adapter]))
    return result.to(result_dtype), branches


def _graph(module, x_rows, value_rows, branches, rows) -> torch.Tensor:
    """``value_rows`` (n, out) with the backward of the module on ``x_rows``: each LoRA adapter's B on
    ``A(dropout(x_rows))`` (its rows of the rank-r value, nothing recomputed), then the base's. One adapter without
    dropout or biases, in the base's dtype (PEFT's defaults), is one autograd node (``lora_of_value``): the chain
    of three costs as much in per-node overhead as the small rank-r products themselves, on every projection."""
    base = _base(module)
    lora = _one_node_lora(module, branches, x_rows, value_rows) if branches else False
    if lora is not False:
        lora_a, lora_b, low_rank, scaling = lora
        low_rank_rows = low_rank.index_select(0, rows)
        return lora_of_value(x_rows, base.weight, base.bias, lora_a, lora_b, low_rank_rows, value_rows, scaling)
    output = value_rows
    for dropout_mask, low_rank, lora_a, lora_b, scaling in branches:
        x_cast = module._cast_input_dtype(x_rows, lora_a.weight.dtype)
        dropped = x_cast if dropout_mask is None else x_cast * dropout_mask.index_select(0, rows)
        low_rank_rows = linear_of_value(dropped, lora_a.weight, lora_a.bias, low_rank.index_select(0, rows))
        output = linear_of_value(low_rank_rows, lora_b.weight, lora_b.bias, output, scaling)
    return linear_of_value(x_rows, base.weight, base.bias, output)
