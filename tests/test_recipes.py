"""The recipes (``recipes/sft.py``, ``recipes/cpt.py``): every YAML parses, both run end to end in-process on a tiny
offline Llama (and, behind ``slow``, on the real SmolLM2), and bad input fails before training with every problem."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from sat_testing import TINY_RECIPE_LADDER, sentence, tiny_recipe_args

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `recipes` is a folder of scripts at the repository root, not an installed package

from peft_sat import SATConfig  # noqa: E402
from recipes import cpt, sft  # noqa: E402
from recipes.arguments import SAT_PREFIX, SATArguments  # noqa: E402
from recipes.data import _fitting_prefix, pack_blocks, split_train_eval  # noqa: E402
from recipes.plots import PLOT_FILE  # noqa: E402
from recipes.preflight import RecipeError  # noqa: E402
from recipes.report import METRICS_FILE  # noqa: E402

RECIPES = {"sft": sft, "cpt": cpt}
RECIPE_YAMLS = sorted((ROOT / "recipes").glob("*/config_*.yaml"))
ACCELERATE_YAMLS = sorted((ROOT / "recipes" / "accelerate_configs").glob("*.yaml"))


pytestmark = pytest.mark.usefixtures("restore_trl_lm_head")


def parse(recipe: str, *args: str):
    return RECIPES[recipe].make_parser().parse_args_and_config(list(args))


def tiny_args(recipe: str, model_dir: Path, data: Path, out: Path, *extra: str):
    """Arguments for a 6-step run on the tiny model of the ``tiny_model_dir`` fixture: ``TINY_RECIPE_LADDER``."""
    return tiny_recipe_args(RECIPES[recipe], model_dir, data, out, *extra)


# ---- configs ---------------------------------------------------------------------------------------------------


def test_recipe_yamls_exist_for_every_variant():
    names = {str(p.relative_to(ROOT / "recipes")) for p in RECIPE_YAMLS}
    for recipe in RECIPES:
        assert {f"{recipe}/config_{variant}.yaml" for variant in ("full", "lora", "qlora")} <= names
    assert {p.stem for p in ACCELERATE_YAMLS} >= {
        "single_device",
        "multi_gpu",
        "fsdp2",
        "deepspeed_zero2",
        "deepspeed_zero3",
        "cpu_multi_process",
    }


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_recipe_yaml_parses_with_known_keys(path):
    recipe = path.parent.name
    # TrlParser raises on keys that no argument class knows (fail_with_unknown_args=True).
    script_args, training_args, model_args, sat_args = parse(recipe, "--config", str(path))
    keys = set(yaml.safe_load(path.read_text()))
    assert keys <= {action.dest for action in RECIPES[recipe].make_parser()._actions}
    assert training_args.output_dir.startswith("outputs/")
    assert model_args.load_in_4bit == path.stem.endswith("qlora")
    assert model_args.use_peft == (path.stem != "config_full")
    assert isinstance(sat_args.to_sat_config(), SATConfig)


@pytest.mark.parametrize("recipe, name", [("sft", "config_lora.yaml"), ("cpt", "config_full.yaml")])
def test_default_yaml_is_what_runs_without_arguments(recipe, name):
    # The YAML leaves SAT fields to SATConfig's defaults, so that a new default reaches both ways of running.
    for plain, from_yaml in zip(parse(recipe), parse(recipe, "--config", str(ROOT / "recipes" / recipe / name))):
        names = [f.name for f in dataclasses.fields(plain)]
        assert {name for name in names if getattr(plain, name) != getattr(from_yaml, name)} <= {"output_dir"}


@pytest.mark.parametrize("path", ACCELERATE_YAMLS, ids=lambda p: p.name)
def test_accelerate_yaml_loads(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))  # raises on unknown keys
    assert config.mixed_precision == "no"  # precision comes from the training arguments, per machine
    assert config.use_cpu == (path.stem == "cpu_multi_process")


def test_unknown_yaml_key_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("sat_omision_rate: 0.3\n")
    with pytest.raises(ValueError, match="sat_omision_rate"):
        parse("sft", "--config", str(path))


def test_sat_arguments_mirror_every_sat_config_field():
    own = {f.name for f in dataclasses.fields(SATConfig)} - {f.name for f in dataclasses.fields(SATConfig.__mro__[1])}
    arguments = {f.name: f for f in dataclasses.fields(SATArguments)}
    assert {SAT_PREFIX + name for name in own - {"train_base"}} | {"use_sat"} == set(arguments)
    assert all(f.metadata.get("help") for f in arguments.values())


def test_embedded_defaults_and_overrides():
    script_args, training_args, model_args, sat_args = parse("sft")
    assert model_args.model_name_or_path is None and script_args.dataset_name is None  # the built-in assets
    assert model_args.use_peft and sat_args.use_sat and training_args.max_steps > 0
    assert training_args.bf16 == torch.cuda.is_available() and not training_args.activation_checkpointing
    _, _, model_args, sat_args = parse(
        "cpt", "--sat_omission_rate", "0.3", "--sat_ladder_stairs", "[[0.0, 0.3], [0.5, 0.0]]"
    )
    assert not model_args.use_peft  # cpt.py defaults to full-parameter SAT
    config = sat_args.to_sat_config()
    assert config.omission_rate == 0.3 and config.ladder_stairs == [[0.0, 0.3], [0.5, 0.0]]


# ---- data and report helpers -----------------------------------------------------------------------------------


def test_fitting_prefix_keeps_whole_exchanges():
    messages = [
        {"role": "user", "content": "a" * 10},
        {"role": "assistant", "content": "b" * 10},
        {"role": "user", "content": "c" * 10},
        {"role": "assistant", "content": "d" * 100},
    ]
    assert len(_fitting_prefix(messages, 50)) == 2
    assert len(_fitting_prefix(messages, None)) == 4
    assert _fitting_prefix(messages, 15) is None


def test_pack_blocks_and_held_out_tail(tiny_model_dir):
    from datasets import Dataset
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    data = Dataset.from_dict({"text": [sentence(i, 10) for i in range(9)]})  # 9 * (10 words + EOS) = 99 tokens
    blocks = pack_blocks(data, tokenizer, "text", 8)
    assert len(blocks) == 12 and all(len(ids) == 8 for ids in blocks["input_ids"])
    args = sft.make_parser().parse_args_and_config(["--eval_samples", "3"])[0]
    train, held_out = split_train_eval(blocks, args, seed=0, shuffle=False)
    assert held_out["input_ids"] == blocks["input_ids"][-3:] and len(train) == 9


# ---- end to end on a tiny model --------------------------------------------------------------------------------


def _logged_rates(metrics: dict) -> list[float]:
    return [entry["sat/omission_rate"] for entry in metrics["log_history"] if "loss" in entry]


EXPECTED_KEYS = {
    "eval_loss_before",
    "eval_loss_after",
    "tokens_per_s",
    "wall_time_s",
    "train_runtime_s",
    "dense_time_saved_s",
    "step_time_dense_s",
    "flops_saved_fraction_estimate",
    "schedule",
    "steps",
    "eval_curve",
    "measured_to_estimated_saving",
    "compare_dense",
}


@pytest.mark.parametrize("variant", ["lora", "full", "qlora"])
def test_sft_end_to_end(variant, tiny_model_dir, chat_file, tmp_path):
    extra = {"lora": [], "full": ["--use_peft", "false"], "qlora": ["--load_in_4bit", "true"]}[variant]
    metrics = sft.main(*tiny_args("sft", tiny_model_dir, chat_file, tmp_path, *extra))

    saved = json.loads((tmp_path / METRICS_FILE).read_text())
    assert EXPECTED_KEYS <= set(saved) and saved["variant"] == variant and saved["global_step"] == 6
    assert (tmp_path / PLOT_FILE).stat().st_size > 1000
    weights = "adapter_model.safetensors" if variant != "full" else "model.safetensors"
    assert (tmp_path / weights).is_file()
    rates = _logged_rates(metrics)
    assert rates[0] == 0.5 and rates[-1] == 0.0 and rates == sorted(rates, reverse=True)  # the ladder, down to dense
    assert [r["omission_rate"] for r in metrics["steps"]] == TINY_RECIPE_LADDER
    assert all(v == v for v in (metrics["eval_loss_before"], metrics["eval_loss_after"]))  # not NaN
    curve = metrics["eval_curve"]  # held-out loss at the start, every `eval_steps` and at the end, clock excluded
    assert [p["step"] for p in curve] == [0, 3, 6] and curve[0]["train_seconds"] == 0.0
    assert 0 < curve[1]["train_seconds"] < curve[2]["train_seconds"] == metrics["train_runtime_s"]
    assert 0 <= metrics["time_between_steps_s"] < metrics["train_runtime_s"]
    assert metrics["compare_dense"] is None
    assert saved["crossover"] == {"dense_when_slower": False}  # TINY_RECIPE_ARGS switch the crossover check off
    assert saved["cpu_allocator_tuned"] is sys.platform.startswith("linux")  # a CPU run keeps freed memory
    assert saved["cpu_allocator_large_blocks_from_heap"] is False  # opt-in
    assert saved["cpu_lm_head_saves_gradient"] is True


def test_cpt_end_to_end_full(tiny_model_dir, text_file, tmp_path, monkeypatch):
    from recipes.cpu_lm_head import LogProbWithSavedGradient

    heads, apply = [], LogProbWithSavedGradient.apply
    monkeypatch.setattr(LogProbWithSavedGradient, "apply", lambda *args: heads.append(args[-1]) or apply(*args))
    metrics = cpt.main(
        *tiny_args(
            "cpt", tiny_model_dir, text_file, tmp_path, "--sat_ladder_rungs", "1", "--sat_dense_when_slower", "true"
        )
    )
    assert metrics["variant"] == "full" and metrics["unit"] == "blocks" and metrics["eval_examples"] == 4
    crossover = metrics["crossover"]  # what SATCallback.crossover measured: dense probes, verdicts, dense rungs
    assert crossover["dense_when_slower"] and crossover["probe_steps"] and crossover["summary"]
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / PLOT_FILE).is_file()
    assert _logged_rates(metrics)[-1] == 0.0
    assert metrics["train_tokens"] == 6 * 2 * 16  # full packed blocks, no padding
    assert [record["tokens"] for record in metrics["steps"]] == [2 * 16] * 6  # token positions each step ran
    assert all(isinstance(r["major_page_faults"], int) and r["major_page_faults"] >= 0 for r in metrics["steps"])
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"]  # lr 1e-3 on repeated text: it learns
    assert heads.count(True) == 6 and False in heads  # each step's loss kept its gradient; evaluations did not


def test_dense_baseline(tiny_model_dir, text_file, tmp_path):
    cpu_off = ("--tune_cpu_allocator", "false", "--cpu_lm_head_saves_gradient", "false")
    metrics = cpt.main(*tiny_args("cpt", tiny_model_dir, text_file, tmp_path, "--use_sat", "false", *cpu_off))
    assert not metrics["sat"] and metrics["schedule"] == "dense" and not metrics["cpu_allocator_tuned"]
    assert not metrics["cpu_lm_head_saves_gradient"]
    assert all("sat/omission_rate" not in entry for entry in metrics["log_history"])
    assert metrics["step_time_dense_s"] is not None


def test_large_blocks_from_heap_reaches_the_allocator_and_metrics(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """The flag's effect on glibc is tested in a fresh interpreter (test_cpu_allocator.py); here only that the recipe
    passes it on and records it, without changing this process's allocator."""
    from peft_sat import cpu_allocator

    calls = []
    monkeypatch.setattr(cpu_allocator, "tune_cpu_allocator", lambda heap=False: calls.append(heap) or True)
    args = ("--use_sat", "false", "--cpu_allocator_large_blocks_from_heap", "true")
    metrics = cpt.main(*tiny_args("cpt", tiny_model_dir, text_file, tmp_path, *args))
    assert calls == [True] and metrics["cpu_allocator_tuned"] and metrics["cpu_allocator_large_blocks_from_heap"]
    untuned = (*args, "--tune_cpu_allocator", "false")  # the flag alone would do nothing: an error, not a no-op
    with pytest.raises(RecipeError, match="`cpu_allocator_large_blocks_from_heap` extends"):
        cpt.main(*tiny_args("cpt", tiny_model_dir, text_file, tmp_path, *untuned))


def test_compare_dense_trains_both_arms_on_the_same_batches(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    from trl import SFTTrainer

    batches: dict[str, list] = {}  # output_dir -> input ids of every training micro-batch, in order
    training_step = SFTTrainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):
        batches.setdefault(self.args.output_dir, []).append(inputs["input_ids"].tolist())
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", recording_step)
    metrics = sft.main(*tiny_args("sft", tiny_model_dir, chat_file, tmp_path, "--compare_dense", "true"))

    dense_dir = tmp_path / "dense"
    assert list(batches) == [str(tmp_path), str(dense_dir)] and len(batches[str(tmp_path)]) == 6
    assert batches[str(tmp_path)] == batches[str(dense_dir)]  # same data order in both arms
    assert (dense_dir / "adapter_model.safetensors").is_file() and (tmp_path / PLOT_FILE).is_file()
    compare = json.loads((tmp_path / METRICS_FILE).read_text())["compare_dense"]
    assert compare["steps"] == {"sat": 6, "dense": 6}
    sat_steps = json.loads((tmp_path / METRICS_FILE).read_text())["steps"]
    assert [r["step"] for r in compare["dense_steps"]] == [r["step"] for r in sat_steps]
    assert all(r["omission_rate"] == 0.0 and r["seconds"] > 0 for r in compare["dense_steps"])
    # LoRA starts from B = 0 with the same seed: both arms evaluate the same model at step 0.
    assert compare["eval_loss_before"]["sat"] == pytest.approx(compare["eval_loss_before"]["dense"])
    sat_seconds, dense_seconds = compare["train_seconds"]["sat"], compare["train_seconds"]["dense"]
    assert compare["wall_time_saved_s"] == pytest.approx(dense_seconds - sat_seconds)
    assert compare["eval_loss_at_equal_steps"] == {
        "sat": metrics["eval_loss_after"],
        "dense": compare["dense_final_eval_loss"],
    }
    assert compare["eval_loss_at_equal_wall_time"]["train_seconds"] == pytest.approx(min(sat_seconds, dense_seconds))
    assert [p["step"] for p in compare["eval_curve"]["dense"]] == [0, 3, 6]
    keys = {
        "measured_to_estimated_saving",
        "step_time_measured_to_estimated_saving",
        "sat_seconds_to_dense_final_loss",
    }
    assert keys | {"steady_machine"} <= set(compare)
    assert all("sat/omission_rate" not in entry for entry in compare["dense_log_history"])  # the dense arm is dense


def test_dense_first_trains_the_dense_arm_before_sat(tiny_model_dir, text_file, tmp_path, monkeypatch):
    """``--dense_first``: the same A/B with the arms' order swapped; without ``--compare_dense`` it is an error."""
    from transformers import Trainer

    order: list[str] = []
    train = Trainer.train

    def recording_train(self, *args, **kwargs):
        order.append(self.args.output_dir)
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", recording_train)
    args = tiny_args("cpt", tiny_model_dir, text_file, tmp_path, "--compare_dense", "true", "--dense_first", "true")
    metrics = cpt.main(*args)
    assert order == [str(tmp_path / "dense"), str(tmp_path)]
    compare = metrics["compare_dense"]
    assert compare["steps"] == {"sat": 6, "dense": 6}
    assert all("sat/omission_rate" not in entry for entry in compare["dense_log_history"])  # the dense arm is dense
    assert any("sat/omission_rate" in entry for entry in metrics["log_history"])
    with pytest.raises(RecipeError, match="`dense_first` orders the arms of `compare_dense`"):
        cpt.main(*tiny_args("cpt", tiny_model_dir, text_file, tmp_path, "--dense_first", "true"))


def test_plot_failure_still_writes_metrics_and_summary(tiny_model_dir, text_file, tmp_path, monkeypatch, capsys):
    from recipes import plots

    def broken_plot(*args, **kwargs):
        raise RuntimeError("no fonts")

    monkeypatch.setattr(plots, "plot_curves", broken_plot)
    with pytest.warns(UserWarning, match="plot could not be written: RuntimeError: no fonts"):
        cpt.main(*tiny_args("cpt", tiny_model_dir, text_file, tmp_path))
    assert json.loads((tmp_path / METRICS_FILE).read_text())["global_step"] == 6
    printed = capsys.readouterr().out
    assert "== recipes/cpt.py" in printed and "plot: NOT written (RuntimeError: no fonts)" in printed
    assert not (tmp_path / PLOT_FILE).exists()


def test_missing_optional_packages_fail_before_training(tiny_model_dir, text_file, tmp_path, monkeypatch):
    import importlib.util

    from recipes import preflight

    find_spec = importlib.util.find_spec
    missing = {"matplotlib", "bitsandbytes"}
    monkeypatch.setattr(
        preflight.importlib.util, "find_spec", lambda name, *a: None if name in missing else find_spec(name, *a)
    )
    args = tiny_args(
        "cpt", tiny_model_dir, text_file, tmp_path / "out", "--load_in_4bit", "true", "--use_peft", "true"
    )
    with pytest.raises(RecipeError) as info:
        cpt.main(*args)
    assert "2 problem(s)" in str(info.value)
    assert "`pip install matplotlib`" in str(info.value) and "`pip install bitsandbytes`" in str(info.value)
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_recipes_run_without_bitsandbytes(tiny_model_dir, text_file, tmp_path):
    """bitsandbytes is needed for QLoRA only (preflight names it when asked for): a machine without it (e.g. a GPU
    image that lacks it) still imports the recipes and trains a LoRA run."""
    script = (
        "import sys; sys.modules['bitsandbytes'] = None  # any import of it raises ImportError\n"
        "from sat_testing import tiny_recipe_args\n"
        "from recipes import cpt, sft  # noqa: F401\n"
        f"args = tiny_recipe_args(cpt, {str(tiny_model_dir)!r}, {str(text_file)!r}, {str(tmp_path / 'out')!r}, "
        "'--use_peft', 'true')\n"
        "print(cpt.main(*args)['global_step'])\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == str(len(TINY_RECIPE_LADDER))


# ---- bad input: one error listing every problem, before any training -------------------------------------------


def test_bad_input_reports_every_problem_at_once(tmp_path):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text('{"question": "q", "answer": "a"}\n')
    bad_sat = "--sat_omission_rate 1.2 --sat_ladder_rungs 0".split()
    paths = ["--model_name_or_path", str(tmp_path / "no-such-model"), "--dataset_name", str(bad_data)]
    args = parse("sft", *paths, *bad_sat, "--output_dir", str(tmp_path / "out"))
    with pytest.raises(RecipeError) as info:
        sft.main(*args)
    message = str(info.value)
    assert "4 problem(s)" in message
    for expected in ("--sat_omission_rate", "--sat_ladder_rungs", "no-such-model", "columns ['question', 'answer']"):
        assert expected in message
    assert not (tmp_path / "out").exists()  # nothing trained, nothing written


def test_schedule_that_does_not_fit_the_steps(tiny_model_dir, chat_file, tmp_path):
    args = tiny_args("sft", tiny_model_dir, chat_file, tmp_path, "--max_steps", "3", "--sat_ladder_rungs", "5")
    with pytest.raises(RecipeError, match=r"does not fit the 3 optimizer steps.*ladder_rungs"):
        sft.main(*args)


def test_unknown_dataset_and_missing_text_column(tiny_model_dir, chat_file, tmp_path):
    with pytest.raises(RecipeError, match=r"no/such-dataset-xyz' could not be loaded"):
        cpt.main(*tiny_args("cpt", tiny_model_dir, Path("no/such-dataset-xyz"), tmp_path))
    with pytest.raises(RecipeError, match=r"dataset_text_field`='text'"):
        cpt.main(*tiny_args("cpt", tiny_model_dir, chat_file, tmp_path))  # chat data has no text column


def test_argument_combinations_that_cannot_work(tiny_model_dir, text_file, tmp_path):
    args = tiny_args("cpt", tiny_model_dir, text_file, tmp_path, "--load_in_4bit", "true", "--use_peft", "false")
    with pytest.raises(RecipeError, match="use_peft: true"):
        cpt.main(*args)
    args = tiny_args("cpt", tiny_model_dir, text_file, tmp_path, "--compare_dense", "true", "--use_sat", "false")
    with pytest.raises(RecipeError, match="`compare_dense` compares SAT with dense training"):
        cpt.main(*args)


# ---- the real SmolLM2 (slow; CI runs it) -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["sft", "cpt"])
def test_recipe_on_real_smollm2(recipe, tmp_path):
    pytest.importorskip("gguf")
    from peft_sat import assets

    try:
        assets.smollm2_path()
    except ModuleNotFoundError as error:
        pytest.skip(str(error))
    short = (
        "--max_steps 2 --max_length 64 --eval_samples 4 --per_device_train_batch_size 2 --per_device_eval_batch_size 4 "
        "--sat_ladder_rungs 1 --max_train_samples 64 --disable_tqdm true"
    )
    metrics = RECIPES[recipe].main(*parse(recipe, "--output_dir", str(tmp_path), *short.split()))
    assert metrics["global_step"] == 2 and _logged_rates(metrics) == [0.5, 0.0]
    assert metrics["eval_loss_before"] < 6.0  # pre-trained, not random (ln 49152 = 10.8)
    assert (tmp_path / METRICS_FILE).is_file() and (tmp_path / PLOT_FILE).is_file()
