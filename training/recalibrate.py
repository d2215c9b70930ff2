"""``emotion-train recalibrate``: recompute a trained model's BatchNorm statistics on clean train/ images.

The ``best`` recipe keeps an exponential moving average of the weights, and the
BatchNorm running statistics in it were gathered on what training fed the
network: augmented images (shifted, rotated, erased, jittered) with dropout at
0.5 after every residual block. At test time the network sees clean faces with
dropout off, so its activations have other means and, with dropout gone, other
variances (Li, Chen, Hu and Yang, "Understanding the Disharmony between Dropout
and Batch Normalization by Variance Shift", CVPR 2019). One forward pass over
train/ as it is seen at test time (clean images, mirrored at random as flip
TTA mirrors them, dropout off) replaces those statistics with the right ones;
no weight changes and nothing is learned from val/.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from training.data import Split
from training.fit import BEST_FILE, METRICS_FILE, pick_device
from worker.model import ResNet9, load_checkpoint, save_checkpoint


@torch.no_grad()
def recalibrate_batchnorm(
    model: ResNet9,
    images: torch.Tensor,
    mean: float,
    std: float,
    mirror: bool = True,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    amp: torch.dtype | None = None,
) -> None:
    """Replace the running mean and variance of every BatchNorm layer of ``model`` in place.

    ``images`` are uint8 grey faces (N, 1, 48, 48) or (N, 48, 48), normalised with
    ``mean`` and ``std`` (of pixels in [0, 1]) as the model's checkpoint says;
    each one is mirrored with probability 1/2 when ``mirror``. The statistics are
    the averages of the batches' statistics, every batch of ``batch_size`` images
    counting the same (BatchNorm's cumulative mode), taken with dropout off.
    Weights are not touched; the model is left in eval mode.
    """
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if len(images) == 0:
        raise ValueError("no images to recalibrate BatchNorm on")
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    device = next(model.parameters()).device
    model.eval()  # dropout off
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: every batch counts the same
        m.train()
    try:
        for start in tqdm(range(0, len(images), batch_size), desc="recalibrate", leave=False, disable=None):
            x = images[start : start + batch_size].to(device).float().div(255)
            if mirror:
                flip = torch.rand(len(x), generator=generator).to(device) < 0.5
                x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
            x = (x - mean) / std
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                model(x.contiguous(memory_format=torch.channels_last))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval()


def train_faces(train: Split, images: int | None, generator: torch.Generator) -> torch.Tensor:
    """The uint8 faces of the train/ split to recalibrate on: all, or ``images`` of them drawn with ``generator``."""
    pixels = train.images
    if images is not None and images < len(pixels):
        pixels = pixels[torch.randperm(len(pixels), generator=generator)[:images]]
    return pixels


def recalibrate(
    run: Path, data: Path, out: Path, images: int | None = None, device: str = "auto", seed: int = 0
) -> dict:
    """Recalibrate the checkpoint of a fit run on ``data``'s train/ split and write it as a new run.

    ``run`` is the ``--out`` folder of ``emotion-train fit`` or a checkpoint file;
    ``images`` limits train/ to that many (a random subset, all by default). ``out``
    gets ``best.safetensors``, and ``metrics.json`` (the run's, when it has one,
    with val/ scored again) so that ``emotion-train export --run OUT`` bundles it.
    Returns the val/ results before and after, by TTA mode.
    """
    from training.data import load_split
    from training.evaluate import evaluate_model, evaluate_tta_modes, summary
    from training.export import run_checkpoint, run_metrics
    from training.plots import plot_confusion
    from worker.classify import TTA_MODES, autocast_dtype

    run, out = Path(run), Path(out)
    if images is not None and images < 1:
        raise ValueError(f"--images must be at least 1, got {images}")
    source = run_checkpoint(run)
    if out.resolve() == source.parent.resolve():
        raise ValueError(f"{out}: write the recalibrated model to another folder than the run it comes from")
    dev = pick_device(device)
    amp = autocast_dtype(dev)
    model, info = load_checkpoint(source, dev)
    train, val = load_split(data, "train", info.classes), load_split(data, "val", info.classes)
    gen = torch.Generator().manual_seed(seed)
    pixels = train_faces(train, images, gen)

    metrics = run_metrics(source, info)
    # A finished fit run has scored its checkpoint on val/ already (ten-crop alone takes minutes on a CPU);
    # only the modes it has no score for (a run from before the mode existed) are scored now.
    before = dict((metrics or {}).get("val") or {})
    missing = [tta for tta in TTA_MODES if tta not in before]
    before.update(summary({tta: evaluate_model(model, info, val, tta, amp=amp) for tta in missing}))
    recalibrate_batchnorm(model, pixels, info.mean, info.std, generator=gen, amp=amp)
    after = evaluate_tta_modes(model, info, val, amp)

    info = replace(
        info,
        extra={
            **info.extra,
            "recalibrated": f"BatchNorm statistics from {len(pixels)} clean {data} train/ images, mirrored at random, "
            "dropout off",
            "val_acc": f"{after['none']['accuracy']:.4f}",
            "val_acc_tta": f"{after['flip']['accuracy']:.4f}",
        },
    )
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, info, out / BEST_FILE)
    if metrics is not None:
        metrics["val_before_recalibration"] = before
        metrics["val"] = summary(after)
        metrics["val_confusion"] = after["none"]["confusion"]
        metrics["recalibration"] = {"run": str(run), "train_images": len(pixels), "seed": seed, "data": str(data)}
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
        if (source.parent / "curves.png").is_file():
            shutil.copy(source.parent / "curves.png", out / "curves.png")
        plot_confusion(after["none"]["confusion"], list(info.classes), out / "confusion.png")
    return {"before": before, "after": summary(after), "train_images": len(pixels)}
