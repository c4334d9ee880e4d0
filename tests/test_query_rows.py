"""``peft_sat.query_rows``: with dense tokens, the omitted heads attend at the dense rows' queries only, and compute
there what the attention over every query computes; with context rows forward only, the attention's backward runs
for the dense rows' queries only, with the gradients of the whole backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sat_testing import (
    assert_matches_masked_reference,
    batch,
    build_stack,
    paper_config,
    sat_model,
)

import peft_sat
from peft_sat.query_rows import QueryRows, attention_grad_at_slots


def test_slots_of_uneven_sequences():
    rows = torch.tensor([1, 2, 3, 14])  # (3, 5) grid: sequence 0 holds three dense rows, 1 none, 2 one
    slots = QueryRows.of(rows, batch=3, seq=5)
    assert slots.positions.tolist() == [[1, 2, 3], [4, 4, 4], [4, 4, 4]]  # padding repeats the last row, or T - 1
    assert slots.gather.tolist() == [1, 2, 3, 9, 9, 9, 14, 14, 14]
    assert slots.valid.tolist() == [0, 1, 2, 6]
    even = QueryRows.of(torch.tensor([1, 2, 6, 7]), batch=2, seq=4)
    assert even.valid is None and even.positions.tolist() == [[1, 2], [2, 3]]


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padding-mask"])
def test_slot_attention_equals_the_full_attention_at_the_rows(padded):
    """Output and q / k / v gradients of the slots' attention (torch's CPU kernel, grouped K / V, additive mask
    rows) equal those of the attention over every query, at the rows; padding slots add nothing."""
    batch_size, heads, kv_heads, seq, dim = 4, 4, 2, 9, 8
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch_size, n, seq, dim, generator=generator) for n in (heads, kv_heads, kv_heads))
    rows = torch.tensor([3, 4, 6, 13, 24, 25, 26])  # three rows in sequence 0, one in 1, three in 2, none in 3
    mask = None  # transformers passes none for causal SDPA without padding
    if padded:  # right padding on sequence 0, as transformers' SDPA bool mask (True: attend)
        positions = torch.arange(seq)
        real = torch.ones(batch_size, seq, dtype=torch.bool)
        real[0, 7:] = False
        mask = (positions[None, :] <= positions[:, None])[None, None] & real[:, None, None, :]
    upstream = torch.randn(rows.numel(), heads * dim, generator=generator)

    def every_query(q, k, v):
        k, v = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        output = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return output.transpose(1, 2).reshape(batch_size * seq, heads * dim).index_select(0, rows)

    def slots_only(q, k, v):
        slots = QueryRows.of(rows, batch_size, seq)
        slot_mask = slots.mask(mask, seq, causal_if_none=True, dtype=q.dtype)
        output = F.scaled_dot_product_attention(slots.queries(q), k, v, attn_mask=slot_mask, enable_gqa=True)
        return slots.dense(output.transpose(1, 2).reshape(-1, heads * dim))

    results = []
    for attend in (every_query, slots_only):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        output = attend(*leaves)
        (output * upstream).sum().backward()
        results.append([output, *(t.grad for t in leaves)])
    for name, ours, reference in zip(("output", "dq", "dk", "dv"), *reversed(results), strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("padded", [False, True], ids=["causal", "padding-mask"])
def test_attention_with_a_backward_at_the_slots_equals_the_whole_attention(padded):
    """``attention_grad_at_slots``: the forward of every query, bit for bit, and where only the rows' outputs take a
    gradient, the same q / k / v gradients as the kernel's backward over every query; it saves less."""
    batch_size, heads, kv_heads, seq, dim = 4, 6, 2, 9, 8
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(batch_size, n, seq, dim, generator=generator) for n in (heads, kv_heads, kv_heads))
    rows = torch.tensor([3, 4, 6, 13, 24, 25, 26])  # uneven: padding slots in sequences 1 and 3
    mask = None
    if padded:  # right padding on sequence 0
        positions = torch.arange(seq)
        real = torch.ones(batch_size, seq, dtype=torch.bool)
        real[0, 7:] = False
        mask = (positions[None, :] <= positions[:, None])[None, None] & real[:, None, None, :]
    upstream = torch.zeros(batch_size * seq, heads, dim)
    upstream.index_copy_(0, rows, torch.randn(rows.numel(), heads, dim, generator=generator))
    upstream = upstream.view(batch_size, seq, heads, dim).transpose(1, 2)  # zero at every other row
    slots = QueryRows.of(rows, batch_size, seq)

    def whole(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)

    def at_slots(q, k, v):
        return attention_grad_at_slots(q, k, v, mask, slots, None)

    results, saved = [], []
    for attend in (whole, at_slots):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        storages: dict[int, int] = {}

        def pack(tensor, storages=storages):
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            output = attend(*leaves)
        (output * upstream).sum().backward()
        results.append([output, *(t.grad for t in leaves)])
        saved.append(sum(storages.values()))
    assert torch.equal(results[1][0], results[0][0]), "the forward must be the kernel's own"
    for name, ours, reference in zip(("dq", "dk", "dv"), results[1][1:], results[0][1:], strict=True):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-6, msg=name)
    assert saved[1] < saved[0], f"saved {saved[1]} bytes, the whole attention {saved[0]}"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("stack", ["full", "lora"])
def test_a_sequence_without_dense_rows_trains_as_the_masked_reference(stack, attn):
    """A batch whose second sequence carries no loss: its query slots only repeat a row, and the step still equals
    the masked dense reference; the omitted heads ran on the slots."""
    config = paper_config(omission_rate=0.5, dense_tokens="loss")
    models = build_stack(stack, "llama", attn, config)
    inputs = batch(prompt=8)
    inputs["labels"][1] = -100
    assert_matches_masked_reference(models.sat, models.reference, inputs)
    cache = peft_sat.get_sat_state(models.sat).batch.dense_rows_cache
    slots = [value for key, value in cache.items() if key[0] == "query_rows"]
    assert len(slots) == 1 and slots[0].positions.shape[0] == 2 and slots[0].valid is not None


@pytest.mark.parametrize("context_tokens", ["forward_only", "sparse"])
def test_a_batch_without_loss_positions_splits_with_no_dense_rows(context_tokens):
    """A micro-batch whose labels are all -100 (a completion truncated away) splits with no dense rows: the step
    runs; with context rows forward only nothing takes a gradient."""
    config = peft_sat.SATConfig(omission_rate=0.5, dense_tokens="auto", context_tokens=context_tokens)
    if context_tokens == "sparse":  # the paper's units and passes: the omitted heads' query slots
        config = paper_config(omission_rate=0.5, dense_tokens="auto")
    model = sat_model("lora", config).train()
    inputs = batch(prompt=8)
    inputs["labels"][:] = -100
    output = model(**inputs)
    rows = peft_sat.get_sat_state(model).dense_rows(inputs["labels"].shape)
    assert rows is not None and rows.numel() == 0
    output.logits.float().square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    if context_tokens == "forward_only":
        assert all(torch.count_nonzero(g) == 0 for g in grads)
    else:
        assert any(torch.count_nonzero(g) > 0 for g in grads)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("context_tokens", ["forward_only", "sparse"])
def test_packed_sequences_train_as_the_reference(context_tokens, attn):
    """TRL's padding-free batches: two prompt / completion pairs packed in each row (``position_ids`` restart at 0).
    Each dense row's query keeps its own sequence's mask row (transformers' block-causal mask, gathered), so the
    step equals the reference's."""
    config = peft_sat.SATConfig(omission_rate=0.5, dense_tokens="auto", context_tokens=context_tokens)
    if context_tokens == "sparse":
        config = paper_config(omission_rate=0.5, dense_tokens="auto")
    models = build_stack("lora", "llama", attn, config)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 64, (2, 20), generator=generator)
    position_ids = torch.cat([torch.arange(12), torch.arange(8)]).expand(2, -1)
    labels = input_ids.clone()
    labels[:, :5] = -100  # the first pair's prompt
    labels[:, 12:15] = -100  # the second pair's prompt (its first token is a sequence start)
    # no cache, as in training: transformers then builds its block-causal mask from the position ids
    inputs = {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "use_cache": False}
    assert_matches_masked_reference(models.sat, models.reference, inputs)
    rows = peft_sat.get_sat_state(models.sat).dense_rows(labels.shape)
    assert rows is not None and 0 < rows.numel() < labels.numel()


def test_every_block_of_a_forward_splits_the_same_context_rows_made_once(monkeypatch):
    """The positions outside the dense rows are made once per forward (on an accelerator ``nonzero`` waits for the
    device) and shared by every attention and MLP block; the next forward makes its own."""
    import peft_sat.blocks.base as base

    made = []
    complement = base.omitted_units
    monkeypatch.setattr(base, "omitted_units", lambda kept, n: made.append(complement(kept, n)) or made[-1])
    model = sat_model("full", peft_sat.SATConfig(omission_rate=0.5))  # the defaults: context rows forward only
    inputs = batch(prompt=6)
    seen = []
    for block in [m for m in model.modules() if hasattr(m, "sat_context_rows")]:
        original = block.sat_context_rows
        block.sat_context_rows = lambda rows, n, original=original: seen.append(original(rows, n)) or seen[-1]
    for forward in (1, 2):
        model(**inputs).loss.backward()
        assert len(made) == forward and len(seen) == 4 * forward  # tiny_model: two layers, attention and MLP each
        assert all(context is made[-1] for context in seen[-4:])
    rows, context = peft_sat.get_sat_state(model).batch.dense_rows_cache[("context", 48)]
    assert 0 < rows.numel() < 48 and sorted(rows.tolist() + context.tolist()) == list(range(48))
