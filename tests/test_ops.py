"""Exactness of ``peft_sat.ops.gather_linear`` against plain ``F.linear`` on the gathered / masked weight.

float64 so that "equal" means equal up to summation order; seeded inputs, non-zero biases, unsorted and sorted
indices (distinct: the contract of ``gather_linear``). Omitted rows / columns must get exactly zero gradient, and gradients must flow through autograd's own
accumulation (``.grad`` sums over backward calls, post-accumulate hooks fire: what DDP relies on).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import peft_sat.ops
from peft_sat.ops import gather_linear
from peft_sat.ops_backward import cols_to_value, weight_grad_from_value

OUT, IN = 12, 10
TOL = dict(rtol=1e-12, atol=1e-12)


def _tensors(by_rows: bool, bias: bool, weight_grad: bool, x_grad: bool, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(OUT, IN, dtype=torch.float64, generator=generator).requires_grad_(weight_grad)
    b = torch.randn(OUT, dtype=torch.float64, generator=generator).requires_grad_(weight_grad) if bias else None
    index = torch.tensor([9, 1, 4, 5]) if by_rows else torch.tensor([0, 3, 7, 8])  # unsorted rows, sorted cols
    width = IN if by_rows else index.numel()
    x = torch.randn(2, 3, width, dtype=torch.float64, generator=generator).requires_grad_(x_grad)  # 3-D input
    return x, weight, b, index


def _reference(x, weight, bias, index, by_rows):
    """Autograd through plain ops: ``F.linear`` on the gathered weight."""
    if by_rows:
        return F.linear(x, weight.index_select(0, index), None if bias is None else bias.index_select(0, index))
    return F.linear(x, weight.index_select(1, index), bias)


def _grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, grad_out) if wanted else ()


@pytest.mark.parametrize("by_rows", [True, False], ids=["rows", "cols"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("weight_grad", [True, False], ids=["trainable", "frozen"])
@pytest.mark.parametrize("x_grad", [True, False], ids=["x_grad", "x_const"])
@pytest.mark.parametrize("regather", [False, True], ids=["keep_copy", "regather"])
def test_forward_and_gradients_equal_plain_linear(by_rows, bias, weight_grad, x_grad, regather, monkeypatch):
    # both backward strategies on CPU: keep the gathered copy (CPU default) or re-gather it (accelerators' default)
    monkeypatch.setattr(peft_sat.ops, "REGATHER_DEVICES", {"cpu"} if regather else set())
    x, weight, b, index = _tensors(by_rows, bias, weight_grad, x_grad)
    out = gather_linear(x, weight, b, index, by_rows)
    expected = _reference(x, weight, b, index, by_rows)
    torch.testing.assert_close(out, expected, **TOL)
    assert out.shape == (2, 3, index.numel() if by_rows else OUT)
    grad_out = torch.randn_like(out)
    got, want = _grads(out, (x, weight, b), grad_out), _grads(expected, (x, weight, b), grad_out)
    assert len(got) == len(want) == int(x_grad) + int(weight_grad) * (1 + int(bias))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


@pytest.mark.parametrize("by_rows", [True, False], ids=["rows", "cols"])
def test_gradient_equals_masked_dense_reference_and_is_zero_outside(by_rows):
    """The sliced step equals a dense step whose omitted units are masked out; omitted units get exact zeros."""
    x, weight, b, index = _tensors(by_rows, bias=True, weight_grad=True, x_grad=True)
    grad_out = torch.randn(2, 3, index.numel() if by_rows else OUT, dtype=torch.float64)
    gather_linear(x, weight, b, index, by_rows).backward(grad_out)

    weight_ref, b_ref = weight.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    if by_rows:  # dense product, then keep the selected output rows
        dense = F.linear(x.detach(), weight_ref, b_ref).index_select(-1, index)
        kept = torch.zeros(OUT, dtype=torch.bool).index_fill_(0, index, True)
        weight_kept, bias_kept = kept[:, None].expand(OUT, IN), kept
    else:  # dense product of an input that is zero outside the selected columns
        full = torch.zeros(2, 3, IN, dtype=torch.float64).index_copy(-1, index, x.detach())
        dense = F.linear(full, weight_ref, b_ref)
        kept = torch.zeros(IN, dtype=torch.bool).index_fill_(0, index, True)
        weight_kept, bias_kept = kept[None, :].expand(OUT, IN), torch.ones(OUT, dtype=torch.bool)
    dense.backward(grad_out)

    torch.testing.assert_close(weight.grad, weight_ref.grad, **TOL)
    torch.testing.assert_close(b.grad, b_ref.grad, **TOL)
    assert weight.grad.shape == weight.shape and weight.grad.is_contiguous()
    assert torch.count_nonzero(weight.grad[~weight_kept]) == 0  # exactly zero, not merely small
    assert torch.count_nonzero(b.grad[~bias_kept]) == 0
    assert torch.all(weight.grad[weight_kept] != 0)  # the equality above is not trivially 0 == 0


@pytest.mark.parametrize("by_rows", [True, False], ids=["rows", "cols"])
def test_gradients_accumulate_through_autograd(by_rows):
    """Two backward calls sum into ``.grad`` via AccumulateGrad, whose hooks (used by DDP) fire each time."""
    x, weight, b, index = _tensors(by_rows, bias=True, weight_grad=True, x_grad=False)
    fired = []
    weight.register_post_accumulate_grad_hook(lambda p: fired.append(p.grad.clone()))
    other_index = index.flip(0)[:2]
    gather_linear(x, weight, b, index, by_rows).sum().backward()
    first = weight.grad.clone()
    x2 = x[..., : other_index.numel()] if not by_rows else x
    gather_linear(x2, weight, b, other_index, by_rows).sum().backward()

    ref = weight.detach().clone().requires_grad_()
    _reference(x, ref, b.detach(), index, by_rows).sum().backward()
    _reference(x2, ref, b.detach(), other_index, by_rows).sum().backward()
    torch.testing.assert_close(weight.grad, ref.grad, **TOL)
    assert len(fired) == 2
    torch.testing.assert_close(fired[0], first, **TOL)


@pytest.mark.parametrize("by_rows", [True, False], ids=["rows", "cols"])
@pytest.mark.parametrize("kept", [[0], list(range(OUT)), [3, 11]], ids=["one", "all", "edges"])
def test_extreme_selections(by_rows, kept):
    """One unit, every unit (an identity gather), and the first / last units (the padded zero slice's neighbours)."""
    index = torch.tensor([k for k in kept if by_rows or k < IN])
    _, weight, b, _ = _tensors(by_rows, bias=True, weight_grad=True, x_grad=True)
    x = torch.randn(2, 3, IN if by_rows else index.numel(), dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 3, index.numel() if by_rows else OUT, dtype=torch.float64)
    got = _grads(gather_linear(x, weight, b, index, by_rows), (x, weight, b), grad_out)
    want = _grads(_reference(x, weight, b, index, by_rows), (x, weight, b), grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_no_grad_and_non_contiguous_input():
    x, weight, b, index = _tensors(False, bias=True, weight_grad=True, x_grad=False)
    x_t = x.transpose(0, 1).contiguous().transpose(0, 1)  # same values, non-contiguous layout
    with torch.no_grad():
        out = gather_linear(x_t, weight, b, index, False)
    assert not out.requires_grad
    torch.testing.assert_close(out, _reference(x, weight, b, index, False), **TOL)
    x_t.requires_grad_()
    grad_x = torch.autograd.grad(gather_linear(x_t, weight, b, index, False).sum(), x_t)[0]
    torch.testing.assert_close(grad_x, torch.autograd.grad(_reference(x_t, weight, b, index, False).sum(), x_t)[0])


@pytest.mark.parametrize("by_rows", [True, False], ids=["rows", "cols"])
def test_gradcheck(by_rows):
    x, weight, b, index = _tensors(by_rows, bias=True, weight_grad=True, x_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, bb: gather_linear(x, w, bb, index, by_rows), (x, weight, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_low_precision_and_autocast(dtype):
    x, weight, b, index = _tensors(True, bias=True, weight_grad=True, x_grad=True)
    x, weight, b = (t.detach().to(dtype).requires_grad_() for t in (x, weight, b))
    out = gather_linear(x, weight, b, index, True)
    out.sum().backward()
    assert out.dtype == dtype and weight.grad.dtype == dtype and x.grad.dtype == dtype
    # autocast: fp32 weights, bf16 compute; gradients come back in each input's own dtype
    x32, w32 = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gather_linear(x32, w32, None, index, True)
    out.float().sum().backward()
    assert w32.grad.dtype == torch.float32 and x32.grad.dtype == torch.float32
    assert torch.count_nonzero(w32.grad[[0, 3, 6, 7, 8, 10, 11]]) == 0


@pytest.mark.parametrize("regather", [False, True], ids=["keep_copy", "regather"])
@pytest.mark.parametrize("biases", [(True, True), (False, False), (True, False)], ids=["bias", "no_bias", "mixed"])
@pytest.mark.parametrize("trainable", [(True, True), (False, False), (True, False)], ids=["train", "frozen", "mixed"])
def test_stacked_rows_equal_separate_projections(regather, biases, trainable, monkeypatch):
    """q / k / v (or gate / up) as one matmul: outputs and every gradient equal three separate plain linears."""
    monkeypatch.setattr(peft_sat.ops, "REGATHER_DEVICES", {"cpu"} if regather else set())
    generator = torch.Generator().manual_seed(3)
    outs, indices = (12, 6, 6), (torch.tensor([0, 5, 7, 11]), torch.tensor([1, 2]), torch.tensor([1, 2]))
    weights = [torch.randn(o, IN, dtype=torch.float64, generator=generator) for o in outs]
    bias_flags = (*biases, biases[0])
    train_flags = (*trainable, trainable[0])
    weights = [w.requires_grad_(t) for w, t in zip(weights, train_flags)]
    bs = [torch.randn(o, dtype=torch.float64, generator=generator).requires_grad_(t) if f else None
          for o, f, t in zip(outs, bias_flags, train_flags)]  # fmt: skip
    x = torch.randn(2, 3, IN, dtype=torch.float64, generator=generator, requires_grad=True)

    out = peft_sat.ops.gather_linear_rows(x, weights, bs, indices)
    expected = torch.cat([_reference(x, w, b, i, True) for w, b, i in zip(weights, bs, indices)], dim=-1)
    torch.testing.assert_close(out, expected, **TOL)
    grad_out = torch.randn_like(out)
    inputs = (x, *weights, *bs)
    for g, w in zip(_grads(out, inputs, grad_out), _grads(expected, inputs, grad_out), strict=True):
        torch.testing.assert_close(g, w, **TOL)
    out = peft_sat.ops.gather_linear_rows(x, weights, bs, indices)
    out.backward(grad_out)
    for weight, index in zip(weights, indices):
        if weight.requires_grad:
            omitted = torch.ones(weight.shape[0], dtype=torch.bool).index_fill_(0, index, False)
            assert torch.count_nonzero(weight.grad[omitted]) == 0


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("weight_grad", [True, False])
def test_linear_token_rows_equals_a_graph_on_those_rows_only(bias, weight_grad):
    """One matmul over every row; value, dL/dx, dL/dW and dL/db as a split where only ``rows`` have a graph."""
    torch.manual_seed(0)
    x = torch.randn(7, 5, requires_grad=True)
    weight = torch.randn(4, 5, requires_grad=weight_grad)
    b = torch.randn(4, requires_grad=True) if bias else None
    rows = torch.tensor([0, 3, 4])
    others = torch.tensor([1, 2, 5, 6])
    upstream = torch.randn(7, 4)

    y = peft_sat.ops_rows.linear_token_rows(x, weight, b, rows)
    with torch.no_grad():
        rest = F.linear(x.index_select(0, others), weight, b)
    graph = F.linear(x.index_select(0, rows), weight, b)
    reference = torch.zeros(7, 4).index_copy(0, others, rest).index_copy(0, rows, graph)
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-6)
    params = [t for t in (x, weight, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad((y * upstream).sum(), params)
    expected = torch.autograd.grad((reference * upstream).sum(), params)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert grads[0].index_select(0, others).eq(0).all()  # the other rows take no gradient


def test_linear_token_rows_without_a_graph_is_plain_linear():
    x, weight = torch.randn(3, 2), torch.randn(4, 2)
    y = peft_sat.ops_rows.linear_token_rows(x, weight, None, torch.tensor([1]))
    assert y.grad_fn is None and torch.equal(y, F.linear(x, weight))


@pytest.mark.parametrize("shape", [(6,), (5, 6), (2, 3, 6), (2, 2, 3, 6)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_select_last_is_index_select_on_the_last_dimension(shape, contiguous):
    from peft_sat.ops import select_last

    base = torch.randn(*shape[:-1], shape[-1] * 2, requires_grad=True)
    tensor = base[..., : shape[-1]].contiguous() if contiguous else base[..., ::2]  # a copy, or a strided view
    assert tensor.is_contiguous() == contiguous
    index = torch.tensor([4, 0, 2])
    expected = tensor.index_select(-1, index)
    kept = select_last(tensor, index)
    assert torch.equal(kept, expected) and kept.shape == expected.shape
    grad = torch.randn_like(expected)
    (got,) = torch.autograd.grad(kept, base, grad)
    (want,) = torch.autograd.grad(expected, base, grad)
    assert torch.equal(got, want)


def _lora_layer_operands(base_trains: bool) -> tuple:
    """A LoRA layer's operands: input (2, 5, 6), base W (7, 6) and b (trained or frozen), A (3, 6), B (7, 3), and
    the generator that drew them (for the upstream gradient)."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 6, generator=generator, requires_grad=True)
    weight = torch.randn(7, 6, generator=generator).requires_grad_(base_trains)
    bias = torch.randn(7, generator=generator).requires_grad_(base_trains)
    lora_a = torch.randn(3, 6, generator=generator, requires_grad=True)
    lora_b = torch.randn(7, 3, generator=generator, requires_grad=True)
    return x, weight, bias, lora_a, lora_b, generator


@pytest.mark.parametrize("base_trains", [True, False])
def test_one_lora_rows_node_gives_the_chains_values_and_gradients_bit_for_bit(base_trains):
    """``lora_rows_from_value``: the kept rows of a LoRA layer's value with the gradients of the chain it replaces,
    the base's rows node plus the adapter's kept rows ``gather_linear(A x, B) * s`` added with a zero value."""
    from peft_sat.ops_backward import lora_rows_from_value, rows_from_value

    x, weight, bias, lora_a, lora_b, generator = _lora_layer_operands(base_trains)
    index, scale = torch.tensor([1, 4, 5]), 0.75
    upstream = torch.randn(2, 5, 3, generator=generator)

    def kept(fused: bool) -> torch.Tensor:
        low_rank = F.linear(x, lora_a)
        with torch.no_grad():
            value = F.linear(x, weight, bias) + F.linear(low_rank, lora_b) * scale
        if fused:
            return lora_rows_from_value(x, weight, bias, low_rank, lora_b, index, value, scale)
        part = gather_linear(low_rank, lora_b, None, index, by_rows=True) * scale
        return rows_from_value(x, weight, bias, index, value) + (part - part.detach())

    params = [t for t in (x, weight, bias, lora_a, lora_b) if t.requires_grad]
    results = []
    for fused in (True, False):
        y = kept(fused)
        results.append((y, torch.autograd.grad((y * upstream).sum(), params)))
    (y_fused, grads_fused), (y_chain, grads_chain) = results
    assert torch.equal(y_fused, y_chain)
    for got, want in zip(grads_fused, grads_chain, strict=True):
        assert torch.equal(got, want)
    omitted = torch.tensor([0, 2, 3, 6])
    grad_b = grads_fused[-1]  # B's: the last parameter
    assert grad_b.index_select(0, omitted).eq(0).all() and grad_b.index_select(0, index).ne(0).all()


def test_a_lora_mlp_in_backward_mode_builds_one_node_per_projection():
    """The defaults on a LoRA model (PEFT's plain adapters): gate and up take their kept rows' gradient from one
    ``_LoraRowsFromValue`` node each and down from one ``_LoraColsToValue``, not from the base's node and a
    product of the adapter."""
    from sat_testing import batch, sat_model

    import peft_sat

    model = sat_model("lora", peft_sat.SATConfig(omission_rate=0.5))
    loss = model(**batch(pad=0)).loss  # every position carries loss: no split, the MLP omits channels
    names, seen, stack = [], set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.append(node.name())
            stack.extend(next_node for next_node, _ in node.next_functions)
    layers = model.base_model.model.config.num_hidden_layers
    assert names.count("_LoraRowsFromValueBackward") == 2 * layers  # gate and up of every layer
    assert names.count("_LoraColsToValueBackward") == layers  # down
    assert not {"_RowsFromValueBackward", "_ColsToValueBackward", "_GatherLinearRowsBackward"} & set(names)


@pytest.mark.parametrize("base_trains", [True, False])
def test_one_lora_cols_node_gives_the_chains_gradients(base_trains):
    """``lora_cols_to_value``: a LoRA layer's output with the gradient of its kept input columns, against the chain
    it replaces (the base's columns node plus the adapter's ``B(A[:, K] h_K) * s`` added with a zero value)."""
    from peft_sat.ops_backward import cols_to_value, lora_cols_to_value

    h, weight, bias, lora_a, lora_b, generator = _lora_layer_operands(base_trains)
    index, scale = torch.tensor([0, 2, 5]), 0.75
    upstream = torch.randn(2, 5, 7, generator=generator)

    def output(fused: bool) -> torch.Tensor:
        kept_h = h.index_select(-1, index)
        with torch.no_grad():
            value = F.linear(h, weight, bias) + F.linear(F.linear(h, lora_a), lora_b) * scale
        if fused:
            return lora_cols_to_value(kept_h, weight, bias, lora_a, lora_b, index, value, scale)
        part = F.linear(gather_linear(kept_h, lora_a, None, index, by_rows=False), lora_b) * scale
        return cols_to_value(kept_h, weight, bias, index, value) + (part - part.detach())

    params = [t for t in (h, weight, bias, lora_a, lora_b) if t.requires_grad]
    (y_fused, grads_fused), (y_chain, grads_chain) = [
        (y, torch.autograd.grad((y * upstream).sum(), params)) for y in (output(True), output(False))
    ]
    torch.testing.assert_close(y_fused, y_chain, rtol=0, atol=1e-6)
    for got, want in zip(grads_fused, grads_chain, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    omitted = torch.tensor([1, 3, 4])
    assert grads_fused[0].index_select(-1, omitted).eq(0).all()  # h: the kept columns only
    grad_a = grads_fused[-2]  # A learns at the kept columns only
    assert grad_a.index_select(1, omitted).eq(0).all() and grad_a.index_select(1, index).ne(0).all()


@pytest.mark.parametrize("kernel", ["cols_to_value", "weight_grad_from_value"])
def test_a_gated_down_projection_whose_bias_alone_trains(kernel):
    """With h = gated(gate, up) recomputed in backward, a step where only the bias takes a gradient saves nothing of
    h and still gets the bias's whole gradient (the sum of the output gradient over the tokens)."""
    generator = torch.Generator().manual_seed(0)
    gate, up = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    weight, bias = torch.randn(4, 8, generator=generator), torch.randn(4, requires_grad=True)
    index = torch.tensor([1, 3, 6])

    def gated(g, u):
        return F.silu(g) * u

    value = F.linear(gated(gate, up), weight, bias.detach())
    if kernel == "cols_to_value":
        output = cols_to_value(gate, weight, bias, index, value, up, gated)
    else:
        output = weight_grad_from_value(gate, weight, bias, index, value, False, up, gated)
    grad_out = torch.randn(6, 4, generator=generator)
    output.backward(grad_out)
    assert torch.equal(bias.grad, grad_out.sum(0))
