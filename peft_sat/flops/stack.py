"""Matmul FLOPs of Llama-shaped decoder stacks given by their shape: the benchmarks' ideal ratios."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..selection import num_kept
from .projection import NOTHING_SLICED, SlicedShare, projection_flops

OMIT_ALL = ("mlp", "attention")


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
        full = _stack_flops(shape, variant, rank, NOTHING_SLICED, (1.0, 1.0, 1.0))
        forward = _stack_flops(shape, variant, rank, NOTHING_SLICED, (1.0, 1.0, 1.0), backward=False)
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
    # a split batch projects the omitted heads' k and v on every position (`SATFlopsEstimator`, `BlockCosts`)
    kv_kept = 1.0 if rate > 0 and dense_fraction > 0 else kv_kept
    return _stack_flops(shape, variant, rank, sliced, (q_kept, kv_kept, mlp_kept))


def _stack_flops(
    shape: StackShape,
    variant: str,
    rank: int,
    sliced: SlicedShare,
    kept: tuple[float, float, float],
    backward: bool = True,
) -> float:
    """FLOPs of ``shape`` with the kept fractions (query heads, KV heads, MLP channels) and ``sliced`` shares."""
    tokens, hidden = shape.tokens, shape.hidden
    head_dim = shape.head_dim or hidden // shape.heads
    q_kept, kv_kept, mlp_kept = kept
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
        total += projection(hidden, q_out, q_kept, input_grad)  # q
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
