"""A sparse block's projections save the norm's input h instead of the block's input x = norm(h), and recompute x in
backward (``peft_sat.norm_input``): the same step bit for bit, one input-sized tensor less per sparse block."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sat_testing import PAPER_MODES, batch, build_stack, gradients, omitting_blocks, train_step
from transformers.models.llama.modeling_llama import LlamaRMSNorm

import peft_sat
from peft_sat import norm_input

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _timing import activation_bytes  # noqa: E402

MODES = {
    "paper": PAPER_MODES,
    "sparse-backward": dict(PAPER_MODES, sparse_pass="backward"),
    "weight-grad": dict(PAPER_MODES, sparse_pass="weight_grad"),
}


@contextlib.contextmanager
def _saving_x(monkeypatch):
    """The blocks save x itself (the path without recomputation), for the comparison."""
    with monkeypatch.context() as patch:
        patch.setattr(norm_input, "recomputable", lambda x, state: contextlib.nullcontext())
        yield


def _recomputations(monkeypatch) -> list[int]:
    calls, recompute = [], norm_input.NormInput.recompute

    def counted(self, h):
        calls.append(1)
        return recompute(self, h)

    monkeypatch.setattr(norm_input.NormInput, "recompute", counted)
    return calls


# Left out: Phi3 under LoRA (`lora_config()` targets no fused projection, whose frozen base then saves no x) and
# "weight_grad" on 4-bit bases (their LoRA layers run their own forward, which saves x).
STACKS = [
    ("full", "llama"),
    ("full", "gemma"),
    ("full", "phi3"),
    ("lora", "llama"),
    ("lora", "gemma"),
    ("qlora", "llama"),
]
CASES = [(mode, *stack) for mode in MODES for stack in STACKS if (mode, stack[0]) != ("weight-grad", "qlora")]


@pytest.mark.parametrize("mode, stack, family", CASES)
def test_recomputing_the_block_input_gives_the_same_step(mode, stack, family, monkeypatch, tmp_path):
    def step(model) -> tuple[torch.Tensor, dict]:
        return train_step(model, inputs), gradients(model)

    config = dict(omission_rate=0.5, **MODES[mode])
    models = [  # identical
        build_stack(stack, family, "sdpa", peft_sat.SATConfig(**config), tmp_path / str(i)).sat for i in range(2)
    ]
    inputs = batch()
    calls = _recomputations(monkeypatch)
    loss, grads = step(models[0])
    assert calls, "no block recomputed its input"
    with _saving_x(monkeypatch):
        reference_loss, reference = step(models[1])
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference.keys() and grads
    for name, grad in reference.items():
        assert torch.equal(grads[name], grad), name


@pytest.mark.parametrize("stack", ["full", "lora"])
@pytest.mark.parametrize("mode", ["paper", "sparse-backward"])
def test_each_sparse_block_saves_one_input_less(mode, stack, monkeypatch):
    model = build_stack(stack, "llama", "sdpa", peft_sat.SATConfig(omission_rate=0.5, **MODES[mode])).sat
    inputs = batch()
    blocks = omitting_blocks(model)
    recomputed, _ = activation_bytes(model, lambda: model(**inputs).loss, blocks)
    with _saving_x(monkeypatch):
        saved_x, _ = activation_bytes(model, lambda: model(**inputs).loss, blocks)
    hidden = model.get_base_model().config.hidden_size
    x_bytes = inputs["input_ids"].numel() * hidden * 4
    # Under LoRA the first layer's norm reads the frozen embeddings, keeps nothing, and its attention saves x.
    swapped = len(blocks) - (stack == "lora")
    assert saved_x - recomputed == swapped * x_bytes


def test_a_16_bit_norm_input_is_saved_as_before(monkeypatch):
    """A norm keeps an fp32 copy of a 16-bit input, not the input: holding h would cost what x costs."""
    model = build_stack("full", "llama", "sdpa", peft_sat.SATConfig(omission_rate=0.5, **PAPER_MODES)).sat
    model.to(torch.bfloat16)
    inputs = batch()
    blocks = omitting_blocks(model)
    calls = _recomputations(monkeypatch)
    recomputed, _ = activation_bytes(model, lambda: model(**inputs).loss, blocks)
    with _saving_x(monkeypatch):
        saved_x, _ = activation_bytes(model, lambda: model(**inputs).loss, blocks)
    train_step(model, inputs)
    assert recomputed == saved_x and not calls


def test_gradient_checkpointing_recomputes_the_same_step(monkeypatch):
    config = peft_sat.SATConfig(omission_rate=0.5, **PAPER_MODES)
    reference, model = [build_stack("full", "llama", "sdpa", config).sat for _ in range(2)]  # identical
    inputs = batch()
    with _saving_x(monkeypatch):
        loss = train_step(reference, inputs)
    grads = gradients(reference)
    model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    calls = _recomputations(monkeypatch)
    assert torch.equal(train_step(model, inputs), loss)
    assert calls
    for name, grad in gradients(model).items():
        assert torch.equal(grad, grads[name]), name


def test_norm_hooks_come_and_go_with_sat():
    model = build_stack("full", "llama", "sdpa", peft_sat.SATConfig(**PAPER_MODES)).sat
    norms = [m for name, m in model.named_modules() if name.endswith(("input_layernorm", "post_attention_layernorm"))]
    assert norms and all(len(norm._forward_hooks) == 1 for norm in norms)
    peft_sat.remove_sat(model)
    assert all(not norm._forward_hooks for norm in norms)


def test_a_block_input_changed_in_place_is_saved_as_it_is(monkeypatch):
    """norm(h) would no longer give x: the projections save x itself."""
    model = build_stack("full", "llama", "sdpa", peft_sat.SATConfig(omission_rate=0.5, **PAPER_MODES)).sat

    def double_the_input(module, args, kwargs) -> None:
        (args[0] if args else kwargs["hidden_states"]).mul_(2.0)

    blocks = omitting_blocks(model)
    handles = [block.register_forward_pre_hook(double_the_input, with_kwargs=True) for block in blocks]
    calls = _recomputations(monkeypatch)
    inputs = batch()
    changed, _ = activation_bytes(model, lambda: model(**inputs).loss, blocks)
    with _saving_x(monkeypatch):
        saved_x, _ = activation_bytes(model, lambda: model(**inputs).loss, blocks)
    train_step(model, inputs)
    for handle in handles:
        handle.remove()
    assert changed == saved_x and not calls


@pytest.mark.parametrize("stack", ["full", "lora"])
def test_split_blocks_take_their_dense_rows_from_their_norm_on_those_rows(stack, monkeypatch):
    """SFT's split (the defaults on prompt / completion batches): a block's dense rows are its norm run on those rows
    (``norm_input.rows_input``), the same step as copies of the rows of the norm's output; the norm's graph over
    every row, which no gradient reaches any more, is freed with the norm's output: per norm, its float32 input
    and, where its weight trains, its normalized rows are held for the n dense rows instead of all N."""
    models = [build_stack(stack, "llama", "sdpa", peft_sat.SATConfig(omission_rate=0.5)).sat for _ in range(2)]
    inputs = batch(prompt=8)
    dense_rows = []
    for module in models[0].modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.register_forward_hook(
                lambda _, args, __: dense_rows.append(args[0].shape[0]) if args[0].dim() == 2 else None
            )
    loss, grads = train_step(models[0], inputs), gradients(models[0])
    # Under LoRA the first layer's norm reads the frozen embeddings (no graph to shorten): it gives a copy.
    norms = 4 - (stack == "lora")
    assert len(dense_rows) == norms and len(set(dense_rows)) == 1
    held, _ = activation_bytes(models[0], lambda: models[0](**inputs).loss)
    with monkeypatch.context() as patch:
        patch.setattr(norm_input, "rows_input", lambda x, rows, _: x.reshape(-1, x.shape[-1]).index_select(0, rows))
        reference_loss, reference = train_step(models[1], inputs), gradients(models[1])
        held_copies, _ = activation_bytes(models[1], lambda: models[1](**inputs).loss)
    assert torch.equal(loss, reference_loss)
    assert grads.keys() == reference.keys() and grads
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=1e-6, msg=name)
    num_rows, hidden = inputs["input_ids"].numel(), models[0].get_base_model().config.hidden_size
    per_row = 4 * hidden * (1 + (stack == "full")) + 4  # float32 input (and normalized rows), 1 / rms
    assert held_copies - held == norms * (num_rows - dense_rows[0]) * per_row


def test_the_dense_rows_come_from_the_norm_only_while_its_input_and_output_are_unchanged():
    """``rows_input``: the norm on the rows (the same values as the rows of its output) right after the norm; a copy
    of the rows once the norm's input or output changed in place, or for an input no norm returned."""
    torch.manual_seed(0)
    state = SimpleNamespace(enabled=True, omission_rate=0.5, zero3_registrations=[], last_norm_call=None)
    norm = LlamaRMSNorm(8)
    norm.weight.data.normal_()
    norm.register_forward_hook(norm_input._NormRecorder(state))
    rows = torch.tensor([0, 3, 4])
    for change in (None, "input", "output", "other"):
        h = torch.randn(2, 3, 8, requires_grad=True) * 1.0
        x = norm(h)
        if change == "input":
            h.mul_(1.0)
        elif change == "output":
            x.mul_(1.0)
        block_input = torch.randn(2, 3, 8, requires_grad=True) * 1.0 if change == "other" else x
        x_rows = norm_input.rows_input(block_input, rows, state)
        assert torch.equal(x_rows, block_input.reshape(-1, 8).index_select(0, rows))
        names = {type(node).__name__ for node in (x_rows.grad_fn, *(n for n, _ in x_rows.grad_fn.next_functions))}
        assert ("IndexSelectBackward0" in names) == (change is not None), change
        assert state.last_norm_call.output() is x, "the recomputation is not recorded as the latest norm call"


@pytest.mark.parametrize("stack", ["full", "lora"])
def test_rows_of_the_block_input_are_saved_as_the_norm_input(stack, monkeypatch):
    """The paper's mode on a split batch projects the omitted heads' queries at the dense rows only, from rows of the
    block input (``norm_input.rows_of``): its projections save the norm's input, as those of the whole input do, so
    the step saves no byte more than projecting every row, and computes the same gradients."""
    config = peft_sat.SATConfig(omission_rate=0.5, importance="magnitude", **dict(PAPER_MODES, dense_tokens="loss"))
    model = build_stack(stack, "llama", "sdpa", config).sat
    inputs = batch(prompt=8, seq_len=32)
    blocks = omitting_blocks(model)
    views = []
    rows_of = norm_input.rows_of
    monkeypatch.setattr(norm_input, "rows_of", lambda x, rows: views.append(rows_of(x, rows)) or views[-1])
    at_rows, _ = activation_bytes(model, lambda: model(**inputs).loss, blocks)
    loss, grads = train_step(model, inputs), gradients(model)
    # layer 0 under LoRA reads frozen embeddings: not recomputable, its queries run on every row
    assert sum(view is not None for view in views) == 2 * (2 - (stack == "lora"))  # two forwards of two layers
    monkeypatch.setattr(norm_input, "rows_of", lambda x, rows: None)  # every row, as without the split
    every_row, _ = activation_bytes(model, lambda: model(**inputs).loss, blocks)
    reference_loss, reference = train_step(model, inputs), gradients(model)
    assert at_rows <= every_row
    torch.testing.assert_close(loss, reference_loss)
    for name, grad in reference.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("stack", ["full", "lora"])
def test_rows_of_the_attention_output_are_saved_as_the_kernel_output(stack, monkeypatch):
    """The omitted heads' o-projection on a split batch runs at the dense rows' query slots only, the padding slots
    left out; on a CPU it saves the attention kernel's output, which the kernel keeps for its own backward, instead
    of a copy of those rows (``norm_input.rows_of_kept``): fewer bytes than the copy, the same gradients."""
    config = peft_sat.SATConfig(omission_rate=0.5, importance="magnitude", **dict(PAPER_MODES, dense_tokens="loss"))
    model = build_stack(stack, "llama", "sdpa", config).sat
    inputs = batch(prompt=8, seq_len=32)  # left padding on the first row: its sequence has fewer dense rows
    blocks = omitting_blocks(model)
    kept, _ = activation_bytes(model, lambda: model(**inputs).loss, blocks)
    loss, grads = train_step(model, inputs), gradients(model)
    monkeypatch.setattr(norm_input, "rows_of_kept", lambda tensor, rows: tensor.reshape(-1, tensor.shape[-1])[rows])
    copied, _ = activation_bytes(model, lambda: model(**inputs).loss, blocks)
    reference_loss, reference = train_step(model, inputs), gradients(model)
    assert kept < copied
    assert torch.equal(loss, reference_loss)
    for name, grad in reference.items():
        assert torch.equal(grads[name], grad), name
