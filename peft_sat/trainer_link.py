"""How ``SATCallback`` reaches the ``Trainer`` that calls it: callbacks get no reference to their Trainer, yet the
``sat/*`` keys must enter ``Trainer.log`` before it records and dispatches them, and the FLOPs estimate must know
which LM head TRL's loss runs."""

from __future__ import annotations

import sys
from typing import Any

from torch import nn
from transformers import Trainer


def calling_trainer(max_depth: int = 8) -> Trainer | None:
    """The ``Trainer`` whose callback handler is calling us, found on the call stack, or None.

    Why: ``Trainer.log`` appends ``logs`` to ``state.log_history`` and then calls ``on_log`` of the callbacks in
    order, the ``report_to`` integrations before any user callback (transformers 5.24 ``Trainer.log`` and
    ``Trainer.__init__``), so adding keys in ``on_log`` reaches neither. Callbacks get no reference to the Trainer;
    its frame is two calls above ours (``Trainer._inner_training_loop`` -> ``CallbackHandler.on_train_begin`` ->
    ``call_event``).
    """
    frame = sys._getframe(1)
    try:
        for _ in range(max_depth):
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
            frame = frame.f_back
        return None
    finally:
        del frame  # frames hold their locals: do not keep a reference cycle


def fused_head_scores_loss_positions(trainer: Trainer | None, model: nn.Module) -> bool:
    """Whether ``trainer`` is TRL's ``SFTTrainer`` and its fused LM head scores the labelled positions only.

    Why: that head reads the head's weight itself, so SAT's head never runs, and TRL picks its rows at each call
    with ``trl.trainer.utils._use_triton(device)``: the labelled positions where it says True (CUDA with Triton; a
    CPU where the recipes make it say so), every position elsewhere. The dense step's head then costs the loss
    positions' share, which the FLOPs estimate must count (``SATFlopsEstimator.saved_fraction``).
    """
    sft_trainer = getattr(sys.modules.get("trl.trainer.sft_trainer"), "SFTTrainer", None)
    choose = getattr(sys.modules.get("trl.trainer.utils"), "_use_triton", None)
    if trainer is None or sft_trainer is None or choose is None or not isinstance(trainer, sft_trainer):
        return False
    parameter = next(model.parameters(), None)
    return parameter is not None and bool(choose(parameter.device))


def wrap_log(trainer: Trainer, metrics: Any) -> None:
    """Make ``trainer.log(logs)`` add ``metrics()`` to ``logs`` before the Trainer records and dispatches them."""
    unwrap_log(trainer)
    original = trainer.log  # bound method: TRL's overrides (e.g. SFTTrainer.log) stay in the chain

    def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        logs.update(metrics())
        return original(logs, *args, **kwargs)

    log._sat_previous = trainer.__dict__.get("log")  # None: the class's own method
    trainer.log = log


def unwrap_log(trainer: Trainer) -> None:
    current = trainer.__dict__.get("log")
    if current is None or not hasattr(current, "_sat_previous"):
        return
    if current._sat_previous is None:
        del trainer.log
    else:
        trainer.log = current._sat_previous
