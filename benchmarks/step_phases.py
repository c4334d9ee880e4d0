"""Where a training step's time goes, without a profiler: forward, backward and optimizer wall time and the minor
page faults of dense and SAT steps, interleaved (dense, SAT, dense, ...), medians per arm.

``torch.profiler`` (``speed.py --profile``) changes what it measures on a CPU: under it, memory-bound kernels (a
full-size gradient's copy, the fills) took up to 30x their time in plain steps. This script reads only the clock and
the process's page-fault counter (``getrusage``), so it tells whether a SAT step touches fresh memory that a dense
step does not. The case and the SAT config come from ``speed.py``'s flags (``--cases`` takes one case here)::

    .venv/bin/python benchmarks/step_phases.py --variant full --rate 0.5 --rounds 8 --smollm2-batch 2x256
    .venv/bin/python benchmarks/step_phases.py --cases 7b-layer --layer-batch 1x2048 --rate 0.25 --rounds 3 \
        --sat '{"omit": ["mlp", "attention"], "dense_tokens": "none", "sparse_pass": "forward_backward"}'

The last line estimates by time what the rate can save on this machine: the MLP matmuls that the SAT step runs at
the kept width instead of the full one (each timed alone, on random operands of the step's shapes, times the
layers), as a share of the dense step: what an ideal sparse step, with no costs of its own, would save by its
matmuls. (It also skips some elementwise work of the omitted channels, and a matmul alone may run faster than inside
a step, so a measured saving can exceed it: it is an estimate, not a bound.) The FLOPs model counts the same
matmuls' share of all the step's matmul FLOPs, which overstates the share of the time wherever the rest of the step
(attention, norms, activations, the LM head's softmax, the optimizer) is not free. Printed for batches that do not
split (``--loss-tokens 1``) with only the MLP omitted.

``--pattern`` runs another sequence per round, e.g. ``DDDSSS`` (D: a dense step, S: a SAT step, E: an evaluation,
four no-grad forwards of a twice-larger batch in eval mode) and also reports each arm by the step before it: whether
a dense step right after SAT steps, or any step right after an evaluation, is slower.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from collections.abc import Callable

import speed
import torch

import peft_sat
from peft_sat.flops import StackShape
from peft_sat.selection import num_kept


def main(argv: list[str] | None = None) -> dict[float, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", default="full", choices=["full", "lora"])
    parser.add_argument("--rate", type=float, default=0.5, help="omission rate of the SAT arm")
    parser.add_argument("--rounds", type=int, default=8, help="measured rounds (one step per arm each)")
    parser.add_argument("--pattern", default="DS", help="one round: D dense step, S SAT step, E evaluation")
    parser.add_argument("--threads", type=int, default=2)
    args, speed_flags = parser.parse_known_args(argv)
    bench = speed.parse_args(["--cases", "smollm2", *speed_flags])  # the last --cases wins
    if len(bench.cases) != 1:
        parser.error(f"--cases: one case, got {bench.cases}")
    speed._tune_allocator(bench)
    torch.set_num_threads(args.threads)
    case = {"smollm2": speed.smollm2_case, "7b-layer": speed.layer_case}[bench.cases[0]](bench)
    model = speed.sat_model(case, args.variant, bench)
    state = peft_sat.get_sat_state(model)
    inputs = case.inputs(bench.device)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6, fused=True)
    if not args.pattern or set(args.pattern) - set("DSE") or not set(args.pattern) & set("DS"):
        parser.error(f"--pattern: letters D, S and E, at least one D or S, got {args.pattern!r}")
    eval_inputs = {key: torch.cat([value, value]) for key, value in inputs.items()}
    rates = {"D": 0.0, "S": args.rate}
    samples: dict[tuple[str, str], list[tuple[float, ...]]] = {}
    config = state.config
    time_matmuls: Callable[[], tuple[float, float]] | None = None  # after the warm-up round, if it applies
    matmul_samples: list[tuple[float, float]] = []
    previous = ""
    for round_index in range(args.rounds + 1):  # round 0 warms up
        for letter in args.pattern:
            if letter == "E":
                model.eval()
                with torch.no_grad():
                    for _ in range(4):
                        case.loss(model, eval_inputs)
                model.train()
                previous = letter
                continue
            state.set_omission_rate(rates[letter])
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
                row = (forward - start, backward - forward, end - backward, end - start, faults)
                samples.setdefault((letter, previous), []).append(row)
            previous = letter
        if round_index == 0 and "S" in args.pattern and list(config.omit) == ["mlp"]:
            split = any(state.dense_fractions)  # the SAT forwards split the batch: not what the matmuls model
            if not split:
                time_matmuls = sliced_mlp_matmuls(
                    case.shape, config.sparse_pass, args.variant == "full", args.rate, bench.device
                )
                time_matmuls()  # warm-up
        elif time_matmuls is not None:
            matmul_samples.append(time_matmuls())
    names = ("forward_ms", "backward_ms", "optimizer_ms", "step_ms", "page_faults")
    labels = {"D": "dense", "S": f"r = {args.rate:g}", "E": "an evaluation"}

    def medians_of(rows: list[tuple[float, ...]]) -> dict[str, float]:
        return {name: statistics.median(r[i] for r in rows) * (1 if i == 4 else 1e3) for i, name in enumerate(names)}

    batch = bench.smollm2_batch if case.name == "smollm2" else bench.layer_batch
    print(
        f"{case.name} {args.variant}, batch {batch[0]} x {batch[1]}, {args.threads} threads, allocator "
        f"{bench.cpu_allocator}, SATConfig overrides {bench.sat or 'none'}"
    )
    medians = {}
    for letter in "DS":
        rows = [row for (arm, _), values in samples.items() if arm == letter for row in values]
        if rows:
            medians[labels[letter]] = medians_of(rows)
            print(
                f"{labels[letter]}: "
                + ", ".join(f"{name} {value:.0f}" for name, value in medians[labels[letter]].items())
            )
    if len(samples) > len(medians):  # more than one predecessor per arm: each on its own line
        for (letter, before), rows in sorted(samples.items()):
            row = medians_of(rows)
            where = f"{labels[letter]} after {labels[before]} (n={len(rows)})"
            print(f"  {where}: step_ms {row['step_ms']:.0f}, page_faults {row['page_faults']:.0f}")
    if len(medians) < 2:
        return medians
    dense, sparse = medians["dense"], medians[labels["S"]]
    print(f"dense / SAT step time: {dense['step_ms'] / sparse['step_ms']:.3f}x")
    if not matmul_samples:
        return medians
    full, kept = (statistics.median(sample[i] for sample in matmul_samples) for i in range(2))
    saved = (full - kept) / dense["step_ms"]
    flops_ratio = speed._ideal(case, args.variant, args.rate, config, dense_fraction=0.0)
    print(
        f"MLP matmuls sliced at r = {args.rate:g}, each alone (every round): {full:.0f} ms per step at full width, "
        f"{kept:.0f} ms kept: an ideal sparse step saves about {saved:.1%} of the dense step (ideal time ratio "
        f"{1 / (1 - saved):.3f}x; FLOPs ratio {flops_ratio:.3f}x, {1 - 1 / flops_ratio:.1%} saved); measured "
        f"{1 - sparse['step_ms'] / dense['step_ms']:.1%}"
    )
    return medians


def sliced_mlp_matmuls(
    shape: StackShape, sparse_pass: str, weights_train: bool, rate: float, device: torch.device
) -> Callable[[], tuple[float, float]]:
    """A function timing, once, the MLP matmuls of a training step that ``sparse_pass`` slices, at the full
    intermediate width I and at the kept width k, each (a x b) @ (b x c) alone on random operands and the two widths
    in turn; it returns (ms at I, ms at k), summed over the layers.

    Per layer, with N tokens and H hidden (c = I or k)::

        forward      x W_gate^T, x W_up^T: (N, H) @ (H, c)      h W_down^T: (N, c) @ (c, H)
        input grads  g W_down: (N, H) @ (H, c)                  dG W_gate, dU W_up: (N, c) @ (c, H)
        weight grads g^T h: (H, N) @ (N, c)                     dG^T x, dU^T x: (c, N) @ (N, H)

    ``sparse_pass``: "forward_backward" slices all three, "backward" the gradients, "weight_grad" the weight
    gradients; frozen base weights (LoRA) have none.
    """
    n, h = shape.tokens, shape.hidden

    def matmuls(c: int) -> list[tuple[int, int, int]]:
        forward = [(n, h, c), (n, h, c), (n, c, h)]
        input_grads = [(n, h, c), (n, c, h), (n, c, h)]
        weight_grads = [(h, n, c), (c, n, h), (c, n, h)] if weights_train else []
        return {
            "forward_backward": forward + input_grads + weight_grads,
            "backward": input_grads + weight_grads,
            "weight_grad": weight_grads,
        }[sparse_pass]

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the steps' autocast dtype (``speed.py``)

    def operands(c: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [
            (torch.randn(a, b, device=device, dtype=dtype), torch.randn(b, c_, device=device, dtype=dtype))
            for a, b, c_ in matmuls(c)
        ]

    widths = (operands(shape.intermediate), operands(num_kept(shape.intermediate, rate)))

    def time_once() -> tuple[float, float]:
        totals = [0.0, 0.0]
        for pairs in zip(*widths, strict=True):
            for width, (left, right) in enumerate(pairs):
                speed._timing.synchronize(device)
                start = time.perf_counter()
                torch.mm(left, right)
                speed._timing.synchronize(device)
                totals[width] += time.perf_counter() - start
        return 1e3 * shape.layers * totals[0], 1e3 * shape.layers * totals[1]

    return time_once


if __name__ == "__main__":
    main()
