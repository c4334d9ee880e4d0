"""Shared builders for the SAT test matrix: tiny models per family, adapter stacks, the masked dense reference."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import peft_sat
from peft_sat.blocks import SATAttentionMixin, SATBlockMixin, SATMLPMixin

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "phi3", "olmo2")
ATTENTION = ("eager", "sdpa")
STACKS = ("full", "lora", "qlora")
GRANULARITIES = ("kv_group", "q_head")
VOCAB = 128
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def default_attention(family: str) -> str:
    return "eager" if family == "gemma2" else "sdpa"  # transformers refuses sdpa for Gemma2 (softcapping)


def tiny_config(family: str, attn: str | None = None, **overrides):
    """Dimensions are multiples of 64 (the 4-bit block size: packed rows slice whole); 8 query heads in 4 KV groups."""
    kwargs = dict(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=16,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        attention_dropout=0.0,
        tie_word_embeddings=False,
    )
    if family == "phi3":  # Phi3 derives head_dim = hidden / heads and its default pad id exceeds the tiny vocab
        kwargs.update(hidden_size=128, pad_token_id=0)
    kwargs.update(overrides)
    config = AutoConfig.for_model(family, **kwargs)
    config._attn_implementation = attn or default_attention(family)
    return config


def tiny_model(family: str = "llama", attn: str | None = None, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    attn = attn or default_attention(family)
    model = AutoModelForCausalLM.from_config(tiny_config(family, attn, **overrides), attn_implementation=attn)
    if family == "qwen2":  # Qwen2 has q/k/v biases: make them non-zero so slicing them is tested
        with torch.no_grad():
            for module in model.modules():
                if isinstance(module, nn.Linear) and module.bias is not None:
                    module.bias.normal_(std=0.1)
    return model


def quantize_4bit(model: nn.Module, tmp_path, device_map: dict | None = None) -> nn.Module:
    """Reload ``model`` through transformers' bitsandbytes 4-bit path (nf4, double quant), on CPU unless
    ``device_map`` places it (e.g. ``{"": 0}`` for the first GPU)."""
    from transformers import BitsAndBytesConfig

    from peft_sat.bnb import disable_cpu_inference_repack

    model.save_pretrained(tmp_path)
    quantized = AutoModelForCausalLM.from_pretrained(
        tmp_path,
        quantization_config=BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32,
        ),
        dtype=torch.float32,
        device_map=device_map,
        attn_implementation=model.config._attn_implementation,
    )
    disable_cpu_inference_repack(quantized)  # tests run no-grad forwards before SAT is applied
    return quantized


def lora_config(**overrides) -> LoraConfig:
    # init_lora_weights=False: non-zero B, so LoRA terms contribute and equalities cannot pass trivially.
    kwargs = dict(r=4, lora_alpha=8, target_modules=ALL_PROJECTIONS, init_lora_weights=False, lora_dropout=0.0)
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def batch(seed: int = 1, batch_size: int = 2, seq_len: int = 24, pad: int = 5) -> dict[str, torch.Tensor]:
    """A batch with left padding on the first row (padding must be excluded from scoring)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :pad] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class Stack:
    """A SAT model and an identical model without SAT (the reference), both in training mode."""

    sat: nn.Module
    reference: nn.Module


def build_stack(stack: str, family: str, attn: str, sat_config: peft_sat.SATConfig, tmp_path=None) -> Stack:
    base = tiny_model(family, attn)
    if stack == "full":
        reference = copy.deepcopy(base)
        sat = get_peft_model(base, sat_config)
    elif stack in ("lora", "qlora"):
        if stack == "qlora":
            base = quantize_4bit(base, tmp_path)
        lora = get_peft_model(base, lora_config())
        reference = copy.deepcopy(lora)
        sat = peft_sat.apply_sat(lora, sat_config)
    else:
        raise ValueError(stack)
    return Stack(sat=sat.train(), reference=reference.train())


def inner(model: nn.Module) -> nn.Module:
    """The transformers model under any PEFT wrapping: names below it are the same with and without SAT."""
    return peft_sat.model._transformers_model(model)


def sat_blocks(model: nn.Module) -> list[tuple[str, SATBlockMixin]]:
    return [(name, m) for name, m in inner(model).named_modules() if isinstance(m, SATBlockMixin)]


def unit_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Per SAT block: a 0/1 mask over the inputs of its output projection (down_proj / o_proj) of the last step."""
    masks = {}
    for name, block in sat_blocks(model):
        kept = block.sat_last_kept
        assert kept is not None, f"{name} did not run a sparse forward"
        if isinstance(block, SATMLPMixin):
            mask = torch.zeros(block.sat_num_units)
            mask[kept.cpu()] = 1.0  # kept lives on the model's device (CUDA in tests/test_cuda.py)
        else:
            assert isinstance(block, SATAttentionMixin)
            num_heads = block.config.num_attention_heads
            head_mask = torch.zeros(num_heads)
            head_mask[kept.cpu()] = 1.0
            mask = head_mask.repeat_interleave(block.head_dim)
        masks[name] = mask
    return masks


@contextlib.contextmanager
def masked(reference: nn.Module, masks: dict[str, torch.Tensor]) -> Iterator[None]:
    """Zero the omitted units of ``reference`` by masking the input of each block's output projection."""
    handles = []
    modules = dict(inner(reference).named_modules())
    for name, mask in masks.items():
        block = modules[name]
        projection = block.down_proj if hasattr(block, "down_proj") else block.o_proj
        handles.append(projection.register_forward_pre_hook(lambda mod, args, m=mask: (args[0] * m.to(args[0]),)))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def train_step(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach()


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in inner(model).named_parameters() if p.grad is not None}


def _trainable_weights(projection: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(weights indexed by output row, weights indexed by input column) of a projection that require grad."""
    base = peft_sat.sliced.base_layer(projection)
    rows, cols = [], []
    if base.weight.requires_grad:
        rows.append(base.weight)
        cols.append(base.weight)
    for adapter in getattr(projection, "lora_A", {}):
        rows.append(projection.lora_B[adapter].weight)  # B (out, r): rows follow the output
        cols.append(projection.lora_A[adapter].weight)  # A (r, in): columns follow the input
    return rows, cols


def omitted_slices(block: SATBlockMixin) -> list[tuple[str, torch.Tensor, int, torch.Tensor]]:
    """(label, parameter, dim, indices) whose gradient must be exactly zero after a sparse step."""
    kept = block.sat_last_kept
    slices = []

    def add(label, projection, omitted_rows, omitted_cols):
        rows, cols = _trainable_weights(projection)
        slices.extend((label, w, 0, omitted_rows) for w in rows if omitted_rows is not None)
        slices.extend((label, w, 1, omitted_cols) for w in cols if omitted_cols is not None)

    if isinstance(block, SATMLPMixin):
        omitted = torch.tensor([i for i in range(block.sat_num_units) if i not in set(kept.tolist())])
        if hasattr(block, "gate_up_proj"):  # Phi3: gate rows then up rows
            add("gate_up", block.gate_up_proj, torch.cat([omitted, omitted + block.sat_num_units]), None)
        else:
            add("gate", block.gate_proj, omitted, None)
            add("up", block.up_proj, omitted, None)
        add("down", block.down_proj, None, omitted)
    else:
        d, groups = block.head_dim, block.num_key_value_groups
        num_heads = block.config.num_attention_heads
        kept_heads = set(kept.tolist())
        kept_kv = {h // groups for h in kept_heads}
        omitted_q = [h for h in range(num_heads) if h not in kept_heads]
        omitted_kv = [g for g in range(num_heads // groups) if g not in kept_kv]

        def rows_of(heads):
            return torch.tensor([h * d + j for h in heads for j in range(d)], dtype=torch.long)

        add("o", block.o_proj, None, rows_of(omitted_q))
        if hasattr(block, "qkv_proj"):  # Phi3: rows [q | k | v]
            q_size, kv_size = num_heads * d, num_heads // groups * d
            kv_rows = rows_of(omitted_kv)
            add(
                "qkv",
                block.qkv_proj,
                torch.cat([rows_of(omitted_q), q_size + kv_rows, q_size + kv_size + kv_rows]),
                None,
            )
        else:
            add("q", block.q_proj, rows_of(omitted_q), None)
            if omitted_kv:
                add("k", block.k_proj, rows_of(omitted_kv), None)
                add("v", block.v_proj, rows_of(omitted_kv), None)
    return [s for s in slices if s[3].numel() > 0]


def assert_matches_masked_reference(sat: nn.Module, reference: nn.Module, inputs: dict, atol: float = 1e-5) -> None:
    """One step of ``sat`` equals ``reference`` with the same units masked: loss and every gradient."""
    sat_loss = train_step(sat, inputs)
    with masked(reference, unit_masks(sat)):
        reference_loss = train_step(reference, inputs)
    torch.testing.assert_close(sat_loss, reference_loss, rtol=0, atol=atol)
    sat_grads, reference_grads = gradients(sat), gradients(reference)
    assert sat_grads.keys() == reference_grads.keys() and sat_grads
    for name, grad in reference_grads.items():
        torch.testing.assert_close(sat_grads[name], grad, rtol=0, atol=atol, msg=name)


def leave_process_group() -> None:
    """End a torchrun worker whose outputs are written: barrier, flush, ``os._exit(0)``.

    Tearing gloo down hangs or aborts now and then: in fresh-clone CI runs ``destroy_process_group()`` hung (the
    test then timed out after 400 s) and gloo's threads made ranks abort at interpreter exit ("terminate called
    without an active exception"). Every rank has finished its work at the barrier, so skipping the teardown loses
    nothing.
    """
    import os
    import sys

    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
