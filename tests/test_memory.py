"""A sparse step that splits the batch's tokens (``SATConfig.dense_tokens``) saves less for backward than the dense
step, within the activation-memory bound at every rate: the dense tokens' rows are written back without autograd
keeping a copy of them (``peft_sat.scatter``), and the omitted heads attend at the dense tokens' queries only
(``peft_sat.query_rows``).

Bound at rate r: dense x (1 - r x share x context) + 5% of dense, where share is the part of the dense step's
activations saved inside the blocks that omit units (what a rate can remove at most: r times it) and context the
share of the token positions that omit units (the others run the whole block).
"""

from __future__ import annotations

import pytest
import torch
from sat_testing import batch, sat_model

import peft_sat
from peft_sat.blocks.base import SATBlockMixin

SPLIT_MODES = {
    "defaults": {},  # dense loss tokens, sparse backward, context tokens forward only
    "paper+token-split": dict(
        omit=["mlp", "attention"], dense_tokens="loss", sparse_pass="forward_backward", context_tokens="sparse"
    ),
    "sparse-backward+token-split": dict(dense_tokens="loss", context_tokens="sparse"),
}


def saved_bytes(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Bytes of the tensors autograd saves for backward in one training forward (parameters excluded, each storage
    once), and the part of them first saved inside a block that omits units."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    blocks = [m for m in model.modules() if isinstance(m, SATBlockMixin) and m.sat_omits_units]
    storages: dict[int, tuple[int, bool]] = {}
    depth = [0]

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters and storage.data_ptr() not in storages:
            storages[storage.data_ptr()] = (storage.nbytes(), depth[0] > 0)
        return tensor

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = model(**inputs).loss
        del loss
    finally:
        for hook in hooks:
            hook.remove()
    return sum(n for n, _ in storages.values()), sum(n for n, inside in storages.values() if inside)


@pytest.mark.parametrize("stack", ["full", "lora"])
@pytest.mark.parametrize("mode", SPLIT_MODES)
def test_a_split_sparse_step_saves_within_the_activation_bound(mode, stack):
    model = sat_model(stack, peft_sat.SATConfig(**SPLIT_MODES[mode])).train()
    state = peft_sat.get_sat_state(model)
    inputs = batch(prompt=8, seq_len=32)  # context tokens, then tokens that carry loss
    state.set_omission_rate(0.0)
    dense, inside = saved_bytes(model, inputs)
    rows = state.dense_rows(inputs["labels"].shape)
    assert rows is not None and 0 < rows.numel() < inputs["labels"].numel(), "the batch must be split"
    context = 1 - rows.numel() / inputs["labels"].numel()
    for rate in (0.25, 0.5, 0.75):
        state.set_omission_rate(rate)
        sparse, _ = saved_bytes(model, inputs)
        bound = dense * (1 - rate * inside / dense * context) + 0.05 * dense
        assert sparse < min(dense, bound), f"{mode} / {stack} at r = {rate}: {sparse} bytes, dense {dense}"
