"""Which runs of ``benchmarks/quality.py``'s JSON the tables (``_quality_report``), the plots (``_quality_plots``) and
the "Beyond the paper" section (``_quality_tradeoff``) show, and the number formats they share.

A comparison's SAT arm is named by the fields where its recorded config differs from the paper's settings
(``_quality_configs.beyond_paper``; "{}" is the paper), so runs stored before a field existed group with the runs
that set it to the paper's value.
"""

from __future__ import annotations

import json
import statistics

from _quality_configs import PAPER_MODES, beyond_paper, normalized

TASK_LABELS = {"cpt": "CPT, full-parameter", "sft": "SFT, LoRA r16"}


# ---- selection of runs ---------------------------------------------------------------------------------------


def comparisons(results: dict) -> dict[tuple[str, int, str], list[dict]]:
    """(task, steps, SAT fields beyond the paper's as JSON, "{}" for the paper) -> the dense-vs-SAT comparison runs,
    by seed."""
    groups: dict[tuple[str, int, str], list[dict]] = {}
    for key, run in results.get("runs", {}).items():
        if not key.startswith(("grid:", "probe:")):
            overrides = json.dumps(beyond_paper(run["sat"]["sat_config"]), sort_keys=True)
            groups.setdefault((run["task"], len(run["dense"]["rates"]), overrides), []).append(run)
    order = sorted(groups, key=lambda k: (k[0], k[1], k[2] != "{}", k[2]))  # the paper's settings first
    return {k: sorted(groups[k], key=lambda r: r["seed"]) for k in order}


def override_fields(overrides: str) -> str:
    """SAT fields (JSON) as keyword arguments, e.g. ``omit=['mlp'], score_tokens=128``; "" for the paper's."""
    return ", ".join(f"{k}={v!r}" for k, v in json.loads(overrides).items())


def sat_label(overrides: str) -> str:
    """How a comparison's SAT arm was configured, e.g. ``the paper's settings with `omit=['mlp']` ``."""
    fields = override_fields(overrides)
    return "the paper's settings" + (f" with `{fields}`" if fields else "")


def config_name(results: dict, overrides: str) -> str:
    """The name a comparison's configuration was given (``--configs``), else "paper" or its fields."""
    name = results.get("config_names", {}).get(overrides)
    return name or ("paper" if overrides == "{}" else override_fields(overrides))


def cell_base(run: dict) -> dict:
    """The config a grid or probe cell starts from: ``SATConfig()``'s fields when ``run`` ran (recorded since the modes
    beyond the paper; before, the paper's) with the paper's modes (``PAPER_MODES``)."""
    return normalized({**run.get("default_sat_config", {}), **PAPER_MODES})


def grid_runs(results: dict) -> tuple[dict | None, list[dict]]:
    """The grid's dense reference and its SAT cells (each a run with ``arm``), first grid setting found."""
    runs = [run for key, run in results.get("runs", {}).items() if key.startswith("grid:")]
    if not runs:
        return None, []
    prefix = min(run["key"].rsplit("|", 1)[0] for run in runs)
    runs = [run for run in runs if run["key"].rsplit("|", 1)[0] == prefix]
    dense = next((run for run in runs if run["arm"]["sat_config"] is None), None)
    return dense, [run for run in runs if run["arm"]["sat_config"] is not None]


def find_cell(cells: list[dict], default: dict, **overrides) -> dict | None:
    """The cell whose SAT config equals ``default`` with ``overrides`` (seed ignored; records normalized)."""
    want = beyond_paper({**default, **overrides})
    return next((cell for cell in cells if beyond_paper(cell["arm"]["sat_config"]) == want), None)


# ---- numbers -------------------------------------------------------------------------------------------------


def mean_sd(values: list[float], digits: int = 4, suffix: str = "", sign: bool = False) -> str:
    """``mean ± sd`` over seeds (the mean alone for one seed, "-" for none); ``sign``: "+" before a positive mean."""
    if not values:
        return "-"
    text = f"{statistics.fmean(values):{'+' if sign else ''}.{digits}f}"
    if len(values) > 1:
        text += f" ± {statistics.stdev(values):.{digits}f}"
    return text + suffix


def seconds(values: list[float]) -> str:
    """``mean_sd`` of durations with digits that suit their size (tiny runs take milliseconds)."""
    mean = statistics.fmean(values) if values else 0.0
    return mean_sd(values, 0 if mean >= 100 else 1 if mean >= 1 else 3)


def full_rate_speedup(dense: dict, sat: dict, times: str = "step_cpu_times_s") -> float | None:
    """Median dense / median SAT step time over the steps SAT ran at its highest rate (first step excluded)."""
    top = max(sat["rates"])
    at_top = [i for i, rate in enumerate(sat["rates"]) if rate == top]
    steps = [i for i in at_top if i > 0] or at_top  # a linear decay has its top rate at step 0 only
    if top == 0 or not steps:
        return None
    return statistics.median(dense[times][i] for i in steps) / statistics.median(sat[times][i] for i in steps)


def fmt(value: float | None, spec: str = ".4f", suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def score_token_counts(cells: list[dict]) -> set[int]:
    """Every ``score_tokens`` value among the grid cells."""
    return {cell["arm"]["sat_config"]["score_tokens"] for cell in cells}


def sweep_points(results: dict) -> list[tuple[float, dict]]:
    dense, cells = grid_runs(results)
    default = cell_base(dense) if dense else {}
    points = []
    for cell in cells:
        config = normalized(cell["arm"]["sat_config"])
        if {**config, "omission_rate": 0, "seed": 0} == {**default, "omission_rate": 0, "seed": 0}:
            points.append((config["omission_rate"], cell))
    return sorted(points, key=lambda p: p[0]) if len(points) > 1 else []
