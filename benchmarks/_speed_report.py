"""Reports of ``benchmarks/speed.py``: the measured rows, their JSON form, the text / markdown tables and the
speed-up plot. Pure rendering: nothing here measures. The tables state what was measured; what it is judged
against is written in docs/results.md."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

CASES = ("smollm2", "7b-layer")
VARIANTS = ("full", "lora", "qlora")


@dataclass
class Row:
    case: str
    variant: str
    rate: float  # 0: the dense arm
    tokens_per_s: float
    ratio: float | None
    ideal: float | None
    efficiency: float | None
    activation_mb: float
    peak_mb: float | None
    select_share: float | None
    foreign_load: float | None
    step_ms_all: list[float]
    # the dense arm: the share of its activation memory saved inside the blocks that omit units (what a rate r can
    # remove at most: r x share); a SAT arm: its activation memory / the dense arm's. None in older reports.
    activation_share: float | None = None
    # a SAT arm: the quartiles (first, third) of dense / SAT step time over the rounds where both arms kept a step,
    # each dense step paired with the SAT step next to it: how far the machine moved the ratio. None in older reports.
    ratio_quartiles: list[float] | None = None


@dataclass
class Report:
    """What a run measured and on what: enough to re-render the tables and the plot (``--from-json``)."""

    settings: dict  # device, precision, threads, torch, machine, steps, warmup, head_granularity, tiny, ...
    shapes: dict[str, dict]  # case -> StackShape fields
    rows: list[Row]

    @classmethod
    def load(cls, path: str) -> Report:
        with open(path) as handle:
            data = json.load(handle)
        return cls(data["settings"], data["shapes"], [Row(**row) for row in data["rows"]])

    def save(self, path: str) -> None:
        with open(path, "w") as handle:
            json.dump(
                {"settings": self.settings, "shapes": self.shapes, "rows": [asdict(r) for r in self.rows]},
                handle,
                indent=2,
            )


def describe(report: Report) -> list[str]:
    s = report.settings
    tokens = f" on {s['score_tokens']} score tokens" if "score_tokens" in s else ""  # older reports: the default 32
    omit = "" if s.get("omit", ["mlp", "attention"]) == ["mlp", "attention"] else f"; omits {'+'.join(s['omit'])} only"
    if s.get("sat"):  # --sat: the SATConfig fields set on top of the flags
        omit += "; SATConfig " + ", ".join(f"{k}={v!r}" for k, v in s["sat"].items() if k != "omit")
    if s.get("loss_tokens", 1.0) < 1.0:
        omit += f"; loss on the last {s['loss_tokens']:.0%} of each sequence"
        if s.get("head_rows") == "labelled":
            omit += ", the LM head on those positions only"
    if s.get("cpu_allocator") == "tuned":  # older reports: glibc's defaults
        omit += "; CPU allocator keeps freed memory (peft_sat.cpu_allocator)"
    elif s.get("cpu_allocator") == "heap":
        omit += "; CPU allocator keeps freed memory, blocks above 32 MiB from the heap too (peft_sat.cpu_allocator)"
    lines = [
        f"SAT speed benchmark: {s['machine']}; {s['device']}, {s['precision']}, {s['threads']} threads, torch "
        f"{s['torch']}; {s['head_granularity']} heads, maxip + top-k{tokens}{omit}; median of {s['steps']} interleaved steps per "
        f"arm after {s['warmup']} warm-up round(s)"
    ]
    for name, shape in report.shapes.items():
        lines.append(
            f"  {name}: hidden {shape['hidden']}, intermediate {shape['intermediate']}, heads {shape['heads']}/"
            f"{shape['kv_heads']}, layers {shape['layers']}, vocab {shape['vocab'] or '-'}, batch {shape['batch']} x "
            f"{shape['seq']} tokens"
        )
    return lines


COLUMNS = (
    "case", "variant", "r", "tokens/s", "ratio", "ideal", "eff", "ratio IQR", "act MB", "act share", "peak MB",
    "select %", "others %",
)  # fmt: skip


def _cells(row: Row) -> list[str]:
    return [
        row.case,
        row.variant,
        "dense" if not row.rate else f"{row.rate:g}",
        f"{row.tokens_per_s:.1f}",
        _x(row.ratio),
        _x(row.ideal),
        _f(row.efficiency, ".2f"),
        "-" if not row.ratio_quartiles else f"{row.ratio_quartiles[0]:.2f}-{row.ratio_quartiles[1]:.2f}x",
        f"{row.activation_mb:.1f}",
        _f(row.activation_share, ".3f"),
        _f(row.peak_mb, ".0f"),
        _pct(row.select_share),
        _pct(row.foreign_load),
    ]


def format_table(report: Report) -> str:
    widths = (9, 7, 5, 9, 6, 6, 5, 11, 8, 10, 8, 8, 8)
    header = " ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(COLUMNS, widths)))
    lines = [*describe(report), header, "-" * len(header)]
    for row in report.rows:
        cells = _cells(row)
        lines.append(" ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cells, widths))))
    return "\n".join(lines + warning_lines(report))


def markdown(report: Report) -> str:
    """The table and its warnings as markdown (for docs/results.md)."""
    lines = [line.strip() for line in describe(report)]
    lines = [lines[0], "", *[f"- {line}" for line in lines[1:]], ""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in report.rows]
    warnings = [f"- {line}" for line in warning_lines(report)]
    return "\n".join(lines + ([""] + warnings if warnings else [])) + "\n"


def warning_lines(report: Report) -> list[str]:
    """A line naming the case / variant pairs measured while other processes used more of the CPUs than allowed."""
    allowed = report.settings["allowed_foreign"]
    busy = sorted({f"{r.case}/{r.variant}" for r in report.rows if (r.foreign_load or 0.0) > allowed})
    return [f"WARNING: other processes kept the CPUs busy during {', '.join(busy)}: rerun when quiet."] if busy else []


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _f(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def plot(rows: list[Row], path: str) -> None:
    """Speed-up against omission rate, one line per case and variant, ideal dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for axis, case in zip(axes, CASES, strict=True):
        for variant, color in zip(VARIANTS, ("C0", "C1", "C2"), strict=True):
            points = sorted(
                (r.rate, r.ratio, r.ideal) for r in rows if (r.case, r.variant) == (case, variant) and r.rate
            )
            if not points:
                continue
            rates = [0.0] + [p[0] for p in points]
            axis.plot(rates, [1.0] + [p[1] for p in points], "o-", color=color, label=f"{variant} measured")
            axis.plot(rates, [1.0] + [p[2] for p in points], "--", color=color, alpha=0.6, label=f"{variant} ideal")
        axis.set_title(case)
        axis.set_xlabel("omission rate r")
        axis.grid(alpha=0.3)
    axes[0].set_ylabel("speed-up over dense (tokens/s ratio)")
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
