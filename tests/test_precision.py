"""Gradient accumulation and mixed precision: still the masked dense reference (looser tolerance under bf16/fp16)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from sat_testing import batch, build_stack, context_cut, gradients, masked, paper_config, unit_masks

import peft_sat


@pytest.mark.parametrize("stack", ["full", "lora"])
def test_gradient_accumulation_over_micro_batches_with_different_sub_networks(stack):
    config = paper_config(omission_rate=0.5, importance="uniform", seed=1)
    models = build_stack(stack, "qwen3", "sdpa", config)
    selections = []
    for micro_batch in range(3):
        inputs = batch(seed=micro_batch)
        (models.sat(**inputs).loss / 3).backward()
        masks = unit_masks(models.sat)
        selections.append(
            tuple(m.grad.sum().item() for m in masks.values()) + tuple(masks["model.layers.0.mlp"].grad.tolist())
        )
        with masked(models.reference, masks):
            (models.reference(**inputs).loss / 3).backward()
    assert len(set(selections)) > 1, "each micro-batch should draw its own sub-network"
    for name, grad in gradients(models.reference).items():
        torch.testing.assert_close(gradients(models.sat)[name], grad, rtol=0, atol=1e-5, msg=name)


SPLITS = {
    "no-split": {},
    "context-forward-only": dict(dense_tokens="auto", context_tokens="forward_only", sparse_pass="weight_grad"),
    "token-split": dict(dense_tokens="loss"),
}


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("stack", ["full", "lora"])
def test_autocast(stack, dtype, split):
    """Under autocast (fp32 weights, 16-bit compute), with and without a token split: the masked reference."""
    config = paper_config(omission_rate=0.5, **SPLITS[split])
    models = build_stack(stack, "llama", "sdpa", config)
    inputs = batch(prompt=8 if SPLITS[split] else 0)
    with torch.autocast("cpu", dtype=dtype):
        sat_loss = models.sat(**inputs).loss
    sat_loss.backward()
    rows = peft_sat.get_sat_state(models.sat).dense_rows(inputs["labels"].shape)
    assert (rows is not None) == bool(SPLITS[split])
    cut = config.context_tokens == "forward_only" and rows is not None
    masks = {} if cut else unit_masks(models.sat)
    with masked(models.reference, masks), context_cut(models.reference, rows) if cut else contextlib.nullcontext():
        with torch.autocast("cpu", dtype=dtype):
            reference_loss = models.reference(**inputs).loss
        reference_loss.backward()
    # Sliced and masked matmuls round differently in 16 bits: compare at that precision.
    torch.testing.assert_close(sat_loss, reference_loss, rtol=1e-2, atol=1e-2)
    sat_grads, reference_grads = gradients(models.sat), gradients(models.reference)
    for name, grad in reference_grads.items():
        scale = grad.abs().max().clamp_min(1e-6)
        error = (sat_grads[name] - grad).abs().max() / scale
        assert error < 5e-2, f"{name}: relative error {error:.3g}"
