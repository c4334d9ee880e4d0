"""Datasets of the recipes: the built-in offline data, any Hugging Face dataset or local file, and the held-out split.

- sft.py: the built-in data are ShareGPT conversations (``peft_sat.assets.load_sharegpt``) as conversational
  prompt / completion pairs, so that the loss falls on the last assistant answer only; a given dataset needs a
  ``messages``, ``prompt`` + ``completion`` or text (``dataset_text_field``) column, which TRL's ``SFTTrainer``
  formats itself.
- cpt.py: raw text (built-in: the Python reference manual) tokenized, joined with EOS tokens and cut into packed
  blocks of ``max_length`` tokens, like ``run_clm.py``'s ``group_texts``; the held-out blocks are the last ones.

Every loader raises ``ValueError`` with a message naming the argument to fix; the recipe collects them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_from_disk

from peft_sat import assets

# Local files: extension -> `datasets` builder.
_FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".arrow": "arrow",
}
SFT_FORMATS = (
    "`messages` (chat), `conversations` (ShareGPT from/value), `prompt` + `completion`, or a text column "
    "(`dataset_text_field`)"
)


def load_any(name: str, config_name: str | None = None) -> Dataset | DatasetDict:
    """A dataset from a local file, a local folder or the Hugging Face Hub (offline: its cache only).

    Raises:
        ValueError: it cannot be loaded; the message says what was tried and the original error.
    """
    path = Path(name).expanduser()
    try:
        if path.is_file():
            builder = _FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise ValueError(f"unsupported file type {path.suffix!r}; use one of {sorted(_FILE_BUILDERS)}")
            return load_dataset(builder, data_files=str(path))
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            return load_from_disk(str(path))  # written by `save_to_disk`
        return load_dataset(name, name=config_name)
    except Exception as error:  # noqa: BLE001 - datasets raises many types; all mean "cannot use this dataset"
        where = "local path" if path.exists() else "Hugging Face dataset (offline runs see only the local cache)"
        raise ValueError(
            f"`dataset_name` {name!r} could not be loaded as a {where}: {type(error).__name__}: {error}"
        ) from None


def split_train_eval(
    data: Dataset | DatasetDict, script_args: Any, seed: int, shuffle: bool = True
) -> tuple[Dataset, Dataset]:
    """``(train, held_out)``: the train / test splits of ``data`` when present, else ``eval_samples`` split off.

    ``shuffle`` False takes the held-out examples from the end (contiguous text for packed blocks).
    """
    n_eval = script_args.eval_samples
    if isinstance(data, DatasetDict):
        if script_args.dataset_train_split not in data:
            raise ValueError(
                f"`dataset_train_split` {script_args.dataset_train_split!r} is not a split of the dataset; it has "
                f"{sorted(data)}."
            )
        train = data[script_args.dataset_train_split]
        if script_args.dataset_test_split in data:
            held_out = data[script_args.dataset_test_split]
            return _cap(train, script_args.max_train_samples), held_out.select(range(min(n_eval, len(held_out))))
        data = train
    if len(data) <= n_eval:
        raise ValueError(
            f"The dataset has {len(data)} examples, too few to hold out `eval_samples`={n_eval} and still train; "
            "lower `eval_samples` or use more data."
        )
    if shuffle:
        parts = data.train_test_split(test_size=n_eval, seed=seed)
        train, held_out = parts["train"], parts["test"]
    else:
        train, held_out = data.select(range(len(data) - n_eval)), data.select(range(len(data) - n_eval, len(data)))
    return _cap(train, script_args.max_train_samples), held_out


def _cap(data: Dataset, limit: int | None) -> Dataset:
    return data if limit is None or len(data) <= limit else data.select(range(limit))


def columns_of(data: Dataset | DatasetDict) -> list[str]:
    first = next(iter(data.values())) if isinstance(data, DatasetDict) else data
    return list(first.column_names)


# ---- sft.py ---------------------------------------------------------------------------------------------------


def sft_builtin(max_length: int | None) -> Dataset:
    """ShareGPT conversations as conversational prompt / completion pairs, pre-filtered to fit ``max_length``.

    Each conversation is cut after the last assistant turn within ``3 * max_length`` characters (English averages
    about 4 characters per SmolLM2 token), so that the answer the loss falls on is not truncated away; conversations
    whose first answer is longer are skipped. ``keep_fitting`` then applies the exact token count.
    """
    budget = 3 * max_length if max_length else None
    rows = []
    for conversation in assets.load_sharegpt():
        messages = _fitting_prefix(conversation["messages"], budget)
        if messages:
            rows.append({"prompt": messages[:-1], "completion": messages[-1:]})
    return Dataset.from_list(rows)


def keep_fitting(data: Dataset, tokenizer: Any, max_length: int | None) -> Dataset:
    """The conversational prompt / completion examples whose chat-templated tokens fit ``max_length``.

    Why: the chat template adds tokens (SmolLM2's adds a default system prompt of about 20), and TRL truncates from
    the end, so a longer example would lose (part of) its completion. About 1.3k ShareGPT examples fit 128 tokens.
    """
    if not max_length:
        return data

    def fits(example: dict[str, Any]) -> bool:
        ids = tokenizer.apply_chat_template(
            example["prompt"] + example["completion"], tokenize=True, return_dict=False
        )
        return len(ids) <= max_length

    return data.filter(fits, desc=f"Keeping examples within {max_length} tokens")


def _fitting_prefix(messages: list[dict[str, str]], budget: int | None) -> list[dict[str, str]] | None:
    """The longest prefix ending with an assistant turn whose characters fit ``budget`` (None: no limit)."""
    total, end = 0, None
    for i, message in enumerate(messages):
        total += len(message["content"])
        if budget is not None and total > budget:
            break
        if message["role"] == "assistant":
            end = i + 1
    return messages[:end] if end else None


def check_sft_columns(data: Dataset | DatasetDict, name: str, text_field: str) -> None:
    """Raise ``ValueError`` when the dataset has no column layout that ``SFTTrainer`` understands."""
    columns = columns_of(data)
    if {"messages", "conversations", text_field, "input_ids"} & set(columns) or {"prompt", "completion"} <= set(
        columns
    ):
        return
    raise ValueError(
        f"`dataset_name` {name!r}: the dataset has columns {columns}; sft.py expects {SFT_FORMATS}. Rename a column "
        "or set `dataset_text_field`."
    )


def is_conversational(data: Dataset) -> bool:
    """True when examples are chat messages (they need the tokenizer's chat template)."""
    example = data[0]
    value = example.get("messages", example.get("conversations", example.get("prompt")))
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict)


# ---- cpt.py ---------------------------------------------------------------------------------------------------


def cpt_builtin() -> Dataset:
    """The Python reference manual (``pydoc_data.topics``) as a one-document text dataset (about 113k tokens)."""
    return Dataset.from_dict({"text": [assets.python_reference_text()]})


def check_cpt_columns(data: Dataset | DatasetDict, name: str, text_field: str) -> None:
    """Raise ``ValueError`` when the dataset has no text column ``text_field``."""
    columns = columns_of(data)
    if text_field not in columns:
        raise ValueError(
            f"`dataset_name` {name!r}: the dataset has columns {columns}; cpt.py trains on raw text in the column "
            f"`dataset_text_field`={text_field!r}. Set `dataset_text_field`."
        )


def pack_blocks(data: Dataset, tokenizer: Any, text_field: str, block_size: int) -> Dataset:
    """Token blocks of exactly ``block_size``: documents tokenized, each followed by EOS, joined and cut.

    The remainder shorter than a block is dropped. Returns a dataset with one ``input_ids`` column, which TRL's
    ``SFTTrainer`` takes as already processed (the collator builds the labels).
    """
    eos = tokenizer.eos_token_id

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        # verbose=False: documents longer than the model's context are expected here (they are cut below).
        ids = tokenizer(batch[text_field], add_special_tokens=False, verbose=False)["input_ids"]
        return {"input_ids": [seq + [eos] for seq in ids]}

    def group(batch: dict[str, list]) -> dict[str, list]:
        joined = [token for seq in batch["input_ids"] for token in seq]
        usable = len(joined) // block_size * block_size
        return {"input_ids": [joined[i : i + block_size] for i in range(0, usable, block_size)]}

    tokenized = data.map(tokenize, batched=True, remove_columns=data.column_names, desc="Tokenizing")
    # Each map batch (1000 documents) drops its own remainder: under one block per 1000 documents.
    return tokenized.map(group, batched=True, desc=f"Packing blocks of {block_size}")
