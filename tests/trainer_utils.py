"""Builders for the trainer-level tests (SATCallback with Trainer / SFTTrainer): a tiny Llama, in-memory datasets,
an offline tokenizer and CPU-sane training arguments. Everything runs offline on a CPU in about a second per run."""

from __future__ import annotations

import random
from typing import Any

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainingArguments

VOCAB = 128
WORDS = [f"w{i}" for i in range(VOCAB - 3)]  # + <pad>, <eos>, <unk>
SAT_KEYS = ("sat/omission_rate", "sat/kept_fraction", "sat/flops_saved_fraction", "sat/dense_steps_saved")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    """2 layers, 4 query heads in 2 KV groups, 128 MLP channels."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        vocab_size=VOCAB,
        head_dim=16,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    return LlamaForCausalLM(config)


def lm_dataset(num_rows: int = 16, seq_len: int = 16, seed: int = 0) -> Dataset:
    """Pre-tokenized causal-LM rows (``input_ids``, ``attention_mask``, ``labels``) for the plain Trainer."""
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
