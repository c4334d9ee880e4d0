"""The SFT recipe's own steps, batch by batch: the wall time a SAT step saves against the dense step on the same
batch, next to the callback's FLOPs estimate for that batch.

A recipe's A/B (``--compare_dense``) measures whole runs: every step once, each arm on its own model, the machine's
drift included. This script takes its first batches (the recipe's data, collator and ``SFTTrainer.compute_loss``,
TRL's fused LM head included) and times forward + backward of one model, dense and at ``--rate`` in turns,
``--repeats`` times per batch (medians), so the step's own efficiency (measured saving / estimate) is seen apart from
the run's. Any recipe argument passes through, e.g. ``--config`` or ``--model_name_or_path``::

    .venv/bin/python benchmarks/recipe_steps.py --batches 8 --repeats 4
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `recipes` from this checkout

import torch  # noqa: E402
from transformers import set_seed  # noqa: E402
from trl import SFTTrainer, get_peft_config  # noqa: E402

from peft_sat import apply_sat, get_sat_state  # noqa: E402
from peft_sat.flops import SATFlopsEstimator  # noqa: E402
from recipes import common, preflight, sft  # noqa: E402


def build(recipe_argv: list[str]) -> tuple[SFTTrainer, object]:
    """The recipe's trainer (model, LoRA, data, collator) with SAT applied to its model, and the SAT config."""
    script_args, training_args, model_args, sat_args = sft.make_parser().parse_args_and_config(
        ["--report_to", "none", *recipe_argv]
    )
    common.tune_for_cpu(script_args, training_args)
    problems: list[str] = []
    sat_config, model_path, tokenizer = preflight.check_run(
        script_args, training_args, model_args, sat_args, problems, packed=False
    )
    train, held_out = sft.load_datasets(script_args, training_args, tokenizer, problems)
    preflight.raise_problems(sft.RECIPE, problems)
    set_seed(training_args.seed)
    trainer = SFTTrainer(
        model=common.load_model(model_path, model_args, training_args),
        args=training_args,
        train_dataset=train,
        eval_dataset=held_out,
        processing_class=tokenizer,
        peft_config=get_peft_config(model_args),
    )
    apply_sat(trainer.model, sat_config)
    trainer.model.train()
    return trainer, sat_config


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=8, help="the recipe's first batches to time")
    parser.add_argument("--repeats", type=int, default=4, help="dense / SAT step pairs per batch")
    parser.add_argument("--rate", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    args, recipe_argv = parser.parse_known_args(argv)
    torch.set_num_threads(args.threads)
    trainer, config = build(recipe_argv)
    model, state = trainer.model, get_sat_state(trainer.model)
    estimator = SATFlopsEstimator(model, state)

    def step(batch: dict, rate: float) -> float:
        state.set_omission_rate(rate)
        start = time.perf_counter()
        trainer.accelerator.backward(trainer.compute_loss(model, batch))
        seconds = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        return seconds

    loader = iter(trainer.get_train_dataloader())
    weighted = {"estimate": 0.0, "measured": 0.0, "dense": 0.0}
    for index in range(args.batches):
        batch = next(loader)
        step(batch, args.rate)  # warm-up on this shape; it also records the split the estimate reads
        labels = batch["labels"]
        loss_share = float((labels != -100).sum()) / labels.numel()  # TRL's fused head scores these rows only
        dense_fraction = state.dense_fractions[-1] if state.dense_fractions else 0.0
        live = state.live_fractions[-1] if state.live_fractions else 1.0
        estimate = estimator.step_saving(config, args.rate, dense_fraction, 0.0, loss_share, live)
        pairs = []
        for repeat in range(args.repeats):
            order = (0.0, args.rate) if repeat % 2 else (args.rate, 0.0)
            times = {rate: step(batch, rate) for rate in order}
            pairs.append((times[0.0], times[args.rate]))
        dense = statistics.median(d for d, _ in pairs)
        measured = 1.0 - statistics.median(s / d for d, s in pairs)
        weighted["estimate"] += estimate * dense
        weighted["measured"] += measured * dense
        weighted["dense"] += dense
        print(
            f"batch {index + 1} {tuple(labels.shape)}: dense rows {dense_fraction:.2f}, MLP rows {live:.2f}, dense "
            f"step {dense * 1e3:.0f} ms, saved {measured:.1%} of it, estimate {estimate:.1%}: "
            f"{measured / estimate if estimate else float('nan'):.2f}",
            flush=True,
        )
    summary = {key: weighted[key] / weighted["dense"] for key in ("estimate", "measured")}
    summary["efficiency"] = summary["measured"] / summary["estimate"] if summary["estimate"] else float("nan")
    print(
        f"weighted by the dense step's time: saved {summary['measured']:.1%}, estimate {summary['estimate']:.1%}, "
        f"measured / estimate {summary['efficiency']:.2f}"
    )
    return summary


if __name__ == "__main__":
    main()
