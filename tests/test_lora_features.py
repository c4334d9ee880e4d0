"""SAT under every LoRA feature the sliced path mirrors: scaling, rslora, lora_bias, several adapters, merged and
disabled adapters; DoRA falls back to an exact dense projection with a warning."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from sat_testing import (
    assert_matches_masked_reference,
    batch,
    lora_config,
    omitted_slices,
    paper_config,
    sat_blocks,
    tiny_model,
)

import peft_sat


def _pair(model):
    reference = copy.deepcopy(model).train()
    return peft_sat.apply_sat(model, paper_config(omission_rate=0.5)).train(), reference


@pytest.mark.parametrize(
    "overrides", [dict(lora_alpha=32), dict(use_rslora=True), dict(lora_bias=True)], ids=["alpha", "rslora", "bias"]
)
def test_lora_options(overrides):
    model = get_peft_model(tiny_model("qwen2"), lora_config(**overrides))
    if overrides.get("lora_bias"):
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name and name.endswith("bias"):
                    param.normal_()
    assert_matches_masked_reference(*_pair(model), batch())


def test_several_active_adapters():
    model = get_peft_model(tiny_model(), lora_config(), adapter_name="first")
    model.add_adapter("second", lora_config(r=2))
    model.base_model.set_adapter(["first", "second"])
    sat, reference = _pair(model)
    assert_matches_masked_reference(sat, reference, batch())
    assert any("second" in n and p.grad is not None for n, p in sat.named_parameters())


def test_merged_adapter_uses_the_merged_base_weight():
    model = get_peft_model(tiny_model(), lora_config())
    model.merge_adapter()
    sat, reference = _pair(model)
    for param in list(sat.parameters()) + list(reference.parameters()):
        param.requires_grad_(True)  # something must train for gradients to compare
    assert_matches_masked_reference(sat, reference, batch())


def test_disabled_adapters_run_the_base_only():
    model = get_peft_model(tiny_model(), lora_config())
    sat, reference = _pair(model)
    with sat.disable_adapter(), reference.disable_adapter():
        for param in list(sat.parameters()) + list(reference.parameters()):
            param.requires_grad_(True)
        assert_matches_masked_reference(sat, reference, batch())


def test_dora_falls_back_to_exact_dense_projection_with_warning():
    model = get_peft_model(tiny_model(), lora_config(use_dora=True))
    sat, reference = _pair(model)
    with pytest.warns(UserWarning, match="LoRA variant"):
        assert_matches_masked_reference(sat, reference, batch())


def test_dropout_trains_and_keeps_omitted_gradients_zero():
    model = get_peft_model(tiny_model(), lora_config(lora_dropout=0.3))
    sat, _ = _pair(model)
    loss = sat(**batch()).loss
    loss.backward()
    assert torch.isfinite(loss)
    for _, block in sat_blocks(sat):
        for label, weight, dim, omitted in omitted_slices(block):
            assert torch.count_nonzero(weight.grad.index_select(dim, omitted)) == 0, label
