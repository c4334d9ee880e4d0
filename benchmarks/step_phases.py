"""Where a SmolLM2 training step's time goes, without a profiler: forward, backward and optimizer wall time and the
minor page faults of dense and SAT steps, interleaved (dense, SAT, dense, ...), medians per arm.

``torch.profiler`` (``speed.py --profile``) changes what it measures on a CPU: under it, memory-bound kernels (a
full-size gradient's copy, the fills) took up to 30x their time in plain steps. This script reads only the clock and
the process's page-fault counter (``getrusage``), so it tells whether a SAT step touches fresh memory that a dense
step does not.

    .venv/bin/python benchmarks/step_phases.py --variant full --rate 0.5 --batch 2x256 --rounds 8
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import speed
import torch

import peft_sat


def main(argv: list[str] | None = None) -> dict[float, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="full", choices=["full", "lora"])
    parser.add_argument("--rate", type=float, default=0.5, help="omission rate of the SAT arm")
    parser.add_argument("--batch", default="2x256", help="sequences x tokens per step")
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds (one step per arm each)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cpu-allocator", default="tuned", choices=["tuned", "default"])
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run on a tiny random model")
    args = parser.parse_args(argv)
    flags = ["--cases", "smollm2", "--smollm2-batch", args.batch, "--cpu-allocator", args.cpu_allocator]
    bench = speed.parse_args(flags + (["--tiny"] if args.tiny else []))
    speed._tune_allocator(bench)
    torch.set_num_threads(args.threads)
    case = speed.smollm2_case(bench)
    model = speed.sat_model(case, args.variant, bench)
    state = peft_sat.get_sat_state(model)
    inputs = case.inputs(bench.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
    samples: dict[float, list[tuple[float, ...]]] = {0.0: [], args.rate: []}
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for rate in samples:
            state.set_omission_rate(rate)
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            loss = case.loss(model, inputs)
            forward = time.perf_counter()
            loss.backward()
            backward = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            if round_index:
                samples[rate].append((forward - start, backward - forward, end - backward, end - start, faults))
    names = ("forward_ms", "backward_ms", "optimizer_ms", "step_ms", "page_faults")
    medians = {
        rate: {name: statistics.median(s[i] for s in rows) * (1 if i == 4 else 1e3) for i, name in enumerate(names)}
        for rate, rows in samples.items()
    }
    print(f"SmolLM2 {args.variant}, batch {args.batch}, {args.threads} threads, allocator {bench.cpu_allocator}")
    for rate, row in medians.items():
        cells = ", ".join(f"{name} {value:.0f}" for name, value in row.items())
        print(f"{'dense' if rate == 0 else f'r = {rate:g}'}: {cells}")
    dense, sparse = medians[0.0], medians[args.rate]
    print(f"dense / SAT step time: {dense['step_ms'] / sparse['step_ms']:.3f}x")
    return medians


if __name__ == "__main__":
    main()
