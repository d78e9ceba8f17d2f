"""The report's two figures: pretraining loss curves, and accuracy against the images per sequence K."""

from __future__ import annotations

import csv
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .recipes import ARMS, EVALS, K_SWEEP  # noqa: E402
from .stats import mean_std  # noqa: E402
from .template import ARM_NAMES, EVAL_NAMES  # noqa: E402


def plot_losses(curves: Path, batch_size: int, path: Path) -> bool:
    """Every pretraining loss curve in `curves` against images seen (an arm's first seed solid, the others faint);
    False if there is none."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn = False
    for arm in ARMS:
        files = sorted(curves.glob(f"{arm}_s*.csv"))
        for i, f in enumerate(files):
            with open(f, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if r.get("train/loss")]
            x = [int(r["step"]) * batch_size / 1e3 for r in rows]
            ax.plot(x, [float(r["train/loss"]) for r in rows], color=f"C{list(ARMS).index(arm)}", lw=1,
                    alpha=0.9 if i == 0 else 0.35, label=ARM_NAMES[arm] if i == 0 else None)
            drawn = True
    if not drawn:
        plt.close(fig)
        return False
    ax.set(xlabel="images seen (thousands)", ylabel="training loss (MSE, normalized pixels)",
           title="Pretraining loss per arm (all seeds; faint = seeds > 0)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def plot_accuracy_vs_k(table: dict, path: Path) -> bool:
    """Test top-1 against K, mean ± std over seeds, one panel per evaluation, no pretraining dashed; False if the
    K sweep has no result yet."""
    fig, axes = plt.subplots(1, len(EVALS), figsize=(13, 3.4))
    drawn = False
    for ax, item in zip(axes, EVALS):
        points = [(ARMS[arm]["num_images"], [e["test_top1"] for e in table[arm, item]]) for arm in K_SWEEP]
        points = [(k, v) for k, v in points if v]
        if points:
            drawn = True
            ks = [k for k, _ in points]
            stats = [mean_std(v) for _, v in points]
            ax.errorbar(ks, [m for m, _ in stats], yerr=[0 if s != s else s for _, s in stats], marker="o",
                        capsize=3)
        scratch = [e["test_top1"] for e in table["scratch", item]]
        if scratch:
            ax.axhline(statistics.mean(scratch), color="gray", ls="--", lw=1, label="no pretraining")
            ax.legend(fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16], ["1\n(ARM)", "2", "4", "8", "16"])
        ax.set(title=EVAL_NAMES[item], xlabel="images per sequence K")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test top-1 (%)")
    fig.tight_layout()
    if drawn:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return drawn
