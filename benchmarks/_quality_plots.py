"""Plots (PNG, matplotlib Agg) of ``benchmarks/quality.py``, drawn from its JSON only (run selection in
``_quality_runs``): loss curves dense vs SAT, the ablation grid, loss and speed-up against the omission rate, and
the trade-off of loss for wall time of every compared configuration."""

from __future__ import annotations

import statistics
from pathlib import Path

from _quality_runs import (
    TASK_LABELS,
    cell_base,
    comparisons,
    config_name,
    find_cell,
    full_rate_speedup,
    grid_runs,
    sweep_points,
)
from _quality_tradeoff import by_setting, config_points


def plot_curves(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    groups = comparisons(results)
    # One pair of rows (by step, by wall time) per task and step count; one column per SAT configuration.
    settings = list(dict.fromkeys((task, steps) for task, steps, _ in groups))
    columns = max([sum(k[:2] == setting for k in groups) for setting in settings] + [1])
    rows = 2 * max(1, len(settings))
    fig, axes = plt.subplots(rows, columns, figsize=(6 * columns, 4 * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)  # shown when a comparison lands there
    filled = dict.fromkeys(settings, 0)
    for (task, steps, overrides), runs in groups.items():
        row, col = 2 * settings.index((task, steps)), filled[(task, steps)]
        filled[(task, steps)] += 1
        top, bottom = axes[row, col], axes[row + 1, col]
        top.set_visible(True)
        bottom.set_visible(True)
        for arm, color in (("dense", "tab:blue"), ("sat", "tab:orange")):
            for i, run in enumerate(runs):
                evals = run[arm]["evals"]
                sat = f"SAT {config_name(results, overrides)}"
                label = ("dense" if arm == "dense" else sat) if i == 0 else None
                top.plot(
                    [e["step"] for e in evals], [e["loss"] for e in evals], "o-", color=color, alpha=0.8, label=label
                )
                bottom.plot(
                    [e["train_time_s"] for e in evals],
                    [e["loss"] for e in evals],
                    "o-",
                    color=color,
                    alpha=0.8,
                    label=label,
                )
        rate_axis = top.twinx()
        rate_axis.step(range(steps), runs[0]["sat"]["rates"], where="post", color="gray", alpha=0.5)
        rate_axis.set_ylabel("SAT omission rate (gray)")
        rate_axis.set_ylim(0, 1)
        variant = "" if overrides == "{}" else f"\nSAT {config_name(results, overrides)}: {overrides}"
        top.set_title(
            f"{TASK_LABELS.get(task, task)}, {steps} steps: held-out loss (dense eval), {len(runs)} seed(s){variant}"
        )
        top.set_xlabel("optimizer step")
        bottom.set_xlabel("training wall time (s)")
        for ax in (top, bottom):
            ax.set_ylabel("held-out loss")
            ax.grid(alpha=0.3)
            ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ablation(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    dense, cells = grid_runs(results)
    if dense is None or not cells:
        return  # no grid in these results (e.g. --parts cpt,sft): no empty figure
    fig, ax = plt.subplots(figsize=(8, 6))
    default = cell_base(dense)
    names, losses, colors = [], [], []
    for importance in ("uniform", "magnitude", "wanda", "maxip"):
        for selection in ("topk", "sampling"):
            for schedule, color in (("constant", "tab:red"), ("ladder", "tab:green")):
                cell = find_cell(cells, default, importance=importance, selection=selection, schedule=schedule)
                if cell is not None:
                    names.append(f"{importance} / {selection} / {schedule}")
                    losses.append(cell["arm"]["final_loss"])
                    colors.append(color)
    ax.barh(range(len(names)), losses, color=colors)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()
    ax.axvline(dense["arm"]["final_loss"], color="tab:blue", linestyle="--", label="dense")
    ax.axvline(dense["arm"]["evals"][0]["loss"], color="gray", linestyle=":", label="before training")
    low = min(losses + [dense["arm"]["final_loss"]])
    high = max(losses + [dense["arm"]["evals"][0]["loss"]])
    ax.set_xlim(low - 0.1 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))
    ax.set_xlabel("final held-out loss (lower is better); red: constant rate, green: ladder")
    ax.set_title(f"Ablation grid ({dense['task']}, seed {dense['seed']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(results: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    dense, _ = grid_runs(results)
    points = sweep_points(results)
    if dense is None or not points:
        return  # no omission-rate sweep in these results: no empty figure
    fig, ax = plt.subplots(figsize=(6, 4.5))
    rates = [0.0] + [rate for rate, _ in points]
    losses = [dense["arm"]["final_loss"]] + [cell["arm"]["final_loss"] for _, cell in points]
    (loss_line,) = ax.plot(rates, losses, "o-", color="tab:orange", label="final held-out loss")
    ax.set_xlabel("omission rate r (0 = dense; default ladder)")
    ax.set_ylabel("final held-out loss")
    speed_axis = ax.twinx()
    ups = [1.0] + [full_rate_speedup(dense["arm"], cell["arm"]) or 1.0 for _, cell in points]
    (speed_line,) = speed_axis.plot(rates, ups, "s--", color="tab:purple", label="speed-up at the full rate (CPU)")
    speed_axis.set_ylabel("measured speed-up at the full rate (CPU time)")
    ax.set_title(f"Omission-rate sweep ({dense['task']}, seed {dense['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(handles=[loss_line, speed_line], loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_tradeoff(results: dict, path: Path) -> None:
    """Loss gap against wall time saved, one point per configuration: per setting (task, steps) a row, at equal steps
    (left) and at equal wall time (right); mean over seeds, sd bars where 2+ seeds, a star for the paper's settings."""
    import matplotlib.pyplot as plt

    settings = {
        setting: [(name, overrides == "{}", config_points(runs)) for name, overrides, runs in configs]
        for setting, configs in by_setting(results).items()
    }
    if not settings:
        return  # no dense-vs-SAT comparison in these results: no empty figure
    fig, axes = plt.subplots(len(settings), 2, figsize=(13, 5 * len(settings)), squeeze=False)
    names = list(dict.fromkeys(name for points in settings.values() for name, _, _ in points))  # one color each
    gaps = (("loss_gap_pct", "equal steps"), ("equal_time_gap_pct", "equal wall time"))
    for row, ((task, steps), points) in enumerate(settings.items()):
        for ax, (key, when) in zip(axes[row], gaps):
            for name, paper, p in points:
                xs, ys = p["wall_saving_pct"], p[key]
                spread = len(xs) > 1
                ax.errorbar(
                    statistics.fmean(xs),
                    statistics.fmean(ys),
                    xerr=statistics.stdev(xs) if spread else None,
                    yerr=statistics.stdev(ys) if spread else None,
                    fmt="*" if paper else "o",
                    markersize=14 if paper else 7,
                    color=f"C{names.index(name) % 10}",
                    capsize=3,
                    label=f"{name} (the paper's settings)" if paper and name != "paper" else name,
                )
                ax.annotate(name, (statistics.fmean(xs), statistics.fmean(ys)), textcoords="offset points",
                            xytext=(6, 6), fontsize=8)  # fmt: skip
            ax.axhline(0, color="black", linestyle="--", linewidth=1, label="dense")
            ax.axvline(0, color="gray", linestyle=":", linewidth=1)
            ax.set_xlabel("wall time saved vs dense (%)")
            ax.set_ylabel(f"held-out loss gap vs dense at {when} (%)")
            ax.set_title(f"{TASK_LABELS.get(task, task)}, {steps} steps: at {when}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
