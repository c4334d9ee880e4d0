"""Omission-rate schedules (``peft_sat.schedules``) and the schedule fields of ``SATConfig``: shapes, endpoints,
warm-up, explicit stairs, and the errors for schedules that do not fit the number of steps."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest

from peft_sat import SATConfig, omission_rate_at, schedule_rates, validate_schedule
from peft_sat.schedules import describe_schedule, stage_at, stages

SCHEDULE_FIELDS = ("schedule", "warmup_ratio", "ladder_full_rate_ratio", "ladder_rungs", "ladder_stairs")


def runs(rates: list[float]) -> list[tuple[float, int]]:
    """Run-length encoding: [(rate, number of consecutive steps)]."""
    out: list[tuple[float, int]] = []
    for rate in rates:
        if out and out[-1][0] == rate:
            out[-1] = (rate, out[-1][1] + 1)
        else:
            out.append((rate, 1))
    return out


# ---- ladder ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("total", [6, 8, 12, 37, 100, 1000])
def test_default_ladder_shape(total):
    config = SATConfig(omission_rate=0.6)
    validate_schedule(config, total)
    rates = schedule_rates(config, total)
    assert rates[0] == 0.6 and rates[-1] == 0.0
    assert all(a >= b for a, b in zip(rates, rates[1:])), "a ladder never climbs"
    assert [rate for rate, _ in runs(rates)] == pytest.approx([0.6, 0.4, 0.2, 0.0])
    full_steps = runs(rates)[0][1]
    assert full_steps == math.ceil(0.5 * total)  # ladder_full_rate_ratio = 0.5 of the steps at the full rate
    rung_lengths = [length for _, length in runs(rates)[1:]]
    assert max(rung_lengths) - min(rung_lengths) <= 1  # equal rungs up to rounding


@pytest.mark.parametrize("rungs", [1, 2, 4, 7])
@pytest.mark.parametrize("full", [0.25, 0.5, 0.75])
def test_ladder_rungs_and_full_rate_ratio(rungs, full):
    total = 64
    config = SATConfig(omission_rate=0.7, ladder_rungs=rungs, ladder_full_rate_ratio=full)
    validate_schedule(config, total)
    encoded = runs(schedule_rates(config, total))
    assert [rate for rate, _ in encoded] == pytest.approx([0.7 * (rungs - i) / rungs for i in range(rungs + 1)])
    assert encoded[0][1] == math.ceil(full * total)
    assert encoded[-1][0] == 0.0


def test_ladder_example_values():
    config = SATConfig(omission_rate=0.6, ladder_rungs=2)
    assert schedule_rates(config, 8) == pytest.approx([0.6] * 4 + [0.3] * 2 + [0.0] * 2)
    assert [(s.start, s.rate) for s in stages(config)] == [(0.0, 0.6), (0.5, 0.3), (0.75, 0.0)]
    assert describe_schedule(config, 8) == "steps 0-3: 0.6 | steps 4-5: 0.3 | steps 6-7: 0"


def test_stage_at_names_the_stage_of_a_step():
    config = SATConfig(omission_rate=0.6, ladder_rungs=2, warmup_ratio=0.1)  # 10 steps: 0 | 1-5 | 6-7 | 8-9
    steps = {0: "dense warm-up", 1: "full-rate stage", 5: "full-rate stage", 6: "rung 1 of 2", 8: "rung 2 of 2"}
    steps.update({9: "rung 2 of 2", 100: "rung 2 of 2"})  # steps past the end: the last stage
    assert {step: stage_at(config, step, 10).name for step in steps} == steps
    assert [stage_at(config, step, 10).rate for step in range(10)] == schedule_rates(config, 10)


def test_ladder_with_warmup():
    config = SATConfig(omission_rate=0.5, warmup_ratio=0.1, ladder_full_rate_ratio=0.4, ladder_rungs=1)
    rates = schedule_rates(config, 20)
    assert runs(rates) == [(0.0, 2), (0.5, 8), (0.0, 10)]


def test_zero_rate_is_dense_everywhere():
    assert schedule_rates(SATConfig(omission_rate=0.0), 12) == [0.0] * 12


@pytest.mark.parametrize("seed", range(20))
def test_random_ladders_descend_to_zero(seed):
    rng = random.Random(seed)
    warmup = rng.choice([0.0, 0.05, 0.2])
    config = SATConfig(
        omission_rate=rng.uniform(0.05, 0.95),
        warmup_ratio=warmup,
        ladder_full_rate_ratio=rng.uniform(0.05, 0.9 - warmup),
        ladder_rungs=rng.randint(1, 6),
    )
    total = rng.randint(60, 500)
    validate_schedule(config, total)
    rates = schedule_rates(config, total)
    sparse = rates[math.ceil(warmup * total) :]
    assert sparse[0] == config.omission_rate and rates[-1] == 0.0
    assert all(a >= b for a, b in zip(sparse, sparse[1:]))
    assert len(runs(sparse)) == config.ladder_rungs + 1  # every rung got steps


# ---- constant, linear ------------------------------------------------------------------------------------------


def test_constant():
    assert schedule_rates(SATConfig(omission_rate=0.3, schedule="constant"), 5) == [0.3] * 5
    rates = schedule_rates(SATConfig(omission_rate=0.3, schedule="constant", warmup_ratio=0.25), 8)
    assert rates == [0.0, 0.0] + [0.3] * 6


@pytest.mark.parametrize("warmup, total", [(0.0, 2), (0.0, 11), (0.2, 10), (0.5, 7)])
def test_linear_decays_evenly_to_zero(warmup, total):
    config = SATConfig(omission_rate=0.5, schedule="linear", warmup_ratio=warmup)
    validate_schedule(config, total)
    rates = schedule_rates(config, total)
    start = math.ceil(warmup * total)
    assert rates[:start] == [0.0] * start
    decay = rates[start:]
    assert decay[0] == 0.5 and decay[-1] == 0.0
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert steps == pytest.approx([0.5 / (len(decay) - 1)] * (len(decay) - 1))


# ---- explicit stairs -------------------------------------------------------------------------------------------


def test_explicit_stairs():
    config = SATConfig(ladder_stairs=[(0.0, 0.5), (0.5, 0.2), (0.75, 0.0)])
    assert schedule_rates(config, 8) == pytest.approx([0.5] * 4 + [0.2] * 2 + [0.0] * 2)
    # warm-up first: the first stair starts when the warm-up ends
    config = SATConfig(ladder_stairs=[(0.0, 0.5), (0.5, 0.2), (0.75, 0.0)], warmup_ratio=0.1)
    assert schedule_rates(config, 10) == pytest.approx([0.0] + [0.5] * 4 + [0.2] * 3 + [0.0] * 2)


def test_stairs_may_climb_and_round_trip_through_json():
    # Explicit stairs are the user's choice: they may climb and need not end dense.
    config = SATConfig(ladder_stairs=[(0.0, 0.2), (0.5, 0.4)])
    assert schedule_rates(config, 4) == pytest.approx([0.2, 0.2, 0.4, 0.4])
    # adapter_config.json stores the pairs as lists: they read back the same
    loaded = json.loads(json.dumps({"ladder_stairs": config.ladder_stairs}))["ladder_stairs"]
    assert loaded == [[0.0, 0.2], [0.5, 0.4]]
    assert schedule_rates(SATConfig(ladder_stairs=loaded), 4) == schedule_rates(config, 4)


# ---- steps out of range, rounding ------------------------------------------------------------------------------


def test_steps_past_the_end_keep_the_last_rate_and_bad_steps_raise():
    config = SATConfig(omission_rate=0.5)
    assert omission_rate_at(config, 8, 8) == omission_rate_at(config, 100, 8) == 0.0
    with pytest.raises(ValueError, match="`step` must be an int >= 0"):
        omission_rate_at(config, -1, 8)
    for total in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="`total_steps` must be an int >= 1"):
            omission_rate_at(config, 0, total)
        with pytest.raises(ValueError, match="`total_steps`"):
            validate_schedule(config, total)


def test_floating_point_boundaries_round_to_the_intended_step():
    # 0.1 + 0.2 = 0.30000000000000004: the stage starting at 30% of 10 steps must start at step 3, not 4
    config = SATConfig(omission_rate=0.5, warmup_ratio=0.1, ladder_full_rate_ratio=0.2, ladder_rungs=1)
    assert runs(schedule_rates(config, 10)) == [(0.0, 1), (0.5, 2), (0.0, 7)]


# ---- schedules that do not fit the number of steps ------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, total, message",
    [
        (
            dict(ladder_rungs=5),
            8,
            r"`ladder_rungs`=5 does not fit `total_steps`=8: rung 5 of 5 gets no step.*at most 4",
        ),
        (dict(), 5, r"`ladder_rungs`=3 does not fit `total_steps`=5"),  # the default ladder needs 6 steps
        (dict(ladder_full_rate_ratio=0.9), 8, r"`ladder_rungs`=3 .* spans 0 steps.*smaller `ladder_full_rate_ratio`"),
        (dict(warmup_ratio=0.15, ladder_full_rate_ratio=0.05, ladder_rungs=1), 8, r"`ladder_full_rate_ratio`=0.05"),
        (dict(ladder_stairs=[(0.0, 0.5), (0.51, 0.2), (0.55, 0.0)]), 8, r"`ladder_stairs` stair 1 \(0.51, 0.2\)"),
        (dict(ladder_stairs=[(0.0, 0.5), (0.1, 0.0)], warmup_ratio=0.2), 10, r"`ladder_stairs` stair 0"),
        (dict(schedule="constant", warmup_ratio=0.95), 8, r"`warmup_ratio`=0.95 leaves the constant stage no step"),
        (dict(schedule="linear", warmup_ratio=0.8), 8, r"`schedule`='linear' needs at least 2 steps"),
        (dict(schedule="linear"), 1, r"`schedule`='linear' needs at least 2 steps"),
    ],
)
def test_schedule_that_does_not_fit_raises(fields, total, message):
    with pytest.raises(ValueError, match=message):
        validate_schedule(SATConfig(**fields), total)


@pytest.mark.parametrize("total", range(6, 200))
def test_default_ladder_fits_from_six_steps(total):
    validate_schedule(SATConfig(), total)
    assert schedule_rates(SATConfig(), total)[-1] == 0.0


# ---- config fields ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(schedule="cosine"), r"`schedule` must be one of \['ladder', 'constant', 'linear'\], got 'cosine'"),
        (dict(warmup_ratio=1.0), r"`warmup_ratio` must be a float in \[0, 1\), got 1.0"),
        (dict(warmup_ratio=-0.1), r"`warmup_ratio`"),
        (dict(warmup_ratio="0.1"), r"`warmup_ratio`"),
        (dict(ladder_full_rate_ratio=0.0), r"`ladder_full_rate_ratio` must be a float in \(0, 1\), got 0.0"),
        (dict(ladder_full_rate_ratio=1.0), r"`ladder_full_rate_ratio`"),
        (dict(ladder_rungs=0), r"`ladder_rungs` must be an int >= 1, got 0"),
        (dict(ladder_rungs=2.0), r"`ladder_rungs`"),
        (dict(ladder_rungs=True), r"`ladder_rungs`"),
        (
            dict(warmup_ratio=0.5, ladder_full_rate_ratio=0.5),
            r"`warmup_ratio` \+ `ladder_full_rate_ratio` must be < 1",
        ),
        (dict(ladder_stairs=[]), r"`ladder_stairs` must be a non-empty list"),
        (dict(ladder_stairs=[0.5]), r"`ladder_stairs` items must be \(fraction, rate\) number pairs"),
        (dict(ladder_stairs=[(0.0, 0.5, 1.0)]), r"`ladder_stairs` items"),
        (dict(ladder_stairs=[(0.1, 0.5)]), r"`ladder_stairs` must start at fraction 0.0"),
        (dict(ladder_stairs=[(0.0, 0.5), (0.0, 0.2)]), r"start fractions must increase strictly"),
        (dict(ladder_stairs=[(0.0, 0.5), (1.0, 0.2)]), r"start fractions must increase strictly and lie in \[0, 1\)"),
        (dict(ladder_stairs=[(0.0, 1.0)]), r"`ladder_stairs` rates must be in \[0, 1\), got 1.0"),
        (dict(ladder_stairs=[(0.0, 0.5)], schedule="linear"), r"`ladder_stairs` shapes the 'ladder' schedule only"),
    ],
)
def test_bad_schedule_fields_raise(fields, message):
    with pytest.raises(ValueError, match=message):
        SATConfig(**fields)


def test_schedule_fields_have_help_and_round_trip(tmp_path):
    by_name = {f.name: f for f in dataclasses.fields(SATConfig)}
    for name in SCHEDULE_FIELDS:
        assert by_name[name].metadata.get("help"), f"{name} has no help text"
    config = SATConfig(schedule="ladder", warmup_ratio=0.1, ladder_rungs=4, ladder_full_rate_ratio=0.6)
    config.save_pretrained(str(tmp_path))
    loaded = SATConfig.from_pretrained(str(tmp_path))
    assert {name: getattr(loaded, name) for name in SCHEDULE_FIELDS} == {
        name: getattr(config, name) for name in SCHEDULE_FIELDS
    }
