"""Worker for tests/test_resume_world_size.py: LoRA + SATCallback in a `transformers.Trainer`, on 1 process or as
one rank of a gloo DDP run (under torchrun), training from scratch or resuming from a checkpoint.

Usage: python resume_worker.py OUT_DIR [CHECKPOINT]
The global batch is 2 whatever the world size (per-device batch 2 // world size). Rank 0 writes OUT_DIR/logs.json
(the training log entries) and, when resuming, OUT_DIR/loaded.pt (the LoRA weights at train begin, i.e. as loaded
from the checkpoint).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import Trainer, TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
from sat_testing import leave_process_group, lm_dataset, paper_config, tiny_llama, train_logs, training_args  # noqa: E402

from peft_sat import SATCallback  # noqa: E402

MAX_STEPS, SAVE_STEPS, GLOBAL_BATCH = 8, 4, 2
CONFIG = dict(omission_rate=0.5, importance="magnitude", ladder_rungs=2, dense_when_slower=False)


class RecordLoaded(TrainerCallback):
    """The trainable weights at train begin (after `resume_from_checkpoint` loaded them)."""

    def __init__(self) -> None:
        self.loaded: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.loaded = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def main(out_dir: str, checkpoint: str | None = None) -> None:
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    model = get_peft_model(
        tiny_llama(seed=0 if checkpoint is None else 1), LoraConfig(r=4, target_modules="all-linear")
    )
    args = training_args(
        out_dir,
        max_steps=MAX_STEPS,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        ddp_backend="gloo" if world > 1 else None,
    )
    recorder = RecordLoaded()
    trainer = Trainer(
        model=model, args=args, train_dataset=lm_dataset(), callbacks=[recorder, SATCallback(paper_config(**CONFIG))]
    )
    trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.is_world_process_zero():
        with open(os.path.join(out_dir, "logs.json"), "w") as file:
            json.dump({"world": trainer.args.world_size, "logs": train_logs(trainer.state.log_history)}, file)
        if checkpoint is not None:
            torch.save(recorder.loaded, os.path.join(out_dir, "loaded.pt"))
    if torch.distributed.is_initialized():
        leave_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
