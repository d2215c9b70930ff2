"""``emotion-train evaluate``: accuracy, per-class accuracy and confusion matrix of a checkpoint."""

from __future__ import annotations

import time

import torch

from training.data import Split
from worker.classify import TTA_MODES, predict
from worker.model import ModelInfo, OnnxModel, ResNet9


def evaluate_model(
    model: ResNet9 | OnnxModel,
    info: ModelInfo,
    split: Split,
    tta: str = "none",
    amp: torch.dtype | None = None,
    batch_size: int = 128,
) -> dict:
    """Score ``model`` on ``split``.

    Returns ``accuracy`` (fraction correct), ``per_class`` (class name to accuracy,
    only for classes present in the split), ``n`` (images), ``counts`` (images per
    present class) and ``confusion`` (rows: true class, columns: predicted, in
    ``info.classes`` order), ``faces_per_s`` (faces classified per second, the
    model's throughput alone: the images are decoded beforehand) and ``batch_size``.
    """
    if tuple(split.classes) != tuple(info.classes):
        order = [info.classes.index(c) for c in split.classes]
        labels = torch.tensor(order)[split.labels]
    else:
        labels = split.labels
    start = time.perf_counter()
    probs = predict(model, info, split.images, tta, batch_size=batch_size, amp=amp)
    seconds = time.perf_counter() - start
    pred = probs.argmax(1)
    k = len(info.classes)
    confusion = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
    counts = confusion.sum(1)
    per_class = {
        name: round(confusion[i, i].item() / counts[i].item(), 4)
        for i, name in enumerate(info.classes)
        if counts[i] > 0
    }
    return {
        "accuracy": round((pred == labels).float().mean().item(), 4) if len(labels) else float("nan"),
        "per_class": per_class,
        "n": len(labels),
        "counts": {name: counts[i].item() for i, name in enumerate(info.classes) if counts[i] > 0},
        "confusion": confusion.tolist(),
        "faces_per_s": round(len(labels) / seconds, 1) if seconds > 0 else float("nan"),
        "batch_size": batch_size,
    }


def evaluate_tta_modes(model: ResNet9, info: ModelInfo, split: Split, amp: torch.dtype | None = None) -> dict:
    """:func:`evaluate_model` for each test-time augmentation (:data:`TTA_MODES`), by mode."""
    return {tta: evaluate_model(model, info, split, tta, amp=amp) for tta in TTA_MODES}


def summary(results: dict) -> dict:
    """Accuracy, per-class accuracy and count of each mode's result, as ``metrics.json`` keeps them under ``val``."""
    return {tta: {k: r[k] for k in ("accuracy", "per_class", "n")} for tta, r in results.items()}
