"""``benchmarks/quality.py`` never rots: its ``--tiny`` mode runs end to end in a subprocess (a tiny random Llama, no
downloads, no real assets) and writes the JSON, the markdown tables and the three PNG plots; its pure helpers
(time-to-target, loss at a wall time, batching) are checked on hand-made numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quality.py"
sys.path.insert(0, str(SCRIPT.parent))  # the benchmark helpers are scripts next to quality.py, not a package

import _quality_data as qdata  # noqa: E402
import _quality_train as qtrain  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_tiny(out: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``quality.py --tiny --out OUT *args`` in a subprocess, offline, from the repository root."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"},
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quality")
    proc = run_tiny(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_tiny_run_writes_every_number_and_plot(tiny_run: Path):
    results = json.loads((tiny_run / "quality.json").read_text())
    assert results["mode"] == "tiny"
    assert results["machine"]["torch"] and results["commands"]
    runs = results["runs"]
    for task in ("cpt", "sft"):
        pairs = [run for key, run in runs.items() if key.startswith(f"{task}|")]
        assert sorted(run["seed"] for run in pairs) == [0, 1]
        for run in pairs:
            dense, sat = run["dense"], run["sat"]
            assert dense["sat_config"] is None and sat["sat_config"]["omission_rate"] > 0
            # Same start, equal steps, evaluated before training and at the end.
            assert dense["evals"][0]["loss"] == pytest.approx(sat["evals"][0]["loss"], abs=1e-6)
            assert [e["step"] for e in dense["evals"]] == [e["step"] for e in sat["evals"]]
            assert dense["evals"][-1]["step"] == len(dense["rates"]) == len(sat["rates"])
            # The ladder: sparse first, dense on the last step; the dense arm never sparse.
            assert sat["rates"][0] > 0 and sat["rates"][-1] == 0 and set(dense["rates"]) == {0.0}
            for value in (dense["final_loss"], sat["final_loss"], run["loss_gap_pct"], run["wall_saving_pct"]):
                assert math.isfinite(value)
            assert "reached" in run["time_to_target"]
    grid = [run for key, run in runs.items() if key.startswith("grid:")]
    configs = [run["arm"]["sat_config"] for run in grid if run["arm"]["sat_config"] is not None]
    cells = {(c["importance"], c["selection"], c["schedule"]) for c in configs if c["omission_rate"] == 0.5}
    for importance in ("uniform", "magnitude", "wanda", "maxip"):
        for selection in ("topk", "sampling"):
            for schedule in ("constant", "ladder"):
                assert (importance, selection, schedule) in cells
    assert {c["omission_rate"] for c in configs} >= {0.25, 0.5, 0.75}
    assert {c["score_tokens"] for c in configs} >= {32, 128, 512}
    assert sum(run["arm"]["sat_config"] is None for run in grid) == 1  # one dense reference
    for name in ("loss_curves.png", "ablation.png", "omission_sweep.png"):
        data = (tiny_run / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    markdown = (tiny_run / "quality.md").read_text()
    for heading in (
        "dense vs SAT",
        "Ablation grid",
        "Omission-rate sweep",
        "Schedule shapes",
        "Tokens scored per block",
        "By tokens scored",
    ):
        assert heading in markdown
    assert "Targets" not in markdown and "met**" not in markdown  # what runs are judged against: docs/results.md


@pytest.mark.slow
def test_sat_overrides_run_as_their_own_comparison(tmp_path):
    overrides = {"omit": ["mlp"], "score_tokens": 4}
    for extra in ([], ["--sat", json.dumps(overrides)]):
        proc = run_tiny(tmp_path, "--parts", "cpt", "--seeds", "0", *extra)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads((tmp_path / "quality.json").read_text())["runs"]
    assert sorted(runs) == ["cpt|steps=8|seed=0", 'cpt|steps=8|seed=0|{"omit": ["mlp"], "score_tokens": 4}']
    default, varied = runs["cpt|steps=8|seed=0"], runs['cpt|steps=8|seed=0|{"omit": ["mlp"], "score_tokens": 4}']
    assert default["sat_overrides"] == {} and varied["sat_overrides"] == overrides
    assert default["sat"]["sat_config"]["omit"] == ["mlp", "attention"]
    assert {k: varied["sat"]["sat_config"][k] for k in overrides} == overrides
    assert default["dense"]["final_loss"] == varied["dense"]["final_loss"]  # same seed: the same dense run
    markdown = (tmp_path / "quality.md").read_text()
    first, second = markdown.index("dense vs SAT, 8 steps"), markdown.index("dense vs SAT (omit=['mlp']")
    assert first < second  # the defaults' table comes first
    assert "SAT: `SATConfig(seed=s)` defaults." in markdown[first:second]
    assert "SAT: `SATConfig(seed=s, omit=['mlp'], score_tokens=4)`, other fields default." in markdown[second:]


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"omit": ["mlpx"]}', "`omit` must be"),
        ('{"seed": 3}', "other than 'seed'"),
        ("[1, 2]", "must be a JSON object"),
        ("{oops", "must be a JSON object"),
        ('{"not_a_field": 1}', "not_a_field"),
    ],
)
def test_sat_overrides_are_checked_before_any_work(tmp_path, bad, message):
    proc = run_tiny(tmp_path, "--sat", bad, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "quality.json").exists()


@pytest.mark.slow
def test_report_only_rerenders_without_training(tiny_run: Path):
    (tiny_run / "ablation.png").unlink()
    before = (tiny_run / "quality.json").read_text()
    proc = run_tiny(tiny_run, "--report-only", timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tiny_run / "ablation.png").read_bytes().startswith(PNG_MAGIC)
    assert (tiny_run / "quality.json").read_text() == before


def test_time_to_target_and_loss_at_time():
    evals = [
        {"step": 0, "train_time_s": 0.0, "loss": 3.0},
        {"step": 5, "train_time_s": 10.0, "loss": 2.5},
        {"step": 10, "train_time_s": 20.0, "loss": 2.0},
    ]
    assert qtrain.time_to_target(evals, 2.5) == {"reached": True, "step": 5, "train_time_s": 10.0}
    assert qtrain.time_to_target(evals, 1.9)["reached"] is False
    assert qtrain.loss_at_time(evals, 15.0) == pytest.approx(2.25)
    assert qtrain.loss_at_time(evals, 99.0) == 2.0  # clamped to the last evaluation
    assert qtrain.loss_at_time(evals, -1.0) == 3.0


def test_batches_are_seeded_and_padded_with_ignored_labels():
    data = qdata.TaskData("sft", [([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])] * 3, [([1, 2], [1, 2])], 0, "toy")
    first, again = data.train_batches(2, 4, seed=3), data.train_batches(2, 4, seed=3)
    assert all(a.input_ids.equal(b.input_ids) for a, b in zip(first, again))
    batch = qdata.collate([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch.num_loss_tokens == 3  # after the causal shift: 6, 7 and 9
