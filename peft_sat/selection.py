"""Choosing the kept units from importance scores (pure tensor code).

Contract: ``select_units(scores (n,), num_kept, method, generator) -> (num_kept,) int64`` indices, sorted ascending
(sorted gathers read memory in order, and sorted indices make the kept sub-network canonical).
"""

from __future__ import annotations

import math

import torch


def num_kept(num_units: int, omission_rate: float) -> int:
    """Units kept out of ``num_units`` at ``omission_rate``: ``n - floor(r * n)``, at least 1.

    The product is rounded to 6 decimals first so that e.g. 0.29 * 100 omits 29 units, not 28.
    """
    omitted = math.floor(round(omission_rate * num_units, 6))
    return max(1, num_units - omitted)


def select_units(
    scores: torch.Tensor, num_kept: int, method: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Indices of the ``num_kept`` units to keep.

    Args:
        scores: (n,) non-negative importance scores; NaN counts as 0 and +inf as the largest finite score, so
            overflowing activations never crash selection.
        num_kept: how many to keep, 1 <= num_kept <= n.
        method: "topk" (the highest scores; ties broken by index) or "sampling" (without replacement, with
            probability proportional to the score; uniform when every score is 0).
        generator: RNG for "sampling".

    Returns:
        (num_kept,) int64 indices sorted ascending, on ``scores.device``.

    Example:
        >>> select_units(torch.tensor([0.1, 3.0, 2.0, 0.5]), 2, "topk").tolist()
        [1, 2]
    """
    num_units = scores.shape[0]
    if num_kept >= num_units:
        return torch.arange(num_units, device=scores.device)
    scores = _sanitize(scores.float())
    if method == "topk":
        kept = torch.topk(scores, num_kept, sorted=False).indices
    elif method == "sampling":
        weights = torch.where(scores.sum() > 0, scores, torch.ones_like(scores))  # no host sync
        kept = torch.multinomial(weights, num_kept, replacement=False, generator=generator)
    else:
        raise ValueError(f"Unknown selection method {method!r}.")
    return kept.sort().values


def _sanitize(scores: torch.Tensor) -> torch.Tensor:
    """NaN and -inf -> 0, +inf -> the largest finite score (1 when none is finite), then clamped at 0; tensor ops
    only, so that a block's selection never waits for the device (a branch on the values would)."""
    finite = torch.isfinite(scores)
    largest = torch.where(finite, scores, float("-inf")).amax()
    largest = torch.where(torch.isfinite(largest), largest, 1.0)
    return torch.where(finite, scores, torch.where(scores == float("inf"), largest, 0.0)).clamp_min(0)
