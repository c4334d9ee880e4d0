"""``peft_sat.token_rows.project_rows``: one pass over every row with a graph on the dense rows gives the value and
gradients of a split (the rows with a graph, the others without), for plain, LoRA and other layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from torch import nn

from peft_sat import ops_rows, token_rows
from peft_sat.token_rows import project_rows, split_rows

ROWS, CONTEXT = torch.tensor([0, 2, 3, 6]), torch.tensor([1, 4, 5])


class Projection(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 5)


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "plain":
        return Projection().proj
    if kind == "variant":  # DoRA: not a layer project_rows reproduces, so it splits
        config = LoraConfig(r=2, target_modules=["proj"], init_lora_weights=False, use_dora=True)
    else:  # "lora": PEFT's defaults (one autograd node per projection), "lora+bias": a chain of three
        config = LoraConfig(
            r=2, lora_alpha=4, target_modules=["proj"], init_lora_weights=False, lora_bias=kind == "lora+bias"
        )
    return get_peft_model(Projection(), config).base_model.model.proj


@pytest.mark.parametrize("kind", ["plain", "lora", "lora+bias", "variant"])
def test_project_rows_equals_a_split_in_value_and_gradients(kind, monkeypatch):
    layer = _layer(kind)
    calls = []
    monkeypatch.setattr(token_rows, "split_rows", lambda *args: calls.append(1) or split_rows(*args))
    if kind == "plain":
        layer.weight.requires_grad_(True)
    x = torch.randn(7, 6, requires_grad=True)
    upstream = torch.randn(7, 5)
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]

    y = project_rows(layer, x, ROWS, CONTEXT)
    assert len(calls) == (kind == "variant"), "plain and LoRA layers run one pass over every row"
    one_node = "_ProjectionAtRowsBackward" in _node_names(y) and "_RowsIntoBackward" not in _node_names(y)
    assert one_node == (kind in ("plain", "lora")), "plain layers and PEFT's defaults: one node"
    reference = split_rows(layer, x, ROWS, CONTEXT)
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-6)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=1e-6)  # the dense value
    grads = torch.autograd.grad((y * upstream).sum(), params)
    expected = torch.autograd.grad((reference * upstream).sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert grads[0].index_select(0, CONTEXT).eq(0).all() and grads[0].index_select(0, ROWS).ne(0).any()


def _node_names(tensor: torch.Tensor) -> set[str]:
    """The type names of every autograd node behind ``tensor``."""
    seen, todo = {}, [tensor.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = type(node).__name__
            todo.extend(next_node for next_node, _ in node.next_functions)
    return set(seen.values())


@pytest.mark.parametrize("base_trains", [False, True])
def test_one_lora_node_gives_the_chains_gradients_bit_for_bit(base_trains):
    """``lora_of_value`` (one autograd node) against ``linear_of_value`` chained over A, B and the base."""
    layer = _layer("lora")
    layer.base_layer.weight.requires_grad_(base_trains)
    base, lora_a, lora_b = layer.base_layer, layer.lora_A["default"], layer.lora_B["default"]
    scaling = layer.scaling["default"]
    x = torch.randn(4, 6, requires_grad=True)
    with torch.no_grad():
        low_rank = lora_a(x)
        value = layer(x)
    upstream = torch.randn(4, 5)
    params = [x, base.weight, base.bias, lora_a.weight, lora_b.weight]
    params = [p for p in params if p.requires_grad]

    fused = ops_rows.lora_of_value(x, base.weight, base.bias, lora_a.weight, lora_b.weight, low_rank, value, scaling)
    assert type(fused.grad_fn).__name__ == "_LoraOfValueBackward" and fused.grad_fn.next_functions
    chain = ops_rows.linear_of_value(
        ops_rows.linear_of_value(x, lora_a.weight, None, low_rank), lora_b.weight, None, value, 2.0
    )
    chain = ops_rows.linear_of_value(x, base.weight, base.bias, chain)
    assert scaling == 2.0 and torch.equal(fused, chain) and torch.equal(fused, value)
    for got, want in zip(
        torch.autograd.grad((fused * upstream).sum(), params),
        torch.autograd.grad((chain * upstream).sum(), params),
        strict=True,
    ):
        assert torch.equal(got, want)


@pytest.mark.parametrize("mode", ["rows", "rows-saving-x", "every-row"])
@pytest.mark.parametrize("kind", ["plain", "lora"])
def test_projection_at_rows_is_rows_into_over_the_rows_graphs_in_one_node(kind, mode):
    """``projection_at_rows`` against ``rows_into`` over ``lora_of_value`` (``linear_of_value`` for a plain layer):
    on the dense rows the same gradients bit for bit, whether it saves their input or the whole one; with every
    row, against a second such graph on the context rows' detached inputs, whose weight gradients it sums over all
    rows in one product."""
    layer = _layer(kind)
    base = layer if kind == "plain" else layer.base_layer
    x = torch.randn(7, 6, requires_grad=True)
    upstream = torch.randn(7, 5)
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]
    with torch.no_grad():
        value = layer(x)
        low_rank = None if kind == "plain" else layer.lora_A["default"](x)
    lora = None if kind == "plain" else (layer.lora_A["default"].weight, layer.lora_B["default"].weight)

    def graph(inputs: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        placeholder = ops_rows.rows_placeholder(value, rows)
        if lora is None:
            return ops_rows.linear_of_value(inputs, base.weight, base.bias, placeholder)
        low_rank_rows = low_rank.index_select(0, rows)
        return ops_rows.lora_of_value(inputs, base.weight, base.bias, *lora, low_rank_rows, placeholder, 2.0)

    x_rows = x.index_select(0, ROWS)
    every_row = mode == "every-row"
    x_all = None if mode == "rows" else x.detach()
    y = ops_rows.projection_at_rows(
        value, x_rows, base.weight, base.bias, ROWS, lora and (*lora, low_rank, 2.0), x_all, every_row
    )
    assert _node_names(y) == {"_ProjectionAtRowsBackward", "IndexSelectBackward0", "AccumulateGrad"}
    pairs = [ROWS, graph(x.index_select(0, ROWS), ROWS)]
    if every_row:
        pairs += [CONTEXT, graph(x.detach().index_select(0, CONTEXT), CONTEXT)]
    reference = ops_rows.rows_into(value, *pairs)
    assert torch.equal(y, value) and torch.equal(reference, value)
    grads = torch.autograd.grad((y * upstream).sum(), params)
    expected = torch.autograd.grad((reference * upstream).sum(), params)
    for got, want in zip(grads, expected, strict=True):
        if every_row:
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
        else:
            assert torch.equal(got, want)
    assert grads[0].index_select(0, CONTEXT).eq(0).all() and grads[0].index_select(0, ROWS).ne(0).all()
    assert all(g.ne(0).all() for g in grads[1:]), "every trainable weight learns"
    with pytest.raises(ValueError, match="every_row needs the whole input"):
        ops_rows.projection_at_rows(value, x_rows, base.weight, base.bias, ROWS, every_row=True)


def test_split_rows_puts_each_row_back_in_place():
    y = split_rows(lambda t: t * 2, torch.arange(7.0).unsqueeze(1).requires_grad_(), ROWS, CONTEXT)
    assert torch.equal(y.squeeze(1), torch.arange(7.0) * 2)


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(6, 8), nn.Linear(6, 8), nn.Linear(8, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _mlp_case(kind: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """A TinyMLP (``kind``: plain, lora, lora+dropout), an input, an upstream gradient and the tensors to check."""
    torch.manual_seed(0)
    mlp = TinyMLP()
    if kind != "plain":
        dropout = 0.5 if kind == "lora+dropout" else 0.0
        config = LoraConfig(r=2, lora_alpha=4, target_modules=["gate_proj", "up_proj", "down_proj"],
                            init_lora_weights=False, lora_dropout=dropout)  # fmt: skip
        mlp = get_peft_model(mlp, config).base_model.model
    x = torch.randn(7, 6, requires_grad=True)
    return mlp, x, torch.randn(7, 6), [x, *(p for p in mlp.parameters() if p.requires_grad)]


def _mlp_values(mlp: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The MLP pattern's first half: gate and up once over every row (dropout drawn from seed 1), the hidden values
    without a graph, and the dense rows' gate and up with theirs."""
    torch.manual_seed(1)
    x_rows = x.index_select(0, ROWS)
    gate, gate_rows = token_rows.rows_value(mlp.gate_proj, x, x_rows, ROWS)
    up, up_rows = token_rows.rows_value(mlp.up_proj, x, x_rows, ROWS)
    with torch.no_grad():
        hidden = F.silu(gate) * up
    return hidden, gate_rows, up_rows


@pytest.mark.parametrize("kind", ["plain", "lora", "lora+dropout"])
def test_rows_value_and_rows_output_give_the_dense_value_and_the_rows_gradient(kind):
    """The MLP pattern: dense values once over every row, the graph of the dense rows on their n rows. The reference
    is the module's own forward (same dropout draw) with the upstream gradient zero outside the dense rows."""
    mlp, x, upstream, params = _mlp_case(kind)

    hidden, gate_rows, up_rows = _mlp_values(mlp, x)
    y = token_rows.rows_output(mlp.down_proj, hidden, F.silu(gate_rows) * up_rows, ROWS)
    grads = torch.autograd.grad((y * upstream).sum(), params)

    torch.manual_seed(1)
    reference = mlp(x)
    only_rows = torch.zeros(7, 1).index_fill(0, ROWS, 1.0)
    expected = torch.autograd.grad((reference * upstream * only_rows).sum(), params)
    assert torch.equal(y, reference), "the value is the module's own forward"
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["plain", "lora", "lora+dropout"])
def test_gated_output_recomputes_the_rows_hidden_values_for_the_same_gradients(kind):
    """``gated_output`` against ``rows_output`` on ``silu(gate_rows) * up_rows``: bit for bit the same gradients; one
    node that saves the gate and up rows only (not the activation's output nor the hidden rows) where the down
    projection is plain or PEFT's default LoRA layer (with dropout it is the graph as before)."""
    mlp, x, upstream, params = _mlp_case(kind)

    def step(one_node: bool):
        hidden, gate_rows, up_rows = _mlp_values(mlp, x)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            if one_node:
                y = token_rows.gated_output(
                    mlp.down_proj, hidden, gate_rows, up_rows, ROWS, lambda g, u: F.silu(g) * u
                )
            else:
                y = token_rows.rows_output(mlp.down_proj, hidden, F.silu(gate_rows) * up_rows, ROWS)
        return y, torch.autograd.grad((y * upstream).sum(), params), _node_names(y), saved

    y, grads, nodes, saved = step(one_node=True)
    want_y, want_grads, want_nodes, want_saved = step(one_node=False)
    assert torch.equal(y, want_y)
    assert all(torch.equal(got, want) for got, want in zip(grads, want_grads, strict=True))
    hidden_rows = (len(ROWS), 8)
    if kind == "lora+dropout":
        assert nodes == want_nodes
    else:
        assert "_GatedRowsOutputBackward" in nodes and not {"SiluBackward0", "MulBackward0"} & nodes
        assert saved.count(hidden_rows) == want_saved.count(hidden_rows) - 2  # silu(gate_D) and h_D


@pytest.mark.parametrize("kind", ["plain", "lora", "lora+dropout", "variant"])
def test_project_all_rows_trains_the_weights_on_every_row_and_the_input_on_the_dense_rows(kind):
    """Keys and values of context tokens: the reference is the module on an input whose context rows are detached,
    with the module's own dropout draw."""
    layer = _layer("plain" if kind == "plain" else "variant" if kind == "variant" else "lora")
    if kind == "plain":
        layer.weight.requires_grad_(True)
    if kind == "lora+dropout":
        layer.lora_dropout["default"] = nn.Dropout(0.5)
    x = torch.randn(7, 6, requires_grad=True)
    upstream = torch.randn(7, 5)
    params = [x, *(p for p in layer.parameters() if p.requires_grad)]

    torch.manual_seed(1)
    x_rows, x_context = x.index_select(0, ROWS), x.detach().index_select(0, CONTEXT)
    y = token_rows.project_all_rows(layer, x, x_rows, x_context, ROWS, CONTEXT)
    one_node = "_ProjectionAtRowsBackward" in _node_names(y) and "_RowsIntoBackward" not in _node_names(y)
    assert one_node == (kind in ("plain", "lora")), "plain layers and PEFT's defaults: one node for every row"
    grads = torch.autograd.grad((y * upstream).sum(), params)

    torch.manual_seed(1)
    cut = torch.where(torch.zeros(7, 1, dtype=torch.bool).index_fill(0, ROWS, True), x, x.detach())
    reference = layer(cut)
    expected = torch.autograd.grad((reference * upstream).sum(), params)
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert grads[0].index_select(0, CONTEXT).eq(0).all() and grads[0].index_select(0, ROWS).ne(0).all()
    assert all(g.ne(0).any() for g in grads[1:]), "every trainable weight learns"


@pytest.mark.parametrize("dropout", [0.0, 0.5], ids=["lora", "lora+dropout"])
def test_projections_of_one_input_together_match_them_one_by_one(dropout):
    """``project_together`` (an attention's q, k, v) and ``rows_values`` (an MLP's gate, up) run every product first,
    then the rows' graphs: the same values, dropout draws and gradients, bit for bit, as one projection at a time."""
    layers = [_layer("lora") for _ in range(3)]
    for seed, layer in enumerate(layers):
        torch.nn.init.normal_(layer.lora_B["default"].weight, generator=torch.Generator().manual_seed(seed))
        layer.lora_dropout["default"] = nn.Dropout(dropout) if dropout else nn.Identity()
    x = torch.randn(7, 6, requires_grad=True)
    upstream = torch.randn(3, 7, 5)
    params = [x, *(p for layer in layers for p in layer.parameters() if p.requires_grad)]

    def run(together: bool):
        torch.manual_seed(1)
        x_rows, x_context = x.index_select(0, ROWS), x.detach().index_select(0, CONTEXT)
        if together:
            outputs = token_rows.project_together(layers, (False, True, True), x, x_rows, x_context, ROWS, CONTEXT)
            pairs = token_rows.rows_values(layers[:2], x, x_rows, ROWS)
        else:
            outputs = [project_rows(layers[0], x, ROWS, CONTEXT, x_rows)]
            outputs += [token_rows.project_all_rows(p, x, x_rows, x_context, ROWS, CONTEXT) for p in layers[1:]]
            pairs = [token_rows.rows_value(p, x, x_rows, ROWS) for p in layers[:2]]
        loss = sum((y * g).sum() for y, g in zip(outputs, upstream, strict=True))
        loss = loss + sum(
            (rows * g.index_select(0, ROWS)).sum() for (_, rows), g in zip(pairs, upstream[:2], strict=True)
        )
        values = [*outputs, *(value for value, _ in pairs)]
        return values, torch.autograd.grad(loss, params)

    (values, grads), (want_values, want_grads) = run(together=True), run(together=False)
    assert all(torch.equal(got, want) for got, want in zip(values, want_values, strict=True))
    assert all(torch.equal(got, want) for got, want in zip(grads, want_grads, strict=True))
    assert grads[0].index_select(0, CONTEXT).eq(0).all() and all(g.ne(0).any() for g in grads[1:])
