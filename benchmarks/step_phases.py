"""Where a training step's time goes, without a profiler: forward, backward and optimizer wall time and the minor
page faults of dense and SAT steps, interleaved (dense, SAT, dense, ...), medians per arm.

``torch.profiler`` (``speed.py --profile``) changes what it measures on a CPU: under it, memory-bound kernels (a
full-size gradient's copy, the fills) took up to 30x their time in plain steps. This script reads only the clock and
the process's page-fault counter (``getrusage``), so it tells whether a SAT step touches fresh memory that a dense
step does not. The case and the SAT config come from ``speed.py``'s flags (``--cases`` takes one case here)::

    .venv/bin/python benchmarks/step_phases.py --variant full --rate 0.5 --rounds 8 --smollm2-batch 2x256
    .venv/bin/python benchmarks/step_phases.py --cases 7b-layer --layer-batch 1x2048 --rate 0.25 --rounds 3 \
        --sat '{"omit": ["mlp", "attention"], "dense_tokens": "none", "sparse_pass": "forward_backward"}'

The last line estimates by time what the rate can save on this machine: the matmuls that the SAT step runs on a
smaller operand (each timed alone, on random operands of the step's shapes, times the layers), as a share of the
dense step: what an ideal sparse step, with no costs of its own, would save by its matmuls. Without a split, the MLP
matmuls at the kept width instead of the full one (only the MLP omitting units); on batches that split with
``context_tokens="forward_only"`` (``--loss-tokens`` below 1), the backward matmuls over the dense rows instead of
every row, the attention's included. (The step also skips other work, elementwise or memory-bound, and a matmul
alone may run faster than inside a step, so a measured saving can exceed it: it is an estimate, not a bound.) The
FLOPs model counts the same matmuls' share of all the step's matmul FLOPs, which overstates the share of the time
wherever the rest of the step (attention, norms, activations, the LM head's softmax, the optimizer) is not free.

``--pattern`` runs another sequence per round, e.g. ``DDDSSS`` (D: a dense step, S: a SAT step, E: an evaluation,
four no-grad forwards of a twice-larger batch in eval mode) and also reports each arm by the step before it: whether
a dense step right after SAT steps, or any step right after an evaluation, is slower.
"""

from __future__ import annotations

import argparse
import collections
import resource
import statistics
import time
from collections.abc import Callable

import _timing
import speed
import torch
from _speed_cases import head_rows, ideal_ratio, layer_case, sat_model, smollm2_case

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
    parser.add_argument(
        "--backward-nodes", type=int, default=0, help="also print the backward's time by autograd node, top N types"
    )
    args, speed_flags = parser.parse_known_args(argv)
    bench = speed.parse_args(["--cases", "smollm2", *speed_flags])  # the last --cases wins
    if len(bench.cases) != 1:
        parser.error(f"--cases: one case, got {bench.cases}")
    speed._tune_allocator(bench)
    torch.set_num_threads(args.threads)
    case = {"smollm2": smollm2_case, "7b-layer": layer_case}[bench.cases[0]](bench)
    model = sat_model(case, args.variant, bench)
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
    dense_fraction = 0.0
    matmul_samples: list[tuple[float, float]] = []
    node_samples: dict[str, list[collections.Counter]] = {}
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
            by_node = node_times(loss) if args.backward_nodes and round_index else None
            loss.backward()
            backward = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            if round_index:
                row = (forward - start, backward - forward, end - backward, end - start, faults)
                samples.setdefault((letter, previous), []).append(row)
                if by_node is not None:
                    node_samples.setdefault(letter, []).append(by_node)
            previous = letter
        if round_index == 0 and "S" in args.pattern:
            time_matmuls, dense_fraction = saved_matmuls(case.shape, state, args.variant == "full", args.rate, bench)
            if time_matmuls is not None:
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
    if node_samples:
        print_node_times(node_samples, labels, args.backward_nodes)
    if len(medians) < 2:
        return medians
    dense, sparse = medians["dense"], medians[labels["S"]]
    print(f"dense / SAT step time: {dense['step_ms'] / sparse['step_ms']:.3f}x")
    if matmul_samples:
        live = state.live_fractions[-1] if state.live_fractions else 1.0
        rows = head_rows(case, bench)
        flops_ratio = ideal_ratio(case, args.variant, args.rate, config, dense_fraction, rows, live)
        print_saving_estimate(dense, sparse, matmul_samples, flops_ratio, args.rate, dense_fraction)
    return medians


def print_saving_estimate(
    dense: dict[str, float],
    sparse: dict[str, float],
    matmul_samples: list[tuple[float, float]],
    flops_ratio: float,
    rate: float,
    dense_fraction: float,
) -> None:
    """The saving the matmuls timed alone allow (medians over the rounds), next to the FLOPs model's and the
    measured one; for a split step also the bound of its dense backward shrunk with the rows."""
    full, kept = (statistics.median(sample[i] for sample in matmul_samples) for i in range(2))
    saved = (full - kept) / dense["step_ms"]
    if dense_fraction:
        what = (
            f"Backward matmuls of the context rows at r = {rate:g} ({dense_fraction:.0%} of the positions dense), "
            f"each alone (every round): {full:.0f} ms per step over every row, {kept:.0f} ms over the dense rows: an "
            "ideal split step"
        )
    else:
        what = (
            f"MLP matmuls sliced at r = {rate:g}, each alone (every round): {full:.0f} ms per step at full width, "
            f"{kept:.0f} ms kept: an ideal sparse step"
        )
    print(
        f"{what} saves about {saved:.1%} of the dense step (ideal time ratio {1 / (1 - saved):.3f}x; FLOPs ratio "
        f"{flops_ratio:.3f}x, {1 - 1 / flops_ratio:.1%} saved); measured {1 - sparse['step_ms'] / dense['step_ms']:.1%}"
    )
    if dense_fraction:  # the split skips backward work only: the dense step's own phases bound it
        scaled = (1 - dense_fraction) * dense["backward_ms"] / dense["step_ms"]
        print(
            f"A split step whose backward shrank with its dense rows, and nothing else changed, would save "
            f"{scaled:.1%} (the dense backward's {dense['backward_ms']:.0f} ms x {1 - dense_fraction:.2f}); the SAT "
            f"step's forward took {sparse['forward_ms'] - dense['forward_ms']:+.0f} ms, its backward "
            f"{sparse['backward_ms'] - dense_fraction * dense['backward_ms']:+.0f} ms over that"
        )


def saved_matmuls(
    shape: StackShape, state: peft_sat.SATState, weights_train: bool, rate: float, bench
) -> tuple[Callable[[], tuple[float, float]] | None, float]:
    """The timer of the matmuls the SAT step skips, read from what its warm-up forwards did, and the share of the
    positions that ran dense (0: no split): the backward of the context rows when the batch split with
    ``context_tokens="forward_only"``; the MLP's sliced matmuls when it did not and only the MLP omits units; else
    (None, 0), a step this estimate does not model."""
    config = state.config
    dense_fraction = state.dense_fractions[-1] if state.dense_fractions else 0.0
    if dense_fraction and state.context_forward_only:
        dense_rows = round(dense_fraction * shape.tokens)
        head_split = state.head_split_forwards > 0
        return context_backward_matmuls(shape, weights_train, dense_rows, head_split, bench.device), dense_fraction
    if not any(state.dense_fractions) and list(config.omit) == ["mlp"]:
        return sliced_mlp_matmuls(shape, config.sparse_pass, weights_train, rate, bench.device), 0.0
    return None, 0.0


def node_times(loss: torch.Tensor) -> collections.Counter:
    """Hooks on every node of ``loss``'s graph that add each node's backward wall time, in seconds, to the returned
    counter under the node's type (``MmBackward0``, a custom function's ``...Backward``); gradient accumulation into
    leaves is left out. The hooks leave with the graph (freed by the backward). Two clock reads per node: a few
    percent of a step, in both arms alike; unlike ``torch.profiler``, memory-bound kernels keep their time."""
    totals: collections.Counter = collections.Counter()
    starts: dict[int, float] = {}
    seen, stack = set(), [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(next_node for next_node, _ in node.next_functions)
        if not node.name().endswith("AccumulateGrad"):
            _time_node(node, totals, starts)
    return totals


def _time_node(node, totals: collections.Counter, starts: dict[int, float]) -> None:
    key, name = id(node), node.name()

    def started(_grad_outputs):
        starts[key] = time.perf_counter()

    def finished(_grad_inputs, _grad_outputs):
        if key in starts:
            totals[name] += time.perf_counter() - starts.pop(key)

    node.register_prehook(started)
    node.register_hook(finished)


def print_node_times(samples: dict[str, list[collections.Counter]], labels: dict[str, str], top: int) -> None:
    """Per arm, the median backward ms of each node type over its steps, the types costing the most first."""
    names = {name for counters in samples.values() for counter in counters for name in counter}
    medians = {
        letter: {name: 1e3 * statistics.median(c[name] for c in counters) for name in names}
        for letter, counters in samples.items()
    }
    print("backward by autograd node, median ms per step: " + ", ".join(labels[letter] for letter in medians))
    for name in sorted(names, key=lambda n: -max(m[n] for m in medians.values()))[:top]:
        print(f"  {name}: " + " / ".join(f"{m[name]:.0f}" for m in medians.values()))


Matmul = tuple[int, int, int, int]  # (batch, a, b, c): a (batch, a, b) @ (batch, b, c) product


def sliced_mlp_matmuls(
    shape: StackShape, sparse_pass: str, weights_train: bool, rate: float, device: torch.device
) -> Callable[[], tuple[float, float]]:
    """A function timing, once, the MLP matmuls of a training step that ``sparse_pass`` slices, at the full
    intermediate width I and at the kept width k; it returns (ms at I, ms at k), summed over the layers.

    Per layer, with N tokens and H hidden (c = I or k)::

        forward      x W_gate^T, x W_up^T: (N, H) @ (H, c)      h W_down^T: (N, c) @ (c, H)
        input grads  g W_down: (N, H) @ (H, c)                  dG W_gate, dU W_up: (N, c) @ (c, H)
        weight grads g^T h: (H, N) @ (N, c)                     dG^T x, dU^T x: (c, N) @ (N, H)

    ``sparse_pass``: "forward_backward" slices all three, "backward" the gradients, "weight_grad" the weight
    gradients; frozen base weights (LoRA) have none.
    """
    n, h = shape.tokens, shape.hidden

    def matmuls(c: int) -> list[Matmul]:
        forward = [(1, n, h, c), (1, n, h, c), (1, n, c, h)]
        input_grads = [(1, n, h, c), (1, n, c, h), (1, n, c, h)]
        weight_grads = [(1, h, n, c), (1, c, n, h), (1, c, n, h)] if weights_train else []
        return {
            "forward_backward": forward + input_grads + weight_grads,
            "backward": input_grads + weight_grads,
            "weight_grad": weight_grads,
        }[sparse_pass]

    full, kept = matmuls(shape.intermediate), matmuls(num_kept(shape.intermediate, rate))
    return timed_pairs([(shape.layers, a, b) for a, b in zip(full, kept, strict=True)], device)


def context_backward_matmuls(
    shape: StackShape, weights_train: bool, dense_rows: int, head_split: bool, device: torch.device
) -> Callable[[], tuple[float, float]]:
    """A function timing, once, the backward matmuls that ``context_tokens="forward_only"`` runs over the dense
    rows only, over every row (N) and over the n dense rows; it returns (ms over N, ms over n), per step.

    Per layer, over r rows (q = heads x head_dim, kv = kv_heads x head_dim)::

        input grads   g_q W_q, g_o W_o, g_k W_k, g_v W_v     (r, q) @ (q, H), (r, H) @ (H, q), (r, kv) @ (kv, H) x 2
                      gate, up, down                          (r, I) @ (I, H) x 2, (r, H) @ (H, I)
        weight grads  q, o, gate, up, down (not k, v: the dense rows' attention reads every key and value)
        attention     per sequence and head, with s query slots (T, or the n / B dense rows a sequence holds):
                      dP = dO V^T (s, d) @ (d, T), dV = P^T dO (T, s) @ (s, d), dQ = dS K (s, T) @ (T, d),
                      dK = dS^T Q (T, s) @ (s, d)

    and once the LM head's (``head_split``: SAT's head ran the context rows without a graph): (r, V) @ (V, H), and
    (V, r) @ (r, H) when its weight trains. Frozen base weights (LoRA) have no weight gradients; the adapters'
    rank-r products are left out (small next to these).
    """
    h, i, v = shape.hidden, shape.intermediate, shape.vocab
    d = shape.head_dim or shape.hidden // shape.heads
    q, kv = shape.heads * d, shape.kv_heads * d
    slots = -(-dense_rows // shape.batch)

    def per_layer(r: int, s: int) -> list[Matmul]:
        input_grads = [(r, q, h), (r, h, q), (r, kv, h), (r, kv, h), (r, i, h), (r, i, h), (r, h, i)]
        weight_grads = [(q, r, h), (h, r, q), (i, r, h), (i, r, h), (h, r, i)] if weights_train else []
        heads, t = shape.batch * shape.heads, shape.seq
        attention = [(heads, s, d, t), (heads, t, s, d), (heads, s, t, d), (heads, t, s, d)]
        return [(1, *m) for m in input_grads + weight_grads] + attention

    def head(r: int) -> list[Matmul]:
        if not head_split or not v:
            return []
        return [(1, r, v, h)] + ([(1, v, r, h)] if weights_train else [])

    every, dense = (shape.tokens, shape.seq), (dense_rows, slots)
    pairs = [(shape.layers, a, b) for a, b in zip(per_layer(*every), per_layer(*dense), strict=True)]
    pairs += [(1, a, b) for a, b in zip(head(shape.tokens), head(dense_rows), strict=True)]
    return timed_pairs(pairs, device)


def timed_pairs(pairs: list[tuple[int, Matmul, Matmul]], device: torch.device) -> Callable[[], tuple[float, float]]:
    """A function timing each pair ``(count, a, b)`` of products once, ``a`` then ``b``, alone on random operands
    (the steps' autocast dtype); it returns (ms of every ``a``, ms of every ``b``), each times its ``count``."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the steps' autocast dtype (``speed.py``)

    def operands(batch: int, a: int, b: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
        left, right = (torch.randn(batch, *dims, device=device, dtype=dtype) for dims in ((a, b), (b, c)))
        return (left[0], right[0]) if batch == 1 else (left, right)

    tensors = [(count, operands(*a), operands(*b)) for count, a, b in pairs]

    def time_once() -> tuple[float, float]:
        totals = [0.0, 0.0]
        for count, *widths in tensors:
            for which, (left, right) in enumerate(widths):
                product = torch.mm if left.dim() == 2 else torch.bmm
                _timing.synchronize(device)
                start = time.perf_counter()
                product(left, right)
                _timing.synchronize(device)
                totals[which] += count * (time.perf_counter() - start)
        return 1e3 * totals[0], 1e3 * totals[1]

    return time_once


if __name__ == "__main__":
    main()
