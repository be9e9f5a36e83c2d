"""Learning-curve plots (PNG) of a training history."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_learning_curve(history: list[dict], path: str | Path, *, title: str = "FedRecon") -> Path:
    """Train RMSE per round and validation RMSE/accuracy where evaluated, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = [h["round"] for h in history]
    train_rmse = [h["train_rmse"] for h in history]
    val = [h for h in history if "val_rmse" in h]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(rounds, train_rmse, color="C0", lw=1, label="train (query batches)")
    ax2.plot(rounds, [100 * h["train_accuracy"] for h in history], color="C0", lw=1, label="train")
    if val:
        ax1.plot(
            [h["round"] for h in val], [h["val_rmse"] for h in val], "o-", color="C1", label="validation (ReconEval)"
        )
        ax2.plot(
            [h["round"] for h in val], [100 * h["val_accuracy"] for h in val], "o-", color="C1", label="validation"
        )
    # The untrained model's error dwarfs the rest: zoom on the range after the first rounds.
    tail = [r for r in train_rmse[len(train_rmse) // 10 :] if np.isfinite(r)]
    if tail:
        ax1.set_ylim(0.95 * min(tail), 1.5 * float(np.median(tail)))
    ax1.set(xlabel="round", ylabel="RMSE", title=f"{title}: RMSE")
    ax2.set(xlabel="round", ylabel="rating accuracy (%)", title=f"{title}: accuracy")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
