"""Worker for tests/test_deepspeed.py: a few SAT training steps under DeepSpeed ZeRO-2 / ZeRO-3, or the same steps
single-process in plain PyTorch (the reference).

Usage: python deepspeed_worker.py STACK STAGE RATES OUT_DIR [regather]
    STACK: full | lora; STAGE: 0 (plain PyTorch, one process) | 2 | 3 (under torchrun, DS_ACCELERATOR=cpu on CPU);
    RATES: comma-separated omission rate of each step ("0,0.5,0.5": a dense step first);
    regather: make backward re-gather the kept weights from the parameters on CPU too (the accelerator path of
    ``peft_sat.ops``), so that a parameter that ZeRO-3 did not gather for backward fails loudly.
Each rank trains on its share of the same global batches and saves the full parameters to OUT_DIR/rank{r}.pt.
"""

from __future__ import annotations

import datetime
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from sat_testing import batch, paper_config, sat_model  # noqa: E402

import peft_sat  # noqa: E402

GLOBAL_BATCH = 4


def main(stack: str, stage: str, rates: str, out_dir: str, *flags: str) -> None:
    torch.set_num_threads(1)
    stage_number = int(stage)
    if "regather" in flags:
        peft_sat.ops.REGATHER_DEVICES.add("cpu")
    step_rates = [float(rate) for rate in rates.split(",")]
    config = paper_config(omission_rate=max(step_rates), importance="magnitude", selection="topk")
    model = sat_model(stack, config).train()
    rank, world, engine = 0, 1, None
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    if stage_number:
        import deepspeed
        import torch.distributed as dist

        deepspeed.init_distributed(dist_backend="gloo", timeout=datetime.timedelta(seconds=180))  # fail, never hang
        rank, world = dist.get_rank(), dist.get_world_size()
        ds_config = {
            "train_micro_batch_size_per_gpu": GLOBAL_BATCH // world,
            "gradient_accumulation_steps": 1,
            "zero_optimization": {
                "stage": stage_number,
                # Partition every parameter: the default keeps parameters under 1e5 elements (all of a tiny model)
                # whole on every rank, and nothing would be sharded.
                "stage3_param_persistence_threshold": 0,
            },
            "gradient_clipping": 0.0,  # DeepSpeed clips to norm 1.0 by default; the reference does not clip
            "zero_allow_untested_optimizer": True,
            "steps_per_print": 10**6,
        }
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        engine.train()
    share = GLOBAL_BATCH // world
    losses, kept = [], []
    for step, rate in enumerate(step_rates):
        peft_sat.get_sat_state(model).set_omission_rate(rate)
        # No padding: every rank's mean loss covers as many tokens, so averaging gradients gives the global mean.
        inputs = {
            k: v[rank * share : (rank + 1) * share]
            for k, v in batch(seed=step, batch_size=GLOBAL_BATCH, pad=0).items()
        }
        if engine is None:
            loss = model(**inputs).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            loss = engine(**inputs).loss
            engine.backward(loss)
            engine.step()
        losses.append(loss.item())
        kept.append(
            [m.sat_last_kept.clone() for m in model.modules() if getattr(m, "sat_last_kept", None) is not None]
        )

    result = {"params": _full_parameters(model, stage_number), "initial": initial, "losses": losses, "kept": kept}
    result["external"] = _external_parameter_counts(model)
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if stage_number:
        import torch.distributed as dist

        dist.barrier()
        dist.destroy_process_group()  # without it the gloo processes abort at exit


def _full_parameters(model: torch.nn.Module, stage: int) -> dict[str, torch.Tensor]:
    if stage != 3:
        return {n: p.detach().clone() for n, p in model.named_parameters()}
    import deepspeed

    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values())):  # ZeRO-3 holds a shard per rank
        return {n: p.detach().clone() for n, p in params.items()}


def _external_parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Per SAT block: how many parameters are registered as ZeRO-3 external parameters of it."""
    blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, peft_sat.blocks.SATBlockMixin)]
    return {name: len(getattr(block, "_external_params", {})) for name, block in blocks}


if __name__ == "__main__":
    main(*sys.argv[1:])
