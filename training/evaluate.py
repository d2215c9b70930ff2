"""``emotion-train evaluate``: accuracy, per-class accuracy and confusion matrix of a model on labelled faces."""

from __future__ import annotations

import time

import torch

from training.data import Split
from worker.classify import predict
from worker.model import ModelInfo, OnnxModel, ResNet9


def evaluate_model(
    model: ResNet9 | OnnxModel,
    info: ModelInfo,
    split: Split,
    tta="none",
    amp: torch.dtype | None = None,
    batch_size=128,
) -> dict:
    """Score ``model`` on ``split``: ``accuracy`` (fraction right), ``per_class`` and ``counts`` (by class name, the
    classes present only), ``n`` (faces), ``confusion`` (rows true, columns predicted, in ``info.classes`` order),
    ``faces_per_s`` (the model alone: the faces are decoded beforehand) and ``batch_size``."""
    labels = split.labels
    if tuple(split.classes) != tuple(info.classes):  # matched by name, never by position
        labels = torch.tensor([info.classes.index(c) for c in split.classes])[labels]
    start = time.perf_counter()
    pred = predict(model, info, split.images, tta, batch_size=batch_size, amp=amp).argmax(1)
    seconds = time.perf_counter() - start
    k = len(info.classes)
    confusion = torch.bincount(labels * k + pred, minlength=k * k).view(k, k)
    counts = confusion.sum(1)
    present = [(i, name) for i, name in enumerate(info.classes) if counts[i] > 0]
    return {
        "accuracy": round((pred == labels).float().mean().item(), 4) if len(labels) else float("nan"),
        "per_class": {name: round(confusion[i, i].item() / counts[i].item(), 4) for i, name in present},
        "n": len(labels),
        "counts": {name: counts[i].item() for i, name in present},
        "confusion": confusion.tolist(),
        "faces_per_s": round(len(labels) / seconds, 1) if seconds > 0 else float("nan"),
        "batch_size": batch_size,
    }
