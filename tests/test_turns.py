"""The interleaved A/B (``recipes/turns.py``, ``--interleave_arms true``): the turn passes in order, each arm keeps
its own random numbers, a failure stops both arms, and the recipe's interleaved A/B trains each arm exactly as the
A/B run one arm after the other does, with each arm's clock counting its own turns only."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from sat_testing import tiny_recipe_args

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `recipes` is a folder of scripts at the repository root, not an installed package

from recipes import cpt, preflight, sft  # noqa: E402
from recipes.preflight import RecipeError  # noqa: E402
from recipes.report import METRICS_FILE, format_summary  # noqa: E402
from recipes.turns import OtherArmFailed, Turns, run_in_turns  # noqa: E402

pytestmark = pytest.mark.usefixtures("restore_trl_lm_head")


def test_arms_run_one_step_each_in_turn_and_the_longer_one_finishes_alone():
    events: list[str] = []

    def arm(name: str, steps: int):
        def train(between_steps):
            for step in range(steps):
                events.append(f"{name}{step}")
                between_steps()
            return name

        return train

    results = run_in_turns({"a": arm("a", 3), "b": arm("b", 5)}, order=["b", "a"])
    assert results == {"a": "a", "b": "b"}
    assert events == ["b0", "a0", "b1", "a1", "b2", "a2", "b3", "b4"]


def test_each_arm_draws_the_random_numbers_it_would_draw_alone():
    def draws(between_steps=None) -> list[float]:
        torch.manual_seed(0)
        random.seed(1)
        out = []
        for _ in range(4):
            out += [torch.rand(()).item(), random.random()]
            if between_steps is not None:
                between_steps()
        return out

    alone = draws()
    results = run_in_turns({"a": draws, "b": draws}, order=["a", "b"])
    assert results["a"] == alone and results["b"] == alone


def test_a_failing_arm_stops_the_other_and_its_error_is_raised():
    reached: list[int] = []

    def failing(between_steps):
        between_steps()
        raise ValueError("boom")

    def waiting(between_steps):
        for step in range(10):
            reached.append(step)
            between_steps()

    with pytest.raises(ValueError, match="boom"):
        run_in_turns({"fails": failing, "waits": waiting}, order=["fails", "waits"])
    assert reached == [0]  # it waited for its second turn and stopped there


def test_an_interrupted_run_stops_every_arm_at_the_end_of_its_turn():
    import _thread

    steps: dict[str, int] = {"a": 0, "b": 0}
    threads_before = set(threading.enumerate())

    def arm(name: str):
        def train(between_steps):
            for _ in range(1000):
                steps[name] += 1
                if name == "a" and steps[name] == 3:
                    _thread.interrupt_main()  # Ctrl-C: KeyboardInterrupt in the calling thread
                time.sleep(0.01)
                between_steps()

        return train

    with pytest.raises(KeyboardInterrupt):
        run_in_turns({"a": arm("a"), "b": arm("b")}, order=["a", "b"])
    for thread in set(threading.enumerate()) - threads_before:
        thread.join(timeout=5)
        assert not thread.is_alive()
    assert steps["a"] < 100 and steps["b"] < 100  # of 1000: both stopped soon after the interruption


def test_wait_is_the_other_arms_turn_and_misuse_is_refused():
    turns = Turns(["a", "b"])
    assert turns.take("a") < 0.1
    waited: list[float] = []
    other = threading.Thread(target=lambda: waited.append(turns.take("b")))
    other.start()
    time.sleep(0.3)
    with pytest.raises(RuntimeError, match="does not hold"):
        turns.hand_on("b")
    turns.hand_on("a")
    other.join()
    assert waited[0] >= 0.3 and turns.holder == "b"
    turns.fail("b")
    with pytest.raises(OtherArmFailed):
        turns.take("a")
    with pytest.raises(ValueError, match="distinct"):
        Turns(["a", "a"])
    with pytest.raises(ValueError, match="name every arm"):
        run_in_turns({"a": lambda between_steps: None}, order=["a", "b"])


needs_openmp_workers = pytest.mark.skipif(
    torch.get_num_threads() < 2 or not Path("/proc/self/task").is_dir(),
    reason="needs OpenMP worker threads (2+ intra-op threads) and Linux's /proc",
)


def _run_counting(script: str) -> list[int]:
    """The integers a thread-counting ``script`` prints, run in a process of its own: in this one, a thread left by
    another test could end while it counts."""
    args = [sys.executable, "-c", script, str(ROOT), str(ROOT / "tests")]
    result = subprocess.run(args, capture_output=True, text=True, timeout=120, check=True)
    return [int(value) for value in result.stdout.split()]


RELEASE_SCRIPT = """
import sys
import torch
sys.path[:0] = sys.argv[1:3]  # the repository, the tests
from recipes.turns import release_openmp_threads
from sat_testing import os_threads as threads

torch.ones(1 << 20).add_(1)  # far above ATen's grain size: every OpenMP thread takes part
with_pool = threads()
released = release_openmp_threads()
without = threads(with_pool - (torch.get_num_threads() - 1))
torch.ones(1 << 20).add_(1)
print(torch.get_num_threads() - 1, with_pool, int(released), without, threads(with_pool))
"""


@needs_openmp_workers
def test_releasing_openmp_threads_ends_the_calling_threads_workers_until_its_next_parallel_operator():
    workers, with_pool, released, without, again = _run_counting(RELEASE_SCRIPT)
    assert workers > 0 and released and without == with_pool - workers and again == with_pool


TURNS_SCRIPT = """
import sys
import torch
sys.path[:0] = sys.argv[1:3]  # the repository, the tests
from recipes.turns import run_in_turns
from sat_testing import os_threads as threads

alone = threads()  # before any parallel operator: no OpenMP workers yet
torch.ones(1 << 20).add_(1)  # the main thread's pool, released when the arms start
running = alone + 2 + torch.get_num_threads() - 1  # the two arms' threads and the workers of the one running
counts = []

def arm(between_steps):
    for _ in range(3):
        torch.ones(1 << 20).add_(1)
        counts.append(threads(running))
        between_steps()

run_in_turns({"a": arm, "b": arm}, order=["a", "b"])
print(alone, " ".join(map(str, counts)), threads(alone))
"""


@needs_openmp_workers
def test_only_the_arm_holding_the_turn_keeps_openmp_workers():
    """Idle pools' threads would count against the cores and slow every parallel region of the arm that runs."""
    alone, *counts, after = _run_counting(TURNS_SCRIPT)
    # the two arms' threads and the workers of the one running; the arms' threads gone after, the main's pool too
    assert counts == [alone + 2 + torch.get_num_threads() - 1] * 6
    assert after == alone


def test_interleaved_ab_trains_each_arm_as_the_sequential_ab(tiny_model_dir, chat_file, tmp_path, monkeypatch):
    """LoRA SFT (random adapter initialization, shuffled data): the same per-step losses, held-out losses and batches
    as the A/B run one arm after the other; the arms' steps alternate; a dense step's extra time stays off SAT's
    clock."""
    from trl import SFTTrainer

    batches: list[tuple[str, list]] = []  # (arm, input ids) of every training micro-batch, in the order they ran
    training_step = SFTTrainer.training_step

    def recording_step(self, model, inputs, *args, **kwargs):
        arm = "dense" if Path(self.args.output_dir).name == "dense" else "sat"
        batches.append((arm, inputs["input_ids"].tolist()))
        if arm == "dense" and Path(self.args.output_dir).parent.name == "interleaved":
            time.sleep(0.5)  # a slow dense step: the SAT arm waits for it, off its clock
        return training_step(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(SFTTrainer, "training_step", recording_step)
    sequential = sft.main(
        *tiny_recipe_args(sft, tiny_model_dir, chat_file, tmp_path / "sequential", "--compare_dense", "true")
    )
    sequential_batches, batches[:] = list(batches), []
    interleave = ("--compare_dense", "true", "--interleave_arms", "true")
    interleaved = sft.main(*tiny_recipe_args(sft, tiny_model_dir, chat_file, tmp_path / "interleaved", *interleave))

    assert [arm for arm, _ in batches] == ["sat", "dense"] * 6
    assert sorted(batches) == sorted(sequential_batches)  # the same batches in each arm
    for run in (sequential, interleaved):
        run["train_losses"] = [entry["loss"] for entry in run["log_history"] if "loss" in entry]
        run["dense_losses"] = [entry["loss"] for entry in run["compare_dense"]["dense_log_history"] if "loss" in entry]
    assert interleaved["train_losses"] == sequential["train_losses"]
    assert interleaved["dense_losses"] == sequential["dense_losses"]
    held_out = [[(p["step"], p["eval_loss"]) for p in run["eval_curve"]] for run in (sequential, interleaved)]
    assert held_out[0] == held_out[1]
    compare = json.loads((tmp_path / "interleaved" / METRICS_FILE).read_text())["compare_dense"]
    assert compare["interleaved_arms"] is True and sequential["compare_dense"]["interleaved_arms"] is False
    assert compare["eval_loss_at_equal_steps"] == pytest.approx(
        sequential["compare_dense"]["eval_loss_at_equal_steps"]
    )
    # SAT waited through at least five 0.5 s dense steps; none of it is on its clock, all of it on dense's.
    assert interleaved["time_between_steps_s"] < 1.0
    assert compare["train_seconds"]["dense"] >= 3.0
    assert "the arms trained in turns step by step" in format_summary(interleaved)


@pytest.mark.parametrize("interleave", [False, True])
def test_memory_release_and_model_loading_come_before_training(
    interleave, tiny_model_dir, text_file, tmp_path, monkeypatch
):
    """Sequential: memory released before each arm, both start from the same allocator state. In turns: released
    once, before both (released when the second arm starts, it would take back the pages of the first arm's first
    step), and both models are loaded before either trains; only the SAT arm draws a progress bar in turns."""
    from transformers import Trainer

    from recipes import common

    events: list[str] = []
    monkeypatch.setattr(common.cpu_allocator, "release_free_memory", lambda: events.append("release"))
    load_model = common.load_model

    def recording_load(model_path, model_args, training_args):
        events.append("load " + Path(training_args.output_dir).name)
        return load_model(model_path, model_args, training_args)

    monkeypatch.setattr(common, "load_model", recording_load)
    train = Trainer.train

    bars = {}

    def recording_train(self, *args, **kwargs):
        events.append("train " + Path(self.args.output_dir).name)
        bars[Path(self.args.output_dir).name] = not self.args.disable_tqdm
        return train(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "train", recording_train)
    ab = ("--compare_dense", "true", "--interleave_arms", str(interleave).lower(), "--disable_tqdm", "false")
    cpt.main(*tiny_recipe_args(cpt, tiny_model_dir, text_file, tmp_path / "run", *ab))
    if interleave:
        assert events == ["release", "load run", "load dense", "train run", "train dense"]
        assert bars == {"run": True, "dense": False}  # one progress bar on the terminal: the SAT arm's
    else:
        assert events == ["release", "load run", "train run", "release", "load dense", "train dense"]
        assert bars == {"run": True, "dense": True}


def test_each_step_records_the_page_faults_between_its_begin_and_end(monkeypatch):
    from types import SimpleNamespace as Usage

    from recipes import measure

    counter = iter(range(0, 1000, 7))  # the process's fault counts, 7 more major and 21 more minor at every reading
    monkeypatch.setattr(
        measure.resource, "getrusage", lambda who: Usage(ru_majflt=(n := next(counter)), ru_minflt=3 * n + 5)
    )
    recorder = measure.RunRecorder()
    state = SimpleNamespace(global_step=0)
    for step in (1, 2):
        recorder.on_step_begin(None, state, None)
        state.global_step = step
        recorder.on_step_end(None, state, None)
    assert [r["major_page_faults"] for r in recorder.steps] == [7, 7]
    assert [r["minor_page_faults"] for r in recorder.steps] == [21, 21]


def test_interleaving_needs_the_ab_and_one_process(tiny_model_dir, text_file, tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="`interleave_arms` interleaves the arms of `compare_dense`"):
        cpt.main(*tiny_recipe_args(cpt, tiny_model_dir, text_file, tmp_path, "--interleave_arms", "true"))
    monkeypatch.setattr(preflight, "PartialState", lambda: SimpleNamespace(num_processes=2))
    interleave = ("--compare_dense", "true", "--interleave_arms", "true")
    with pytest.raises(RecipeError, match="cannot interleave the collectives of a multi-process launch"):
        cpt.main(*tiny_recipe_args(cpt, tiny_model_dir, text_file, tmp_path, *interleave))
