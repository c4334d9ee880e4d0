"""SATCallback inside real training loops (transformers ``Trainer`` and TRL ``SFTTrainer``) on a tiny Llama:
the logged rates follow the ladder and end at 0, every log entry carries the ``sat/*`` metrics (also for callbacks
that run before SATCallback, as the ``report_to`` integrations do), LoRA / full-parameter SAT train, evaluation is
dense, resume continues the schedule, and bad set-ups fail before the first step."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from sat_testing import (
    SAT_KEYS,
    lm_dataset,
    paper_config,
    sat_blocks,
    text_dataset,
    tiny_llama,
    tiny_tokenizer,
    train_logs,
    training_args,
)
from transformers import Trainer, TrainerCallback, TrainerState

from peft_sat import SATCallback, SATConfig, get_sat_state, omission_rate_at

# "uniform" scores keep these tests about the schedule, not the importance metric; r = 0.5 of 2 KV groups / 128
# channels is exactly half of every block. Rates as scheduled: timing-dependent rates are tests/test_crossover.py's.
CONFIG = dict(omission_rate=0.5, importance="uniform", dense_when_slower=False)
STEPS = 8


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls run faster on one thread, and on a machine shared with other jobs intra-op threads spinning
    against other processes make these Trainer runs many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def expected_rates(config: SATConfig, steps: int = STEPS) -> list[float]:
    """A log at ``global_step`` g reports the rate of the step just finished, step g - 1."""
    return [omission_rate_at(config, g - 1, steps) for g in range(1, steps + 1)]


class LogRecorder(TrainerCallback):
    """Stands where the ``report_to`` integrations stand: before SATCallback in the callback list."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


# ---- Trainer -------------------------------------------------------------------------------------------------


def test_trainer_logs_follow_the_ladder_and_reach_every_logger(tmp_path):
    config = paper_config(**CONFIG)
    recorder = LogRecorder()
    model = tiny_llama()
    trainer = Trainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=lm_dataset(),
        callbacks=[recorder, SATCallback(config)],
    )
    trainer.train()

    logs = train_logs(trainer.state.log_history)
    assert [entry["step"] for entry in logs] == list(range(1, STEPS + 1))
    assert [entry["sat/omission_rate"] for entry in logs] == pytest.approx(expected_rates(config))
    assert logs[0]["sat/omission_rate"] == 0.5 and logs[-1]["sat/omission_rate"] == 0.0
    assert logs[0]["sat/kept_fraction"] == 0.5 and logs[-1]["sat/kept_fraction"] == 1.0
    for entry in trainer.state.log_history + recorder.logs:  # train steps and the final summary, history and callbacks
        assert all(key in entry for key in SAT_KEYS), entry
    saved = [entry["sat/dense_steps_saved"] for entry in logs]
    assert all(a <= b for a, b in zip(saved, saved[1:])) and saved[-1] > 0
    assert logs[-1]["sat/flops_saved_fraction"] == pytest.approx(saved[-1] / STEPS, abs=1e-6)
    # the model trained sparse, and the Trainer is left as found
    assert sat_blocks(model) and all(block.sat_last_kept is not None for _, block in sat_blocks(model))
    assert "log" not in trainer.__dict__


def test_rate_is_set_once_per_optimizer_step(tmp_path):
    config = paper_config(**CONFIG)
    model = tiny_llama()
    seen: list[float] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(get_sat_state(module).omission_rate))
    args = training_args(tmp_path, per_device_train_batch_size=1, gradient_accumulation_steps=2)
    Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[SATCallback(config)]).train()
    # every micro-batch of an accumulation window runs at its optimizer step's rate
    assert seen == [omission_rate_at(config, step, STEPS) for step in range(STEPS) for _ in range(2)]


def test_evaluation_inside_training_is_dense(tmp_path):
    config = paper_config(**CONFIG)
    model = tiny_llama()
    records: list[tuple[bool, bool, float]] = []  # (training mode, sparse forward, rate) per MLP forward
    mlp = model.model.layers[0].mlp

    def record(module, args):
        records.append((module.training, module.sat_is_sparse(), module.sat_state.omission_rate))

    class HookOnTrainBegin(TrainerCallback):  # the block becomes a SAT block only in SATCallback.on_train_begin
        def on_train_begin(self, args, state, control, **kwargs):
            mlp.register_forward_pre_hook(record)

    args = training_args(tmp_path, eval_strategy="steps", eval_steps=2, per_device_eval_batch_size=4)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(),
        eval_dataset=lm_dataset(num_rows=4, seed=1),
        callbacks=[recorder := LogRecorder(), SATCallback(config), HookOnTrainBegin()],
    )
    trainer.train()
    evals = [r for r in records if not r[0]]
    assert evals and any(rate > 0 for _, _, rate in evals), "an evaluation must happen while the rate is > 0"
    assert not any(sparse for _, sparse, _ in evals)
    assert any(sparse for training, sparse, _ in records if training)
    # Eval rows report what ran: no sat/* keys (evaluation is dense), in the history and for every logger; the
    # training rows around them, and the summary row after the last evaluation, keep them.
    eval_logs = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    assert len(eval_logs) == STEPS // 2
    assert [entry for entry in eval_logs + recorder.logs if "eval_loss" in entry and set(entry) & set(SAT_KEYS)] == []
    assert len([entry for entry in recorder.logs if "eval_loss" in entry]) == STEPS // 2
    other_logs = [entry for entry in trainer.state.log_history + recorder.logs if "eval_loss" not in entry]
    assert other_logs and all(all(key in entry for key in SAT_KEYS) for entry in other_logs)
    assert "eval_loss" in trainer.state.log_history[-2] and "train_runtime" in trainer.state.log_history[-1]


def test_full_parameter_sat_from_get_peft_model(tmp_path):
    config = paper_config(**CONFIG, ladder_rungs=2)
    model = get_peft_model(tiny_llama(), config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    recorder = LogRecorder()
    # no config: the callback drives the SAT already on the model, with that model's schedule
    trainer = Trainer(
        model=model, args=training_args(tmp_path), train_dataset=lm_dataset(), callbacks=[recorder, SATCallback()]
    )
    trainer.train()
    logs = train_logs(trainer.state.log_history)
    assert [entry["sat/omission_rate"] for entry in logs] == pytest.approx(expected_rates(config))
    assert logs[-1]["sat/omission_rate"] == 0.0
    changed = [name for name, p in model.named_parameters() if not torch.equal(before[name], p)]
    assert any("mlp.gate_proj" in name for name in changed) and any("self_attn.q_proj" in name for name in changed)


def test_resume_from_checkpoint_continues_the_schedule(tmp_path):
    # "magnitude" scores depend on the weights only, so the resumed run selects the same sub-networks as the
    # uninterrupted one and the losses must agree too.
    config = paper_config(omission_rate=0.5, importance="magnitude", ladder_rungs=2, dense_when_slower=False)
    args = training_args(tmp_path / "run", save_strategy="steps", save_steps=4)
    full = Trainer(model=tiny_llama(), args=args, train_dataset=lm_dataset(), callbacks=[SATCallback(config)])
    full.train()
    reference = train_logs(full.state.log_history)

    args = training_args(tmp_path / "resumed", save_strategy="no")
    resumed = Trainer(model=tiny_llama(seed=1), args=args, train_dataset=lm_dataset(), callbacks=[SATCallback(config)])
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-4"))
    continued = train_logs(resumed.state.log_history)[-4:]  # log_history also holds the 4 steps before the checkpoint

    assert [entry["step"] for entry in continued] == [5, 6, 7, 8]
    for mine, theirs in zip(continued, reference[4:]):
        assert {key: mine[key] for key in SAT_KEYS} == pytest.approx({key: theirs[key] for key in SAT_KEYS})
        assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4)
    assert continued[-1]["sat/omission_rate"] == 0.0


# ---- TRL SFTTrainer ------------------------------------------------------------------------------------------


def test_sft_trainer_with_lora_and_sat_callback(tmp_path):
    from trl import SFTConfig, SFTTrainer

    config = paper_config(**CONFIG)
    recorder = LogRecorder()
    trainer = SFTTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, cls=SFTConfig, max_length=32),
        train_dataset=text_dataset(),
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        callbacks=[recorder, SATCallback(config)],
    )
    model = trainer.model  # the LoRA PeftModel, created inside the trainer; SAT is applied at train begin
    assert get_sat_state(model) is None
    lora = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    frozen = {name: p.detach().clone() for name, p in model.named_parameters() if not p.requires_grad}
    assert lora and all("lora_" in name for name in lora)
    trainer.train()

    assert get_sat_state(model) is not None and len(sat_blocks(model)) == 4  # 2 layers x (mlp, self_attn)
    logs = train_logs(trainer.state.log_history)
    assert [entry["sat/omission_rate"] for entry in logs] == pytest.approx(expected_rates(config))
    assert logs[-1]["sat/omission_rate"] == 0.0
    assert all(key in entry for entry in recorder.logs for key in SAT_KEYS)
    params = dict(model.named_parameters())
    assert all(not torch.equal(lora[name], params[name]) for name in lora if "lora_B" in name)
    assert all(torch.equal(frozen[name], params[name]) for name in frozen)


@pytest.mark.parametrize("dense_tokens", ["auto", "none"], ids=["split", "unsplit"])
@pytest.mark.parametrize("labelled_only", [False, True], ids=["every-row", "labelled-only"])
def test_sft_estimate_leaves_out_the_head_that_trls_fused_loss_runs(
    tmp_path, monkeypatch, labelled_only, dense_tokens
):
    """SFTTrainer computes its loss with TRL's fused LM head, which reads the head's weight: the logged estimate
    counts the context rows' saving in the blocks only (``SATState.head_split_forwards``). The head runs every row
    on a CPU, or the labelled rows only where TRL's ``_use_triton`` says so (CUDA; the recipes' CPU patch): then
    the dense step's head costs the share of positions carrying loss, and the estimate is taken against it, whether
    the batch splits or not (``dense_tokens="none"``, the paper's SFT)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer
    from trl.trainer import utils as trl_utils

    from peft_sat.flops import SATFlopsEstimator
    from peft_sat.tokens import loss_positions

    if labelled_only:
        monkeypatch.setattr(trl_utils, "_use_triton", lambda device: True)
    words = text_dataset(num_rows=32, words=6)["text"]
    data = Dataset.from_dict({"prompt": words[:16], "completion": words[16:]})
    config = SATConfig(**CONFIG, dense_tokens=dense_tokens)  # defaults: context rows forward only
    trainer = SFTTrainer(
        model=tiny_llama(),
        args=training_args(tmp_path, cls=SFTConfig, max_length=32),
        train_dataset=data,
        processing_class=tiny_tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        callbacks=[SATCallback(config)],
    )
    loss_shares = []  # per training forward (one per step): positions carrying loss / positions
    live_shares = []  # with a split: positions up to each sequence's last one carrying loss / positions

    def record(module, args, kwargs):
        if module.training:
            carries = loss_positions(kwargs.get("labels"), kwargs.get("shift_labels"))
            loss_shares.append(carries.sum().item() / carries.numel())
            dense = carries & kwargs["attention_mask"].bool()
            last = torch.where(dense.any(1), dense.shape[1] - 1 - dense.flip(1).int().argmax(1), -1)
            live_shares.append((last + 1).sum().item() / carries.numel())

    trainer.model.register_forward_pre_hook(record, with_kwargs=True)
    trainer.train()

    logs = train_logs(trainer.state.log_history)
    estimator = SATFlopsEstimator(trainer.model, get_sat_state(trainer.model))
    assert len(loss_shares) == len(logs) and all(0 < share < 1 for share in loss_shares)
    split = dense_tokens == "auto"
    sparse_steps = [(e, share) for e, share in zip(logs, loss_shares) if e["sat/omission_rate"] > 0]
    assert sparse_steps and all((0 < e["sat/dense_token_fraction"] < 1) == split for e, _ in sparse_steps)
    if split:  # the split's dense rows are the positions carrying loss
        assert all(e["sat/dense_token_fraction"] == pytest.approx(share) for e, share in sparse_steps)

    if split:  # right padding: the MLP skipped the rows after each sequence's last loss position
        assert any(share < 1 for share in live_shares)
        assert all(
            e["sat/live_token_fraction"] == pytest.approx(live) for (e, _), live in zip(sparse_steps, live_shares)
        )
    else:
        assert all(e["sat/live_token_fraction"] == 1 for e in logs)

    def saved(head_share: float, labelled_rows: bool = False) -> float:
        return sum(
            estimator.step_saving(
                config,
                e["sat/omission_rate"],
                e["sat/dense_token_fraction"],
                head_share,
                share if labelled_rows else 1,
                e["sat/live_token_fraction"],
            )
            for e, share in zip(logs, loss_shares)
        )

    assert saved(0.0) < saved(0.0, labelled_rows=True)
    if split:
        assert saved(0.0, labelled_rows=True) < saved(1.0)
    assert logs[-1]["sat/dense_steps_saved"] == pytest.approx(saved(0.0, labelled_only), rel=1e-5)


# ---- set-ups that must fail before the first step --------------------------------------------------------------


def _trainer(tmp_path, model, *callbacks, **arg_overrides) -> Trainer:
    return Trainer(
        model=model,
        args=training_args(tmp_path, **arg_overrides),
        train_dataset=lm_dataset(),
        callbacks=list(callbacks),
    )


def test_schedule_that_does_not_fit_max_steps_fails_before_training(tmp_path):
    model = tiny_llama()
    trainer = _trainer(tmp_path, model, SATCallback(paper_config(ladder_rungs=10)))
    with pytest.raises(ValueError, match="`ladder_rungs`=10 does not fit `total_steps`=8"):
        trainer.train()
    assert trainer.state.global_step == 0 and get_sat_state(model) is None


def test_callback_without_config_needs_sat_on_the_model(tmp_path):
    with pytest.raises(ValueError, match=r"`SATCallback\(\)` without a config needs a model that already carries SAT"):
        _trainer(tmp_path, tiny_llama(), SATCallback()).train()


def test_callback_config_must_agree_with_the_models_sat(tmp_path):
    model = get_peft_model(tiny_llama(), paper_config(**CONFIG))
    with pytest.raises(ValueError, match=r"different schedule .*`ladder_rungs`: 2 vs 3"):
        _trainer(tmp_path, model, SATCallback(paper_config(**CONFIG, ladder_rungs=2))).train()


def test_train_base_that_would_bypass_the_optimizer_is_refused(tmp_path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"`train_base`=True would change `requires_grad` of \d+ parameters"):
        _trainer(tmp_path, model, SATCallback(paper_config(**CONFIG, train_base=True))).train()
    assert get_sat_state(model) is None
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags


def test_bad_callback_config_type():
    with pytest.raises(TypeError, match="`config` must be a SATConfig"):
        SATCallback(config=0.5)
    assert SATCallback({"omission_rate": 0.3}).config.omission_rate == 0.3
    with pytest.raises(ValueError, match="did you mean `omission_rate`"):
        SATCallback({"omision_rate": 0.3})


# ---- without a Trainer, and the FLOPs estimate -----------------------------------------------------------------


def test_fallback_logging_without_a_trainer():
    """Driven by hand (no Trainer on the stack), the metrics still reach ``logs`` and the log history."""
    model = tiny_llama()
    callback = SATCallback(paper_config(**CONFIG))
    state = TrainerState(max_steps=STEPS)
    callback.on_train_begin(None, state, None, model=model)
    for _ in range(3):
        callback.on_step_begin(None, state, None)
        state.global_step += 1
        callback.on_step_end(None, state, None)
    logs = {"loss": 1.0}
    state.log_history.append({**logs, "step": state.global_step})
    callback.on_log(None, state, None, logs=logs)
    assert logs["sat/omission_rate"] == 0.5 and logs["sat/dense_steps_saved"] == pytest.approx(3 * 0.45)
    assert state.log_history[-1]["sat/kept_fraction"] == 0.5


@pytest.mark.parametrize("frozen_base", [True, False])
def test_weight_grad_on_a_frozen_base_warns_that_it_saves_nothing(tmp_path, frozen_base):
    """`sparse_pass="weight_grad"` slices base-weight gradients only: under LoRA an unsplit batch trains dense."""
    model = tiny_llama()
    if frozen_base:
        model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"]))
    config = SATConfig(
        **CONFIG, sparse_pass="weight_grad", schedule="constant", train_base=None if frozen_base else True
    )
    trainer = _trainer(tmp_path, model, SATCallback(config), max_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    warned = [
        w for w in caught if "`sparse_pass`='weight_grad' slices only the gradients of base weights" in str(w.message)
    ]
    assert len(warned) == (1 if frozen_base else 0)
