"""The FLOPs model (``peft_sat.flops``): the analytic stack of the benchmarks and the callback's estimate of a real
model, dense and in every SAT mode, against the formulas of its docstring on hand-made shapes."""

from __future__ import annotations

import dataclasses

import pytest
from peft import LoraConfig, get_peft_model
from sat_testing import batch, lora_config, paper_config, tiny_llama, tiny_model, train_step
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import peft_sat
from peft_sat import get_sat_state
from peft_sat.blocks.lm_head import SATLMHeadMixin
from peft_sat.flops import (
    SATFlopsEstimator,
    SlicedShare,
    StackShape,
    ideal_speedup,
    projection_flops,
    training_flops,
)

LAYER = StackShape(hidden=256, intermediate=512, heads=8, kv_heads=8, layers=1, vocab=0, batch=1, seq=64)


def test_ideal_ratio_of_a_bare_layer_at_half_rate():
    # every matmul of a bare MHA layer scales with the kept units: exactly half the FLOPs at r = 0.5
    assert ideal_speedup(LAYER, "full", 0.5) == 2.0
    assert ideal_speedup(LAYER, "full", 0.0) == 1.0
    # LoRA's A factors read the full input of q/k/v/gate/up, so LoRA saves a little less than half
    assert 1.8 < ideal_speedup(LAYER, "lora", 0.5) < 2.0
    assert training_flops(LAYER, "lora", 0.0) == training_flops(LAYER, "qlora", 0.0)
    # the dense LM head caps the speed-up of a whole model
    model = StackShape(hidden=256, intermediate=512, heads=8, kv_heads=8, layers=1, vocab=4096, batch=1, seq=64)
    assert ideal_speedup(model, "full", 0.5) < ideal_speedup(LAYER, "full", 0.5)
    # omitting one kind of unit: a smaller speed-up, and the two kinds' savings add up to the whole
    dense, both = training_flops(LAYER, "full", 0.0), training_flops(LAYER, "full", 0.5)
    mlp_only = training_flops(LAYER, "full", 0.5, omit=("mlp",))
    attention_only = training_flops(LAYER, "full", 0.5, omit=("attention",))
    assert both < mlp_only < dense and both < attention_only < dense
    assert (dense - mlp_only) + (dense - attention_only) == dense - both  # integer-valued floats: exact


# LAYER's forward FLOPs per token: q and o 2 x 256 x 256 each, k and v as much together (8 KV heads), the MLP
# 3 x 2 x 256 x 512, the attention core 2 x 2 x 32 x 32 x 8 (32 keys per query on average, head dim 32, 8 heads);
# backward twice each
Q_AND_O, K_AND_V, MLP, CORE = 262144, 262144, 786432, 32768
LAYER_FORWARD = Q_AND_O + K_AND_V + MLP + CORE


@pytest.mark.parametrize(
    "sparse_pass,dense_fraction,omit,ideal",
    [
        ("backward", 0.0, ("mlp", "attention"), 3 / (1 + 2 * 0.5)),  # full forward, half of the backward
        # half the tokens dense, half at half cost, except the omitted heads' k and v: they run on every token
        ("forward_backward", 0.5, ("mlp", "attention"), 1 / (1 - 0.5 * 0.5 * (Q_AND_O + MLP + CORE) / LAYER_FORWARD)),
        # dense tokens whole, the others half of the MLP's backward
        ("backward", 0.5, ("mlp",), 3 * LAYER_FORWARD / (3 * LAYER_FORWARD - 2 * MLP * 0.5 * 0.5)),
    ],
)
def test_ideal_ratio_of_the_modes_beyond_the_paper(sparse_pass, dense_fraction, omit, ideal):
    ratio = ideal_speedup(LAYER, "full", 0.5, omit=omit, sparse_pass=sparse_pass, dense_fraction=dense_fraction)
    assert ratio == pytest.approx(ideal)


def test_weight_grad_halves_the_weight_gradient_only():
    # projections: forward, input gradient, half the weight gradient; the attention core's gradient stays whole
    ratio = ideal_speedup(LAYER, "full", 0.5, sparse_pass="weight_grad")
    assert 1.19 < ratio < 3 / (1 + 1 + 0.5)
    assert ideal_speedup(LAYER, "lora", 0.5, sparse_pass="weight_grad") == 1.0  # frozen base: nothing to save


def test_sliced_share_table():
    assert SlicedShare.of("forward_backward", 0.0) == SlicedShare(1.0, 1.0, 1.0)
    assert SlicedShare.of("forward_backward", 0.25) == SlicedShare(0.75, 0.75, 0.75)
    assert SlicedShare.of("backward", 0.0) == SlicedShare(0.0, 1.0, 1.0)
    assert SlicedShare.of("backward", 0.25) == SlicedShare(0.0, 0.75, 0.75)
    assert SlicedShare.of("weight_grad", 0.25) == SlicedShare(0.0, 0.0, 0.75, adapters=False)


def _estimator(model) -> SATFlopsEstimator:
    return SATFlopsEstimator(model, get_sat_state(model))


def test_estimate_of_a_real_model_matches_the_formula():
    hidden, inter, heads, kv_heads, head_dim, vocab, layers = 64, 128, 4, 2, 16, 128, 2
    mlp = 3 * hidden * inter
    q_o = 2 * hidden * heads * head_dim
    k_v = 2 * hidden * kv_heads * head_dim
    macs = layers * (mlp + q_o + k_v) + hidden * vocab  # + LM head
    # full-parameter: 2 FLOPs per multiply-add forward, 4 backward (input and weight gradients)
    model = peft_sat.apply_sat(tiny_llama(), paper_config(omission_rate=0.5, train_base=True))
    assert _estimator(model).dense_cost == 6 * macs
    assert _estimator(model).saved_fraction(0.5) == pytest.approx(layers * (mlp + q_o + k_v) * 0.5 / macs)
    assert _estimator(model).saved_fraction(0.0) == 0.0
    # the sparse backward saves the backward's two thirds; dense tokens save nothing in either pass
    backward = _estimator(model).saved_fraction(0.5, "backward")
    assert backward == pytest.approx(layers * (mlp + q_o + k_v) * 0.5 / macs * 2 / 3)
    # in a split the omitted heads' k / v run on every position (the dense rows' queries read them), q and o on the
    # dense rows only
    split = _estimator(model).saved_fraction(0.5, "forward_backward", dense_fraction=0.25)
    assert split == pytest.approx(layers * (mlp + q_o) * 0.5 / macs * 0.75)
    weight_grad = _estimator(model).saved_fraction(0.5, "weight_grad")
    assert weight_grad == pytest.approx(layers * (mlp + q_o + k_v) * 0.5 / macs / 3)
    # context tokens forward only: their backward of the MLP and q / o, and k / v's input gradient, at any rate
    cut = _estimator(model).saved_fraction(0.5, dense_fraction=0.25, context_forward_only=True)
    assert cut == pytest.approx(layers * (4 * mlp + 4 * q_o + 2 * k_v) * 0.75 / (6 * macs))
    # ... and the rows trailing each sequence's last dense one (a share 0.2) skip the MLP's forward too
    trailing = _estimator(model).saved_fraction(0.5, dense_fraction=0.25, context_forward_only=True, live_fraction=0.8)
    assert trailing - cut == pytest.approx(layers * 2 * mlp * 0.2 / (6 * macs))
    # q_head: k/v projections are counted dense; rate 0.25 of 4 heads omits 1, of 128 channels 32
    model = peft_sat.apply_sat(tiny_llama(), paper_config(head_granularity="q_head", train_base=True))
    assert _estimator(model).saved_fraction(0.25) == pytest.approx(layers * (mlp + q_o) * 0.25 / macs)
    assert _estimator(model).kept_fraction(0.25) == pytest.approx((96 + 3) * layers / ((128 + 4) * layers))
    # LoRA: frozen base weights cost forward + input gradient only; adapter layers are not counted
    lora = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear"))
    peft_sat.apply_sat(lora, paper_config(omit=["mlp"]))
    assert _estimator(lora).dense_cost == 4 * macs
    assert _estimator(lora).saved_fraction(0.5) == pytest.approx(layers * mlp * 0.5 / macs)
    assert _estimator(lora).saved_fraction(0.5, "backward") == pytest.approx(layers * mlp * 0.5 / macs / 2)


def test_a_loss_that_bypasses_the_head_saves_nothing_in_it():
    """TRL's fused LM head reads ``lm_head.weight`` itself and runs every row forward and backward: SAT's head never
    runs, so the estimate must not count the head's backward as saved on the context rows."""
    from trl.trainer.utils import add_fused_lm_head

    base = tiny_llama()
    add_fused_lm_head(base)
    model = peft_sat.apply_sat(base, peft_sat.SATConfig(omission_rate=0.5, train_base=True))
    state, estimator = get_sat_state(model), _estimator(model)
    inputs = batch(prompt=8)
    model.train()
    model(**inputs)  # the model's own head: SAT's
    assert state.head_split_forwards == 1
    model(**inputs, fused_lm_head=True)
    assert state.head_split_forwards == 1  # unchanged: the fused head bypassed SAT's
    f = state.dense_fractions[-1]
    assert 0 < f < 1 and estimator.head_backward > 0
    through, bypassed = (
        estimator.saved_fraction(0.5, dense_fraction=f, context_forward_only=True, head_share=share)
        for share in (1.0, 0.0)
    )
    assert through - bypassed == pytest.approx(estimator.head_backward * (1 - f) / estimator.dense_cost)
    # a fused head that scores the loss positions only: the dense step runs the head on the share f of the rows
    lm_head = base.get_output_embeddings()
    head = 2 * lm_head.in_features * lm_head.out_features * 3  # forward, input and weight gradients (train_base)
    assert estimator.head_cost == head
    on_loss_rows = estimator.saved_fraction(
        0.5, dense_fraction=f, context_forward_only=True, head_share=0.0, bypassed_head_rows=f
    )
    assert on_loss_rows == pytest.approx(bypassed * estimator.dense_cost / (estimator.dense_cost - head * (1 - f)))


def test_an_unsplit_step_under_a_loss_rows_head_counts_the_head_on_those_rows():
    """Without a split (``dense_tokens="none"``, or every token carrying loss) SAT leaves the LM head alone, but a
    fused loss that scores the loss positions only (TRL's on CUDA) still makes the dense step's head cost their
    share: the blocks' saving is counted against that smaller dense step."""
    model = peft_sat.apply_sat(tiny_llama(), paper_config(omit=["mlp"], dense_tokens="none"))
    estimator = _estimator(model)
    lm_head = model.get_output_embeddings()
    assert not isinstance(lm_head, SATLMHeadMixin) and estimator.head_backward == 0
    assert estimator.head_cost == 2 * lm_head.in_features * lm_head.out_features * 3  # forward, both gradients
    every_row = estimator.saved_fraction(0.5)
    share = 0.3
    on_loss_rows = estimator.saved_fraction(0.5, head_share=0.0, bypassed_head_rows=share)
    dense = estimator.dense_cost
    assert on_loss_rows == pytest.approx(every_row * dense / (dense - estimator.head_cost * (1 - share)))
    assert estimator.saved_fraction(0.5, head_share=0.0, bypassed_head_rows=1.0) == every_row


def test_a_head_on_the_labelled_positions_only_saves_nothing_and_costs_their_share():
    """``head_rows`` < 1 (TRL's fused head): the head runs on that share of the positions in both arms, so the split
    saves exactly what it saves without a head."""
    shape = StackShape(batch=2, seq=64, layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=256)
    body = dataclasses.replace(shape, vocab=0)
    split = dict(dense_fraction=0.25, context_forward_only=True)
    for variant in ("full", "lora"):
        head = projection_flops(shape.tokens * 0.25, 64, 256, weight_trains=variant == "full")
        dense = training_flops(shape, variant, 0.0, head_rows=0.25)
        sat = training_flops(shape, variant, 0.5, head_rows=0.25, **split)
        assert dense == pytest.approx(training_flops(body, variant, 0.0) + head)
        assert dense - sat == pytest.approx(
            training_flops(body, variant, 0.0) - training_flops(body, variant, 0.5, **split)
        )
        assert ideal_speedup(shape, variant, 0.5, head_rows=0.25, **split) == pytest.approx(dense / sat)
        # rows trailing each sequence's last dense one (a share 0.2): the MLP's forward is saved on them too
        trailing = training_flops(shape, variant, 0.5, head_rows=0.25, live_fraction=0.8, **split)
        mlp_forward = 3 * projection_flops(shape.tokens, 64, 128, lora_rank=16 * (variant == "lora"), backward=False)
        assert sat - trailing == pytest.approx(shape.layers * mlp_forward * 0.2)
        # every position: SAT's head saves its context rows' backward, so the split saves more
        every = training_flops(shape, variant, 0.0) - training_flops(shape, variant, 0.5, **split)
        assert every > dense - sat


LORA_RANK = 5  # no other dimension of the tiny models or batches is 5: a product with a 5 is an adapter's


class _ProjectionFlops(TorchDispatchMode):
    """Counts the FLOPs of the 2-D products dispatched inside it (``mm`` / ``addmm``, torch's own per-op formulas;
    the attention core runs ``bmm`` or a fused kernel), LoRA adapters' products (a dimension of ``LORA_RANK``)
    apart: the estimate counts the base projections only."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = {"base": 0, "adapters": 0}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if str(func._overloadpacket) in ("aten.mm", "aten.addmm"):
            a, b = args[-2:] if str(func._overloadpacket) == "aten.mm" else args[1:3]
            part = "adapters" if LORA_RANK in (*a.shape, *b.shape) else "base"
            self.flops[part] += flop_registry[func._overloadpacket](*args, **kwargs, out_val=out)
        return out


def _projection_flops(model, inputs, lora: bool) -> dict[str, int]:
    """The base projections' and the adapters' FLOPs in one forward + backward."""
    with _ProjectionFlops() as counter:
        train_step(model, inputs)
    model.zero_grad(set_to_none=True)
    assert counter.flops["base"] and bool(counter.flops["adapters"]) == lora
    return counter.flops


# magnitude scores: "maxip" would add its sampled tokens' projections, which the estimate leaves out
SCORED = dict(importance="magnitude")
MODES = {  # name: (config, prompt tokens per row: > 0 splits the batch)
    "paper": (paper_config(**SCORED), 0),
    "paper q_head": (paper_config(head_granularity="q_head", **SCORED), 0),
    "paper + token split": (paper_config(dense_tokens="loss", **SCORED), 6),
    "paper + token split, q_head": (paper_config(dense_tokens="loss", head_granularity="q_head", **SCORED), 6),
    "sparse backward": (peft_sat.SATConfig(omit=["mlp", "attention"], **SCORED), 0),
    "weight grad": (peft_sat.SATConfig(sparse_pass="weight_grad", omit=["mlp", "attention"], **SCORED), 0),
    "sparse backward + token split": (peft_sat.SATConfig(dense_tokens="loss", context_tokens="sparse", **SCORED), 6),
    "defaults, split": (peft_sat.SATConfig(omit=["mlp", "attention"], **SCORED), 6),
}


@pytest.mark.parametrize("stack", ["full", "lora"])
@pytest.mark.parametrize("family", ["llama", "phi3"])  # separate q / k / v / gate / up, and Phi3's fused ones
@pytest.mark.parametrize("mode", list(MODES))
def test_the_estimate_is_the_matmul_flops_a_step_saves(family, mode, stack):
    """The callback's estimate against the FLOPs of the base projections' products a SAT step really runs, counted
    op by op, on a batch with padding (its sequences hold different numbers of dense rows): equal in every mode,
    except that with ``q_head`` units a step that drops every query head of a KV head also skips its keys and
    values, which the estimate counts dense: it never overstates the saving.

    Under LoRA the estimate counts every projection's input gradient, and so does this step: the embeddings'
    output requires a gradient (``enable_input_require_grads``, as PEFT sets it for gradient checkpointing).
    Without it layer 0's q / k / v skip their input gradient in both arms, a share of the step that shrinks with
    depth (two layers here, thirty in SmolLM2)."""
    config, prompt = MODES[mode]
    lora = stack == "lora"
    if lora:
        model = peft_sat.apply_sat(get_peft_model(tiny_model(family), lora_config(r=LORA_RANK)), config).train()
        model.enable_input_require_grads()
    else:
        model = get_peft_model(tiny_model(family), config).train()
    state = get_sat_state(model)
    inputs = batch(prompt=prompt)
    state.set_omission_rate(0.0)
    dense = _projection_flops(model, inputs, lora)
    state.set_omission_rate(0.5)
    state.dense_fractions.clear()
    state.live_fractions.clear()
    sparse = _projection_flops(model, inputs, lora)
    dense_fraction = state.dense_fractions[-1] if state.dense_fractions else 0.0
    assert (dense_fraction > 0) == (prompt > 0)
    live_fraction = state.live_fractions[-1] if state.live_fractions else 1.0
    head_share = min(1.0, state.head_split_forwards)
    estimate = _estimator(model).step_saving(config, 0.5, dense_fraction, head_share, live_fraction=live_fraction)
    if lora and mode == "weight grad":  # the adapters train whole: each of their products runs once, as in dense
        assert sparse["adapters"] == dense["adapters"]
    measured = 1 - sparse["base"] / dense["base"]
    assert (estimate > 0) == (not lora or mode != "weight grad") and estimate < 1  # frozen base: nothing to save
    if mode == "paper q_head":
        assert estimate <= measured + 1e-12
    else:
        assert measured == pytest.approx(estimate, rel=1e-9, abs=1e-12)
