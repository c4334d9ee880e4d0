"""Odd and hostile inputs: each one either trains correctly (equal to the masked dense reference) or fails loudly;
never a silent wrong result."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel, get_peft_model
from sat_testing import (
    assert_matches_masked_reference,
    batch,
    build_stack,
    paper_config,
    sat_blocks,
    tiny_model,
    train_step,
)
from transformers.models.llama.modeling_llama import LlamaMLP

import peft_sat


def _full_stack(**config):
    return build_stack("full", "llama", "sdpa", paper_config(omission_rate=0.5, **config))


def test_all_padding_batch_does_not_crash_and_matches_reference():
    models = _full_stack()
    inputs = batch()
    inputs["attention_mask"][0] = 0  # one row of pure padding: scores fall back to the other row
    inputs["labels"][0] = -100
    assert_matches_masked_reference(models.sat, models.reference, inputs)

    inputs["attention_mask"][:] = 0  # nothing but padding: scores fall back to all tokens, never NaN
    models.sat.zero_grad()
    models.sat(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits.sum().backward()
    assert all(block.sat_last_kept.numel() > 0 for _, block in sat_blocks(models.sat))


@pytest.mark.parametrize("seq_len", [1, 2])
def test_length_one_sequences(seq_len):
    models = _full_stack()
    inputs = {
        "input_ids": torch.randint(0, 128, (3, seq_len)),
        "attention_mask": torch.ones(3, seq_len, dtype=torch.long),
    }
    inputs["labels"] = inputs["input_ids"].clone()
    if seq_len == 1:  # no next token to predict: train on the logits instead of a (NaN) empty loss
        for model in (models.sat, models.reference):
            model.forward = _sum_of_logits(model)
    assert_matches_masked_reference(models.sat, models.reference, inputs)


def _sum_of_logits(model):
    forward = model.forward

    def wrapped(**inputs):
        inputs.pop("labels")
        output = forward(**inputs)
        output.loss = output.logits.float().pow(2).mean()
        return output

    return wrapped


def test_fewer_tokens_than_kept_units():
    models = _full_stack(score_tokens=256)
    inputs = batch(batch_size=1, seq_len=3, pad=0)  # 3 tokens, 64 kept MLP channels
    assert_matches_masked_reference(models.sat, models.reference, inputs)


def test_long_sequences():
    models = build_stack("full", "llama", "sdpa", paper_config(omission_rate=0.5))
    for model in (models.sat, models.reference):
        model.config.max_position_embeddings = 1024
    inputs = batch(batch_size=1, seq_len=1024, pad=0)
    assert_matches_masked_reference(models.sat, models.reference, inputs, atol=2e-5)


def test_non_finite_activations_behave_like_dense_training():
    models = _full_stack()
    for model in (models.sat, models.reference):
        with torch.no_grad():
            peft_sat.model._transformers_model(model).model.embed_tokens.weight[7] = float("inf")
    inputs = batch()
    inputs["input_ids"][1, 3] = 7
    sat_loss = train_step(models.sat, inputs)  # selection must not crash on inf / NaN scores
    dense_loss = train_step(models.reference, inputs)
    assert not torch.isfinite(sat_loss) and not torch.isfinite(dense_loss)  # exactly what dense training does


def test_layers_of_different_sizes():
    models = _full_stack()
    for model in (models.sat, models.reference):
        inner = peft_sat.model._transformers_model(model)
        config = copy.deepcopy(inner.config)
        config.intermediate_size = 64
        torch.manual_seed(3)
        inner.model.layers[1].mlp = LlamaMLP(config)
    peft_sat.apply_sat(models.sat, paper_config(omission_rate=0.5))  # re-apply: picks up the new block
    assert [b.sat_num_units for _, b in sat_blocks(models.sat) if hasattr(b, "gate_proj")] == [128, 64]
    assert_matches_masked_reference(models.sat, models.reference, batch())


def test_removing_sat_mid_training_continues_dense():
    model = get_peft_model(tiny_model(), paper_config(omission_rate=0.5)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_step(model, batch(seed=1))
    optimizer.step()
    plain = model.unload()
    reference = copy.deepcopy(plain)
    torch.testing.assert_close(train_step(plain, batch(seed=2)), train_step(reference, batch(seed=2)), rtol=0, atol=0)
    optimizer.step()  # the optimizer still holds the same parameters
    assert sat_blocks(plain) == []


def test_checkpoint_trained_with_another_rate_loads_and_trains(tmp_path):
    sat = get_peft_model(tiny_model(), paper_config(omission_rate=0.5))
    sat.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True).train()
    state = peft_sat.get_sat_state(loaded)
    assert state.omission_rate == 0.5
    state.set_omission_rate(0.25)
    assert torch.isfinite(train_step(loaded, batch()))
    # 3 of 4 KV groups = 6 of 8 query heads; 96 of 128 channels
    assert sorted({b.sat_last_kept.numel() for _, b in sat_blocks(loaded)}) == [6, 96]


def test_bad_rate_at_run_time_is_rejected():
    state = peft_sat.get_sat_state(get_peft_model(tiny_model(), paper_config()))
    with pytest.raises(ValueError, match=r"`omission_rate` must be in \[0, 1\), got 1.0"):
        state.set_omission_rate(1.0)
