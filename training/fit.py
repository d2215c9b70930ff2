"""``emotion-train fit``: train the ResNet9 on FER2013 with the recipe below (docs/training.md says what it does)."""

from __future__ import annotations

import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, update_bn

from training.data import Split, load_split
from worker.classify import TTA_MODES, autocast_dtype, predict, val_acc_key
from worker.model import (
    CLASSES,
    MAX_CHANNELS,
    CheckpointError,
    ModelInfo,
    ResNet9,
    load_checkpoint,
    read_info,
    resolve_weights,
    save_checkpoint,
    valid_stages,
)


def _(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Hyper:
    """The recipe. Each number is also a flag of ``emotion-train fit`` (``batch_size`` is ``--batch-size``)."""

    epochs: int = _(60, "epochs of the one-cycle schedule")
    width: float = _(1.0, "channel multiplier; 1 is the full ResNet9, of 128, 256 and 512 channels")
    stages: tuple[int, int, int] | None = _(None, "the three stages' channels, in place of --width's")
    batch_size: int = _(128, "faces per step")
    lr: float = _(0.05, "peak learning rate: linear warm-up from lr/div, then cosine down to lr/final-div")
    warmup: float = _(0.15, "fraction of the steps spent rising to the peak")
    div: float = _(25.0, "the schedule starts at lr/div")
    final_div: float = _(1e4, "and ends at lr/final-div")
    momentum: float = _(0.9, "Nesterov momentum of SGD")
    weight_decay: float = _(5e-4, "L2 on weights (not on biases and BatchNorm)")
    head_lr_scale: float = _(0.02, "learning rate of the classifier relative to the rest")
    label_smoothing: float = _(0.1, "label smoothing of the loss on the labels")
    ema_decay: float = _(0.998, "decay of the moving average of the weights, updated every step")
    swa_epochs: int | None = _(None, "the model kept is the mean of that average at the ends of the last N epochs")
    kd_weight: float = _(0.7, "with --teacher: weight of its soft targets in the loss, the labels get the rest")
    kd_temperature: float = _(4.0, "with --teacher: softening temperature of its and the model's outputs")
    # Augmentation, drawn per face: a mirror image half of the time, then
    rotate_deg: float = _(12.0, "augmentation: rotation by up to this many degrees either way")
    scale: float = _(0.1, "augmentation: zoom by a factor in [1 - scale, 1 + scale]")
    shift_px: float = _(4.0, "augmentation: shift by up to this many pixels along each axis")
    brightness: float = _(0.1, "augmentation: added to pixels in [0, 1], uniform in [-b, b]")
    contrast: float = _(0.2, "augmentation: contrast factor in [1 - c, 1 + c] around the face's mean")
    erase_p: float = _(0.3, "augmentation: probability of one rectangle replaced by noise")
    erase_area: tuple[float, float] = _((0.02, 0.15), "augmentation: that rectangle's area, fractions of the face")

    def __post_init__(self) -> None:
        if self.swa_epochs is None:  # the last quarter of the schedule: 15 of 60 epochs
            object.__setattr__(self, "swa_epochs", max(1, self.epochs // 4))
        rules = [
            ("epochs", self.epochs >= 1, "1 or more"),
            ("batch_size", self.batch_size >= 1, "1 or more"),
            ("width", 0 < self.width <= 4, "in (0, 4]"),
            (
                "stages",
                self.stages is None or valid_stages(self.stages),
                f"three channel counts in [1, {MAX_CHANNELS}]",
            ),
            ("lr", self.lr > 0, "above 0"),
            ("ema_decay", 0 <= self.ema_decay < 1, "in [0, 1)"),
            ("swa_epochs", 0 <= self.swa_epochs <= self.epochs, "in [0, epochs]"),
            ("kd_weight", 0 <= self.kd_weight <= 1, "in [0, 1]"),
            ("kd_temperature", self.kd_temperature > 0, "above 0"),
        ]
        for name, ok, rule in rules:
            if not ok:
                raise ValueError(f"--{name.replace('_', '-')} must be {rule}, got {getattr(self, name)}")


RECIPE = "best"  # the recipe's name in checkpoints and model versions
BEST_FILE, METRICS_FILE = "best.safetensors", "metrics.json"
TEACHER_DIR = "teacher-targets"  # beside the run folders, shared by the runs with one teacher and data
TEACHER_TTA = "flip"  # the teacher's soft targets: its prediction with the worker's test-time augmentation


def fit(data, out, hp: Hyper = Hyper(), device="auto", limit=None, seed=0, init=None, teacher=None) -> dict:
    """Train on ``data`` (see ``load_split``); write the model and ``metrics.json`` (the
    per-epoch history) into the folder ``out``.

    ``limit``: train on a stratified subset of that many train/ faces (and a quarter as many val/ faces).
    ``init``: start from that checkpoint (same width) or bundled model. ``teacher``: a checkpoint or bundled
    model of any width, whose soft targets on the clean train/ faces join the labels in the loss.
    Returns the metrics.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    amp = autocast_dtype(dev)
    train, val = load_split(data, "train"), load_split(data, "val")
    if limit:
        train, val = train.subset(limit, seed), val.subset(max(limit // 4, 50), seed)
    log(f"data: {len(train)} train / {len(val)} val images from {data}; device {dev}, precision {amp or 'fp32'}")

    torch.manual_seed(seed)
    model = ResNet9(len(CLASSES), hp.width, stages=hp.stages)
    init_info = start_from(model, init) if init is not None else None
    if init_info is None:
        quiet_init(model)
    model = model.to(dev, memory_format=torch.channels_last)
    ema = AveragedModel(model, multi_avg_fn=averaging(hp.ema_decay), use_buffers=True)
    swa = AveragedModel(model, multi_avg_fn=averaging(None), use_buffers=True)
    opt = make_optimizer(hp, model)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    gen = torch.Generator(device=dev).manual_seed(seed)
    steps = max(1, len(train) // hp.batch_size)
    swa_from = hp.epochs - hp.swa_epochs  # the first epoch (from 0) whose end joins the mean
    history, train_seconds = [], 0.0
    info = ModelInfo(width=hp.width, stages=hp.stages)
    soft = teacher_version = None
    if teacher is not None:
        soft, teacher_version = teacher_targets(teacher, train, dev, amp, out.parent / TEACHER_DIR)
        soft = soft.to(dev)
    x_train, y_train = train.images.unsqueeze(1).to(dev), train.labels.to(dev)
    for epoch in range(hp.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(train), device=dev, generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = progress(range(steps), f"epoch {epoch + 1}/{hp.epochs}")
        for i in bar:
            for group in opt.param_groups:
                group["lr"] = lr_at(hp, epoch * steps + i, steps * hp.epochs) * group["lr_scale"]
            idx = perm[i * hp.batch_size : (i + 1) * hp.batch_size]
            x, y = normalise(augment(x_train[idx], hp, gen), info), y_train[idx]
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=hp.label_smoothing)
            if soft is not None:
                kd = distill_loss(logits.float(), soft[idx], hp.kd_temperature)
                loss = (1 - hp.kd_weight) * loss + hp.kd_weight * kd
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            ema.update_parameters(model)
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            if hasattr(bar, "set_postfix"):  # tqdm's
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        seconds = time.perf_counter() - t0
        train_seconds += seconds
        if epoch >= swa_from:
            swa.update_parameters(ema.module)
        ema.module.eval()
        row = {"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen}
        for tta in ("none", "flip"):  # val/ accuracy of the moving average, without and with flip TTA
            row[val_acc_key(tta)] = accuracy(predict(ema.module, info, val.images, tta, amp=amp), val.labels)
        row |= {"lr": opt.param_groups[0]["lr"], "images_per_s": seen / seconds, "seconds": seconds}
        history.append(row)
        print(
            f"epoch {epoch + 1:3d}/{hp.epochs} loss {row['loss']:.4f} train {row['train_acc']:.4f} "
            f"val {row['val_acc']:.4f} val_flip {row['val_acc_flip']:.4f} lr {row['lr']:.5f} "
            f"{row['images_per_s']:.0f} img/s {seconds:.0f}s" + (" (averaged)" if epoch >= swa_from else ""),
            flush=True,
        )

    extra = {
        "recipe": RECIPE,
        "hyperparameters": json.dumps(asdict(hp)),
        "epochs": str(hp.epochs),
        "train_minutes": f"{train_seconds / 60:.1f}",
        "train_images": str(len(train)),
        "data": str(data),
        "data_split": "trained on train/; the recipe was chosen on val/ (PublicTest)",
        "device": str(dev),
        **({"teacher": teacher_version} if teacher_version else {}),
        **({"init": str(init), **lineage(init_info)} if init_info else {}),
    }
    averaged = [{"epoch": e + 1} for e in range(swa_from, hp.epochs)] if swa.n_averaged > 1 else []
    if averaged:
        extra["averaged"] = json.dumps(averaged)
    metrics = finish(swa.module if averaged else ema.module, info, extra, train, val, out, dev, amp, seed)
    metrics |= {
        "recipe": RECIPE,
        "hyperparameters": asdict(hp),
        "epochs": hp.epochs,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else str(dev),
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "precision": str(amp or "fp32"),
        "train_images": len(train),
        "train_seconds": round(train_seconds, 1),
        "images_per_s": round(sum(r["images_per_s"] for r in history) / max(1, len(history)), 1),
        "data": str(data),
        "init": extra.get("init"),
        "teacher": teacher_version,
        "averaged": averaged,
        "history": history,
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    return metrics


def finish(model: ResNet9, info: ModelInfo, extra: dict, train: Split, val: Split, out: Path, dev, amp, seed=0) -> dict:
    """The last steps of ``fit`` and ``average``: recalibrate BatchNorm, score on val/ in every TTA mode, write the
    model (metadata ``extra`` plus its scores). Returns metrics for ``metrics.json``."""
    from training.evaluate import evaluate_model

    recalibrate(model, train.images, info, torch.Generator().manual_seed(seed), amp)
    extra["recalibrated"] = f"BatchNorm statistics from {len(train)} clean train/ faces, mirrored at random"
    results = {tta: evaluate_model(model, info, val, tta, amp=amp) for tta in TTA_MODES}
    extra |= {val_acc_key(tta): f"{r['accuracy']:.4f}" for tta, r in results.items()}
    extra |= {"val_n": str(len(val)), "val_per_class": json.dumps(results["none"]["per_class"])}
    now = datetime.now(UTC)
    extra["date"] = now.isoformat(timespec="seconds")
    kept = replace(info, version=version(extra, info, now), extra=extra)
    save_checkpoint(model, kept, out / BEST_FILE)
    scores = ", ".join(f"{tta} {r['accuracy']:.4f}" for tta, r in results.items())
    print(f"{kept.version}: val accuracy {scores}; wrote {out / BEST_FILE}", flush=True)
    return {
        "version": kept.version,
        "width": info.width,
        **({"stages": list(info.stages)} if info.stages else {}),
        "recalibrated": extra["recalibrated"],
        "val": {tta: {k: r[k] for k in ("accuracy", "per_class", "n")} for tta, r in results.items()},
        "val_confusion": results["none"]["confusion"],
        "classes": list(info.classes),
        **{k: extra[k] for k in ("init_version", "init_epochs", "init_train_minutes") if k in extra},
    }


def augment(images: torch.Tensor, hp: Hyper, gen: torch.Generator) -> torch.Tensor:
    """Augment uint8 faces (B, 1, H, W) on their device, parameters drawn per face; float32 in [0, 1] out."""
    x = images.float().div_(255)
    b, _, h, w = x.shape
    dev = x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, device=dev, generator=gen) * (hi - lo) + lo

    # One affine grid per face: mirror, rotation, zoom, shift.
    angle = uniform(-hp.rotate_deg, hp.rotate_deg) * (math.pi / 180)
    inv_scale = 1 / uniform(1 - hp.scale, 1 + hp.scale)
    flip = torch.where(torch.rand(b, device=dev, generator=gen) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
    theta = torch.zeros(b, 2, 3, device=dev)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos * flip, -sin, sin * flip, cos
    theta[:, 0, 2] = uniform(-hp.shift_px, hp.shift_px) * (2 / w)
    theta[:, 1, 2] = uniform(-hp.shift_px, hp.shift_px) * (2 / h)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    contrast = uniform(1 - hp.contrast, 1 + hp.contrast).view(b, 1, 1, 1)
    brightness = uniform(-hp.brightness, hp.brightness).view(b, 1, 1, 1)
    x = ((x - mean) * contrast + mean + brightness).clamp_(0, 1)

    area = uniform(*hp.erase_area) * (h * w)
    ratio = torch.exp(uniform(math.log(0.3), math.log(3.3)))
    eh, ew = (area * ratio).sqrt().clamp(1, h), (area / ratio).sqrt().clamp(1, w)
    y0, x0 = uniform(0, 1) * (h - eh), uniform(0, 1) * (w - ew)
    rows, cols = torch.arange(h, device=dev).view(1, h, 1), torch.arange(w, device=dev).view(1, 1, w)
    inside = (rows >= y0.view(b, 1, 1)) & (rows < (y0 + eh).view(b, 1, 1))
    inside = inside & (cols >= x0.view(b, 1, 1)) & (cols < (x0 + ew).view(b, 1, 1))
    erase = (torch.rand(b, device=dev, generator=gen) < hp.erase_p).view(b, 1, 1)
    return torch.where((inside & erase).unsqueeze(1), torch.rand(x.shape, device=dev, generator=gen), x)


def normalise(x: torch.Tensor, info: ModelInfo) -> torch.Tensor:
    """Faces in [0, 1] as the network takes them: standardised, channels_last."""
    return ((x - info.mean) / info.std).contiguous(memory_format=torch.channels_last)


def lr_at(hp: Hyper, step: int, total: int) -> float:
    """One-cycle learning rate: linear warm-up from lr/div to lr, cosine down to lr/final_div."""
    up = max(1, int(total * hp.warmup))
    lo, hi, end = hp.lr / hp.div, hp.lr, hp.lr / hp.final_div
    if step < up:
        return lo + (hi - lo) * step / up
    t = min(1.0, (step - up) / max(1, total - up))
    return end + (hi - end) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(hp: Hyper, model: ResNet9) -> torch.optim.Optimizer:
    """SGD with Nesterov momentum; each group's ``lr_scale`` multiplies the schedule's rate."""
    head = {id(p) for p in model.classifier.parameters()}
    body = [p for p in model.parameters() if id(p) not in head]
    groups = [
        {"params": [p for p in body if p.dim() > 1], "weight_decay": hp.weight_decay, "lr_scale": 1.0},
        {"params": [p for p in body if p.dim() <= 1], "weight_decay": 0.0, "lr_scale": 1.0},
        {"params": list(model.classifier.parameters()), "weight_decay": hp.weight_decay, "lr_scale": hp.head_lr_scale},
    ]
    return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum, nesterov=True)


def averaging(decay: float | None):
    """``multi_avg_fn`` of an ``AveragedModel``: an EMA of ``decay`` (warmed up as ``min(decay, (1 + n) / (10 + n))``
    after ``n`` updates), or with ``None`` the plain mean. Integer buffers (batch counters) are copied."""

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n: torch.Tensor) -> None:
        n = int(n)
        weight = 1 / (n + 1) if decay is None else 1 - min(decay, (1 + n) / (10 + n))
        for a, c in zip(averaged, current):
            if a.is_floating_point():
                a.lerp_(c, weight)
            else:
                a.copy_(c)

    return update


@torch.no_grad()
def recalibrate(model: ResNet9, faces: torch.Tensor, info: ModelInfo, gen: torch.Generator, amp=None) -> None:
    """Recompute the BatchNorm statistics of ``model`` on uint8 ``faces`` (N, 48, 48), mirrored at random, with
    dropout off: those gathered in training saw augmented faces and dropout, unlike the worker's. Leaves it in eval."""
    dev = next(model.parameters()).device

    def batches():
        for i in progress(range(0, len(faces), 256), "recalibrate"):
            x = faces[i : i + 256].unsqueeze(1).to(dev).float().div(255)
            mirror = (torch.rand(len(x), generator=gen) < 0.5).to(dev).view(-1, 1, 1, 1)
            yield normalise(torch.where(mirror, x.flip(-1), x), info)

    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    rates = [m.p for m in dropouts]
    for m in dropouts:
        m.p = 0.0  # update_bn puts the model in training mode, dropout included
    try:
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            update_bn(batches(), model.eval())
    finally:
        for m, p in zip(dropouts, rates):
            m.p = p


def quiet_init(model: ResNet9) -> None:
    """Zero the last BatchNorm scale of each residual branch and the classifier, so each block starts as the
    identity and the first loss is ln 7; by default it is near 5 and SGD at the peak rate diverges."""
    for block in (model.res1, model.res2, model.res3):
        nn.init.zeros_(block[-1][1].weight)
    nn.init.zeros_(model.classifier[-1].weight)
    nn.init.zeros_(model.classifier[-1].bias)


def start_from(model: ResNet9, path: str | Path) -> ModelInfo:
    """Copy the weights of the checkpoint ``path`` (or bundled model's name) into ``model``; return its metadata.

    A checkpoint with more channels in a stage is pruned to ``model``'s: see :func:`prune_into`.
    """
    src, info = load_checkpoint(resolve_weights(path))
    wider = all(have >= want for have, want in zip(src.stages, model.stages))
    if not wider or tuple(info.classes) != CLASSES:
        raise CheckpointError(
            f"{path}: --init needs a checkpoint with classes {list(CLASSES)} and at least the channels of the "
            f"network trained ({model.stages}); it has {info.shape} ({src.stages}) and classes {list(info.classes)}"
        )
    if src.stages == model.stages:
        model.load_state_dict(src.state_dict())
    else:
        prune_into(model, src)
    return info


def prune_into(model: ResNet9, src: ResNet9) -> None:
    """Copy into ``model`` the weights of the wider ``src``, keeping in each group of channels that ``model``
    has fewer of those whose BatchNorm scales are largest (in sum over the layers that write them).

    A stage's channels form three groups: its first conv's outputs, the inner channels of its residual block,
    and the channels of the residual stream (its second conv's outputs, which the block's output is added to).
    """
    theirs, ours = conv_blocks(src), conv_blocks(model)
    scale = [block[1].weight.detach().abs().float() for block in theirs]
    kept, reads = [], []  # per conv: the indices of the output channels kept, and of the input channels read
    stream_in = torch.arange(src.conv1[0].in_channels)  # what the stage's first conv reads
    for stage in range(3):
        first, stream, inner, out = (4 * stage + k for k in range(4))
        want = ours[stream][0].out_channels

        def pick(score: torch.Tensor, want: int = want) -> torch.Tensor:
            return torch.topk(score, want).indices.sort().values

        first_idx, stream_idx, inner_idx = pick(scale[first]), pick(scale[stream] + scale[out]), pick(scale[inner])
        kept += [first_idx, stream_idx, inner_idx, stream_idx]
        reads += [stream_in, first_idx, stream_idx, inner_idx]
        stream_in = stream_idx
    with torch.no_grad():
        for mine, their, idx, inputs in zip(ours, theirs, kept, reads):
            mine[0].weight.copy_(their[0].weight[idx][:, inputs])
            mine[0].bias.copy_(their[0].bias[idx])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(mine[1], name).copy_(getattr(their[1], name)[idx])
        head, their_head = model.classifier[-1], src.classifier[-1]
        head.weight.copy_(their_head.weight[:, kept[-1]])
        head.bias.copy_(their_head.bias)


def conv_blocks(m: ResNet9) -> list[nn.Sequential]:
    """The network's conv blocks in order, four a stage: conv, conv (+pool), and its residual block's two."""
    return [m.conv1, m.conv2, *m.res1, m.conv3, m.conv4, *m.res2, m.conv5, m.conv6, *m.res3]


def lineage(init: ModelInfo) -> dict[str, str]:
    """What a run started from: its version, and the epochs and minutes of all the training behind it (minutes
    left out when a checkpoint of the chain lacks them)."""
    extra, out = init.extra, {"init_version": init.version}
    if (epochs := epochs_behind(extra)) is not None:
        out["init_epochs"] = str(epochs)
    if "train_minutes" in extra and ("init_version" not in extra or "init_train_minutes" in extra):
        out["init_train_minutes"] = f"{float(extra['train_minutes']) + float(extra.get('init_train_minutes') or 0):.1f}"
    return out


def epochs_behind(extra: dict[str, str]) -> int | None:
    """Epochs of training behind a checkpoint's weights (metadata ``extra``), its starting points' included."""
    own = extra.get("best_epoch") or extra.get("epoch") or extra.get("epochs")  # older checkpoints: (best_)epoch
    return int(own) + int(extra.get("init_epochs") or 0) if own else None


def version(extra: dict[str, str], info: ModelInfo, when: datetime) -> str:
    """``YYYY.MM.DD-<recipe>-<size>-e<epochs>[-avg<n>][-bn]``: the size ``w<width>`` or ``s<c1>.<c2>.<c3>`` (the
    stages' channels), the epochs behind the weights, the mean of ``n`` sets of weights, recomputed BatchNorm
    statistics."""
    size = f"s{'.'.join(map(str, info.stages))}" if info.stages else f"w{info.width:g}"
    out = f"{when:%Y.%m.%d}-{extra.get('recipe', 'unknown')}-{size}"
    if epochs := epochs_behind(extra):
        out += f"-e{epochs}"
    if "averaged" in extra:
        out += f"-avg{len(json.loads(extra['averaged']))}"
    return out + ("-bn" if "recalibrated" in extra else "")


def teacher_targets(teacher: str | Path, train: Split, dev: torch.device, amp, cache: Path) -> tuple[torch.Tensor, str]:
    """The teacher's log-probabilities (N, classes) with flip TTA on the clean ``train`` faces, and its version.

    The full model takes about 10 minutes over train/ on 2 CPU cores, so the targets are kept in ``cache``,
    keyed by the teacher's file, the faces and the precision.
    """
    path = resolve_weights(teacher)
    info = read_info(path)
    if tuple(info.classes) != tuple(train.classes):
        raise CheckpointError(f"{path}: the teacher's classes {list(info.classes)} are not {list(train.classes)}")
    key = hashlib.sha256(path.read_bytes())
    key.update(train.images.numpy().tobytes())
    key.update(train.labels.numpy().tobytes())
    file = cache / f"{info.version}-{TEACHER_TTA}-{amp}-{key.hexdigest()[:16]}.safetensors"
    if file.is_file():
        log(f"teacher {info.version}: soft targets read from {file}")
        return load_file(str(file))["log_probs"], info.version
    model, info = load_checkpoint(path, dev)
    chunks = progress(range(0, len(train), 512), f"teacher {info.version}")
    probs = torch.cat([predict(model, info, train.images[i : i + 512], TEACHER_TTA, amp=amp) for i in chunks])
    cache.mkdir(parents=True, exist_ok=True)
    log_probs = probs.clamp_min(1e-12).log()
    save_file({"log_probs": log_probs}, str(file), metadata={"teacher": str(path), "version": info.version})
    log(f"teacher {info.version}: {accuracy(probs, train.labels):.4f} of the train faces right with {TEACHER_TTA} TTA")
    return log_probs, info.version


def distill_loss(logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence of the student's from the teacher's distribution, both softened by ``temperature``, times
    its square so that the gradients keep their size whatever the temperature (Hinton et al., 2015)."""
    student = F.log_softmax(logits / temperature, dim=1)
    target = F.log_softmax(teacher_log_probs / temperature, dim=1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean") * temperature**2


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but PyTorch sees no CUDA device")
    return torch.device(name)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")


def progress(iterable, desc: str):
    """A progress bar on a terminal, where tqdm (the train extra) is installed."""
    try:
        from tqdm import tqdm
    except ModuleNotFoundError:
        return iterable
    return tqdm(iterable, desc=desc, leave=False, disable=None)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
