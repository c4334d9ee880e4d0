"""What a recipe measures while it trains: every optimizer step's wall time and omission rate, the training clock
without evaluation, and the held-out loss of every evaluation against step and training wall time.

The training clock starts at ``on_train_begin`` (after the model, optimizer and data loader are built, the same work
for both arms of an A/B) and stops at the end of the last optimizer step; the time of every evaluation inside
``train()`` (``eval_runtime``) is taken out, so periodic held-out evaluations never count as training time, and so is
the time an arm of an interleaved A/B waits for its turn (``recipes/turns.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import TrainerCallback

from peft_sat import get_sat_state

try:
    import resource  # POSIX only
except ImportError:  # Windows
    resource = None  # type: ignore[assignment]


class RunRecorder(TrainerCallback):
    """Per-step wall times and rates (``steps``) and the held-out loss of every evaluation (``eval_curve``).

    ``steps``: ``{"step", "seconds", "omission_rate", "tokens", "major_page_faults", "minor_page_faults"}`` per
    optimizer step. ``seconds`` from ``on_step_begin`` to ``on_step_end`` (forward, backward, optimizer; not data
    loading or logging); ``tokens`` the token positions its training forwards ran, padding included (what the compute
    scales with); ``major_page_faults`` the process's page faults that read from disk during the step: a step that
    runs code or touches file-backed memory the kernel had reclaimed waits for the disk, which the step's time alone
    cannot tell from a slower computation (None where ``getrusage`` is missing); ``minor_page_faults`` those served
    without the disk: mostly fresh pages the step touches for the first time (the allocator grew its heap, or mapped a
    large block), which the kernel zeroes, and a virtual machine's host may have to back first.
    ``eval_curve``: ``{"step", "train_seconds", "eval_loss"}`` per evaluation, ``train_seconds`` the training clock at
    the end of the latest optimizer step (0 before the first).
    ``train_seconds``: the training clock at the end of the latest optimizer step.
    ``between_steps``: called at the end of every optimizer step (after its timing is recorded); returns seconds to
    leave off the training clock (an interleaved A/B's wait for the arm's next turn).
    """

    def __init__(self, between_steps: Callable[[], float] | None = None) -> None:
        self.steps: list[dict[str, float]] = []
        self.eval_curve: list[dict[str, float]] = []
        self.train_seconds = 0.0
        self._train_start: float | None = None
        self._step_start: float | None = None
        self._eval_seconds = 0.0  # evaluation time inside `train()`, taken off the training clock
        self._between_steps = between_steps
        self._waited_seconds = 0.0  # time spent waiting in `between_steps`, taken off the training clock
        self._step_tokens = 0
        self._step_faults: tuple[int, int] | None = None
        self._hook: Any = None

    def on_train_begin(self, args, state, control, model=None, **kwargs) -> None:
        if model is not None and self._hook is None:
            self._hook = model.register_forward_pre_hook(self._count_tokens, with_kwargs=True)
        _synchronize()
        self._train_start = time.perf_counter()
        self._eval_seconds = self._waited_seconds = 0.0

    def _count_tokens(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if module.training and isinstance(ids, torch.Tensor):
            self._step_tokens += ids.numel()

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        self._step_tokens = 0
        _synchronize()
        self._step_faults = _page_faults()
        self._step_start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        _synchronize()  # CUDA kernels run asynchronously: wait for them before reading the clock
        now = time.perf_counter()
        sat_state = get_sat_state(model) if model is not None else None
        rate = sat_state.omission_rate if sat_state is not None and sat_state.enabled else 0.0
        seconds = now - self._step_start if self._step_start is not None else float("nan")
        faults = _page_faults()
        major, minor = (
            (faults[0] - self._step_faults[0], faults[1] - self._step_faults[1])
            if None not in (faults, self._step_faults)
            else (None, None)
        )
        self.steps.append(
            {
                "step": state.global_step,
                "seconds": seconds,
                "omission_rate": rate,
                "tokens": self._step_tokens,
                "major_page_faults": major,
                "minor_page_faults": minor,
            }
        )
        if self._train_start is not None:
            self.train_seconds = now - self._train_start - self._eval_seconds - self._waited_seconds
        if self._between_steps is not None:
            self._waited_seconds += self._between_steps()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self._train_start = None  # evaluations after `train()` are not inside the training clock
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_evaluate(self, args, state, control, metrics: dict[str, float] | None = None, **kwargs) -> None:
        if not metrics or "eval_loss" not in metrics:
            return
        if self._train_start is not None:
            self._eval_seconds += metrics.get("eval_runtime", 0.0)
        point = {"step": state.global_step, "train_seconds": self.train_seconds, "eval_loss": metrics["eval_loss"]}
        self.eval_curve.append(point)


def _page_faults() -> tuple[int, int] | None:
    """The process's (major, minor) page faults so far (every thread: in an interleaved A/B one arm runs at a time)."""
    if resource is None:
        return None
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_majflt, usage.ru_minflt


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def final_eval_point(recorder: RunRecorder, global_step: int) -> dict[str, Any] | None:
    """The evaluation at the last optimizer step, or None when the run did not evaluate there."""
    last = recorder.eval_curve[-1] if recorder.eval_curve else None
    return last if last is not None and last["step"] == global_step else None
