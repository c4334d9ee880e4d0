"""Timed training steps and the verdicts drawn from them, for ``peft_sat.crossover.CrossoverCheck``.

A step is timed on a clock that waits for queued CUDA work (``synchronized_clock``) and its timing reduced over
ranks (``max_over_ranks``: the slowest rank decides, so all reach the same verdict). A ``Verdict`` compares a rate's
best time per token position with its dense reference's: ``gain = 1 - seconds / dense_seconds``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def synchronized_clock() -> float:
    """``time.perf_counter()`` once the queued CUDA work has finished (kernels run asynchronously)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.perf_counter()


def max_over_ranks(values: list[float]) -> list[float]:
    """The element-wise maximum of ``values`` over the ranks of the default process group (identity outside one).

    Every rank must call it for the same steps: it is a collective.
    """
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return values
    on_cuda = "nccl" in str(distributed.get_backend()) and torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if on_cuda else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    distributed.all_reduce(tensor, op=distributed.ReduceOp.MAX)
    return tensor.tolist()


@dataclass(frozen=True)
class Timing:
    """One timed optimizer step (reduced over ranks)."""

    step: int
    seconds: float
    positions: int  # token positions of the step's micro-batches; 0 when unknown
    same_at_every_rate: bool = False  # every rank's forwards split with context rows forward only

    @property
    def per_position(self) -> float:
        return self.seconds / max(1, self.positions)


@dataclass(frozen=True)
class Verdict:
    """Whether steps at ``rate`` were faster than dense steps; times per step at the dense reference's positions."""

    rate: float
    stage: str  # the schedule stage whose steps were timed, e.g. "rung 3 of 3"
    steps: tuple[int, ...]
    dense_steps: tuple[int, ...]  # the dense steps it was compared with
    seconds: float
    dense_seconds: float
    positions: int
    faster: bool
    shared_with: str = ""  # the stage whose verdict this rate took (its steps compute the same); "": its own
    predicted_from: tuple[str, ...] = ()  # the stages whose gains predicted this one (no steps timed); (): measured

    @property
    def gain(self) -> float:
        """The share of the dense time per position this rate saved (negative: slower)."""
        return 1.0 - self.seconds / self.dense_seconds

    def describe(self) -> str:
        comparison = "faster" if self.faster else "not faster"
        if self.predicted_from:
            sources = " and ".join(self.predicted_from)
            return (
                f"predicted {comparison} than dense ({self.gain:.1%} saved, on the line through the {sources}'s gains)"
            )
        return (
            f"{comparison} than dense ({self.seconds:.3g} s vs {self.dense_seconds:.3g} s per step of "
            f"{self.positions} token positions)"
        )


@dataclass
class DenseStage:
    """A schedule stage whose steps (from ``first_step`` on, ``steps`` of them) ran dense: at or below the crossover."""

    stage: str
    rate: float
    first_step: int
    steps: int = 0
