"""Resuming a SAT run with another world size: a Trainer checkpoint written by 2 gloo processes resumes in 1
process (and back). The ladder is a pure function of (optimizer step, max_steps), so the resumed run uses at each
step the rate an uninterrupted run used; the weights it starts from are the checkpoint's; training goes on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from resume_worker import CONFIG, MAX_STEPS, SAVE_STEPS  # the worker script's settings, not a test module
from safetensors.torch import load_file
from sat_testing import paper_config, torchrun

from peft_sat import omission_rate_at

WORKER = Path(__file__).with_name("resume_worker.py")


def _run(out_dir: Path, processes: int, checkpoint: Path | None = None) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(WORKER), str(out_dir), *([str(checkpoint)] if checkpoint else [])]
    launcher = [sys.executable]
    if processes > 1:  # use_cpu=True + torchrun: real gloo DDP, not N independent single-process runs
        launcher = torchrun(processes)
    result = subprocess.run([*launcher, *args], capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    written = json.loads((out_dir / "logs.json").read_text())
    assert written["world"] == processes
    return written["logs"]


def _lora_weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "adapter_model.safetensors")


@pytest.mark.slow  # 3 Trainer processes per direction, each importing torch and transformers
@pytest.mark.parametrize("saved_on,resumed_on", [(2, 1), (1, 2)], ids=["2-to-1", "1-to-2"])
def test_resume_with_another_world_size_continues_the_ladder(saved_on, resumed_on, tmp_path):
    uninterrupted = _run(tmp_path / "run", saved_on)
    checkpoint = tmp_path / "run" / f"checkpoint-{SAVE_STEPS}"
    assert checkpoint.is_dir(), sorted(os.listdir(tmp_path / "run"))

    resumed = _run(tmp_path / "resumed", resumed_on, checkpoint)[-(MAX_STEPS - SAVE_STEPS) :]

    # the ladder continues from the checkpoint's global step, as the uninterrupted run went on
    expected = [omission_rate_at(paper_config(**CONFIG), step, MAX_STEPS) for step in range(MAX_STEPS)]
    assert [entry["sat/omission_rate"] for entry in uninterrupted] == pytest.approx(expected)
    assert [entry["step"] for entry in resumed] == list(range(SAVE_STEPS + 1, MAX_STEPS + 1))
    assert [entry["sat/omission_rate"] for entry in resumed] == pytest.approx(expected[SAVE_STEPS:])
    assert len(set(expected[SAVE_STEPS:])) > 1, "the resumed steps must cross a rung"
    for mine, theirs in zip(resumed, uninterrupted[SAVE_STEPS:]):
        assert mine["sat/flops_saved_fraction"] == pytest.approx(theirs["sat/flops_saved_fraction"])

    # the resumed run started from the checkpoint's weights (its model was built from another seed)
    saved = _lora_weights(checkpoint)
    loaded = torch.load(tmp_path / "resumed" / "loaded.pt")
    assert len(loaded) == len(saved) > 0
    for name, value in loaded.items():
        key = name.replace(".default.weight", ".weight")
        assert torch.equal(value, saved[key]), name
    # and trained on to the end
    final = _lora_weights(tmp_path / "resumed" / f"checkpoint-{MAX_STEPS}")
    assert any(not torch.equal(final[key], saved[key]) for key in saved), "no training after resuming"
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in resumed)
