"""``recipes/cpu_lm_head.py``: TRL's fused LM head on a CPU scores labelled positions only, and keeps the logits'
gradient from the forward: the same log-probabilities, optional outputs and gradients as a float64 reference and as
TRL's own function."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sat_testing import batch, tiny_llama
from trl.kernels.chunked_logprob import OPTIONAL_OUTPUTS, ChunkedLogProbFunction
from trl.trainer import utils as trl_utils

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `recipes` is a folder of scripts

from recipes import common, cpu_lm_head  # noqa: E402
from recipes.cpu_lm_head import LogProbWithSavedGradient, _SavedGradientOnCPU  # noqa: E402

ALL_OUTPUTS = ("log_probs", *OPTIONAL_OUTPUTS)


pytestmark = pytest.mark.usefixtures("restore_trl_lm_head")


def reference(hidden, weight, bias, targets, logit_scale, temperature):
    """log p_t, entropy, log sum p^2, mean logit and top-1 in float64 autograd."""
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale / temperature
    log_p = torch.log_softmax(z, -1)
    p = log_p.exp()
    return (
        log_p.gather(-1, targets[:, None]).squeeze(-1),
        -(p * log_p).sum(-1),
        torch.log((p * p).sum(-1)),
        z.mean(-1),
        z.argmax(-1) == targets,
    )


def leaves(n=37, hidden_size=16, vocab=300, bias=False):
    torch.manual_seed(0)
    hidden = torch.randn(n, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    return hidden, weight, torch.randn(vocab, requires_grad=True) if bias else None, torch.randint(0, vocab, (n,))


def fused_loss_and_grads(model, inputs):
    """TRL's fused loss of ``model`` on ``inputs`` and every parameter's gradient."""
    model.zero_grad()
    loss = model(**inputs, fused_lm_head=True).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "bias, logit_scale, temperature, entropy_grad",
    [(False, 1.0, 1.0, False), (True, 0.5, 0.7, False), (True, 1.3, 1.0, True), (False, 1.0, 2.0, True)],
)
def test_values_and_gradients_match_float64_and_trl(bias, logit_scale, temperature, entropy_grad):
    hidden, weight, b, targets = leaves(bias=bias)
    inputs = [t for t in (hidden, weight, b) if t is not None]
    grad_lp, grad_ent = torch.randn(len(targets)), torch.randn(len(targets))

    def loss_and_grads(outputs):
        loss = (outputs[0].double() * grad_lp.double()).sum()
        if entropy_grad:  # a loss that reads the entropy: the backward computes the logits again
            loss = loss + (outputs[1].double() * grad_ent.double()).sum()
        return torch.autograd.grad(loss, inputs)

    want = reference(hidden, weight, b, targets, logit_scale, temperature)
    want_grads = loss_and_grads(want)
    args = (hidden, weight, b, targets, temperature, 128, None, logit_scale, ALL_OUTPUTS)
    got = _SavedGradientOnCPU(ChunkedLogProbFunction).apply(*args)
    trl = ChunkedLogProbFunction.apply(*args)
    for value, expected, trl_value in zip(got, want, trl, strict=True):
        if value.dtype == torch.bool:
            assert torch.equal(value, expected) and torch.equal(value, trl_value)
        else:
            torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(value, trl_value, rtol=1e-4, atol=1e-4)
    for grad, expected in zip(loss_and_grads(got), want_grads, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=2e-5)
    assert got[2].grad_fn is None and got[3].grad_fn is None  # TRL's metrics carry no gradient


def test_only_requested_outputs_and_no_kept_gradient_without_grad():
    hidden, weight, _, targets = leaves()
    apply = _SavedGradientOnCPU(ChunkedLogProbFunction).apply
    log_p, entropy, log_sum_sq, mean, top1 = apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, ("log_probs",))
    assert entropy is log_sum_sq is mean is top1 is None and log_p.requires_grad
    with torch.no_grad():  # evaluation: values only, nothing kept for a backward
        values = apply(hidden, weight, None, targets, 1.0, 128, None, 1.0, ("log_probs", "entropy"))
    assert values[0].grad_fn is None
    torch.testing.assert_close(values[0], log_p.detach())


def test_the_kept_gradient_serves_one_backward():
    """The backward scales the kept tile in place: a second backward through the same graph raises instead of
    reading a scaled tile."""
    hidden, weight, _, targets = leaves()
    log_p = _SavedGradientOnCPU(ChunkedLogProbFunction).apply(hidden, weight, None, targets, 1.0, 128)[0]
    torch.autograd.grad(log_p.sum(), [hidden], retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(log_p.sum(), [hidden])


def test_trl_path_where_the_kept_gradient_does_not_apply(monkeypatch):
    hidden, weight, _, targets = leaves()
    calls = []
    monkeypatch.setattr(LogProbWithSavedGradient, "apply", lambda *args: calls.append("saved"))
    routed = _SavedGradientOnCPU(SimpleNamespace(apply=lambda *args: calls.append("trl")))
    routed.apply(hidden, weight, None, targets, 1.0, 128)
    routed.apply(hidden, weight, None, targets, 1.0, 128, 30.0)  # soft-capped logits
    routed.apply(hidden, weight, None, targets, 1.0, 1)  # N x V above TRL's own tile (TOKEN_CHUNK_SIZE x 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed.apply(hidden, weight, None, targets, 1.0, 128)
    assert calls == ["saved", "trl", "trl", "trl"]


def test_fused_head_of_a_model_is_routed_and_exact():
    """TRL's fused loss of a tiny Llama: the same loss and gradients through the kept gradient, at every position and
    at the labelled ones (``score_labelled_positions_only``); both patches idempotent."""
    model = tiny_llama()
    trl_utils.add_fused_lm_head(model)
    inputs = batch(prompt=8)

    trl = fused_loss_and_grads(model, inputs)
    for _ in range(2):
        cpu_lm_head.save_logits_gradient_on_cpu()
    assert isinstance(trl_utils._ChunkedLogProbFunction, _SavedGradientOnCPU)
    assert trl_utils._ChunkedLogProbFunction.chunked is ChunkedLogProbFunction
    kept = fused_loss_and_grads(model, inputs)
    for _ in range(2):
        cpu_lm_head.score_labelled_positions_only()
    labelled = fused_loss_and_grads(model, inputs)
    for got in (kept, labelled):
        torch.testing.assert_close(got[0], trl[0])
        for grad, want in zip(got[1], trl[1], strict=True):
            torch.testing.assert_close(grad, want, rtol=1e-4, atol=1e-6)


def test_trl_scores_only_labelled_positions_on_cpu(monkeypatch):
    """``score_labelled_positions_only``: TRL's own function sees the labelled positions alone, with the same loss
    and gradients; other devices keep TRL's choice."""
    model = tiny_llama()
    trl_utils.add_fused_lm_head(model)
    inputs = batch(prompt=8)
    scored, apply = [], trl_utils._ChunkedLogProbFunction.apply
    monkeypatch.setattr(
        trl_utils._ChunkedLogProbFunction,
        "apply",
        lambda hidden, *args: scored.append(len(hidden)) or apply(hidden, *args),
    )

    every = fused_loss_and_grads(model, inputs)
    cpu_lm_head.score_labelled_positions_only()
    labelled = fused_loss_and_grads(model, inputs)
    rows, labels = inputs["input_ids"].shape, inputs["labels"][:, 1:]
    assert scored == [rows[0] * (rows[1] - 1), int(labels.ne(-100).sum())]
    torch.testing.assert_close(labelled[0], every[0])
    for got, want in zip(labelled[1], every[1], strict=True):
        torch.testing.assert_close(got, want)
    assert not trl_utils._use_triton(torch.device("meta")), "other devices keep TRL's choice"


@pytest.mark.parametrize("saves", [True, False])
def test_recipes_apply_and_report_the_setting(saves):
    script_args = SimpleNamespace(
        tune_cpu_allocator=False, cpu_allocator_large_blocks_from_heap=False, cpu_lm_head_saves_gradient=saves
    )
    settings = common.tune_for_cpu(script_args, SimpleNamespace(use_cpu=True))
    assert settings == {
        "cpu_allocator_tuned": False,
        "cpu_allocator_large_blocks_from_heap": False,
        "cpu_lm_head_saves_gradient": saves,
    }
    assert isinstance(trl_utils._ChunkedLogProbFunction, _SavedGradientOnCPU) is saves
    assert getattr(trl_utils._use_triton, "_labelled_only", False)
