"""Sliced 4-bit projections (peft_sat.bnb): exact against the dequantized weight, nothing dense saved for backward.

CPU only, offline. Dimensions are multiples of 64 (bitsandbytes' default 4-bit block size), and every layer gets
``support_avx512bf16_for_cpu = False`` (``peft_sat.bnb.disable_cpu_inference_repack``) so no forward can repack its
weight into the CPU inference layout.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as bnb_functional  # noqa: E402
from peft import get_peft_model  # noqa: E402
from sat_testing import lora_config, paper_config, quantize_4bit, tiny_model  # noqa: E402

import peft_sat  # noqa: E402
from peft_sat.bnb import dequantize_weight, disable_cpu_inference_repack, linear4bit_sliced  # noqa: E402

# (quant_type, double quant, bias, in_features, out_features, blocksize); the last one has in % blocksize != 0
# (192 % 128 = 64), so rows take the dequantize-then-gather fallback.
CASES = [
    ("nf4", True, True, 128, 192, 64),
    ("nf4", False, False, 192, 128, 64),
    ("fp4", True, False, 256, 64, 128),
    ("fp4", False, True, 128, 128, 64),
    ("nf4", True, True, 192, 128, 128),
]
IDS = [f"{q}-dq{int(d)}-bias{int(b)}-{i}x{o}-bs{bs}" for q, d, b, i, o, bs in CASES]


def make_layer(
    quant_type: str = "nf4",
    double_quant: bool = True,
    bias: bool = True,
    in_features: int = 128,
    out_features: int = 192,
    blocksize: int = 64,
    compute_dtype: torch.dtype | None = None,
    quant_storage: torch.dtype = torch.uint8,
    seed: int = 0,
) -> nn.Module:
    """A ``Linear4bit`` quantized on CPU from a seeded random ``nn.Linear`` (non-trivial bias)."""
    torch.manual_seed(seed)
    dense = nn.Linear(in_features, out_features, bias=bias)
    if bias:
        nn.init.normal_(dense.bias)
    layer = bnb.nn.Linear4bit(
        in_features, out_features, bias=bias, compute_dtype=compute_dtype,
        compress_statistics=double_quant, quant_type=quant_type, quant_storage=quant_storage,
    )  # fmt: skip
    layer.load_state_dict(dense.state_dict())
    layer.weight.blocksize = blocksize  # Linear4bit has no blocksize argument; Params4bit reads it when quantizing
    layer = layer.to("cpu")  # quantizes
    disable_cpu_inference_repack(layer)
    assert layer.weight.bnb_quantized and layer.weight.quant_state.blocksize == blocksize
    assert layer.weight.quant_state.nested == double_quant
    return layer


def kept(n: int, seed: int = 1) -> torch.Tensor:
    """A sorted, non-contiguous subset of about half of range(n)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: n // 2 + 3].sort().values


def reference(layer: nn.Module, x: torch.Tensor, index: torch.Tensor, by_rows: bool, bias: torch.Tensor | None):
    weight = dequantize_weight(layer)
    if by_rows:
        return F.linear(x, weight[index], None if bias is None else bias[index])
    return F.linear(x, weight[:, index], bias)


@pytest.mark.parametrize("by_rows", [True, False], ids=["rows", "cols"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_matches_dequantized_reference(case, by_rows):
    quant_type, double_quant, has_bias, in_f, out_f, blocksize = case
    layer = make_layer(quant_type, double_quant, has_bias, in_f, out_f, blocksize)
    index = kept(out_f if by_rows else in_f)
    torch.manual_seed(2)
    x = torch.randn(2, 3, in_f if by_rows else index.numel(), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    bias_ref = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()

    y = linear4bit_sliced(layer, x, index, by_rows)
    y_ref = reference(layer, x_ref, index, by_rows, bias_ref)
    assert y.shape == y_ref.shape == (2, 3, index.numel() if by_rows else out_f)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)

    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-5, rtol=1e-5)
    if has_bias:
        torch.testing.assert_close(layer.bias.grad, bias_ref.grad, atol=1e-5, rtol=1e-5)
        if by_rows:  # omitted rows get exactly zero bias gradient
            omitted = torch.ones(out_f, dtype=torch.bool).index_fill_(0, index, False)
            assert layer.bias.grad[omitted].abs().max() == 0
    assert layer.weight.grad is None


@pytest.mark.parametrize("by_rows", [True, False], ids=["rows", "cols"])
@pytest.mark.parametrize("case", CASES[:1] + CASES[-1:], ids=IDS[:1] + IDS[-1:])
def test_no_dense_weight_saved_for_backward(case, by_rows):
    quant_type, double_quant, has_bias, in_f, out_f, blocksize = case
    layer = make_layer(quant_type, double_quant, has_bias, in_f, out_f, blocksize)
    index = kept(out_f if by_rows else in_f)
    x = torch.randn(4, in_f if by_rows else index.numel(), requires_grad=True)
    saved: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = linear4bit_sliced(layer, x, index, by_rows)
    y.sum().backward()  # backward works from what was saved
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert any(t.dtype == torch.uint8 for t in saved), "the packed weight should be what is saved"
    dense = [tuple(t.shape) for t in saved if t.is_floating_point()]
    assert dense == [], f"float tensors saved for backward: {dense}"


@pytest.mark.parametrize(
    "case, by_rows, expected",
    [
        (CASES[0], True, "rows"),  # aligned: only the k kept rows are dequantized
        (CASES[-1], True, "full"),  # in % blocksize != 0: fallback
        (CASES[0], False, "full"),  # columns always need the full matrix, transiently
    ],
    ids=["rows-aligned", "rows-fallback", "cols"],
)
def test_dequantize_calls(monkeypatch, case, by_rows, expected):
    quant_type, double_quant, has_bias, in_f, out_f, blocksize = case
    layer = make_layer(quant_type, double_quant, has_bias, in_f, out_f, blocksize)
    index = kept(out_f if by_rows else in_f)
    shapes: list[tuple[int, ...]] = []
    original = bnb_functional.dequantize_4bit

    def spy(A, quant_state=None, *args, **kwargs):
        shapes.append(tuple(quant_state.shape))
        return original(A, quant_state, *args, **kwargs)

    monkeypatch.setattr(bnb_functional, "dequantize_4bit", spy)
    x = torch.randn(3, in_f if by_rows else index.numel(), requires_grad=True)
    linear4bit_sliced(layer, x, index, by_rows).sum().backward()
    want = (index.numel(), in_f) if expected == "rows" else (out_f, in_f)
    assert shapes == [want, want], "one dequantize in forward, one in backward"


@pytest.mark.parametrize("storage", [torch.bfloat16, torch.float32])
def test_non_uint8_quant_storage(storage):
    """FSDP-style storage dtypes hold the same packed bytes; the row gather views them as uint8."""
    layer = make_layer(quant_storage=storage)
    assert layer.weight.dtype == storage
    index = kept(192)
    x = torch.randn(3, 128)
    weight = dequantize_weight(layer)
    torch.testing.assert_close(linear4bit_sliced(layer, x, index, True), F.linear(x, weight[index], layer.bias[index]))


def test_dtypes_follow_linear4bit_without_mutating_it():
    # A layer that never fixed its compute dtype computes in bf16 for bf16 inputs.
    layer = make_layer()
    index = kept(192)
    x = torch.randn(2, 128, dtype=torch.bfloat16, requires_grad=True)
    y = linear4bit_sliced(layer, x, index, by_rows=True)
    assert y.dtype == torch.bfloat16
    weight = dequantize_weight(layer)
    assert weight.dtype == torch.float32  # dequantized in the dtype it was quantized from
    ref = F.linear(x.detach(), weight[index].bfloat16(), layer.bias[index].detach().bfloat16())
    torch.testing.assert_close(y.detach(), ref)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert layer.compute_dtype is None and not layer.compute_type_is_set  # bnb's forward would have set these
    assert layer.bias.dtype == torch.float32  # ... and cast bias.data in place

    # A fixed compute dtype wins: computed in bf16, returned in the input's fp32.
    layer = make_layer(compute_dtype=torch.bfloat16)
    x = torch.randn(2, 128)
    y = linear4bit_sliced(layer, x, index, by_rows=True)
    assert y.dtype == torch.float32
    ref = F.linear(x.bfloat16(), weight[index].bfloat16(), layer.bias[index].detach().bfloat16()).float()
    torch.testing.assert_close(y, ref)


def test_never_repacks_weight_in_eval_no_grad():
    """Even with the AVX512-BF16 path enabled, the sliced path never runs Linear4bit.forward."""
    layer = make_layer()
    layer.support_avx512bf16_for_cpu = True  # worst case: the flag that triggers the in-place repack
    layer.eval()
    packed_before = layer.weight.data.clone()
    with torch.no_grad():
        linear4bit_sliced(layer, torch.randn(2, 128), kept(192), by_rows=True)
        linear4bit_sliced(layer, torch.randn(2, kept(128).numel()), kept(128), by_rows=False)
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    assert torch.equal(layer.weight.data, packed_before)


def test_refuses_unquantized_and_repacked_layers():
    raw = bnb.nn.Linear4bit(128, 64)  # never moved to a device: still a dense float weight
    with pytest.raises(RuntimeError, match="not quantized"):
        dequantize_weight(raw)
    layer = make_layer()
    layer.weight.quant_state.packing_format_for_cpu = True  # what bnb's eval repack leaves behind
    with pytest.raises(RuntimeError, match="support_avx512bf16_for_cpu"):
        linear4bit_sliced(layer, torch.randn(2, 128), kept(192), by_rows=True)


# ---- through PEFT's QLoRA layer ----------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self, proj: nn.Module):
        super().__init__()
        self.proj = proj
        self.is_loaded_in_4bit = True  # what PEFT reads to dispatch bnb.nn.Linear4bit to lora.bnb.Linear4bit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


@pytest.mark.parametrize("by_rows", [True, False], ids=["rows", "cols"])
def test_lora_on_4bit(by_rows):
    peft = pytest.importorskip("peft")
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from peft_sat.sliced import linear_cols, linear_rows

    in_f, out_f = 128, 192
    model = peft.get_peft_model(
        _Tiny(make_layer(in_features=in_f, out_features=out_f)),
        peft.LoraConfig(target_modules=["proj"], r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False),
    )
    lora = model.base_model.model.proj
    assert isinstance(lora, LoraLinear4bit)
    assert lora.lora_B["default"].weight.abs().sum() > 0  # the LoRA term is not trivially zero
    index = kept(out_f if by_rows else in_f)
    torch.manual_seed(3)
    x = torch.randn(2, 5, in_f if by_rows else index.numel(), requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()

    if by_rows:
        y = linear_rows(lora, x, index)
        y_ref = lora(x_ref).index_select(-1, index)
    else:
        y = linear_cols(lora, x, index)
        y_ref = lora(x.new_zeros(2, 5, in_f).index_copy(-1, index, x_ref))
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)

    params = [lora.lora_A["default"].weight, lora.lora_B["default"].weight]
    grads = torch.autograd.grad(y.square().sum(), [x, *params])
    grads_ref = torch.autograd.grad(y_ref.square().sum(), [x_ref, *params])
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-5)


def test_sat_keeps_every_4bit_layer_from_repacking(tmp_path):
    """SAT evaluates dense between sparse steps: the AVX512-BF16 CPU repack must be off on every 4-bit layer."""
    model = quantize_4bit(tiny_model(), tmp_path)
    layers = [m for m in model.modules() if hasattr(m, "support_avx512bf16_for_cpu")]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True
    peft_sat.apply_sat(get_peft_model(model, lora_config()), paper_config())
    assert layers and not any(layer.support_avx512bf16_for_cpu for layer in layers)
