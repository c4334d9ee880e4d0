"""Worker for tests/test_distributed.py: a few SAT training steps, single-process or one rank of a gloo DDP run.

Usage: python distributed_worker.py STACK IMPORTANCE OUT_DIR [ddp|fsdp2] [lone]   (under torchrun when distributed)
Each rank trains on its share of the same global batches and saves its final parameters to OUT_DIR/rank{r}.pt.
``lone``: before training, rank 0 alone runs a training-mode forward and a ``generate()`` (what a sampling callback
does), which must neither wait for the other ranks nor change what the ranks train afterwards.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(__file__))
from sat_testing import batch, leave_process_group, paper_config, sat_model  # noqa: E402

GLOBAL_BATCH, STEPS = 4, 3


def main(stack: str, importance: str, out_dir: str, wrapper: str = "ddp", lone: str = "") -> None:
    torch.set_num_threads(1)
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=180))  # fail, never hang
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)

    config = paper_config(omission_rate=0.5, importance=importance, selection="topk")
    model = sat_model(stack, config).train()
    trained = model
    if distributed and wrapper == "ddp":
        trained = DistributedDataParallel(model)
    elif distributed and wrapper == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.get_base_model().model.layers:
            fully_shard(layer)
        fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    if lone and rank == 0:
        inputs = batch(seed=99, batch_size=1, pad=0)
        model(**inputs).loss.backward()  # one rank's own forward and backward, outside any training step
        model.zero_grad(set_to_none=True)
        model.generate(input_ids=inputs["input_ids"][:, :4], max_new_tokens=3, do_sample=False, pad_token_id=0)

    initial = {n: _full(p).clone() for n, p in model.named_parameters()}
    share = GLOBAL_BATCH // world
    kept = []
    for step in range(STEPS):
        # No padding: every rank's mean loss covers as many tokens, so DDP's gradient average is the global mean.
        inputs = {
            k: v[rank * share : (rank + 1) * share]
            for k, v in batch(seed=step, batch_size=GLOBAL_BATCH, pad=0).items()
        }
        trained(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        kept.append([m.sat_last_kept.clone() for m in model.modules() if hasattr(m, "sat_last_kept")])

    params = {n: _full(p) for n, p in model.named_parameters()}
    torch.save({"params": params, "initial": initial, "kept": kept}, os.path.join(out_dir, f"rank{rank}.pt"))
    if distributed:
        leave_process_group()


def _full(param: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter (FSDP2 shards parameters as DTensors)."""
    return param.full_tensor().detach() if hasattr(param, "full_tensor") else param.detach()


if __name__ == "__main__":
    main(*sys.argv[1:])
