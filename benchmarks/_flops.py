"""Analytic matmul FLOPs of one training step of a Llama-shaped decoder stack, dense or with SAT's kept units.

Shared by ``bench_step.py`` and ``speed.py``: the "ideal" speed-up of a SAT step is dense FLOPs / SAT FLOPs.

Counted: every projection (2 N in out forward; backward 2 N in out for the input gradient, unless the input needs
none, and 2 N in out for the weight gradient when it trains), the LoRA factors A (in -> r) and B (r -> out), the
attention core (QK^T and AV, causal: T/2 keys per query on average; backward twice forward) and the LM head. The
embedding is a gather (no FLOPs); norms, activations, 4-bit dequantization and the optimizer are not counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft_sat.selection import num_kept


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


OMIT_ALL = ("mlp", "attention")


def training_flops(
    shape: StackShape,
    variant: str,
    rate: float,
    head_granularity: str = "kv_group",
    lora_rank: int = 16,
    omit: tuple[str, ...] = OMIT_ALL,
) -> float:
    """Matmul FLOPs of one forward + backward at omission rate ``rate`` (0: dense); see the module docstring.

    ``omit`` (``SATConfig.omit``): the kinds of units the rate applies to; the others stay dense.

    ``variant``: "full" (every weight trains), "lora" or "qlora" (frozen base, rank-``lora_rank`` adapters on every
    projection). Under (Q)LoRA nothing before layer 0 requires grad, so its input gradient is skipped unless
    ``shape.first_input_grad``.
    """
    tokens = shape.tokens
    head_dim = shape.head_dim or shape.hidden // shape.heads
    groups = shape.heads // shape.kv_heads
    inter = num_kept(shape.intermediate, rate if "mlp" in omit else 0.0)
    head_rate = rate if "attention" in omit else 0.0
    if head_granularity == "kv_group":
        kv_heads = num_kept(shape.kv_heads, head_rate)
        q_heads = kv_heads * groups
    else:
        q_heads = num_kept(shape.heads, head_rate)
        kv_heads = min(shape.kv_heads, q_heads)  # at most; the exact count depends on which heads are kept
    lora = variant in ("lora", "qlora")

    def projection(d_in: int, d_out: int, input_grad: bool) -> int:
        forward = 2 * tokens * d_in * d_out
        total = forward * (1 + int(input_grad) + int(not lora))
        if lora:  # A: (d_in -> r), B: (r -> d_out); both train; sliced like the base weight
            total += 2 * tokens * d_in * lora_rank * (2 + int(input_grad)) + 3 * 2 * tokens * lora_rank * d_out
        return total

    H = shape.hidden
    total = 0
    for layer in range(shape.layers):
        input_grad = layer > 0 or not lora or shape.first_input_grad
        # rows sliced: q/k/v/gate/up read the full input and write kept rows
        total += projection(H, q_heads * head_dim, input_grad)
        total += 2 * projection(H, kv_heads * head_dim, input_grad)
        total += 2 * projection(H, inter, input_grad)
        # columns sliced: o/down read only kept inputs and write the full output
        total += projection(q_heads * head_dim, H, True)
        total += projection(inter, H, True)
        total += 3 * 2 * (2 * tokens * (shape.seq / 2) * head_dim * q_heads)  # attention core, fwd + bwd
    if shape.vocab:
        total += 2 * tokens * H * shape.vocab * (2 + int(not lora))  # LM head (frozen under LoRA; input grad needed)
    return float(total)


def ideal_speedup(
    shape: StackShape, variant: str, rate: float, head_granularity: str = "kv_group", omit: tuple[str, ...] = OMIT_ALL
) -> float:
    """Dense FLOPs / SAT FLOPs: the speed-up of a SAT step at 100% efficiency."""
    dense = training_flops(shape, variant, 0.0, head_granularity)
    return dense / training_flops(shape, variant, rate, head_granularity, omit=omit)
