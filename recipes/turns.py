"""Both arms of an A/B trained at once, one optimizer step each in turn (``--interleave_arms true``).

Trained one after the other, the arms of an A/B meet whatever load a shared machine has in their minutes; on a
2-core CPU two whole 6-minute CPT A/Bs of the same code measured savings 10 points apart, more than the 8% the
schedule saves. Trained in turns (SAT's step 1, dense's step 1, SAT's step 2, ...), every pair of steps meets the
same load, and each arm's training clock counts its own turns only.

Each arm trains in a thread of its own and only the arm holding the turn runs: an arm hands the turn on at the end of
every optimizer step (``RunRecorder.on_step_end``) and waits there for it to come back; the first turns build each
arm's model and trainer, before either trains; the data loading between steps and every held-out evaluation run
inside a turn. Random number generators
are process-wide: the arm handing the turn on keeps its generators' states and gets them back with its next turn, so
each arm draws the numbers it would draw alone (its initialization, its data order). accelerate's ``GradientState``
is process-wide too, shared by both trainers; the Trainer sets its ``sync_gradients`` itself at every micro-batch,
inside the turn.

Each thread that runs a parallel operator keeps an OpenMP thread pool of its own, and the GNU runtime (PyTorch's on
Linux) counts the pools' threads together: once they outnumber the cores, every parallel region wakes its workers
through the kernel instead of finding them spinning, a cost per operator that falls hardest on the arm running more
and smaller operators (SAT's). So a thread releases its pool (``release_openmp_threads``) before it waits: the main
thread when the arms start, an arm when it hands the turn on; the next parallel operator builds the pool again, a
thread start per turn. On a 2-core CPU the SFT A/B in turns trained both arms 24-29% faster with the release
(docs/results.md, "The arms in turns").

One process only: in a multi-process launch the two threads of every process would interleave the arms' collectives.
"""

from __future__ import annotations

import ctypes
import functools
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
import torch

T = TypeVar("T")


class OtherArmFailed(RuntimeError):
    """Raised in an arm waiting for its turn when the arm it waits for failed (its error is re-raised by
    ``run_in_turns``)."""


class Turns:
    """A turn that passes between named arms in a fixed cyclic order, skipping arms that finished.

    The first arm of ``order`` holds the turn at the start; ``take`` waits for it, ``hand_on`` gives it to the next
    unfinished arm, ``finish`` leaves the order for good (handing the turn on if held), ``fail`` wakes every waiting
    arm with ``OtherArmFailed``.
    """

    def __init__(self, order: Sequence[str]) -> None:
        if len(set(order)) != len(order) or not order:
            raise ValueError(f"Turns need distinct arm names, got {list(order)!r}.")
        self.order = list(order)
        self.holder: str | None = self.order[0]
        self._finished: set[str] = set()
        self._failed: str | None = None
        self._generators: dict[str, dict[str, Any]] = {}
        self._condition = threading.Condition()

    def take(self, arm: str) -> float:
        """Wait until ``arm`` holds the turn; restore its random generators; return the seconds waited."""
        start = time.perf_counter()
        with self._condition:
            self._condition.wait_for(lambda: self.holder == arm or self._failed is not None)
            if self._failed is not None:
                raise OtherArmFailed(f"The {self._failed} arm failed; the {arm} arm stops.")
            generators = self._generators.pop(arm, None)
        if generators is not None:
            _restore_generators(generators)
        return time.perf_counter() - start

    def hand_on(self, arm: str) -> None:
        """``arm`` (the holder) keeps its random generators' states and gives the turn to the next unfinished arm."""
        self._check_holder(arm)
        self._generators[arm] = _capture_generators()
        release_openmp_threads()
        with self._condition:
            self.holder = self._next_after(arm)
            self._condition.notify_all()

    def hand_on_and_take(self, arm: str) -> float:
        """End ``arm``'s turn and wait for its next one; the seconds waited (the other arms' turns)."""
        self.hand_on(arm)
        return self.take(arm)

    def finish(self, arm: str) -> None:
        """``arm`` is done: it leaves the order, and the next unfinished arm takes the turn if ``arm`` held it."""
        with self._condition:
            self._finished.add(arm)
            if self.holder == arm:
                self.holder = self._next_after(arm)
            self._condition.notify_all()

    def fail(self, arm: str) -> None:
        """``arm`` failed: every arm waiting for a turn raises ``OtherArmFailed``."""
        with self._condition:
            self._failed = self._failed or arm
            self._condition.notify_all()

    def _next_after(self, arm: str) -> str | None:
        index = self.order.index(arm)
        for offset in range(1, len(self.order) + 1):
            candidate = self.order[(index + offset) % len(self.order)]
            if candidate not in self._finished:
                return candidate
        return None

    def _check_holder(self, arm: str) -> None:
        if self.holder != arm:
            raise RuntimeError(f"The {arm} arm hands on a turn it does not hold (the {self.holder} arm holds it).")


def run_in_turns(arms: dict[str, Callable[[Callable[[], float]], T]], order: Sequence[str]) -> dict[str, T]:
    """Run every ``arms[name](between_steps)`` in a thread of its own, one turn at a time, in ``order``.

    ``between_steps()`` ends the arm's turn and waits for its next one; it returns the seconds waited, which the
    arm's training clock leaves out. Returns each arm's result; re-raises the first arm's error if any failed. An
    interruption of the calling thread (KeyboardInterrupt) stops every arm at the end of its current turn.
    """
    if set(arms) != set(order):
        raise ValueError(f"`order` {list(order)!r} must name every arm of {sorted(arms)!r} once.")
    turns = Turns(order)
    results: dict[str, T] = {}
    errors: dict[str, BaseException] = {}

    def run(name: str) -> None:
        try:
            turns.take(name)
            results[name] = arms[name](lambda: turns.hand_on_and_take(name))
        except BaseException as error:  # re-raised in the calling thread below
            errors[name] = error
            turns.fail(name)
        finally:
            turns.finish(name)

    release_openmp_threads()  # the calling thread only waits from here on
    # Daemon threads: an interrupted run (Ctrl-C reaches the main thread) must not wait for the arms to finish.
    threads = [threading.Thread(target=run, args=(name,), name=f"arm-{name}", daemon=True) for name in order]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(timeout=0.2)  # a blocking join would hold off a Ctrl-C that another thread received
    except BaseException:
        turns.fail("main")  # every arm stops at the end of its current turn
        raise
    if errors:
        own = [error for error in errors.values() if not isinstance(error, OtherArmFailed)]
        raise (own or list(errors.values()))[0]
    return results


# the GNU, Intel and LLVM runtimes (wheels may add a hash: libgomp-a34b3233.so.1); each has omp_pause_resource_all
OPENMP_RUNTIME = re.compile(r"(libgomp|libiomp5|libomp)[-.]")
OMP_PAUSE_SOFT = 1


def release_openmp_threads() -> bool:
    """End the calling thread's OpenMP worker threads (``omp_pause_resource_all(omp_pause_soft)``, OpenMP 5.0) in
    every OpenMP runtime loaded, so that they no longer count against the cores while it waits. False where no
    runtime with that call is loaded (nothing to release) or one refused (inside a parallel region)."""
    pauses = _openmp_pauses()
    return bool(pauses) and all([pause(OMP_PAUSE_SOFT) == 0 for pause in pauses])  # a list: every runtime paused


@functools.cache
def _openmp_pauses() -> tuple[Callable[[int], int], ...]:
    """``omp_pause_resource_all`` of each OpenMP runtime loaded in this process (read off ``/proc/self/maps``)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/" in line})
    except OSError:  # not Linux: nothing found, nothing released
        return ()
    pauses = []
    for path in paths:
        if OPENMP_RUNTIME.match(os.path.basename(path)):
            pause = getattr(ctypes.CDLL(path), "omp_pause_resource_all", None)
            if pause is not None:
                pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
                pauses.append(pause)
    return tuple(pauses)


def _capture_generators() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore_generators(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
