"""One projection's matmul FLOPs, and which shares of the tokens each ``sparse_pass`` slices (``peft_sat.flops``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SlicedShare:
    """Which shares of the tokens run sliced (kept units only) in each part of a projection's work."""

    forward: float
    input_grad: float
    weight_grad: float
    adapters: bool = True  # whether LoRA factors are sliced too ("weight_grad" trains them whole)

    @classmethod
    def of(cls, sparse_pass: str, dense_fraction: float = 0.0) -> SlicedShare:
        """The shares of a step (table in the ``peft_sat.flops`` docstring); ``dense_fraction`` = f, 0 without a split."""
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
    """FLOPs of one projection over ``tokens`` tokens (see the ``peft_sat.flops`` docstring).

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
