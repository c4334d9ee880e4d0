"""TRL's GRPOTrainer generates with the model in training mode: generation must see the dense model while the
training steps around it stay sparse (a sparse forward never fills the KV cache that generation reads)."""

from __future__ import annotations

import random

import torch
from datasets import Dataset
from peft import LoraConfig
from sat_testing import WORDS, paper_config, sat_blocks, tiny_llama, tiny_tokenizer

from peft_sat import SATCallback
from peft_sat.blocks import SATMLPMixin


def _length_reward(completions, **kwargs) -> list[float]:
    return [float(len(completion)) for completion in completions]


def test_grpo_generations_equal_eval_mode_while_training_steps_stay_sparse(tmp_path):
    from trl import GRPOConfig, GRPOTrainer

    rng = random.Random(0)
    prompts = Dataset.from_dict({"prompt": [" ".join(rng.choices(WORDS, k=5)) for _ in range(8)]})
    args = GRPOConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=6,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
    )
    trainer = GRPOTrainer(
        model=tiny_llama(),
        reward_funcs=_length_reward,
        args=args,
        train_dataset=prompts,
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        callbacks=[SATCallback(paper_config(omission_rate=0.5, schedule="constant", dense_when_slower=False))],
    )
    model = trainer.model
    generate = model.generate
    compared = []

    def generate_and_compare(*args, **kwargs):
        """TRL's call (training mode), then the same sampling in eval mode from the same random state."""
        rng_state = torch.get_rng_state()
        sampled = generate(*args, **kwargs)
        torch.set_rng_state(rng_state)
        training = model.training
        model.eval()
        expected = generate(*args, **kwargs)
        model.train(training)
        compared.append((training, torch.equal(sampled, expected)))
        return sampled

    model.generate = generate_and_compare
    trainer.train()

    assert compared and all(training for training, _ in compared), "GRPO should generate in training mode"
    assert all(equal for _, equal in compared), "generation in training mode must equal eval mode"
    mlps = [block for _, block in sat_blocks(model) if isinstance(block, SATMLPMixin)]
    assert mlps and all(0 < block.sat_last_kept.numel() < block.sat_num_units for block in mlps), "steps ran dense"
    logged = [entry["sat/omission_rate"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == [0.5, 0.5]
