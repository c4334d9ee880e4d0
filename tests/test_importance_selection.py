"""Importance formulas against naive per-unit loops; selection contracts; padding and non-finite inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from sat_testing import batch, tiny_model
from torch.utils._python_dispatch import TorchDispatchMode

import peft_sat
from peft_sat import importance
from peft_sat.selection import num_kept, select_units

H, INTER, HEADS, KV, D = 8, 12, 4, 2, 2


@pytest.fixture
def weights():
    torch.manual_seed(0)
    return {
        "gate": torch.randn(INTER, H),
        "up": torch.randn(INTER, H),
        "down": torch.randn(H, INTER),
        "q": torch.randn(HEADS * D, H),
        "v": torch.randn(KV * D, H),
        "o": torch.randn(H, HEADS * D),
    }


def _channels(metric, x, w, generator=None):
    return importance.channel_scores(
        metric,
        x=x,
        x_sample=x,
        w_gate=lambda: w["gate"],
        w_up=lambda: w["up"],
        w_down=lambda: w["down"],
        project_gate=lambda s: s @ w["gate"].T,
        project_up=lambda s: s @ w["up"].T,
        act_fn=F.silu,
        num_channels=INTER,
        generator=generator or torch.Generator().manual_seed(0),
    )


def _heads(metric, x, w):
    return importance.head_scores(
        metric,
        x=x,
        x_sample=x,
        w_q=lambda: w["q"],
        w_o=lambda: w["o"],
        project_q=lambda s: s @ w["q"].T,
        project_v=lambda s: s @ w["v"].T,
        num_heads=HEADS,
        num_kv_heads=KV,
        head_dim=D,
        generator=torch.Generator().manual_seed(0),
    )


def test_channel_metrics_match_their_formulas(weights):
    x = torch.randn(5, H)
    norms = x.norm(dim=0)
    for i, (magnitude, wanda, maxip) in enumerate(
        zip(*(_channels(m, x, weights) for m in ("magnitude", "wanda", "maxip")))
    ):
        g, u, d = weights["gate"][i], weights["up"][i], weights["down"][:, i]
        assert torch.isclose(magnitude, g.norm() * u.norm() * d.norm())
        assert torch.isclose(wanda, ((g.abs() + u.abs()) * norms).sum())
        assert torch.isclose(maxip, (F.silu(x @ g) * (x @ u)).abs().mean())


def test_head_metrics_match_their_formulas(weights):
    x = torch.randn(5, H)
    magnitude, wanda, maxip = (_heads(m, x, weights) for m in ("magnitude", "wanda", "maxip"))
    for h in range(HEADS):
        q_rows, o_cols = weights["q"][h * D : (h + 1) * D], weights["o"][:, h * D : (h + 1) * D]
        g = h // (HEADS // KV)
        v_rows = weights["v"][g * D : (g + 1) * D]
        assert torch.isclose(magnitude[h], q_rows.norm() * o_cols.norm())
        assert torch.isclose(wanda[h], (q_rows.abs() * x.norm(dim=0)).sum())
        assert torch.isclose(maxip[h], ((x @ q_rows.T).norm(dim=1) * (x @ v_rows.T).norm(dim=1)).mean())
    assert torch.equal(importance.group_scores(maxip, KV), maxip.reshape(KV, -1).sum(1))


def test_uniform_scores_are_seeded_random():
    a = importance.uniform_scores(10, torch.Generator().manual_seed(1))
    b = importance.uniform_scores(10, torch.Generator().manual_seed(1))
    c = importance.uniform_scores(10, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_padding_tokens_are_excluded_from_scores(weights):
    x = torch.randn(2, 6, H)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :3] = False
    valid = importance.valid_tokens(x, mask)
    assert valid.shape == (9, H) and torch.equal(valid[:3], x[0, 3:])
    poisoned = x.clone()
    poisoned[0, :3] = 1e6  # huge activations at padding must not move the scores
    for metric in ("wanda", "maxip"):
        assert torch.equal(
            _channels(metric, importance.valid_tokens(poisoned, mask), weights), _channels(metric, valid, weights)
        )
    all_padding = torch.zeros(2, 6, dtype=torch.bool)
    assert importance.valid_tokens(x, all_padding).shape == (12, H)  # falls back to all tokens
    assert importance.valid_tokens(x, None).shape == (12, H)


def test_sample_tokens_bounds_the_rows():
    x = torch.arange(40.0).reshape(20, 2)
    sample = importance.sample_tokens(x, 5, torch.Generator().manual_seed(0))
    assert sample.shape == (5, 2) and len({tuple(r) for r in sample.tolist()}) == 5
    assert importance.sample_tokens(x, 50, torch.Generator()) is x


@pytest.mark.parametrize(
    "units,rate,expected", [(16, 0.5, 8), (4, 0.75, 1), (100, 0.29, 71), (3, 0.9, 1), (10, 0.0, 10), (30, 0.1, 27)]
)
def test_num_kept(units, rate, expected):
    assert num_kept(units, rate) == expected


def test_topk_keeps_the_highest_scores_sorted():
    scores = torch.tensor([0.1, 5.0, 0.3, 4.0, 2.0])
    assert select_units(scores, 3, "topk").tolist() == [1, 3, 4]
    assert select_units(scores, 5, "topk").tolist() == [0, 1, 2, 3, 4]


def test_sampling_is_seeded_without_replacement_and_proportional():
    scores = torch.tensor([1.0, 0.0, 3.0, 0.0, 6.0, 0.0])
    picks = [select_units(scores, 2, "sampling", torch.Generator().manual_seed(s)) for s in range(200)]
    assert all(len(set(p.tolist())) == 2 and set(p.tolist()) <= {0, 2, 4} for p in picks)
    counts = torch.stack([torch.bincount(p, minlength=6) for p in picks]).sum(0)
    assert counts[4] > counts[2] > counts[0] > 0  # proportional to the scores
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(select_units(scores, 3, "sampling", g1), select_units(scores, 3, "sampling", g2))


def test_non_finite_scores_never_crash_selection():
    scores = torch.tensor([float("nan"), 1.0, float("inf"), 2.0, float("-inf")])
    assert select_units(scores, 2, "topk").tolist() == [2, 3]
    assert select_units(scores, 2, "sampling", torch.Generator().manual_seed(0)).numel() == 2
    nan_only = torch.full((4,), float("nan"))
    assert select_units(nan_only, 2, "sampling", torch.Generator().manual_seed(0)).numel() == 2
    assert select_units(nan_only, 2, "topk").numel() == 2


def _host_reads(layers: int, inputs: dict) -> int:
    """Operators of one SAT training step (the defaults, forward and backward) whose result the host reads from the
    device, a sync on an accelerator: scalar reads, ``nonzero`` and boolean indexing (its size is data). Counted on a
    CPU through the dispatcher, which sees the same operators."""
    aten = torch.ops.aten
    count = 0

    class HostReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal count
            boolean_index = func is aten.index.Tensor and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]
            )
            count += func in (aten._local_scalar_dense.default, aten.nonzero.default) or boolean_index
            return func(*args, **(kwargs or {}))

    model = get_peft_model(tiny_model(num_hidden_layers=layers), peft_sat.SATConfig()).train()
    with HostReads():
        model(**inputs).loss.backward()
    return count


@pytest.mark.parametrize("batch_kind", ["mask of ones", "padded", "prompts (split)"])
def test_a_sparse_block_never_waits_for_the_device(batch_kind):
    """With the defaults, scoring, selection and the sliced step read no device value per block: a four-layer step
    reads as many as a two-layer one (what a forward reads once, e.g. where a split's dense rows are, stays). The
    paper's sampled scores still read per block how many tokens are real (the sample's size is data)."""
    inputs = batch(pad=0 if batch_kind == "mask of ones" else 5, prompt=6 if batch_kind == "prompts (split)" else 0)
    two_layers = _host_reads(2, inputs)
    assert two_layers > 0  # the counter sees what a forward reads once (the attention mask's checks, the split)
    assert _host_reads(4, inputs) == two_layers


def test_activation_scores_average_the_real_tokens_only():
    h = torch.randn(2, 6, 10)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, :4] = False  # left padding
    expected = h[mask].abs().mean(dim=0)
    torch.testing.assert_close(importance.activation_scores(h, mask), expected, rtol=1e-6, atol=0)
    everything = h.reshape(-1, 10).abs().mean(dim=0)
    torch.testing.assert_close(importance.activation_scores(h, None), everything, rtol=0, atol=0)
    no_real_token = torch.zeros(2, 6, dtype=torch.bool)  # falls back to every token, as `valid_tokens` does
    torch.testing.assert_close(importance.activation_scores(h, no_real_token), everything, rtol=1e-6, atol=0)
    h[0, :4] = float("nan")  # what padding positions hold never reaches the scores
    torch.testing.assert_close(importance.activation_scores(h, mask), expected, rtol=1e-6, atol=0)
