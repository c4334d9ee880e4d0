"""The training steps shared by ``recipes/sft.py`` and ``recipes/cpt.py``, as plain functions.

``train_arm`` is one training run: load the model (QLoRA: 4-bit), build TRL's ``SFTTrainer`` with ``SATCallback``
(which applies SAT at ``on_train_begin``, so LoRA / QLoRA come from ``peft_config`` as in any TRL script), train
while evaluating the held-out loss dense (at the start, every ``eval_steps`` and at the end), and save. A recipe calls
it once, or twice with ``--compare_dense true``: SAT, then the dense baseline from the same start.
"""

from __future__ import annotations

import copy
import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from datasets import Dataset
from transformers import AutoModelForCausalLM, set_seed
from trl import SFTTrainer, get_peft_config, get_quantization_config

from peft_sat import SATCallback, SATConfig, cpu_allocator

from . import cpu_lm_head, turns
from .measure import RunRecorder, final_eval_point
from .preflight import RecipeError

DENSE_ARM_DIR = "dense"  # the dense baseline's output folder inside `output_dir` (`--compare_dense true`)


@dataclass
class Arm:
    """One training run of a recipe and what it measured; its trainer, model and optimizer are already released."""

    sat_config: SATConfig | None  # None: dense training
    recorder: RunRecorder
    train_loss: float
    log_history: list[dict[str, Any]]
    global_step: int
    max_steps: int
    output_dir: str
    train_examples: int
    eval_examples: int
    launch: dict[str, Any]  # distributed_type, num_processes, zero_stage
    is_main_process: bool
    crossover: dict[str, Any] | None = None  # `SATCallback.crossover`: rungs measured not faster than dense ran dense
    interleaved: bool = False  # trained in turns with the other arm of the A/B (`--interleave_arms`)

    @property
    def label(self) -> str:
        return "SAT" if self.sat_config is not None else "dense"

    @property
    def eval_loss_before(self) -> float:
        return self.recorder.eval_curve[0]["eval_loss"]

    @property
    def eval_loss_after(self) -> float:
        return self.recorder.eval_curve[-1]["eval_loss"]


def use_all_cpu_cores() -> None:
    """Undo ``accelerate launch``'s one-thread default for a single CPU process.

    Why: accelerate starts every process with ``OMP_NUM_THREADS=1`` unless told otherwise
    (``--num_cpu_threads_per_process``), which halves a 2-core machine's speed for the default single-process run.
    Multi-process runs (``WORLD_SIZE`` > 1) keep it: their processes share the cores.
    """
    launched = "ACCELERATE_MIXED_PRECISION" in os.environ
    single = int(os.environ.get("WORLD_SIZE", "1")) == 1
    if launched and single and os.environ.get("OMP_NUM_THREADS") == "1" and not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(cores)


def tune_for_cpu(script_args: Any, training_args: Any) -> dict[str, bool]:
    """Apply the recipes' CPU settings; returns them as ``metrics.json`` records them (step times depend on them).

    - TRL's fused LM head scores the labelled positions only (``cpu_lm_head.score_labelled_positions_only``;
      no effect off a CPU);
    - ``peft_sat.cpu_allocator.tune_cpu_allocator`` unless ``--tune_cpu_allocator false`` (with
      ``--cpu_allocator_large_blocks_from_heap``: ``large_blocks_from_heap``);
    - TRL's fused LM head keeps its logits' gradient from the forward unless ``--cpu_lm_head_saves_gradient false``
      (``cpu_lm_head.save_logits_gradient_on_cpu``).
    """
    cpu_lm_head.score_labelled_positions_only()
    on_cpu = training_args.use_cpu or not torch.cuda.is_available()
    heap = script_args.cpu_allocator_large_blocks_from_heap
    tuned = bool(script_args.tune_cpu_allocator and on_cpu and cpu_allocator.tune_cpu_allocator(heap))
    saves_gradient = bool(script_args.cpu_lm_head_saves_gradient and on_cpu)
    if saves_gradient:
        cpu_lm_head.save_logits_gradient_on_cpu()
    return {
        "cpu_allocator_tuned": tuned,
        "cpu_allocator_large_blocks_from_heap": tuned and heap,
        "cpu_lm_head_saves_gradient": saves_gradient,
    }


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
        # Imported here: bitsandbytes is needed for QLoRA only (preflight reports it missing before training).
        from peft_sat.bnb import disable_cpu_inference_repack

        disable_cpu_inference_repack(model)  # the held-out loss is evaluated before training (and SAT)
    return model


def train_arm(
    recipe: str,
    model_path: str,
    tokenizer: Any,
    train: Dataset,
    held_out: Dataset,
    training_args: Any,
    model_args: Any,
    sat_config: SATConfig | None,
    between_steps: Callable[[], float] | None = None,
) -> Arm:
    """Load, train with the held-out loss evaluated dense along the way, and save to ``training_args.output_dir``.

    The held-out loss is evaluated at the start of ``train()`` (``eval_on_start``: under DeepSpeed a
    ``Trainer.evaluate()`` before ``train()`` builds an inference-only engine that training cannot use), every
    ``eval_steps`` when ``eval_strategy`` is ``"steps"``, and at the last step. The global seed is reset first, so
    that every arm of a run starts from the same adapter initialization and sees the same data order.
    ``between_steps``: see ``RunRecorder`` (the turns of an interleaved A/B, ``recipes/turns.py``).

    Raises:
        RecipeError: TRL's preprocessing left the training or held-out split empty.
    """
    args = copy.copy(training_args)
    args.eval_on_start = True
    set_seed(args.seed)
    model = load_model(model_path, model_args, args)
    recorder = RunRecorder(between_steps)
    sat_callback = SATCallback(sat_config) if sat_config is not None else None
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
        callbacks=([sat_callback] if sat_callback is not None else []) + [recorder],
    )
    _check_prepared_sizes(recipe, trainer, args)
    if between_steps is not None:
        # In turns, both arms are built before either trains: each arm's first step then runs with both models
        # loaded, not the second arm's alone right after its own loading (off both training clocks).
        between_steps()
    output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    if final_eval_point(recorder, trainer.state.global_step) is None:
        trainer.evaluate()  # `eval_strategy: no`: the held-out loss after training (eval mode: SAT blocks run dense)
    trainer.save_model(args.output_dir)
    state = trainer.accelerator.state
    arm = Arm(
        sat_config=sat_config,
        recorder=recorder,
        train_loss=output.training_loss,
        log_history=trainer.state.log_history,
        global_step=trainer.state.global_step,
        max_steps=trainer.state.max_steps,
        output_dir=str(args.output_dir),
        train_examples=len(trainer.train_dataset),
        eval_examples=len(trainer.eval_dataset),
        launch={
            "distributed_type": str(getattr(state.distributed_type, "value", state.distributed_type)),
            "num_processes": state.num_processes,
            "zero_stage": state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
        },
        is_main_process=trainer.is_world_process_zero(),
        crossover=sat_callback.crossover if sat_callback is not None else None,
        interleaved=between_steps is not None,
    )
    return arm  # the trainer, with the model and optimizer, is unreachable from here on


def release_memory() -> None:
    """Free what a finished arm left (its model and optimizer must not stay in memory next to the next arm's) and
    hand the allocator's free pages back to the OS: the A/B's second arm must not reuse the pages the first one
    faulted in, so that both start from the same allocator state."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    cpu_allocator.release_free_memory()


def end_run() -> None:
    """Destroy the process group of a multi-process run, once, after every arm (what ``Trainer.end()`` does)."""
    PartialState().destroy_process_group()


def train_arms(
    recipe: str,
    model_path: str,
    tokenizer: Any,
    train: Dataset,
    held_out: Dataset,
    training_args: Any,
    model_args: Any,
    sat_config: SATConfig | None,
    script_args: Any,
) -> tuple[Arm, Arm | None]:
    """``(the run's arm, the dense baseline or None)``: ``train_arm`` once, or with ``--compare_dense`` both arms from
    the same start, SAT first unless ``--dense_first``; with ``--interleave_arms`` both at once, one optimizer step
    each in turn (``recipes/turns.py``).

    Why the order can be swapped: the arm that trains second runs in a process and on caches the first one warmed,
    and on a shared machine the load moves between the arms; running the A/B both ways separates those from SAT's
    own costs.
    """
    data = (recipe, model_path, tokenizer, train, held_out)
    release_memory()
    if not script_args.compare_dense:
        return train_arm(*data, training_args, model_args, sat_config), None
    dense_args = dense_arm_args(training_args)
    if script_args.interleave_arms:
        # Memory is released once, before both arms: released again when the second arm starts, it would take back
        # the pages of the first arm's first step, and the first arm's next step would fault them in again.
        # One progress bar: two bars redrawn in turns garble a terminal, and the arms step together anyway.
        dense_args.disable_tqdm = True
        arms = {
            "sat": lambda between_steps: train_arm(*data, training_args, model_args, sat_config, between_steps),
            "dense": lambda between_steps: train_arm(*data, dense_args, model_args, None, between_steps),
        }
        done = turns.run_in_turns(arms, order=["dense", "sat"] if script_args.dense_first else ["sat", "dense"])
        return done["sat"], done["dense"]
    if script_args.dense_first:
        dense = train_arm(*data, dense_args, model_args, None)
        release_memory()
        return train_arm(*data, training_args, model_args, sat_config), dense
    arm = train_arm(*data, training_args, model_args, sat_config)
    release_memory()
    return arm, train_arm(*data, dense_args, model_args, None)


def dense_arm_args(training_args: Any) -> Any:
    """The SAT arm's training arguments for the dense baseline of ``--compare_dense``: its own output folder."""
    args = copy.copy(training_args)
    args.output_dir = str(Path(training_args.output_dir) / DENSE_ARM_DIR)
    return args


def _check_prepared_sizes(recipe: str, trainer: Any, training_args: Any) -> None:
    """TRL drops examples that truncation leaves without loss tokens; fail before training if a split is empty."""
    empty = [
        name
        for name, split in (("training", trainer.train_dataset), ("held-out", trainer.eval_dataset))
        if len(split) == 0
    ]
    if empty:
        raise RecipeError(
            recipe,
            [
                f"No {name} example has a loss token left after truncation to `max_length`={training_args.max_length} "
                "(TRL drops fully masked examples); raise `max_length` or use shorter examples."
                for name in empty
            ],
        )
