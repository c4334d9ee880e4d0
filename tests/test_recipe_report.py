"""What the recipes report, on hand-made numbers: the measured dense time saved, the A/B against dense training
(loss at equal wall time, time to reach dense's loss) and the plot's split of sparse and dense steps."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `recipes` is a folder of scripts, not installed

from peft_sat import SATConfig  # noqa: E402
from recipes import plots  # noqa: E402
from recipes.common import Arm  # noqa: E402
from recipes.measure import RunRecorder  # noqa: E402
from recipes.report import (  # noqa: E402
    compare_arms,
    dense_time_saved,
    loss_at,
    paired_step_times,
    seconds_to_reach,
    steady_machine,
)

# Held-out loss against training wall time: SAT is faster per step, dense learns more per step.
SAT_CURVE = [
    {"step": 0, "train_seconds": 0.0, "eval_loss": 2.0},
    {"step": 5, "train_seconds": 30.0, "eval_loss": 1.8},
    {"step": 10, "train_seconds": 60.0, "eval_loss": 1.6},
]
DENSE_CURVE = [
    {"step": 0, "train_seconds": 0.0, "eval_loss": 2.0},
    {"step": 5, "train_seconds": 50.0, "eval_loss": 1.7},
    {"step": 10, "train_seconds": 100.0, "eval_loss": 1.5},
]


def fake_arm(curve: list[dict], steps: list[dict], log_history: list[dict], sat: bool, output_dir: str) -> Arm:
    recorder = RunRecorder()
    recorder.eval_curve, recorder.steps, recorder.train_seconds = curve, steps, curve[-1]["train_seconds"]
    return Arm(
        sat_config=SATConfig() if sat else None,
        recorder=recorder,
        train_loss=1.0,
        log_history=log_history,
        global_step=curve[-1]["step"],
        max_steps=curve[-1]["step"],
        output_dir=output_dir,
        train_examples=8,
        eval_examples=2,
        launch={},
        is_main_process=True,
    )


def test_dense_time_saved_is_measured_from_dense_steps():
    records = [
        {"step": s + 1, "omission_rate": r, "seconds": t}
        for s, (r, t) in enumerate([(0.5, 9.0), (0.5, 1.0), (0.5, 1.0), (0.25, 1.5), (0.0, 2.0), (0.0, 2.0)])
    ]
    result = dense_time_saved(records)
    assert result["step_time_dense_s"] == 2.0
    assert result["dense_time_saved_s"] == pytest.approx(3 * (2.0 - 1.0) + (2.0 - 1.5))
    no_dense = dense_time_saved([{**r, "omission_rate": 0.5} for r in records])
    assert no_dense["dense_time_saved_s"] is None and "not measured" in no_dense["dense_time_note"]


def test_dense_time_saved_compares_steps_per_token():
    # The sparse steps ran batches twice as long as the dense rung's: per token they were not faster.
    shapes = [(0.5, 2.0, 200), (0.5, 2.0, 200), (0.5, 2.0, 200), (0.0, 1.0, 100), (0.0, 1.0, 100), (0.0, 1.0, 100)]
    records = [{"step": s + 1, "omission_rate": r, "seconds": t, "tokens": n} for s, (r, t, n) in enumerate(shapes)]
    assert dense_time_saved(records)["dense_time_saved_s"] == pytest.approx(0.0)
    records[1]["seconds"] = records[2]["seconds"] = 1.0  # now half the time per token
    assert dense_time_saved(records)["dense_time_saved_s"] == pytest.approx(3 * 0.75)


def test_loss_at_interpolates_between_evaluations_and_clamps_outside():
    assert loss_at(DENSE_CURVE, 25.0) == pytest.approx(1.85)
    assert loss_at(DENSE_CURVE, 60.0) == pytest.approx(1.66)
    assert loss_at(DENSE_CURVE, -1.0) == 2.0 and loss_at(DENSE_CURVE, 500.0) == 1.5


def test_seconds_to_reach_a_loss():
    assert seconds_to_reach(SAT_CURVE, 1.7) == pytest.approx(45.0)
    assert seconds_to_reach(SAT_CURVE, 2.5) == 0.0
    assert seconds_to_reach(SAT_CURVE, 1.5) is None  # never reached


def test_compare_arms_at_equal_steps_and_equal_wall_time():
    sat = fake_arm(SAT_CURVE, [], [], sat=True, output_dir="out")
    dense = fake_arm(DENSE_CURVE, [], [], sat=False, output_dir="out/dense")
    result = compare_arms(sat, dense, flops_saved_estimate=0.5)
    assert result["eval_loss_at_equal_steps"] == {"sat": 1.6, "dense": 1.5}
    assert result["eval_loss_at_equal_wall_time"] == {"train_seconds": 60.0, "sat": 1.6, "dense": pytest.approx(1.66)}
    assert result["wall_time_saved_s"] == 40.0 and result["wall_time_saved_fraction"] == pytest.approx(0.4)
    assert result["measured_to_estimated_saving"] == pytest.approx(0.8)
    assert result["sat_seconds_to_dense_final_loss"] is None  # SAT ends at 1.6, dense at 1.5
    # The slower arm is compared where the faster one stopped: swap the roles.
    swapped = compare_arms(dense, sat, flops_saved_estimate=0.5)
    assert swapped["eval_loss_at_equal_wall_time"] == {"train_seconds": 60.0, "sat": pytest.approx(1.66), "dense": 1.6}
    assert swapped["wall_time_saved_s"] == -40.0 and swapped["sat_seconds_to_dense_final_loss"] == pytest.approx(75.0)


def test_paired_step_times_compare_the_same_batches():
    sat = [
        {"step": s + 1, "omission_rate": r, "seconds": t} for s, (r, t) in enumerate([(0.5, 9), (0.5, 1), (0.0, 3)])
    ]
    dense = [{"step": s + 1, "omission_rate": 0.0, "seconds": t} for s, t in enumerate([9, 2, 3])]
    result = paired_step_times(sat, dense)  # the first step (warm-up) is left out
    assert result == {
        "step_time_saved_fraction": pytest.approx(1 - 4 / 5),
        "step_time_ratio_by_rate": {"0.0": 1.0, "0.5": 0.5},
    }
    # the A/B reports that saving against the FLOPs estimate too, beside the wall-time one
    curve = [{"step": 3, "train_seconds": 13.0, "eval_loss": 1.0}]
    compared = compare_arms(
        fake_arm(curve, sat, [], sat=True, output_dir="out"),
        fake_arm([{**curve[0], "train_seconds": 14.0}], dense, [], sat=False, output_dir="out/dense"),
        flops_saved_estimate=0.4,
    )
    assert compared["step_time_measured_to_estimated_saving"] == pytest.approx((1 - 4 / 5) / 0.4)
    assert compared["measured_to_estimated_saving"] == pytest.approx((1 / 14) / 0.4)


def test_steady_machine_from_the_dense_steps_of_both_arms():
    assert steady_machine({"0.5": 0.6, "0.0": 1.04}) is True
    assert steady_machine({"0.5": 0.6, "0.0": 0.7}) is False  # the dense arm ran on a busier machine
    assert steady_machine({"0.5": 0.8, "0.0": 1.10}) is False  # a drift of half what the schedule saves
    assert steady_machine({"0.5": 0.6}) is None  # no dense rung (constant schedule): cannot tell


def test_plot_tells_sparse_steps_from_dense_steps(tmp_path):
    rates = [0.5, 0.5, 0.25, 0.0]
    steps = [{"step": s + 1, "seconds": 1.0, "omission_rate": r} for s, r in enumerate(rates)]
    history = [{"step": s + 1, "loss": loss} for s, loss in enumerate([6.0, 5.0, 4.0, 1.5])]
    curve = [{"step": 0, "train_seconds": 0.0, "eval_loss": 2.0}, {"step": 4, "train_seconds": 3.0, "eval_loss": 1.9}]
    sat = fake_arm(curve, steps, history, sat=True, output_dir=str(tmp_path))
    dense = fake_arm(curve, steps, history, sat=False, output_dir=str(tmp_path / "dense"))

    figure = plots.draw_curves(sat, dense, title="test")
    ax_train = figure.axes[0]
    lines = {line.get_label(): line for line in ax_train.get_lines()}
    sparse = lines["SAT: sparse step, loss of the sub-network it trained"]
    assert list(sparse.get_xdata()) == [1, 2, 3] and list(sparse.get_ydata()) == [6.0, 5.0, 4.0]
    assert list(lines["SAT: dense step, model loss"].get_xdata()) == [4]
    time_panel_labels = {line.get_label() for line in figure.axes[3].get_lines()}
    assert {"SAT: held-out loss (dense eval)", "dense arm: held-out loss"} <= time_panel_labels
    path = plots.plot_curves(tmp_path, sat, dense, title="test")
    assert path.stat().st_size > 1000


def test_training_clock_leaves_out_evaluation(monkeypatch):
    from recipes import measure

    clock = iter([0.0, 1.0, 3.0, 13.0, 14.0])  # train begin, step 1 begin / end, step 2 begin / end
    monkeypatch.setattr(measure.time, "perf_counter", lambda: next(clock))
    recorder, state = RunRecorder(), SimpleNamespace(global_step=0)
    recorder.on_train_begin(None, state, None)
    recorder.on_evaluate(None, state, None, metrics={"eval_loss": 2.0, "eval_runtime": 0.5})  # eval_on_start
    for step in (1, 2):
        recorder.on_step_begin(None, state, None)
        state.global_step = step
        recorder.on_step_end(None, state, None)
        if step == 1:  # an evaluation of 9.5 s between the two steps
            recorder.on_evaluate(None, state, None, metrics={"eval_loss": 1.9, "eval_runtime": 9.5})
    recorder.on_train_end(None, state, None)
    recorder.on_evaluate(None, state, None, metrics={"eval_loss": 1.8, "eval_runtime": 7.0})  # after `train()`
    assert [s["seconds"] for s in recorder.steps] == [2.0, 1.0]
    assert recorder.train_seconds == 14.0 - 0.5 - 9.5
    assert recorder.eval_curve == [
        {"step": 0, "train_seconds": 0.0, "eval_loss": 2.0},
        {"step": 1, "train_seconds": 2.5, "eval_loss": 1.9},
        {"step": 2, "train_seconds": 4.0, "eval_loss": 1.8},
    ]
