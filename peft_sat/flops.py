"""Matmul FLOPs of a training step, dense or with SAT: one model for the callback's estimate and the benchmarks.

Per token, a projection ``(in -> out)`` costs::

    forward               2 in out
    backward, input grad  2 in out     (when its input needs a gradient)
    backward, weight grad 2 in out     (when its weight trains)
    LoRA rank r           A (in -> r) and B (r -> out) like projections of their own, both trained

SAT scales a projection of a block with n units by the kept fraction ``k / n`` (``k = num_kept(n, r)``) in the parts
of its work and on the tokens it slices (``SATConfig.sparse_pass``; with ``dense_tokens`` splitting a batch the
dense tokens, a share f, run everything, the others a share 1 - f)::

    sparse_pass        forward    input grad    weight grad     sliced on the share
    forward_backward   sliced     sliced        sliced          1 - f  (every token without a split)
    backward           dense      sliced        sliced          1 - f
    weight_grad        dense      dense         sliced          1 - f

With ``context_tokens="forward_only"`` a split batch's context tokens run every unit forward and no backward: the
MLP, the query / output projections and the LM head save their whole backward on the share 1 - f, key / value
projections their input gradient (their weights still learn from the dense tokens' attention). The LM head saves
only in the forwards that call it. The positions after each sequence's last dense one (a share 1 - l of a split
batch, ``tokens.LiveRows``) skip the MLP blocks: their forward is saved too. A loss that reads the head's weight
itself (TRL's fused LM head in ``SFTTrainer``) runs the head on every row or, where TRL scores the labelled
positions only (on CUDA; on a CPU with the recipes' patch), on the loss positions alone: then the dense step's head
costs that share of its FLOPs, and so does the estimate's.

Not counted: embeddings (a gather), norms, activations, 4-bit dequantization, the optimizer, the importance scores.
``training_flops`` also counts the attention core (Q K^T and A V, causal: T / 2 keys per query on average, backward
twice the forward) and the LM head, for Llama-shaped stacks given by their shape (``StackShape``);
``SATFlopsEstimator`` reads the projections of a real model.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .blocks import SATBlockMixin, block_kind
from .blocks.lm_head import SATLMHeadMixin
from .model import adapter_module_ids, lm_head
from .selection import num_kept
from .state import SATState

OMIT_ALL = ("mlp", "attention")


@dataclass(frozen=True)
class SlicedShare:
    """Which shares of the tokens run sliced (kept units only) in each part of a projection's work."""

    forward: float
    input_grad: float
    weight_grad: float
    adapters: bool = True  # whether LoRA factors are sliced too ("weight_grad" trains them whole)

    @classmethod
    def of(cls, sparse_pass: str, dense_fraction: float = 0.0) -> SlicedShare:
        """The shares of a step (table in the module docstring); ``dense_fraction`` = f, 0 without a split."""
        sparse = 1.0 - dense_fraction
        if sparse_pass == "backward":
            return cls(forward=0.0, input_grad=sparse, weight_grad=sparse)
        if sparse_pass == "weight_grad":
            return cls(forward=0.0, input_grad=0.0, weight_grad=sparse, adapters=False)
        return cls(forward=sparse, input_grad=sparse, weight_grad=sparse)


NOTHING_SLICED = SlicedShare(0.0, 0.0, 0.0)


def projection_flops(
    tokens: float,
    d_in: int,
    d_out: int,
    *,
    input_grad: bool = True,
    weight_trains: bool = True,
    lora_rank: int = 0,
    kept: float = 1.0,
    sliced: SlicedShare = NOTHING_SLICED,
    by_rows: bool = True,
    backward: bool = True,
) -> float:
    """FLOPs of one projection over ``tokens`` tokens (see the module docstring).

    ``kept``: the kept fraction ``k / n`` of its units (1.0 for a dense projection), output rows (``by_rows``) or
    input columns; ``sliced``: which shares of the tokens run the kept units only, per part of the work. Of the LoRA
    factors only the one on the sliced side scales: B (r -> out) for rows, A (in -> r) for columns. ``backward``
    False: the forward alone.
    """
    scales = (
        1.0 - (1.0 - kept) * sliced.forward,
        (1.0 - (1.0 - kept) * sliced.input_grad) * backward,
        (1.0 - (1.0 - kept) * sliced.weight_grad) * backward,
    )
    forward = 2.0 * d_in * d_out
    total = forward * (scales[0] + int(input_grad) * scales[1] + int(weight_trains) * scales[2])
    if lora_rank:
        a_forward, b_forward = 2.0 * d_in * lora_rank, 2.0 * lora_rank * d_out
        unsliced = (1.0, float(backward), float(backward))
        sliced_side = scales if sliced.adapters else unsliced
        a_scales, b_scales = (unsliced, sliced_side) if by_rows else (sliced_side, unsliced)
        total += a_forward * (a_scales[0] + a_scales[2] + int(input_grad) * a_scales[1])  # A: dA, input grad
        total += b_forward * (b_scales[0] + b_scales[2] + b_scales[1])  # B: dB, gradient of A's output
    return tokens * total


# ---- Llama-shaped stacks given by their shape (benchmarks) -------------------------------------------------------


@dataclass(frozen=True)
class StackShape:
    """The shape of a decoder stack and of the batch it trains on."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int  # 0: no LM head (a bare decoder layer)
    batch: int
    seq: int
    head_dim: int | None = None  # default hidden // heads
    first_input_grad: bool = False  # whether the input of layer 0 needs a gradient (a layer inside a deeper stack)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @classmethod
    def from_config(cls, config, batch: int, seq: int, **overrides) -> StackShape:
        """The shape of a transformers Llama-family config (``overrides``: e.g. ``layers=1, vocab=0``)."""
        fields = dict(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            heads=config.num_attention_heads,
            kv_heads=config.num_key_value_heads,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
            head_dim=getattr(config, "head_dim", None),
        )
        return cls(batch=batch, seq=seq, **{**fields, **overrides})


def training_flops(
    shape: StackShape,
    variant: str,
    rate: float,
    head_granularity: str = "kv_group",
    lora_rank: int = 16,
    omit: tuple[str, ...] = OMIT_ALL,
    sparse_pass: str = "forward_backward",
    dense_fraction: float = 0.0,
    context_forward_only: bool = False,
    head_rows: float = 1.0,
    live_fraction: float = 1.0,
) -> float:
    """Matmul FLOPs of one forward + backward of ``shape`` at omission rate ``rate`` (0: dense).

    ``variant``: "full" (every weight trains), "lora" or "qlora" (frozen base, rank-``lora_rank`` adapters on every
    projection; nothing before layer 0 needs a gradient unless ``shape.first_input_grad``). ``omit``,
    ``sparse_pass``: as in ``SATConfig``; ``dense_fraction``: the share of token positions that run the whole block
    (``SATConfig.dense_tokens``); ``context_forward_only``: ``context_tokens="forward_only"`` (the other tokens need
    no backward, units play no part). With ``q_head`` granularity the kept KV heads are at most
    ``min(n_kv, kept q)``. ``head_rows``: the share of the positions the LM head runs on, forward and backward, at
    every rate (below 1: a loss that scores the labelled positions only, as TRL's fused head; SAT's head saves
    nothing then); 1: every position, whose context rows SAT's head runs forward only when the batch splits.
    ``live_fraction``: with ``context_forward_only``, the share of the positions the MLP blocks compute (the others
    trail their sequence's last dense position).
    """
    if shape.vocab and head_rows < 1.0:
        body = replace(shape, vocab=0)
        head = projection_flops(
            shape.tokens * head_rows, shape.hidden, shape.vocab, weight_trains=variant not in ("lora", "qlora")
        )
        return head + training_flops(
            body, variant, rate, head_granularity, lora_rank, omit, sparse_pass, dense_fraction, context_forward_only,
            live_fraction=live_fraction,
        )  # fmt: skip
    rank = lora_rank if variant in ("lora", "qlora") else 0
    if context_forward_only and rate > 0 and dense_fraction > 0:
        full = _stack_flops(shape, variant, rank, NOTHING_SLICED, (1.0, 1.0, 1.0, 1.0))
        forward = _stack_flops(shape, variant, rank, NOTHING_SLICED, (1.0, 1.0, 1.0, 1.0), backward=False)
        head_dim = shape.head_dim or shape.hidden // shape.heads
        kv_weights = 0.0 if rank else 2 * 2.0 * shape.hidden * shape.kv_heads * head_dim * shape.layers
        mlp = projection_flops(shape.tokens, shape.hidden, shape.intermediate, lora_rank=rank, backward=False)
        trailing = 3 * mlp * shape.layers * (1 - live_fraction)  # gate, up, down forward
        return (
            forward + (full - forward) * dense_fraction + kv_weights * shape.tokens * (1 - dense_fraction) - trailing
        )
    sliced = SlicedShare.of(sparse_pass, dense_fraction) if rate > 0 else NOTHING_SLICED
    mlp_kept = num_kept(shape.intermediate, rate) / shape.intermediate if "mlp" in omit else 1.0
    if "attention" not in omit:
        q_kept = kv_kept = 1.0
    elif head_granularity == "kv_group":
        q_kept = kv_kept = num_kept(shape.kv_heads, rate) / shape.kv_heads
    else:
        kept_q = num_kept(shape.heads, rate)
        q_kept, kv_kept = kept_q / shape.heads, min(shape.kv_heads, kept_q) / shape.kv_heads
    # a split batch projects the omitted heads' q, k and v on every position (`SATFlopsEstimator`, `BlockCosts`)
    q_proj_kept, kv_kept = (1.0, 1.0) if rate > 0 and dense_fraction > 0 else (q_kept, kv_kept)
    return _stack_flops(shape, variant, rank, sliced, (q_proj_kept, kv_kept, mlp_kept, q_kept))


def _stack_flops(
    shape: StackShape,
    variant: str,
    rank: int,
    sliced: SlicedShare,
    kept: tuple[float, float, float, float],
    backward: bool = True,
) -> float:
    """FLOPs of ``shape`` with the kept fractions (of q_proj's rows, of k / v_proj's rows, of the MLP channels, of
    the query heads: o_proj's columns and the attention core) and ``sliced`` shares."""
    tokens, hidden = shape.tokens, shape.hidden
    head_dim = shape.head_dim or hidden // shape.heads
    q_proj_kept, kv_kept, mlp_kept, q_kept = kept
    lora = variant in ("lora", "qlora")

    def projection(d_in: int, d_out: int, kept: float, input_grad: bool, by_rows: bool = True) -> float:
        return projection_flops(
            tokens,
            d_in,
            d_out,
            input_grad=input_grad,
            weight_trains=not lora,
            lora_rank=rank,
            kept=kept,
            sliced=sliced,
            by_rows=by_rows,
            backward=backward,
        )

    total = 0.0
    for layer in range(shape.layers):
        input_grad = layer > 0 or not lora or shape.first_input_grad
        q_out, kv_out = shape.heads * head_dim, shape.kv_heads * head_dim
        total += projection(hidden, q_out, q_proj_kept, input_grad)  # q
        total += projection(q_out, hidden, q_kept, True, by_rows=False)  # o
        total += 2 * projection(hidden, kv_out, kv_kept, input_grad)  # k, v
        total += 2 * projection(hidden, shape.intermediate, mlp_kept, input_grad)  # gate, up
        total += projection(shape.intermediate, hidden, mlp_kept, True, by_rows=False)  # down
        core = 2.0 * 2.0 * tokens * (shape.seq / 2) * head_dim * shape.heads  # Q K^T and A V, forward
        total += core * (1 - (1 - q_kept) * sliced.forward)
        total += 2 * core * (1 - (1 - q_kept) * sliced.input_grad) * backward
    if shape.vocab:  # the LM head, dense
        total += projection_flops(tokens, hidden, shape.vocab, weight_trains=not lora, backward=backward)
    return total


def ideal_speedup(
    shape: StackShape,
    variant: str,
    rate: float,
    head_granularity: str = "kv_group",
    omit: tuple[str, ...] = OMIT_ALL,
    sparse_pass: str = "forward_backward",
    dense_fraction: float = 0.0,
    context_forward_only: bool = False,
    head_rows: float = 1.0,
    live_fraction: float = 1.0,
) -> float:
    """Dense FLOPs / SAT FLOPs: the speed-up of a SAT step at 100% efficiency (``head_rows``, ``live_fraction``:
    ``training_flops``)."""
    dense = training_flops(shape, variant, 0.0, head_granularity, head_rows=head_rows)
    sat = training_flops(
        shape,
        variant,
        rate,
        head_granularity,
        omit=omit,
        sparse_pass=sparse_pass,
        dense_fraction=dense_fraction,
        context_forward_only=context_forward_only,
        head_rows=head_rows,
        live_fraction=live_fraction,
    )
    return dense / sat


# ---- a real model's projections (the callback's estimate) ---------------------------------------------------------


class SATFlopsEstimator:
    """Estimate of the training FLOPs that SAT saves, from the shapes of a model's linear layers. An ESTIMATE.

    Every base-model ``nn.Linear`` (4-bit included) counts per token as in ``projection_flops``: the LM head and the
    blocks SAT does not convert dilute the saving. A SAT block's projections scale with its kept units: MLP
    ``gate_proj`` / ``up_proj`` / ``down_proj``; attention ``q/k/v/o_proj`` with ``kv_group`` units, ``q/o_proj``
    with ``q_head`` units (``k/v_proj`` counted dense: a KV head is dropped only when all its query heads are, so
    the estimate may understate such a step's saving). Phi3's fused projections count by their q, k and v rows. In a
    split batch the omitted heads' q, k and v run on every position (``BlockCosts.split``). Input gradients are
    counted for every projection, LoRA adapter matmuls, the importance scores and the attention core are not.
    ``tests/test_flops.py`` checks the estimate against the matmul FLOPs each mode's step runs.
    """

    def __init__(self, model: nn.Module, sat_state: SATState) -> None:
        self.sat_state = sat_state
        costs = {id(m): _costs(m) for m in _base_linears(model)}
        self.dense_cost = sum(sum(parts) for parts in costs.values())
        self.blocks = [_block_costs(m, costs) for m in model.modules() if _is_sat_block(m, sat_state)]
        # per token, what a trailing row of a split batch saves beyond a context row: the MLP's forward
        self.trailing_cost = sum(block.cut[0] for block in self.blocks if block.mlp)
        self.num_units = sum(block.units for block in self.blocks if block.omits)
        # the LM head's cost, whether SAT converted it or not (a fused loss may run it on the loss rows only); its
        # backward is saved on the context rows only where SAT converted it
        head = lm_head(model)
        head_costs = costs.get(id(head), (0.0, 0.0, 0.0))
        converted = isinstance(head, SATLMHeadMixin) and head.sat_state is sat_state
        self.head_cost = sum(head_costs)
        self.head_backward = sum(head_costs[1:]) if converted else 0.0

    def kept_fraction(self, rate: float) -> float:
        """Kept units / all units of the SAT blocks at omission rate ``rate`` (1.0 without blocks)."""
        if not self.num_units:
            return 1.0
        kept = sum(num_kept(block.units, rate) for block in self.blocks if block.omits)
        return kept / self.num_units

    def saved_fraction(
        self,
        rate: float,
        sparse_pass: str = "forward_backward",
        dense_fraction: float = 0.0,
        context_forward_only: bool = False,
        head_share: float = 1.0,
        bypassed_head_rows: float = 1.0,
        live_fraction: float = 1.0,
    ) -> float:
        """Estimated fraction of one dense training step's FLOPs saved by a step at omission rate ``rate``, with
        ``dense_fraction`` of the token positions dense (0: no split) and, when split, the context tokens running
        forward only (``context_forward_only``) or on the sub-network. ``head_share``: the share of the step's
        forwards whose LM head ran through SAT's head (``SATState.head_split_forwards``); a loss that reads the
        head's weight itself saves nothing there, and runs the head on ``bypassed_head_rows`` of the positions
        (1: every row; the share of positions carrying loss, as TRL's fused head on CUDA). ``live_fraction``: with
        context tokens forward only, the share of positions the MLP blocks compute (``SATState.live_fractions``). The
        saving is counted against the dense step's FLOPs with that head, split or not::

            dense = all projections - head x (1 - head_share) x (1 - bypassed_head_rows)"""
        if rate <= 0 or not self.dense_cost:
            return 0.0
        dense = self.dense_cost - self.head_cost * (1.0 - head_share) * (1.0 - bypassed_head_rows)
        if context_forward_only and dense_fraction > 0:
            saved = sum(block.cut[1] + block.cut[2] for block in self.blocks) + self.head_backward * head_share
            return (saved * (1.0 - dense_fraction) + self.trailing_cost * (1.0 - live_fraction)) / dense
        sliced = SlicedShare.of(sparse_pass, dense_fraction)
        shares = (sliced.forward, sliced.input_grad, sliced.weight_grad)
        saved = sum(
            (1.0 - num_kept(block.units, rate) / block.units)
            * sum(cost * share for cost, share in zip(block.split if dense_fraction > 0 else block.scaled, shares))
            for block in self.blocks
            if block.omits
        )
        return saved / dense

    def step_saving(
        self,
        config,
        rate: float,
        dense_fraction: float = 0.0,
        head_share: float = 1.0,
        bypassed_head_rows: float = 1.0,
        live_fraction: float = 1.0,
    ) -> float:
        """``saved_fraction`` of a step at ``rate`` under ``config``'s ``sparse_pass`` and ``context_tokens``."""
        forward_only = config.context_tokens == "forward_only" and self.sat_state.context_forward_only
        return self.saved_fraction(
            rate,
            config.sparse_pass,
            dense_fraction,
            context_forward_only=forward_only,
            head_share=head_share,
            bypassed_head_rows=bypassed_head_rows,
            live_fraction=live_fraction,
        )


Costs = tuple[float, float, float]  # (forward, input grad, weight grad) FLOPs per token
NONE: Costs = (0.0, 0.0, 0.0)


@dataclass(frozen=True)
class BlockCosts:
    """What a SAT block's projections cost per token, by the parts a SAT step changes."""

    units: int
    omits: bool  # whether it omits units (a block converted only to cut context tokens' gradient does not)
    mlp: bool
    scaled: Costs  # the projections that scale with the kept units, every token sliced
    split: Costs  # the same in a split batch: the omitted heads' q / k / v run on every position (their keys and
    # values are read by the dense rows' queries; their query is projected whole), their o on the dense rows only
    cut: Costs  # what a context row forward only skips: the MLP's backward, q's and o's (q's weight gradient
    # only where q has a projection of its own), the input gradient of k and v


def _is_sat_block(module: nn.Module, sat_state: SATState) -> bool:
    return isinstance(module, SATBlockMixin) and module.sat_state is sat_state


def _block_costs(module: nn.Module, costs: dict) -> BlockCosts:
    """``BlockCosts`` of a SAT block from its base projections' ``costs``; Phi3's fused ``qkv_proj`` split into its
    q, k and v parts by their output rows."""
    omits = getattr(module, "sat_omits_units", True)
    if block_kind(module) == "mlp":
        mlp = _add(*(_cost(costs, module, name) for name in ("gate_proj", "up_proj", "gate_up_proj", "down_proj")))
        return BlockCosts(module.sat_num_units, omits, True, mlp, mlp, mlp)
    num_heads, num_kv_heads, head_dim = module._sat_shape
    o = _cost(costs, module, "o_proj")
    if hasattr(module, "qkv_proj"):
        fused = _cost(costs, module, "qkv_proj")
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        q, k, v = (_scale(fused, size / (q_size + 2 * kv_size)) for size in (q_size, kv_size, kv_size))
        q_cut = (0.0, q[1], 0.0)  # one projection for every row: its weight learns from the context rows too
    else:
        q, k, v = (_cost(costs, module, name) for name in ("q_proj", "k_proj", "v_proj"))
        q_cut = q
    # q_head units: k / v counted dense (a KV head is dropped only when all its query heads are)
    scaled = _add(q, k, v, o) if getattr(module, "sat_head_granularity", "kv_group") == "kv_group" else _add(q, o)
    cut = _add(q_cut, o, (0.0, k[1] + v[1], 0.0))
    return BlockCosts(module.sat_num_units, omits, False, scaled, o, cut)


def _cost(costs: dict, module: nn.Module, name: str) -> Costs:
    return costs.get(id(_base(getattr(module, name))), NONE) if hasattr(module, name) else NONE


def _add(*parts: Costs) -> Costs:
    return tuple(sum(part[i] for part in parts) for i in range(3))


def _scale(part: Costs, factor: float) -> Costs:
    return tuple(cost * factor for cost in part)


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _costs(layer: nn.Linear) -> tuple[float, float, float]:
    """(forward, input grad, weight grad) FLOPs per token of a base projection; 4-bit (uint8) weights are frozen."""
    weight = layer.weight
    trains = bool(weight.requires_grad) and weight.dtype.is_floating_point
    forward = 2.0 * layer.in_features * layer.out_features
    return forward, forward, forward * int(trains)


def _base_linears(model: nn.Module) -> list[nn.Linear]:
    """Every base-model ``nn.Linear`` (bitsandbytes ``Linear4bit`` is one); LoRA's own A / B layers excluded."""
    adapter_parts = adapter_module_ids(model)
    return [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in adapter_parts]
