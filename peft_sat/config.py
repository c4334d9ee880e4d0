"""`SATConfig`: the configuration of Sparsity-Accelerated Training as a PEFT method.

Every field documents itself through its ``metadata["help"]`` string (the single source of truth, checked by
``tests/test_config.py``); every check lives in ``peft_sat.config_validation`` (run on construction and on every
assignment) and names the field, the rule and the value.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field, fields
from difflib import get_close_matches
from typing import Any

from peft.config import PeftConfig

from .blocks.registry import ARCHITECTURES
from .checkpoint import LOADING_NOTE_KEY, add_loading_note
from .config_validation import (
    ContextTokens,
    DenseTokenMode,
    DistributedSelection,
    HeadGranularity,
    ImportanceMetric,
    OmittableBlock,
    Schedule,
    SelectionMethod,
    SparsePass,
    validate_config,
)
from .registration import SAT_PEFT_TYPE


def _target_modules_help() -> str:
    """The help of ``target_modules``, naming the families of ``peft_sat.blocks.ARCHITECTURES`` (never typed twice)."""
    names = list(ARCHITECTURES)
    families = ", ".join(names[:-1]) + f" and {names[-1]}" if len(names) > 1 else names[0]
    notes = "".join(
        f"; {family}: MLP only, {arch.attention_unsliceable}"
        for family, arch in ARCHITECTURES.items()
        if arch.attention is None
    )
    return (
        "Names (suffix match) or a regex of the MLP / self-attention blocks to sparsify. Default: ['mlp', "
        f"'self_attn'] for every supported family ({families}{notes})."
    )


@dataclass
class SATConfig(PeftConfig):
    """Configuration of Sparsity-Accelerated Training (SAT, arXiv 2406.01392).

    In training mode each targeted block scores its units (MLP channels, attention heads) on the current
    micro-batch and keeps the most important ``1 - omission_rate`` fraction. The paper computes forward and backward
    on the kept units only (``sparse_pass="forward_backward"``, ``omit=["mlp", "attention"]``,
    ``dense_tokens="none"``). The defaults keep the computed function closer to the dense model's, which measured
    better at equal wall time (docs/results.md, "Beyond the paper"):

    - a batch whose labels mask some tokens (SFT prompts) splits: the loss tokens run the whole dense block, the
      context tokens only its forward (``dense_tokens="auto"``, ``context_tokens="forward_only"``);
    - any other batch (continual pre-training: every token carries loss) runs the dense forward and a backward
      through the kept MLP channels (``sparse_pass="backward"``, ``omit=["mlp"]``), on the paper's ladder schedule.

    Evaluation (``model.eval()``) and generation always run the dense model.

    Example:
        >>> import peft_sat  # registers the PEFT method "sat"
        >>> from peft import get_peft_model
        >>> model = get_peft_model(model, peft_sat.SATConfig(omission_rate=0.5))  # doctest: +SKIP
    """

    # Not a setting: the loading note of a saved adapter_config.json (`peft_sat.checkpoint`), accepted and dropped
    # on load so that PEFT's loaders neither fail nor warn about an unknown key.
    _comment: InitVar[str | None] = None

    omission_rate: float = field(
        default=0.5,
        metadata={
            "help": (
                "Fraction of units (MLP channels, attention heads or KV groups) omitted per layer and training step, "
                "in [0, 1) ('r' in the paper). Used as a constant rate unless a scheduler drives it."
            )
        },
    )
    target_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": _target_modules_help()},
    )
    omit: list[OmittableBlock] = field(
        default_factory=lambda: ["mlp"],
        metadata={
            "help": (
                "Which kinds of units to omit: any of 'mlp' (channels) and 'attention' (heads). Default ['mlp']: "
                "omitting heads cost far more loss per FLOP saved in every measurement (docs/results.md, 'Beyond "
                "the paper'); ['mlp', 'attention'] is the paper's."
            )
        },
    )
    dense_tokens: DenseTokenMode = field(
        default="auto",
        metadata={
            "help": (
                "Which token positions run the whole block, forward and backward, while the others (context tokens) "
                "train as `context_tokens` says: 'loss' (every position whose next-token label carries loss), 'auto' "
                "(as 'loss' when the labels mask context tokens, e.g. prompts in SFT; no split when every token "
                "carries loss, as in continual pre-training, so a default never turns a run dense) or 'none' (no "
                "split: every token trains on the sub-network, the paper). Needs `labels` in the model forward; "
                "without them nothing is split, with a warning. See `peft_sat.tokens`."
            )
        },
    )
    sparse_pass: SparsePass = field(
        default="backward",
        metadata={
            "help": (
                "What the sub-network skips, for the tokens that train on it: 'forward_backward' (the paper: the "
                "omitted units run in neither pass), 'backward' (the forward is the dense model's, bit for bit; the "
                "backward runs through the kept units only, so omitted units get no gradient and pass none to the "
                "layer input) or 'weight_grad' (the forward and every input gradient are dense; only the kept units' "
                "base weights get a gradient: the most faithful, and it saves only where base weights train, i.e. "
                "full-parameter SAT). With 'backward' and 'weight_grad' the kept units are chosen from the dense "
                "forward's own activations (exact 'maxip' scores)."
            )
        },
    )
    context_tokens: ContextTokens = field(
        default="forward_only",
        metadata={
            "help": (
                "How the tokens outside `dense_tokens` train when a batch is split: 'sparse' (on the sub-network, as "
                "`sparse_pass` says) or 'forward_only' (the dense forward; their backward stops at the keys and "
                "values that the dense tokens read, so no gradient flows down their residual stream and their MLP "
                "and query / output projections skip the backward; the positions after a sequence's last dense "
                "token, padding mostly, skip the MLP too where attention is causal: they carry no loss and no "
                "earlier position reads them, so a training forward's outputs there are not the model's). "
                "'forward_only' converts the attention blocks even when `omit` leaves them dense: they cut the "
                "gradient."
            )
        },
    )
    dense_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": (
                "Layer indices whose blocks always run dense (negatives count from the last layer, e.g. [0, -1]). "
                "Combined with `layers_to_transform` into one set of sparse layers, logged when SAT is applied; a "
                "layer in both raises an error. None: no layer is kept dense."
            )
        },
    )
    importance: ImportanceMetric = field(
        default="maxip",
        metadata={
            "help": (
                "How units are scored each step, see `peft_sat.importance`: 'uniform' (random), 'magnitude' "
                "(weight norms), 'wanda' (|W| times input-feature norm), 'maxip' (activation magnitude on sampled "
                "tokens)."
            )
        },
    )
    selection: SelectionMethod = field(
        default="topk",
        metadata={
            "help": (
                "How kept units are chosen from the scores: 'topk' (highest scores) or 'sampling' (without "
                "replacement, probability proportional to the score, seeded by `seed`)."
            )
        },
    )
    head_granularity: HeadGranularity = field(
        default="kv_group",
        metadata={
            "help": (
                "Attention unit: 'kv_group' omits whole GQA groups (a KV head with its query heads); 'q_head' omits "
                "single query heads and projects only the KV heads that the kept query heads use."
            )
        },
    )
    score_tokens: int = field(
        default=32,
        metadata={
            "help": (
                "Number of non-padding tokens sampled from the micro-batch to compute activation-based scores "
                "('maxip'); bounds the scoring cost. More tokens pick a sub-network closer to the dense model at a "
                "small cost (128 vs 32 on SmolLM2: see docs/results.md). Must be >= 1."
            )
        },
    )
    train_base: bool | None = field(
        default=None,
        metadata={
            "help": (
                "Whether the base model's weights are trained. None: True when SAT is the PEFT method of "
                "`get_peft_model` (full-parameter SAT, the paper's setting); left untouched by `apply_sat` (e.g. "
                "under LoRA only the adapters train)."
            )
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the 'uniform' scores and of 'sampling' selection (combined with step and layer)."},
    )
    layers_to_transform: int | list[int] | None = field(
        default=None,
        metadata={
            "help": (
                "Only sparsify the blocks of these layer indices (PEFT's convention: the number after "
                "`layers_pattern`, e.g. 'layers' in 'model.layers.3.mlp'). None: every layer."
            )
        },
    )
    layers_pattern: str | list[str] | None = field(
        default=None,
        metadata={"help": "Name of the layer list for `layers_to_transform` (e.g. 'layers'); None: PEFT's defaults."},
    )
    distributed_selection: DistributedSelection = field(
        default="shared",
        metadata={
            "help": (
                "Under DDP / FSDP: 'shared' sums the importance scores over ranks before selection (one small vector "
                "per layer), so every rank trains the same sub-network; 'per_rank' lets each rank select from its own "
                "micro-batch (no communication, ranks then update different units)."
            )
        },
    )
    schedule: Schedule = field(
        default="ladder",
        metadata={
            "help": (
                "How `SATCallback` moves the omission rate over the optimizer steps (see `peft_sat.schedules`): "
                "'ladder' (LORS in the paper: `omission_rate` for a first stage, then rungs down to 0 on the last "
                "rung), 'constant' (`omission_rate` throughout) or 'linear' (from `omission_rate` to 0 at the last "
                "step). Without the callback the rate stays at `omission_rate`."
            )
        },
    )
    warmup_ratio: float = field(
        default=0.0,
        metadata={
            "help": (
                "Fraction of the total optimizer steps, in [0, 1), trained dense (rate 0) before any schedule starts; "
                "rounded up to whole steps like `TrainingArguments.warmup_ratio`."
            )
        },
    )
    ladder_full_rate_ratio: float = field(
        default=0.5,
        metadata={
            "help": (
                "'ladder' schedule: fraction of the total optimizer steps, in (0, 1), trained at the full "
                "`omission_rate` (after the warm-up) before the ladder steps down; `warmup_ratio` plus this must be "
                "< 1 to leave room for the rungs."
            )
        },
    )
    ladder_rungs: int = field(
        default=3,
        metadata={
            "help": (
                "'ladder' schedule: number of rungs (>= 1) that split the remaining steps evenly, rung i of n at rate "
                "`omission_rate` * (n - i) / n, so the last rung is dense. 1: straight from the full rate to dense."
            )
        },
    )
    ladder_stairs: list[tuple[float, float]] | None = field(
        default=None,
        metadata={
            "help": (
                "'ladder' schedule, explicit shape: a list of (start fraction of the total steps, omission rate) "
                "pairs, starting at 0.0 with strictly increasing fractions in [0, 1) and rates in [0, 1), e.g. "
                "[[0.0, 0.5], [0.6, 0.25], [0.85, 0.0]]. Replaces `omission_rate`, `ladder_full_rate_ratio` and "
                "`ladder_rungs` in the schedule."
            )
        },
    )
    dense_when_slower: bool = field(
        default=True,
        metadata={
            "help": (
                "With `SATCallback`: time real training steps and run dense every step whose omission rate is at or "
                "below the crossover, the highest rate whose sparse steps were not faster than dense steps on this "
                "model and batch shape (at small micro-batches the fixed costs of a sparse step can outweigh what it "
                "saves). Each rate is compared with dense steps timed next to its own: a few steps that would be "
                "timed sparse run dense instead (about two per rate, and two at the start). Logged as "
                "`sat/crossover_rate`; see `peft_sat.crossover`. False: follow the schedule exactly (rates "
                "independent of timing noise)."
            )
        },
    )

    def __post_init__(self, _comment: str | None = None) -> None:
        super().__post_init__()
        self.peft_type = SAT_PEFT_TYPE
        self.target_modules = _normalized("target_modules", self.target_modules)
        self.omit = _normalized("omit", self.omit)
        self.dense_layers = _normalized("dense_layers", self.dense_layers)
        self.validate()
        self.__dict__["_validate_on_assignment"] = True  # from here on, see __setattr__

    def __setattr__(self, name: str, value: Any) -> None:
        """Check an assignment after construction like a constructor argument; an invalid one raises and is undone.

        The whole config is checked, so fields tied by a rule (e.g. `warmup_ratio` + `ladder_full_rate_ratio` < 1)
        change together with ``dataclasses.replace(config, ...)``. ``copy.deepcopy`` and pickling restore the
        attributes without assigning them.

        Example:
            >>> config = SATConfig()
            >>> config.omission_rate = 1.0  # doctest: +SKIP
            ValueError: `omission_rate` must be a float in [0, 1), got 1.0.
        """
        if not self.__dict__.get("_validate_on_assignment", False):  # the dataclass __init__ and __post_init__
            super().__setattr__(name, value)
            return
        missing = object()
        previous = self.__dict__.get(name, missing)
        super().__setattr__(name, _normalized(name, value))
        try:
            self.validate()
        except ValueError:
            if previous is missing:
                super().__delattr__(name)
            else:
                super().__setattr__(name, previous)
            raise

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> SATConfig:
        """Build a config from a plain mapping (e.g. parsed YAML); unknown keys are rejected by name.

        Wrong types are caught by ``validate`` like any other invalid value.

        Example:
            >>> SATConfig.from_dict({"omission_rate": 0.4, "importance": "wanda"}).omission_rate
            0.4
        """
        if not isinstance(values, Mapping):
            raise ValueError(f"A SATConfig must be a mapping of field names to values, got {values!r}.")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(known) - {LOADING_NOTE_KEY})
        if unknown:
            hints = [
                f"`{k}` (did you mean `{m[0]}`?)" if (m := get_close_matches(k, known, n=1)) else f"`{k}`"
                for k in unknown
            ]
            raise ValueError(f"Unknown SATConfig key(s): {', '.join(hints)}. Known keys: {', '.join(known)}.")
        return cls(**values)

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """PEFT's ``save_pretrained``, plus the note that loading needs ``import peft_sat`` (``peft_sat.checkpoint``)."""
        super().save_pretrained(save_directory, **kwargs)
        add_loading_note(save_directory)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike) -> SATConfig:
        """``from_dict`` of a YAML file (the whole file, or its ``sat`` section when it has one)."""
        import yaml

        with open(path) as file:
            values = yaml.safe_load(file) or {}
        if isinstance(values, Mapping) and isinstance(values.get("sat"), Mapping):
            values = values["sat"]
        return cls.from_dict(values)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first invalid field, its rule and its value (``validate_config``).

        Runs in the constructor, on every assignment, and again in ``get_peft_model`` / ``apply_sat``, which also
        catch a list field changed in place (``config.omit.append(...)`` assigns nothing).
        """
        validate_config(self)


def _normalized(name: str, value: Any) -> Any:
    """A config's own copy of a list field (``omit`` and ``dense_layers`` also accept a tuple), so it never shares
    the caller's list."""
    if (name == "target_modules" and isinstance(value, list)) or (
        name in ("omit", "dense_layers") and isinstance(value, tuple | list)
    ):
        return list(value)
    return value
