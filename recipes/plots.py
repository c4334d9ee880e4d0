"""``training_curves.png``: what a recipe run did, readable without knowing SAT.

Four panels: the training loss of every step (dense and sparse steps told apart: a sparse step's loss is the loss of
the sub-network it trained, not of the model), the held-out loss (always evaluated dense) against step, the
omission rate against step, and the held-out loss against training wall time (evaluation excluded). With
``--compare_dense true`` the dense arm is drawn in grey in the same panels.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .common import Arm

PLOT_FILE = "training_curves.png"
SAT_COLOR, SPARSE_COLOR, DENSE_ARM_COLOR = "tab:blue", "tab:orange", "0.45"


def plot_curves(output_dir: str | Path, arm: Arm, dense: Arm | None, title: str) -> Path:
    """Draw the four panels of ``arm`` (and ``dense``) into ``output_dir/training_curves.png``; return the path."""
    import matplotlib.pyplot as plt

    figure = draw_curves(arm, dense, title)
    path = Path(output_dir) / PLOT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def draw_curves(arm: Arm, dense: Arm | None, title: str) -> Any:
    """The matplotlib figure of ``plot_curves``: axes 0-3 are training loss, held-out loss, rate, wall time."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, 2, figsize=(12, 7.5))
    (ax_train, ax_held_out), (ax_rate, ax_time) = axes
    _train_losses(ax_train, arm, dense)
    for ax, x_key, x_label in (
        (ax_held_out, "step", "optimizer step"),
        (ax_time, "train_seconds", "training wall time (s, evaluation excluded)"),
    ):
        _curve(ax, arm.recorder.eval_curve, x_key, SAT_COLOR, f"{arm.label}: held-out loss (dense eval)", "s-")
        if dense is not None:
            _curve(ax, dense.recorder.eval_curve, x_key, DENSE_ARM_COLOR, "dense arm: held-out loss", "o--")
        ax.set_xlabel(x_label)
        ax.set_ylabel("held-out loss")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    ax_held_out.set_title("held-out loss against step", fontsize=9)
    ax_time.set_title("held-out loss against training wall time" + (" (the A/B)" if dense else ""), fontsize=9)
    _omission_rate(ax_rate, arm.recorder.steps)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    return figure


def _train_losses(ax: Any, arm: Arm, dense: Arm | None) -> None:
    """Training loss per logged step; sparse steps (rate > 0 at that step) as separate markers."""
    rates = {record["step"]: record["omission_rate"] for record in arm.recorder.steps}
    logged = _logged_losses(arm)
    if logged:
        ax.plot(*zip(*logged), color=SAT_COLOR, alpha=0.3, linewidth=1)
    dense_steps = [(step, loss) for step, loss in logged if rates.get(step, 0.0) == 0.0]
    sparse_steps = [(step, loss) for step, loss in logged if rates.get(step, 0.0) > 0.0]
    if dense_steps:
        ax.plot(*zip(*dense_steps), "o", color=SAT_COLOR, markersize=4, label=f"{arm.label}: dense step, model loss")
    if sparse_steps:
        ax.plot(
            *zip(*sparse_steps),
            "^",
            color=SPARSE_COLOR,
            markersize=5,
            label="SAT: sparse step, loss of the sub-network it trained",
        )
    if dense is not None:
        ax.plot(*zip(*_logged_losses(dense)), ".-", color=DENSE_ARM_COLOR, alpha=0.6, label="dense arm: train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss of each step (logged every `logging_steps`)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)


def _logged_losses(arm: Arm) -> list[tuple[int, float]]:
    return [(entry["step"], entry["loss"]) for entry in arm.log_history if "loss" in entry and "step" in entry]


def _curve(ax: Any, points: list[dict[str, float]], x_key: str, color: str, label: str, style: str) -> None:
    if points:
        ax.plot([p[x_key] for p in points], [p["eval_loss"] for p in points], style, color=color, label=label)


def _omission_rate(ax: Any, steps: list[dict[str, float]]) -> None:
    if steps:
        # Step s ran with the rate recorded at its end; draw it over [s - 1, s].
        xs = [0] + [record["step"] for record in steps]
        ys = [steps[0]["omission_rate"]] + [record["omission_rate"] for record in steps]
        ax.step(xs, ys, where="pre", color="tab:red")
    ax.set_ylabel("omission rate")
    ax.set_xlabel("optimizer step")
    ax.set_ylim(-0.05, 1.0)
    ax.set_title("omission rate (0 = dense step)", fontsize=9)
    ax.grid(alpha=0.3)
