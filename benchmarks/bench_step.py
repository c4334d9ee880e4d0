"""Time whole training steps, dense vs SAT, interleaved in one run, next to the ideal FLOPs ratio.

A step is forward + backward + ``AdamW.step()`` + ``zero_grad()`` on the same batch for both models (fp32, AdamW
``fused`` by default: the transformers Trainer's default ``adamw_torch_fused``). Per variant two models start from
the same weights: the dense baseline is the plain model (full-parameter: the transformers model with every parameter
trainable and no peft_sat code at all; LoRA: the plain PEFT LoRA model) and the SAT model is the same thing with SAT
at ``--rate``. Steps alternate dense / SAT (the order flips every round so that neither always runs on a warmer
cache), warm-up steps are discarded and medians are reported.

Columns:
    dense ms, SAT ms   median wall time of one training step
    ratio              dense / SAT (the measured speed-up)
    ideal              training FLOPs dense / SAT, counted analytically (see ``training_flops``)
    eff                ratio / ideal
    select %           median share of the SAT step spent in scoring + selection (``SATBlockMixin._sat_select``)
    others %           median share of the machine's CPUs that OTHER processes used during the kept steps
    redone             measured steps discarded because others used more than ``--max-foreign-load``

Why "others %": with torch using every core, a busy neighbour process makes each parallel region wait for a
descheduled thread; the step time then counts parallel regions, not FLOPs (measured on 2 cores next to one busy
process: dense full-parameter 7.4 s instead of 1.9 s). Such steps measure the neighbour, not SAT; they are redone,
and when they cannot be avoided the table says so. ``--threads 1`` is far less sensitive to one neighbour.

Example (the issue's shape, the default; a few minutes on 2 quiet CPU cores):
    .venv/bin/python benchmarks/bench_step.py
    .venv/bin/python benchmarks/bench_step.py --tiny          # seconds: smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing  # noqa: E402
from _flops import StackShape, ideal_speedup  # noqa: E402

import peft_sat  # noqa: E402

VARIANTS = ("full", "lora")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 16
TINY = dict(hidden=64, intermediate=176, heads=4, kv_heads=2, layers=2, vocab=128, batch=1, seq=32, steps=3, warmup=1)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size")
    parser.add_argument("--intermediate", type=int, default=2816, help="MLP intermediate size")
    parser.add_argument("--heads", type=int, default=16, help="query heads")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (GQA)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers")
    parser.add_argument("--vocab", type=int, default=2048, help="vocabulary size")
    parser.add_argument("--batch", type=int, default=2, help="sequences per step")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence")
    parser.add_argument("--rate", type=float, default=0.5, help="SAT omission rate r")
    parser.add_argument("--head-granularity", default="kv_group", choices=["kv_group", "q_head"])
    parser.add_argument("--importance", default="maxip", choices=["uniform", "magnitude", "wanda", "maxip"])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per model and variant")
    parser.add_argument("--warmup", type=int, default=2, help="discarded steps per model and variant")
    parser.add_argument(
        "--max-foreign-load",
        type=float,
        default=0.05,
        help="repeat a step when other processes used more than this share of the CPUs during it, beyond the cores "
        "that torch's threads leave free (Linux)",
    )
    parser.add_argument(
        "--max-rounds",
        type=int,
        default=None,
        help="stop repeating disturbed steps after this many dense+SAT rounds (default 3 x steps) and keep the "
        "least disturbed ones",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument(
        "--optimizer",
        default="fused",
        choices=["fused", "foreach", "for-loop"],
        help="AdamW implementation for both models; 'fused' is the transformers Trainer default (adamw_torch_fused)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run on a tiny model (smoke test)")
    parser.add_argument("--json", default=None, help="write the rows and settings to this path")
    args = parser.parse_args(argv)
    if args.tiny:
        for name, value in TINY.items():
            setattr(args, name, value)
    if args.max_rounds is None:
        args.max_rounds = 3 * args.steps
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"`--variants` must be a subset of {list(VARIANTS)}, got {unknown}.")
    return args


# ---- models --------------------------------------------------------------------------------------------------------


def build_base(args: argparse.Namespace) -> LlamaForCausalLM:
    config = LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_hidden_layers=args.layers,
        vocab_size=args.vocab,
        max_position_embeddings=max(args.seq, 128),
        use_cache=False,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).float().train()


def sat_config(args: argparse.Namespace) -> peft_sat.SATConfig:
    return peft_sat.SATConfig(
        omission_rate=args.rate, head_granularity=args.head_granularity, importance=args.importance
    )


def lora_model(base: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=LORA_RANK, lora_alpha=32, target_modules=LORA_TARGETS))
    for name, param in model.named_parameters():  # non-zero B: the adapter path does real work in both models
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)
    return model


def make_pair(variant: str, args: argparse.Namespace) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(dense baseline, SAT model), starting from identical weights."""
    base = build_base(args)
    if variant == "full":
        dense = copy.deepcopy(base)  # the plain transformers model: the honest baseline
        sat = get_peft_model(base, sat_config(args))
    else:
        dense = lora_model(copy.deepcopy(base))
        sat = peft_sat.apply_sat(lora_model(base), sat_config(args))
    return dense.train(), sat.train()


# ---- timing --------------------------------------------------------------------------------------------------------


def make_step(model: torch.nn.Module, batch: torch.Tensor, optimizer_kind: str):
    implementation = {"fused": {"fused": True}, "foreach": {"foreach": True}, "for-loop": {"foreach": False}}
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, **implementation[optimizer_kind])

    def step() -> float:
        start = time.perf_counter()
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    return step


@dataclass
class Row:
    variant: str
    dense_ms: float
    sat_ms: float
    ratio: float
    ideal: float
    efficiency: float
    select_share: float
    steps_redone: int  # measured steps discarded because other processes competed for the CPUs
    foreign_load: float | None  # median share of the CPUs used by other processes during the kept steps
    dense_ms_all: list[float]
    sat_ms_all: list[float]


def run_variant(variant: str, args: argparse.Namespace) -> Row:
    dense, sat = make_pair(variant, args)
    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    steps = {"dense": make_step(dense, batch, args.optimizer), "sat": make_step(sat, batch, args.optimizer)}
    kept, redone = _timing.interleave(
        steps,
        measured=args.steps,
        warmup=args.warmup,
        max_rounds=args.max_rounds,
        allowed_foreign=args.allowed_foreign_load,
    )
    dense_ms = 1e3 * statistics.median(s.seconds for s in kept["dense"])
    sat_ms = 1e3 * statistics.median(s.seconds for s in kept["sat"])
    shape = StackShape.from_config(dense.config, args.batch, args.seq)
    ideal = ideal_speedup(shape, variant, args.rate, args.head_granularity)
    return Row(
        variant=variant,
        dense_ms=dense_ms,
        sat_ms=sat_ms,
        ratio=dense_ms / sat_ms,
        ideal=ideal,
        efficiency=dense_ms / sat_ms / ideal,
        select_share=statistics.median(s.select_share for s in kept["sat"]),
        steps_redone=redone,
        foreign_load=statistics.median(s.foreign_load for s in kept["dense"] + kept["sat"])
        if _timing.ForeignLoad().available
        else None,
        dense_ms_all=[round(1e3 * s.seconds, 1) for s in kept["dense"]],
        sat_ms_all=[round(1e3 * s.seconds, 1) for s in kept["sat"]],
    )


# ---- report --------------------------------------------------------------------------------------------------------


def format_table(rows: list[Row], args: argparse.Namespace) -> str:
    header = (
        f"{'variant':<8} {'dense ms':>9} {'SAT ms':>9} {'ratio':>6} {'ideal':>6} {'eff':>5} {'select %':>9} "
        f"{'others %':>9} {'redone':>6}"
    )
    lines = [
        f"SAT step benchmark: hidden {args.hidden}, intermediate {args.intermediate}, heads {args.heads}/"
        f"{args.kv_heads}, layers {args.layers}, vocab {args.vocab}, batch {args.batch} x {args.seq}, "
        f"r = {args.rate}, {args.head_granularity}, {args.importance}",
        f"fp32, AdamW ({args.optimizer}), {torch.get_num_threads()} threads, torch {torch.__version__}; median of "
        f"{args.steps} interleaved steps after {args.warmup} warm-up; steps redone when other processes used "
        f"> {100 * args.allowed_foreign_load:.0f}% of the CPUs",
        header,
        "-" * len(header),
    ]
    for row in rows:
        others = "n/a" if row.foreign_load is None else f"{100 * row.foreign_load:.1f}%"
        lines.append(
            f"{row.variant:<8} {row.dense_ms:>9.1f} {row.sat_ms:>9.1f} {row.ratio:>5.2f}x {row.ideal:>5.2f}x "
            f"{row.efficiency:>5.2f} {100 * row.select_share:>8.1f}% {others:>9} {row.steps_redone:>6}"
        )
    disturbed = [row.variant for row in rows if (row.foreign_load or 0.0) > args.allowed_foreign_load]
    if disturbed:
        lines.append(
            f"WARNING: other processes kept the CPUs busy during {', '.join(disturbed)} (see 'others %'): these "
            f"timings measure contention, not SAT; rerun on a quiet machine (or raise --max-rounds)."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.allowed_foreign_load = _timing.allowed_foreign_load(args.max_foreign_load)
    rows = [run_variant(variant, args) for variant in args.variants]
    print(format_table(rows, args))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"settings": vars(args), "rows": [asdict(row) for row in rows]}, handle, indent=2)
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
