"""Test-suite settings: offline (nothing may download), deterministic, quiet; and the fixtures that several test
modules share (tests import helpers from ``sat_testing`` and fixtures from here, never from each other)."""

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# After the settings above: huggingface_hub and transformers read them when they are imported.
from sat_testing import save_tiny_chat_model, sentence  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved 2-layer Llama with a word-level ChatML tokenizer (``sat_testing.save_tiny_chat_model``)."""
    return save_tiny_chat_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def chat_file(tmp_path_factory) -> Path:
    """40 one-exchange conversations (``messages``) as JSON lines."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": sentence(i)}, {"role": "assistant", "content": sentence(i + 1)}]}
        for i in range(40)
    ]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """60 lines of plain text for continual pre-training."""
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n".join(sentence(i, 12) for i in range(60)))
    return path


@pytest.fixture
def restore_trl_lm_head(monkeypatch):
    """The recipes change TRL's fused LM head on a CPU process-wide (`recipes/cpu_lm_head.py`): undone after the
    test."""
    from trl.trainer import utils as trl_utils

    monkeypatch.setattr(trl_utils, "_use_triton", trl_utils._use_triton)
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", trl_utils._ChunkedLogProbFunction)
