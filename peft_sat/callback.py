"""`SATCallback`: drives the SAT omission rate inside a `transformers.Trainer` / TRL trainer and logs what it saves.

Example:
    >>> from peft import LoraConfig
    >>> from trl import SFTTrainer
    >>> from peft_sat import SATCallback, SATConfig
    >>> trainer = SFTTrainer(model, train_dataset=data, peft_config=LoraConfig(r=16),  # doctest: +SKIP
    ...                      callbacks=[SATCallback(SATConfig(omission_rate=0.5))])
    >>> trainer.train()  # doctest: +SKIP

Every log entry of the Trainer during training (``state.log_history`` and every ``report_to`` backend), except the
rows that ``evaluate()`` logs, then carries:

- ``sat/omission_rate``: the rate of the latest optimizer step (0 while SAT is disabled);
- ``sat/kept_fraction``: kept units / all units of the SAT blocks at that rate (``num_kept`` per block);
- ``sat/flops_saved_fraction``: estimated fraction of the dense training FLOPs saved so far (see
  ``peft_sat.flops.SATFlopsEstimator``), i.e. ``sat/dense_steps_saved / global_step``;
- ``sat/dense_steps_saved``: the same saving counted in dense optimizer steps;
- ``sat/dense_token_fraction``: the share of token positions of the latest step that ran the whole block
  (``SATConfig.dense_tokens``; 0 without a split);
- ``sat/live_token_fraction``: the share of token positions of the latest step that its MLP blocks computed: below 1
  where a split with ``context_tokens="forward_only"`` skipped the positions after each sequence's last loss token
  (``peft_sat.tokens.LiveRows``), 1 otherwise;
- ``sat/crossover_rate``: with ``SATConfig.dense_when_slower``, the highest rate measured not faster than dense steps
  (steps at or below it run dense, and ``sat/omission_rate`` then reports 0); 0 while none is found;
- ``sat/crossover_dense_steps``: steps the schedule made sparse that ran dense (the crossover check's dense probes and
  the steps at or below the crossover), counted as saving nothing.

Evaluation rows carry no ``sat/*`` keys: evaluation runs the dense model, so the training rate would misreport it,
and a 0 would cut the rate's curve at every evaluation step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments
from transformers.trainer_callback import ExportableState
from transformers.utils import logging

from .blocks import SATBlockMixin
from .config import SATConfig
from .crossover import CrossoverCheck
from .flops import SATFlopsEstimator
from .model import apply_sat, get_sat_state, remove_sat
from .schedules import describe_schedule, omission_rate_at, validate_schedule
from .state import SATState
from .step_timing import synchronized_clock
from .trainer_link import calling_trainer, fused_head_scores_loss_positions, unwrap_log, wrap_log

logger = logging.get_logger(__name__)

# Fields that decide the rate of every step; a model's SAT and the callback must agree on them.
SCHEDULE_FIELDS = (
    "omission_rate",
    "schedule",
    "warmup_ratio",
    "ladder_full_rate_ratio",
    "ladder_rungs",
    "ladder_stairs",
    "dense_when_slower",
)


class SATCallback(TrainerCallback, ExportableState):
    """Apply or drive SAT in a Trainer: the rate follows the config's schedule, one value per optimizer step.

    Args:
        config: the ``SATConfig`` to apply at ``on_train_begin`` when the model carries no SAT yet (e.g. with
            ``SFTTrainer(..., peft_config=LoraConfig(...))``, where the LoRA model exists only inside the trainer).
            None: the model must already carry SAT (``get_peft_model(model, SATConfig(...))`` or ``apply_sat``), whose
            config's schedule is then followed. A dict is read by ``SATConfig.from_dict`` (unknown keys named).
        clock: with ``dense_when_slower``, the clock that times training steps (seconds; default: ``time.perf_counter``
            after a CUDA synchronisation). Tests inject a fake one.

    The rate of optimizer step ``s`` (``state.global_step`` before it) is ``omission_rate_at(config, s, max_steps)``,
    set in ``on_step_begin``: all micro-batches of a gradient-accumulation window share it. With
    ``config.dense_when_slower`` (the default), ``peft_sat.crossover.CrossoverCheck`` runs dense the steps whose rate is
    at or below the crossover, the highest rate measured not faster than dense steps next to its own, and a few dense
    probe steps to measure them; ``crossover`` reports what it measured and decided. Evaluation and generation inside
    training are dense because SAT blocks are sparse only in training mode. The rate is a pure function of
    ``global_step`` and the crossover, so ``resume_from_checkpoint`` continues the schedule where it stopped. The FLOPs
    counter and the crossover rate are read back from the checkpoint's log history (its entry at the resumed step;
    else the counter is rebuilt from the schedule). The crossover check's timings and verdicts travel in the
    checkpoint's ``trainer_state.json`` (``ExportableState``: ``TrainerState.stateful_callbacks``, read back here
    whatever ``restore_callback_states_from_checkpoint`` says), so a resumed run judges no rate twice; a checkpoint
    without them (an older one) only keeps the crossover rate, and rates above it are timed again.

    Raises (at ``on_train_begin``, before any step):
        ValueError: the schedule does not fit ``max_steps``; no config and no SAT on the model; the model's SAT has a
            different schedule than ``config``; ``config.train_base`` would change which parameters train after the
            optimizer was built.
    """

    def __init__(
        self, config: SATConfig | Mapping[str, Any] | None = None, *, clock: Callable[[], float] | None = None
    ) -> None:
        if isinstance(config, Mapping):
            config = SATConfig.from_dict(config)
        if config is not None and not isinstance(config, SATConfig):
            raise TypeError(
                f"`config` must be a SATConfig, a dict of its fields or None, got {type(config).__name__}."
            )
        self.config = config
        self.clock = clock if clock is not None else synchronized_clock
        self.crossover_check: CrossoverCheck | None = None  # during and after training with `dense_when_slower`
        self.sat_state: SATState | None = None
        self.flops: SATFlopsEstimator | None = None
        self.dense_steps_saved = 0.0
        self.steps_counted = 0  # optimizer steps included in `dense_steps_saved`
        self.dense_token_fraction = 0.0  # of the latest step
        self.live_token_fraction = 1.0  # of the latest step
        self.fused_head_on_loss_rows = False  # TRL's fused LM head scores the loss positions only (the estimate)
        self._trainer: Trainer | None = None  # whose `log` we wrapped, during `train()` only
        self._training = False
        self._evaluating = False  # between the first prediction step of an evaluation and its on_evaluate
        self._warned_fallback = False

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this callback (``ExportableState``): the crossover check's timings and
        verdicts; ``args`` rebuild the callback where the Trainer restores callback states."""
        config = None if self.config is None else self.config.to_dict()
        check = self.crossover_check
        return {
            "args": {"config": config},
            "attributes": {} if check is None else {"crossover_state": check.state_dict()},
        }

    # ---- events --------------------------------------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise ValueError("SATCallback needs the Trainer's model in `on_train_begin`; got none.")
        sat_state = get_sat_state(model)
        if sat_state is None and self.config is None:
            raise ValueError(
                "`SATCallback()` without a config needs a model that already carries SAT (`get_peft_model(model, "
                "SATConfig(...))` or `apply_sat`); pass `SATCallback(SATConfig(...))` to apply it here."
            )
        config = sat_state.config if sat_state is not None else self.config
        if sat_state is not None and self.config is not None:
            _check_same_schedule(self.config, sat_state.config)
        if isinstance(state.max_steps, bool) or not isinstance(state.max_steps, int) or state.max_steps < 1:
            raise ValueError(
                f"SATCallback needs the number of optimizer steps to follow a schedule, got `max_steps`="
                f"{state.max_steps!r}; set `max_steps` in the training arguments (e.g. for an IterableDataset)."
            )
        validate_schedule(config, state.max_steps)  # before touching the model: a bad schedule changes nothing
        if sat_state is None:
            sat_state = _apply_keeping_trainability(model, copy.deepcopy(config))
        self.sat_state = sat_state
        self.flops = SATFlopsEstimator(model, sat_state)
        _warn_if_weight_grad_saves_nothing(model, sat_state)
        done = state.global_step
        logged = _logged_at(state, done)
        if "sat/dense_steps_saved" in logged:  # resumed: the checkpoint's count, dense fallbacks included
            self.dense_steps_saved = float(logged["sat/dense_steps_saved"])
        else:  # count the steps already done as the schedule ran them (the rate is a function of the step)
            rates = [omission_rate_at(config, step, state.max_steps) for step in range(done)]
            self.dense_steps_saved = sum(self.flops.step_saving(config, rate) for rate in rates)
        self.steps_counted = done
        self.crossover_check = None
        if config.dense_when_slower:
            self.crossover_check = CrossoverCheck(
                config,
                state.max_steps,
                first_step=done,
                clock=self.clock,
                crossover_rate=logged.get("sat/crossover_rate", 0.0),
                dense_fallback_steps=logged.get("sat/crossover_dense_steps", 0),
            )
            stored = _stored_crossover(state) if done else None
            if stored is not None:
                self.crossover_check.load_state_dict(stored)
        sat_state.set_omission_rate(omission_rate_at(config, done, state.max_steps))
        self._training = True
        self._trainer = calling_trainer()
        self.fused_head_on_loss_rows = fused_head_scores_loss_positions(self._trainer, model)
        if self._trainer is not None:
            wrap_log(self._trainer, self._log_metrics)
        logger.info(
            f"SAT omission-rate schedule over {state.max_steps} steps: {describe_schedule(config, state.max_steps)}; "
            f"dense_tokens={config.dense_tokens!r}, sparse_pass={config.sparse_pass!r}, sparse layers: "
            f"{'all targeted' if sat_state.sparse_layers is None else sat_state.sparse_layers}; "
            + ("rates not faster than dense steps run dense" if config.dense_when_slower else "rates as scheduled")
        )

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._evaluating = False  # also after an evaluation that raised before on_evaluate
        sat_state = self.sat_state
        if sat_state is not None:
            sat_state.in_training_step = True  # every rank runs this step: a shared selection may all-reduce in it
            sat_state.dense_fractions.clear()
            sat_state.live_fractions.clear()
            sat_state.head_split_forwards = 0
            sat_state.step_positions = 0
            sat_state.step_loss_positions = None
            if self.crossover_check is not None:
                rate = self.crossover_check.begin_step(state.global_step)  # may start its clock
            else:
                rate = omission_rate_at(sat_state.config, state.global_step, state.max_steps)
            sat_state.set_omission_rate(rate)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        sat_state = self.sat_state
        if sat_state is None:
            return
        fractions = sat_state.dense_fractions
        if self.crossover_check is not None:
            # A step whose every forward split with context rows forward only omits no unit: any rate computes it.
            same_at_every_rate = sat_state.context_forward_only and bool(fractions) and all(f > 0 for f in fractions)
            # every rank: it reduces timings over ranks
            self.crossover_check.end_step(sat_state.step_positions, same_at_every_rate=same_at_every_rate)
        sat_state.in_training_step = False
        self.dense_token_fraction = sum(fractions) / len(fractions) if fractions else 0.0
        head_share = min(1.0, sat_state.head_split_forwards / len(fractions)) if fractions else 0.0
        bypassed_head_rows = _loss_share(sat_state) if self.fused_head_on_loss_rows else 1.0
        lives = sat_state.live_fractions
        self.live_token_fraction = sum(lives) / len(lives) if lives else 1.0
        if self.flops is not None and state.global_step > self.steps_counted:
            self.dense_steps_saved += self.flops.step_saving(
                sat_state.config,
                self.current_rate(),
                self.dense_token_fraction,
                head_share,
                bypassed_head_rows,
                self.live_token_fraction,
            )
            self.steps_counted = state.global_step

    def on_prediction_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # `Trainer.evaluate` runs its prediction steps, logs their metrics, then calls `on_evaluate`.
        self._evaluating = True

    def on_evaluate(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._evaluating = False

    def on_predict(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._evaluating = False

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._training or self._trainer is not None or logs is None or "sat/omission_rate" in logs:
            return
        # Fallback when the Trainer could not be found (callback driven by hand or by a custom loop): the Trainer
        # wrote `log_history` and called the callbacks listed before this one (the `report_to` integrations) already.
        metrics = self._log_metrics()
        logs.update(metrics)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(metrics)
        if not self._warned_fallback:
            self._warned_fallback = True
            logger.warning("SATCallback found no Trainer: `sat/*` metrics reach only callbacks listed after it.")

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._training = False
        if self.sat_state is not None:
            self.sat_state.in_training_step = False
        if self.crossover_check is not None:
            logger.info(f"SAT crossover check: {self.crossover_check.describe()}")
        if self._trainer is not None:
            unwrap_log(self._trainer)  # leave the Trainer as found; the model keeps SAT (dense in eval mode)
            self._trainer = None

    # ---- metrics -------------------------------------------------------------------------------------------

    def _log_metrics(self) -> dict[str, float]:
        """What the row being logged gets: ``metrics()``, or nothing for an evaluation row (it ran dense)."""
        return {} if self._evaluating else self.metrics()

    @property
    def crossover(self) -> dict[str, Any] | None:
        """What the crossover check measured and decided (``CrossoverCheck.to_dict``), JSON-ready for a run's
        metrics; ``{"dense_when_slower": False}`` when switched off, None before training."""
        if self.crossover_check is not None:
            return self.crossover_check.to_dict()
        return None if self.sat_state is None else {"dense_when_slower": False}

    def current_rate(self) -> float:
        """The omission rate the SAT blocks use now (0 while SAT is disabled)."""
        state = self.sat_state
        return state.omission_rate if state is not None and state.enabled else 0.0

    def metrics(self) -> dict[str, float]:
        """The ``sat/*`` values added to every log entry."""
        if self.flops is None:
            return {}
        rate = self.current_rate()
        check = self.crossover_check
        return {
            "sat/omission_rate": rate,
            "sat/kept_fraction": self.flops.kept_fraction(rate),
            "sat/flops_saved_fraction": self.dense_steps_saved / self.steps_counted if self.steps_counted else 0.0,
            "sat/dense_steps_saved": self.dense_steps_saved,
            "sat/dense_token_fraction": self.dense_token_fraction,
            "sat/live_token_fraction": self.live_token_fraction,
            "sat/crossover_rate": check.crossover_rate if check is not None else 0.0,
            "sat/crossover_dense_steps": check.dense_fallback_steps if check is not None else 0,
        }


# ---- helpers -------------------------------------------------------------------------------------------------


def _check_same_schedule(given: SATConfig, existing: SATConfig) -> None:
    differing = [name for name in SCHEDULE_FIELDS if getattr(given, name) != getattr(existing, name)]
    if differing:
        details = ", ".join(f"`{name}`: {getattr(given, name)!r} vs {getattr(existing, name)!r}" for name in differing)
        raise ValueError(
            f"The model already carries SAT with a different schedule than SATCallback's config ({details}). Pass "
            "`SATCallback()` to follow the model's config, or `remove_sat(model)` first to apply the callback's."
        )


def _stored_crossover(state: TrainerState) -> dict[str, Any] | None:
    """The crossover check's ``state_dict`` in a resumed run's ``TrainerState`` (saved by ``SATCallback.state``)."""
    stored = (state.stateful_callbacks or {}).get(SATCallback.__name__)
    stored = stored[0] if isinstance(stored, list) and stored else stored
    return stored.get("attributes", {}).get("crossover_state") if isinstance(stored, dict) else None


def _logged_at(state: TrainerState, step: int) -> dict[str, Any]:
    """The training log entry of ``step`` with ``sat/*`` metrics (a resumed run's, from its checkpoint), or {}."""
    if step == 0:
        return {}
    return next(
        (
            entry
            for entry in reversed(state.log_history)
            if entry.get("step") == step and "sat/dense_steps_saved" in entry
        ),
        {},
    )


def _apply_keeping_trainability(model: nn.Module, config: SATConfig) -> SATState:
    """``apply_sat``, refusing a ``train_base`` that would change ``requires_grad`` after the optimizer exists.

    Why: the Trainer has already built its optimizer from the parameters that required grad; a base made trainable
    now would collect gradients that no optimizer applies (silently wasted compute), a frozen one would stop training.
    """
    params = list(model.parameters())
    before = [param.requires_grad for param in params]
    apply_sat(model, config)
    changed = sum(flag != param.requires_grad for flag, param in zip(before, params))
    if changed:
        remove_sat(model)
        for flag, param in zip(before, params):
            param.requires_grad_(flag)
        raise ValueError(
            f"`train_base`={config.train_base} would change `requires_grad` of {changed} parameters after the Trainer "
            "built its optimizer. Use `train_base=None` with SATCallback (the Trainer's model decides what trains), or "
            "apply SAT before creating the Trainer (`get_peft_model(model, SATConfig(...))` or `apply_sat`)."
        )
    return get_sat_state(model)


def _loss_share(sat_state: SATState) -> float:
    """The share of the step's token positions that carry loss (1.0 when no forward of the step had labels)."""
    loss_positions = sat_state.step_loss_positions
    if loss_positions is None or not sat_state.step_positions:
        return 1.0
    return min(1.0, float(loss_positions) / sat_state.step_positions)


def _warn_if_weight_grad_saves_nothing(model: nn.Module, sat_state: SATState) -> None:
    """``sparse_pass="weight_grad"`` slices only base-weight gradients: with every base weight frozen (LoRA, QLoRA) a
    batch that is not split trains dense, at a dense step's cost. Say so once instead of saving nothing silently."""
    if sat_state.config.sparse_pass != "weight_grad":
        return
    blocks = [m for m in model.modules() if isinstance(m, SATBlockMixin) and m.sat_state is sat_state]
    if blocks and not any(p.requires_grad for b in blocks for n, p in b.named_parameters() if "lora_" not in n):
        sat_state.warn_once(
            "weight-grad-frozen",
            "peft_sat: `sparse_pass`='weight_grad' slices only the gradients of base weights, and this model's are "
            "frozen (LoRA / QLoRA): batches that are not split train dense and save nothing. Use "
            "`sparse_pass`='backward' for adapters.",
        )
