"""Training arms of ``benchmarks/quality.py``: a dense or SAT model with its optimizer, trained by a plain loop.

One *arm* = one model + one AdamW + what it measured. ``run_lockstep`` trains several arms on the SAME batches,
alternating them step by step (the order flips every step) so that a slow patch of a shared, noisy CPU hits dense
and SAT alike; evaluation is dense (``model.eval()``: SAT blocks run the full model) and its time is excluded from
the training wall time. The omission rate of SAT step ``s`` of ``T`` is ``peft_sat.omission_rate_at(config, s, T)``,
set on the model's ``SATState`` before the step (what ``SATCallback`` does in a Trainer). The FLOPs a SAT step saves
are estimated (``SATFlopsEstimator``) from its rate, the config's ``sparse_pass`` and the share of dense token
positions the step's forwards measured (``SATState.dense_fractions``, cleared before each step).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from _quality_configs import config_record
from peft import LoraConfig, get_peft_model
from torch import nn

import peft_sat
from peft_sat.flops import SATFlopsEstimator

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class Arm:
    """A model in training and its measurements. ``sat_config`` None: the dense baseline; else the model's SAT
    config, ``sat_record`` the config as asked for (``config_record``) and ``flops`` the model's estimator."""

    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sat_config: peft_sat.SATConfig | None
    clip: float
    sat_record: dict | None = None
    flops: SATFlopsEstimator | None = None
    step_times: list[float] = field(default_factory=list)  # seconds, forward + backward + clip + step + zero_grad
    step_cpu_times: list[float] = field(default_factory=list)  # process CPU seconds of the same (less load-sensitive)
    train_losses: list[float] = field(default_factory=list)  # the (sparse, for SAT) training-batch loss
    rates: list[float] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)  # {"step", "train_time_s", "loss"}
    eval_time_s: float = 0.0
    dense_token_fractions: list[float] = field(default_factory=list)  # per step: dense positions / all (SAT)
    flops_saved_fractions: list[float] = field(default_factory=list)  # per step: estimate (SATFlopsEstimator)

    def train_step(self, batch, step: int, total_steps: int) -> None:
        rate, state = 0.0, None
        if self.sat_config is not None:
            rate = peft_sat.omission_rate_at(self.sat_config, step, total_steps)
            state = peft_sat.get_sat_state(self.model)
            state.set_omission_rate(rate)
            state.dense_fractions.clear()  # one share per forward from here
            state.live_fractions.clear()
        start, cpu_start = time.perf_counter(), time.process_time()
        loss = self.model(**batch.as_kwargs(), use_cache=False).loss
        loss.backward()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(params, self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step_times.append(time.perf_counter() - start)
        self.step_cpu_times.append(time.process_time() - cpu_start)
        self.train_losses.append(float(loss.detach()))
        self.rates.append(rate)
        if state is not None:
            shares = state.dense_fractions
            dense = sum(shares) / len(shares) if shares else 0.0  # no split (dense_tokens "none", rate 0): 0
            self.dense_token_fractions.append(dense)
            lives = state.live_fractions  # split forwards: the share of positions the blocks computed
            live = sum(lives) / len(lives) if lives else 1.0
            self.flops_saved_fractions.append(self.flops.step_saving(self.sat_config, rate, dense, live_fraction=live))

    def evaluate(self, step: int, batches) -> float:
        start = time.perf_counter()
        loss = held_out_loss(self.model, batches)
        self.eval_time_s += time.perf_counter() - start
        self.evals.append({"step": step, "train_time_s": sum(self.step_times), "loss": loss})
        return loss

    def summary(self) -> dict:
        return {
            "label": self.label,
            "sat_config": self.sat_record,
            "final_loss": self.evals[-1]["loss"],
            "train_time_s": sum(self.step_times),
            "train_cpu_s": sum(self.step_cpu_times),
            "eval_time_s": self.eval_time_s,
            "flops_saved_fraction_estimate": sum(self.flops_saved_fractions) / max(1, len(self.flops_saved_fractions)),
            "flops_saved_fractions": self.flops_saved_fractions,
            "dense_token_fractions": self.dense_token_fractions,
            "evals": self.evals,
            "step_times_s": self.step_times,
            "step_cpu_times_s": self.step_cpu_times,
            "train_losses": self.train_losses,
            "rates": self.rates,
        }


def held_out_loss(model: nn.Module, batches) -> float:
    """Token-weighted mean next-token loss over ``batches``, in eval mode (dense for SAT models)."""
    return _mean_loss(model, batches, training=False)


def sparse_loss(model: nn.Module, batches) -> float:
    """The same in training mode, without gradients: SAT blocks run their sparse sub-network."""
    return _mean_loss(model, batches, training=True)


@torch.no_grad()
def _mean_loss(model: nn.Module, batches, training: bool) -> float:
    was_training = model.training
    model.train(training)
    total, count = 0.0, 0
    for batch in batches:
        tokens = batch.num_loss_tokens
        total += float(model(**batch.as_kwargs(), use_cache=False).loss) * tokens
        count += tokens
    model.train(was_training)
    return total / count


def make_arm(
    label: str,
    base: nn.Module,
    variant: str,
    sat_config: peft_sat.SATConfig | None,
    lr: float,
    seed: int,
    total_steps: int,
    clip: float = 1.0,
) -> Arm:
    """A fresh copy of ``base`` as a full-parameter or LoRA (r16) model, with SAT when ``sat_config`` is given.

    LoRA adapters are initialized from ``seed`` so that the dense and SAT arms of a seed start identical.
    """
    model = copy.deepcopy(base)
    if variant == "full":
        if sat_config is not None:
            model = get_peft_model(model, copy.deepcopy(sat_config))  # full-parameter SAT: the base trains
        else:
            model.requires_grad_(True)
    elif variant == "lora":
        torch.manual_seed(seed)
        lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)
        if sat_config is not None:
            peft_sat.apply_sat(model, copy.deepcopy(sat_config))  # train_base None: only the adapters train
    else:
        raise ValueError(f"`variant` must be 'full' or 'lora', got {variant!r}.")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _adamw(params, lr)
    if sat_config is None:
        return Arm(label, model, optimizer, None, clip)
    state = peft_sat.get_sat_state(model)
    peft_sat.validate_schedule(state.config, total_steps)
    flops = SATFlopsEstimator(model, state)
    return Arm(label, model, optimizer, state.config, clip, config_record(sat_config), flops)


def _adamw(params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """AdamW without weight decay; fused (the Trainer's default kernel) when this torch has it for the device."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def run_lockstep(arms: list[Arm], batches: list, held_out: list, eval_steps: set[int], log=print) -> None:
    """Train ``arms`` on ``batches`` in alternation; evaluate every arm before step 0 and after each step in
    ``eval_steps`` (1-based counts of finished steps)."""
    total = len(batches)
    for arm in arms:
        arm.evaluate(0, held_out)
    log("  step 0: " + _eval_line(arms))
    for step, batch in enumerate(batches):
        for arm in arms if step % 2 == 0 else arms[::-1]:
            arm.train_step(batch, step, total)
        if step + 1 in eval_steps or step + 1 == total:
            for arm in arms:
                arm.evaluate(step + 1, held_out)
            log(f"  step {step + 1}: " + _eval_line(arms))


def _eval_line(arms: list[Arm]) -> str:
    return " | ".join(f"{a.label} loss {a.evals[-1]['loss']:.4f} t={a.evals[-1]['train_time_s']:.0f}s" for a in arms)
