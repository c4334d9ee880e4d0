"""torch.compile: SAT training compiles, matches eager, and recompiles a bounded number of times along the ladder.

Selection runs eagerly (``torch.compiler.disable``); the sliced forward is compiled with the kept indices as
inputs, so the first change of the kept count marks those sizes dynamic and later rungs reuse the graphs.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import get_peft_model
from sat_testing import batch, paper_config, tiny_model
from torch._dynamo.utils import counters

import peft_sat

LADDER = [0.5, 0.5, 0.375, 0.25, 0.125, 0.0, 0.0]


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_training_matches_eager_and_recompiles_boundedly():
    torch._dynamo.reset()
    counters.clear()
    eager = get_peft_model(tiny_model(), paper_config(omission_rate=0.5)).train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    graphs = []
    for step, rate in enumerate(LADDER):
        for m in (eager, model):
            peft_sat.get_sat_state(m).set_omission_rate(rate)
        inputs = batch(seed=step)
        eager_loss = eager(**inputs).loss
        compiled_loss = compiled(**inputs).loss
        compiled_loss.backward()
        eager_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=1e-5)
        graphs.append(_graphs())
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5, msg=name)

    first_change, sparse_rungs_done = LADDER.index(0.375), LADDER.index(0.0) - 1
    assert graphs[1] == graphs[0], "a repeated step must not recompile"
    assert graphs[sparse_rungs_done] == graphs[first_change], "later rungs must reuse the dynamic-shape graphs"
    assert graphs[-1] == graphs[-2], "the dense rung compiles once"
    assert graphs[-1] <= 2 * graphs[0] + 4, f"recompilations not bounded: {graphs}"


MODES_BEYOND_THE_PAPER = {
    "sparse-backward+token-split": dict(sparse_pass="backward", dense_tokens="auto", omit=["mlp"]),
    "weight-grad": dict(sparse_pass="weight_grad"),
    "context-forward-only": dict(dense_tokens="auto", context_tokens="forward_only"),
}


@pytest.mark.parametrize("mode", list(MODES_BEYOND_THE_PAPER))
def test_compiled_modes_beyond_the_paper_match_eager(mode):
    """The modes beyond the paper (custom autograd functions, data-dependent token rows, context rows without a
    graph) compile and train exactly as in eager mode."""
    torch._dynamo.reset()
    config = paper_config(omission_rate=0.5, schedule="constant", **MODES_BEYOND_THE_PAPER[mode])
    eager = get_peft_model(tiny_model(), config).train()
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    for step in range(3):
        inputs = batch(seed=step, prompt=8)
        compiled_loss = compiled(**inputs).loss
        eager_loss = eager(**inputs).loss
        compiled_loss.backward()
        eager_loss.backward()
        torch.testing.assert_close(compiled_loss, eager_loss, rtol=0, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-5, msg=name)
