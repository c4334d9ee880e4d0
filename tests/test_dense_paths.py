"""Where SAT must be invisible: rate 0, eval mode, disabled adapters, removal. Exact equality, not closeness."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from sat_testing import FAMILIES, batch, inner, lora_config, paper_config, sat_blocks, tiny_model
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

import peft_sat


def _logits(model, inputs):
    return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_rate_zero_and_eval_equal_the_original_model_exactly(family):
    original = tiny_model(family)
    sat = get_peft_model(copy.deepcopy(original), paper_config(omission_rate=0.5))
    inputs = batch()

    sat.eval()
    original.eval()
    assert torch.equal(_logits(sat, inputs), _logits(original, inputs)), "eval mode must be dense"

    sat.train()
    original.train()
    peft_sat.get_sat_state(sat).set_omission_rate(0.0)
    assert torch.equal(_logits(sat, inputs), _logits(original, inputs)), "rate 0 must be dense"

    peft_sat.get_sat_state(sat).set_omission_rate(0.5)
    assert not torch.equal(_logits(sat, inputs), _logits(original, inputs)), "rate 0.5 must omit units"


def test_sat_disabled_and_disable_adapter_layers_run_dense():
    original = tiny_model().train()
    sat = get_peft_model(copy.deepcopy(original), paper_config(omission_rate=0.5)).train()
    inputs = batch()
    with peft_sat.sat_disabled(sat):
        assert torch.equal(_logits(sat, inputs), _logits(original, inputs))
    assert not torch.equal(_logits(sat, inputs), _logits(original, inputs))
    sat.base_model.disable_adapter_layers()  # PEFT's tuner API reaches the same switch
    assert torch.equal(_logits(sat, inputs), _logits(original, inputs))
    sat.base_model.enable_adapter_layers()
    assert not torch.equal(_logits(sat, inputs), _logits(original, inputs))


def test_disable_adapter_context_runs_dense_then_sparse_again():
    """``PeftModel.disable_adapter()`` (TRL's reference-model path) on full-parameter SAT, in training mode."""
    original = tiny_model().train()
    sat = get_peft_model(copy.deepcopy(original), paper_config(omission_rate=0.5)).train()
    inputs = batch()
    dense = _logits(original, inputs)
    with sat.disable_adapter():
        assert torch.equal(_logits(sat, inputs), dense)
        assert sat.get_model_status().enabled is False
    assert not torch.equal(_logits(sat, inputs), dense), "sparse again after the context"
    assert sat.get_model_status().enabled is True
    assert "sat_switch" not in str(list(sat.state_dict())) and sat_blocks(sat)  # a switch, not a weight holder

    with peft_sat.sat_disabled(sat):  # SAT already off: the context leaves it off
        with sat.disable_adapter():
            assert torch.equal(_logits(sat, inputs), dense)
        assert torch.equal(_logits(sat, inputs), dense)
    assert not torch.equal(_logits(sat, inputs), dense)


def test_generate_in_eval_equals_original():
    original = tiny_model().eval()
    sat = get_peft_model(copy.deepcopy(original), paper_config(omission_rate=0.5)).eval()
    prompt = batch()["input_ids"][1:, :6]
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(sat.generate(input_ids=prompt, **kwargs), original.generate(input_ids=prompt, **kwargs))


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_in_training_mode_equals_eval_mode(family):
    """TRL's GRPO / RLOO trainers and sampling callbacks generate with the model in training mode: any forward with
    a KV cache runs dense, and the training forwards around it stay sparse."""
    sat = get_peft_model(tiny_model(family), paper_config(omission_rate=0.5))
    prompt = batch()["input_ids"][1:, :6]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    expected = sat.eval().generate(input_ids=prompt, **kwargs)
    inputs = batch()
    sat.train()
    dense_logits = _logits(sat.eval(), inputs)
    sat.train()
    assert torch.equal(sat.generate(input_ids=prompt, **kwargs), expected)
    assert not torch.equal(_logits(sat, inputs), dense_logits), "training forwards after generate must be sparse"
    assert torch.equal(sat.generate(input_ids=prompt, use_cache=True, **kwargs), expected)


def test_remove_sat_restores_classes_and_outputs():
    original = tiny_model().train()
    lora = get_peft_model(copy.deepcopy(original), lora_config())
    reference = copy.deepcopy(lora)
    peft_sat.apply_sat(lora, paper_config(omission_rate=0.5))
    assert len(sat_blocks(lora)) == 4
    peft_sat.remove_sat(lora)
    assert sat_blocks(lora) == [] and peft_sat.get_sat_state(lora) is None
    layer = inner(lora).model.layers[0]
    assert type(layer.mlp) is LlamaMLP and type(layer.self_attn) is LlamaAttention
    inputs = batch()
    assert torch.equal(_logits(lora, inputs), _logits(reference, inputs))
    assert not inner(lora)._forward_pre_hooks, "the batch hook must be removed"


def test_apply_sat_twice_is_idempotent():
    model = tiny_model()
    peft_sat.apply_sat(model, paper_config(omission_rate=0.5))
    peft_sat.apply_sat(model, paper_config(omission_rate=0.25))
    assert len(sat_blocks(model)) == 4
    assert peft_sat.get_sat_state(model).omission_rate == 0.25
    assert len(model._forward_pre_hooks) == 1
    assert type(model.model.layers[0].mlp).__mro__.count(LlamaMLP) == 1
