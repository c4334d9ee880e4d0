"""Argument classes of the recipes and their parser: TRL's ``ScriptArguments`` / ``SFTConfig`` / ``ModelConfig`` plus
``SATArguments``, read from ``--config some.yaml`` and overridden on the command line (``TrlParser``).

``SATArguments`` is generated from ``peft_sat.SATConfig``: one ``sat_<field>`` argument per SAT field, with the
field's own help string and default, so the recipes never drift from the config (one source of truth). The prefix
keeps SAT fields apart from the training arguments of the same name (``warmup_ratio``, ``seed``).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml
from peft.config import PeftConfig
from trl import ModelConfig, ScriptArguments, SFTConfig, TrlParser

from peft_sat import SATConfig

SAT_PREFIX = "sat_"
# Fields the recipe decides itself: what trains follows the variant (LoRA: the adapters; full: every weight).
RECIPE_OWNED_SAT_FIELDS = ("train_base",)
_SIMPLE = (bool, int, float, str)


@dataclass
class RecipeArguments(ScriptArguments):
    """TRL's ``ScriptArguments`` (dataset name, config and splits) plus the recipes' data sizes.

    ``dataset_name`` None means the recipe's built-in offline data (ShareGPT for sft.py, the Python reference manual
    for cpt.py); otherwise a Hugging Face dataset name, a local data file (.json, .jsonl, .csv, .parquet, .txt) or a
    folder (``save_to_disk`` output or data files).
    """

    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Use at most this many training examples (sft.py) or packed blocks (cpt.py); None: all."},
    )
    eval_samples: int = field(
        default=32,
        metadata={
            "help": (
                "Held-out examples (sft.py) or packed blocks (cpt.py) whose loss is evaluated dense at the start, "
                "every `eval_steps` and at the end of training: the first ones of `dataset_test_split` when the "
                "dataset has it, else split off the training data (seeded by `seed`)."
            )
        },
    )
    tune_cpu_allocator: bool = field(
        default=True,
        metadata={
            "help": (
                "On a CPU run, keep freed memory in the process between steps instead of faulting it in again every "
                "step (`peft_sat.cpu_allocator`; glibc only). The process keeps its peak resident size. False: the "
                "allocator's defaults."
            )
        },
    )
    cpu_allocator_large_blocks_from_heap: bool = field(
        default=False,
        metadata={
            "help": (
                "With `tune_cpu_allocator`: blocks above 32 MiB (glibc's highest mmap threshold) come from the heap "
                "too, so no step faults them in again. Faster steps, a larger peak resident size (the heap "
                "fragments): on a 7B-shaped layer SAT steps gained the most (`benchmarks/speed.py --cpu-allocator "
                "heap`)."
            )
        },
    )
    cpu_lm_head_saves_gradient: bool = field(
        default=True,
        metadata={
            "help": (
                "On a CPU run, TRL's fused LM head (the loss of `SFTTrainer`) computes the logits once and keeps "
                "their gradient (positions x vocabulary, float32) from the forward to the backward, instead of "
                "computing them again in the backward (`recipes/cpu_lm_head.py`): the same loss and gradients, about "
                "half the head's time, at 4 bytes per position and word of memory until the backward. False: TRL's "
                "own path."
            )
        },
    )
    compare_dense: bool = field(
        default=False,
        metadata={
            "help": (
                "After the SAT run, train the dense baseline from the same start (fresh model, same data order, "
                "seed, training arguments and held-out evaluations; output in `<output_dir>/dense`) and report the "
                "held-out loss of both at equal steps and at equal training wall time, the time SAT took to reach "
                "dense's final loss and the wall time saved. Doubles the run time."
            )
        },
    )
    dense_first: bool = field(
        default=False,
        metadata={
            "help": (
                "With `compare_dense`: train the dense baseline first, then SAT. The second arm runs in a process the "
                "first one warmed, and on a shared machine the load moves between the arms: an A/B run both ways "
                "tells those apart from SAT's own costs."
            )
        },
    )
    interleave_arms: bool = field(
        default=False,
        metadata={
            "help": (
                "With `compare_dense`: train both arms at once, one optimizer step each in turn (SAT's step 1, "
                "dense's step 1, ...; dense first with `dense_first`), each arm's clock counting its own turns only. "
                "Every pair of steps meets the same machine load: on a shared machine, an A/B run one arm after the "
                "other measures the load's drift as well. One process only; both models stay in memory."
            )
        },
    )


def _sat_argument_fields() -> tuple[list[tuple[str, Any, Any]], set[str]]:
    """``(name, type, field)`` per SATConfig field for ``make_dataclass``, and the names read as YAML strings."""
    hints = typing.get_type_hints(SATConfig)
    base_fields = {f.name for f in dataclasses.fields(PeftConfig)}
    specs, yaml_fields = [], set()
    for f in dataclasses.fields(SATConfig):
        if f.name in base_fields or f.name in RECIPE_OWNED_SAT_FIELDS:
            continue
        arg_type, is_yaml = _parser_type(hints[f.name])
        help_text = f.metadata.get("help", "")
        if is_yaml:
            yaml_fields.add(f.name)
            help_text += " On the command line: a YAML / JSON string."
        default = (
            {"default_factory": f.default_factory}
            if f.default_factory is not dataclasses.MISSING
            else {"default": f.default}
        )
        specs.append(
            (SAT_PREFIX + f.name, arg_type, field(metadata={"help": f"{help_text} (SATConfig.{f.name})"}, **default))
        )
    return specs, yaml_fields


def _parser_type(tp: Any) -> tuple[Any, bool]:
    """The type ``HfArgumentParser`` gets for a SATConfig field type, and whether CLI strings are parsed as YAML.

    ``HfArgumentParser`` handles plain types, ``Literal``, ``X | None`` and ``list[X]``. A list of Literals becomes
    ``list[str]`` (SATConfig checks the choices); a union with ``str`` becomes ``str``; anything richer
    (``ladder_stairs``, a list of pairs) becomes an optional string parsed as YAML. YAML config files pass their
    values through untouched (e.g. a list of ``target_modules``).
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    non_none = [a for a in args if a is not type(None)]
    if tp in _SIMPLE or origin is Literal:
        return tp, False
    if origin is list and args and typing.get_origin(args[0]) is Literal:
        return list[str], False
    if origin is list and args and args[0] in _SIMPLE:
        return tp, False
    if origin in (Union, types.UnionType) and str in args:  # e.g. target_modules: a regex on the CLI, a list in YAML
        return (str | None if len(non_none) < len(args) else str), False
    if origin in (Union, types.UnionType) and len(non_none) == 1:
        inner, is_yaml = _parser_type(non_none[0])
        return (inner | None, False) if not is_yaml else (str | None, True)
    return str | None, True


def _to_sat_config(self: Any) -> SATConfig:
    """The ``SATConfig`` these arguments describe (``train_base`` left to the recipe: None)."""
    return SATConfig(**self.sat_config_kwargs())


def _sat_config_kwargs(self: Any) -> dict[str, Any]:
    """``SATConfig`` keyword arguments: the ``sat_`` prefix dropped, CLI strings of rich fields parsed as YAML."""
    kwargs = {}
    for name, _, _ in _SPECS:
        value = getattr(self, name)
        key = name[len(SAT_PREFIX) :]
        if key in _YAML_FIELDS and isinstance(value, str):
            value = yaml.safe_load(value)
        kwargs[key] = value
    return kwargs


_SPECS, _YAML_FIELDS = _sat_argument_fields()
SATArguments = dataclasses.make_dataclass(
    "SATArguments",
    [
        (
            "use_sat",
            bool,
            field(default=True, metadata={"help": "Train with SAT; `--use_sat false` runs the dense baseline."}),
        ),
        *_SPECS,
    ],
    namespace={"to_sat_config": _to_sat_config, "sat_config_kwargs": _sat_config_kwargs},
)
SATArguments.__module__ = __name__  # `make_dataclass(module=...)` needs Python 3.12
SATArguments.__doc__ = (
    "SAT arguments of the recipes: `use_sat` plus one `sat_<field>` per `peft_sat.SATConfig` field (same help and "
    "default). Example: `--sat_omission_rate 0.4 --sat_schedule ladder --sat_ladder_rungs 2`."
)


def device_defaults() -> dict[str, Any]:
    """Defaults that depend on the machine: bf16 on a GPU, float32 and ``use_cpu`` without one.

    Why: ``SFTConfig`` defaults to ``bf16=True`` and ``gradient_checkpointing=True``; without a GPU the first raises
    and the second slows a small model down. ``use_cpu`` also makes CPU multi-process runs real DDP (without it,
    ``accelerate launch --num_processes N`` on a CPU starts N independent single-process runs).
    """
    import torch

    cuda = torch.cuda.is_available()
    return {
        "bf16": cuda,
        "use_cpu": not cuda,
        "dtype": "bfloat16" if cuda else "float32",
        # SFTConfig turns checkpointing on; None resolves to off without the deprecation warning that an explicit
        # False on the old name gives. Large models: set `activation_checkpointing: true` in the YAML.
        "gradient_checkpointing": None,
        "dataloader_pin_memory": cuda,
    }


def make_parser(recipe_defaults: dict[str, Any]) -> TrlParser:
    """``TrlParser((RecipeArguments, SFTConfig, ModelConfig, SATArguments))`` with the recipe's embedded defaults.

    Precedence: dataclass defaults < ``device_defaults()`` < ``recipe_defaults`` < ``--config`` YAML < command line.

    Example:
        >>> script_args, training_args, model_args, sat_args = make_parser({}).parse_args_and_config([])  # doctest: +SKIP
    """
    parser = TrlParser((RecipeArguments, SFTConfig, ModelConfig, SATArguments))
    defaults = {**device_defaults(), **recipe_defaults}
    unknown = sorted(set(defaults) - {action.dest for action in parser._actions})
    if unknown:  # a typo in a recipe's defaults must not pass silently
        raise ValueError(f"Unknown recipe default(s) {unknown}: not an argument of {parser.dataclass_types}.")
    parser.set_defaults_with_config(**defaults)
    return parser
