"""``benchmarks/quality.py`` never rots: its ``--tiny`` mode runs end to end in a subprocess (a tiny random Llama, no
downloads, no real assets) and writes the JSON, the markdown tables, the "Beyond the paper" section and the PNG
plots; a grid of named configurations resumes from its stored runs; the stored real results still render; its pure
helpers (time-to-target, loss at equal wall time, config keys, ``--configs`` parsing, batching) are checked on
hand-made numbers."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import peft_sat

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "quality.py"
sys.path.insert(0, str(SCRIPT.parent))  # the benchmark helpers are scripts next to quality.py, not a package

import _quality_configs as qconfigs  # noqa: E402
import _quality_data as qdata  # noqa: E402
import _quality_report as qreport  # noqa: E402
import _quality_runs as qruns  # noqa: E402
import _quality_tradeoff as qtradeoff  # noqa: E402
import quality  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# How the reports name SATConfig()'s defaults: its fields off the paper's settings
DEFAULT_FIELDS = qruns.override_fields(qconfigs.canonical({}))


def run_tiny(out: Path, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    """``quality.py --tiny --out OUT *args`` in a subprocess, offline, from the repository root."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--out", str(out), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        # PYTHONPATH: this checkout's peft_sat, not whichever one the virtualenv has installed
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(ROOT)},
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("quality")
    proc = run_tiny(out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_tiny_run_writes_every_number_and_plot(tiny_run: Path):
    results = json.loads((tiny_run / "quality.json").read_text())
    assert results["mode"] == "tiny"
    assert results["machine"]["torch"] and results["commands"]
    runs = results["runs"]
    for task in ("cpt", "sft"):
        pairs = [run for key, run in runs.items() if key.startswith(f"{task}|")]
        assert sorted(run["seed"] for run in pairs) == [0, 1]
        for run in pairs:
            dense, sat = run["dense"], run["sat"]
            assert dense["sat_config"] is None and sat["sat_config"]["omission_rate"] > 0
            # Same start, equal steps, evaluated before training and at the end.
            assert dense["evals"][0]["loss"] == pytest.approx(sat["evals"][0]["loss"], abs=1e-6)
            assert [e["step"] for e in dense["evals"]] == [e["step"] for e in sat["evals"]]
            assert dense["evals"][-1]["step"] == len(dense["rates"]) == len(sat["rates"])
            # The ladder: sparse first, dense on the last step; the dense arm never sparse.
            assert sat["rates"][0] > 0 and sat["rates"][-1] == 0 and set(dense["rates"]) == {0.0}
            for value in (dense["final_loss"], sat["final_loss"], run["loss_gap_pct"], run["wall_saving_pct"]):
                assert math.isfinite(value)
            # The three numbers per arm: loss against wall time, time to dense's final loss, loss at equal time.
            assert [e["train_time_s"] for e in sat["evals"]] == sorted(e["train_time_s"] for e in sat["evals"])
            assert "reached" in run["time_to_target"] and run["dense_time_to_target"]["reached"]
            at = run["equal_time"]
            assert at["train_time_s"] == min(dense["train_time_s"], sat["train_time_s"])
            faster = "sat" if at["end_of"] == "sat" else "dense"
            assert at[f"{faster}_loss"] == run[faster]["final_loss"]
            assert (run["sat_loss_at_dense_time"] is None) == (at["end_of"] == "sat")
            # The FLOPs estimate follows the steps that ran: nothing saved on the dense last step.
            assert len(sat["flops_saved_fractions"]) == len(sat["rates"]) and sat["flops_saved_fractions"][-1] == 0
            assert sat["sat_config"] == qconfigs.config_record(peft_sat.SATConfig(seed=run["seed"]))  # the defaults
    grid = [run for key, run in runs.items() if key.startswith("grid:")]
    configs = [run["arm"]["sat_config"] for run in grid if run["arm"]["sat_config"] is not None]
    cells = {(c["importance"], c["selection"], c["schedule"]) for c in configs if c["omission_rate"] == 0.5}
    for importance in ("uniform", "magnitude", "wanda", "maxip"):
        for selection in ("topk", "sampling"):
            for schedule in ("constant", "ladder"):
                assert (importance, selection, schedule) in cells
    assert {c["omission_rate"] for c in configs} >= {0.25, 0.5, 0.75}
    assert {c["score_tokens"] for c in configs} >= {32, 128, 512}
    assert sum(run["arm"]["sat_config"] is None for run in grid) == 1  # one dense reference
    for name in ("loss_curves.png", "ablation.png", "omission_sweep.png", "tradeoff.png"):
        data = (tiny_run / name).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
    markdown = (tiny_run / "quality.md").read_text()
    for heading in (
        "dense vs SAT",
        "Ablation grid",
        "Omission-rate sweep",
        "Schedule shapes",
        "Tokens scored per block",
        "By tokens scored",
    ):
        assert heading in markdown
    assert "Targets" not in markdown and "met**" not in markdown  # what runs are judged against: docs/results.md
    beyond = (tiny_run / "quality_beyond.md").read_text()
    assert f"| defaults | {DEFAULT_FIELDS} | 2 |" in beyond and "![Trade-off" in beyond
    assert "Targets" not in beyond and "met**" not in beyond


@pytest.mark.slow
def test_sat_overrides_run_as_their_own_comparison(tmp_path):
    overrides = {"omit": ["mlp", "attention"], "score_tokens": 4}  # on top of SATConfig()'s defaults
    for extra in ([], ["--sat", json.dumps(overrides)]):
        proc = run_tiny(tmp_path, "--parts", "cpt", "--seeds", "0", *extra)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads((tmp_path / "quality.json").read_text())["runs"]
    # Keyed by the fields off the paper's settings: the defaults' own, then those plus the overrides'.
    defaults = qconfigs.beyond_paper(qconfigs.config_record(peft_sat.SATConfig()))
    varied_fields = qconfigs.beyond_paper(qconfigs.config_record(peft_sat.SATConfig(**overrides)))
    assert varied_fields == {**{k: v for k, v in defaults.items() if k != "omit"}, "score_tokens": 4}
    keys = [f"cpt|steps=8|seed=0|{json.dumps(fields, sort_keys=True)}" for fields in (defaults, varied_fields)]
    assert sorted(runs) == sorted(keys)
    default, varied = (runs[key] for key in keys)
    assert default["sat_overrides"] == defaults and varied["sat_overrides"] == varied_fields
    assert default["sat"]["sat_config"]["omit"] == peft_sat.SATConfig().omit
    assert {k: varied["sat"]["sat_config"][k] for k in overrides} == overrides
    assert default["dense"]["final_loss"] == varied["dense"]["final_loss"]  # same seed: the same dense run
    markdown = (tmp_path / "quality.md").read_text()
    assert f'dense vs SAT "defaults" ({DEFAULT_FIELDS}), 8 steps' in markdown
    assert f"SAT: the paper's settings with `{DEFAULT_FIELDS}`. Seeds" in markdown
    assert (
        "SAT: the paper's settings with `context_tokens='forward_only', dense_tokens='auto', score_tokens=4"
        in markdown
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ('{"omit": ["mlpx"]}', "`omit` must be"),
        ('{"seed": 3}', "other than 'seed'"),
        ("[1, 2]", "must be a JSON object"),
        ("{oops", "must be a JSON object"),
        ('{"not_a_field": 1}', "not_a_field"),
    ],
)
def test_sat_overrides_are_checked_before_any_work(tmp_path, capsys, bad, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        quality.main(["--tiny", "--out", str(out), "--sat", bad])
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in stderr, stderr[-2000:]
    assert not out.exists()


@pytest.mark.slow
def test_report_only_rerenders_without_training(tiny_run: Path):
    (tiny_run / "ablation.png").unlink()
    before = (tiny_run / "quality.json").read_text()
    proc = run_tiny(tiny_run, "--report-only", timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tiny_run / "ablation.png").read_bytes().startswith(PNG_MAGIC)
    assert (tiny_run / "quality.json").read_text() == before


def test_time_to_target_and_loss_at_time():
    evals = [
        {"step": 0, "train_time_s": 0.0, "loss": 3.0},
        {"step": 5, "train_time_s": 10.0, "loss": 2.5},
        {"step": 10, "train_time_s": 20.0, "loss": 2.0},
    ]
    assert qtradeoff.time_to_target(evals, 2.5) == {"reached": True, "step": 5, "train_time_s": 10.0}
    assert qtradeoff.time_to_target(evals, 2.25) == {"reached": True, "step": 7.5, "train_time_s": 15.0}
    assert qtradeoff.time_to_target(evals, 3.5) == {"reached": True, "step": 0, "train_time_s": 0.0}
    assert qtradeoff.time_to_target(evals, 1.9)["reached"] is False
    assert qtradeoff.loss_at_time(evals, 15.0) == pytest.approx(2.25)
    assert qtradeoff.loss_at_time(evals, 99.0) == 2.0  # clamped to the last evaluation
    assert qtradeoff.loss_at_time(evals, -1.0) == 3.0


def _arm(times_losses: list[tuple[float, float]]) -> dict:
    evals = [{"step": 5 * i, "train_time_s": t, "loss": loss} for i, (t, loss) in enumerate(times_losses)]
    return {"evals": evals, "final_loss": evals[-1]["loss"], "train_time_s": evals[-1]["train_time_s"],
            "train_cpu_s": evals[-1]["train_time_s"]}  # fmt: skip


def test_pair_metrics_compare_at_the_end_of_the_faster_arm():
    dense = _arm([(0.0, 3.0), (10.0, 2.5), (20.0, 2.0)])
    faster = _arm([(0.0, 3.0), (8.0, 2.6), (16.0, 2.2)])  # SAT ends at 16 s, dense is at 2.3 there
    m = qtradeoff.pair_metrics(dense, faster)
    assert m["wall_saving_pct"] == pytest.approx(20.0) and m["loss_gap_pct"] == pytest.approx(10.0)
    assert m["equal_time"] == {"train_time_s": 16.0, "end_of": "sat", "dense_loss": pytest.approx(2.2),
                               "sat_loss": 2.2, "gap_pct": pytest.approx(0.0)}  # fmt: skip
    assert m["time_to_target"]["reached"] is False and m["sat_loss_at_dense_time"] is None
    slower = _arm([(0.0, 3.0), (12.0, 2.4), (24.0, 1.8)])  # reaches 2.0 at 20 s; at dense's 20 s: 2.0
    m = qtradeoff.pair_metrics(dense, slower)
    assert m["equal_time"]["end_of"] == "dense" and m["equal_time"]["sat_loss"] == pytest.approx(2.0)
    assert m["sat_loss_at_dense_time"] == pytest.approx(2.0) and m["wall_saving_pct"] == pytest.approx(-20.0)
    assert m["time_to_target"] == {"reached": True, "step": pytest.approx(8.333, abs=1e-3),
                                   "train_time_s": pytest.approx(20.0)}  # fmt: skip


def test_configs_parse_names_presets_and_json_with_commas(tmp_path):
    configs = qconfigs.parse_configs(
        'paper, loss tokens = {"dense_tokens": "loss", "omit": ["mlp", "attention"]},x={}'
    )
    assert list(configs) == ["paper", "loss tokens", "x"]
    assert configs["loss tokens"] == {"dense_tokens": "loss", "omit": ["mlp", "attention"]} and configs["x"] == {}
    assert qconfigs.canonical(configs["paper"]) == "{}"  # the paper's settings: the plain comparison key
    file = tmp_path / "grid.json"
    file.write_text(json.dumps({"the paper": "paper", "dense fwd": {"sparse_pass": "backward"}}))
    assert qconfigs.load_configs_file(file) == {"the paper": qconfigs.PAPER, "dense fwd": {"sparse_pass": "backward"}}
    for bad, message in [
        ('x={"seed": 1}', "other than 'seed'"),
        ("x={oops", "does not parse"),
        ("nope", "unknown preset"),
        ('x={"sparse_pass": "sideways"}', "`sparse_pass`"),
        ("={}", "needs a name"),
        ("a={},a={}", "given twice"),
        ("x={} y", "expected ','"),
    ]:
        with pytest.raises(ValueError, match=message):
            qconfigs.parse_configs(bad)


def test_cli_takes_configs_or_sat_not_both(capsys):
    args = quality.parse_args(["--configs", 'paper,bwd={"sparse_pass": "backward"}'])
    assert args.configs == {"paper": qconfigs.PAPER, "bwd": {"sparse_pass": "backward"}}
    assert quality.parse_args([]).configs == {"defaults": {}}
    assert quality.parse_args(["--sat", '{"omit": ["mlp"]}']).configs == {"omit=['mlp']": {"omit": ["mlp"]}}
    for argv, message in [
        (["--configs", "paper", "--sat", '{"omit": ["mlp"]}'], "one of them"),
        (["--configs", ","], "no configuration"),
        (["--configs", 'x={"dense_layers": "first"}'], "dense_layers"),
    ]:
        with pytest.raises(SystemExit):
            quality.parse_args(argv)
        assert message in capsys.readouterr().err


def test_records_keys_and_the_paper_cover_every_satconfig_field():
    fields = qconfigs.sat_fields()
    assert sorted(qconfigs.PAPER) == sorted(set(fields) - {"seed"})  # a new field declares its paper value here
    record = qconfigs.config_record(peft_sat.SATConfig(dense_layers=(0, -1)))
    assert list(record) == fields and record["dense_layers"] == [0, -1]
    assert {"dense_tokens", "sparse_pass", "dense_layers"} <= set(record)
    assert qconfigs.beyond_paper({"omission_rate": 0.5, "seed": 3}) == {}  # an old record: the paper's modes
    # Keys of runs stored before the modes beyond the paper still match, so those runs resume.
    paper_modes = {
        "omit": ["mlp"],
        "dense_tokens": "none",
        "sparse_pass": "forward_backward",
        "context_tokens": "sparse",
    }
    assert qconfigs.canonical({**paper_modes, "score_tokens": 128}) == '{"omit": ["mlp"], "score_tokens": 128}'
    assert qconfigs.cell_key({**qconfigs.PAPER_MODES, "importance": "uniform", "schedule": "constant"}) == (
        '{"head_granularity": "kv_group", "importance": "uniform", "ladder_full_rate_ratio": 0.5, "ladder_rungs": 3, '
        '"ladder_stairs": null, "omission_rate": 0.5, "omit": ["mlp", "attention"], "schedule": "constant", '
        '"score_tokens": 32, "selection": "topk", "warmup_ratio": 0.0}'
    )
    assert '"sparse_pass": "backward"' in qconfigs.cell_key({**qconfigs.PAPER_MODES, "sparse_pass": "backward"})


def test_update_doc_appends_the_beyond_section_once_then_replaces_it(tmp_path):
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\n{qreport.BEGIN}\nold\n{qreport.END}\n\nprose\n")
    qreport.update_doc(doc, "tables", "")
    assert doc.read_text() == f"# Results\n\n{qreport.BEGIN}\ntables\n{qreport.END}\n\nprose\n"
    qreport.update_doc(doc, "tables", "first")
    qreport.update_doc(doc, "tables 2", "second")
    text = doc.read_text()
    assert text.count("## Beyond the paper") == 1 and "first" not in text
    assert text.endswith(f"prose\n\n## Beyond the paper\n\n{qtradeoff.BEGIN}\nsecond\n{qtradeoff.END}\n")
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="needs the lines"):
        qreport.update_doc(doc, "tables", "beyond")


DENSE_FWD = {"sparse_pass": "backward", "dense_layers": [0], "context_tokens": "sparse", "dense_tokens": "none"}
LOSS_TOKENS = {**qconfigs.PAPER_MODES, "dense_tokens": "loss"}  # the paper's sub-network on the context tokens


@pytest.mark.slow
def test_named_configs_compare_in_lockstep_resume_and_render(tmp_path):
    first = run_tiny(tmp_path, "--parts", "cpt,sft", "--seeds", "0", "--configs",
                     f"paper,loss tokens={json.dumps(LOSS_TOKENS)}")  # fmt: skip
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"the paper": "paper", "loss tokens": LOSS_TOKENS,
                                "dense fwd": DENSE_FWD}))  # fmt: skip
    doc = tmp_path / "results.md"
    doc.write_text(f"# Results\n\n{qreport.BEGIN}\n{qreport.END}\n")
    second = run_tiny(tmp_path, "--parts", "cpt,sft", "--seeds", "0", "--configs-file", str(grid),
                      "--update-doc", str(doc))  # fmt: skip
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert second.stdout.count("stored, skipped") == 4  # "the paper" = "paper": the same config, stored
    assert second.stdout.count("(dense fwd) (load average") == 2  # only the new configuration ran, CPT and SFT
    results = json.loads((tmp_path / "quality.json").read_text())
    loss, dense_fwd = qconfigs.canonical(LOSS_TOKENS), qconfigs.canonical(DENSE_FWD)  # fields over the defaults
    assert sorted(results["runs"]) == sorted(
        f"{task}|steps=8|seed=0{suffix}" for task in ("cpt", "sft") for suffix in ("", f"|{loss}", f"|{dense_fwd}")
    )
    assert results["config_names"] == {"{}": "the paper", loss: "loss tokens", dense_fwd: "dense fwd"}
    runs = results["runs"]
    split = runs[f"sft|steps=8|seed=0|{loss}"]["sat"]
    paper, backward = runs["sft|steps=8|seed=0"]["sat"], runs[f"sft|steps=8|seed=0|{dense_fwd}"]["sat"]
    assert split["sat_config"]["dense_tokens"] == "loss" and 0 < split["dense_token_fractions"][0] < 1
    assert backward["sat_config"]["sparse_pass"] == "backward" and backward["sat_config"]["dense_layers"] == [0]
    # Dense loss tokens and a dense forward both save fewer FLOPs than the paper's all-sparse step.
    assert 0 < split["flops_saved_fraction_estimate"] < paper["flops_saved_fraction_estimate"]
    assert 0 < backward["flops_saved_fraction_estimate"] < paper["flops_saved_fraction_estimate"]
    assert (tmp_path / "tradeoff.png").read_bytes().startswith(PNG_MAGIC)
    text = doc.read_text()
    assert text.count("## Beyond the paper") == 1 and text.count(qtradeoff.BEGIN) == 1
    fields = {name: qruns.override_fields(key) for name, key in (("loss tokens", loss), ("dense fwd", dense_fwd))}
    for row in ("| the paper | - (the paper) | 1 |", f"| loss tokens | {fields['loss tokens']} | 1 |",
                f"| dense fwd | {fields['dense fwd']} | 1 |"):  # fmt: skip
        assert text.count(row) == 2, row  # one row per setting: CPT and SFT
    assert "### CPT, full-parameter, 8 steps" in text and "### SFT, LoRA r16, 8 steps" in text
    assert "](tradeoff.png)" in text and "--configs-file" in text and "--report-only --update-doc" in text


@pytest.mark.slow
def test_stored_real_results_still_render(tmp_path):
    """The committed ``docs/img/quality/quality.json`` (written before the modes beyond the paper) renders."""
    shutil.copy(ROOT / "docs" / "img" / "quality" / "quality.json", tmp_path / "quality.json")
    doc = tmp_path / "results.md"
    shutil.copy(ROOT / "docs" / "results.md", doc)
    proc = run_tiny(tmp_path, "--report-only", "--update-doc", str(doc), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("loss_curves.png", "ablation.png", "omission_sweep.png", "tradeoff.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_MAGIC), name
    markdown = (tmp_path / "quality.md").read_text()
    assert "| maxip | topk | ladder |" in markdown  # grid cells found with the paper's fields filled in
    assert "| 0.75 |" in markdown  # the omission-rate sweep
    beyond = (tmp_path / "quality_beyond.md").read_text()
    assert "| paper | - (the paper) | 2 |" in beyond and "| 128 score tokens | score_tokens=128 | 2 |" in beyond
    assert f"| defaults | {DEFAULT_FIELDS} | 2 |" in beyond  # the defaults beyond the paper, 2 seeds


def test_batches_are_seeded_and_padded_with_ignored_labels():
    data = qdata.TaskData("sft", [([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])] * 3, [([1, 2], [1, 2])], 0, "toy")
    first, again = data.train_batches(2, 4, seed=3), data.train_batches(2, 4, seed=3)
    assert all(a.input_ids.equal(b.input_ids) for a, b in zip(first, again))
    batch = qdata.collate([([5, 6, 7], [-100, 6, 7]), ([8, 9], [-100, 9])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 9, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch.labels.tolist() == [[-100, 6, 7], [-100, 9, -100]]
    assert batch.num_loss_tokens == 3  # after the causal shift: 6, 7 and 9
