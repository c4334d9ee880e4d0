"""The documentation agrees with the code: the supported families are ``peft_sat.blocks.ARCHITECTURES``, listed in
full where users look them up (README, docs/supported.md, the ``target_modules`` help) and nowhere else in part."""

from __future__ import annotations

import re
from pathlib import Path

from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from peft_sat import SATConfig
from peft_sat.blocks import ARCHITECTURES

ROOT = Path(__file__).resolve().parent.parent


def _family_names() -> set[str]:
    """Class-name prefixes of transformers' causal LMs ("Llama" of "LlamaForCausalLM"), and ours."""
    names = set(ARCHITECTURES)
    for value in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        for class_name in value if isinstance(value, (list, tuple)) else (value,):
            names.add(class_name.removesuffix("ForCausalLM"))
    return names


FAMILIES = _family_names()


def families_in(text: str) -> set[str]:
    return {word for word in re.findall(r"[A-Za-z][A-Za-z0-9]*", text) if word in FAMILIES}


def _readme_bullet() -> str:
    """The README bullet that lists the families (the one linking docs/supported.md)."""
    bullets = re.split(r"\n(?=- )|\n\n", (ROOT / "README.md").read_text())
    return next(bullet for bullet in bullets if bullet.startswith("- ") and "docs/supported.md" in bullet)


def _section(path: Path, heading: str) -> str:
    text = path.read_text()
    start = text.index(f"\n{heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end > 0 else None]


def test_family_lists_are_the_registry():
    supported = set(ARCHITECTURES)
    assert families_in(_readme_bullet()) == supported
    assert families_in(_section(ROOT / "docs" / "supported.md", "## Models and layouts")) == supported
    help_text = next(f for f in SATConfig.__dataclass_fields__.values() if f.name == "target_modules").metadata["help"]
    assert families_in(help_text) == supported


def test_other_docs_keep_no_partial_family_list():
    """Elsewhere a family is named as an example at most (e.g. ``SATLlamaMLP``), never as a second list."""
    for path in (ROOT / "docs" / "architecture.md", ROOT / "recipes" / "README.md"):
        assert len(families_in(path.read_text())) <= 1, (path.name, sorted(families_in(path.read_text())))
