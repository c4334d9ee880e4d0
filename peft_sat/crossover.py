"""Run dense the steps whose omission rate is not faster than dense training (``SATConfig.dense_when_slower``).

A sparse step has costs that a dense step does not: scoring and selecting units, gathering the kept weight slices,
more and smaller kernels. At small micro-batches they can outweigh the FLOPs it saves, and a low rate (a ladder's
last sparse rungs) then makes a step slower than a dense one. ``CrossoverCheck`` times real training steps to find
the crossover: the highest omission rate whose steps were not faster than dense steps. Every later step whose rate
is at or below it runs dense (rate 0) instead: a lower rate saves fewer FLOPs for the same fixed costs, and a dense
step trains at least as well as a sparse one.

Which steps are timed depends only on the step number and the verdicts so far, so every rank times the same steps:

- never the first step of a process: it carries one-time costs (allocation, first kernel launches, compilation);
- never the first ``SETTLING_STEPS`` dense steps after it: the first dense steps of a training run are slow for
  reasons of their own (on a CPU, 1.4-2x a settled dense step in ``make sft`` / ``make cpt``, though not in a plain
  loop of the same steps). While they are due, a step that would be timed sparse runs dense instead;
- each rate above the crossover: its first ``TIMED_STEPS`` steps, or fewer when its stage ends sooner (a linear
  decay judges each step's rate on that step alone). When those leave the rate within ``MIN_GAIN`` of dense either
  way (too close to call), more of its steps are timed, with a probe each, up to ``MAX_TIMED_STEPS`` while its stage
  has room for them;
- the dense steps it is compared with, *next to its own*: a rate is judged only against dense steps timed at most
  ``REFERENCE_STEPS`` steps before its first timed step or among its timed steps. Where there are too few, *dense
  probes* (steps that would be timed sparse, run dense instead) alternate with the rate's timed steps: dense, sparse,
  dense, sparse. The last steps of a scheduled dense stage (a warm-up) serve when a rate follows them. A CPU's step
  times drift over a run by more than a low rate saves: one dense reference taken at the start of a ``make cpt`` run
  (4.12 s per step at steps 3-4) let the rung at r = 1/6 run sparse at 3.88 s while the same run's later dense
  steps took 3.55-3.66 s.

A timing is taken per token position (padding included: padded positions are computed too), so batches of different
lengths compare, and each side keeps its best (lowest) time per position: one-time costs, e.g. a recompilation for
the kept units' new shapes, only ever slow a step down. Each timing is reduced over ranks (max) before it is used, so
all ranks reach the same verdicts and run the same rate, as a shared selection (an all-reduce inside the forward)
needs. A rate is faster when its time per position is at least ``MIN_GAIN`` below the dense one: step times on a
shared CPU wander by a few percent, and a rung that saves less than that buys its loss of quality with nothing
measurable (a ``make cpt`` run judged r = 1/6 faster at 2% below its dense reference, and the A/B's dense arm then
ran the same batches faster). Anything closer runs dense. Two steps a side cannot tell a real gain of 10% from none
on a noisy CPU, where one step can take 15% longer than the next for reasons of its own: a ``make cpt`` run judged
its full rate, whose steps ran 0.86x the dense arm's on the same batches, at 3.30 s against 3.35 s and ran every rate
dense. Hence the extra steps for a verdict too close to call: each side's best of four is far less likely to be an
outlier than its best of two.

A rate's timed steps run at its rate whatever its verdict, so a rung slower than dense costs its timed steps. The
time a rate saves grows with the rate (the FLOPs it omits) less a fixed cost per step, so where two higher rates of
the run were judged on their own timed steps, the line through their gains predicts the next one: a rate predicted
to save less than ``MIN_GAIN`` runs dense untimed, with every lower rate (a ``make cpt`` run measured 10.7% at
r = 1/2 and 4.2% at r = 1/3, then timed r = 1/6 at 1.10-1.14x the dense arm's steps; the line predicts -2.3%).

The probes cost dense steps in place of sparse ones: with the default ladder, two settling steps and two probes per
judged rate, four when too close to call (fewer where a judged rate's probes are recent enough for the next rate);
with a linear decay, one probe every ``REFERENCE_STEPS + 1`` steps until the crossover is found.

One verdict serves every rate when the rate does not change what a step computes. A batch split by
``dense_tokens`` with ``context_tokens="forward_only"`` runs the whole block on its dense rows and the dense
forward on the others: no unit is omitted, and the rate only switches the split on. When every training forward of
a judged rate's timed steps split, on every rank, and the rate was faster, every later rate runs sparse untimed,
with no probes of its own (a 30-step ``make sft`` runs 21 of its 25 scheduled sparse steps sparse, not 18); when
it was not, every lower rate is at or below the crossover anyway. That assumes the run's later batches split as
well, as prompt / completion data does throughout.

Example:
    >>> check = CrossoverCheck(SATConfig(omission_rate=0.5), total_steps=100, first_step=0)  # doctest: +SKIP
    >>> rate = check.begin_step(step)  # the rate to run; starts the clock when the step is timed
    >>> check.end_step(positions)  # stops it; a ``Verdict`` when this step decided a rate
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, replace
from typing import Any

from transformers.utils import logging

from .config import SATConfig
from .schedules import omission_rate_at, stage_at
from .step_timing import DenseStage, Timing, Verdict, max_over_ranks, synchronized_clock

logger = logging.get_logger(__name__)

# Timed steps per rate and for the dense reference: one step alone (a short batch, a recompilation) cannot decide.
TIMED_STEPS = 2
# Timed steps per rate at most, when the first TIMED_STEPS leave it within MIN_GAIN of dense either way.
MAX_TIMED_STEPS = 4
# Untimed dense steps of a process before any dense step is timed (see the module docstring).
SETTLING_STEPS = 2
# How many steps before a rate's first timed step a dense timing may be taken to count as that rate's reference.
REFERENCE_STEPS = 4
# The least share of the dense time per token position a rate must save to be judged faster.
MIN_GAIN = 0.03


class CrossoverCheck:
    """Times training steps against dense steps and runs dense every step at or below the crossover rate.

    Args:
        config: the ``SATConfig`` whose schedule (``peft_sat.schedules``) gives each step's rate.
        total_steps: the number of optimizer steps of the run.
        first_step: the first step this process runs (``global_step`` at train begin: > 0 when resuming); not timed.
        clock: seconds, read at the start and end of each timed step; ``synchronized_clock`` by default. Tests inject
            a fake one.
        reduce: combines a step's ``[seconds, positions, varies]`` over ranks (``varies``: 1.0 unless the step
            computed the same at every rate); ``max_over_ranks`` by default.
        crossover_rate: a crossover found before (a resumed run's), 0.0: none yet.
        dense_fallback_steps: steps the schedule made sparse that ran dense before (a resumed run's).

    A resumed run restores everything measured before with ``load_state_dict(state_dict())``; only the settling
    steps start again (a new process's first dense steps are slow again).

    ``begin_step`` / ``end_step`` must be called for every optimizer step, on every rank, in order.
    """

    def __init__(
        self,
        config: SATConfig,
        total_steps: int,
        first_step: int,
        *,
        clock: Callable[[], float] = synchronized_clock,
        reduce: Callable[[list[float]], list[float]] = max_over_ranks,
        crossover_rate: float = 0.0,
        dense_fallback_steps: int = 0,
    ) -> None:
        self.config = config
        self.total_steps = total_steps
        self.first_step = first_step
        self.clock = clock
        self.reduce = reduce
        self.crossover_rate = float(crossover_rate)  # rates at or below it run dense; 0.0: only rate 0 does
        self.dense_fallback_steps = int(dense_fallback_steps)  # scheduled sparse, ran dense (probes included)
        self.dense_timings: list[Timing] = []
        self.probe_steps: list[int] = []
        self.verdicts: list[Verdict] = []
        self.dense_stages: list[DenseStage] = []
        self._pending: dict[float, list[Timing]] = {}  # timings of rates not judged yet
        self._shared: Verdict | None = None  # "faster", measured on steps that compute the same at every rate
        self._judged: set[float] = set()
        self._settling_left = SETTLING_STEPS  # untimed dense steps still due before any dense step is timed
        self._step: int | None = None
        self._timed_rate: float | None = None  # the rate of the step being timed (0.0: dense), None: untimed
        self._start = 0.0

    # ---- per step --------------------------------------------------------------------------------------------

    def begin_step(self, step: int) -> float:
        """The omission rate to run optimizer step ``step`` at; starts the clock when the step is timed."""
        scheduled = omission_rate_at(self.config, step, self.total_steps)
        warm = step > self.first_step
        if self._shared is not None and scheduled > self.crossover_rate and scheduled not in self._judged:
            self._take_shared_verdict(step, scheduled)
        if scheduled > self.crossover_rate and scheduled not in self._judged and not self._pending.get(scheduled):
            self._predict(step, scheduled)
        rate, timed, probe = scheduled, None, False
        if scheduled != 0.0 and scheduled <= self.crossover_rate:
            rate = 0.0
            self._count_dense_stage(step, scheduled)
        elif scheduled != 0.0 and warm and scheduled not in self._judged:
            # dense, sparse, dense, sparse: one dense timing next to the rate's more than its own, up to TIMED_STEPS
            pending = self._pending.get(scheduled, [])
            first_timed = pending[0].step if pending else step
            reference = self._reference(first_timed)
            if self._settling_left > 0 or len(reference) < len(pending) + 1:
                rate, probe = 0.0, True
                self.probe_steps.append(step)
            else:
                timed = scheduled
        if rate == 0.0 and warm:
            if self._settling_left > 0:
                self._settling_left -= 1
            elif probe or self._precedes_an_unjudged_rate(step):
                timed = 0.0
        if rate != scheduled:
            self.dense_fallback_steps += 1
        self._step, self._timed_rate = step, timed
        if timed is not None:
            self._start = self.clock()
        return rate

    def _reference(self, first_timed_step: int) -> list[Timing]:
        """The dense timings that a rate whose first timed step is ``first_timed_step`` is compared with."""
        return [t for t in self.dense_timings if t.step >= first_timed_step - REFERENCE_STEPS]

    def _precedes_an_unjudged_rate(self, step: int) -> bool:
        """Whether one of the next ``TIMED_STEPS`` steps is scheduled at a rate still to be judged: this scheduled
        dense step can be part of its reference."""
        following = range(step + 1, min(step + 1 + TIMED_STEPS, self.total_steps))
        rates = (omission_rate_at(self.config, s, self.total_steps) for s in following)
        return any(r > self.crossover_rate and r not in self._judged for r in rates)

    def end_step(self, positions: int, same_at_every_rate: bool = False) -> Verdict | None:
        """Stop the clock of a timed step; the ``Verdict`` when this step decided a rate, else None.

        ``positions``: the step's token positions on this rank; ``same_at_every_rate``: every training forward of
        the step on this rank split with context rows forward only (see the module docstring). Every rank reduces
        the timing of the same steps.
        """
        rate, step = self._timed_rate, self._step
        self._timed_rate = None
        if rate is None or step is None:
            return None
        varies = 0.0 if same_at_every_rate else 1.0  # max over ranks: one rank whose step varied decides
        seconds, reduced_positions, varied = self.reduce([self.clock() - self._start, float(positions), varies])
        timing = Timing(step, seconds, int(reduced_positions), same_at_every_rate=varied == 0.0)
        if rate == 0.0:
            self.dense_timings.append(timing)
            return None
        timings = self._pending.setdefault(rate, [])
        timings.append(timing)
        if len(timings) < TIMED_STEPS and self._rate_continues(step, rate, 1):
            return None
        if self._too_close_to_call(timings) and len(timings) < MAX_TIMED_STEPS and self._rate_continues(step, rate, 2):
            return None  # a probe on the next step, this rate's next timed step on the one after
        return self._judge(rate, self._pending.pop(rate))

    def _rate_continues(self, step: int, rate: float, steps: int) -> bool:
        """Whether step ``step + steps`` is still scheduled at ``rate`` (a ladder's stages have distinct rates)."""
        later = step + steps
        return later < self.total_steps and omission_rate_at(self.config, later, self.total_steps) == rate

    def _too_close_to_call(self, timings: list[Timing]) -> bool:
        """Whether the best of ``timings`` is within ``MIN_GAIN`` of its dense reference either way."""
        dense = min(t.per_position for t in self._reference(timings[0].step))
        best = min(t.per_position for t in timings)
        return abs(best - dense) < MIN_GAIN * dense

    # ---- verdicts --------------------------------------------------------------------------------------------

    def _judge(self, rate: float, timings: list[Timing]) -> Verdict:
        reference = self._reference(timings[0].step)
        dense = min(reference, key=lambda t: t.per_position)
        best = min(timings, key=lambda t: t.per_position)
        positions = max(1, dense.positions)
        verdict = Verdict(
            rate=rate,
            stage=stage_at(self.config, timings[0].step, self.total_steps).name,
            steps=tuple(t.step for t in timings),
            dense_steps=tuple(t.step for t in reference),
            seconds=best.per_position * positions,
            dense_seconds=dense.per_position * positions,
            positions=dense.positions,
            faster=best.per_position <= (1.0 - MIN_GAIN) * dense.per_position,
        )
        if verdict.faster and all(t.same_at_every_rate for t in timings):
            self._shared = verdict  # a slower one needs no sharing: every lower rate is at or below the crossover
        self._record(verdict, dense_from=timings[-1].step + 1)
        return verdict

    def _record(self, verdict: Verdict, dense_from: int) -> None:
        """Keep a verdict of the rate's own (measured or predicted); a slower one raises the crossover to its rate
        from step ``dense_from`` on."""
        self.verdicts.append(verdict)
        self._judged.add(verdict.rate)
        if verdict.faster:
            logger.info(f"SAT: {verdict.stage} (r={verdict.rate:.3g}) stays sparse: {verdict.describe()}.")
            return
        self.crossover_rate = max(self.crossover_rate, verdict.rate)
        logger.warning(
            f"SAT: {verdict.stage} (r={verdict.rate:.3g}) was {verdict.describe()}; steps at rates <= "
            f"{self.crossover_rate:.3g} run dense from step {dense_from} on (`dense_when_slower=False` follows the "
            "schedule instead)."
        )

    def _predict(self, step: int, rate: float) -> None:
        """Judge ``rate`` by the line through the gains of the two nearest higher rates judged on their own
        ``TIMED_STEPS`` or more steps, when it predicts less than ``MIN_GAIN``: no steps timed. Single-step verdicts
        (a linear decay's) are too noisy to extrapolate from."""
        measured = [v for v in self.verdicts if v.rate > rate and not v.shared_with and len(v.steps) >= TIMED_STEPS]
        if len(measured) < 2:
            return
        near, far = sorted(measured, key=lambda v: v.rate)[:2]
        if far.rate == near.rate:
            return
        slope = (far.gain - near.gain) / (far.rate - near.rate)
        gain = near.gain + slope * (rate - near.rate)
        if gain >= MIN_GAIN:
            return
        verdict = Verdict(
            rate=rate,
            stage=stage_at(self.config, step, self.total_steps).name,
            steps=(),
            dense_steps=(),
            seconds=near.dense_seconds * (1.0 - gain),
            dense_seconds=near.dense_seconds,
            positions=near.positions,
            faster=False,
            predicted_from=(far.stage, near.stage),
        )
        self._record(verdict, dense_from=step)

    def _take_shared_verdict(self, step: int, rate: float) -> None:
        """Judge ``rate`` faster by the verdict of a rate whose steps computed the same at every rate: no steps
        timed."""
        shared = self._shared
        assert shared is not None
        stage = stage_at(self.config, step, self.total_steps).name
        verdict = replace(shared, rate=rate, stage=stage, shared_with=shared.shared_with or shared.stage)
        self.verdicts.append(verdict)
        self._judged.add(rate)
        why = f"its steps compute what the {verdict.shared_with}'s did (split batches, context rows forward only)"
        logger.info(f"SAT: {stage} (r={rate:.3g}) stays sparse untimed: {why}, {verdict.describe()}.")

    def _count_dense_stage(self, step: int, rate: float) -> None:
        name = stage_at(self.config, step, self.total_steps).name
        if not self.dense_stages or self.dense_stages[-1].stage != name:
            self.dense_stages.append(DenseStage(name, rate, step))
        self.dense_stages[-1].steps += 1

    # ---- checkpoints -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Every timing and verdict so far, JSON-ready: what a resumed run needs to judge no rate twice."""
        return {
            "crossover_rate": self.crossover_rate,
            "dense_fallback_steps": self.dense_fallback_steps,
            "probe_steps": list(self.probe_steps),
            "dense_timings": [asdict(t) for t in self.dense_timings],
            "pending": [[rate, [asdict(t) for t in timings]] for rate, timings in self._pending.items()],
            "verdicts": [asdict(v) for v in self.verdicts],
            "shared": None if self._shared is None else asdict(self._shared),
            "dense_stages": [asdict(stage) for stage in self.dense_stages],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` of an earlier process of the same run."""

        def verdict(fields: dict[str, Any]) -> Verdict:
            tuples = {name: tuple(fields[name]) for name in ("steps", "dense_steps", "predicted_from")}
            return Verdict(**{**fields, **tuples})

        self.crossover_rate = float(state["crossover_rate"])
        self.dense_fallback_steps = int(state["dense_fallback_steps"])
        self.probe_steps = list(state["probe_steps"])
        self.dense_timings = [Timing(**t) for t in state["dense_timings"]]
        self._pending = {float(rate): [Timing(**t) for t in timings] for rate, timings in state["pending"]}
        self.verdicts = [verdict(v) for v in state["verdicts"]]
        self._shared = None if state["shared"] is None else verdict(state["shared"])
        self.dense_stages = [DenseStage(**stage) for stage in state["dense_stages"]]
        self._judged = {v.rate for v in self.verdicts}

    # ---- reports ---------------------------------------------------------------------------------------------

    def describe(self) -> str:
        """One line: the probes, each verdict, and the stages that ran dense, e.g. ``"rung 3 of 3 (r=0.167) ran dense
        from step 13: not faster than dense (3.89 s vs 3.62 s per step of 512 token positions)"``."""
        parts = [f"dense probe steps {self.probe_steps}"] if self.probe_steps else []
        verdicts = {verdict.stage: verdict for verdict in self.verdicts}
        for verdict in self.verdicts:
            if verdict.shared_with:
                parts.append(f"{verdict.stage} (r={verdict.rate:.3g}) ran sparse: as the {verdict.shared_with}")
            elif verdict.faster:
                parts.append(f"{verdict.stage} (r={verdict.rate:.3g}) ran sparse: {verdict.describe()}")
            elif not any(stage.stage == verdict.stage for stage in self.dense_stages):
                parts.append(f"{verdict.stage} (r={verdict.rate:.3g}) was {verdict.describe()}")
        for stage in self.dense_stages:
            own = verdicts.get(stage.stage)
            why = (
                own.describe()
                if own is not None and not own.faster
                else f"at or below the crossover rate {self.crossover_rate:.3g}"
            )
            parts.append(f"{stage.stage} (r={stage.rate:.3g}) ran dense from step {stage.first_step}: {why}")
        return "; ".join(parts) if parts else "nothing timed yet"

    def to_dict(self) -> dict[str, Any]:
        """The measurements and decisions, JSON-ready (e.g. for a recipe's ``metrics.json``)."""
        dense = min(self.dense_timings, key=lambda t: t.per_position) if self.dense_timings else None
        return {
            "dense_when_slower": True,
            "crossover_rate": self.crossover_rate,
            "dense_fallback_steps": self.dense_fallback_steps,
            "probe_steps": list(self.probe_steps),
            "dense_reference": None if dense is None else asdict(dense),
            "dense_steps_timed": [t.step for t in self.dense_timings],
            "verdicts": [
                {
                    **asdict(verdict),
                    "steps": list(verdict.steps),
                    "dense_steps": list(verdict.dense_steps),
                    "predicted_from": list(verdict.predicted_from),
                }
                for verdict in self.verdicts
            ],
            "stages_run_dense": [asdict(stage) for stage in self.dense_stages],
            "summary": self.describe(),
        }
