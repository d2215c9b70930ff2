"""``emotion-train export``: write a trained checkpoint as the bundled fp16 model.

The exported file is an ordinary checkpoint (see ``worker.model``) with its
floating-point tensors in fp16 and its metadata extended from the run's
``metrics.json``, so the bundled model says which recipe, data and accuracy it
comes from.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from training.fit import BEST_FILE, METRICS_FILE, epochs_behind, lineage
from worker.classify import TTA_MODES, predict, val_acc_key
from worker.model import BUNDLED_WEIGHTS, CheckpointError, ModelInfo, load_checkpoint, save_checkpoint

MAX_BYTES = 25_000_000  # the bundled model ships inside the package and the image
# Largest difference in class probability allowed between the fp32 model and its fp16 copy.
FP16_TOLERANCE = 1e-2


def export(run: Path, to: Path | None = None) -> Path:
    """Export the best checkpoint of a fit run as an fp16 checkpoint; return the path written.

    ``run`` is the ``--out`` folder of ``emotion-train fit`` (its ``best.safetensors``
    and ``metrics.json`` are used) or a checkpoint file (then a ``metrics.json``
    beside a ``best.safetensors`` is used too). ``to`` defaults to the bundled
    model, ``worker/weights/resnet9.safetensors``; a folder means that file name
    inside it. Raises :class:`CheckpointError` (a ``ValueError``) naming the path
    when there is no checkpoint, the metrics belong to another model, the fp16
    copy does not reproduce the model, or the result is 25 MB or more; the
    destination is then left as it was.
    """
    source = run_checkpoint(Path(run))
    model, info = load_checkpoint(source)
    info = _with_lineage(info)
    metrics = run_metrics(source, info)
    info = exported_info(info, metrics)

    to = Path(to) if to is not None else BUNDLED_WEIGHTS
    if to.is_dir():
        to = to / BUNDLED_WEIGHTS.name
    # Written beside the destination and moved into place only once checked, so a
    # failed export never replaces a working bundled model.
    staged = to.with_name(to.name + ".export.tmp")
    try:
        save_checkpoint(model, info, staged, dtype=torch.float16)
        size = staged.stat().st_size
        if size >= MAX_BYTES:
            raise CheckpointError(
                f"{to}: the exported model would be {size / 1e6:.1f} MB, the limit is {MAX_BYTES / 1e6:.0f} MB; "
                f"export a narrower model (width {info.width} now)"
            )
        _check_same_outputs(model, staged, to)
        os.replace(staged, to)
    finally:
        staged.unlink(missing_ok=True)
    return to


def run_checkpoint(run: Path) -> Path:
    """The checkpoint ``run`` names: the ``best.safetensors`` of a fit run's folder, or ``run`` itself if a file.

    Raises :class:`CheckpointError` naming ``run`` when there is none.
    """
    if run.is_dir():
        source = run / BEST_FILE
        if not source.is_file():
            raise CheckpointError(
                f"{run}: no {BEST_FILE} in this folder; pass the --out folder of a finished "
                "'emotion-train fit' run or a checkpoint file"
            )
        return source
    if run.is_file():
        return run
    raise CheckpointError(f"{run} does not exist")


def run_metrics(source: Path, info: ModelInfo) -> dict | None:
    """The ``metrics.json`` of the fit run whose ``best.safetensors`` is ``source`` (described by ``info``).

    ``None`` for a checkpoint that is not a run's ``best.safetensors`` or a run
    without metrics; :class:`CheckpointError` when the metrics are unreadable or
    describe another model.
    """
    return _read_metrics(source.parent / METRICS_FILE, info) if source.name == BEST_FILE else None


def exported_info(info: ModelInfo, metrics: dict | None, now: datetime | None = None) -> ModelInfo:
    """``info`` with ``version`` set and ``extra`` extended from ``metrics``.

    The version is ``YYYY.MM.DD-<recipe>-w<width>-e<epochs>``, the epochs counting
    all the training behind the weights (warm restarts included), so that two
    models exported on one day tell themselves apart in every event; ``-e<epochs>``
    is left out when the checkpoint does not record its epochs, ``-avg<n>`` is added
    when ``emotion-train average`` made it from ``n`` checkpoints, and ``-bn`` when
    its BatchNorm statistics were recomputed (``recalibrate``, ``average``).

    Added keys (all strings): ``recipe``, ``epochs``, ``best_epoch``, ``device``,
    ``train_minutes``, ``train_images``, ``val_acc``, ``val_acc_flip``,
    ``val_acc_tencrop``, ``val_acc_rotate`` (fractions correct on val/ without
    TTA, with flip, with ten-crop, with rotate), ``val_n`` (images),
    ``val_per_class`` (JSON: class to fraction, no TTA), ``hyperparameters``
    (JSON), ``data`` and ``exported`` (ISO 8601, UTC).
    """
    now = now or datetime.now(UTC)
    extra = dict(info.extra)
    if metrics:
        val = metrics.get("val", {})
        extra.update(
            recipe=str(metrics["recipe"]),
            epochs=str(metrics["epochs"]),
            best_epoch=str(metrics["best_epoch"]),
            device=str(metrics.get("device", extra.get("device", ""))),
            train_minutes=f"{metrics['train_seconds'] / 60:.1f}",
            train_images=str(metrics.get("train_images", extra.get("train_images", ""))),
            data=str(metrics.get("data", extra.get("data", ""))),
            hyperparameters=json.dumps(metrics.get("hyperparameters", {}), sort_keys=True),
        )
        for tta in TTA_MODES:
            if tta in val:
                extra[val_acc_key(tta)] = f"{val[tta]['accuracy']:.4f}"
        if "none" in val:
            extra["val_n"] = str(val["none"]["n"])
            extra["val_per_class"] = json.dumps(val["none"]["per_class"])
    extra["exported"] = now.isoformat(timespec="seconds")
    recipe = extra.get("recipe", "unknown")
    version = f"{now:%Y.%m.%d}-{recipe}-w{info.width:g}"
    if epochs := epochs_behind(extra):
        version += f"-e{epochs}"
    if "averaged" in extra:
        version += f"-avg{len(json.loads(extra['averaged']))}"  # mean of that many checkpoints' weights
    if "recalibrated" in extra:
        version += "-bn"  # same weights as the run's, other BatchNorm statistics: another model
    return replace(info, version=version, extra=extra)


def _with_lineage(info: ModelInfo) -> ModelInfo:
    """Add what a warm restart started from, for checkpoints that name their ``init`` path only."""
    init = info.extra.get("init")
    if not init or "init_version" in info.extra or not Path(init).is_file():
        return info
    return replace(info, extra={**info.extra, **lineage(load_checkpoint(init)[1])})


def _read_metrics(path: Path, info: ModelInfo) -> dict | None:
    if not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
        recipe, width, epochs = metrics["recipe"], float(metrics["width"]), metrics["epochs"]
        metrics["best_epoch"], metrics["train_seconds"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: not the metrics.json of a finished fit run ({exc!r})") from None
    # The checkpoint records its own recipe and width; metrics from another run must not be attached to it.
    if (
        width != info.width
        or recipe != info.extra.get("recipe", recipe)
        or str(epochs) != info.extra.get("epochs", str(epochs))
    ):
        raise CheckpointError(
            f"{path}: describes a {recipe!r} run of width {width} and {epochs} epochs, but the checkpoint beside it "
            f"is {info.extra.get('recipe')!r}, width {info.width}, {info.extra.get('epochs')} epochs"
        )
    return metrics


def _check_same_outputs(model: torch.nn.Module, exported: Path, to: Path) -> None:
    """Refuse an fp16 copy whose probabilities differ (weights out of fp16 range, say)."""
    copy, info = load_checkpoint(exported)
    images = torch.randint(0, 256, (8, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    diff = (predict(model, info, images) - predict(copy, info, images)).abs().max().item()
    if not diff < FP16_TOLERANCE:  # also catches NaN
        raise CheckpointError(
            f"{to}: the fp16 copy changes class probabilities by up to {diff:.3g} "
            f"(tolerance {FP16_TOLERANCE}); the weights do not survive fp16"
        )
