"""GPU checks (skipped without CUDA): the CPU suite's invariants where the code takes other paths on a GPU.

- the masked dense reference in fp32 and bf16 on CUDA kernels (cuBLAS, SDPA's CUDA backends);
- ``peft_sat.ops`` re-gathers the kept weight in backward on accelerators (``REGATHER_DEVICES``) instead of saving
  the gathered copy as on CPU: same gradients, and no gathered copy saved;
- bitsandbytes 4-bit QLoRA with its CUDA kernels (the CPU suite runs bitsandbytes' CPU backend);
- ``torch.compile`` with the default inductor backend (Triton kernels; the CPU suite uses ``aot_eager``).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from sat_testing import (
    assert_matches_masked_reference,
    batch,
    build_stack,
    gradients,
    lora_config,
    masked,
    omitted_slices,
    paper_config,
    quantize_4bit,
    sat_blocks,
    tiny_model,
    train_step,
    unit_masks,
)

import peft_sat
from peft_sat import ops

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"
)

DEVICE = "cuda"


def _cuda_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    return {k: v.to(DEVICE) for k, v in batch(seed=seed).items()}


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 comparisons at 1e-5 need true fp32 matmuls (TF32 rounds to 10 mantissa bits)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


@pytest.mark.parametrize("granularity", ["kv_group", "q_head"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("stack", ["full", "lora"])
def test_fp32_equals_masked_dense_reference_on_cuda(stack, attn, granularity):
    config = paper_config(omission_rate=0.5, head_granularity=granularity)
    models = build_stack(stack, "llama", attn, config)
    sat, reference = models.sat.to(DEVICE), models.reference.to(DEVICE)
    inputs = _cuda_inputs()
    # CUDA kernels (SDPA's memory-efficient backend in particular) order their sums by problem size, so a sliced
    # product and a masked one may differ in the last bits: 1e-4 rather than the CPU suite's 1e-5.
    assert_matches_masked_reference(sat, reference, inputs, atol=1e-4)
    for name, block in sat_blocks(sat):
        for label, weight, dim, omitted in omitted_slices(block):
            grad = weight.grad.index_select(dim, omitted.to(DEVICE))
            assert torch.count_nonzero(grad) == 0, f"{name}.{label}: omitted units got gradient"


@pytest.mark.parametrize("stack", ["full", "lora"])
def test_bf16_weights_match_masked_dense_reference_on_cuda(stack):
    models = build_stack(stack, "llama", "sdpa", paper_config(omission_rate=0.5))
    sat = models.sat.to(DEVICE, torch.bfloat16)
    reference = models.reference.to(DEVICE, torch.bfloat16)
    inputs = _cuda_inputs()
    sat_loss = train_step(sat, inputs)
    with masked(reference, unit_masks(sat)):
        reference_loss = train_step(reference, inputs)
    torch.testing.assert_close(sat_loss.float(), reference_loss.float(), rtol=1e-2, atol=1e-2)
    sat_grads, reference_grads = gradients(sat), gradients(reference)
    assert sat_grads.keys() == reference_grads.keys() and sat_grads
    for name, grad in reference_grads.items():
        scale = grad.float().abs().max().clamp_min(1e-6)
        error = (sat_grads[name].float() - grad.float()).abs().max() / scale
        assert error < 5e-2, f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("by_rows", [True, False], ids=["rows", "cols"])
def test_backward_regathers_on_cuda_with_equal_gradients(by_rows, monkeypatch):
    """On CUDA backward re-gathers W[index] from W (saving W itself, which autograd holds anyway) instead of the
    gathered copy: the gradients equal those of the copy-keeping CPU path run on the same GPU tensors."""
    assert "cuda" in ops.REGATHER_DEVICES
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 64, generator=generator).to(DEVICE).requires_grad_()
    bias = torch.randn(96, generator=generator).to(DEVICE).requires_grad_()
    index = torch.tensor([1, 5, 6, 20, 33, 40, 63], device=DEVICE)
    x = torch.randn(3, 5, 64 if by_rows else index.numel(), generator=generator).to(DEVICE).requires_grad_()

    def run() -> tuple[list[torch.Tensor], list[torch.Size]]:
        saved: list[torch.Size] = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
            y = ops.gather_linear(x, weight, bias, index, by_rows)
        grads = torch.autograd.grad(y.square().sum(), (x, weight, bias))
        return list(grads), saved

    regathered, saved_regather = run()
    monkeypatch.setattr(ops, "REGATHER_DEVICES", ops.REGATHER_DEVICES - {"cuda"})
    kept_copy, saved_copy = run()

    for a, b, label in zip(regathered, kept_copy, ("x", "weight", "bias")):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=label)
    gathered_shape = (index.numel(), 64) if by_rows else (96, index.numel())
    assert torch.Size(gathered_shape) in saved_copy, saved_copy
    assert torch.Size(gathered_shape) not in saved_regather, "the gathered copy must not live until backward"
    assert weight.shape in saved_regather


def test_full_model_step_with_regather_equals_kept_copy_on_cuda(monkeypatch):
    """A whole SAT step (fused q/k/v and gate/up rows, o / down columns) through the re-gather path."""
    config = paper_config(omission_rate=0.5, importance="magnitude")
    sat = get_peft_model(tiny_model(), config).to(DEVICE).train()
    copy_path = copy.deepcopy(sat)
    inputs = _cuda_inputs()
    loss = train_step(sat, inputs)
    monkeypatch.setattr(ops, "REGATHER_DEVICES", ops.REGATHER_DEVICES - {"cuda"})
    copy_loss = train_step(copy_path, inputs)
    torch.testing.assert_close(loss, copy_loss, rtol=0, atol=1e-6)
    for name, grad in gradients(copy_path).items():
        torch.testing.assert_close(gradients(sat)[name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("granularity", ["kv_group", "q_head"])
def test_qlora_4bit_equals_masked_dense_reference_on_cuda(granularity, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    base = quantize_4bit(tiny_model(attn="sdpa"), tmp_path, device_map={"": 0})
    lora = get_peft_model(base, lora_config())
    reference = copy.deepcopy(lora).train()
    sat = peft_sat.apply_sat(lora, paper_config(omission_rate=0.5, head_granularity=granularity)).train()
    assert any(type(m).__name__ == "Linear4bit" and m.weight.device.type == "cuda" for m in sat.modules())
    assert_matches_masked_reference(sat, reference, _cuda_inputs(), atol=1e-4)


def test_torch_compile_inductor_matches_eager_on_cuda():
    torch._dynamo.reset()
    eager = get_peft_model(tiny_model(), paper_config(omission_rate=0.5)).to(DEVICE).train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model)  # inductor: Triton kernels on CUDA
    for step, rate in enumerate([0.5, 0.5, 0.25, 0.0]):
        for m in (eager, model):
            peft_sat.get_sat_state(m).set_omission_rate(rate)
        inputs = {k: v.to(DEVICE) for k, v in batch(seed=step).items()}
        compiled_loss = compiled(**inputs).loss
        eager_loss = eager(**inputs).loss
        compiled_loss.backward()
        eager_loss.backward()
        # inductor fuses and reorders reductions: compare at a few ulps of the loss
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=name)
