"""Run-time state shared by the SAT blocks of one model: the omission rate, the current batch's padding mask and
a forward counter that keys per-step randomness and the selection cache.

Why a counter set by a model-level hook: gradient checkpointing re-runs a layer's forward inside backward; the
re-run must pick the same units, so nothing inside a re-runnable layer forward may advance state. The counter moves
only when a whole transformers model (``PreTrainedModel``) starts a forward, which checkpointing never re-runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import zero3

if TYPE_CHECKING:  # an annotation only: config.py imports the blocks, which import this module
    from .config import SATConfig


@dataclass
class SATState:
    """Mutable state of SAT on one model (one instance shared by all its SAT blocks)."""

    config: SATConfig
    omission_rate: float
    enabled: bool = True
    forward_count: int = 0
    token_mask: torch.Tensor | None = None  # (B, T) bool, True at real (non-padding) tokens
    hooks: list[Any] = field(default_factory=list, repr=False)
    # (block, parameter) pairs registered with DeepSpeed ZeRO-3 (``peft_sat.zero3``); empty outside ZeRO-3
    zero3_registrations: list[Any] = field(default_factory=list, repr=False)

    def set_omission_rate(self, rate: float) -> None:
        """Set the rate used by the next training forwards, e.g. from a scheduler."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"`omission_rate` must be in [0, 1), got {rate!r}.")
        self.omission_rate = float(rate)

    def generator(self, device: torch.device, block_id: int) -> torch.Generator:
        """A generator seeded by (config seed, forward count, block): reproducible and identical in re-runs."""
        seed = (self.config.seed * 1_000_003 + self.forward_count) * 10_007 + block_id
        return torch.Generator(device=device).manual_seed(seed % (2**63 - 1))

    def attach(self, models: list[nn.Module]) -> None:
        """Register the batch hook on every transformers model in the tree (outer and inner both see the mask)."""
        for model in models:
            names = list(inspect.signature(model.forward).parameters)
            position = names.index("attention_mask") if "attention_mask" in names else None
            hook = model.register_forward_pre_hook(_BatchHook(self, position), with_kwargs=True)
            self.hooks.append(hook)

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.token_mask = None
        zero3.unregister(self.zero3_registrations)
        self.zero3_registrations.clear()

    def register_zero3_parameters(self, model: nn.Module) -> None:
        """Under DeepSpeed ZeRO-3, have each SAT block gather the child parameters it slices (``peft_sat.zero3``);
        a no-op until ``model`` is partitioned, and once done."""
        if not self.zero3_registrations:
            self.zero3_registrations = zero3.register_if_partitioned(model, self)


class _BatchHook:
    """Forward pre-hook: advance the counter and remember the 2-D padding mask of the batch (None when packed)."""

    def __init__(self, state: SATState, mask_position: int | None) -> None:
        self.state = state
        self.mask_position = mask_position

    # Eager under torch.compile: the hook only updates Python state (counter, mask, ZeRO-3 registration), and traced
    # it would make dynamo guard on the counter's value and the registration list.
    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.state.forward_count += 1
        # SAT is usually applied before `deepspeed.initialize` partitions the model: register at the first forward
        # after it, before any block's pre-forward hook gathers its parameters.
        self.state.register_zero3_parameters(module)
        mask = kwargs.get("attention_mask")
        if mask is None and self.mask_position is not None and len(args) > self.mask_position:
            mask = args[self.mask_position]
        # Only a (B, T) mask marks padding; 4-D masks and TRL's padding-free packing (no mask, position_ids and
        # cu_seq_lens in kwargs) contain no padding tokens to exclude.
        self.state.token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def sum_across_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Sum a score vector over the ranks of the default process group (identity outside distributed runs).

    Every rank then selects from the same scores with the same seeded generator, so DDP / FSDP replicas train the
    same sub-network; the cost is one all-reduce of a (num_units,) vector per block and forward.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return scores
    if torch.distributed.get_world_size() == 1:
        return scores
    scores = scores.float().clone()
    torch.distributed.all_reduce(scores)
    return scores
