"""What a recipe run reports: per-step wall times, the dense time SAT saved, ``metrics.json``, a PNG plot, a summary.

Dense time saved is MEASURED in the same run: the default ladder schedule ends on a dense rung (rate 0), whose
steps are real dense training steps of the same model, batch size and sequence length. With ``t_dense`` the median
dense step time and ``t_r`` the median step time at each omission rate ``r > 0``::

    saved = sum over sparse rates r of  n_r * (t_dense - t_r)

The first step of a run is left out of the medians (one-time allocation and warm-up costs). A run with fewer
than two timed dense steps (e.g. ``sat_schedule=constant``) reports no measured saving, only the callback's FLOPs
estimate; the dense baseline (``--use_sat false``) reports its own step time for comparison.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from peft_sat import get_sat_state

METRICS_FILE = "metrics.json"
PLOT_FILE = "training_curves.png"


class StepTimer(TrainerCallback):
    """Wall time and omission rate of every optimizer step (``records``: dicts with step, seconds, omission_rate)."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self._start: float | None = None

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        _synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, model=None, **kwargs) -> None:
        _synchronize()  # CUDA kernels run asynchronously: wait for them before reading the clock
        sat_state = get_sat_state(model) if model is not None else None
        rate = sat_state.omission_rate if sat_state is not None and sat_state.enabled else 0.0
        seconds = time.perf_counter() - self._start if self._start is not None else float("nan")
        self.records.append({"step": state.global_step, "seconds": seconds, "omission_rate": rate})


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def dense_time_saved(records: list[dict[str, float]]) -> dict[str, Any]:
    """The measured dense time saved by the sparse steps of ``records`` (see the module docstring)."""
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
        f"measured: median of {len(dense)} dense steps of this run vs each sparse rate's median"
    )
    return result


def write_metrics(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics`` as ``output_dir/metrics.json`` and return its path."""
    path = Path(output_dir) / METRICS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2, default=str))
    return path


def plot_curves(
    output_dir: str | Path,
    log_history: list[dict[str, Any]],
    steps: list[dict[str, float]],
    eval_losses: tuple[float | None, float | None],
    title: str,
) -> Path:
    """Training loss (and the dense held-out loss before / after) and omission rate against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_rate) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5), height_ratios=(2, 1))
    logged = [(entry["step"], entry["loss"]) for entry in log_history if "loss" in entry and "step" in entry]
    if logged:
        ax_loss.plot(*zip(*logged), marker=".", label="train loss")
    last_step = steps[-1]["step"] if steps else (logged[-1][0] if logged else 1)
    before, after = eval_losses
    if before is not None and after is not None:
        ax_loss.plot([0, last_step], [before, after], "s--", label="held-out loss (dense eval)")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title(title, fontsize=10)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if steps:
        # Step s ran with the rate recorded at its end; draw it over [s - 1, s].
        xs = [0] + [record["step"] for record in steps]
        ys = [steps[0]["omission_rate"]] + [record["omission_rate"] for record in steps]
        ax_rate.step(xs, ys, where="pre", color="tab:red")
    ax_rate.set_ylabel("omission rate")
    ax_rate.set_xlabel("optimizer step")
    ax_rate.set_ylim(-0.05, 1.0)
    ax_rate.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(output_dir) / PLOT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_summary(m: dict[str, Any]) -> str:
    """A short human-readable summary of a run's ``metrics``."""

    def num(value: Any, fmt: str = ".3f") -> str:
        return "n/a" if value is None else format(value, fmt)

    lines = [
        f"== {m['recipe']}: {m['variant_label']} | model {m['model']} | data {m['dataset']}",
        f"   {m['global_step']} steps, {m['train_examples']} training / {m['eval_examples']} held-out {m['unit']}",
        f"   held-out loss (evaluated dense): {num(m['eval_loss_before'])} -> {num(m['eval_loss_after'])}",
        f"   throughput: {num(m['tokens_per_s'], '.0f')} tokens/s ({m['train_tokens']} tokens in "
        f"{num(m['train_runtime_s'], '.1f')} s of training); wall time {num(m['wall_time_s'], '.1f')} s",
    ]
    if m["sat"]:
        lines.append(f"   SAT schedule: {m['schedule']}")
        lines.append(
            f"   step time: dense {num(m['step_time_dense_s'], '.2f')} s, sparse "
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
        flops = m.get("flops_saved_fraction_estimate")
        lines.append(f"   training FLOPs saved (estimate, linear layers only): {num(flops and 100 * flops, '.0f')}%")
    else:
        lines.append(f"   dense baseline (SAT off): step time {num(m['step_time_dense_s'], '.2f')} s")
    lines.append(f"   saved to {m['output_dir']}: {m['saved']}, {METRICS_FILE}, {PLOT_FILE}")
    return "\n".join(lines)
