"""Matmul FLOPs of a training step, dense or with SAT: one model for the callback's estimate and the benchmarks.

Per token, a projection ``(in -> out)`` costs::

    forward               2 in out
    backward, input grad  2 in out     (when its input needs a gradient)
    backward, weight grad 2 in out     (when its weight trains)
    LoRA rank r           A (in -> r) and B (r -> out) like projections of their own, both trained

SAT scales a projection of a block with n units by the kept fraction ``k / n`` (``k = num_kept(n, r)``) in the passes
and on the tokens it slices (``SATConfig.sparse_pass``, ``dense_tokens``; f = share of dense token positions)::

    sparse_pass        dense tokens   forward sliced on    backward sliced on
    forward_backward   none           every token          every token
    forward_backward   split          1 - f                1 - f
    backward           none           -                    every token
    backward           split          1 - f                every token

Not counted: embeddings (a gather), norms, activations, 4-bit dequantization, the optimizer, the importance scores.
``training_flops`` also counts the attention core (Q K^T and A V, causal: T / 2 keys per query on average, backward
twice the forward) and the LM head, for Llama-shaped stacks given by their shape (``StackShape``);
``SATFlopsEstimator`` reads the projections of a real model.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .blocks import SATBlockMixin, block_kind
from .model import adapter_module_ids
from .selection import num_kept
from .state import SATState

OMIT_ALL = ("mlp", "attention")


@dataclass(frozen=True)
class SlicedShare:
    """Which shares of the tokens run sliced (kept units only) in each pass."""

    forward: float
    backward: float

    @classmethod
    def of(cls, sparse_pass: str, dense_fraction: float) -> SlicedShare:
        """The shares of a step (table in the module docstring); ``dense_fraction`` = f, 0 without a split."""
        sparse = 1.0 - dense_fraction
        if sparse_pass == "backward":
            return cls(forward=sparse if dense_fraction > 0 else 0.0, backward=1.0)
        return cls(forward=sparse, backward=sparse)


def projection_flops(
    tokens: float,
    d_in: int,
    d_out: int,
    *,
    input_grad: bool = True,
    weight_trains: bool = True,
    lora_rank: int = 0,
    kept: float = 1.0,
    sliced: SlicedShare = SlicedShare(0.0, 0.0),
    by_rows: bool = True,
) -> float:
    """FLOPs of one projection over ``tokens`` tokens (see the module docstring).

    ``kept``: the kept fraction ``k / n`` of its units (1.0 for a dense projection), output rows (``by_rows``) or
    input columns; ``sliced``: which shares of the tokens run the kept units only, per pass. Of the LoRA factors only
    the one on the sliced side scales: B (r -> out) for rows, A (in -> r) for columns.
    """
    forward_scale = 1.0 - (1.0 - kept) * sliced.forward
    backward_scale = 1.0 - (1.0 - kept) * sliced.backward
    forward = 2.0 * d_in * d_out
    total = forward * forward_scale + forward * (int(input_grad) + int(weight_trains)) * backward_scale
    if lora_rank:
        a_forward, b_forward = 2.0 * d_in * lora_rank, 2.0 * lora_rank * d_out
        a_scales = (1.0, 1.0) if by_rows else (forward_scale, backward_scale)
        b_scales = (forward_scale, backward_scale) if by_rows else (1.0, 1.0)
        total += a_forward * a_scales[0] + a_forward * (1 + int(input_grad)) * a_scales[1]  # A: dA, input grad
        total += b_forward * b_scales[0] + b_forward * 2 * b_scales[1]  # B: dB, gradient of A's output
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
) -> float:
    """Matmul FLOPs of one forward + backward of ``shape`` at omission rate ``rate`` (0: dense).

    ``variant``: "full" (every weight trains), "lora" or "qlora" (frozen base, rank-``lora_rank`` adapters on every
    projection; nothing before layer 0 needs a gradient unless ``shape.first_input_grad``). ``omit``,
    ``sparse_pass``: as in ``SATConfig``; ``dense_fraction``: the share of token positions that run the whole block
    (``SATConfig.dense_tokens``). With ``q_head`` granularity the kept KV heads are at most ``min(n_kv, kept q)``.
    """
    tokens, hidden = shape.tokens, shape.hidden
    head_dim = shape.head_dim or hidden // shape.heads
    lora = variant in ("lora", "qlora")
    rank = lora_rank if lora else 0
    sliced = SlicedShare.of(sparse_pass, dense_fraction) if rate > 0 else SlicedShare(0.0, 0.0)
    mlp_kept = num_kept(shape.intermediate, rate) / shape.intermediate if "mlp" in omit else 1.0
    if "attention" not in omit:
        q_kept = kv_kept = 1.0
    elif head_granularity == "kv_group":
        q_kept = kv_kept = num_kept(shape.kv_heads, rate) / shape.kv_heads
    else:
        kept_q = num_kept(shape.heads, rate)
        q_kept, kv_kept = kept_q / shape.heads, min(shape.kv_heads, kept_q) / shape.kv_heads

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
        )

    total = 0.0
    for layer in range(shape.layers):
        input_grad = layer > 0 or not lora or shape.first_input_grad
        q_out, kv_out = shape.heads * head_dim, shape.kv_heads * head_dim
        total += projection(hidden, q_out, q_kept, input_grad)  # q
        total += projection(q_out, hidden, q_kept, True, by_rows=False)  # o
        total += 2 * projection(hidden, kv_out, kv_kept, input_grad)  # k, v
        total += 2 * projection(hidden, shape.intermediate, mlp_kept, input_grad)  # gate, up
        total += projection(shape.intermediate, hidden, mlp_kept, True, by_rows=False)  # down
        core = 2.0 * 2.0 * tokens * (shape.seq / 2) * head_dim * shape.heads  # Q K^T and A V, forward
        total += core * (1 - (1 - q_kept) * sliced.forward) + 2 * core * (1 - (1 - q_kept) * sliced.backward)
    if shape.vocab:
        total += projection_flops(tokens, hidden, shape.vocab, weight_trains=not lora)  # LM head, dense
    return total


def ideal_speedup(
    shape: StackShape,
    variant: str,
    rate: float,
    head_granularity: str = "kv_group",
    omit: tuple[str, ...] = OMIT_ALL,
    sparse_pass: str = "forward_backward",
    dense_fraction: float = 0.0,
) -> float:
    """Dense FLOPs / SAT FLOPs: the speed-up of a SAT step at 100% efficiency."""
    dense = training_flops(shape, variant, 0.0, head_granularity)
    sat = training_flops(
        shape, variant, rate, head_granularity, omit=omit, sparse_pass=sparse_pass, dense_fraction=dense_fraction
    )
    return dense / sat


# ---- a real model's projections (the callback's estimate) ---------------------------------------------------------


class SATFlopsEstimator:
    """Estimate of the training FLOPs that SAT saves, from the shapes of a model's linear layers. An ESTIMATE.

    Every base-model ``nn.Linear`` (4-bit included) counts with ``projection_flops`` per token: the LM head and the
    blocks SAT does not convert dilute the saving. A SAT block's projections scale with its kept units: MLP
    ``gate_proj`` / ``up_proj`` / ``down_proj``; attention ``q/k/v/o_proj`` with ``kv_group`` units, ``q/o_proj``
    with ``q_head`` units (``k/v_proj`` counted dense: a KV head is dropped only when all its query heads are).
    Phi3's fused projections scale as a whole. Input gradients are counted for every projection, LoRA adapter
    matmuls and the attention core are not.
    """

    def __init__(self, model: nn.Module, sat_state: SATState) -> None:
        costs = {id(m): _costs(m) for m in _base_linears(model)}
        self.dense_cost = sum(forward + backward for forward, backward in costs.values())
        # (num_units, forward cost, backward cost of the projections that scale with kept units) per SAT block
        self.blocks: list[tuple[int, float, float]] = []
        for module in model.modules():
            if not isinstance(module, SATBlockMixin) or module.sat_state is not sat_state:
                continue
            if block_kind(module) == "mlp":
                names = ("gate_proj", "up_proj", "gate_up_proj", "down_proj")
            elif getattr(module, "sat_head_granularity", "kv_group") == "kv_group":
                names = ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj")
            else:
                names = ("q_proj", "o_proj")
            parts = [
                costs.get(id(_base(getattr(module, name))), (0.0, 0.0)) for name in names if hasattr(module, name)
            ]
            self.blocks.append((module.sat_num_units, sum(p[0] for p in parts), sum(p[1] for p in parts)))
        self.num_units = sum(units for units, _, _ in self.blocks)

    def kept_fraction(self, rate: float) -> float:
        """Kept units / all units of the SAT blocks at omission rate ``rate`` (1.0 without blocks)."""
        if not self.num_units:
            return 1.0
        return sum(num_kept(units, rate) for units, _, _ in self.blocks) / self.num_units

    def saved_fraction(self, rate: float, sparse_pass: str = "forward_backward", dense_fraction: float = 0.0) -> float:
        """Estimated fraction of one dense training step's FLOPs saved by a step at omission rate ``rate``."""
        if rate <= 0 or not self.dense_cost:
            return 0.0
        sliced = SlicedShare.of(sparse_pass, dense_fraction)
        saved = sum(
            (1.0 - num_kept(units, rate) / units) * (forward * sliced.forward + backward * sliced.backward)
            for units, forward, backward in self.blocks
        )
        return saved / self.dense_cost


def _base(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def _costs(layer: nn.Linear) -> tuple[float, float]:
    """(forward, backward) FLOPs per token of a base projection; 4-bit (uint8) weights are frozen."""
    weight = layer.weight
    trains = bool(weight.requires_grad) and weight.dtype.is_floating_point
    forward = 2.0 * layer.in_features * layer.out_features
    return forward, forward * (1 + int(trains))


def _base_linears(model: nn.Module) -> list[nn.Linear]:
    """Every base-model ``nn.Linear`` (bitsandbytes ``Linear4bit`` is one); LoRA's own A / B layers excluded."""
    adapter_parts = adapter_module_ids(model)
    return [m for m in model.modules() if isinstance(m, nn.Linear) and id(m) not in adapter_parts]
