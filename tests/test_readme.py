"""The README's Python code blocks run as written (in order, one namespace), so they never rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_starts_with_the_two_commands():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), flags=re.DOTALL).group(1).splitlines()
    assert [line.split("#")[0].strip() for line in first_block] == ["make sft", "make test"]


@pytest.mark.slow
def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)  # outputs land in the temporary folder
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    rates = [e["sat/omission_rate"] for e in namespace["trainer"].state.log_history if "sat/omission_rate" in e]
    assert rates[0] == 0.5 and rates[-1] == 0.0
