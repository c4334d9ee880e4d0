"""``peft_sat.scatter``: the same values and gradients as ``index_copy`` / ``index_add``, with backward keeping only
the indices (what autograd's own formulas keep alive is the point of the module)."""

from __future__ import annotations

import pytest
import torch

from peft_sat.scatter import add_at, place


def _saved_storages(build) -> set[int]:
    """Data pointers of the tensors autograd saves while ``build()`` runs."""
    saved: set[int] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.add(tensor.untyped_storage().data_ptr())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        build()
    return saved


@pytest.mark.parametrize("dim", [0, -1])
def test_place_matches_index_copy_in_value_and_gradient(dim):
    torch.manual_seed(0)
    rows, context = torch.tensor([4, 1, 2]), torch.tensor([0, 3])
    shape = lambda k: (k, 5) if dim == 0 else (5, k)  # noqa: E731
    dense = torch.randn(shape(3), requires_grad=True)
    rest = torch.randn(shape(2), requires_grad=True)
    weight = torch.randn(shape(5))

    out = place([(context, rest), (rows, dense)], 5, dim=dim)
    reference = torch.zeros(shape(5)).index_copy(dim, context, rest).index_copy(dim, rows, dense)
    assert torch.equal(out, reference)
    grads = torch.autograd.grad((out * weight).sum(), (dense, rest))
    expected = torch.autograd.grad((reference * weight).sum(), (dense, rest))
    assert all(torch.equal(g, e) for g, e in zip(grads, expected, strict=True))


def test_place_fills_zeros_where_no_part_writes_and_casts_to_the_first_dtype():
    values = torch.ones(2, 3, dtype=torch.bfloat16, requires_grad=True)
    other = torch.full((1, 3), 2.0, requires_grad=True)  # float32: cast to bfloat16 in the result
    out = place([(torch.tensor([0, 3]), values), (torch.tensor([1]), other)], 4)
    assert out.dtype == torch.bfloat16
    assert out[2].eq(0).all() and out[1].eq(2).all() and out[[0, 3]].eq(1).all()
    out.float().sum().backward()
    assert other.grad.dtype == torch.float32 and values.grad.dtype == torch.bfloat16
    assert other.grad.eq(1).all() and values.grad.eq(1).all()


def test_place_gives_no_gradient_to_values_without_one():
    dense = torch.randn(2, 3, requires_grad=True)
    out = place([(torch.tensor([1]), torch.randn(1, 3)), (torch.tensor([0, 2]), dense)], 3)
    (out * torch.arange(3.0).unsqueeze(1)).sum().backward()
    assert torch.equal(dense.grad, torch.tensor([[0.0] * 3, [2.0] * 3]))
    with pytest.raises(ValueError, match="at least one"):
        place([], 3)


def test_place_and_add_at_keep_only_their_indices_for_backward():
    rows, context = torch.tensor([0, 2]), torch.tensor([1])
    dense, rest = torch.randn(2, 4, requires_grad=True), torch.randn(1, 4, requires_grad=True)
    value_storages = {t.untyped_storage().data_ptr() for t in (dense, rest)}
    saved = _saved_storages(lambda: place([(context, rest), (rows, dense)], 3))
    assert saved and not saved & value_storages
    # autograd's own index_copy keeps the written values: the memory this module exists to avoid
    assert _saved_storages(lambda: torch.zeros(3, 4).index_copy(0, rows, dense)) & value_storages

    base = torch.randn(3, 4, requires_grad=True)
    saved = _saved_storages(lambda: add_at(base, rows, dense))
    assert saved and not saved & (value_storages | {base.untyped_storage().data_ptr()})


def test_add_at_matches_index_add_in_value_and_gradient():
    torch.manual_seed(0)
    base = torch.randn(4, 3, requires_grad=True)
    extra = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    rows, weight = torch.tensor([3, 1]), torch.randn(4, 3)
    out = add_at(base, rows, extra)
    reference = base.index_add(0, rows, extra.float())
    assert out.dtype == torch.float32 and torch.equal(out, reference)
    grads = torch.autograd.grad((out * weight).sum(), (base, extra))
    expected = torch.autograd.grad((reference * weight).sum(), (base, extra))
    assert all(torch.equal(g, e) for g, e in zip(grads, expected, strict=True))
