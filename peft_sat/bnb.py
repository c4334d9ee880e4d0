"""Sliced projections on bitsandbytes 4-bit weights (QLoRA bases), without keeping a dense weight alive.

Contract, for a ``bitsandbytes.nn.Linear4bit`` with frozen packed weight W (out, in), bias b (or None) and a
sorted int64 ``index`` of k kept units:

    by_rows=True:   y = x W[index]^T + b[index]        x (..., in) -> y (..., k)
    by_rows=False:  y = h W[:, index]^T + b            h (..., k)  -> y (..., out)

W is frozen (QLoRA): only the input (and the bias, when it requires grad) receive gradients:

    rows:  dL/dx = dL/dy W[index]          cols:  dL/dh = dL/dy W[:, index]

Dtypes follow ``Linear4bit.forward``: the product runs in the layer's compute dtype (the input's dtype when the
layer never fixed one), W is dequantized to its stored dtype and cast to it, and y comes back in the input's dtype.

Memory: autograd saves no dense copy of W. A custom ``autograd.Function`` (like bitsandbytes' ``MatMul4Bit``)
keeps only the packed bytes and the quantization state and dequantizes again in backward. Rows whose blocks align
with row boundaries (``in % blocksize == 0``) are gathered *packed* (k * in / 2 bytes plus k * in / blocksize
absmax entries) and only those k rows are dequantized; otherwise, and for columns, a transient full dequantize is
unavoidable (a 4-bit block spans consecutive columns of one row).

The layer's own forward is never called on the sliced path: on CPUs with AVX512-BF16 a no-grad / eval forward
repacks the weight in place into an inference layout (``disable_cpu_inference_repack`` prevents it for the dense
forwards). A weight already repacked is refused with a clear error.
"""

from __future__ import annotations

import bitsandbytes.functional as bnb_functional
import torch
import torch.nn.functional as F
from bitsandbytes.functional import QuantState
from torch import nn

from .ops import select_last

__all__ = [
    "dequantize_weight",
    "disable_cpu_inference_repack",
    "linear4bit_cols_to_value",
    "linear4bit_rows_from_value",
    "linear4bit_sliced",
]


def disable_cpu_inference_repack(model: nn.Module) -> None:
    """Keep bitsandbytes from repacking the 4-bit weights of ``model`` into its CPU inference layout.

    On CPUs with AVX512-BF16, bitsandbytes (0.50) repacks a ``Linear4bit`` weight in place at its first no-grad or
    eval forward. Training afterwards gets silently wrong gradients and dequantization wrong values, or crashes when
    ``out_features % 32 != 0``. SAT evaluates dense between training steps, so every 4-bit layer needs
    ``support_avx512bf16_for_cpu = False`` before its first forward: ``apply_sat`` / ``get_peft_model`` set it; call
    this right after loading a 4-bit model that runs a forward before SAT is applied (e.g. an evaluation first).

    Example:
        >>> model = AutoModelForCausalLM.from_pretrained(path, quantization_config=nf4)  # doctest: +SKIP
        >>> disable_cpu_inference_repack(model)  # doctest: +SKIP
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def linear4bit_sliced(
    module: nn.Module, x: torch.Tensor, index: torch.Tensor, by_rows: bool, add_bias: bool = True
) -> torch.Tensor:
    """Kept rows / columns of a ``bitsandbytes.nn.Linear4bit`` projection, with gradient w.r.t. ``x`` and bias.

    Args:
        module: a quantized ``bitsandbytes.nn.Linear4bit`` (weight is a ``Params4bit`` holding a ``quant_state``).
        x: the input, (..., in) when ``by_rows`` else (..., k).
        index: sorted int64 indices of the k kept output rows (``by_rows``) or input columns (not ``by_rows``).
        by_rows: slice output rows (True) or input columns (False).
        add_bias: False leaves the bias out (a second group of columns added to a first one's output).

    Returns:
        (..., k) when ``by_rows`` else (..., out), in ``x.dtype``.

    Raises:
        RuntimeError: the layer is not quantized yet, or its weight was repacked into the CPU inference layout.

    Example:
        >>> y = linear4bit_sliced(layer, x, torch.tensor([0, 5, 7]), by_rows=True)  # (..., 3)
    """
    packed, state = _packed_weight(module)
    compute_dtype = _compute_dtype(module, x)
    index = index.to(device=packed.device, dtype=torch.long)
    bias = module.bias if add_bias else None
    if bias is not None:
        # Unlike Linear4bit.forward, bias.data is never cast in place; the gather saves only the index.
        bias = bias.to(compute_dtype)
        bias = bias.index_select(0, index) if by_rows else bias
    out = _Sliced4bitMatmul.apply(x.to(compute_dtype), bias, packed, state, index, by_rows)
    return out.to(x.dtype)


def linear4bit_rows_from_value(
    module: nn.Module, x: torch.Tensor, index: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """``value[..., index]`` of the layer's dense output ``value`` computed beforehand, with the gradient of its kept
    rows (W frozen): dL/dx = g W[index], W[index] dequantized in backward; the bias (when it trains) on rows."""
    packed, state = _packed_weight(module)
    index = index.to(device=packed.device, dtype=torch.long)
    return _Rows4bitFromValue.apply(x, module.bias, packed, state, index, value)


def linear4bit_cols_to_value(
    module: nn.Module, kept_h: torch.Tensor, index: torch.Tensor, value: torch.Tensor
) -> torch.Tensor:
    """``value`` (the layer's dense output computed beforehand) with the gradient of the kept input columns
    ``kept_h`` = h[..., index]: dL/dh_K = g W[:, index]; the bias (when it trains) gets its whole gradient."""
    packed, state = _packed_weight(module)
    index = index.to(device=packed.device, dtype=torch.long)
    return _Cols4bitToValue.apply(kept_h, module.bias, packed, state, index, value)


class _Rows4bitFromValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, packed, state, index, value):
        ctx.save_for_backward(packed, index)
        ctx.state, ctx.x_dtype = state, x.dtype
        return select_last(value, index)

    @staticmethod
    def backward(ctx, grad_kept):
        packed, index = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _dequantize_slice(packed, ctx.state, index, by_rows=True).to(grad_kept.dtype)  # (k, in)
            grad_x = (grad_kept @ weight).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            sums = grad_kept.reshape(-1, index.numel()).sum(0)
            grad_bias = sums.new_zeros(ctx.state.shape[0]).index_copy_(0, index, sums)
        return grad_x, grad_bias, None, None, None, None


class _Cols4bitToValue(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kept_h, bias, packed, state, index, value):
        ctx.save_for_backward(packed, index)
        ctx.state, ctx.h_dtype = state, kept_h.dtype
        return value.view_as(value)

    @staticmethod
    def backward(ctx, grad_out):
        packed, index = ctx.saved_tensors
        grad_h = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = _dequantize_slice(packed, ctx.state, index, by_rows=False).to(grad_out.dtype)  # (out, k)
            grad_h = (grad_out @ weight).to(ctx.h_dtype)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_h, grad_bias, None, None, None, None


def dequantize_weight(module: nn.Module) -> torch.Tensor:
    """The dense weight (out, in) of a ``Linear4bit``, in the dtype it was quantized from: a transient copy.

    Example:
        >>> w = dequantize_weight(layer)  # (out, in), e.g. for importance scores
    """
    packed, state = _packed_weight(module)
    with torch.no_grad():
        return bnb_functional.dequantize_4bit(packed, state)


class _Sliced4bitMatmul(torch.autograd.Function):
    """``x W_s^T + b_s`` with W_s = W[index] (rows) or W[:, index] (cols), dequantized on the fly in both passes.

    Saves the index and the packed uint8 weight (already alive as the parameter): nothing dense, not even ``x``,
    since W gets no gradient.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        bias: torch.Tensor | None,
        packed: torch.Tensor,
        state: QuantState,
        index: torch.Tensor,
        by_rows: bool,
    ) -> torch.Tensor:
        weight = _dequantize_slice(packed, state, index, by_rows).to(x.dtype)  # (k, in) or (out, k)
        ctx.save_for_backward(packed, index)
        ctx.state, ctx.by_rows = state, by_rows
        return F.linear(x, weight, bias)  # bias fused, as in bnb's matmul_4bit

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            packed, index = ctx.saved_tensors
            weight = _dequantize_slice(packed, ctx.state, index, ctx.by_rows).to(grad_out.dtype)
            grad_x = grad_out @ weight  # (..., k) @ (k, in) rows; (..., out) @ (out, k) cols
        if ctx.needs_input_grad[1]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)  # (n,) summed over all leading dims
        return grad_x, grad_bias, None, None, None, None


def _dequantize_slice(packed: torch.Tensor, state: QuantState, index: torch.Tensor, by_rows: bool) -> torch.Tensor:
    """W[index] (k, in) or W[:, index] (out, k) in ``state.dtype``; rows skip the full dequantize when aligned."""
    out_features, in_features = state.shape
    if by_rows and in_features % state.blocksize == 0:
        return _dequantize_rows(packed, state, index)
    weight = bnb_functional.dequantize_4bit(packed, state)  # (out, in), transient
    return weight.index_select(0 if by_rows else 1, index)


def _dequantize_rows(packed: torch.Tensor, state: QuantState, index: torch.Tensor) -> torch.Tensor:
    """Dequantize only rows ``index`` of W (out, in), given ``in % blocksize == 0``.

    Layout (bitsandbytes blockwise 4-bit): W is flattened row-major, two 4-bit codes per byte, and each run of
    ``blocksize`` consecutive elements shares one absmax. With aligned blocks, row r owns bytes
    [r * in / 2, (r + 1) * in / 2) and absmax entries [r * in / bs, (r + 1) * in / bs).
    """
    out_features, in_features = state.shape
    k = index.numel()
    if k == 0:
        return torch.empty(0, in_features, dtype=state.dtype, device=packed.device)
    # A non-uint8 quant_storage (e.g. bf16 for FSDP) holds the same bytes: view them as uint8.
    rows = packed.reshape(-1).view(torch.uint8).view(out_features, in_features // 2)
    rows = rows.index_select(0, index)  # (k, in / 2) packed codes
    absmax = _absmax(state).view(out_features, in_features // state.blocksize)
    absmax = absmax.index_select(0, index).reshape(-1)  # (k * in / bs,) fp32
    # No nested state: the absmax above is already dequantized (double quant resolved on the small vector).
    sub_state = QuantState(
        absmax=absmax,
        shape=torch.Size((k, in_features)),
        code=state.code,
        blocksize=state.blocksize,
        quant_type=state.quant_type,
        dtype=state.dtype,
    )
    # (N, 1) is bitsandbytes' canonical packed orientation; a (1, N) tensor would trigger its transposing BC shim.
    return bnb_functional.dequantize_4bit(rows.reshape(-1, 1), sub_state)  # (k, in)


def _absmax(state: QuantState) -> torch.Tensor:
    """Per-block absmax as fp32, undoing double quantization (8-bit absmax + offset) like ``dequantize_4bit``."""
    if state.nested:
        return (bnb_functional.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()
    return state.absmax.float()


def _packed_weight(module: nn.Module) -> tuple[torch.Tensor, QuantState]:
    """The packed bytes (plain tensor, not the ``Params4bit``) and quant state of a quantized ``Linear4bit``."""
    weight = module.weight
    # FSDP and some conversions drop ``weight.quant_state``; Linear4bit keeps a copy on the module
    # (bitsandbytes' ``fix_4bit_weight_quant_state_from_module``). Read it without writing it back.
    state: QuantState | None = getattr(weight, "quant_state", None)
    if state is None:
        state = getattr(module, "quant_state", None)
    if state is None or not getattr(weight, "bnb_quantized", True):
        raise RuntimeError(
            f"{type(module).__name__} is not quantized yet (no `quant_state`); move it to a device first, "
            "e.g. `layer.to('cpu')` or `layer.to('cuda')`, which quantizes the weight."
        )
    if getattr(state, "packing_format_for_cpu", False):
        # Its absmax is stored transposed in bf16 and the codes reordered: dequantize_4bit would return wrong values.
        raise RuntimeError(
            f"{type(module).__name__} weight was repacked into bitsandbytes' CPU inference layout by a no-grad/eval "
            "forward (AVX512-BF16), which breaks training. Set `support_avx512bf16_for_cpu = False` on every "
            "Linear4bit before any forward, and reload the model."
        )
    if len(state.shape) != 2:
        raise RuntimeError(f"Expected a 2-D 4-bit weight (out, in), got quant_state.shape={tuple(state.shape)}.")
    return weight.data, state


def _compute_dtype(module: nn.Module, x: torch.Tensor) -> torch.dtype:
    """The dtype ``Linear4bit.forward`` would compute in, without its side effect of storing it on the module.

    bnb: a layer whose compute dtype was never set adopts fp32 / bf16 inputs' dtype; fp16 inputs (or a set dtype)
    use ``module.compute_dtype`` when it is not None, else the input's dtype.
    """
    is_set = getattr(module, "compute_type_is_set", True)
    if not is_set and x.dtype in (torch.float32, torch.bfloat16):
        return x.dtype
    compute_dtype = getattr(module, "compute_dtype", None)
    return compute_dtype if compute_dtype is not None else x.dtype
