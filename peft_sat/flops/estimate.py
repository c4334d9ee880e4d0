"""The callback's estimate of the training FLOPs SAT saves, from a real model's projections (``peft_sat.flops``)."""

from __future__ import annotations

from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..blocks import SATBlockMixin, block_kind
from ..blocks.lm_head import SATLMHeadMixin
from ..model import adapter_module_ids, lm_head
from ..selection import num_kept
from ..state import SATState
from .projection import SlicedShare


class SATFlopsEstimator:
    """Estimate of the training FLOPs that SAT saves, from the shapes of a model's linear layers. An ESTIMATE.

    Every base-model ``nn.Linear`` (4-bit included) counts per token as in ``projection_flops``: the LM head and the
    blocks SAT does not convert dilute the saving. A SAT block's projections scale with its kept units: MLP
    ``gate_proj`` / ``up_proj`` / ``down_proj``; attention ``q/k/v/o_proj`` with ``kv_group`` units, ``q/o_proj``
    with ``q_head`` units (``k/v_proj`` counted dense: a KV head is dropped only when all its query heads are, so
    the estimate may understate such a step's saving). Phi3's fused projections count by their q, k and v rows. In a
    split batch the omitted heads' k and v run on every position (``BlockCosts.split``). Input gradients are
    counted for every projection (with frozen embeddings, as under LoRA, layer 0's q / k / v skip theirs in both arms
    unless the embeddings' output requires a gradient: a share that shrinks with depth); LoRA adapter matmuls, the
    importance scores and the attention core are not counted.
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
    split: Costs  # the same in a split batch: the omitted heads' k / v run on every position (the dense rows'
    # queries read them), their q and o on the dense rows only
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
    return BlockCosts(module.sat_num_units, omits, False, scaled, _add(q, o), cut)


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
