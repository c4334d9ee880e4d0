"""The one module of test helpers: tiny models per family, adapter stacks, the masked dense reference; in-memory
datasets, tokenizers and training arguments for the Trainer-level tests; the tiny chat model and arguments of the
recipe tests; free ports and torchrun for the multi-process tests. Everything builds offline, on a CPU, in seconds.

Test modules import from here (and share fixtures through ``conftest.py``), never from each other."""

from __future__ import annotations

import contextlib
import copy
import random
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast, TrainingArguments

import peft_sat
from peft_sat.blocks import SATBlockMixin, SATMLPMixin

if TYPE_CHECKING:  # importing `datasets` costs every torchrun worker that imports this module; only a few tests use it
    from datasets import Dataset

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite", "phi3", "olmo2")
ATTENTION = ("eager", "sdpa")
STACKS = ("full", "lora", "qlora")
GRANULARITIES = ("kv_group", "q_head")
VOCAB = 128
ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
WORDS = [f"w{i}" for i in range(VOCAB - 3)]  # + <pad>, <eos>, <unk>: the vocabulary of `tiny_tokenizer`
SAT_KEYS = (
    "sat/omission_rate",
    "sat/kept_fraction",
    "sat/flops_saved_fraction",
    "sat/dense_steps_saved",
    "sat/dense_token_fraction",
    "sat/live_token_fraction",
    "sat/crossover_rate",
    "sat/crossover_dense_steps",
)


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


# The paper's method (the defaults before the modes beyond it): the tests written for its sparse forward build their
# configs on top of it, whatever SATConfig's defaults are.
PAPER_MODES = dict(
    omit=["mlp", "attention"], dense_tokens="none", sparse_pass="forward_backward", context_tokens="sparse"
)


def paper_config(**overrides: Any) -> peft_sat.SATConfig:
    """``SATConfig`` with the paper's modes (``PAPER_MODES``) under ``overrides``."""
    return peft_sat.SATConfig(**{**PAPER_MODES, **overrides})


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


def tiny_llama(seed: int = 0, **overrides) -> nn.Module:
    """The Llama of the Trainer-level tests: ``tiny_model("llama")`` with 4 query heads in 2 KV groups (so r = 0.5
    omits exactly one group) and the special-token ids of ``tiny_tokenizer``."""
    kwargs = dict(num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return tiny_model("llama", seed=seed, **{**kwargs, **overrides})


def sat_model(stack: str, config: peft_sat.SATConfig) -> nn.Module:
    """``tiny_model()`` with SAT: full-parameter (``get_peft_model``) or under LoRA (``apply_sat`` on a
    ``lora_config()`` model)."""
    base = tiny_model()
    if stack == "full":
        return get_peft_model(base, config)
    if stack == "lora":
        return peft_sat.apply_sat(get_peft_model(base, lora_config()), config)
    raise ValueError(stack)


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


def batch(
    seed: int = 1, batch_size: int = 2, seq_len: int = 24, pad: int = 5, prompt: int = 0
) -> dict[str, torch.Tensor]:
    """A batch with left padding on the first row (padding must be excluded from scoring); ``prompt`` > 0 labels
    the first ``prompt`` real tokens of every row -100 (context tokens, as in prompt / completion SFT data)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch_size, seq_len), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :pad] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    if prompt:
        first_real = (attention_mask == 0).sum(1, keepdim=True)  # left padding: real tokens start here
        positions = torch.arange(seq_len)[None, :]
        labels = labels.masked_fill((positions >= first_real) & (positions < first_real + prompt), -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@dataclass
class Stack:
    """A SAT model and an identical model without SAT (the reference), both in training mode."""

    sat: nn.Module
    reference: nn.Module


def build_stack(
    stack: str, family: str, attn: str, sat_config: peft_sat.SATConfig, tmp_path=None, **config_overrides
) -> Stack:
    base = tiny_model(family, attn, **config_overrides)
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


def omitting_blocks(model: nn.Module) -> list[SATBlockMixin]:
    """The SAT blocks that omit units (not those converted only to cut the context tokens' gradient)."""
    return [m for m in model.modules() if isinstance(m, SATBlockMixin) and m.sat_omits_units]


@dataclass
class UnitMask:
    """What a SAT block's last step did with its units, per token row (shapes (units,) when every token was treated
    alike, else (B * T, units)).

    ``value``: 1 where the unit computed in forward; ``grad``: 1 where the gradient flowed through it (a subset of
    ``value``); ``weight``: 1 where its base weights took a gradient from that token (``sparse_pass="weight_grad"``;
    None: as ``grad``). ``head_dim``: attention units expand to this many columns (1 for MLP channels).
    """

    value: torch.Tensor
    grad: torch.Tensor
    weight: torch.Tensor | None = None
    head_dim: int = 1


def _expand(mask: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Units to the columns of the output projection's input (a query head spans ``head_dim`` columns)."""
    return mask.repeat_interleave(head_dim, dim=-1) if head_dim > 1 else mask


def unit_masks(model: nn.Module) -> dict[str, UnitMask]:
    """Per SAT block, the masks of its last step: kept units, dense token rows, ``sparse_pass`` (see ``UnitMask``).

    A split batch (``dense_tokens``): the dense rows run every unit in both passes, the other rows as ``sparse_pass``
    says. Attention masks are per query head.
    """
    state = peft_sat.get_sat_state(model)
    sparse_pass = state.config.sparse_pass
    batch_info = state.batch
    labelled = batch_info.carries_loss if batch_info.carries_loss is not None else batch_info.token_mask
    rows = state.dense_rows(labelled.shape) if labelled is not None else None
    masks = {}
    for name, block in sat_blocks(model):
        if not block.sat_omits_units:
            continue
        kept = block.sat_last_kept
        assert kept is not None, f"{name} did not run a sparse forward"
        mlp = isinstance(block, SATMLPMixin)
        units = block.sat_num_units if mlp else block.config.num_attention_heads
        mask = torch.zeros(units)
        mask[kept.cpu()] = 1.0  # kept lives on the model's device (CUDA in tests/test_cuda.py)
        if rows is not None:
            dense = torch.zeros(labelled.numel(), 1)
            dense[rows.cpu()] = 1.0
            mask = torch.maximum(mask.expand(labelled.numel(), -1), dense)  # dense rows run every unit
        every = torch.ones_like(mask)
        head_dim = 1 if mlp else block.head_dim
        if sparse_pass == "forward_backward":
            masks[name] = UnitMask(value=mask, grad=mask, head_dim=head_dim)
        elif sparse_pass == "backward":
            masks[name] = UnitMask(value=every, grad=mask, head_dim=head_dim)
        else:
            masks[name] = UnitMask(value=every, grad=every, weight=mask, head_dim=head_dim)
    return masks


def _row_major(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (units,) or (B * T, units) mask shaped to broadcast against ``like`` (..., units)."""
    mask = mask.to(like)
    return mask.reshape(*like.shape[:-1], -1) if mask.dim() > 1 else mask


@contextlib.contextmanager
def masked(reference: nn.Module, masks: dict[str, UnitMask]) -> Iterator[None]:
    """Run ``reference`` as the SAT step described by ``masks``, with dense tensors.

    Each output projection (down_proj / o_proj), with h its input: ``y = proj(h * value * grad) + stopgrad(
    proj(h * value) - proj(h * value * grad))`` (the forward of the units in ``value``, the gradient of those in
    ``grad``). With ``weight`` masks, the base weight of every projection of the block is split into a part with
    gradient (the units and tokens in ``weight``) and a detached part: the same values and input gradients.
    """
    modules = dict(inner(reference).named_modules())
    patched = []

    def patch(module: nn.Module, forward) -> None:
        module.forward = forward
        patched.append(module)

    for name, mask in masks.items():
        block = modules[name]
        projection = block.down_proj if hasattr(block, "down_proj") else block.o_proj
        original = projection.forward
        value_mask, grad_mask = _expand(mask.value, mask.head_dim), _expand(mask.grad, mask.head_dim)

        def forward(h, *args, original=original, value_mask=value_mask, grad_mask=grad_mask, **kwargs):
            value, grad = _row_major(value_mask, h), _row_major(grad_mask, h)
            kept = original(h * value * grad, *args, **kwargs)
            if torch.equal(value, grad):
                return kept
            with torch.no_grad():
                rest = original(h * value, *args, **kwargs) - kept
            return kept + rest

        if not (bool(value_mask.eq(1).all()) and bool(grad_mask.eq(1).all())):
            patch(projection, forward)
        if mask.weight is not None:
            for base, by_rows, features_mask in _projection_masks(block, mask.weight):
                patch(base, _weight_masked_forward(base, features_mask, by_rows))
    try:
        yield
    finally:
        for module in patched:
            del module.forward


def _weight_masked_forward(base: nn.Linear, features_mask: torch.Tensor, by_rows: bool):
    """``base``'s forward whose weight gradient keeps only the (token, output row / input column) pairs of
    ``features_mask``; values and input gradients are the plain layer's."""
    linear = torch.nn.functional.linear

    def forward(x):
        detached_bias = None if base.bias is None else base.bias.detach()
        if by_rows:
            kept = linear(x, base.weight, base.bias)
            mask = _row_major(features_mask, kept)
            return kept * mask + linear(x, base.weight.detach(), detached_bias) * (1 - mask)
        mask = _row_major(features_mask, x)
        return linear(x * mask, base.weight, base.bias) + linear(x * (1 - mask), base.weight.detach())

    return forward


def _projection_masks(block: nn.Module, units: torch.Tensor) -> list[tuple[nn.Linear, bool, torch.Tensor]]:
    """(base layer, by rows, mask over its output rows / input columns) of every trainable base projection of a
    block, from a mask over its units (MLP channels, or query heads; a KV head counts when one of its query heads
    does)."""
    found = []

    def add(projection: nn.Module, by_rows: bool, mask: torch.Tensor) -> None:
        base = peft_sat.sliced.base_layer(projection)
        if isinstance(base, nn.Linear) and base.weight.requires_grad and base.weight.dtype.is_floating_point:
            found.append((base, by_rows, mask))

    if hasattr(block, "down_proj"):  # an MLP (the reference's own class, not converted)
        if hasattr(block, "gate_up_proj"):  # Phi3: gate rows, then up rows
            add(block.gate_up_proj, True, torch.cat([units, units], dim=-1))
        else:
            add(block.gate_proj, True, units)
            add(block.up_proj, True, units)
        add(block.down_proj, False, units)
        return found
    d, groups = block.head_dim, block.num_key_value_groups
    q_rows = units.repeat_interleave(d, dim=-1)
    kv_rows = units.unflatten(-1, (-1, groups)).amax(-1).repeat_interleave(d, dim=-1)
    if hasattr(block, "qkv_proj"):
        add(block.qkv_proj, True, torch.cat([q_rows, kv_rows, kv_rows], dim=-1))
    else:
        add(block.q_proj, True, q_rows)
        add(block.k_proj, True, kv_rows)
        add(block.v_proj, True, kv_rows)
    add(block.o_proj, False, q_rows)
    return found


@contextlib.contextmanager
def context_cut(reference: nn.Module, dense_rows: torch.Tensor) -> Iterator[None]:
    """``context_tokens="forward_only"``: no gradient reaches the rows outside ``dense_rows`` at the input of any
    attention block: the keys and values they give the dense tokens train their projections, and nothing below."""
    decoder = inner(reference).model

    def cut(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.requires_grad:
            mask = torch.zeros(hidden.shape[:-1].numel(), 1, dtype=hidden.dtype, device=hidden.device)
            mask[dense_rows.to(hidden.device)] = 1.0
            mask = mask.reshape(*hidden.shape[:-1], 1)
            hidden.register_hook(lambda grad: grad * mask)

    handles = [layer.self_attn.register_forward_pre_hook(cut, with_kwargs=True) for layer in decoder.layers]
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
    """One step of ``sat`` equals ``reference`` with the same units masked (or, where the batch split with context
    tokens forward only, with no gradient reaching the context rows): loss and every gradient."""
    sat_loss = train_step(sat, inputs)
    state = peft_sat.get_sat_state(sat)
    rows = state.dense_rows(inputs["labels"].shape) if "labels" in inputs else None
    cut = rows is not None and state.config.context_tokens == "forward_only"
    masks = {} if cut else unit_masks(sat)
    with masked(reference, masks), context_cut(reference, rows) if cut else contextlib.nullcontext():
        reference_loss = train_step(reference, inputs)
    torch.testing.assert_close(sat_loss, reference_loss, rtol=0, atol=atol)
    sat_grads, reference_grads = gradients(sat), gradients(reference)
    assert sat_grads.keys() == reference_grads.keys() and sat_grads
    for name, grad in reference_grads.items():
        torch.testing.assert_close(sat_grads[name], grad, rtol=0, atol=atol, msg=name)


# ---- Trainer-level tests: datasets, tokenizer, training arguments --------------------------------------------------


def lm_dataset(num_rows: int = 16, seq_len: int = 16, seed: int = 0) -> Dataset:
    """Pre-tokenized causal-LM rows (``input_ids``, ``attention_mask``, ``labels``) for the plain Trainer."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (num_rows, seq_len), generator=generator).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * seq_len] * num_rows, "labels": ids})


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer built in memory (no download): ids 0 <pad>, 1 <eos>, 2 <unk>, then ``WORDS``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{word: i + 3 for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def text_dataset(num_rows: int = 16, words: int = 12, seed: int = 0) -> Dataset:
    """A ``text`` column of random words, the plainest SFTTrainer format."""
    from datasets import Dataset

    rng = random.Random(seed)
    return Dataset.from_dict({"text": [" ".join(rng.choices(WORDS, k=words)) for _ in range(num_rows)]})


def training_args(output_dir: Any, cls: type = TrainingArguments, **overrides: Any) -> TrainingArguments:
    """8 optimizer steps of batch 2, logged every step, on CPU, no reporting, no checkpoints unless asked."""
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        max_steps=8,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        dataloader_num_workers=0,
    )
    if cls is not TrainingArguments:  # TRL's SFTConfig defaults bf16 (raises without a GPU) and gradient checkpointing
        kwargs.update(bf16=False, gradient_checkpointing=False)
    kwargs.update(overrides)
    return cls(**kwargs)


def train_logs(log_history: list[dict]) -> list[dict]:
    """The per-step training entries of ``state.log_history`` (those with a ``loss``)."""
    return [entry for entry in log_history if "loss" in entry]


# ---- recipe tests: a tiny chat model on disk and a 6-step run ------------------------------------------------------

CHAT_WORDS = "the a python function returns value list of numbers hello world how are you fine thanks what is sat sparse training".split()
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Arguments of a recipe run on the tiny chat model: 6 steps, so the default ladder is `TINY_RECIPE_LADDER` (rates as
# scheduled, whatever the step times), held-out loss at steps 0, 3 and 6.
TINY_RECIPE_ARGS = (
    "--max_steps 6 --per_device_train_batch_size 2 --per_device_eval_batch_size 4 --max_length 16 "
    "--eval_samples 4 --eval_steps 0.5 --learning_rate 1e-3 --disable_tqdm true --lora_r 4 --lora_alpha 8 --sat_dense_when_slower false"
).split()
TINY_RECIPE_LADDER = [0.5, 0.5, 0.5, 1 / 3, 1 / 6, 0.0]


def tiny_recipe_args(recipe: Any, model_dir: Path, data: Path, out: Path, *extra: str) -> tuple:
    """The parsed arguments of ``recipe`` (``recipes.sft`` or ``recipes.cpt``) for a ``TINY_RECIPE_ARGS`` run of the
    tiny model in ``model_dir`` on ``data``, written to ``out``."""
    paths = ["--model_name_or_path", str(model_dir), "--dataset_name", str(data), "--output_dir", str(out)]
    return recipe.make_parser().parse_args_and_config([*paths, *TINY_RECIPE_ARGS, *extra])


def sentence(i: int, n: int = 6) -> str:
    """The ``i``-th of a fixed sequence of ``n``-word sentences over ``CHAT_WORDS``."""
    return " ".join(CHAT_WORDS[(i * 7 + k * 3) % len(CHAT_WORDS)] for k in range(n))


def save_tiny_chat_model(path: Path) -> Path:
    """Save to ``path`` a ``tiny_llama`` (dims multiples of 64 for 4-bit) with a word-level tokenizer over
    ``CHAT_WORDS`` that has a ChatML template: what the recipes load with ``--model_name_or_path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + ["user", "assistant", "system"] + CHAT_WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        bos_token="<|im_start|>",
    )
    tokenizer.chat_template = CHATML
    tokenizer.save_pretrained(path)
    end = vocab["<|im_end|>"]
    model = tiny_llama(vocab_size=64, max_position_embeddings=128, eos_token_id=end, pad_token_id=end)
    model.save_pretrained(path)
    return path


# ---- multi-process tests -------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(processes: int) -> list[str]:
    """The command prefix that starts a script in ``processes`` local processes under torchrun."""
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    return launcher + [f"--master_port={free_port()}", "--master_addr=127.0.0.1"]


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


def os_threads(expected: int | None = None) -> int:
    """The process's threads (Linux); given ``expected``, waits up to 2 s for that count (an ended thread may linger
    in /proc for a moment after it returns)."""
    deadline = time.monotonic() + 2.0
    while True:
        count = len(list(Path("/proc/self/task").iterdir()))
        if expected is None or count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.01)
