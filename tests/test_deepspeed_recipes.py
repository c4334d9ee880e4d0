"""The shipped DeepSpeed launcher configs run SAT training the way users start it:
``accelerate launch --config_file recipes/accelerate_configs/deepspeed_zero{2,3}.yaml recipes/sft.py ...`` (TRL's
``SFTTrainer`` + ``SATCallback`` + DeepSpeed), full-parameter SAT and SAT + LoRA, on the tiny offline chat Llama of
the ``tiny_model_dir`` fixture with the recipe tests' 6-step arguments. Only what a CPU needs comes from the command
line (``--num_processes 2``, ``DS_ACCELERATOR=cpu``); the YAML files stay as GPU users get them. Each run must really
be DeepSpeed at the config's ZeRO stage with 2 processes, log the SAT metrics, finish with finite losses and save
weights that load (under ZeRO-3: gathered, not empty shards). Before the recipes evaluated under DeepSpeed inside
``train()``, both configs failed before step 1. Engine-level equality with a single-process run is
``tests/test_deepspeed.py``. Skipped without DeepSpeed (``pip install -e ".[deepspeed]"``)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from sat_testing import TINY_RECIPE_ARGS, TINY_RECIPE_LADDER, free_port

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("deepspeed") is None,
        reason="deepspeed is not installed (optional extra: pip install -e '.[deepspeed]'); "
        "the DeepSpeed launcher configs cannot run without it",
    ),
    pytest.mark.slow,  # every run starts two processes that each import torch, transformers and DeepSpeed
]

ROOT = Path(__file__).resolve().parent.parent
STEPS = len(TINY_RECIPE_LADDER)  # TINY_RECIPE_ARGS run 6 steps of batch 2 per process: 4 per optimizer step


def _launch(config: str, model_dir: Path, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "DS_ACCELERATOR": "cpu",  # DeepSpeed's CPU accelerator: CPU tensors, gloo
        "OMP_NUM_THREADS": "1",  # two processes share the cores
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    launcher = [sys.executable, "-m", "accelerate.commands.launch"]
    launcher += ["--config_file", str(ROOT / "recipes" / "accelerate_configs" / f"{config}.yaml")]
    launcher += ["--num_processes", "2", "--main_process_port", str(free_port())]
    paths = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out)]
    command = [*launcher, str(ROOT / "recipes" / "sft.py"), *paths, *TINY_RECIPE_ARGS, *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


def _check_saved_weights(variant: str, model_dir: Path, out: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    initial = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    if variant == "full":
        saved = load_file(out / "model.safetensors")
        # every weight, at its full shape: ZeRO-3 saves empty shards unless it gathers them on save
        assert set(saved) == set(initial), sorted(set(saved) ^ set(initial))
        for name, value in saved.items():
            assert value.shape == initial[name].shape and value.numel() > 0, name
            assert torch.isfinite(value).all(), name
        assert any(not torch.equal(saved[n], initial[n]) for n in saved), "the saved model is the untrained one"
        model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, without peft_sat
    else:
        saved = load_file(out / "adapter_model.safetensors")
        assert saved and all(value.numel() > 0 and torch.isfinite(value).all() for value in saved.values())
        lora_b = [value for name, value in saved.items() if "lora_B" in name]
        assert lora_b and all(value.abs().sum() > 0 for value in lora_b), "LoRA B (zero at init) did not train"
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), out)
    ids = torch.arange(2, 14).unsqueeze(0)
    with torch.no_grad():
        assert math.isfinite(model(input_ids=ids, labels=ids).loss.item())


CASES = [
    ("deepspeed_zero2", "full"),
    ("deepspeed_zero2", "lora"),
    ("deepspeed_zero3", "full"),
    ("deepspeed_zero3", "lora"),
]


@pytest.mark.parametrize("config,variant", CASES, ids=[f"{c.split('_')[1]}-{v}" for c, v in CASES])
def test_deepspeed_config_runs_sat_recipe(config, variant, tiny_model_dir, chat_file, tmp_path):
    recipe_config = ROOT / "recipes" / "sft" / f"config_{variant}.yaml"  # the shipped variant; the command line wins
    result = _launch(config, tiny_model_dir, chat_file, tmp_path, "--config", str(recipe_config))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    # really DeepSpeed with 2 processes, at the config's stage (not N single-process runs, not plain DDP)
    assert metrics["distributed_type"] == "DEEPSPEED", metrics["distributed_type"]
    assert metrics["num_processes"] == 2 and metrics["zero_stage"] == int(config[-1])
    assert metrics["variant"] == variant and metrics["global_step"] == STEPS

    steps = [entry for entry in metrics["log_history"] if "loss" in entry]
    assert len(steps) == STEPS
    for entry in steps:
        assert {"sat/omission_rate", "sat/kept_fraction", "sat/flops_saved_fraction"} <= set(entry), entry
        assert math.isfinite(entry["loss"]), entry
    assert [entry["sat/omission_rate"] for entry in steps] == pytest.approx(TINY_RECIPE_LADDER)
    assert 0 < metrics["flops_saved_fraction_estimate"] < 1
    assert math.isfinite(metrics["train_loss"])
    assert math.isfinite(metrics["eval_loss_before"]) and math.isfinite(metrics["eval_loss_after"])
    assert (tmp_path / "training_curves.png").is_file()

    _check_saved_weights(variant, tiny_model_dir, tmp_path)
