"""Tables (``quality.md``) of ``benchmarks/quality.py``, rendered from its JSON only (the selection of runs and the
number formats shared with the plots and the "Beyond the paper" section: ``_quality_runs``).

Every number printed here is computed from ``quality.json``; nothing is typed by hand. Partial results (a single
part, tiny mode) render what they hold. The tables state what was measured; what it is judged against is written
in docs/results.md.
"""

from __future__ import annotations

import math
from pathlib import Path

import _quality_tradeoff as qtradeoff
from _quality_configs import PAPER
from _quality_runs import (
    TASK_LABELS,
    cell_base,
    comparisons,
    config_name,
    find_cell,
    fmt,
    full_rate_speedup,
    grid_runs,
    mean_sd,
    override_fields,
    sat_label,
    score_token_counts,
    seconds,
    sweep_points,
)

BEGIN = "<!-- quality.md begin -->"  # --update-doc replaces the text between these lines
END = "<!-- quality.md end -->"


# ---- markdown ------------------------------------------------------------------------------------------------


def comparison_tables(results: dict) -> list[str]:
    lines = []
    for (task, steps, overrides), runs in comparisons(results).items():
        setup, n = runs[0]["setup"], len(runs)
        fields, name = override_fields(overrides), config_name(results, overrides)
        title = (f'"{name}" ' if name != fields else "") + (f"({fields})" if fields else "")
        lines += [
            f"### {TASK_LABELS.get(task, task)}: dense vs SAT {title.strip()}, {steps} steps, {n} seed(s)",
            "",
            f"Data: {runs[0]['data']}. Batch {setup['batch']}, AdamW lr {setup['lr']:g} (constant, no weight decay, "
            f"gradient clipping 1.0). SAT: {sat_label(overrides)}. Seeds: {[r['seed'] for r in runs]}.",
            "",
            "| arm | held-out loss before | final held-out loss | final perplexity | vs dense | training wall s "
            "| wall saving | training CPU s | CPU saving | FLOPs saving (estimate) |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        metrics = [qtradeoff.pair_metrics(r["dense"], r["sat"]) for r in runs]
        for arm in ("dense", "sat"):
            data = [r[arm] for r in runs]
            finals = [d["final_loss"] for d in data]
            row = [
                "dense" if arm == "dense" else "SAT",
                mean_sd([d["evals"][0]["loss"] for d in data]),
                mean_sd(finals),
                mean_sd([math.exp(x) for x in finals], 2),
                "-" if arm == "dense" else mean_sd([m["loss_gap_pct"] for m in metrics], 2, "%"),
                seconds([d["train_time_s"] for d in data]),
                "-" if arm == "dense" else mean_sd([m["wall_saving_pct"] for m in metrics], 1, "%"),
                seconds([d["train_cpu_s"] for d in data]),
                "-" if arm == "dense" else mean_sd([m["cpu_saving_pct"] for m in metrics], 1, "%"),
                "-" if arm == "dense" else mean_sd([100 * d["flops_saved_fraction_estimate"] for d in data], 1, "%"),
            ]
            lines.append("| " + " | ".join(row) + " |")
        lines += [
            "",
            "| seed | dense final | SAT final | vs dense | SAT reaches dense's final loss (interpolated) | loss at "
            "equal wall time: dense, SAT | wall saving | speed-up at the full rate (CPU, wall) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r, m in zip(runs, metrics):
            ttt, at = m["time_to_target"], m["equal_time"]
            reached = (
                f"step {ttt['step']:.1f}, {ttt['train_time_s']:.3g} s "
                f"({100 * ttt['train_time_s'] / r['dense']['train_time_s']:.0f}% of dense's time)"
                if ttt["reached"]
                else "not reached"
            )
            cpu = full_rate_speedup(r["dense"], r["sat"])
            wall = full_rate_speedup(r["dense"], r["sat"], "step_times_s")
            lines.append(
                f"| {r['seed']} | {r['dense']['final_loss']:.4f} | {r['sat']['final_loss']:.4f} | "
                f"{m['loss_gap_pct']:+.2f}% | {reached} | {at['dense_loss']:.4f}, {at['sat_loss']:.4f} "
                f"({at['gap_pct']:+.2f}%; at {at['train_time_s']:.3g} s, {at['end_of']}'s end) | "
                f"{m['wall_saving_pct']:.1f}% | {fmt(cpu, '.2f', 'x')}, {fmt(wall, '.2f', 'x')} |"
            )
        lines.append("")
    return lines


def grid_tables(results: dict) -> list[str]:
    dense, cells = grid_runs(results)
    if dense is None or not cells:
        return []
    default = cell_base(dense)
    base = dense["arm"]["final_loss"]
    setup = dense["setup"]
    steps = len(dense["arm"]["rates"])
    lines = [
        f"### Ablation grid: {TASK_LABELS.get(dense['task'], dense['task'])}, {steps} steps, seed {dense['seed']} only",
        "",
        f"Data: {dense['data']}. Batch {setup['batch']}, lr {setup['lr']:g}. One seed per cell (compute budget): "
        "compare the spread of the seeds above before reading small differences. Held-out loss before training: "
        f"{dense['arm']['evals'][0]['loss']:.4f}; dense after {steps} steps: {base:.4f}. Other fields: defaults "
        f"(omission rate {default['omission_rate']:g}). Speed-up: median dense / SAT CPU time per step over SAT's "
        "full-rate steps (grid cells run one after another, not in lockstep).",
        "",
        "| importance | selection | schedule | final held-out loss | vs dense | speed-up at the full rate (CPU) |",
        "|---|---|---|---|---|---|",
        f"| dense | - | - | {base:.4f} | - | - |",
    ]
    for importance in ("uniform", "magnitude", "wanda", "maxip"):
        for selection in ("topk", "sampling"):
            for schedule in ("constant", "ladder"):
                cell = find_cell(cells, default, importance=importance, selection=selection, schedule=schedule)
                if cell is not None:
                    lines.append(_cell_row(f"{importance} | {selection} | {schedule}", cell, dense, base))
    shapes = [
        ("ladder (default shape)", {"schedule": "ladder"}),
        ("constant", {"schedule": "constant"}),
        ("linear", {"schedule": "linear"}),
        ("ladder f=0.25", {"schedule": "ladder", "ladder_full_rate_ratio": 0.25}),
        ("ladder f=0.75", {"schedule": "ladder", "ladder_full_rate_ratio": 0.75}),
    ]
    shape_rows = [(name, find_cell(cells, default, **o)) for name, o in shapes]
    if sum(cell is not None for _, cell in shape_rows) > 2:
        intro = (
            f"Schedule shapes (importance {default['importance']}, selection {default['selection']}, rate "
            f"{default['omission_rate']:g}; the default ladder keeps the full rate for the first "
            f"{default['ladder_full_rate_ratio']:g} of the steps, then {default['ladder_rungs']} rungs down to dense):"
        )
        lines += _trade_table(intro, ["schedule"], shape_rows, dense)
    omits = [
        ("MLP channels + heads (default)", {"omit": ["mlp", "attention"]}),
        ("MLP channels only", {"omit": ["mlp"]}),
        ("attention heads only", {"omit": ["attention"]}),
    ]
    omit_rows = [(name, find_cell(cells, default, **o)) for name, o in omits]
    if sum(cell is not None for _, cell in omit_rows) > 1:
        intro = (
            f"Omitted units ({default['importance']}, {default['selection']}, default ladder, rate "
            f"{default['omission_rate']:g}; heads per `head_granularity`={default['head_granularity']!r}):"
        )
        lines += _trade_table(intro, ["omitted"], omit_rows, dense)
    score_rows = [
        (
            f"{tokens}{' (default)' if tokens == default['score_tokens'] else ''} | {label}",
            find_cell(cells, default, **o),
        )
        for label, omit in (("MLP channels + heads", ["mlp", "attention"]), ("MLP channels only", ["mlp"]))
        for tokens in sorted({default["score_tokens"], *score_token_counts(cells)})
        for o in [{"score_tokens": tokens, "omit": omit}]
    ]
    if sum(cell is not None for _, cell in score_rows) > 2:
        intro = (
            f"Tokens scored per block and micro-batch (`score_tokens`; {default['importance']}, "
            f"{default['selection']}, default ladder, rate {default['omission_rate']:g}; a grid batch has "
            f"up to {setup['batch'] * setup.get('block', setup.get('max_length', 0))} tokens):"
        )
        lines += _trade_table(intro, ["score tokens", "omitted"], score_rows, dense)
    sweep = [(f"{rate:g}", cell) for rate, cell in sweep_points(results)]
    if sweep:
        intro = f"Omission-rate sweep ({default['importance']}, {default['selection']}, default ladder):"
        lines += _trade_table(intro, ["omission rate"], sweep, dense)
    return lines + [""]


def _trade_table(intro: str, names: list[str], rows: list[tuple[str, dict | None]], dense: dict) -> list[str]:
    """A table of grid cells, each a trade of loss for FLOPs: ``names`` head the columns that name a cell (a row's
    name holds them, joined by " | "); then its loss against the ``dense`` run, the FLOPs it saves and the loss gap
    per point saved. Cells that did not run (None) are left out."""
    base = dense["arm"]["final_loss"]
    columns = [*names, "final held-out loss", "vs dense", "speed-up at the full rate (CPU)"]
    columns += ["FLOPs saving (estimate)", "loss gap per FLOPs-saving point"]
    lines = ["", intro, "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + [_cell_row(name, cell, dense, base) + _flops_cells(cell, base) for name, cell in rows if cell]


def probe_tables(results: dict) -> list[str]:
    probes = [run for key, run in results.get("runs", {}).items() if key.startswith("probe:")]
    if not probes:
        return []
    probe = probes[0]
    dense = probe["dense_loss"]
    by_name = {cell["name"]: cell["sparse_loss"] for cell in probe["cells"]}
    rate = next(c["sat_config"]["omission_rate"] for c in probe["cells"] if "/" in c["name"])

    def entry(name: str) -> str:
        loss = by_name.get(name)
        return "-" if loss is None else f"{loss:.3f} ({100 * (loss - dense) / dense:+.1f}%)"

    lines = [
        f"### Sub-network fidelity before training ({TASK_LABELS.get(probe['task'], probe['task'])} data)",
        "",
        "Held-out loss of the pre-trained model's SPARSE forward (training mode, no gradient, no update), i.e. of "
        f"the sub-network a SAT step trains, against the dense model's {dense:.4f}; omission rate {rate:g}. The "
        "further a sub-network is from the dense model, the more of its gradient goes into compensating for the "
        "omitted units instead of learning the data.",
        "",
        "| importance | selection | MLP channels + heads | MLP channels only | heads only |",
        "|---|---|---|---|---|",
    ]
    for importance in ("uniform", "magnitude", "wanda", "maxip"):
        for selection in ("topk", "sampling"):
            names = [f"{importance}/{selection}/{omit}" for omit in ("mlp+attention", "mlp", "attention")]
            lines.append(f"| {importance} | {selection} | " + " | ".join(entry(n) for n in names) + " |")
    rates = [c for c in probe["cells"] if c["name"].startswith("rate ")]
    if rates:
        config = rates[0]["sat_config"]
        lines += [
            "",
            f"By omission rate ({config['importance']}, {config['selection']}, MLP channels + heads): "
            + ", ".join(f"r = {c['sat_config']['omission_rate']:g}: {entry(c['name'])}" for c in rates)
            + ".",
        ]
    tokens = [c for c in probe["cells"] if c["name"].startswith("score tokens ")]
    if tokens:
        default = cell_base(probe)
        base = f"{default.get('importance')}/{default.get('selection')}"
        parts = []
        for label, omit in (("MLP channels + heads", "mlp+attention"), ("MLP channels only", "mlp")):
            # the default's cell of the main probe table first, then the cells that change only score_tokens
            values = [f"{default.get('score_tokens')}: {entry(f'{base}/{omit}')}"]
            values += [
                f"{c['sat_config']['score_tokens']}: {entry(c['name'])}"
                for c in tokens
                if c["name"].endswith(f"/{omit}")
            ]
            parts.append(f"{label}: {', '.join(values)}")
        lines += [
            "",
            f"By tokens scored ({base}; `score_tokens`, default {default.get('score_tokens')}): {'; '.join(parts)}.",
        ]
    return lines + [""]


def _flops_cells(cell: dict, base: float) -> str:
    """FLOPs-saving estimate and the loss gap (%) paid per percentage point of it (lower is a better trade)."""
    flops = 100 * cell["arm"]["flops_saved_fraction_estimate"]
    gap = 100 * (cell["arm"]["final_loss"] - base) / base
    return f" {flops:.1f}% | {fmt(gap / flops if flops else None, '.2f')} |"


def _cell_row(name: str, cell: dict, dense: dict, base: float) -> str:
    loss = cell["arm"]["final_loss"]
    speed = full_rate_speedup(dense["arm"], cell["arm"])
    return f"| {name} | {loss:.4f} | {100 * (loss - base) / base:+.2f}% | {fmt(speed, '.2f', 'x')} |"


def markdown(results: dict) -> str:
    m = results.get("machine", {})
    lines = [
        f"<!-- generated by benchmarks/quality.py from {results.get('mode', '?')} runs; do not edit by hand -->",
        "",
        f"Model: {results.get('model', '?')}. Machine: {m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores, "
        f"torch {m.get('torch', '?')} ({m.get('torch_threads', '?')} thread(s)), Python {m.get('python', '?')}.",
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in results.get("commands", [])],
        "",
        f"Wall time of all stored runs, evaluations included: "
        f"{sum(run.get('elapsed_s', 0.0) for run in results.get('runs', {}).values()) / 60:.1f} minutes.",
        "",
    ]
    if a := results.get("anatomy"):
        lines += [
            f"Where a training step's matmul FLOPs go in this model (share of the {a['linear_macs_per_token']:,} "
            f"multiply-adds per token of its linear layers): attention projections {100 * a['attention_share']:.1f}%, "
            f"MLP {100 * a['mlp_share']:.1f}%, LM head {100 * a['lm_head_share']:.1f}% (dense under SAT), other "
            f"{100 * a['other_share']:.1f}%. The attention core (QK^T, AV) and the embeddings, norms and optimizer "
            "are not in this count.",
            "",
        ]
    paper = ", ".join(f"{k}={v!r}" for k, v in PAPER.items())
    lines += [f"SAT configurations are given by their fields that differ from the paper's settings: {paper}.", ""]
    lines += comparison_tables(results) + probe_tables(results) + grid_tables(results)
    return "\n".join(lines)


def update_doc(doc: Path, text: str, beyond: str = "") -> None:
    """Replace the lines between ``BEGIN`` and ``END`` in ``doc`` with ``text``, and those between the "Beyond the
    paper" markers with ``beyond`` (appended under its own heading the first time; nothing when ``beyond`` is "").

    Raises:
        ValueError: ``doc`` lacks the ``BEGIN`` / ``END`` lines.
    """
    content = doc.read_text()
    if BEGIN not in content or END not in content:
        raise ValueError(f"{doc} needs the lines {BEGIN!r} and {END!r} around the generated quality tables.")
    content = _between(content, BEGIN, END, text)
    if beyond:
        if qtradeoff.BEGIN not in content or qtradeoff.END not in content:
            content = f"{content.rstrip()}\n\n## {qtradeoff.TITLE}\n\n{qtradeoff.BEGIN}\n{qtradeoff.END}\n"
        content = _between(content, qtradeoff.BEGIN, qtradeoff.END, beyond)
    doc.write_text(content)


def _between(content: str, begin: str, end: str, text: str) -> str:
    head, rest = content.split(begin, 1)
    return f"{head}{begin}\n{text.rstrip()}\n{end}{rest.split(end, 1)[1]}"
