"""The cheaper settings of ``benchmarks/quality.py``: the sub-network probe and the ablation grid.

- probe: no training; held-out loss of the SPARSE forward (training mode, no gradient) of the pre-trained model for
  each cell of ``probe_cells``: how far each sub-network is from the dense model it is meant to train.
- grid: one arm per cell of ``grid_cells`` (and one dense reference) on the grid setting, one seed; held-out loss
  before training and at the end. Cells that resolve to the same config run once (``_quality_configs.cell_key``).

"""

from __future__ import annotations

import copy
from typing import Protocol

import _quality_train as qtrain
from _quality_configs import PAPER_MODES, config_record
from _quality_data import TaskData
from torch import nn

import peft_sat
from peft_sat.config_validation import IMPORTANCE_METRICS, SELECTION_METHODS


class Assets(Protocol):
    """What the runs need of ``quality.Assets``: the base model and a task's settings and data."""

    model: nn.Module

    def setup(self, task: str, grid: bool) -> tuple[dict, TaskData]: ...


# Extra ladder shapes of the grid, on the default importance / selection at the default rate.
SHAPES = {
    "linear": {"schedule": "linear"},
    "ladder f=0.25": {"schedule": "ladder", "ladder_full_rate_ratio": 0.25},
    "ladder f=0.75": {"schedule": "ladder", "ladder_full_rate_ratio": 0.75},
}
# Which units are omitted, on the default config.
OMITS = {"omit: mlp only": {"omit": ["mlp"]}, "omit: attention only": {"omit": ["attention"]}}
# Tokens the activation-based scores read (``SATConfig.score_tokens``), on the default config; 512 covers every
# token of a grid batch (4 x 64) and of a comparison batch (4 x 128), i.e. exact per-batch scores.
SCORE_TOKENS = (128, 512)


def grid_cells(rates: list[float]) -> dict[str, dict]:
    """Name -> SATConfig overrides of every grid run (the importance x selection x schedule grid, shapes, sweep)."""
    cells = {}
    for importance in IMPORTANCE_METRICS:
        for selection in SELECTION_METHODS:
            for schedule in ("constant", "ladder"):
                cells[f"{importance}/{selection}/{schedule}"] = dict(
                    importance=importance, selection=selection, schedule=schedule
                )
    for name, overrides in SHAPES.items():
        cells[f"shape: {name}"] = overrides
    cells.update(OMITS)
    for rate in rates:
        cells[f"rate {rate:g}"] = {"omission_rate": rate}
    for tokens in SCORE_TOKENS:
        cells[f"score tokens {tokens}"] = {"score_tokens": tokens}
        cells[f"score tokens {tokens}, mlp only"] = {"score_tokens": tokens, "omit": ["mlp"]}
    return {name: {**PAPER_MODES, **overrides} for name, overrides in cells.items()}


def probe_cells(rates: list[float]) -> dict[str, dict]:
    """Name -> SATConfig overrides of the sub-network probe (constant rate: the probe has no steps)."""
    cells = {}
    for importance in IMPORTANCE_METRICS:
        for selection in SELECTION_METHODS:
            for omit in (["mlp", "attention"], ["mlp"], ["attention"]):
                overrides = dict(importance=importance, selection=selection, omit=omit, schedule="constant")
                cells[f"{importance}/{selection}/{'+'.join(omit)}"] = overrides
    for rate in rates:
        cells[f"rate {rate:g}"] = {"omission_rate": rate, "schedule": "constant"}
    for tokens in SCORE_TOKENS:
        for omit in (["mlp", "attention"], ["mlp"]):
            cells[f"score tokens {tokens}/{'+'.join(omit)}"] = {
                "score_tokens": tokens,
                "omit": omit,
                "schedule": "constant",
            }
    return {name: {**PAPER_MODES, **overrides} for name, overrides in cells.items()}


def run_probe(assets: Assets, task: str, rates: list[float], seed: int, log) -> dict:
    """Held-out loss of the dense model and of each probe cell's sparse forward, before any training."""
    setup, data = assets.setup(task, grid=True)
    held_out = data.held_out_batches(8)
    model = copy.deepcopy(assets.model)
    dense = qtrain.held_out_loss(model, held_out)
    log(f"  dense held-out loss {dense:.4f}")
    cells = []
    for name, overrides in probe_cells(rates).items():
        config = peft_sat.SATConfig(**{"seed": seed, **overrides})
        peft_sat.apply_sat(model, config)  # replaces the previous cell's SAT; no weights change
        loss = qtrain.sparse_loss(model, held_out)
        cells.append({"name": name, "sat_config": config_record(config), "sparse_loss": loss})
        log(f"  {name}: sparse held-out loss {loss:.4f}")
    peft_sat.remove_sat(model)
    return {"task": task, "seed": seed, "setup": setup, "data": data.description, "dense_loss": dense, "cells": cells}


def run_grid_cell(assets: Assets, task: str, overrides: dict | None, seed: int, steps: int, log) -> dict:
    """One arm (dense when ``overrides`` is None) on the grid setting; held-out loss before and at the end."""
    setup, data = assets.setup(task, grid=True)
    batches = data.train_batches(setup["batch"], steps, seed)
    held_out = data.held_out_batches(8)
    config = None if overrides is None else peft_sat.SATConfig(**{"seed": seed, **overrides})
    label = "dense" if config is None else "SAT"
    arm = qtrain.make_arm(label, assets.model, setup["variant"], config, setup["lr"], seed, steps)
    qtrain.run_lockstep([arm], batches, held_out, {steps}, log=log)
    return {"task": task, "seed": seed, "setup": setup, "data": data.description, "arm": arm.summary()}
