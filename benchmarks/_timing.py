"""Timing tools of ``speed.py``: interleaved step timing on a shared machine.

- ``interleave``: runs several step functions round-robin (the order rotates every round, so none always runs on
  a warmer cache), discards warm-up rounds and steps disturbed by other processes, and keeps per-step samples.
- ``SelectTimer``: wall time spent in SAT's scoring + selection (``SATBlockMixin._sat_select``) inside a step.
- ``ForeignLoad``: the share of the machine's CPUs that OTHER processes used during a step (Linux ``/proc``).
  With torch using every core, a busy neighbour makes each parallel region wait for a descheduled thread; such
  steps measure the neighbour, not SAT, so they are redone (bounded by ``max_rounds``) and reported.
- ``activation_bytes``: bytes autograd saves for backward in one forward and still holds at its end (the
  activation memory of a step), measured the same way on every device.
- ``cpu_name``: the CPU the timings were taken on, for the reports of ``speed.py`` and ``quality.py``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from peft_sat.blocks import SATBlockMixin


def cpu_name() -> str:
    """The CPU model (Linux ``/proc/cpuinfo``; elsewhere what ``platform`` knows)."""
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class SelectTimer:
    """Accumulates wall time spent in ``SATBlockMixin._sat_select`` (scoring + selection) while installed."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.seconds = 0.0
        self.device = device or torch.device("cpu")

    @contextlib.contextmanager
    def installed(self) -> Iterator[SelectTimer]:
        original = SATBlockMixin._sat_select
        timer = self

        def timed(module, x, *args, **kwargs):
            synchronize(timer.device)  # on CUDA: time the selection's kernels, not the queue before it
            start = time.perf_counter()
            try:
                return original(module, x, *args, **kwargs)
            finally:
                synchronize(timer.device)
                timer.seconds += time.perf_counter() - start

        SATBlockMixin._sat_select = timed
        try:
            yield self
        finally:
            SATBlockMixin._sat_select = original


class ForeignLoad:
    """Share of the machine's CPU time used by OTHER processes over an interval (Linux ``/proc``; None elsewhere)."""

    def __init__(self) -> None:
        self.available = os.path.exists("/proc/stat") and os.path.exists("/proc/self/stat")
        self.ticks_per_second = os.sysconf("SC_CLK_TCK") if self.available else 100
        self.cpus = os.cpu_count() or 1

    def sample(self) -> tuple[int, int, float] | None:
        if not self.available:
            return None
        with open("/proc/stat") as handle:
            fields = [int(v) for v in handle.readline().split()[1:]]
        with open("/proc/self/stat") as handle:
            own = handle.read().rsplit(")", 1)[1].split()
        busy = sum(fields) - fields[3] - fields[4]  # all but idle and iowait
        return busy, int(own[11]) + int(own[12]), time.perf_counter()  # utime + stime of this process

    def share(self, start, end) -> float | None:
        if start is None or end is None:
            return None
        foreign = (end[0] - start[0]) - (end[1] - start[1])
        # The counters tick in 1/ticks_per_second units, so over a step of a few ticks the quotient can fall
        # outside [0, 1]; other processes cannot use more than all the CPUs.
        return min(1.0, max(0.0, foreign / (self.ticks_per_second * (end[2] - start[2]) * self.cpus)))


def allowed_foreign_load(max_foreign_load: float) -> float:
    """``max_foreign_load`` plus the share of the cores that torch's threads leave free for others anyway."""
    cpus = os.cpu_count() or 1
    return max_foreign_load + max(0, cpus - torch.get_num_threads()) / cpus


@dataclass
class Sample:
    seconds: float
    select_share: float  # share of the step spent in scoring + selection
    foreign_load: float  # share of the CPUs other processes used during the step (0 where unknown)
    round_index: int = 0  # the round it ran in: samples of one round ran next to each other


def interleave(
    steps: dict[str, Callable[[], float]],
    *,
    measured: int,
    warmup: int,
    max_rounds: int,
    allowed_foreign: float,
    device: torch.device | None = None,
) -> tuple[dict[str, list[Sample]], int]:
    """Time the step functions round-robin: (per name the ``measured`` least disturbed samples after warm-up,
    the number of measured steps discarded as disturbed).

    A step function runs one training step and returns its wall seconds. Rounds continue until every name has
    ``measured`` samples with at most ``allowed_foreign`` foreign load, or ``max_rounds`` rounds ran.
    """
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    timer, load = SelectTimer(device), ForeignLoad()
    samples: dict[str, list[Sample]] = {name: [] for name in names}

    def clean(name: str) -> int:
        return sum(1 for s in samples[name] if s.foreign_load <= allowed_foreign)

    with timer.installed():
        for round_index in range(max(max_rounds, measured)):
            if min(clean(name) for name in names) >= measured:
                break
            shift = round_index % len(names)  # rotate the order: no step always follows the same one
            for name in names[shift:] + names[:shift]:
                timer.seconds = 0.0
                start = load.sample()
                seconds = steps[name]()
                foreign = load.share(start, load.sample())
                samples[name].append(Sample(seconds, timer.seconds / seconds, foreign or 0.0, round_index))
    # The clean samples; when too few, the least disturbed ones (reports show how disturbed they were).
    kept = {
        name: sorted(values, key=lambda s: s.foreign_load)[: max(measured, clean(name))]
        for name, values in samples.items()
    }
    return kept, sum(len(samples[name]) - len(kept[name]) for name in names)


def activation_bytes(
    model: torch.nn.Module, forward: Callable[[], torch.Tensor], blocks: list[torch.nn.Module] = ()
) -> tuple[int, int]:
    """Bytes of the tensors autograd saves for backward during ``forward()`` whose storage is still held when it
    returns (parameters excluded, storages counted once): the activation memory a training step holds at the end
    of its forward, and the part of it first saved inside one of ``blocks``. What a graph saved and freed during
    the forward (a graph no gradient can reach, dropped with its output) holds nothing. The graph is freed after."""
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, tuple[int, bool, StorageWeakRef]] = {}  # address: bytes, inside a block, the storage
    depth = [0]  # > 0 while a module of `blocks` runs

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        address = storage.data_ptr()
        entry = storages.get(address)
        if address not in parameter_storages and (entry is None or entry[2].expired()):  # new, or freed and reused
            storages[address] = (storage.nbytes(), depth[0] > 0, StorageWeakRef(storage))
        # not the tensor itself: an output saved by its own node would then hold that node, a reference cycle that
        # keeps a graph no gradient reaches (and its storages) alive until Python's cycle collector runs
        return tensor.detach()

    def enter(*_):
        depth[0] += 1

    def leave(*_):
        depth[0] -= 1

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(enter), b.register_forward_hook(leave))]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = forward()
        held = [(n, inside) for n, inside, storage in storages.values() if not storage.expired()]
        del output
    finally:
        for hook in hooks:
            hook.remove()
    return sum(n for n, _ in held), sum(n for n, inside in held if inside)


def peak_rss_growth(step: Callable[[], None]) -> int | None:
    """Bytes by which ``step()`` raised the process's peak resident memory above its resident memory before it
    (Linux: the peak ``VmHWM`` is reset through ``/proc/self/clear_refs``); None where that is unavailable. What a
    CPU step holds at its peak: activations, gradients and temporaries, from the allocator's point of view."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset the peak to the current resident size
        before = _status_bytes("VmRSS")
        step()
        return max(0, _status_bytes("VmHWM") - before)
    except OSError:
        return None


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    raise OSError(f"{key} not in /proc/self/status")
