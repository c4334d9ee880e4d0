"""The closed choices and the rules of ``SATConfig``'s fields: ``validate_config`` raises ``ValueError`` naming the
first invalid field, its rule and its value. ``SATConfig`` runs it in its constructor and on every assignment; the
schedule rules that need a step count live in ``peft_sat.schedules.validate_schedule``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, get_args

if TYPE_CHECKING:
    from .config import SATConfig

# The closed choices, written once: the field annotations use the Literal types, the checks their tuples.
ImportanceMetric = Literal["uniform", "magnitude", "wanda", "maxip"]
SelectionMethod = Literal["topk", "sampling"]
HeadGranularity = Literal["kv_group", "q_head"]
OmittableBlock = Literal["mlp", "attention"]
DistributedSelection = Literal["shared", "per_rank"]
Schedule = Literal["ladder", "constant", "linear"]  # peft_sat.schedules implements them
DenseTokenMode = Literal["auto", "none", "loss"]
SparsePass = Literal["forward_backward", "backward", "weight_grad"]
ContextTokens = Literal["sparse", "forward_only"]

IMPORTANCE_METRICS: tuple[str, ...] = get_args(ImportanceMetric)
SELECTION_METHODS: tuple[str, ...] = get_args(SelectionMethod)
HEAD_GRANULARITIES: tuple[str, ...] = get_args(HeadGranularity)
OMITTABLE_BLOCKS: tuple[str, ...] = get_args(OmittableBlock)
DISTRIBUTED_SELECTIONS: tuple[str, ...] = get_args(DistributedSelection)
SCHEDULES: tuple[str, ...] = get_args(Schedule)
DENSE_TOKEN_MODES: tuple[str, ...] = get_args(DenseTokenMode)
SPARSE_PASSES: tuple[str, ...] = get_args(SparsePass)
CONTEXT_TOKENS: tuple[str, ...] = get_args(ContextTokens)


def validate_config(config: SATConfig) -> None:
    """Raise ``ValueError`` naming the first invalid field of ``config``, its rule and its value."""
    rate = config.omission_rate
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ValueError(f"`omission_rate` must be a float in [0, 1), got {rate!r}.")
    if not isinstance(config.omit, list) or not config.omit or any(o not in OMITTABLE_BLOCKS for o in config.omit):
        raise ValueError(f"`omit` must be a non-empty list of {list(OMITTABLE_BLOCKS)}, got {config.omit!r}.")
    _check_choice("importance", config.importance, IMPORTANCE_METRICS)
    _check_choice("selection", config.selection, SELECTION_METHODS)
    _check_choice("head_granularity", config.head_granularity, HEAD_GRANULARITIES)
    if isinstance(config.score_tokens, bool) or not isinstance(config.score_tokens, int) or config.score_tokens < 1:
        raise ValueError(f"`score_tokens` must be an int >= 1, got {config.score_tokens!r}.")
    if config.train_base is not None and not isinstance(config.train_base, bool):
        raise ValueError(f"`train_base` must be True, False or None, got {config.train_base!r}.")
    if isinstance(config.seed, bool) or not isinstance(config.seed, int):
        raise ValueError(f"`seed` must be an int, got {config.seed!r}.")
    if config.target_modules is not None and not isinstance(config.target_modules, (str, list)):
        raise ValueError(
            f"`target_modules` must be a list of names, a regex string or None, got {config.target_modules!r}."
        )
    _check_choice("distributed_selection", config.distributed_selection, DISTRIBUTED_SELECTIONS)
    _check_choice("dense_tokens", config.dense_tokens, DENSE_TOKEN_MODES)
    _check_choice("sparse_pass", config.sparse_pass, SPARSE_PASSES)
    _check_choice("context_tokens", config.context_tokens, CONTEXT_TOKENS)
    if (
        "attention" in config.omit
        and config.dense_tokens != "none"
        and config.sparse_pass != "forward_backward"
        and config.context_tokens == "sparse"
    ):
        raise ValueError(
            f"`sparse_pass`={config.sparse_pass!r} on the context tokens of a split batch (`dense_tokens`="
            f"{config.dense_tokens!r}, `context_tokens`='sparse') is built for MLP channels only, got `omit`="
            f"{config.omit!r}. Use `omit=['mlp']`, `context_tokens='forward_only'` or `dense_tokens='none'`."
        )
    dense = config.dense_layers
    if dense is not None and not (
        isinstance(dense, list)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in dense)
        and len(set(dense)) == len(dense)
    ):
        raise ValueError(
            f"`dense_layers` must be None or a list of distinct layer indices (negatives count from the end), "
            f"got {dense!r}."
        )
    layers = config.layers_to_transform
    if layers is not None and not (
        (isinstance(layers, int) and not isinstance(layers, bool) and layers >= 0)
        or (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers)
        )
    ):
        raise ValueError(f"`layers_to_transform` must be a layer index >= 0, a list of them or None, got {layers!r}.")
    if config.layers_pattern is not None and layers is None:
        raise ValueError(
            f"`layers_pattern` needs `layers_to_transform`, got `layers_pattern`={config.layers_pattern!r}."
        )
    _validate_schedule_fields(config)


def _validate_schedule_fields(config: SATConfig) -> None:
    """Checks of the schedule fields that need no step count (``peft_sat.schedules.validate_schedule`` does)."""
    _check_choice("schedule", config.schedule, SCHEDULES)
    _check_fraction("warmup_ratio", config.warmup_ratio, "[0, 1)", lambda x: 0.0 <= x < 1.0)
    _check_fraction("ladder_full_rate_ratio", config.ladder_full_rate_ratio, "(0, 1)", lambda x: 0.0 < x < 1.0)
    rungs = config.ladder_rungs
    if isinstance(rungs, bool) or not isinstance(rungs, int) or rungs < 1:
        raise ValueError(f"`ladder_rungs` must be an int >= 1, got {rungs!r}.")
    if config.ladder_stairs is not None:
        if config.schedule != "ladder":
            raise ValueError(
                f"`ladder_stairs` shapes the 'ladder' schedule only, got `schedule`={config.schedule!r}; set "
                "`schedule='ladder'` or `ladder_stairs=None`."
            )
        _check_stairs(config.ladder_stairs)
    elif config.schedule == "ladder" and config.warmup_ratio + config.ladder_full_rate_ratio >= 1.0:
        raise ValueError(
            f"`warmup_ratio` + `ladder_full_rate_ratio` must be < 1 to leave steps for the rungs down to 0, got "
            f"{config.warmup_ratio} + {config.ladder_full_rate_ratio}."
        )
    if not isinstance(config.dense_when_slower, bool):
        raise ValueError(f"`dense_when_slower` must be True or False, got {config.dense_when_slower!r}.")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}.")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_fraction(name: str, value: object, interval: str, rule) -> None:
    if not _is_number(value) or not rule(value):
        raise ValueError(f"`{name}` must be a float in {interval}, got {value!r}.")


def _check_stairs(stairs: object) -> None:
    """``ladder_stairs``: non-empty (fraction, rate) pairs (tuples or JSON lists), from 0.0, strictly increasing."""
    example = "e.g. [(0.0, 0.5), (0.6, 0.25), (0.85, 0.0)]"
    if not isinstance(stairs, (list, tuple)) or not stairs:
        raise ValueError(
            f"`ladder_stairs` must be a non-empty list of (fraction, rate) pairs ({example}), got {stairs!r}."
        )
    previous = -1.0
    for stair in stairs:
        if not isinstance(stair, (list, tuple)) or len(stair) != 2 or not all(_is_number(v) for v in stair):
            raise ValueError(
                f"`ladder_stairs` items must be (fraction, rate) number pairs ({example}), got {stair!r}."
            )
        start, rate = stair
        if not previous < start < 1.0:
            raise ValueError(
                f"`ladder_stairs` start fractions must increase strictly and lie in [0, 1), got {start!r} after "
                f"{previous if previous >= 0 else 'the start'} in {stairs!r}."
            )
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"`ladder_stairs` rates must be in [0, 1), got {rate!r} in {stairs!r}.")
        previous = start
    if stairs[0][0] != 0:
        raise ValueError(f"`ladder_stairs` must start at fraction 0.0 (the whole run has a rate), got {stairs!r}.")
