"""Time-to-loss numbers of a dense-vs-SAT comparison, and the "Beyond the paper" section of ``benchmarks/quality.py``
that lays every compared configuration out on the trade of loss for wall time. Pure: JSON in, numbers and markdown
out.

Per comparison (one seed; ``pair_metrics``), from the held-out evaluations ``(training wall time, loss)`` of each arm:

    loss gap at equal steps     100 (L_sat - L_dense) / L_dense, final losses
    wall time saved             100 (1 - T_sat / T_dense), training wall time only
    time to dense's final loss  first time an arm's loss reaches L_dense, linearly interpolated between evaluations
    loss at equal wall time     both arms at T = min(T_sat, T_dense): the faster arm's final loss against the other's
                                loss interpolated at T; gap 100 (L_sat(T) - L_dense(T)) / L_dense(T)

Example:
    >>> evals = [{"step": 0, "train_time_s": 0.0, "loss": 3.0}, {"step": 10, "train_time_s": 20.0, "loss": 2.0}]
    >>> time_to_target(evals, 2.5)
    {'reached': True, 'step': 5.0, 'train_time_s': 10.0}
"""

from __future__ import annotations

from _quality_runs import TASK_LABELS, comparisons, config_name, mean_sd, override_fields

BEGIN = "<!-- quality beyond begin -->"  # --update-doc replaces the text between these lines
END = "<!-- quality beyond end -->"
TITLE = "Beyond the paper"


def time_to_target(evals: list[dict], target: float) -> dict:
    """When ``loss <= target`` is first reached: step and training wall time, linearly interpolated between the
    evaluation before and the first one at or below ``target``; ``reached`` False (step, time None) if never."""
    previous = None
    for point in evals:
        if point["loss"] <= target:
            if previous is None or previous["loss"] == point["loss"]:
                return {"reached": True, "step": float(point["step"]), "train_time_s": point["train_time_s"]}
            share = (previous["loss"] - target) / (previous["loss"] - point["loss"])
            step = previous["step"] + share * (point["step"] - previous["step"])
            seconds = previous["train_time_s"] + share * (point["train_time_s"] - previous["train_time_s"])
            return {"reached": True, "step": step, "train_time_s": seconds}
        previous = point
    return {"reached": False, "step": None, "train_time_s": None}


def loss_at_time(evals: list[dict], seconds: float) -> float:
    """Held-out loss at training wall time ``seconds``, linearly interpolated between evaluations (clamped)."""
    points = [(p["train_time_s"], p["loss"]) for p in evals]
    if seconds <= points[0][0]:
        return points[0][1]
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if t0 <= seconds <= t1:
            return l0 + (l1 - l0) * (seconds - t0) / (t1 - t0) if t1 > t0 else l1
    return points[-1][1]


def pair_metrics(dense: dict, sat: dict) -> dict:
    """The numbers of one comparison (module docstring) from the two arms' summaries (``Arm.summary()``)."""
    target, t_dense, t_sat = dense["final_loss"], dense["train_time_s"], sat["train_time_s"]
    at = min(t_dense, t_sat)
    dense_at, sat_at = loss_at_time(dense["evals"], at), loss_at_time(sat["evals"], at)
    return {
        "loss_gap_pct": 100.0 * (sat["final_loss"] - target) / target,
        "wall_saving_pct": 100.0 * (1.0 - t_sat / t_dense),
        "cpu_saving_pct": 100.0 * (1.0 - sat["train_cpu_s"] / dense["train_cpu_s"]),
        "time_to_target": time_to_target(sat["evals"], target),  # SAT's time to dense's final loss
        "dense_time_to_target": time_to_target(dense["evals"], target),
        "dense_loss_at_sat_time": loss_at_time(dense["evals"], t_sat),  # clamped when SAT is slower
        "sat_loss_at_dense_time": loss_at_time(sat["evals"], t_dense) if t_sat > t_dense else None,
        "equal_time": {
            "train_time_s": at,
            "end_of": "sat" if t_sat <= t_dense else "dense",  # whose final evaluation sets the time
            "dense_loss": dense_at,
            "sat_loss": sat_at,
            "gap_pct": 100.0 * (sat_at - dense_at) / dense_at,
        },
    }


# ---- the section ---------------------------------------------------------------------------------------------


def config_points(runs: list[dict]) -> dict:
    """One configuration's comparisons (one per seed) summed up: per number, the list over seeds."""
    metrics = [pair_metrics(run["dense"], run["sat"]) for run in runs]
    reached = [m["time_to_target"] for m in metrics if m["time_to_target"]["reached"]]
    return {
        "seeds": [run["seed"] for run in runs],
        "loss_gap_pct": [m["loss_gap_pct"] for m in metrics],
        "wall_saving_pct": [m["wall_saving_pct"] for m in metrics],
        "equal_time_gap_pct": [m["equal_time"]["gap_pct"] for m in metrics],
        "flops_saving_pct": [100 * run["sat"]["flops_saved_fraction_estimate"] for run in runs],
        "time_to_target_pct": [
            100 * r["train_time_s"] / run["dense"]["train_time_s"]
            for run, m in zip(runs, metrics)
            if (r := m["time_to_target"])["reached"]
        ],
        "reached": len(reached),
    }


def section(settings: list[tuple[str, list[tuple[str, str, list[dict]]]]], commands: list[str], plot: str) -> str:
    """The "Beyond the paper" markdown: per setting, one row per configuration; then the plot and the commands.

    ``settings``: (heading, [(configuration name, its fields beyond the paper's as text, its runs)]); ``commands``:
    those that stored the runs, then the one that renders the section; ``plot``: the trade-off PNG's path relative
    to the markdown file.
    """
    lines = [
        "<!-- generated by benchmarks/quality.py from quality.json; do not edit by hand -->",
        "",
        "Every configuration trains in lockstep with its own dense arm on the same batches (equal steps, equal data "
        "order); the held-out loss is evaluated dense. Time to dense's final loss and the loss at equal wall time "
        "are interpolated linearly between evaluations; at equal wall time both arms are compared at the end of the "
        "faster one. Mean ± sd over seeds; gaps are relative to dense's loss (negative: SAT lower).",
        "",
    ]
    for heading, configs in settings:
        lines += [
            f"### {heading}",
            "",
            "| configuration | fields beyond the paper's | seeds | vs dense at equal steps | wall time saved "
            "| FLOPs saved (estimate) | SAT reaches dense's final loss (% of dense's time) "
            "| vs dense at equal wall time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, fields, runs in configs:
            p = config_points(runs)
            n = len(p["seeds"])
            reached = "not reached" if not p["reached"] else mean_sd(p["time_to_target_pct"], 0, "%")
            if 0 < p["reached"] < n:
                reached += f" ({p['reached']} of {n} seeds; not reached in the others)"
            lines.append(
                f"| {name} | {fields or '- (the paper)'} | {n} | {mean_sd(p['loss_gap_pct'], 2, '%', sign=True)} | "
                f"{mean_sd(p['wall_saving_pct'], 1, '%')} | {mean_sd(p['flops_saving_pct'], 1, '%')} | {reached} | "
                f"{mean_sd(p['equal_time_gap_pct'], 2, '%', sign=True)} |"
            )
        lines.append("")
    lines += [
        "Loss gap against wall time saved, one point per configuration (mean; bars: sd over seeds where 2+ seeds; "
        "star: the paper's settings):",
        "",
        f"![Trade-off: loss gap against wall time saved]({plot})",
        "",
        "Commands that produced the stored runs, then the one that renders this section:",
        "",
        *[f"    {command}" for command in commands],
        "",
    ]
    return "\n".join(lines)


def by_setting(results: dict) -> dict[tuple[str, int], list[tuple[str, str, list[dict]]]]:
    """(task, steps) -> one entry per compared configuration: (its name, its fields beyond the paper's as JSON, its
    comparison runs by seed)."""
    settings: dict[tuple[str, int], list[tuple[str, str, list[dict]]]] = {}
    for (task, steps, overrides), runs in comparisons(results).items():
        settings.setdefault((task, steps), []).append((config_name(results, overrides), overrides, runs))
    return settings


def markdown(results: dict, plot: str, render_command: str) -> str:
    """The "Beyond the paper" section (``section``) of every stored comparison; "" without any.

    ``plot``: the trade-off PNG's path relative to where the markdown goes; ``render_command``: the command that
    writes it, listed after those that stored the runs.
    """
    settings = [
        (f"{TASK_LABELS.get(task, task)}, {steps} steps", [(n, override_fields(o), r) for n, o, r in configs])
        for (task, steps), configs in by_setting(results).items()
    ]
    return section(settings, [*results.get("commands", []), render_command], plot) if settings else ""
