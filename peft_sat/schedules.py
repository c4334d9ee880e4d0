"""Omission-rate schedules: pure functions of ``(step, total_steps) -> omission rate``.

A schedule is a list of *stages*, each starting at a fraction of the total number of optimizer steps. Step ``s``
(0-based, ``s`` finished steps before it) of ``T`` belongs to the last stage whose start ``x`` satisfies
``s >= x * T``, i.e. a stage starting at fraction ``x`` starts at step ``ceil(x * T)`` (the rounding of
``transformers``' ``warmup_ratio``). Stages read from the config (``peft_sat.SATConfig``):

- warm-up (``warmup_ratio`` = w > 0): rate 0 on ``[0, w)``, for every schedule;
- ``"constant"``: ``r`` (= ``omission_rate``) from ``w`` on;
- ``"linear"``: ``r`` at the first step after the warm-up ``s0``, decreasing linearly to exactly 0 at the last
  step: ``rate(s) = r * (T - 1 - s) / (T - 1 - s0)``;
- ``"ladder"`` (LORS in the paper): the full rate ``r`` on ``[w, w + f)`` (f = ``ladder_full_rate_ratio``), then
  ``n`` = ``ladder_rungs`` rungs of equal length splitting ``[w + f, 1)``, rung ``i = 1..n`` at rate
  ``r * (n - i) / n``: the last rung is dense (rate 0). With ``ladder_stairs`` = ``[(x_0, r_0), (x_1, r_1), ...]``
  the stages are given explicitly instead (``x_0 = 0``, strictly increasing start fractions).

Why a dense end, reached in steps: the paper's ladder omission rate scheduler (LORS) returns to dense training at the
end against overfitting of the sparse sub-networks. An early prototype that trained at r = 0.5 for 75% of the steps
and then jumped to dense (SmolLM2-135M, continual pre-training, 24 steps of 4 x 128 tokens) raised the held-out
loss during its sparse phase (3.83 -> 3.90, while dense training lowered it to 3.50), and its dense end brought it
back only to 3.72. So the default descends in several rungs (r, 2r/3, r/3, 0 with f = 0.5, n = 3).

``validate_schedule(config, total_steps)`` raises a ``ValueError`` naming the field when a stage gets no step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .config import SATConfig  # config.py imports nothing from here (config_validation owns SCHEDULES)


@dataclass(frozen=True)
class Stage:
    """One stage of a schedule: from fraction ``start`` of training on, the rate ``rate`` (None: linear decay)."""

    name: str  # for error messages, e.g. "rung 2 of 3"
    field: str  # the config field that defines the stage, named in errors
    start: float  # fraction of total steps in [0, 1)
    rate: float | None


def stages(config: SATConfig) -> list[Stage]:
    """The stages of ``config``'s schedule, in order (independent of the number of steps).

    Example:
        >>> [(s.start, s.rate) for s in stages(SATConfig(omission_rate=0.6, ladder_rungs=2))]  # doctest: +SKIP
        [(0.0, 0.6), (0.5, 0.3), (0.75, 0.0)]
    """
    rate, warmup = float(config.omission_rate), float(config.warmup_ratio)
    result = [Stage("dense warm-up", "warmup_ratio", 0.0, 0.0)] if warmup > 0 else []
    if config.schedule == "constant":
        result.append(Stage("constant stage", "omission_rate", warmup, rate))
    elif config.schedule == "linear":
        result.append(Stage("linear decay", "schedule", warmup, None))
    elif config.ladder_stairs is not None:
        for i, (start, stair_rate) in enumerate(config.ladder_stairs):
            # A stair starting inside the warm-up starts when the warm-up ends (and gets no step if the next does too).
            name = f"stair {i} ({start}, {stair_rate})"
            result.append(Stage(name, "ladder_stairs", max(float(start), warmup), float(stair_rate)))
    else:
        full, rungs = float(config.ladder_full_rate_ratio), int(config.ladder_rungs)
        result.append(Stage("full-rate stage", "ladder_full_rate_ratio", warmup, rate))
        descent = 1.0 - warmup - full  # fraction of training spent on the rungs
        for i in range(1, rungs + 1):
            start = warmup + full + (i - 1) * descent / rungs
            result.append(Stage(f"rung {i} of {rungs}", "ladder_rungs", start, rate * (rungs - i) / rungs))
    return result


def first_step(fraction: float, total_steps: int) -> int:
    """First step ``s`` of ``total_steps`` with ``s >= fraction * total_steps``.

    The product is rounded to 9 decimals first so that e.g. ``0.3 * 10`` (= 3.0000000000000004) starts at step 3.
    """
    return math.ceil(round(fraction * total_steps, 9))


def omission_rate_at(config: SATConfig, step: int, total_steps: int) -> float:
    """The omission rate of optimizer step ``step`` (0-based) out of ``total_steps``.

    Steps past the end keep the rate of the last step. Call ``validate_schedule`` once beforehand: on a schedule
    that does not fit ``total_steps`` the stages that get no step are skipped silently here.

    Raises:
        ValueError: ``step < 0`` or ``total_steps < 1``.

    Example:
        >>> config = SATConfig(omission_rate=0.6, ladder_full_rate_ratio=0.5, ladder_rungs=2)  # doctest: +SKIP
        >>> [omission_rate_at(config, s, 8) for s in range(8)]  # doctest: +SKIP
        [0.6, 0.6, 0.6, 0.6, 0.3, 0.3, 0.0, 0.0]
    """
    stage, start = _stage_and_start(config, step, total_steps)
    if stage.rate is not None:
        return stage.rate
    # Linear decay from r at the stage's first step to 0 at the last step.
    step = min(step, total_steps - 1)
    span = total_steps - 1 - start
    return float(config.omission_rate) * (total_steps - 1 - step) / span if span > 0 else 0.0


def stage_at(config: SATConfig, step: int, total_steps: int) -> Stage:
    """The stage that optimizer step ``step`` (0-based) of ``total_steps`` belongs to (steps past the end: the last).

    Raises:
        ValueError: ``step < 0`` or ``total_steps < 1``.

    Example:
        >>> stage_at(SATConfig(omission_rate=0.6, ladder_rungs=2), 5, 8).name  # doctest: +SKIP
        'rung 1 of 2'
    """
    return _stage_and_start(config, step, total_steps)[0]


def _stage_and_start(config: SATConfig, step: int, total_steps: int) -> tuple[Stage, int]:
    _check_steps(total_steps)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"`step` must be an int >= 0, got {step!r}.")
    step = min(step, total_steps - 1)
    all_stages = stages(config)
    starts = [first_step(stage.start, total_steps) for stage in all_stages]
    index = max(i for i, start in enumerate(starts) if start <= step or i == 0)
    return all_stages[index], starts[index]


def schedule_rates(config: SATConfig, total_steps: int) -> list[float]:
    """The rate of every step ``0 .. total_steps - 1`` (for plots, logs and tests)."""
    return [omission_rate_at(config, step, total_steps) for step in range(total_steps)]


def validate_schedule(config: SATConfig, total_steps: int) -> None:
    """Check that every stage of ``config``'s schedule gets at least one of ``total_steps`` optimizer steps.

    Raises:
        ValueError: naming the config field, the rule and the values, with a fix; e.g. more ladder rungs than steps
            in the descent, a warm-up that covers the whole run, or a linear decay shorter than 2 steps.

    Example:
        >>> validate_schedule(SATConfig(ladder_rungs=5), total_steps=8)  # doctest: +SKIP
        ValueError: `ladder_rungs`=5 does not fit `total_steps`=8: ...
    """
    _check_steps(total_steps)
    all_stages = stages(config)
    starts = [first_step(stage.start, total_steps) for stage in all_stages] + [total_steps]
    for i, stage in enumerate(all_stages):
        if starts[i] < starts[i + 1]:
            continue
        if stage.field == "ladder_rungs":
            first_rung = next(j for j, other in enumerate(all_stages) if other.field == "ladder_rungs")
            descent = total_steps - starts[first_rung]  # steps left after warm-up and full-rate stage
            fix = f"Use at most {descent} rungs" if descent > 0 else "Use a smaller `ladder_full_rate_ratio`"
            raise ValueError(
                f"`ladder_rungs`={config.ladder_rungs} does not fit `total_steps`={total_steps}: {stage.name} gets no "
                f"step (the descent after the full-rate stage spans {descent} steps). {fix}, or train for more steps."
            )
        if stage.field == "ladder_full_rate_ratio":
            raise ValueError(
                f"`ladder_full_rate_ratio`={config.ladder_full_rate_ratio} gives the full-rate stage no step out of "
                f"`total_steps`={total_steps}. Use a larger ratio (at least 1 / {total_steps}) or train longer."
            )
        if stage.field == "ladder_stairs":
            raise ValueError(
                f"`ladder_stairs` {stage.name} gets no step out of `total_steps`={total_steps} (it starts at step "
                f"{starts[i]}, the next stage at step {starts[i + 1]}, `warmup_ratio`={config.warmup_ratio}). Space "
                "the stairs at least 1 / total_steps apart, after the warm-up."
            )
        raise ValueError(
            f"`warmup_ratio`={config.warmup_ratio} leaves the {stage.name} no step out of `total_steps`={total_steps}. "
            "Use a smaller warm-up or train longer."
        )
    if config.schedule == "linear" and total_steps - starts[-2] < 2:
        raise ValueError(
            f"`schedule`='linear' needs at least 2 steps after the warm-up to decay from `omission_rate` to 0, got "
            f"{total_steps - starts[-2]} (`total_steps`={total_steps}, `warmup_ratio`={config.warmup_ratio})."
        )


def describe_schedule(config: SATConfig, total_steps: int) -> str:
    """A one-line plan, e.g. ``"steps 0-3: 0.5 | steps 4-5: 0.25 | steps 6-7: 0"`` (linear: first -> last)."""
    all_stages = stages(config)
    starts = [first_step(stage.start, total_steps) for stage in all_stages] + [total_steps]
    parts = []
    for i, stage in enumerate(all_stages):
        first, last = starts[i], starts[i + 1] - 1
        if first > last:
            continue
        if stage.rate is None:
            rate = (
                f"{omission_rate_at(config, first, total_steps):g} -> {omission_rate_at(config, last, total_steps):g}"
            )
        else:
            rate = f"{stage.rate:g}"
        parts.append(f"steps {first}-{last}: {rate}")
    return " | ".join(parts)


def _check_steps(total_steps: int) -> None:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"`total_steps` must be an int >= 1 (the number of optimizer steps), got {total_steps!r}.")
