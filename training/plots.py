"""Training curves and confusion matrix as PNG files."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(history: list[dict], path: Path) -> None:
    epochs = [r["epoch"] for r in history]
    fig, (ax_loss, ax_acc, ax_lr) = plt.subplots(1, 3, figsize=(14, 4))
    ax_loss.plot(epochs, [r["loss"] for r in history])
    ax_loss.set(title="training loss", xlabel="epoch")
    for key, label in (("train_acc", "train (augmented)"), ("val_acc", "val"), ("val_acc_flip", "val, flip TTA")):
        ax_acc.plot(epochs, [r[key] for r in history], label=label)
    ax_acc.set(title="accuracy", xlabel="epoch")
    ax_acc.legend()
    ax_lr.plot(epochs, [r["lr"] for r in history])
    ax_lr.set(title="learning rate (end of epoch)", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_confusion(confusion: list[list[int]], classes: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 6))
    norm = [[v / (sum(row) or 1) for v in row] for row in confusion]
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(confusion):
        for j, v in enumerate(row):
            color = "white" if norm[i][j] > 0.5 else "black"
            ax.text(j, i, f"{v}\n{norm[i][j]:.0%}", ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(len(classes)), classes, rotation=45)
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true", title="confusion matrix (val)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
