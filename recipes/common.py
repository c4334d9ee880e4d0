"""The run shared by ``recipes/sft.py`` and ``recipes/cpt.py``.

1. ``prepare_run``: every check before any training, collecting ALL problems and raising once (``RecipeError``,
   litgpt's ``validate_args`` style): SAT fields, argument combinations, the model path, the dataset and its
   columns, and whether the SAT schedule fits the number of optimizer steps.
2. ``run``: load the model (QLoRA: 4-bit), build TRL's ``SFTTrainer`` with ``SATCallback`` (which applies SAT at
   ``on_train_begin``, so LoRA / QLoRA come from ``peft_config`` as in any TRL script), evaluate the held-out loss
   dense, train, evaluate again, save, and report (``recipes/report.py``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset, DatasetDict
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer, get_peft_config, get_quantization_config

from peft_sat import SATCallback, SATConfig, assets, validate_schedule
from peft_sat.bnb import disable_cpu_inference_repack
from peft_sat.model import default_target_modules
from peft_sat.schedules import describe_schedule

from . import data as recipe_data
from . import report
from .arguments import SAT_PREFIX

VARIANT_LABELS = {"full": "full-parameter", "lora": "LoRA", "qlora": "QLoRA (4-bit base)"}


class RecipeError(ValueError):
    """Every problem found before training, raised once; ``problems`` holds the messages."""

    def __init__(self, recipe: str, problems: list[str]) -> None:
        self.problems = list(problems)
        listed = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{recipe} cannot start, {len(self.problems)} problem(s):\n{listed}")


@dataclass(frozen=True)
class Recipe:
    """What differs between the recipes: the built-in data, the expected columns, and data preparation."""

    name: str  # e.g. "recipes/sft.py"
    unit: str  # what `eval_samples` counts: "examples" or "blocks"
    builtin_label: str  # the built-in data, for the summary
    load_builtin: Callable[[Any], Dataset]  # (training_args) -> raw dataset
    check_columns: Callable[[Any, str], str | None]  # (raw dataset, dataset_text_field) -> problem or None
    prepare: Callable[[Any, Any, Any, Any], tuple[Dataset, Dataset]]  # (raw, tokenizer, script_args, training_args)


@dataclass
class Prepared:
    model_path: str
    tokenizer: Any
    train: Dataset
    held_out: Dataset
    sat_config: SATConfig | None


def variant(model_args: Any) -> str:
    """'qlora' (4-bit base + LoRA), 'lora' or 'full' (every weight trains)."""
    return "qlora" if model_args.load_in_4bit else "lora" if model_args.use_peft else "full"


# ---- 1. checks before training ---------------------------------------------------------------------------------


def prepare_run(recipe: Recipe, script_args: Any, training_args: Any, model_args: Any, sat_args: Any) -> Prepared:
    """Check everything and load tokenizer and data; raise ``RecipeError`` listing every problem found."""
    problems: list[str] = []
    sat_config = _sat_config(sat_args, problems) if sat_args.use_sat else None
    _check_arguments(recipe, script_args, training_args, model_args, problems)
    model_path = _resolve_model(model_args, sat_args, training_args, problems)
    tokenizer = _load_tokenizer(model_path, model_args, training_args, problems) if model_path else None
    raw = _load_raw(recipe, script_args, training_args, problems)
    train = held_out = None
    if raw is not None and tokenizer is not None:
        try:
            train, held_out = recipe.prepare(raw, tokenizer, script_args, training_args)
        except ValueError as error:
            problems.append(str(error))
    if train is not None and recipe_data.is_conversational(train) and tokenizer.chat_template is None:
        if training_args.chat_template_path is None:
            problems.append(
                f"The tokenizer of {model_path} has no chat template for chat data; set `chat_template_path`."
            )
    if sat_config is not None and train is not None:
        steps = total_steps(training_args, len(train))
        try:
            validate_schedule(sat_config, steps)
        except ValueError as error:
            problems.append(f"The SAT schedule does not fit the {steps} optimizer steps of this run: {error}")
    if problems:
        raise RecipeError(recipe.name, problems)
    return Prepared(model_path, tokenizer, train, held_out, sat_config)


def _sat_config(sat_args: Any, problems: list[str]) -> SATConfig | None:
    """The SATConfig, checking each field on its own first so that every bad field is reported, not just the first."""
    try:
        kwargs = sat_args.sat_config_kwargs()
    except Exception as error:  # noqa: BLE001 - a YAML string that does not parse
        problems.append(f"A `{SAT_PREFIX}*` argument could not be parsed: {error}")
        return None
    field_problems = []
    for key, value in kwargs.items():
        try:
            SATConfig(**{key: value})
        except (ValueError, TypeError) as error:
            field_problems.append(f"`--{SAT_PREFIX}{key}`: {error}")
    if not field_problems:
        try:
            return SATConfig(**kwargs)
        except (ValueError, TypeError) as error:
            field_problems.append(f"SAT arguments: {error}")
    problems.extend(field_problems)
    return None


def _check_arguments(
    recipe: Recipe, script_args: Any, training_args: Any, model_args: Any, problems: list[str]
) -> None:
    if not isinstance(script_args.eval_samples, int) or script_args.eval_samples < 1:
        problems.append(
            f"`eval_samples` must be an int >= 1 (held-out loss before / after), got {script_args.eval_samples!r}."
        )
    limit = script_args.max_train_samples
    if limit is not None and (not isinstance(limit, int) or limit < 1):
        problems.append(f"`max_train_samples` must be None or an int >= 1, got {limit!r}.")
    if (model_args.load_in_4bit or model_args.load_in_8bit) and not model_args.use_peft:
        problems.append(
            "A quantized base (`load_in_4bit` / `load_in_8bit`) cannot train itself: set `use_peft: true` (QLoRA)."
        )
    if model_args.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        problems.append("`load_in_4bit` needs bitsandbytes: `pip install bitsandbytes`.")
    if recipe.unit == "blocks" and (training_args.max_length is None or training_args.max_length < 2):
        problems.append(
            f"`max_length` sets the packed block size of {recipe.name} and must be >= 2, got {training_args.max_length!r}."
        )


def _resolve_model(model_args: Any, sat_args: Any, training_args: Any, problems: list[str]) -> str | None:
    """The local folder or Hub id to load (None: problem recorded); the default is the wheel's SmolLM2."""
    name = model_args.model_name_or_path
    if name is None:
        try:
            name = str(assets.smollm2_path())  # converted once, then cached
        except (ImportError, FileNotFoundError) as error:
            problems.append(f"No `model_name_or_path` given and the built-in model is unavailable: {error}")
            return None
        model_args.model_name_or_path = name
    try:
        config = AutoConfig.from_pretrained(
            name, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except Exception as error:  # noqa: BLE001 - OSError, ValueError, HTTP errors: all mean "no such model"
        where = (
            "a local folder without config.json"
            if Path(name).expanduser().exists()
            else ("neither a local folder nor a cached / reachable Hugging Face model")
        )
        problems.append(f"`model_name_or_path` {name!r} is {where}: {type(error).__name__}: {str(error)[:300]}")
        return None
    if sat_args.use_sat and getattr(sat_args, f"{SAT_PREFIX}target_modules") is None:
        try:
            default_target_modules(getattr(config, "model_type", None))
        except TypeError as error:
            problems.append(f"{error} Set `{SAT_PREFIX}target_modules` or use `--use_sat false`.")
    return name


def _load_tokenizer(model_path: str, model_args: Any, training_args: Any, problems: list[str]) -> Any:
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, revision=model_args.model_revision, trust_remote_code=training_args.trust_remote_code
        )
    except Exception as error:  # noqa: BLE001
        problems.append(f"The tokenizer of {model_path!r} could not be loaded: {type(error).__name__}: {error}")
        return None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # Llama-style tokenizers ship none; padding is masked anyway
    return tokenizer


def _load_raw(
    recipe: Recipe, script_args: Any, training_args: Any, problems: list[str]
) -> Dataset | DatasetDict | None:
    try:
        if script_args.dataset_name is None:
            return recipe.load_builtin(training_args)
        raw = recipe_data.load_any(script_args.dataset_name, script_args.dataset_config)
    except (ValueError, ImportError, FileNotFoundError) as error:
        problems.append(str(error))
        return None
    problem = recipe.check_columns(raw, training_args.dataset_text_field)
    if problem:
        problems.append(f"`dataset_name` {script_args.dataset_name!r}: {problem}")
        return None
    return raw


def total_steps(training_args: Any, num_train: int) -> int:
    """Optimizer steps of the run: ``max_steps`` or the epochs' worth (the Trainer's own count for map datasets)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    batches = math.ceil(num_train / (training_args.per_device_train_batch_size * max(training_args.world_size, 1)))
    accumulation = training_args.gradient_accumulation_steps
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return max(math.ceil(training_args.num_train_epochs * per_epoch), 1)


# ---- 2. the run ------------------------------------------------------------------------------------------------


def load_model(model_path: str, model_args: Any, training_args: Any) -> Any:
    """The causal LM, in ``model_args.dtype``; 4-bit (bitsandbytes nf4) when ``load_in_4bit`` (QLoRA)."""
    kwargs: dict[str, Any] = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    quantization_config = get_quantization_config(model_args)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        if not training_args.use_cpu and torch.cuda.is_available():
            kwargs["device_map"] = {"": PartialState().local_process_index}  # one full copy per process
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    model.config.use_cache = False  # training builds no KV cache (transformers creates one otherwise)
    if quantization_config is not None:
        disable_cpu_inference_repack(model)  # the held-out loss is evaluated before training (and SAT)
    return model


def run(recipe: Recipe, script_args: Any, training_args: Any, model_args: Any, sat_args: Any) -> dict[str, Any]:
    """Check, train, evaluate and report one recipe run; returns the metrics written to ``metrics.json``."""
    wall_start = time.perf_counter()
    _use_all_cpu_cores()
    prepared = prepare_run(recipe, script_args, training_args, model_args, sat_args)
    model = load_model(prepared.model_path, model_args, training_args)
    timer = report.StepTimer()
    callbacks = ([SATCallback(prepared.sat_config)] if prepared.sat_config is not None else []) + [timer]
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=prepared.train,
        eval_dataset=prepared.held_out,
        processing_class=prepared.tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=callbacks,
    )
    _check_prepared_sizes(recipe, trainer, training_args)
    if trainer.is_deepspeed_enabled:
        # `Trainer.evaluate()` before `train()` under DeepSpeed builds an inference-only engine (ZeRO-2 refuses to),
        # which `train()` then cannot prepare with an optimizer; evaluate inside `train()`, once the engine exists,
        # before the first step (the model is still the pre-trained one; SAT blocks compute dense in eval mode).
        eval_on_start, trainer.args.eval_on_start = trainer.args.eval_on_start, True
        before = None
    else:
        before = trainer.evaluate()["eval_loss"]  # SAT is not applied yet: the pre-trained model, dense
    train_output = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    eval_in_train_s = 0.0
    if before is None:
        trainer.args.eval_on_start = eval_on_start
        start = next(entry for entry in trainer.state.log_history if "eval_loss" in entry)
        before, eval_in_train_s = start["eval_loss"], start.get("eval_runtime", 0.0)
    after = trainer.evaluate()["eval_loss"]  # eval mode: SAT blocks compute dense
    trainer.save_model(training_args.output_dir)
    metrics = _metrics(
        recipe,
        script_args,
        training_args,
        model_args,
        prepared,
        trainer,
        train_output,
        timer,
        (before, after),
        wall_start,
        eval_in_train_s,
    )
    if trainer.is_world_process_zero():
        report.write_metrics(training_args.output_dir, metrics)
        report.plot_curves(
            training_args.output_dir,
            trainer.state.log_history,
            timer.records,
            (before, after),
            title=f"{recipe.name}: {metrics['variant_label']}",
        )
        print(report.format_summary(metrics), flush=True)
    trainer.end()  # finish trackers, destroy the process group (multi-process runs)
    return metrics


def _use_all_cpu_cores() -> None:
    """Undo ``accelerate launch``'s one-thread default for a single CPU process.

    Why: accelerate 1.15 starts every process with ``OMP_NUM_THREADS=1`` unless told otherwise
    (``--num_cpu_threads_per_process``), which halves a 2-core machine's speed for the default single-process run.
    Multi-process runs (``WORLD_SIZE`` > 1) keep it: their processes share the cores.
    """
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if launched and single and os.environ.get("OMP_NUM_THREADS") == "1" and not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cores)


def _check_prepared_sizes(recipe: Recipe, trainer: Any, training_args: Any) -> None:
    """TRL drops examples that truncation leaves without loss tokens; fail before training if a split is empty."""
    empty = [
        name
        for name, split in (("training", trainer.train_dataset), ("held-out", trainer.eval_dataset))
        if len(split) == 0
    ]
    if empty:
        raise RecipeError(
            recipe.name,
            [
                f"No {name} example has a loss token left after truncation to `max_length`={training_args.max_length} "
                "(TRL drops fully masked examples); raise `max_length` or use shorter examples."
                for name in empty
            ],
        )


def _metrics(
    recipe: Recipe,
    script_args: Any,
    training_args: Any,
    model_args: Any,
    prepared: Prepared,
    trainer: Any,
    train_output: Any,
    timer: report.StepTimer,
    eval_losses: tuple[float, float],
    wall_start: float,
    eval_in_train_s: float = 0.0,
) -> dict[str, Any]:
    history = trainer.state.log_history
    last = {key: value for entry in history for key, value in entry.items()}  # latest value of every logged key
    runtime = train_output.metrics.get("train_runtime")
    if runtime is not None:
        runtime -= eval_in_train_s  # the held-out evaluation that ran inside `train()` (DeepSpeed) is not training
    state = trainer.accelerator.state
    tokens = int(last.get("num_tokens", 0))
    kind = variant(model_args)
    sat = prepared.sat_config is not None
    metrics = {
        "recipe": recipe.name,
        "variant": kind,
        "variant_label": ("SAT + " if sat else "dense ") + VARIANT_LABELS[kind],
        "sat": sat,
        "model": prepared.model_path,
        "dataset": script_args.dataset_name or recipe.builtin_label,
        "output_dir": str(training_args.output_dir),
        "saved": "LoRA adapter" if model_args.use_peft else "model",
        "unit": recipe.unit,
        "train_examples": len(prepared.train),
        "eval_examples": len(prepared.held_out),
        "distributed_type": str(getattr(state.distributed_type, "value", state.distributed_type)),
        "num_processes": state.num_processes,
        "zero_stage": state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        "max_steps": trainer.state.max_steps,
        "global_step": trainer.state.global_step,
        "eval_loss_before": eval_losses[0],
        "eval_loss_after": eval_losses[1],
        "train_loss": train_output.training_loss,
        "train_runtime_s": runtime,
        "wall_time_s": time.perf_counter() - wall_start,
        "train_tokens": tokens,
        "tokens_per_s": tokens / runtime if runtime else None,
        "omission_rate_final": last.get("sat/omission_rate", 0.0),
        "flops_saved_fraction_estimate": last.get("sat/flops_saved_fraction") if sat else None,
        "schedule": describe_schedule(prepared.sat_config, trainer.state.max_steps) if sat else "dense",
        "sat_config": prepared.sat_config.to_dict() if sat else None,
        **report.dense_time_saved(timer.records),
        "steps": timer.records,
        "log_history": history,
    }
    return metrics
