"""DeepSpeed ZeRO-2 / ZeRO-3 on CPU (2 gloo processes, ``DS_ACCELERATOR=cpu``): SAT trains as a single-process run
on the same global batches, and all ranks agree. Under ZeRO-3 every parameter is partitioned and SAT blocks slice
their children's weights without calling the children's forward, so each block registers them as ZeRO-3 external
parameters (``peft_sat.zero3``). The runs start with a dense step: that is the case that failed before (the
projections gathered by DeepSpeed's prefetcher were used unregistered, and the first sparse backward read an empty
shard). Skipped when DeepSpeed is not installed (``pip install -e ".[deepspeed]"``)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sat_testing import torchrun

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (optional extra: pip install -e '.[deepspeed]')",
    ),
    pytest.mark.slow,  # 5 two-process runs and 2 single-process references
]

WORKER = Path(__file__).with_name("deepspeed_worker.py")
RATES = "0,0.5,0.5"  # one dense step (DeepSpeed records a trace of the dense projections), then sparse steps


def _run(stack: str, stage: int, out_dir: Path, *flags: str) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}  # CPU tensors, gloo, on any machine
    args = [str(WORKER), stack, str(stage), RATES, str(out_dir), *flags]
    command = [*(torchrun(2) if stage else [sys.executable]), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2 if stage else 1)]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The same steps in plain PyTorch, one process, per stack (computed once)."""
    root = tmp_path_factory.mktemp("single")
    return {stack: _run(stack, 0, root / stack)[0] for stack in ("full", "lora")}


CASES = [("full", 3, ()), ("lora", 3, ()), ("full", 3, ("regather",)), ("full", 2, ()), ("lora", 2, ())]


@pytest.mark.parametrize("stack,stage,flags", CASES, ids=["-".join([s, f"zero{z}", *f]) for s, z, f in CASES])
def test_zero_training_matches_single_process(stack, stage, flags, single_process, tmp_path):
    rank0, rank1 = _run(stack, stage, tmp_path, *flags)
    reference = single_process[stack]
    for step0, step1, single in zip(rank0["kept"], rank1["kept"], reference["kept"]):
        assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(step0, step1, single))
    assert len(rank0["kept"][-1]) == 4, "the sparse steps must run every SAT block"
    # the mean of the ranks' losses on their half batches is the single-process loss on the whole batch
    torch.testing.assert_close(
        [(a + b) / 2 for a, b in zip(rank0["losses"], rank1["losses"])], reference["losses"], rtol=0, atol=1e-5
    )
    for name, value in reference["params"].items():
        assert torch.equal(rank0["params"][name], rank1["params"][name]), f"{name} differs across ranks"
        torch.testing.assert_close(rank0["params"][name], value, rtol=0, atol=1e-5, msg=name)
    assert any(not torch.equal(v, rank0["initial"][n]) for n, v in rank0["params"].items()), "nothing trained"
    if stage == 3:  # each block gathers what it slices: q/k/v/o (+ LoRA A, B) and gate/up/down (+ LoRA A, B)
        per_block = 3 if stack == "full" else 3 * 3
        assert rank0["external"]["base_model.model.model.layers.0.mlp"] == per_block, rank0["external"]
    else:
        assert set(rank0["external"].values()) == {0}, "ZeRO-2 does not partition parameters: nothing to register"
