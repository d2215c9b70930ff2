"""``emotion-train fit``: train ResNet9 on FER2013 with the ``seed`` or ``best`` recipe.

The whole training split is loaded once onto the device as uint8 and augmented
there a batch at a time. Every epoch writes a resumable training state; the
model kept (``best.safetensors``) is the epoch with the highest validation
accuracy, chosen on ``val/`` only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from training.augment import Augment, augment
from training.data import Split, load_split
from worker.classify import autocast_dtype, predict
from worker.model import (
    CLASSES,
    FER_MEAN,
    FER_STD,
    CheckpointError,
    ModelInfo,
    ResNet9,
    load_checkpoint,
    read_info,
    resolve_weights,
    save_checkpoint,
)


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    batch_size: int
    optimizer: str  # "adam" or "sgd" (Nesterov)
    lr: float  # peak of the one-cycle schedule
    weight_decay: float
    warmup: float = 0.3  # fraction of the steps spent rising to the peak
    div: float = 25.0  # the schedule starts at lr / div
    final_div: float = 1e4  # and ends at lr / final_div
    momentum: float = 0.9
    grad_clip_value: float | None = None
    label_smoothing: float = 0.0
    ema_decay: float | None = None
    select_tta: str = "none"  # test-time augmentation used to pick the best epoch
    head_lr_scale: float = 1.0  # learning rate of the classifier relative to the rest (SGD)
    quiet_init: bool = False  # start residual branches and the classifier at zero (see quiet_init)
    dropout: float = 0.5  # rate of the three dropout layers while training (the network has none at test time)
    # With a teacher (fit's ``teacher``): the loss is kd_weight times the soft-target loss at
    # kd_temperature plus (1 - kd_weight) times the label loss (Hinton et al., 2015).
    kd_weight: float = 0.7
    kd_temperature: float = 4.0
    augment: Augment = field(default_factory=Augment)


RECIPES = {
    # The original notebook's recipe: Adam, one-cycle to 0.008, weight decay 1e-4,
    # gradient values clipped at 0.1, random flips and rotations up to 30 degrees.
    "seed": Recipe(
        name="seed",
        epochs=140,
        batch_size=128,
        optimizer="adam",
        lr=0.008,
        weight_decay=1e-4,
        grad_clip_value=0.1,
        augment=Augment(flip=True, rotate_deg=30),
    ),
    "best": Recipe(
        name="best",
        epochs=60,
        batch_size=128,
        optimizer="sgd",
        lr=0.05,
        weight_decay=5e-4,
        warmup=0.15,
        label_smoothing=0.1,
        ema_decay=0.998,
        select_tta="flip",
        head_lr_scale=0.02,
        quiet_init=True,
        augment=Augment(
            flip=True,
            rotate_deg=12,
            scale=0.1,
            shift_px=4,
            brightness=0.1,
            contrast=0.2,
            erase_p=0.3,
            erase_area=(0.02, 0.15),
        ),
    ),
}

# Flips and small shifts only: close to the views the worker's test-time augmentation
# shows (the mirror image, ten-crop's 2-pixel shifts). For a short polish of a trained model.
LIGHT_AUGMENT = Augment(flip=True, shift_px=2)

STATE_FILE = "train_state.safetensors"
EPOCHS_DIR = "epochs"  # where --keep-epochs writes each epoch's checkpoint
BEST_FILE = "best.safetensors"
METRICS_FILE = "metrics.json"
TEACHER_DIR = "teacher-targets"  # beside the run folders, shared by the runs with one teacher and data
TEACHER_TTA = "flip"  # the teacher's soft targets: its prediction with the worker's test-time augmentation


def epoch_file(epoch: int) -> str:
    """The file name ``--keep-epochs`` gives the checkpoint of ``epoch`` (1-based) inside ``EPOCHS_DIR``."""
    return f"epoch-{epoch:03d}.safetensors"


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for, but PyTorch sees no CUDA device")
    return torch.device(name)


def lr_at(recipe: Recipe, step: int, total: int) -> float:
    """One-cycle learning rate: linear warm-up from lr/div to lr, cosine down to lr/final_div."""
    up = max(1, int(total * recipe.warmup))
    lo, hi, end = recipe.lr / recipe.div, recipe.lr, recipe.lr / recipe.final_div
    if step < up:
        return lo + (hi - lo) * step / up
    t = min(1.0, (step - up) / max(1, total - up))
    return end + (hi - end) * 0.5 * (1 + math.cos(math.pi * t))


def quiet_init(model: ResNet9) -> None:
    """Zero the last BatchNorm scale of each residual branch and the classifier.

    Each residual block then starts as the identity and the first logits are all
    zero (loss ln 7). With the default initialisation the first logits are large
    (loss near 5) and SGD at the peak learning rate diverges.
    """
    for block in (model.res1, model.res2, model.res3):
        torch.nn.init.zeros_(block[-1][1].weight)
    torch.nn.init.zeros_(model.classifier[-1].weight)
    torch.nn.init.zeros_(model.classifier[-1].bias)


def start_from(model: ResNet9, path: str | Path) -> ModelInfo:
    """Copy the weights of the checkpoint at ``path`` into ``model`` and return its metadata.

    A narrower checkpoint is first grown to the model's width with
    :func:`training.widen.widen`, which keeps its outputs. A wider checkpoint,
    or one with other classes, raises :class:`CheckpointError` naming both.
    """
    from training.widen import widen

    src, info = load_checkpoint(path)
    if info.width > model.width or tuple(info.classes) != CLASSES:
        raise CheckpointError(
            f"{path}: --init needs a checkpoint of width {model.width} or less with classes {list(CLASSES)}, "
            f"it has width {info.width} and classes {list(info.classes)}"
        )
    if info.width < model.width:
        print(f"widening {path} from width {info.width} to {model.width}", file=sys.stderr)
        src = widen(src.float(), model.width)
    model.load_state_dict(src.state_dict())
    return info


def lineage(init: ModelInfo) -> dict[str, str]:
    """What a warm restart started from, as checkpoint metadata (all strings).

    ``init_version`` names the starting model; ``init_epochs`` and
    ``init_train_minutes`` count the training behind its weights, its own
    starting point included, so a chain of restarts adds up. Minutes are
    left out when the starting checkpoint, or one before it, does not record
    them (one written by an older ``fit``): a partial sum would undercount.
    """
    extra = init.extra
    out = {"init_version": init.version}
    if (epochs := epochs_behind(extra)) is not None:
        out["init_epochs"] = str(epochs)
    earlier_known = "init_version" not in extra or "init_train_minutes" in extra
    if "train_minutes" in extra and earlier_known:
        minutes = float(extra["train_minutes"]) + float(extra.get("init_train_minutes") or 0)
        out["init_train_minutes"] = f"{minutes:.1f}"
    return out


def epochs_behind(extra: dict[str, str]) -> int | None:
    """Epochs of training behind a checkpoint's weights, its starting points' included.

    ``extra`` is the checkpoint's metadata; ``None`` when it does not record its own epoch.
    """
    own = extra.get("best_epoch") or extra.get("epoch")
    return int(own) + int(extra.get("init_epochs") or 0) if own else None


def teacher_targets(teacher: str | Path, train: Split, dev: torch.device, amp, cache: Path) -> tuple[torch.Tensor, str]:
    """The teacher's log-probabilities (N, classes) on the clean ``train`` faces, and its version.

    ``teacher`` is a bundled model's name or a checkpoint; it predicts with flip
    test-time augmentation. Computing them takes the teacher's inference over
    the whole split once (about 10 minutes for the full model on a 2-core CPU),
    so they are kept in the folder ``cache`` under a key made of the teacher's
    file, the images, the TTA and the precision, and read back by every later
    run with the same teacher and data.
    """
    path = resolve_weights(teacher)
    info = read_info(path)
    if tuple(info.classes) != tuple(train.classes):
        raise CheckpointError(f"{path}: the teacher's classes {list(info.classes)} are not {list(train.classes)}")
    key = hashlib.sha256(path.read_bytes())
    for part in (train.images.numpy(), train.labels.numpy(), TEACHER_TTA, str(amp)):
        key.update(part.tobytes() if hasattr(part, "tobytes") else part.encode())
    file = cache / f"{info.version}-{key.hexdigest()[:16]}.safetensors"
    if file.is_file():
        print(f"teacher {info.version}: soft targets read from {file}", file=sys.stderr)
        return load_file(str(file))["log_probs"], info.version
    from tqdm import tqdm  # the train extra

    model, info = load_checkpoint(path, dev)
    chunk = 512
    probs = torch.cat(
        [
            predict(model, info, train.images[i : i + chunk], TEACHER_TTA, amp=amp)
            for i in tqdm(range(0, len(train), chunk), desc=f"teacher {info.version}", leave=False, disable=None)
        ]
    )
    log_probs = probs.clamp_min(1e-12).log()
    cache.mkdir(parents=True, exist_ok=True)
    meta = {"teacher": str(path), "version": info.version, "images": str(len(train)), "tta": TEACHER_TTA}
    save_file({"log_probs": log_probs}, str(file), metadata=meta)
    print(
        f"teacher {info.version}: {accuracy(probs, train.labels):.4f} of the train faces right with {TEACHER_TTA} "
        f"TTA; soft targets written to {file}",
        file=sys.stderr,
    )
    return log_probs, info.version


def distill_loss(logits: torch.Tensor, teacher_log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence from the teacher's to the student's class distribution, both softened by ``temperature``.

    Scaled by the temperature squared, so its gradients keep their size whatever the temperature.
    """
    student = F.log_softmax(logits / temperature, dim=1)
    target = F.log_softmax(teacher_log_probs / temperature, dim=1)
    return F.kl_div(student, target, log_target=True, reduction="batchmean") * temperature**2


def make_optimizer(recipe: Recipe, model: torch.nn.Module) -> torch.optim.Optimizer:
    if recipe.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    head = list(model.classifier.parameters())
    body = [p for p in model.parameters() if all(p is not h for h in head)]
    groups = [
        {"params": [p for p in body if p.dim() > 1], "weight_decay": recipe.weight_decay},
        {"params": [p for p in body if p.dim() <= 1], "weight_decay": 0.0},
        {"params": head, "weight_decay": recipe.weight_decay, "lr_scale": recipe.head_lr_scale},
    ]
    return torch.optim.SGD(
        groups,
        lr=recipe.lr,
        momentum=recipe.momentum,
        nesterov=True,
    )


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, m in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.is_floating_point():
            e.lerp_(m, 1 - decay)
        else:
            e.copy_(m)


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    return (probs.argmax(1) == labels).float().mean().item() if len(labels) else float("nan")


def fit(
    data: str | Path,
    out: str | Path,
    recipe: Recipe,
    width: float = 1.0,
    device: str = "auto",
    resume: bool = False,
    limit: int | None = None,
    seed: int = 0,
    init: str | Path | None = None,
    keep_epochs: bool = False,
    teacher: str | Path | None = None,
) -> dict:
    """Train, writing the training state, ``best.safetensors``, ``metrics.json`` and plots into ``out``.

    ``limit`` trains on a stratified subset of that many images (for smoke tests).
    ``init`` starts from the weights of that checkpoint instead of from scratch
    (a second, warm-restarted schedule on a finished run). ``keep_epochs`` also
    writes the checkpoint of every epoch (the EMA weights where the recipe keeps
    them) as ``epochs/epoch-NNN.safetensors``, for ``emotion-train average``.
    ``teacher`` (a bundled model's name or a checkpoint) distils it into the
    model: its soft targets on the clean train faces (:func:`teacher_targets`,
    cached in ``TEACHER_DIR`` beside ``out``) join the labels in the loss, with
    the recipe's ``kd_weight`` and ``kd_temperature``.
    Returns the metrics written to ``metrics.json``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dev = pick_device(device)
    amp = autocast_dtype(dev)
    train, val = load_split(data, "train"), load_split(data, "val")
    if limit:
        train = train.subset(limit, seed)
        val = val.subset(max(limit // 4, 50), seed)
    print(
        f"data: {len(train)} train / {len(val)} val images from {data}; device {dev}, precision {amp or 'fp32'}",
        file=sys.stderr,
    )

    torch.manual_seed(seed)
    model = ResNet9(len(CLASSES), width)
    for layer in (model.drop1, model.drop2, model.drop3):
        layer.p = recipe.dropout
    init_info = start_from(model, init) if init is not None else None
    if init_info is None and recipe.quiet_init:
        quiet_init(model)
    model = model.to(dev, memory_format=torch.channels_last)
    ema = copy.deepcopy(model).eval() if recipe.ema_decay else None
    opt = make_optimizer(recipe, model)
    scaler = torch.amp.GradScaler(dev.type, enabled=amp == torch.float16)
    gen = torch.Generator(device=dev).manual_seed(seed)
    steps_per_epoch = max(1, len(train) // recipe.batch_size)
    total_steps = steps_per_epoch * recipe.epochs
    history: list[dict] = []
    start_epoch, best_acc, train_seconds = 0, -1.0, 0.0

    state_path = out / STATE_FILE
    if resume and state_path.exists():
        # Checked before loading: tensors of another width would not even fit the model.
        # Compared as JSON: the stored recipe comes back with lists where asdict() has tuples.
        # A state written before a field existed had that field's default.
        meta = state_meta(state_path)
        stored = {**{f.name: f.default for f in fields(Recipe) if f.default is not MISSING}, **meta["recipe"]}
        if stored != json.loads(json.dumps(asdict(recipe))) or meta["width"] != width:
            raise SystemExit(f"{state_path} was written by another recipe or width; use a new --out or drop --resume")
        meta = load_state(state_path, model, ema, opt, gen)
        start_epoch, history, best_acc = meta["epoch"], meta["history"], meta["best_acc"]
        train_seconds = meta["train_seconds"]
        print(f"resuming after epoch {start_epoch} from {state_path}", file=sys.stderr)
    elif resume:
        print(f"no training state in {out} yet; starting from the first epoch", file=sys.stderr)

    from tqdm import tqdm  # the train extra; imported here so evaluate and export work without it

    x_train = train.images.unsqueeze(1).to(dev)
    y_train = train.labels.to(dev)
    info = ModelInfo(width=width, mean=FER_MEAN, std=FER_STD)
    soft = None
    if teacher is not None:
        soft, teacher_version = teacher_targets(teacher, train, dev, amp, out.parent / TEACHER_DIR)
        soft = soft.to(dev)
        info = replace(info, extra={"teacher": teacher_version})

    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(train), device=dev, generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{recipe.epochs}", leave=False, disable=None)
        for i in bar:
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(recipe, step, total_steps) * group.get("lr_scale", 1.0)
            idx = perm[i * recipe.batch_size : (i + 1) * recipe.batch_size]
            x = augment(x_train[idx], recipe.augment, gen)
            x = ((x - info.mean) / info.std).contiguous(memory_format=torch.channels_last)
            y = y_train[idx]
            with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=recipe.label_smoothing)
            if soft is not None:
                kd = distill_loss(logits.float(), soft[idx], recipe.kd_temperature)
                loss = (1 - recipe.kd_weight) * loss + recipe.kd_weight * kd
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if recipe.grad_clip_value:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_value_(model.parameters(), recipe.grad_clip_value)
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema_update(ema, model, min(recipe.ema_decay, (1 + step) / (10 + step)))
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            seen += len(y)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}")
        epoch_seconds = time.perf_counter() - t0
        train_seconds += epoch_seconds

        kept = ema if ema is not None else model
        kept.eval()
        val_probs = predict(kept, info, val.images, "flip" if recipe.select_tta != "none" else "none", amp=amp)
        plain = accuracy(predict(kept, info, val.images, "none", amp=amp), val.labels)
        chosen = accuracy(val_probs, val.labels)
        row = {
            "epoch": epoch + 1,
            "loss": loss_sum / seen,
            "train_acc": correct / seen,
            "val_acc": plain,
            "val_acc_tta": chosen,
            "lr": opt.param_groups[0]["lr"],
            "images_per_s": seen / epoch_seconds,
            "seconds": epoch_seconds,
        }
        history.append(row)
        epoch_info = _best_info(info, recipe, row, len(train), data, dev, train_seconds, init, init_info)
        if keep_epochs:
            save_checkpoint(kept, epoch_info, out / EPOCHS_DIR / epoch_file(epoch + 1))
        if chosen > best_acc:
            best_acc = chosen
            save_checkpoint(kept, epoch_info, out / BEST_FILE)
        save_state(state_path, model, ema, opt, gen, recipe, width, epoch + 1, history, best_acc, train_seconds)
        print(
            f"epoch {epoch + 1:3d}/{recipe.epochs} loss {row['loss']:.4f} train {row['train_acc']:.4f} "
            f"val {plain:.4f} val_{recipe.select_tta} {chosen:.4f} lr {row['lr']:.5f} "
            f"{row['images_per_s']:.0f} img/s {epoch_seconds:.0f}s" + (" *" if chosen == best_acc else ""),
            flush=True,
        )

    return finish(out, recipe, width, dev, amp, history, train_seconds, val, data, len(train))


def _best_info(
    info: ModelInfo,
    recipe: Recipe,
    row: dict,
    n_train: int,
    data,
    dev,
    train_seconds: float,
    init=None,
    init_info=None,
) -> ModelInfo:
    """Metadata of the checkpoint kept at ``row``'s epoch; ``train_minutes`` counts this run up to that epoch."""
    extra = {"init": str(init), **lineage(init_info)} if init_info is not None else {}
    return replace(
        info,
        version=datetime.now(UTC).strftime("%Y.%m.%d"),
        extra={
            **info.extra,
            "recipe": recipe.name,
            "epoch": str(row["epoch"]),
            "epochs": str(recipe.epochs),
            "val_acc": f"{row['val_acc']:.4f}",
            "val_acc_tta": f"{row['val_acc_tta']:.4f}",
            "tta": recipe.select_tta,
            "train_images": str(n_train),
            "data": str(data),
            "data_split": "trained on train/, selected on val/ (PublicTest)",
            "device": str(dev),
            "train_minutes": f"{train_seconds / 60:.1f}",
            "date": datetime.now(UTC).isoformat(timespec="seconds"),
            **extra,
        },
    )


def finish(out: Path, recipe, width, dev, amp, history, train_seconds, val: Split, data, n_train) -> dict:
    from training.evaluate import evaluate_tta_modes, summary
    from training.plots import plot_confusion, plot_curves

    model, info = load_checkpoint(out / BEST_FILE, dev)
    results = evaluate_tta_modes(model, info, val, amp)
    best_epoch = max(history, key=lambda r: r["val_acc_tta"])["epoch"]
    metrics = {
        "recipe": recipe.name,
        "hyperparameters": asdict(recipe),
        "width": width,
        "epochs": recipe.epochs,
        "best_epoch": best_epoch,
        "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
        "host": platform.node(),
        "threads": torch.get_num_threads(),
        "precision": str(amp or "fp32"),
        "train_images": n_train,
        "train_seconds": round(train_seconds, 1),
        "images_per_s": round(sum(r["images_per_s"] for r in history) / max(1, len(history)), 1),
        "val": summary(results),
        "val_confusion": results["none"]["confusion"],
        "classes": list(info.classes),
        "init": info.extra.get("init"),
        "teacher": info.extra.get("teacher"),
        **{k: info.extra[k] for k in ("init_version", "init_epochs", "init_train_minutes") if k in info.extra},
        "data": str(data),
        "history": history,
    }
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2))
    plot_curves(history, out / "curves.png")
    plot_confusion(results["none"]["confusion"], list(info.classes), out / "confusion.png")
    print(
        f"best epoch {best_epoch}: val accuracy {results['none']['accuracy']:.4f}, "
        f"flip {results['flip']['accuracy']:.4f}, ten-crop {results['tencrop']['accuracy']:.4f}, "
        f"rotate {results['rotate']['accuracy']:.4f}; "
        f"{train_seconds / 60:.1f} min of training; wrote {out / BEST_FILE}",
        flush=True,
    )
    return metrics


def save_state(path: Path, model, ema, opt, gen, recipe, width, epoch, history, best_acc, train_seconds) -> None:
    """Everything ``--resume`` needs, as safetensors (tensors) plus JSON metadata; never pickle."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    scalars: dict = {}
    for pid, st in opt_state["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value) and value.dim() > 0:
                tensors[f"opt.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{name}"] = float(value)
    tensors["rng.generator"] = gen.get_state().cpu()
    tensors["rng.torch"] = torch.get_rng_state()  # dropout draws from the global generator
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    meta = {
        "recipe": asdict(recipe),
        "width": width,
        "epoch": epoch,
        "history": history,
        "best_acc": best_acc,
        "train_seconds": train_seconds,
        "opt_scalars": scalars,
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"state": json.dumps(meta)})
    tmp.replace(path)


def state_meta(path: Path) -> dict:
    """The JSON metadata of a training state (recipe, width, epoch, history, ...) without its tensors."""
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])


def load_state(path: Path, model, ema, opt, gen) -> dict:
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["state"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    dev = next(model.parameters()).device
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    state: dict = {}
    for key, value in tensors.items():
        if key.startswith("opt."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value.to(dev)
    for key, value in meta["opt_scalars"].items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = torch.tensor(value)
    opt_state = opt.state_dict()
    opt_state["state"] = state
    opt.load_state_dict(opt_state)
    gen.set_state(tensors["rng.generator"])
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return meta
