"""Run-time state shared by the SAT blocks of one model: the omission rate and what the current model forward
tells the blocks (``BatchInfo``: a forward counter, the padding mask, which positions carry loss, whether a KV
cache is in use, whether every rank runs this forward).

Why a model-level hook: gradient checkpointing re-runs a layer's forward inside backward; the re-run must pick the
same units and the same dense tokens, so nothing inside a re-runnable layer forward may advance state. The batch
info changes only when a whole transformers model (``PreTrainedModel``) starts a forward, which checkpointing never
re-runs; nested models (``LlamaModel`` inside ``LlamaForCausalLM``) belong to the outer forward.
"""

from __future__ import annotations

import inspect
import math
import sys
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import tokens, zero3

if TYPE_CHECKING:  # an annotation only: config.py imports the blocks, which import this module
    from .config import SATConfig


@dataclass
class BatchInfo:
    """What the current model forward tells the SAT blocks; set once per outermost model forward by the hook.

    Gradient checkpointing re-runs layer forwards inside backward, after the model forward returned: the info stays
    until the next model forward, so a re-run sees the same batch (and the same dense tokens) as the first pass.
    """

    forward_id: int = 0
    # Keys the random draws (uniform scores, sampled tokens, sampling selection). It advances only with forwards that
    # every rank runs, so that a forward of one rank alone cannot shift the ranks' draws apart.
    seed_id: int = 0
    token_mask: torch.Tensor | None = None  # (B, T) bool, True at real (non-padding) tokens; None: all real
    carries_loss: torch.Tensor | None = None  # (B, T) bool, position t predicts a label (``peft_sat.tokens``)
    position_ids: torch.Tensor | None = None  # (B, T) / (1, T) when given (packed batches)
    uses_cache: bool = False  # a KV cache was given or asked for: generation, which must run the dense model
    collective_ok: bool = True  # every rank runs this forward: a shared selection may all-reduce its scores
    # per forward: the dense rows by (mode, shape), and what the blocks derive from them (context rows, query slots)
    dense_rows_cache: dict = field(default_factory=dict, repr=False)


@dataclass
class SATState:
    """Mutable state of SAT on one model (one instance shared by all its SAT blocks)."""

    config: SATConfig
    omission_rate: float
    enabled: bool = True
    batch: BatchInfo = field(default_factory=BatchInfo)
    # Set by ``SATCallback`` between ``on_step_begin`` and ``on_step_end``: forwards inside are a training step that
    # every rank takes (any forward outside, e.g. a callback sampling on rank 0 alone, may be one rank's alone).
    in_training_step: bool = False
    sparse_layers: list[int] | None = None  # the layers whose blocks SAT converted (None: every targeted layer)
    # ``context_tokens="forward_only"`` in force: set from the config, cleared when an attention block of the model
    # cannot cut the context tokens' gradient (its context tokens then train as with "sparse")
    context_forward_only: bool = False
    # Every attention block of the model is causal (``is_causal``; Gemma3 may be bidirectional): no position reads a
    # later one, so a split forward may skip the positions after each sequence's last dense one (``live_rows``)
    causal_attention: bool = True
    dense_fractions: list[float] = field(default_factory=list, repr=False)  # per forward: dense positions / all
    # per split forward with context tokens forward only: the share of positions it computes (``live_rows``)
    live_fractions: list[float] = field(default_factory=list, repr=False)
    # Training forwards of the current step whose LM head ran its context rows without a graph (``blocks.lm_head``).
    # It stays 0 when the loss reads the head's weight itself instead of calling the module (TRL's fused LM head):
    # that head's backward is not saved (it runs every row, or the labelled ones only: ``peft_sat.flops``).
    head_split_forwards: int = 0
    # Token positions (padding included: padded positions are computed too) of the training forwards inside the
    # current training step; ``SATCallback`` resets it at each step and times steps per position.
    step_positions: int = 0
    # Of those, the positions carrying loss (``tokens.loss_positions``), summed as a tensor so that no forward waits
    # for the device; None while no training forward of the step had labels. The estimate's dense step runs TRL's
    # fused LM head on this share of the rows (``peft_sat.flops``).
    step_loss_positions: torch.Tensor | None = None
    hooks: list[Any] = field(default_factory=list, repr=False)
    # The latest norm call of a training forward (``peft_sat.norm_input``): a block reading its output saves its input
    last_norm_call: Any = field(default=None, repr=False)
    # (block, parameter) pairs registered with DeepSpeed ZeRO-3 (``peft_sat.zero3``); empty outside ZeRO-3
    zero3_registrations: list[Any] = field(default_factory=list, repr=False)
    warned: set[str] = field(default_factory=set, repr=False)
    _depth: int = field(default=0, repr=False)  # nesting of hooked model forwards (outer CausalLM > inner model)

    @property
    def forward_count(self) -> int:
        """Outermost model forwards so far: keys per-step randomness and the blocks' selection cache."""
        return self.batch.forward_id

    @property
    def token_mask(self) -> torch.Tensor | None:
        return self.batch.token_mask

    def set_omission_rate(self, rate: float) -> None:
        """Set the rate used by the next training forwards, e.g. from a scheduler."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"`omission_rate` must be in [0, 1), got {rate!r}.")
        self.omission_rate = float(rate)

    def generator(self, device: torch.device, block_id: int) -> torch.Generator:
        """A generator seeded by (config seed, forward count, block): reproducible and identical in re-runs."""
        seed = (self.config.seed * 1_000_003 + self.batch.seed_id) * 10_007 + block_id
        return torch.Generator(device=device).manual_seed(seed % (2**63 - 1))

    def dense_rows(self, hidden_shape: torch.Size) -> torch.Tensor | None:
        """Flat row indices of the positions that run the whole block this forward (``SATConfig.dense_tokens``),
        or None when the batch is not split; computed once per forward and block input shape."""
        mode = self.config.dense_tokens
        if mode == "none":
            return None
        batch = self.batch
        key = (mode, tuple(hidden_shape))
        if key not in batch.dense_rows_cache:
            rows = None
            if batch.carries_loss is None:
                self.warn_once(
                    "no-labels",
                    f"peft_sat: `dense_tokens`={mode!r} needs the labels of the batch, but the model forward got none "
                    "(e.g. a custom `compute_loss` without `labels`); every token runs sparse.",
                )
            elif tuple(batch.carries_loss.shape) != tuple(hidden_shape):
                self.warn_once(
                    "label-shape",
                    f"peft_sat: labels of shape {tuple(batch.carries_loss.shape)} do not match the blocks' tokens "
                    f"{tuple(hidden_shape)}; every token runs sparse.",
                )
            else:
                rows = tokens.dense_rows(mode, batch.carries_loss, batch.token_mask, batch.position_ids)
            batch.dense_rows_cache[key] = rows
            self.dense_fractions.append(0.0 if rows is None else rows.numel() / max(1, math.prod(hidden_shape)))
        return batch.dense_rows_cache[key]

    def live_rows(self, hidden_shape: torch.Size) -> tokens.LiveRows | None:
        """The rows a split forward computes (``tokens.live_rows``): None without a split, where every row is live, or
        where an attention block is not causal; computed once per forward and block input shape."""
        rows = self.dense_rows(hidden_shape)
        if rows is None or not self.causal_attention:
            return None
        cache = self.batch.dense_rows_cache
        key = ("live", tuple(hidden_shape))
        if key not in cache:
            live = tokens.live_rows(rows, hidden_shape[0], math.prod(hidden_shape[1:]))
            cache[key] = live
            self.live_fractions.append(1.0 if live is None else live.rows.numel() / live.size)
        return cache[key]

    def warn_once(self, key: str, message: str) -> None:
        if key not in self.warned:
            self.warned.add(key)
            warnings.warn(message, stacklevel=3)

    def attach(self, models: list[nn.Module]) -> None:
        """Register the batch hooks on every transformers model in the tree (outer and inner see the same batch)."""
        for model in models:
            names = list(inspect.signature(model.forward).parameters)
            positions = {name: names.index(name) for name in _BATCH_ARGUMENTS if name in names}
            hook = model.register_forward_pre_hook(_BatchHook(self, positions), with_kwargs=True)
            done = model.register_forward_hook(_BatchDone(self), always_call=True)
            self.hooks.extend((hook, done))

    def detach(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks.clear()
        self.batch = BatchInfo(forward_id=self.batch.forward_id, seed_id=self.batch.seed_id)
        zero3.unregister(self.zero3_registrations)
        self.zero3_registrations.clear()

    def register_zero3_parameters(self, model: nn.Module) -> None:
        """Under DeepSpeed ZeRO-3, have each SAT block gather the child parameters it slices (``peft_sat.zero3``);
        a no-op until ``model`` is partitioned, and once done."""
        if not self.zero3_registrations:
            self.zero3_registrations = zero3.register_if_partitioned(model, self)


# Arguments of a transformers model forward that the hook reads (by keyword, or by position when given so).
_BATCH_ARGUMENTS = ("input_ids", "inputs_embeds", "attention_mask", "position_ids", "labels", "use_cache")
_CACHE_ARGUMENTS = ("cache", "past_key_values")
# Wrappers whose forward every rank runs in lock-step (they synchronise ranks themselves).
_LOCKSTEP_WRAPPERS = {"DistributedDataParallel", "FullyShardedDataParallel", "FSDPModule", "DeepSpeedEngine"}


class _BatchHook:
    """Forward pre-hook of a transformers model: at the outermost model forward, record the batch for the blocks."""

    def __init__(self, state: SATState, positions: dict[str, int]) -> None:
        self.state = state
        self.positions = positions

    def _argument(self, name: str, args: tuple, kwargs: dict) -> Any:
        if name in kwargs:
            return kwargs[name]
        position = self.positions.get(name)
        return args[position] if position is not None and len(args) > position else None

    # Eager under torch.compile: the hook only updates Python state (counter, masks, ZeRO-3 registration), and traced
    # it would make dynamo guard on the counter's value and the registration list.
    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        state = self.state
        state._depth += 1
        mask = self._argument("attention_mask", args, kwargs)
        # Only a (B, T) mask marks padding; 4-D masks and TRL's padding-free packing (no mask, position_ids and
        # cu_seq_lens in kwargs) contain no padding tokens to exclude.
        token_mask = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        position_ids = self._argument("position_ids", args, kwargs)
        position_ids = position_ids if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 else None
        if state._depth > 1:  # an inner model of the same forward (e.g. LlamaModel under LlamaForCausalLM)
            batch = state.batch
            batch.token_mask = batch.token_mask if batch.token_mask is not None else token_mask
            batch.position_ids = batch.position_ids if batch.position_ids is not None else position_ids
            return
        # SAT is usually applied before `deepspeed.initialize` partitions the model: register at the first forward
        # after it, before any block's pre-forward hook gathers its parameters.
        state.register_zero3_parameters(module)
        labels = self._argument("labels", args, kwargs)
        shift_labels = kwargs.get("shift_labels")
        uses_cache = self._argument("use_cache", args, kwargs) is True or any(
            kwargs.get(name) is not None for name in _CACHE_ARGUMENTS
        )
        sparse = module.training and state.enabled and state.omission_rate > 0 and not uses_cache
        collective_ok = _collective_ok(state, module, warn=sparse)
        state.batch = BatchInfo(
            forward_id=state.batch.forward_id + 1,
            seed_id=state.batch.seed_id + int(collective_ok),
            token_mask=token_mask,
            carries_loss=tokens.loss_positions(
                labels if isinstance(labels, torch.Tensor) else None,
                shift_labels if isinstance(shift_labels, torch.Tensor) else None,
            ),
            position_ids=position_ids,
            uses_cache=uses_cache,
            collective_ok=collective_ok,
        )
        if module.training and state.in_training_step:
            state.step_positions += self._positions(args, kwargs)
            carries = state.batch.carries_loss
            if carries is not None:
                count = carries.sum()
                state.step_loss_positions = (
                    count if state.step_loss_positions is None else state.step_loss_positions + count
                )

    def _positions(self, args: tuple, kwargs: dict) -> int:
        """Token positions of this forward's batch: (B, T) of ``input_ids``, else of ``inputs_embeds`` (B, T, H)."""
        ids = self._argument("input_ids", args, kwargs)
        if isinstance(ids, torch.Tensor):
            return ids.numel()
        embeds = self._argument("inputs_embeds", args, kwargs)
        return math.prod(embeds.shape[:-1]) if isinstance(embeds, torch.Tensor) else 0


class _BatchDone:
    """Forward hook pairing ``_BatchHook``: leave one nesting level (also when the forward raised)."""

    def __init__(self, state: SATState) -> None:
        self.state = state

    @torch.compiler.disable
    def __call__(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.state._depth = max(0, self.state._depth - 1)


def _collective_ok(state: SATState, module: nn.Module, warn: bool) -> bool:
    """Whether this model forward may run a collective: every rank must be running it too.

    True outside multi-process runs, inside a training step marked by ``SATCallback``, and for forwards called
    through a data-parallel wrapper that every rank steps in lock-step (DDP, FSDP, DeepSpeed). Otherwise (e.g. rank
    0 alone sampling from the model in a callback) a shared selection would wait forever for the other ranks: the
    blocks select per rank instead, with a warning.
    """
    if state.config.distributed_selection != "shared" or _world_size() == 1 or state.in_training_step:
        return True
    if any(cls.__name__ in _LOCKSTEP_WRAPPERS for m in _caller_modules(module) for cls in type(m).__mro__):
        return True
    if warn:
        state.warn_once(
            "lone-forward",
            "peft_sat: a training-mode forward outside a training step (SATCallback marks those) and not called "
            "through DDP / FSDP / DeepSpeed may run on one rank alone; its SAT blocks select their units per rank "
            "instead of summing scores across ranks (`distributed_selection='shared'`), which would wait for the "
            "other ranks.",
        )
    return False


def _world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def _caller_modules(module: nn.Module, max_depth: int = 40) -> list[nn.Module]:
    """The modules on the call stack above the hooked model (wrappers call it from their own forward)."""
    found = [module]
    frame = sys._getframe(2)
    try:
        for _ in range(max_depth):
            if frame is None:
                break
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, nn.Module) and candidate is not module:
                found.append(candidate)
            frame = frame.f_back
        return found
    finally:
        del frame


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
