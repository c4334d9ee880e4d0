"""Gradient checkpointing re-runs layer forwards inside backward: the re-run must select the same units, so the
gradients equal those of the same step without checkpointing."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from sat_testing import batch, gradients, paper_config, sat_model, tiny_model, train_step

import peft_sat

MODES = {
    "paper": {},
    "token-split": dict(dense_tokens="loss"),
    "sparse-backward": dict(sparse_pass="backward", importance="maxip", selection="topk"),
    "sparse-backward+token-split": dict(sparse_pass="backward", dense_tokens="auto", omit=["mlp"]),
    "weight-grad": dict(sparse_pass="weight_grad", importance="maxip", selection="topk"),
    "context-forward-only": dict(dense_tokens="auto", context_tokens="forward_only"),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("stack", ["full", "lora"])
def test_checkpointed_step_equals_plain_step(stack, use_reentrant, mode):
    # "sampling" and "uniform" draw random numbers: a re-run that re-selected would pick other units. The sparse
    # backward's "maxip" scores come from the forward's own activations, which the re-run recomputes.
    settings = {"importance": "uniform", "selection": "sampling", **MODES[mode]}
    config = paper_config(omission_rate=0.5, seed=5, **settings)
    model = sat_model(stack, config)
    checkpointed = copy.deepcopy(model)
    checkpointed.get_base_model().gradient_checkpointing_enable({"use_reentrant": use_reentrant})
    if use_reentrant:
        checkpointed.get_base_model().enable_input_require_grads()
    plain, checkpointed = model.train(), checkpointed.train()
    assert peft_sat.get_sat_state(checkpointed) is not peft_sat.get_sat_state(plain)

    inputs = batch(prompt=8)  # context tokens, then tokens that carry loss
    plain_loss = train_step(plain, inputs)
    checkpointed_loss = train_step(checkpointed, inputs)
    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=0, atol=1e-6)
    plain_grads, checkpointed_grads = gradients(plain), gradients(checkpointed)
    assert plain_grads.keys() == checkpointed_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, rtol=0, atol=1e-6, msg=name)


def test_selection_is_refreshed_every_model_forward():
    config = paper_config(omission_rate=0.5, importance="uniform", selection="sampling")
    model = get_peft_model(tiny_model(), config).train()
    mlp = model.get_base_model().model.layers[0].mlp
    seen = set()
    for _ in range(6):
        model(**batch())
        seen.add(tuple(mlp.sat_last_kept.tolist()))
    assert len(seen) > 1, "a new random sub-network must be drawn each forward"
