"""The SAT configurations that ``benchmarks/quality.py`` compares with dense: how they are named, recorded and keyed.

- A run records its whole ``SATConfig`` (``config_record``: every field of the dataclass, so a new field is
  recorded without touching this file).
- ``PAPER`` is the paper's method as ``SATConfig`` fields: the defaults the first stored runs were measured with.
  A record written before a field existed ran with that field's ``PAPER`` value (``normalized`` fills it in), and
  ``tests/test_quality_benchmark.py`` checks that ``PAPER`` names every field of ``SATConfig``.
- A comparison is keyed by the fields where its config differs from ``PAPER`` (``beyond_paper``), so the same
  config asked for twice (``--sat``, a named config, a preset) runs once, runs stored by older versions of the
  script keep their keys, and a run of ``SATConfig()``'s defaults gets a new key when the defaults change.
- ``--configs`` names configurations: ``NAME=JSON`` items (``SATConfig`` overrides) and preset names (``PRESETS``),
  separated by commas; ``--configs-file`` reads a JSON object of the same.

Example:
    >>> parse_configs('paper,loss tokens={"dense_tokens": "loss", "omit": ["mlp", "attention"]}')["loss tokens"]
    {'dense_tokens': 'loss', 'omit': ['mlp', 'attention']}
"""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

from peft.config import PeftConfig

import peft_sat

PAPER = {
    "omission_rate": 0.5,
    "target_modules": None,
    "omit": ["mlp", "attention"],
    "dense_tokens": "none",
    "sparse_pass": "forward_backward",
    "context_tokens": "sparse",
    "dense_layers": None,
    "importance": "maxip",
    "selection": "topk",
    "head_granularity": "kv_group",
    "score_tokens": 32,
    "train_base": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "distributed_selection": "shared",
    "schedule": "ladder",
    "warmup_ratio": 0.0,
    "ladder_full_rate_ratio": 0.5,
    "ladder_rungs": 3,
    "ladder_stairs": None,
    # The runs here set each step's rate themselves, without SATCallback's crossover check: the field never acts,
    # so it never names a comparison (``NOT_KEYED``).
    "dense_when_slower": True,
}
NOT_KEYED = ("seed", "dense_when_slower")
# The paper's method among the fields whose defaults moved beyond it: the ablation grid and the probe (the paper's
# levers, measured on the paper's sub-network) set them, whatever SATConfig()'s defaults are.
PAPER_MODES = {k: PAPER[k] for k in ("omit", "dense_tokens", "sparse_pass", "context_tokens")}
# The fields that the first version of the script recorded: grid-cell keys always hold them (see ``cell_key``).
FIRST_RECORDED = (
    "omission_rate", "importance", "selection", "schedule", "ladder_full_rate_ratio", "ladder_rungs", "ladder_stairs",
    "warmup_ratio", "head_granularity", "score_tokens", "omit",
)  # fmt: skip
PRESETS = {"paper": PAPER, "defaults": {}}  # "defaults": SATConfig()'s defaults when the script runs


def sat_fields() -> list[str]:
    """``SATConfig``'s own fields (those of ``PeftConfig``, e.g. ``peft_type``, left out), in declaration order."""
    inherited = {f.name for f in fields(PeftConfig)}
    return [f.name for f in fields(peft_sat.SATConfig) if f.name not in inherited]


def config_record(config: peft_sat.SATConfig) -> dict:
    """Every ``SATConfig`` field of ``config`` as JSON values (tuples become lists)."""
    return json.loads(json.dumps({name: getattr(config, name) for name in sat_fields()}))


def normalized(record: dict) -> dict:
    """A stored record with the fields it predates filled in from ``PAPER``, as JSON values."""
    return json.loads(json.dumps({**PAPER, **record}))


def beyond_paper(record: dict) -> dict:
    """The fields (``NOT_KEYED`` excluded) where a record differs from ``PAPER``; ``{}`` is the paper's method."""
    paper, missing = normalized({}), object()
    return {k: v for k, v in normalized(record).items() if k not in NOT_KEYED and v != paper.get(k, missing)}


def canonical(overrides: dict) -> str:
    """The comparison key of ``SATConfig(**overrides)``: ``beyond_paper`` as sorted JSON (``"{}"``: the paper)."""
    return json.dumps(beyond_paper(config_record(peft_sat.SATConfig(**overrides))), sort_keys=True)


def cell_key(overrides: dict) -> str:
    """The key of an ablation-grid cell: ``FIRST_RECORDED`` plus any other field off ``PAPER``, seed excluded."""
    record = normalized(config_record(peft_sat.SATConfig(**overrides)))
    kept = {k: v for k, v in record.items() if k in FIRST_RECORDED}
    return json.dumps({**kept, **beyond_paper(record)}, sort_keys=True)


def check_overrides(overrides: object, what: str) -> dict:
    """``overrides`` if it is a JSON object of ``SATConfig`` fields other than ``seed`` that ``SATConfig`` accepts.

    Raises:
        ValueError: naming ``what`` (the option or the config) and the problem.
    """
    if not isinstance(overrides, dict) or "seed" in overrides:
        raise ValueError(f"{what} must be a JSON object of SATConfig fields other than 'seed', got {overrides!r}")
    try:
        peft_sat.SATConfig(**overrides)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}: {error}") from None
    return overrides


def parse_configs(text: str) -> dict[str, dict]:
    """``--configs``: comma-separated ``NAME=JSON`` items and preset names -> name -> ``SATConfig`` overrides.

    A JSON object may contain commas; the item ends where its JSON ends.

    Raises:
        ValueError: an empty or repeated name, JSON that does not parse, an unknown preset or invalid overrides.
    """
    configs: dict[str, dict] = {}
    decoder, i = json.JSONDecoder(), 0
    while i < len(text):
        comma, equals = _find(text, ",", i), _find(text, "=", i)
        if comma <= equals:  # a preset's name (or an empty item)
            name, i = text[i:comma].strip(), comma + 1
            if name:
                _add(configs, name, name, "--configs")
            continue
        name, start = text[i:equals].strip(), equals + 1
        while start < len(text) and text[start].isspace():
            start += 1
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as error:
            raise ValueError(f"--configs: the JSON of {name!r} does not parse: {error}") from None
        rest = text[end:].lstrip()
        if rest and not rest.startswith(","):
            raise ValueError(f"--configs: expected ',' after the JSON of {name!r}, got {rest[:20]!r}")
        _add(configs, name, value, "--configs")
        i = len(text) - len(rest) + 1
    return configs


def load_configs_file(path: str | Path) -> dict[str, dict]:
    """``--configs-file``: a JSON object mapping names to ``SATConfig`` overrides or to a preset's name."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"--configs-file {path}: {error}") from None
    if not isinstance(items, dict):
        raise ValueError(f"--configs-file {path} must hold a JSON object of name -> SATConfig overrides")
    configs: dict[str, dict] = {}
    for name, value in items.items():
        _add(configs, name, value, f"--configs-file {path}")
    return configs


def _add(configs: dict[str, dict], name: str, value: object, what: str) -> None:
    """Check one named config (overrides, or a preset's name) and add its overrides to ``configs``."""
    if not name:
        raise ValueError(f"{what}: a configuration needs a name before '='")
    if name in configs:
        raise ValueError(f"{what}: the name {name!r} is given twice")
    if isinstance(value, str):
        if value not in PRESETS:
            raise ValueError(f"{what}: unknown preset {value!r} for {name!r}; presets: {sorted(PRESETS)}")
        value = dict(PRESETS[value])
    configs[name] = check_overrides(value, f"{what} {name!r}")


def _find(text: str, char: str, start: int) -> int:
    index = text.find(char, start)
    return len(text) if index < 0 else index
