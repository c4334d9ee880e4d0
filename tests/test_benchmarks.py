"""The step benchmark runs end to end in its seconds-long ``--tiny`` mode and prints its table (timings not checked:
they are the benchmark's job, not a test's). About 7 s on 2 quiet cores, most of it importing torch / transformers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_step.py"


def test_bench_step_tiny_prints_the_table(tmp_path):
    out = tmp_path / "bench.json"
    # --max-foreign-load 1: never repeat steps on a busy test machine (the numbers are not checked here)
    command = [sys.executable, str(SCRIPT), "--tiny", "--max-foreign-load", "1", "--json", str(out)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("variant"))
    assert lines[header].split()[:6] == ["variant", "dense", "ms", "SAT", "ms", "ratio"]
    rows = {line.split()[0]: line.split() for line in lines[header + 2 :] if line.strip()}
    assert set(rows) == {"full", "lora"}
    report = json.loads(out.read_text())
    assert [row["variant"] for row in report["rows"]] == ["full", "lora"]
    for row in report["rows"]:
        assert row["dense_ms"] > 0 and row["sat_ms"] > 0 and 1.0 < row["ideal"] < 2.5
        assert 0.0 < row["select_share"] < 1.0  # the scoring timer saw the SAT blocks
