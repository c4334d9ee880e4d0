"""Checkpoints: full-parameter SAT saves its trained weights; LoRA + SAT saves a plain LoRA checkpoint."""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from sat_testing import batch, lora_config, paper_config, tiny_model, train_step
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP

import peft_sat


def _train(model, steps: int = 2):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        train_step(model, batch(seed=step))
        optimizer.step()
    return model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied-embeddings"])
def test_full_parameter_round_trip(tmp_path, tied):
    sat = _train(get_peft_model(tiny_model(tie_word_embeddings=tied), paper_config(omission_rate=0.5)))
    trained = {k: v.clone() for k, v in sat.get_base_model().state_dict().items()}
    assert not torch.equal(
        trained["model.layers.0.mlp.up_proj.weight"], tiny_model().model.layers[0].mlp.up_proj.weight
    )
    sat.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "SAT" and config["train_base"] is True

    loaded = PeftModel.from_pretrained(tiny_model(seed=123, tie_word_embeddings=tied), tmp_path)
    assert isinstance(loaded.peft_config["default"], peft_sat.SATConfig)
    for key, value in loaded.get_base_model().state_dict().items():
        assert torch.equal(value, trained[key]), key

    unloaded = loaded.merge_and_unload()
    assert type(unloaded) is LlamaForCausalLM
    assert type(unloaded.model.layers[0].mlp) is LlamaMLP
    assert type(unloaded.model.layers[0].self_attn) is LlamaAttention
    for key, value in unloaded.state_dict().items():
        assert torch.equal(value, trained[key]), key


def test_loading_for_inference_freezes_the_base_and_for_training_does_not(tmp_path):
    get_peft_model(tiny_model(), paper_config(omission_rate=0.5)).save_pretrained(tmp_path)
    total = sum(p.numel() for p in tiny_model().parameters())

    frozen = PeftModel.from_pretrained(tiny_model(), tmp_path)  # is_trainable=False, PEFT's default
    assert frozen.get_nb_trainable_parameters() == (0, total)
    assert not any(p.requires_grad for p in frozen.parameters()) and not frozen.training

    trainable = PeftModel.from_pretrained(tiny_model(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == (total, total)
    assert trainable.peft_config["default"].inference_mode is False


def test_saved_files_say_to_import_peft_sat_first(tmp_path, recwarn):
    model = get_peft_model(tiny_model(), paper_config(omission_rate=0.5))
    model.save_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # saving again does not repeat the note
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "`import peft_sat`" in config["_comment"] and "KeyError: 'SAT'" in config["_comment"]
    card = (tmp_path / "README.md").read_text()
    assert "library_name: peft" in card and card.count("import peft_sat  # registers") == 1

    recwarn.clear()
    loaded = PeftModel.from_pretrained(tiny_model(), tmp_path)
    assert isinstance(loaded.peft_config["default"], peft_sat.SATConfig)
    assert isinstance(PeftConfig.from_pretrained(tmp_path), peft_sat.SATConfig)
    assert not [w for w in recwarn if "_comment" in str(w.message)], "PEFT must not warn about the note"

    # What the note prevents, and that its instruction works: a fresh process without and then with the import.
    script = f"""
from peft import PeftModel
from transformers import AutoModelForCausalLM
base = AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r})
try:
    PeftModel.from_pretrained(base, {str(tmp_path)!r})
except KeyError as error:
    print("without:", error)
import peft_sat
print("with:", type(PeftModel.from_pretrained(base, {str(tmp_path)!r}).peft_config["default"]).__name__)
"""
    tiny_model().save_pretrained(tmp_path / "base")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "without: 'SAT'" in result.stdout and "with: SATConfig" in result.stdout, result.stdout


def test_unload_returns_plain_model_with_trained_weights():
    sat = _train(get_peft_model(tiny_model(), paper_config(omission_rate=0.5)), steps=1)
    weight = sat.get_base_model().model.layers[1].mlp.down_proj.weight.clone()
    plain = sat.unload()
    assert type(plain.model.layers[1].mlp) is LlamaMLP and not hasattr(plain, "peft_config")
    assert torch.equal(plain.model.layers[1].mlp.down_proj.weight, weight)


def test_print_trainable_parameters_tells_the_truth():
    full = get_peft_model(tiny_model(), paper_config())
    total = sum(p.numel() for p in tiny_model().parameters())
    assert full.get_nb_trainable_parameters() == (total, total)

    lora = get_peft_model(tiny_model(), lora_config())
    expected = lora.get_nb_trainable_parameters()
    peft_sat.apply_sat(lora, paper_config())  # train_base=None: adapters only, as before
    assert lora.get_nb_trainable_parameters() == expected

    frozen = get_peft_model(tiny_model(), paper_config(train_base=False))
    assert frozen.get_nb_trainable_parameters()[0] == 0


def test_a_config_reused_under_lora_keeps_the_base_frozen():
    """``get_peft_model`` prepares a copy of the config (``train_base`` True, the default targets) and keeps that copy:
    the same config object given afterwards to ``apply_sat`` under LoRA still means "adapters only"."""
    config = paper_config()
    full = get_peft_model(tiny_model(), config)
    assert config.train_base is None and config.target_modules is None  # the caller's object, as given
    assert full.peft_config["default"].train_base is True and full.peft_config["default"].target_modules
    assert full.get_nb_trainable_parameters()[0] == sum(p.numel() for p in tiny_model().parameters())

    lora = get_peft_model(tiny_model(), lora_config())
    expected = lora.get_nb_trainable_parameters()
    peft_sat.apply_sat(lora, config)
    assert lora.get_nb_trainable_parameters() == expected
    assert config.train_base is None and config.target_modules is None  # apply_sat works on a copy too
    assert peft_sat.get_sat_state(lora).config.target_modules == ["mlp", "self_attn"]


def test_lora_checkpoint_is_plain_lora_and_loads_without_peft_sat(tmp_path):
    plain_lora = get_peft_model(tiny_model(), lora_config())
    plain_lora.save_pretrained(tmp_path / "plain")

    lora = get_peft_model(tiny_model(), lora_config())
    peft_sat.apply_sat(lora, paper_config(omission_rate=0.5))
    _train(lora)
    lora.save_pretrained(tmp_path / "sat")
    saved = load_file(tmp_path / "sat" / "adapter_model.safetensors")
    assert saved.keys() == load_file(tmp_path / "plain" / "adapter_model.safetensors").keys()
    assert json.loads((tmp_path / "sat" / "adapter_config.json").read_text())["peft_type"] == "LORA"

    tiny_model().save_pretrained(tmp_path / "base")
    script = f"""
import sys, torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(tmp_path / "base")!r}), {str(tmp_path / "sat")!r})
assert "peft_sat" not in sys.modules
saved = load_file({str(tmp_path / "sat" / "adapter_model.safetensors")!r})
state = model.state_dict()
for key, value in saved.items():
    assert torch.equal(state[key.replace(".weight", ".default.weight")], value), key
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-2000:]


def test_lora_applied_after_sat_finds_targets_and_trains():
    model = tiny_model()
    peft_sat.apply_sat(model, paper_config(omission_rate=0.5))
    lora = get_peft_model(model, lora_config())
    lora_names = [n for n, _ in lora.named_modules() if n.endswith("q_proj") and "lora" not in n]
    assert len(lora_names) == 2 and all(hasattr(lora.get_submodule(n), "lora_A") for n in lora_names)
    before = {n: p.clone() for n, p in lora.named_parameters() if p.requires_grad}
    _train(lora)
    changed = [n for n, p in lora.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)
    assert copy.deepcopy(lora) is not None
