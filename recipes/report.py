"""What a recipe run reports: the dense time SAT saved, the A/B against dense training, ``metrics.json``, a summary.

Dense time saved is MEASURED in the same run: the default ladder schedule ends on a dense rung (rate 0), whose
steps are real dense training steps of the same model, batch size and sequence length. With ``t_dense`` the median
dense step time and ``t_r`` the median step time at each omission rate ``r > 0``::

    saved = sum over sparse rates r of  n_r * (t_dense - t_r)

Step times are compared per token: each step's seconds are scaled to the run's mean batch size in token positions
(padding included), because SFT batches are padded to their longest example, so the few dense steps at the end of
the ladder may hold shorter or longer batches than the sparse steps they are compared with. Packed blocks (cpt.py)
all have the same size, which leaves their times unchanged.

The first step of a run is left out of the medians (one-time allocation and warm-up costs). The dense steps of a
SAT run are not all settled ones: on a CPU the first dense steps after sparse ones took 1.4-2x a settled dense step,
so this in-run figure can miss the A/B's (``--compare_dense``), which times a real dense run, in either direction.
A run with fewer than two timed dense steps (e.g. ``sat_schedule=constant``) reports no measured saving, only the
callback's FLOPs estimate; the dense baseline (``--use_sat false``) reports its own step time for comparison.

With ``--compare_dense true`` the dense baseline is trained too, from the same start, and ``compare_arms`` sets the
two held-out loss curves side by side against training wall time (evaluation excluded): the loss at equal steps, the
loss at equal wall time (linear interpolation between evaluations), and when SAT reached dense's final loss.
"""

from __future__ import annotations

import json
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

from peft_sat.schedules import describe_schedule

from . import plots
from .common import Arm

METRICS_FILE = "metrics.json"
# Step times of the same dense computation on a quiet machine differ by a few percent; beyond this, the machine's
# load changed between the two arms of the A/B. A drift of 10% is more than half of what `make sft`'s schedule
# saves (18%): such an A/B says nothing about the saving.
STEADY_TOLERANCE = 0.05
VARIANT_LABELS = {"full": "full-parameter", "lora": "LoRA", "qlora": "QLoRA (4-bit base)"}


def variant(model_args: Any) -> str:
    """'qlora' (4-bit base + LoRA), 'lora' or 'full' (every weight trains)."""
    return "qlora" if model_args.load_in_4bit else "lora" if model_args.use_peft else "full"


def dense_time_saved(records: list[dict[str, float]]) -> dict[str, Any]:
    """The measured dense time saved by the sparse steps of ``records`` (see the module docstring)."""
    records = per_mean_batch(records)
    timed = records[1:]  # the first step carries one-time costs
    by_rate: dict[float, list[float]] = {}
    for record in timed:
        by_rate.setdefault(record["omission_rate"], []).append(record["seconds"])
    dense = by_rate.pop(0.0, [])
    sparse_steps = sum(1 for record in records if record["omission_rate"] > 0)
    result: dict[str, Any] = {
        "step_time_dense_s": statistics.median(dense) if dense else None,
        "dense_steps_timed": len(dense),
        "sparse_steps": sparse_steps,
        "step_time_sparse_s": {str(rate): statistics.median(times) for rate, times in sorted(by_rate.items())},
        "dense_time_saved_s": None,
        "dense_time_saved_fraction": None,
    }
    if sparse_steps == 0:
        result["dense_time_note"] = "no sparse steps: nothing saved (dense run)"
        return result
    if len(dense) < 2:
        result["dense_time_note"] = (
            "not measured: fewer than 2 dense steps (after the first step) to time; the schedule needs a dense rung of 2+ steps"
        )
        return result
    t_dense = result["step_time_dense_s"]
    counts: dict[float, int] = {}
    for record in records:
        if record["omission_rate"] > 0:
            counts[record["omission_rate"]] = counts.get(record["omission_rate"], 0) + 1
    # A rate seen only on the first step has no median of its own: count it at the slowest measured sparse rate.
    fallback = max((statistics.median(t) for t in by_rate.values()), default=t_dense)
    saved = sum(n * (t_dense - statistics.median(by_rate.get(rate, [fallback]))) for rate, n in counts.items())
    total_steps_time = sum(record["seconds"] for record in records)
    result["dense_time_saved_s"] = saved
    result["dense_time_saved_fraction"] = saved / (total_steps_time + saved) if total_steps_time + saved > 0 else None
    result["dense_time_note"] = (
        f"measured: median of {len(dense)} dense steps of this run vs each sparse rate's median, per token"
    )
    return result


def per_mean_batch(records: list[dict[str, float]]) -> list[dict[str, float]]:
    """``records`` with each step's seconds scaled to the mean ``tokens`` per step (unchanged without token counts)."""
    if not records or any(not record.get("tokens") for record in records):
        return records
    mean_tokens = sum(record["tokens"] for record in records) / len(records)
    return [{**record, "seconds": record["seconds"] * mean_tokens / record["tokens"]} for record in records]


def loss_at(curve: list[dict[str, float]], seconds: float) -> float:
    """The held-out loss of ``curve`` at training wall time ``seconds``, linearly interpolated between evaluations.

    ``curve``: ``{"train_seconds", "eval_loss"}`` points in time order; clamped to its first / last point outside.
    """
    if seconds <= curve[0]["train_seconds"]:
        return curve[0]["eval_loss"]
    for left, right in zip(curve, curve[1:]):
        if seconds <= right["train_seconds"]:
            span = right["train_seconds"] - left["train_seconds"]
            weight = (seconds - left["train_seconds"]) / span if span > 0 else 1.0
            return left["eval_loss"] + weight * (right["eval_loss"] - left["eval_loss"])
    return curve[-1]["eval_loss"]


def seconds_to_reach(curve: list[dict[str, float]], loss: float) -> float | None:
    """The first training wall time at which ``curve`` reaches ``loss`` or lower (interpolated); None if never."""
    if curve[0]["eval_loss"] <= loss:
        return curve[0]["train_seconds"]
    for left, right in zip(curve, curve[1:]):
        if right["eval_loss"] <= loss:
            drop = left["eval_loss"] - right["eval_loss"]
            weight = (left["eval_loss"] - loss) / drop if drop > 0 else 1.0
            return left["train_seconds"] + weight * (right["train_seconds"] - left["train_seconds"])
    return None


def compare_arms(sat: Arm, dense: Arm, flops_saved_estimate: float | None) -> dict[str, Any]:
    """The A/B of ``--compare_dense``: held-out loss at equal steps and equal wall time, time to dense's final loss."""
    sat_curve, dense_curve = sat.recorder.eval_curve, dense.recorder.eval_curve
    sat_seconds, dense_seconds = sat.recorder.train_seconds, dense.recorder.train_seconds
    # Equal wall time: when the shorter arm stopped; the longer arm's loss is interpolated there.
    equal_seconds = min(sat_seconds, dense_seconds)
    saved = dense_seconds - sat_seconds
    saved_fraction = saved / dense_seconds if dense_seconds > 0 else None
    dense_final = dense.eval_loss_after
    reached = seconds_to_reach(sat_curve, dense_final)
    paired = paired_step_times(sat.recorder.steps, dense.recorder.steps)
    return {
        "dense_output_dir": dense.output_dir,
        "interleaved_arms": sat.interleaved,  # one optimizer step of each arm in turn (`--interleave_arms`)
        "steps": {"sat": sat.global_step, "dense": dense.global_step},
        "train_seconds": {"sat": sat_seconds, "dense": dense_seconds},
        "wall_time_saved_s": saved,
        "wall_time_saved_fraction": saved_fraction,
        "flops_saved_fraction_estimate": flops_saved_estimate,
        "measured_to_estimated_saving": _ratio(saved_fraction, flops_saved_estimate),
        "eval_loss_before": {"sat": sat.eval_loss_before, "dense": dense.eval_loss_before},
        "eval_loss_at_equal_steps": {"sat": sat.eval_loss_after, "dense": dense_final},
        "eval_loss_at_equal_wall_time": {
            "train_seconds": equal_seconds,
            "sat": loss_at(sat_curve, equal_seconds),
            "dense": loss_at(dense_curve, equal_seconds),
        },
        "dense_final_eval_loss": dense_final,
        "sat_seconds_to_dense_final_loss": reached,
        "sat_time_to_dense_final_loss_saved_fraction": (
            (dense_seconds - reached) / dense_seconds if reached is not None and dense_seconds > 0 else None
        ),
        "eval_curve": {"sat": sat_curve, "dense": dense_curve},
        **paired,
        # the same ratio without each arm's first step, which on some machines one arm pays more for than the other
        "step_time_measured_to_estimated_saving": _ratio(paired["step_time_saved_fraction"], flops_saved_estimate),
        "steady_machine": steady_machine(paired["step_time_ratio_by_rate"]),
        "dense_step_time_s": dense_time_saved(dense.recorder.steps)["step_time_dense_s"],
        # the dense arm's own steps, as `steps` holds the SAT arm's: which steps of which arm were slow
        "dense_steps": dense.recorder.steps,
        "dense_train_loss": dense.train_loss,
        "dense_log_history": dense.log_history,
    }


def paired_step_times(sat_steps: list[dict[str, float]], dense_steps: list[dict[str, float]]) -> dict[str, Any]:
    """SAT's step times against dense's on the same batches (the A/B's arms see the same data order).

    Pairing step ``s`` of both arms cancels what differs from batch to batch (SFT batches are padded to their
    longest example, so step times vary with the data). The first step of each arm is left out (warm-up).

    Returns:
        ``step_time_saved_fraction``: ``1 - sum(SAT step seconds) / sum(dense step seconds)``, and
        ``step_time_ratio_by_rate``: the median of SAT's / dense's step time per omission rate (below 1: faster).
    """
    dense_seconds = {record["step"]: record["seconds"] for record in dense_steps[1:]}
    pairs = [(record, dense_seconds[record["step"]]) for record in sat_steps[1:] if record["step"] in dense_seconds]
    by_rate: dict[float, list[float]] = {}
    for record, dense_time in pairs:
        by_rate.setdefault(record["omission_rate"], []).append(record["seconds"] / dense_time)
    total_dense = sum(dense_time for _, dense_time in pairs)
    return {
        "step_time_saved_fraction": 1 - sum(r["seconds"] for r, _ in pairs) / total_dense if total_dense else None,
        "step_time_ratio_by_rate": {str(rate): statistics.median(ratios) for rate, ratios in sorted(by_rate.items())},
    }


def steady_machine(step_time_ratio_by_rate: dict[str, float], tolerance: float = STEADY_TOLERANCE) -> bool | None:
    """Whether the machine ran both arms of the A/B at the same speed; None when it cannot be told.

    The SAT arm's dense steps (rate 0, the ladder's last rung) run the same computation on the same batches as the
    dense arm's steps of the same number; their time ratio is 1 on a steady machine. Another job starting or ending
    between the arms moves it, and with it every wall-time number of the A/B. So does anything that slows one arm's
    dense steps only: on a 2-core CPU, before the arms started from the same allocator state, the SAT arm's measured
    1.24-1.27x the dense arm's (docs/results.md, "Whole runs against dense"); this check reports such a gap.
    """
    ratio = step_time_ratio_by_rate.get(str(0.0))
    return None if ratio is None else abs(ratio - 1.0) <= tolerance


def _ratio(measured: float | None, estimated: float | None) -> float | None:
    return measured / estimated if measured is not None and estimated else None


def run_metrics(
    recipe: str,
    dataset: str,
    unit: str,
    model_args: Any,
    arm: Arm,
    dense: Arm | None,
    wall_start: float,
    cpu_settings: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """Everything ``metrics.json`` holds about a run (and its dense arm with ``--compare_dense``);
    ``cpu_settings``: what ``common.tune_for_cpu`` applied, which step times depend on."""
    last = {key: value for entry in arm.log_history for key, value in entry.items()}  # latest value of every key
    tokens = int(last.get("num_tokens", 0))
    runtime = arm.recorder.train_seconds
    kind = variant(model_args)
    sat = arm.sat_config is not None
    flops = last.get("sat/flops_saved_fraction") if sat else None
    measured = dense_time_saved(arm.recorder.steps)
    return {
        "recipe": recipe,
        "variant": kind,
        "variant_label": ("SAT + " if sat else "dense ") + VARIANT_LABELS[kind],
        "sat": sat,
        "model": model_args.model_name_or_path,
        "dataset": dataset,
        "output_dir": arm.output_dir,
        "saved": "LoRA adapter" if model_args.use_peft else "model",
        "unit": unit,
        "train_examples": arm.train_examples,
        "eval_examples": arm.eval_examples,
        **arm.launch,
        "max_steps": arm.max_steps,
        "global_step": arm.global_step,
        "eval_loss_before": arm.eval_loss_before,
        "eval_loss_after": arm.eval_loss_after,
        "eval_curve": arm.recorder.eval_curve,
        "train_loss": arm.train_loss,
        "train_runtime_s": runtime,  # training wall time, held-out evaluations excluded
        # what the training clock spent outside the timed steps: data loading, logging, callbacks between steps
        "time_between_steps_s": runtime - sum(record["seconds"] for record in arm.recorder.steps),
        "wall_time_s": time.perf_counter() - wall_start,
        **(cpu_settings or {}),
        "train_tokens": tokens,
        "tokens_per_s": tokens / runtime if runtime else None,
        "omission_rate_final": last.get("sat/omission_rate", 0.0),
        "flops_saved_fraction_estimate": flops,
        "schedule": describe_schedule(arm.sat_config, arm.max_steps) if sat else "dense",
        "sat_config": arm.sat_config.to_dict() if sat else None,
        "crossover": arm.crossover,  # which rungs ran dense because their steps were not faster than dense steps
        **measured,
        "measured_to_estimated_saving": _ratio(measured["dense_time_saved_fraction"], flops),
        "compare_dense": compare_arms(arm, dense, flops) if dense is not None else None,
        "steps": arm.recorder.steps,
        "log_history": arm.log_history,
    }


def write_report(metrics: dict[str, Any], arm: Arm, dense: Arm | None) -> None:
    """On the main process: ``metrics.json``, then the plot (last: a failure there only warns), then the summary."""
    if not arm.is_main_process:
        return
    output_dir = Path(metrics["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, default=str))
    try:
        plot = plots.plot_curves(output_dir, arm, dense, title=f"{metrics['recipe']}: {metrics['variant_label']}")
        plot_line = f"   plot: {plot}"
    except Exception as error:  # noqa: BLE001 - the run's results are in metrics.json; the picture is optional
        warnings.warn(f"The training-curves plot could not be written: {type(error).__name__}: {error}", stacklevel=2)
        plot_line = f"   plot: NOT written ({type(error).__name__}: {error})"
    print(format_summary(metrics) + "\n" + plot_line, flush=True)


def format_summary(m: dict[str, Any]) -> str:
    """A short human-readable summary of a run's ``metrics``."""
    lines = [
        f"== {m['recipe']}: {m['variant_label']} | model {m['model']} | data {m['dataset']}",
        f"   {m['global_step']} steps, {m['train_examples']} training / {m['eval_examples']} held-out {m['unit']}",
        f"   held-out loss (evaluated dense): {_num(m['eval_loss_before'])} -> {_num(m['eval_loss_after'])}",
        f"   throughput: {_num(m['tokens_per_s'], '.0f')} tokens/s ({m['train_tokens']} tokens in "
        f"{_num(m['train_runtime_s'], '.1f')} s of training, evaluation excluded); wall time {_num(m['wall_time_s'], '.1f')} s",
    ]
    if m["sat"]:
        lines.append(f"   SAT schedule: {m['schedule']}")
        lines.append(
            f"   step time: dense {_num(m['step_time_dense_s'], '.2f')} s, sparse "
            + ", ".join(f"r={float(rate):.3g}: {t:.2f} s" for rate, t in m["step_time_sparse_s"].items())
        )
        saved = m["dense_time_saved_s"]
        if saved is None:
            saved_text = "n/a"
        elif saved >= 0:
            saved_text = f"{saved:.1f} s ({100 * m['dense_time_saved_fraction']:.0f}%)"
        else:  # say it plainly: on small models / busy CPUs the sliced steps can be slower than dense ones
            saved_text = f"none, the sparse steps took {-saved:.1f} s LONGER than dense steps would have"
        lines.append(f"   dense time saved: {saved_text}; {m['dense_time_note']}")
        crossover = m.get("crossover") or {}
        if crossover.get("summary"):
            lines.append(f"   crossover check (rungs not faster than dense run dense): {crossover['summary']}")
        flops = m.get("flops_saved_fraction_estimate")
        lines.append(
            f"   training FLOPs saved (estimate, linear layers only): {_percent(flops)}; measured / estimate: "
            f"{_num(m['measured_to_estimated_saving'], '.2f')}"
        )
    else:
        lines.append(f"   dense baseline (SAT off): step time {_num(m['step_time_dense_s'], '.2f')} s")
    if m.get("compare_dense"):
        lines.extend(_format_comparison(m["compare_dense"]))
    lines.append(f"   saved to {m['output_dir']}: {m['saved']}, {METRICS_FILE}")
    return "\n".join(lines)


def _format_comparison(c: dict[str, Any]) -> list[str]:
    steps, seconds = c["steps"]["sat"], c["train_seconds"]
    equal_steps, equal_time = c["eval_loss_at_equal_steps"], c["eval_loss_at_equal_wall_time"]
    reached = c["sat_seconds_to_dense_final_loss"]
    saved = c["wall_time_saved_s"]
    dense_rung = c["step_time_ratio_by_rate"].get(str(0.0))
    if c["steady_machine"] is None:
        steadiness = "     (no dense steps in the SAT arm to check that the machine ran both arms at the same speed)"
    elif c["steady_machine"]:
        steadiness = f"     machine speed steady across the arms: the same dense steps took {dense_rung:.2f}x in both"
    else:
        steadiness = (
            f"     WARNING: the same dense steps took {dense_rung:.2f}x as long in the SAT arm as in the dense arm: the "
            "machine's load changed between the arms, or the SAT arm's dense steps paid costs the dense arm's did not "
            "(on a CPU they run slower after sparse steps); the wall-time numbers above are not comparable"
        )
    saved_text = (
        f"{saved:.1f} s saved ({_percent(c['wall_time_saved_fraction'])})"
        if saved >= 0
        else f"SAT took {-saved:.1f} s LONGER"
    )
    interleaved = ", the arms trained in turns step by step" if c.get("interleaved_arms") else ""
    return [
        f"   A/B against dense training (same data order, seed and held-out set{interleaved}; dense arm in "
        f"{c['dense_output_dir']}):",
        f"     held-out loss at equal steps ({steps}): SAT {_num(equal_steps['sat'])} | dense {_num(equal_steps['dense'])}"
        f" ({_gap(equal_steps)})",
        f"     held-out loss at equal wall time ({equal_time['train_seconds']:.1f} s of training): SAT "
        f"{_num(equal_time['sat'])} | dense {_num(equal_time['dense'])} ({_gap(equal_time)})",
        f"     SAT reached dense's final loss {_num(c['dense_final_eval_loss'])}: "
        + (f"after {reached:.1f} s (dense: {seconds['dense']:.1f} s)" if reached is not None else "not reached"),
        f"     training wall time: SAT {seconds['sat']:.1f} s | dense {seconds['dense']:.1f} s: {saved_text}; "
        f"FLOPs estimate {_percent(c['flops_saved_fraction_estimate'])}, measured / estimate "
        f"{_num(c['measured_to_estimated_saving'], '.2f')}",
        f"     step time on the same batches, each arm's first step left out: {_percent(c['step_time_saved_fraction'])}"
        f" saved, measured / estimate {_num(c.get('step_time_measured_to_estimated_saving'), '.2f')}; SAT / dense per "
        "rate: "
        + ", ".join(f"r={float(rate):.3g}: {ratio:.2f}" for rate, ratio in c["step_time_ratio_by_rate"].items()),
        steadiness,
    ]


def _gap(losses: dict[str, float]) -> str:
    """SAT's held-out loss relative to dense's, e.g. '+1.2% vs dense'."""
    return f"{100 * (losses['sat'] / losses['dense'] - 1):+.1f}% vs dense" if losses["dense"] else "n/a"


def _num(value: Any, fmt: str = ".3f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100 * fraction:.0f}%"
