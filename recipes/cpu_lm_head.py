"""TRL's fused LM head on a CPU: score the labelled positions only, and keep the logits' gradient from the forward.

``SFTTrainer`` computes its loss with TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``): the per-token
log-probabilities of ``z = h W^T`` (N positions x V words), folded tile by tile so that the logits never exist whole.
Its backward computes the logits a second time. On a GPU that buys memory with a cheap matmul. On a CPU (no Triton)
the torch fallback of its kernels also makes a dozen passes over every tile in each direction: at SmolLM2-135M's head
and 4 x 128 tokens TRL's function took 1.3 s of forward plus backward against 0.63-0.67 s for the function below,
and a whole dense step 0.83-0.88x the time (``benchmarks/lm_head.py``), in the dense baseline and under SAT alike.

``LogProbWithSavedGradient`` computes the logits once and turns them, in place, into what the backward needs::

    p = softmax(z)        log p_t = z_t - logsumexp(z)        G = p - onehot(t)     (N, V), kept for the backward
    dL/dz = -g G          (g: the incoming gradient of log p_t, per position)
    dL/dh = dL/dz W       dL/dW = (dL/dz)^T h

so the backward is the two gradient matmuls and one in-place scale. The price is G: N x V float32 kept from the
forward to the backward (100 MB at SmolLM2's 4 x 128 tokens), which TRL's path does not keep. Batches whose G would
exceed TRL's own forward tile (``TOKEN_CHUNK_SIZE`` x ``chunk_size`` values), soft-capped logits, autocast and ZeRO-3
partitioned heads take TRL's path unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, TOKEN_CHUNK_SIZE
from trl.trainer import utils as trl_utils


def score_labelled_positions_only() -> None:
    """Make TRL's fused LM head score only the positions that carry a label on a CPU, as it does on CUDA.

    Why: where Triton is missing, TRL scores every position, so that compilers such as Neuron's see one tile shape
    per batch size. In eager mode on a CPU that computes the log-probabilities of every prompt token and throws them
    away: three (positions x hidden x vocabulary) matmuls per step, in the dense baseline and under SAT alike, a
    large share of a step at SFT batches whose prompts carry no loss (docs/results.md, "Whole runs against dense").
    TRL reads the choice from ``trl.trainer.utils._use_triton`` at each call; the kernels keep their own copy of
    that function, so they still run as torch operations. A TRL without that function is left as it is.
    """
    choose = getattr(trl_utils, "_use_triton", None)
    if choose is None or getattr(choose, "_labelled_only", False):
        return

    def labelled_only(device: torch.device) -> bool:
        return device.type == "cpu" or choose(device)

    labelled_only._labelled_only = True  # type: ignore[attr-defined]
    trl_utils._use_triton = labelled_only


def save_logits_gradient_on_cpu() -> None:
    """Route TRL's fused LM head through ``LogProbWithSavedGradient`` where it applies (module docstring); TRL's
    function everywhere else. Idempotent; a TRL without ``_ChunkedLogProbFunction`` is left as it is."""
    chunked = getattr(trl_utils, "_ChunkedLogProbFunction", None)
    if chunked is None or isinstance(chunked, _SavedGradientOnCPU):
        return
    trl_utils._ChunkedLogProbFunction = _SavedGradientOnCPU(chunked)


class _SavedGradientOnCPU:
    """Stands in for TRL's ``_ChunkedLogProbFunction``: the same ``apply`` arguments and outputs."""

    def __init__(self, chunked: Any) -> None:
        self.chunked = chunked

    def apply(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        temperature: float,
        chunk_size: int,
        final_logit_softcapping: float | None = None,
        logit_scale: float = 1.0,
        outputs: tuple[str, ...] = ("log_probs", *OPTIONAL_OUTPUTS),
    ) -> tuple[torch.Tensor | None, ...]:
        if not _applies(hidden, weight, chunk_size, final_logit_softcapping):
            return self.chunked.apply(
                hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping, logit_scale, outputs
            )
        keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        return LogProbWithSavedGradient.apply(
            hidden, weight, bias, targets, logit_scale, 1.0 / temperature, outputs, keep
        )


def _applies(
    hidden: torch.Tensor, weight: torch.Tensor, chunk_size: int, final_logit_softcapping: float | None
) -> bool:
    return (
        hidden.device.type == "cpu"
        and final_logit_softcapping is None  # its gradient would need the logits kept as well
        and not torch.is_autocast_enabled("cpu")
        and not hasattr(weight, "ds_id")  # a ZeRO-3 head is gathered around each call: the backward needs TRL's
        and hidden.shape[0] * weight.shape[0] <= TOKEN_CHUNK_SIZE * chunk_size
    )


class LogProbWithSavedGradient(torch.autograd.Function):
    """Per-token ``log p_t`` of ``z = (h W^T + b) * logit_scale * inv_temperature`` (N, V), with TRL's
    ``OPTIONAL_OUTPUTS`` (None where not requested), keeping ``G = softmax(z) - onehot(t)`` for the backward when
    ``keep_gradient`` (False: no gradient wanted, e.g. evaluation)::

        entropy          H = logsumexp(z) - sum_v p_v z_v
        log_sum_sq_probs log sum_v p_v^2                  (no gradient)
        mean_logits      mean_v z_v                       (no gradient)
        is_top1          argmax_v z_v == t (the first maximum, as TRL counts ties)   (no gradient)

    A gradient of the entropy (a loss that reads it) recomputes the logits: dH/dz_v = -p_v (log p_v + H).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, logit_scale, inv_temperature, outputs, keep_gradient):
        ctx.set_materialize_grads(False)
        z = _logits(hidden, weight, bias, logit_scale, inv_temperature)
        mean_logits = z.mean(-1) if "mean_logits" in outputs else None
        is_top1 = z.argmax(-1) == targets if "is_top1" in outputs else None
        target_z = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        peak = z.amax(-1)
        shifted = z.sub_(peak.unsqueeze(-1))  # z - max: exp cannot overflow
        e, e_dot_shifted = _exp_in_place(shifted, with_dot="entropy" in outputs)
        sum_e = e.sum(-1)
        log_sum_e = sum_e.log()
        log_z = peak + log_sum_e
        entropy = None
        if e_dot_shifted is not None:  # H = log sum e - sum(e (z - max)) / sum e
            entropy = log_sum_e - e_dot_shifted / sum_e
        log_sum_sq = _row_dot(e, e).log() - 2 * log_sum_e if "log_sum_sq_probs" in outputs else None
        if keep_gradient:
            grad_tile = e.div_(sum_e.unsqueeze(-1))  # p, in place
            grad_tile[torch.arange(len(targets), device=targets.device), targets] -= 1.0  # p - onehot(t)
            ctx.save_for_backward(hidden, weight, bias, targets, grad_tile, log_z, entropy)
        ctx.scales = (logit_scale, inv_temperature)
        ctx.mark_non_differentiable(*(x for x in (log_sum_sq, mean_logits, is_top1) if x is not None))
        return target_z - log_z, entropy, log_sum_sq, mean_logits, is_top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, *_):
        hidden, weight, bias, targets, grad_tile, log_z, entropy = ctx.saved_tensors
        logit_scale, inv_temperature = ctx.scales
        grad_z = None
        if grad_logprobs is not None:  # d log p_t / dz = onehot - p = -G; the kept tile is not needed again
            grad_z = grad_tile.mul_(grad_logprobs.float().neg().unsqueeze(-1))
        if grad_entropy is not None:
            log_p = _logits(hidden, weight, bias, logit_scale, inv_temperature).sub_(log_z.unsqueeze(-1))
            p = log_p.exp()
            term = p.mul_(log_p.add_(entropy.unsqueeze(-1))).mul_(grad_entropy.float().neg().unsqueeze(-1))
            grad_z = term if grad_z is None else grad_z.add_(term)
        if grad_z is None:
            return (None,) * 8
        if logit_scale * inv_temperature != 1.0:
            grad_z.mul_(logit_scale * inv_temperature)
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = grad_z.mm(weight.float()).to(hidden.dtype) if need_hidden else None
        grad_weight = grad_z.t().mm(hidden.float()).to(weight.dtype) if need_weight else None
        grad_bias = grad_z.sum(0).to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, logit_scale: float, inv_temperature: float
) -> torch.Tensor:
    """(N, V) float32 logits as TRL's tiles compute them: the product in the inputs' dtype, then scaled."""
    z = hidden.mm(weight.to(hidden.dtype).t())
    if bias is not None:
        z.add_(bias.to(z.dtype))
    z = z.float()
    if logit_scale != 1.0:
        z.mul_(logit_scale)
    if inv_temperature != 1.0:
        z.mul_(inv_temperature)
    return z


def _exp_in_place(shifted: torch.Tensor, with_dot: bool, rows: int = 32) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``e = exp(shifted)`` written over ``shifted`` (N, V), and with ``with_dot`` also ``sum_v e shifted`` per row,
    ``rows`` at a time: a second (N, V) buffer would be fresh memory faulted in on every step."""
    if not with_dot:
        return shifted.exp_(), None
    dot = shifted.new_empty(shifted.shape[0])
    for start in range(0, shifted.shape[0], rows):
        block = shifted[start : start + rows]
        e = block.exp()
        dot[start : start + rows] = _row_dot(e, block)
        block.copy_(e)
    return shifted, dot


def _row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[n, v] b[n, v] for each row n, without an (N, V) temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(-1)).view(-1)
