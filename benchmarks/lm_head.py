"""TRL's fused LM head on a CPU: its own function (the backward computes the logits again) against the recipes'
``LogProbWithSavedGradient`` (the forward keeps the logits' gradient), interleaved, medians per arm.

The loss of ``SFTTrainer`` at SmolLM2-135M's head shape, with the outputs it asks for (log-probabilities, entropy,
top-1), at the positions of 4 blocks of 128 tokens (the recipes' default CPT micro-batch); ``--smollm2-batch``
times whole dense steps (forward and backward) of the real SmolLM2-135M through TRL's fused forward instead::

    .venv/bin/python benchmarks/lm_head.py --positions 508 --rounds 6
    .venv/bin/python benchmarks/lm_head.py --smollm2-batch 4x128 --rounds 6
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from trl.kernels.chunked_logprob import ChunkedLogProbFunction

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `recipes` is a folder of scripts
from recipes.cpu_lm_head import _SavedGradientOnCPU  # noqa: E402

TRL_CHUNK = 32768  # TRL's vocabulary tile in `SFTTrainer`
OUTPUTS = ("log_probs", "entropy", "is_top1")  # what `SFTTrainer` requests


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--positions", type=int, default=508)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--vocab", type=int, default=49152)
    parser.add_argument("--rounds", type=int, default=6, help="measured rounds after one warm-up round")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smollm2-batch", default=None, help="BxS: whole dense steps of SmolLM2-135M instead")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    arms = {"trl": ChunkedLogProbFunction, "saved_gradient": _SavedGradientOnCPU(ChunkedLogProbFunction)}
    run_arm = model_step(args.smollm2_batch, arms) if args.smollm2_batch else head_only(args, arms)
    times: dict[str, dict[str, list[float]]] = {name: {"forward": [], "backward": []} for name in arms}
    for round_ in range(args.rounds + 1):
        for name in arms:
            forward, backward = run_arm(name)
            if round_:
                times[name]["forward"].append(forward)
                times[name]["backward"].append(backward)
    medians = {name: {k: statistics.median(v) * 1e3 for k, v in phases.items()} for name, phases in times.items()}
    for phases in medians.values():
        phases["step"] = phases["forward"] + phases["backward"]
    shape = (
        f"SmolLM2-135M dense steps, {args.smollm2_batch} tokens"
        if args.smollm2_batch
        else (f"LM head, {args.positions} positions x hidden {args.hidden} x vocabulary {args.vocab}")
    )
    print(f"{shape}, {args.threads} threads, medians of {args.rounds} interleaved rounds")
    for name, phases in medians.items():
        print(f"{name:15s} " + "  ".join(f"{k} {v:7.1f} ms" for k, v in phases.items()))
    print(f"saved_gradient / trl: {medians['saved_gradient']['step'] / medians['trl']['step']:.2f}x")
    return medians


def head_only(args: argparse.Namespace, arms: dict[str, Any]) -> Callable[[str], tuple[float, float]]:
    torch.manual_seed(0)
    hidden = torch.randn(args.positions, args.hidden, requires_grad=True)
    weight = (torch.randn(args.vocab, args.hidden) * 0.05).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.positions,))

    def run(name: str) -> tuple[float, float]:
        start = time.perf_counter()
        log_p = arms[name].apply(hidden, weight, None, targets, 1.0, TRL_CHUNK, None, 1.0, OUTPUTS)[0]
        middle = time.perf_counter()
        (-log_p.mean()).backward()
        hidden.grad = weight.grad = None
        return middle - start, time.perf_counter() - middle

    return run


def model_step(batch: str, arms: dict[str, Any]) -> Callable[[str], tuple[float, float]]:
    """Dense training steps of SmolLM2-135M (``speed.py``'s case) through TRL's fused forward, labelled positions
    only as in the recipes, with TRL's head function switched per arm."""
    import speed
    from trl.trainer import utils as trl_utils

    from recipes.cpu_lm_head import score_labelled_positions_only

    args = speed.parse_args(["--cases", "smollm2", "--smollm2-batch", batch])
    speed._tune_allocator(args)
    case = speed.smollm2_case(args)
    model = case.build(False).train()
    trl_utils.add_fused_lm_head(model, outputs=OUTPUTS)
    score_labelled_positions_only()
    inputs = case.inputs(torch.device("cpu"))

    def run(name: str) -> tuple[float, float]:
        trl_utils._ChunkedLogProbFunction = arms[name]
        start = time.perf_counter()
        out = model(**inputs, fused_lm_head=True)
        loss = -out.log_probs.sum() / out.label_mask.sum()
        middle = time.perf_counter()
        loss.backward()
        model.zero_grad(set_to_none=True)
        return middle - start, time.perf_counter() - middle

    return run


if __name__ == "__main__":
    main()
