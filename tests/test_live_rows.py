"""A split step with context tokens forward only skips the rows after each sequence's last dense position
(``peft_sat.tokens.LiveRows``): they carry no loss and, attention being causal, feed no position that does. The MLP
runs on the live rows only, and the step equals the reference."""

from __future__ import annotations

import pytest
import torch
from sat_testing import assert_matches_masked_reference, build_stack

import peft_sat
from peft_sat.blocks import SATMLPMixin
from peft_sat.tokens import live_rows


def test_live_rows_are_each_sequences_positions_up_to_its_last_dense_one():
    generator = torch.Generator().manual_seed(0)
    for batch, seq in [(3, 7), (4, 16), (2, 5)]:
        dense = torch.rand(batch, seq, generator=generator) < 0.3
        dense[0] = False  # a sequence without dense positions: all of it trails
        dense[-1, -1] = False
        dense[-1, 1] = True
        rows = dense.reshape(-1).nonzero().squeeze(1)
        live = live_rows(rows, batch, seq)
        expected = [b * seq + t for b in range(batch) for t in range(seq) if dense[b, t:].any()]
        assert live.rows.tolist() == expected
        assert torch.equal(live.rows[live.dense], rows)
        assert sorted(live.dense.tolist() + live.context.tolist()) == list(range(len(expected)))
        assert sorted(live.rows.tolist() + live.trailing.tolist()) == list(range(batch * seq))
        assert live.size == batch * seq
    assert live_rows(torch.tensor([3, 7]), batch=2, seq=4) is None  # every sequence's last position is dense


def test_placed_live_rows_keep_their_values_and_gradient_and_the_trailing_rows_are_zero():
    live = live_rows(torch.tensor([1, 2, 5]), batch=2, seq=4)
    x = torch.randn(8, 3, requires_grad=True)
    y = live.place(live.gather(x) * 2)
    assert torch.equal(y[live.rows], 2 * x[live.rows]) and not y[live.trailing].any()
    y.sum().backward()
    assert torch.equal(x.grad[live.rows], torch.full((5, 3), 2.0)) and not x.grad[live.trailing].any()


def sft_batch() -> dict[str, torch.Tensor]:
    """Right-padded prompt / completion rows: lengths 20, 14 and 9 of 20; the second ends with a prompt of its own
    after its completion (trailing real tokens)."""
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(0, 64, (3, 20), generator=generator)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for row, (length, prompt, completion_end) in enumerate([(20, 6, 20), (14, 4, 11), (9, 3, 9)]):
        attention_mask[row, :length] = 1
        labels[row, prompt:completion_end] = input_ids[row, prompt:completion_end]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize(
    "stack, family, attn",
    [("full", "llama", "sdpa"), ("lora", "llama", "eager"), ("lora", "qwen2", "sdpa"), ("lora", "phi3", "sdpa")],
)
def test_a_right_padded_batch_trains_as_the_reference_with_the_mlp_on_the_live_rows(stack, family, attn):
    models = build_stack(stack, family, attn, peft_sat.SATConfig(omission_rate=0.5))  # the defaults: forward only
    inputs = sft_batch()
    outputs = _train_step_recording_mlp_outputs(models, inputs)
    state = peft_sat.get_sat_state(models.sat)
    live = state.live_rows(inputs["labels"].shape)
    # rows 0: 19 live (its last position predicts nothing), 1: 10 (up to the completion's last label), 2: 8
    assert live.rows.numel() == 19 + 10 + 8 and state.live_fractions == [37 / 60]
    for output in outputs:
        flat = output.reshape(-1, output.shape[-1])
        assert not flat[live.trailing].any() and flat[live.rows].abs().sum(-1).gt(0).all()


@pytest.mark.parametrize("unpadded", [False, True])
def test_bidirectional_attention_computes_every_row(unpadded):
    """Gemma3 with ``use_bidirectional_attention``: earlier positions read later ones, so no row may be skipped; the
    split step still equals the reference (skipping the trailing rows changed its loss by 1e-3)."""
    config = peft_sat.SATConfig(omission_rate=0.5)
    models = build_stack("lora", "gemma3_text", "sdpa", config, use_bidirectional_attention=True)
    inputs = sft_batch()
    if unpadded:  # no padding: the model may pass no mask at all
        inputs = {key: value[:1] for key, value in inputs.items()}
    state = peft_sat.get_sat_state(models.sat)
    assert not state.causal_attention
    outputs = _train_step_recording_mlp_outputs(models, inputs)
    assert state.live_rows(inputs["labels"].shape) is None and not state.live_fractions
    rows = state.dense_rows(inputs["labels"].shape)
    assert rows is not None and rows.numel() < inputs["labels"].numel()
    assert all(output.reshape(-1, output.shape[-1]).abs().sum(-1).gt(0).all() for output in outputs)


def _train_step_recording_mlp_outputs(models, inputs: dict) -> list[torch.Tensor]:
    """One step of ``models.sat`` checked against the reference; the outputs of its MLP blocks, in order."""
    outputs = []
    mlps = [m for m in models.sat.modules() if isinstance(m, SATMLPMixin)]
    hooks = [m.register_forward_hook(lambda _, args, out: outputs.append(out.detach())) for m in mlps]
    try:
        assert_matches_masked_reference(models.sat, models.reference, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(outputs) == len(mlps)
    return outputs
