"""The crossover check (``SATConfig.dense_when_slower``, ``peft_sat.crossover``) with injected step times: a rate
whose steps are not faster than dense steps runs dense from then on, with every lower rate, and a faster one stays
sparse; the logs, the log line, the FLOPs estimate and a resumed run say so; ranks reach the same verdicts."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch
from sat_testing import SAT_KEYS, lm_dataset, paper_config, tiny_llama, train_logs, training_args
from transformers import Trainer

from peft_sat import SATCallback, SATConfig, omission_rate_at
from peft_sat.crossover import (
    MAX_TIMED_STEPS,
    MIN_GAIN,
    REFERENCE_STEPS,
    SETTLING_STEPS,
    TIMED_STEPS,
    CrossoverCheck,
)
from peft_sat.step_timing import max_over_ranks

STEPS = 16  # the default ladder at r = 0.5: steps 0-7 at 0.5, 8-10 at 1/3, 11-13 at 1/6, 14-15 dense
LONG_STEPS = 24  # steps 0-11 at 0.5, 12-15 at 1/3, 16-19 at 1/6, 20-23 dense: a judged rung has steps left
# Seconds per step by rate: 0.5 and 1/3 beat dense, 1/6 does not (its fixed costs outweigh what it saves), though
# the line through the higher rates' gains predicts it faster (so its steps are timed).
SECONDS = {0.0: 1.0, 0.5: 0.6, 0.333: 0.7, 0.167: 1.2}
# What runs in LONG_STEPS: step 0 as scheduled (never timed); dense probes 1-2 (settling, untimed), 3 and 5
# alternating with 0.5 on 4 and 6 (judged faster); probes 12 and 14 alternating with 1/3 on 13 and 15 (faster); 1/6
# on 16-17, judged slower against the probes 12 and 14 (recent enough), so 18-19 run dense.
EXPECTED = [0.5] + [0.0] * 3 + [0.5, 0.0] + [0.5] * 6 + [0.0, 1 / 3, 0.0, 1 / 3] + [1 / 6] * 2 + [0.0] * 6


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run faster on one thread (the Trainer tests here are about the schedule, not the speed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class FakeClock:
    """Time passes only when a step runs: ``run(rate)`` adds the step time of ``rate`` (``seconds``)."""

    def __init__(self, seconds: dict[float, float] | Callable[[float], float] = SECONDS) -> None:
        self.seconds = seconds if callable(seconds) else (lambda rate: seconds[round(rate, 3)])
        self.now = 0.0
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return self.now

    def run(self, rate: float) -> None:
        self.now += self.seconds(rate)


def drive(
    check: CrossoverCheck,
    clock: FakeClock,
    positions: Callable[[float], int] = lambda rate: 32,
    split: bool = False,
) -> list[float]:
    """Run every step of ``check``'s run from its first step; the rates that ran. ``split``: every sparse step's
    batches split with context rows forward only (it computes the same at every rate)."""
    rates = []
    for step in range(check.first_step, check.total_steps):
        rate = check.begin_step(step)
        clock.run(rate)
        check.end_step(positions(rate), same_at_every_rate=split and rate > 0)
        rates.append(rate)
    return rates


def crossover_trainer(
    output_dir, clock: FakeClock, config: SATConfig | None = None, dataset=None, **arg_overrides
) -> tuple[Trainer, SATCallback]:
    """A Trainer of ``LONG_STEPS`` whose SATCallback reads ``clock``; each model forward advances it by its rate's
    step time. ``config``: the paper's at r = 0.5 unless given; ``dataset``: ``lm_dataset()`` unless given."""
    model = tiny_llama()
    config = config or paper_config(omission_rate=0.5, importance="uniform")
    callback = SATCallback(config, clock=clock)
    model.register_forward_hook(lambda module, args, output: clock.run(callback.current_rate()))
    args = training_args(output_dir, max_steps=LONG_STEPS, **arg_overrides)
    train = dataset if dataset is not None else lm_dataset()
    return Trainer(model=model, args=args, train_dataset=train, callbacks=[callback]), callback


# ---- in a Trainer ------------------------------------------------------------------------------------------------


def test_rung_below_the_crossover_runs_dense_and_the_logs_say_so(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="peft_sat")
    clock = FakeClock()
    trainer, callback = crossover_trainer(tmp_path, clock)
    trainer.train()

    logs = train_logs(trainer.state.log_history)
    ran = [entry["sat/omission_rate"] for entry in logs]
    assert ran == pytest.approx(EXPECTED)
    scheduled = [omission_rate_at(callback.sat_state.config, step, LONG_STEPS) for step in range(LONG_STEPS)]
    assert ran != pytest.approx(scheduled)  # the check changed what ran
    assert [entry["sat/crossover_rate"] for entry in logs] == pytest.approx([0.0] * 17 + [1 / 6] * 7)
    assert logs[-1]["sat/crossover_dense_steps"] == 8  # six probes and the last two steps of the 1/6 rung

    # FLOPs: a step run dense saved nothing
    saved = sum(callback.flops.saved_fraction(rate) for rate in ran)
    assert logs[-1]["sat/dense_steps_saved"] == pytest.approx(saved)
    assert logs[-1]["sat/flops_saved_fraction"] == pytest.approx(saved / LONG_STEPS)
    assert saved < sum(callback.flops.saved_fraction(rate) for rate in scheduled)

    report = callback.crossover
    assert report["crossover_rate"] == pytest.approx(1 / 6) and report["probe_steps"] == [1, 2, 3, 5, 12, 14]
    assert report["dense_steps_timed"] == [3, 5, 12, 14]  # the settling probes 1-2 are not timed
    reference = report["dense_reference"]  # the fastest timed dense step (all equal here, up to the float clock)
    assert reference["step"] in (3, 5, 12, 14) and reference["seconds"] == pytest.approx(1.0)
    assert reference["positions"] == 32  # batch 2 x 16 tokens
    assert [(v["stage"], v["steps"], v["dense_steps"], v["faster"]) for v in report["verdicts"]] == [
        ("full-rate stage", [4, 6], [3, 5], True),
        ("rung 1 of 3", [13, 15], [12, 14], True),
        ("rung 2 of 3", [16, 17], [12, 14], False),
    ]
    assert report["stages_run_dense"] == [
        {"stage": "rung 2 of 3", "rate": pytest.approx(1 / 6), "first_step": 18, "steps": 2}
    ]
    # Both log lines: the decision when it is taken, the summary at the end of training.
    decision = "rung 2 of 3 (r=0.167) was not faster than dense (1.2 s vs 1 s per step of 32 token positions)"
    summary = "rung 2 of 3 (r=0.167) ran dense from step 18: not faster than dense (1.2 s vs 1 s per step of 32"
    assert any(decision in record.message and record.levelno == logging.WARNING for record in caplog.records)
    assert any(summary in record.message for record in caplog.records)


def test_split_batches_take_one_verdict_for_every_rate(tmp_path, caplog):
    """Prompt / completion batches under the defaults split (context rows forward only): no unit is omitted and a
    step computes the same at every rate, so the full-rate stage's verdict serves the rungs without probes."""
    caplog.set_level(logging.INFO, logger="peft_sat")
    rows = lm_dataset()
    prompt_masked = [[-100] * 8 + labels[8:] for labels in rows["labels"]]  # loss on the last half of each row
    dataset = rows.remove_columns("labels").add_column("labels", prompt_masked)
    clock = FakeClock({0.0: 1.0, 0.5: 0.7, 0.333: 0.7, 0.167: 0.7})  # split steps: the same time at every rate
    trainer, callback = crossover_trainer(
        tmp_path, clock, config=SATConfig(omission_rate=0.5, importance="uniform"), dataset=dataset
    )
    trainer.train()

    logs = train_logs(trainer.state.log_history)
    assert all(0 < entry["sat/dense_token_fraction"] < 1 for entry in logs if entry["sat/omission_rate"] > 0)
    report = callback.crossover
    assert report["probe_steps"] == [1, 2, 3, 5]  # the full-rate stage's only; EXPECTED probes 12 and 14 as well
    scheduled = [omission_rate_at(callback.sat_state.config, step, LONG_STEPS) for step in range(LONG_STEPS)]
    ran = [entry["sat/omission_rate"] for entry in logs]
    assert ran == pytest.approx([0.0 if step in (1, 2, 3, 5) else scheduled[step] for step in range(LONG_STEPS)])
    assert [(v["stage"], v["steps"], v["shared_with"], v["faster"]) for v in report["verdicts"]] == [
        ("full-rate stage", [4, 6], "", True),
        ("rung 1 of 3", [4, 6], "full-rate stage", True),
        ("rung 2 of 3", [4, 6], "full-rate stage", True),
    ]
    assert "rung 2 of 3 (r=0.167) ran sparse: as the full-rate stage" in report["summary"]
    assert any("rung 1 of 3 (r=0.333) stays sparse untimed" in record.message for record in caplog.records)


def test_resume_keeps_the_crossover_and_the_flops_count(tmp_path):
    full, _ = crossover_trainer(tmp_path / "run", FakeClock(), save_strategy="steps", save_steps=18)
    full.train()
    reference = train_logs(full.state.log_history)

    # Resumed after the verdict on 1/6: step 18 is the first step of the new process (never timed), and runs dense
    # because the crossover comes back from the checkpoint.
    resumed, callback = crossover_trainer(tmp_path / "resumed", FakeClock())
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-18"))
    continued = train_logs(resumed.state.log_history)[-6:]

    assert [entry["step"] for entry in continued] == list(range(19, 25))
    for mine, theirs in zip(continued, reference[18:]):
        assert {key: mine[key] for key in SAT_KEYS} == pytest.approx({key: theirs[key] for key in SAT_KEYS})
    assert continued[0]["sat/omission_rate"] == 0.0
    assert callback.crossover["probe_steps"] == [1, 2, 3, 5, 12, 14]  # the run's record, from before the checkpoint
    assert [v["stage"] for v in callback.crossover["verdicts"]] == ["full-rate stage", "rung 1 of 3", "rung 2 of 3"]


@pytest.mark.parametrize("stored", [True, False])
def test_resume_judges_no_rate_twice(tmp_path, stored):
    """Resumed inside the full-rate stage after its verdict: the checkpoint's timings and verdicts come back, so its
    steps run sparse as in the uninterrupted run. A checkpoint without them (an older peft_sat) keeps only the
    crossover rate: the stage is judged again, on dense probes in place of sparse steps."""
    full, _ = crossover_trainer(tmp_path / "run", FakeClock(), save_strategy="steps", save_steps=8)
    full.train()
    checkpoint = tmp_path / "run" / "checkpoint-8"
    if not stored:
        state_file = checkpoint / "trainer_state.json"
        trainer_state = json.loads(state_file.read_text())
        del trainer_state["stateful_callbacks"]["SATCallback"]
        state_file.write_text(json.dumps(trainer_state))

    resumed, callback = crossover_trainer(tmp_path / "resumed", FakeClock())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    ran = [entry["sat/omission_rate"] for entry in train_logs(resumed.state.log_history)[-16:]]

    if stored:
        assert ran[:4] == pytest.approx(EXPECTED[8:12])  # steps 8-11 at r = 0.5, as in the uninterrupted run
        assert callback.crossover["verdicts"][0]["steps"] == [4, 6]  # the verdict from before the checkpoint
    else:
        assert ran[1:4] == [0.0, 0.0, 0.0]  # settling and probes again: the stage was judged anew


def test_trainer_restoring_callback_states_rebuilds_the_callback(tmp_path):
    """With ``restore_callback_states_from_checkpoint`` the Trainer replaces the callback by one built from
    ``state()``: it trains on from the checkpoint with the same config and the restored verdicts."""
    full, _ = crossover_trainer(tmp_path / "run", FakeClock(), save_strategy="steps", save_steps=8)
    full.train()
    resumed, original = crossover_trainer(
        tmp_path / "resumed", FakeClock(), restore_callback_states_from_checkpoint=True
    )
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-8"))
    rebuilt = next(cb for cb in resumed.callback_handler.callbacks if isinstance(cb, SATCallback))
    assert rebuilt is not original and rebuilt.config == original.config
    assert rebuilt.crossover["verdicts"][0]["steps"] == [4, 6]
    assert resumed.state.global_step == LONG_STEPS


def test_switched_off_follows_the_schedule_and_reads_no_clock(tmp_path):
    clock = FakeClock()
    model = tiny_llama()
    callback = SATCallback(paper_config(omission_rate=0.5, importance="uniform", dense_when_slower=False), clock=clock)
    args = training_args(tmp_path, max_steps=STEPS)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[callback])
    trainer.train()
    logs = train_logs(trainer.state.log_history)
    config = callback.sat_state.config
    assert [entry["sat/omission_rate"] for entry in logs] == [omission_rate_at(config, s, STEPS) for s in range(STEPS)]
    assert clock.reads == 0 and callback.crossover == {"dense_when_slower": False}
    assert all(entry["sat/crossover_rate"] == 0.0 and entry["sat/crossover_dense_steps"] == 0 for entry in logs)


# ---- the check on its own ------------------------------------------------------------------------------------------


def test_faster_everywhere_costs_only_the_probes():
    config = paper_config(omission_rate=0.5)
    clock = FakeClock({0.0: 1.0, 0.5: 0.5, 0.333: 0.6, 0.167: 0.9})
    check = CrossoverCheck(config, STEPS, first_step=0, clock=clock)
    rates = drive(check, clock)
    # the settling steps, then a probe before each rate's first and second timed steps (0.5 on 4, 6; 1/3 on 8, 10;
    # 1/6 on 11, 13), except where a probe of the rate before is recent enough (8 compares with 5, 11 with 9)
    assert check.probe_steps == [1, 2, 3, 5, 9, 12]
    scheduled = [omission_rate_at(config, s, STEPS) for s in range(STEPS)]
    assert rates == pytest.approx([0.0 if s in check.probe_steps else scheduled[s] for s in range(STEPS)])
    assert check.crossover_rate == 0.0 and check.dense_fallback_steps == len(check.probe_steps)
    assert all(verdict.faster for verdict in check.verdicts) and len(check.verdicts) == 3
    for verdict in check.verdicts:  # each compared with dense steps next to its own
        assert len(verdict.dense_steps) == TIMED_STEPS
        assert all(step >= verdict.steps[0] - REFERENCE_STEPS for step in verdict.dense_steps)
    assert SETTLING_STEPS == 2 and [t.step for t in check.dense_timings] == [3, 5, 9, 12]


def test_a_rung_is_judged_against_dense_steps_next_to_it_not_the_first_ones():
    """Step times drift: every step of the first 10 takes 1.3x its later time. A rung at 1.1 s per step is faster than
    the early dense steps (1.3 s) and slower than the dense steps next to it (1.0 s): it runs dense."""
    runs = []

    def seconds(rate: float) -> float:
        runs.append(rate)
        drift = 1.3 if len(runs) <= 10 else 1.0
        return drift * {0.0: 1.0, 0.5: 0.6, 0.333: 0.7, 0.167: 1.1}[round(rate, 3)]

    clock = FakeClock(seconds)
    check = CrossoverCheck(paper_config(omission_rate=0.5), LONG_STEPS, first_step=0, clock=clock)
    rates = drive(check, clock)
    verdict = check.verdicts[-1]
    assert verdict.rate == pytest.approx(1 / 6) and not verdict.faster
    early = [t.seconds for t in check.dense_timings if t.step < 10]
    assert early == pytest.approx([1.3, 1.3]) and 1.1 < (1 - MIN_GAIN) * 1.3  # the first dense steps would pass it
    assert verdict.dense_steps == (12, 14) and verdict.dense_seconds == pytest.approx(1.0)
    assert rates[18:20] == [0.0, 0.0] and check.crossover_rate == pytest.approx(1 / 6)


def test_a_dense_warmup_is_the_reference_and_a_slow_full_rate_runs_everything_dense():
    # 16 steps: warm-up 0-3 (steps 1-2 settle, step 3 timed), 0.5 on 4-11 (step 5 a timed probe), rungs 1/3 on 12-13,
    # 1/6 on 14, 0 on 15
    config = paper_config(omission_rate=0.5, warmup_ratio=0.25)
    clock = FakeClock({0.0: 1.0, 0.5: 1.1, 0.333: 0.5, 0.167: 0.5})
    check = CrossoverCheck(config, STEPS, first_step=0, clock=clock)
    rates = drive(check, clock)
    # 0.5 is judged slower on steps 4 and 6; every lower rate then runs dense, unmeasured
    assert rates == [0.0] * 4 + [0.5, 0.0, 0.5] + [0.0] * 9
    assert check.probe_steps == [5] and check.crossover_rate == 0.5 and len(check.verdicts) == 1
    assert [t.step for t in check.dense_timings] == [3, 5]
    assert [(stage.stage, stage.first_step, stage.steps) for stage in check.dense_stages] == [
        ("full-rate stage", 7, 5),
        ("rung 1 of 3", 12, 2),
        ("rung 2 of 3", 14, 1),
    ]
    assert check.dense_fallback_steps == 9
    summary = check.describe()
    assert "full-rate stage (r=0.5) ran dense from step 7: not faster than dense (1.1 s vs 1 s" in summary
    assert "rung 2 of 3 (r=0.167) ran dense from step 14: at or below the crossover rate 0.5" in summary


def test_linear_decay_judges_each_step_and_turns_dense_at_the_crossover():
    config = paper_config(omission_rate=0.5, schedule="linear")
    clock = FakeClock(lambda rate: 1.0 if rate == 0 else 1.17 - rate)  # as fast as dense at r = 0.17
    steps = 20
    check = CrossoverCheck(config, steps, first_step=0, clock=clock)
    rates = drive(check, clock)
    scheduled = [omission_rate_at(config, step, steps) for step in range(steps)]
    # slower than dense by the crossover's measure: saving under MIN_GAIN (r < 0.2: 0.5 * 7 / 19 = 0.18 at step 12)
    first_slow = next(step for step in range(steps) if 1.17 - scheduled[step] > 1.0 - MIN_GAIN)
    assert first_slow == 12
    # settling 1-2, a timed probe on 3 for steps 4-7, another on 8 (3 is too old by then) for steps 9-12
    assert check.probe_steps == [1, 2, 3, 8] and REFERENCE_STEPS == 4
    sparse = [step for step in range(1, first_slow + 1) if step not in check.probe_steps]
    assert rates == pytest.approx(
        [scheduled[s] if s in sparse or s == 0 else 0.0 for s in range(first_slow + 1)] + [0.0] * (steps - 13)
    )
    assert check.crossover_rate == pytest.approx(scheduled[first_slow])
    assert [(verdict.steps, verdict.dense_steps) for verdict in check.verdicts] == [
        ((step,), (3,) if step < 8 else (8,)) for step in sparse
    ]


def test_a_linear_decay_of_split_steps_is_judged_once():
    """A linear decay judges every step's rate, with a dense probe every ``REFERENCE_STEPS + 1`` steps; split steps
    compute the same at every rate, so the first verdict serves every later rate and the probes stop."""
    config = paper_config(omission_rate=0.5, schedule="linear")
    clock = FakeClock(lambda rate: 1.0 if rate == 0 else 0.7)
    steps = 20
    check = CrossoverCheck(config, steps, first_step=0, clock=clock)
    rates = drive(check, clock, split=True)
    scheduled = [omission_rate_at(config, step, steps) for step in range(steps)]
    assert check.probe_steps == [1, 2, 3] and [t.step for t in check.dense_timings] == [3]
    assert rates == pytest.approx([0.0 if step in (1, 2, 3) else scheduled[step] for step in range(steps)])
    measured, *taken = check.verdicts
    assert measured.steps == (4,) and measured.faster and not measured.shared_with
    assert [verdict.rate for verdict in taken] == pytest.approx([r for r in scheduled[5:] if r > 0])
    assert all(verdict.shared_with == "linear decay" and verdict.steps == (4,) for verdict in taken)
    assert check.crossover_rate == 0.0 and check.dense_fallback_steps == 3


def test_a_slow_split_verdict_turns_the_lower_rates_dense_as_before():
    clock = FakeClock({0.0: 1.0, 0.5: 1.1, 0.333: 1.1, 0.167: 1.1})
    check = CrossoverCheck(paper_config(omission_rate=0.5), STEPS, first_step=0, clock=clock)
    rates = drive(check, clock, split=True)
    assert rates == [0.5] + [0.0] * 3 + [0.5, 0.0, 0.5] + [0.0] * (STEPS - 7)
    assert check.crossover_rate == 0.5 and [v.shared_with for v in check.verdicts] == [""]


def test_times_compare_per_token_position():
    """Short dense probe batches, long sparse ones: slower per step, faster per token position."""
    clock = FakeClock({0.0: 1.0, 0.5: 1.5, 0.333: 1.5, 0.167: 1.5})
    check = CrossoverCheck(paper_config(omission_rate=0.5), STEPS, first_step=0, clock=clock)
    drive(check, clock, positions=lambda rate: 32 if rate == 0 else 64)
    assert check.verdicts and all(verdict.faster for verdict in check.verdicts)
    assert check.verdicts[0].seconds == pytest.approx(0.75) and check.verdicts[0].positions == 32


def test_a_rate_within_the_noise_of_dense_runs_dense():
    """2% faster than dense is not faster: below ``MIN_GAIN`` the full-rate stage and every rung run dense."""
    assert MIN_GAIN > 0.02
    clock = FakeClock({0.0: 1.0, 0.5: 0.98, 0.333: 0.5, 0.167: 0.5})
    check = CrossoverCheck(paper_config(omission_rate=0.5), STEPS, first_step=0, clock=clock)
    rates = drive(check, clock)
    assert not check.verdicts[0].faster and check.crossover_rate == 0.5
    assert rates == [0.5] + [0.0] * 3 + [0.5, 0.0, 0.5] + [0.0] * (STEPS - 7)


def test_a_rate_too_close_to_call_is_timed_on_more_steps_before_it_runs_dense():
    """1% faster than dense after two timed steps: within ``MIN_GAIN`` either way, so the full rate is timed on two
    more steps, each after a probe, before its verdict (not faster); the steps after it run dense. With 16 steps the
    stage has no room for them and the verdict comes after two (the test above)."""
    clock = FakeClock({0.0: 1.0, 0.5: 0.99, 0.333: 0.5, 0.167: 0.5})
    check = CrossoverCheck(paper_config(omission_rate=0.5), LONG_STEPS, first_step=0, clock=clock)
    rates = drive(check, clock)
    assert MAX_TIMED_STEPS == 4 and check.probe_steps == [1, 2, 3, 5, 7, 9]
    assert rates == [0.5] + [0.0] * 3 + [0.5, 0.0] * 4 + [0.0] * (LONG_STEPS - 12)
    (verdict,) = check.verdicts
    assert verdict.steps == (4, 6, 8, 10) and verdict.dense_steps == (3, 5, 7, 9) and not verdict.faster
    assert check.crossover_rate == 0.5 and check.dense_stages[0].first_step == 11


def test_two_slow_timed_steps_do_not_cost_a_rate_that_is_faster():
    """The full rate's first two timed steps are outliers (as slow as dense); the third shows its real time, 0.7 of
    dense, and it stays sparse: the run loses two probes, not the whole schedule's saving."""
    runs = []

    def seconds(rate: float) -> float:
        if rate == 0.0:
            return 1.0
        runs.append(rate)
        return 1.0 if len(runs) in (2, 3) else 0.7  # sparse runs: step 0 (untimed), then the timed steps 4 and 6

    clock = FakeClock(seconds)
    check = CrossoverCheck(paper_config(omission_rate=0.5), LONG_STEPS, first_step=0, clock=clock)
    rates = drive(check, clock)
    first = check.verdicts[0]
    assert first.steps == (4, 6, 8) and first.dense_steps == (3, 5, 7) and first.faster
    assert first.seconds == pytest.approx(0.7) and check.probe_steps[:6] == [1, 2, 3, 5, 7, 12]
    assert rates[8:12] == [0.5] * 4 and check.crossover_rate == 0.0


def test_a_rung_the_higher_rates_predict_slower_runs_dense_untimed(caplog):
    """0.5 saves 15%, 1/3 5%: the line through them predicts -5% at 1/6, so its rung runs dense without timing a
    step at its rate (it would have been 0.9 here: the prediction, not the clock, decides)."""
    caplog.set_level(logging.WARNING, logger="peft_sat")
    clock = FakeClock({0.0: 1.0, 0.5: 0.85, 0.333: 0.95, 0.167: 0.9})
    check = CrossoverCheck(paper_config(omission_rate=0.5), LONG_STEPS, first_step=0, clock=clock)
    rates = drive(check, clock)
    assert rates[12:] == [0.0, 1 / 3, 0.0, 1 / 3] + [0.0] * 8  # rung 2 (steps 16-19) never runs at 1/6
    *measured, predicted = check.verdicts
    assert [v.rate for v in measured] == pytest.approx([0.5, 1 / 3]) and all(v.faster for v in measured)
    assert predicted.rate == pytest.approx(1 / 6) and not predicted.faster and predicted.steps == ()
    assert predicted.gain == pytest.approx(0.05 - (0.15 - 0.05) / (0.5 - 1 / 3) * (1 / 3 - 1 / 6))
    assert predicted.predicted_from == ("full-rate stage", "rung 1 of 3")
    assert check.crossover_rate == pytest.approx(1 / 6) and check.dense_stages[0].first_step == 16
    assert "rung 2 of 3 (r=0.167) ran dense from step 16: predicted not faster than dense (-5.0% saved" in (
        check.describe()
    )
    assert check.to_dict()["verdicts"][-1]["predicted_from"] == ["full-rate stage", "rung 1 of 3"]
    assert any("predicted not faster" in record.message for record in caplog.records)


def test_a_rung_the_higher_rates_predict_faster_is_timed_as_before():
    """15% and 10% put 1/6 at 5% on the line: above ``MIN_GAIN``, so its steps are timed and they decide."""
    clock = FakeClock({0.0: 1.0, 0.5: 0.85, 0.333: 0.9, 0.167: 0.96})
    check = CrossoverCheck(paper_config(omission_rate=0.5), LONG_STEPS, first_step=0, clock=clock)
    drive(check, clock)
    last = check.verdicts[-1]
    assert last.rate == pytest.approx(1 / 6) and last.steps == (16, 17) and last.faster
    assert not any(v.predicted_from for v in check.verdicts)


def test_a_resumed_process_never_times_its_first_step_and_keeps_a_known_crossover():
    config = paper_config(omission_rate=0.5)
    clock = FakeClock()
    check = CrossoverCheck(config, STEPS, first_step=11, clock=clock, crossover_rate=1 / 6, dense_fallback_steps=2)
    assert drive(check, clock) == [0.0] * 5
    assert check.dense_fallback_steps == 5 and check.verdicts == []


# ---- ranks -------------------------------------------------------------------------------------------------------


class FakeAllReduce:
    """``max_over_ranks`` for ranks played by threads: each rank's call blocks until every rank has made it, so a
    timing that only one rank reduces fails the test (the barrier times out) instead of hanging a real job."""

    def __init__(self, world_size: int) -> None:
        self.barrier = threading.Barrier(world_size, timeout=20)
        self.values: list[list[float]] = [[] for _ in range(world_size)]

    def rank(self, rank: int) -> Callable[[list[float]], list[float]]:
        def reduce(values: list[float]) -> list[float]:
            self.values[rank] = values
            self.barrier.wait()
            result = [max(column) for column in zip(*self.values)]
            self.barrier.wait()  # every rank has read before any writes the next step's values
            return result

        return reduce


def on_ranks(play_rank: Callable[[int], Any], world_size: int = 2) -> list[Any]:
    """``play_rank(rank)`` for every rank, each in a thread of its own; the results by rank. A thread's exception
    fails the test here instead of passing silently."""
    results: list[Any] = [None] * world_size
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            results[index] = play_rank(index)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


def test_ranks_with_different_timings_run_the_same_rates():
    # Rank 0 finds 1/3 faster than dense, rank 1 (slower at low rates, e.g. longer batches) does not.
    timings = [{0.0: 1.0, 0.5: 0.6, 0.333: 0.7, 0.167: 0.9}, {0.0: 1.0, 0.5: 0.7, 0.333: 1.1, 0.167: 1.2}]
    config = paper_config(omission_rate=0.5)

    def run_ranks(reduce_for: Callable[[int], Callable[[list[float]], list[float]]]) -> list[list[float]]:
        def play(index: int) -> list[float]:
            clock = FakeClock(timings[index])
            return drive(CrossoverCheck(config, STEPS, first_step=0, clock=clock, reduce=reduce_for(index)), clock)

        return on_ranks(play)

    alone = run_ranks(lambda index: lambda values: values)
    assert alone[0] != alone[1], "without the reduction the ranks would disagree (the test would prove nothing)"
    fake = FakeAllReduce(2)
    reduced = run_ranks(fake.rank)
    assert reduced[0] == reduced[1] == alone[1]  # the slowest rank decides


def test_a_rank_whose_step_did_not_split_keeps_each_rate_measured():
    """The verdict serves every rate only when the timed steps split on every rank: here rank 1's did not."""
    config = paper_config(omission_rate=0.5)
    seconds = {0.0: 1.0, 0.5: 0.6, 0.333: 0.6, 0.167: 0.6}
    clock = FakeClock(seconds)
    alone = CrossoverCheck(config, LONG_STEPS, first_step=0, clock=clock)
    drive(alone, clock, split=True)
    assert alone.probe_steps == [1, 2, 3, 5]

    fake = FakeAllReduce(2)

    def play(index: int) -> CrossoverCheck:
        clock = FakeClock(seconds)
        check = CrossoverCheck(config, LONG_STEPS, first_step=0, clock=clock, reduce=fake.rank(index))
        drive(check, clock, split=index == 0)
        return check

    checks = on_ranks(play)
    assert checks[0].probe_steps == checks[1].probe_steps == [1, 2, 3, 5, 12, 14]
    assert not any(verdict.shared_with for check in checks for verdict in check.verdicts)


def test_max_over_ranks_is_the_identity_on_one_process(tmp_path):
    assert max_over_ranks([1.5, 32.0]) == [1.5, 32.0]  # no process group
    distributed = torch.distributed
    distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'group'}", rank=0, world_size=1)
    try:
        assert max_over_ranks([1.5, 32.0]) == [1.5, 32.0]  # a real all-reduce over one rank
    finally:
        distributed.destroy_process_group()


def test_dense_when_slower_must_be_a_bool():
    with pytest.raises(ValueError, match=r"`dense_when_slower` must be True or False, got 'yes'"):
        paper_config(dense_when_slower="yes")
