"""DDP and FSDP2 (`fully_shard`) on CPU (gloo, 2 processes via torchrun): all ranks train the same sub-network and
end with identical parameters, equal to a single-process run on the same global batches. Under FSDP2 the SAT blocks
slice the weights that FSDP all-gathered for the forward, never the sharded storage."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sat_testing import torchrun

WORKER = Path(__file__).with_name("distributed_worker.py")


def _run(args: list[str], out_dir: Path, processes: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes > 1:
        command = [*torchrun(processes), str(WORKER), *args[:2], str(out_dir), *args[2:]]
    else:
        command = [sys.executable, str(WORKER), *args[:2], str(out_dir)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
@pytest.mark.parametrize("stack", ["full", "lora"])
def test_ranks_share_the_sub_network_and_match_single_process(stack, wrapper, tmp_path):
    # "magnitude" scores do not depend on the batch, so the single-process run selects the same units.
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    _run([stack, "magnitude", wrapper], tmp_path / "ddp", processes=2)
    _run([stack, "magnitude"], tmp_path / "single", processes=1)
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt")
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"{name} differs across ranks"
        torch.testing.assert_close(value, single["params"][name], rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(v, rank0["initial"][n]) for n, v in rank0["params"].items()), "nothing trained"


def test_ddp_shared_selection_with_batch_dependent_scores(tmp_path):
    """With 'maxip' each rank scores its own micro-batch; the summed scores still give one sub-network."""
    _run(["lora", "maxip", "ddp"], tmp_path, processes=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for step0, step1 in zip(rank0["kept"], rank1["kept"]):
        assert all(torch.equal(a, b) for a, b in zip(step0, step1))
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name


def test_a_lone_forward_on_one_rank_neither_hangs_nor_changes_training(tmp_path):
    """Rank 0 alone runs a training-mode forward and a generate() (a sampling callback): no collective may run
    in it, and the DDP steps that follow still equal the single-process run."""
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    _run(["lora", "magnitude", "ddp", "lone"], tmp_path / "ddp", processes=2)
    _run(["lora", "magnitude"], tmp_path / "single", processes=1)
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in (0, 1))
    single = torch.load(tmp_path / "single" / "rank0.pt")
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), f"{name} differs across ranks"
        torch.testing.assert_close(value, single["params"][name], rtol=0, atol=1e-5, msg=name)
