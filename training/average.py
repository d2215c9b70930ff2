"""``emotion-train average``: one model whose weights are the mean of several checkpoints' weights.

Two uses, both at the cost of a single model at test time:

- the checkpoints of the last, low-learning-rate epochs of one run (``fit
  --keep-epochs``): stochastic weight averaging (Izmailov, Podoprikhin, Garipov,
  Vetrov and Wilson, "Averaging Weights Leads to Wider Optima and Better
  Generalization", UAI 2018);
- the kept checkpoints of several warm restarts (``fit --init``) of one model: a
  uniform "model soup" (Wortsman et al., "Model soups", ICML 2022).

The checkpoints must share a starting point; the mean of unrelated networks is
not a network. BatchNorm running statistics of the mean are not the statistics
of the mean's activations, so they are recomputed on train/ as ``emotion-train
recalibrate`` does, and the result is scored on val/ in every TTA mode.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from training.fit import BEST_FILE, EPOCHS_DIR, METRICS_FILE, epochs_behind, pick_device
from worker.model import CheckpointError, ModelInfo, ResNet9, load_checkpoint, save_checkpoint


@torch.no_grad()
def mean_state(models: list[ResNet9]) -> dict[str, torch.Tensor]:
    """The element-wise mean of the models' floating-point tensors (weights and BatchNorm buffers).

    Summed in float64 and returned in each tensor's own dtype; integer tensors
    (BatchNorm's batch counters) are taken from the first model.
    """
    first = models[0].state_dict()
    out = {}
    for key, tensor in first.items():
        if tensor.is_floating_point():
            total = sum(m.state_dict()[key].double() for m in models)
            out[key] = (total / len(models)).to(tensor.dtype)
        else:
            out[key] = tensor.clone()
    return out


def check_same_model(infos: list[ModelInfo], paths: list[Path]) -> None:
    """Raise :class:`CheckpointError` naming both files unless all checkpoints describe the same network."""

    def shape(info: ModelInfo) -> tuple:
        return info.width, tuple(info.classes), info.input_size, info.mean, info.std

    for info, path in zip(infos[1:], paths[1:]):
        if shape(info) != shape(infos[0]):
            raise CheckpointError(
                f"{path}: cannot be averaged with {paths[0]}: it has width {info.width}, classes "
                f"{list(info.classes)}, input {info.input_size} px, normalisation {info.mean}/{info.std}; "
                f"{paths[0]} has width {infos[0].width}, classes {list(infos[0].classes)}, input "
                f"{infos[0].input_size} px, normalisation {infos[0].mean}/{infos[0].std}"
            )


def run_folder(checkpoint: Path) -> Path:
    """The fit run's ``--out`` folder a checkpoint belongs to (its own folder, or the one above ``epochs/``)."""
    folder = checkpoint.parent
    return folder.parent if folder.name == EPOCHS_DIR else folder


def train_seconds(infos: list[ModelInfo], paths: list[Path]) -> float:
    """Seconds of training behind the checkpoints of this average, each run counted once.

    Checkpoints of one run record the minutes up to their epoch, so each run
    counts with its latest checkpoint's; the runs' times add up. Time before a
    run's ``--init`` is not included (checkpoint metadata keeps it as
    ``init_train_minutes``).
    """
    by_run: dict[Path, float] = {}
    for info, path in zip(infos, paths):
        run = run_folder(path).resolve()
        by_run[run] = max(by_run.get(run, 0.0), float(info.extra.get("train_minutes") or 0) * 60)
    return sum(by_run.values())


def average(
    weights: list[Path], data: Path, out: Path, images: int | None = None, device: str = "auto", seed: int = 0
) -> dict:
    """Average the checkpoints ``weights``, recalibrate BatchNorm on ``data``'s train/ and write a run into ``out``.

    Each of ``weights`` is a checkpoint file or a fit run's ``--out`` folder (its
    ``best.safetensors``). ``out`` gets ``best.safetensors`` and ``metrics.json``,
    so ``emotion-train export --run OUT`` bundles it. The metadata (recipe,
    lineage) is that of the checkpoint with the most epochs of training behind it;
    ``averaged`` lists every input. ``images`` and ``seed`` are as for
    ``emotion-train recalibrate``. Returns the metrics written.

    Raises :class:`CheckpointError` (a ``ValueError``) naming the file when fewer
    than two checkpoints are given, one is missing or unreadable, two describe
    different networks, or ``out`` is the folder of one of them.
    """
    from training.data import load_split
    from training.evaluate import evaluate_tta_modes, summary
    from training.export import run_checkpoint
    from training.plots import plot_confusion
    from training.recalibrate import recalibrate_batchnorm, train_faces
    from worker.classify import autocast_dtype

    out = Path(out)
    paths = [run_checkpoint(Path(w)) for w in weights]
    if len(paths) < 2:
        raise CheckpointError(f"averaging needs two or more checkpoints, got {len(paths)}")
    if len({p.resolve() for p in paths}) < len(paths):
        raise CheckpointError("a checkpoint is given twice; give each once (the mean is unweighted)")
    if any(out.resolve() == p.parent.resolve() for p in paths):
        raise CheckpointError(f"{out}: write the average to another folder than those of its checkpoints")
    if images is not None and images < 1:
        raise ValueError(f"--images must be at least 1, got {images}")
    dev = pick_device(device)
    amp = autocast_dtype(dev)

    loaded = [load_checkpoint(p, dev) for p in paths]
    infos = [info for _, info in loaded]
    check_same_model(infos, paths)
    model = loaded[0][0]
    model.load_state_dict(mean_state([m for m, _ in loaded]))
    base = max(range(len(infos)), key=lambda i: epochs_behind(infos[i].extra) or 0)
    info = infos[base]
    del loaded

    train, val = load_split(data, "train", info.classes), load_split(data, "val", info.classes)
    gen = torch.Generator().manual_seed(seed)
    pixels = train_faces(train, images, gen)
    recalibrate_batchnorm(model, pixels, info.mean, info.std, generator=gen, amp=amp)
    results = evaluate_tta_modes(model, info, val, amp)

    averaged = [
        {
            "checkpoint": str(p),
            "version": i.version,
            "epochs_behind": epochs_behind(i.extra),
            "val_acc_tta": i.extra.get("val_acc_tta"),
        }
        for p, i in zip(paths, infos)
    ]
    seconds = train_seconds(infos, paths)
    extra = {
        **info.extra,
        "averaged": json.dumps(averaged),
        "recalibrated": f"BatchNorm statistics from {len(pixels)} clean {data} train/ images, mirrored at random, "
        "dropout off",
        "train_minutes": f"{seconds / 60:.1f}",
        "val_acc": f"{results['none']['accuracy']:.4f}",
        "val_acc_tta": f"{results['flip']['accuracy']:.4f}",
    }
    info = replace(info, extra=extra)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, info, out / BEST_FILE)

    run_metrics_file = run_folder(paths[base]) / METRICS_FILE
    run_metrics = json.loads(run_metrics_file.read_text()) if run_metrics_file.is_file() else {}
    metrics = {
        "recipe": extra.get("recipe", "unknown"),
        "hyperparameters": run_metrics.get("hyperparameters", {}),
        "width": info.width,
        "epochs": int(extra.get("epochs") or 0),
        "best_epoch": int(extra.get("best_epoch") or extra.get("epoch") or 0),
        "device": run_metrics.get("device", extra.get("device", "")),
        "train_images": int(extra.get("train_images") or len(train)),
        "train_seconds": round(seconds, 1),
        "val": summary(results),
        "val_confusion": results["none"]["confusion"],
        "classes": list(info.classes),
        **{k: extra[k] for k in ("init", "init_version", "init_epochs", "init_train_minutes") if k in extra},
        "data": extra.get("data", str(data)),
        "averaged": averaged,
        "recalibration": {"train_images": len(pixels), "seed": seed, "data": str(data)},
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    plot_confusion(results["none"]["confusion"], list(info.classes), out / "confusion.png")
    return metrics
