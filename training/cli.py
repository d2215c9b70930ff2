"""emotion-train: fit, evaluate and export the emotion model."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emotion-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fit", help="train a ResNet9 on FER2013")
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="folder with train/ and val/, fer2013.csv, or a .npz from `emotion-train pack`",
    )
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoints, metrics, plots)")
    p.add_argument("--recipe", choices=["seed", "best"], default="best")
    p.add_argument("--epochs", type=int, help="number of epochs (default: the recipe's)")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier, 1.0 is the full ResNet9")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--resume", action="store_true", help="continue from the training state in --out")
    p.add_argument("--limit", type=int, help="train on a stratified subset of this many images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, help="peak learning rate (default: the recipe's)")
    p.add_argument("--dropout", type=float, help="dropout rate while training (default: the recipe's, 0.5)")
    p.add_argument(
        "--init",
        type=Path,
        help="start from this checkpoint's weights (a warm restart); a narrower one is widened to --width",
    )
    p.add_argument(
        "--augment",
        choices=["recipe", "light"],
        default="recipe",
        help="training augmentation: the recipe's, or light (flips and shifts of up to 2 pixels only, "
        "the views test-time augmentation shows), for a short final polish with --init",
    )
    p.add_argument(
        "--teacher",
        help="distil this model into the one trained: a bundled model's name (resnet9) or a checkpoint; "
        "its soft targets on the clean train/ faces are computed once and cached beside --out",
    )
    p.add_argument("--kd-weight", type=float, help="weight of the teacher's soft targets in the loss (default: 0.7)")
    p.add_argument("--kd-temperature", type=float, help="softening temperature of the soft targets (default: 4)")
    p.add_argument(
        "--keep-epochs",
        action="store_true",
        help="also write each epoch's checkpoint to OUT/epochs/, for `emotion-train average`",
    )

    p = sub.add_parser("evaluate", help="score a checkpoint on a labelled folder or CSV")
    p.add_argument(
        "--weights",
        default="resnet9",
        help="a bundled model's name (resnet9, resnet9-small), a checkpoint or an ONNX model (default: resnet9)",
    )
    p.add_argument("--data", required=True, type=Path, help="class folders, a folder with val/, or fer2013.csv")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    p.add_argument(
        "--tta",
        nargs="?",
        const="tencrop",
        default="none",
        choices=["none", "flip", "tencrop", "rotate"],
        help="test-time augmentation (--tta alone means tencrop)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument(
        "--backend",
        choices=["auto", "torch", "onnxruntime"],
        default="auto",
        help="as the worker's model.backend: auto is torch on CUDA and on a CPU with bf16, else int8 onnxruntime",
    )
    p.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16", "fp16"],
        default="auto",
        help="precision of the torch backend, as the worker's model.precision",
    )
    p.add_argument("--batch-size", type=int, default=128, help="faces per forward pass (default: 128)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("export", help="write a checkpoint as the bundled fp16 model, or as an ONNX model")
    p.add_argument(
        "--run",
        required=True,
        help="output folder of a fit run, a checkpoint file, or (with --onnx) a bundled model's name",
    )
    p.add_argument(
        "--to",
        type=Path,
        help="destination (default: worker/weights/resnet9.safetensors; with --onnx, "
        "<checkpoint>.onnx or <checkpoint>.int8.onnx beside the checkpoint)",
    )
    p.add_argument("--onnx", action="store_true", help="write an ONNX model for the onnxruntime backend")
    p.add_argument(
        "--int8",
        action="store_true",
        help="with --onnx: quantize to int8 (static, QDQ, per channel), calibrated on train/ faces of --data",
    )
    p.add_argument(
        "--data",
        type=Path,
        help="with --onnx: folder with train/ (int8 calibration) and val/ (the accuracy the file records)",
    )
    p.add_argument("--calibration", type=int, default=512, help="with --int8: train/ faces to calibrate on")

    p = sub.add_parser("recalibrate", help="recompute a run's BatchNorm statistics on clean train/ images")
    p.add_argument("--run", required=True, type=Path, help="output folder of a fit run (or a checkpoint file)")
    p.add_argument("--data", required=True, type=Path, help="folder with train/ and val/, or fer2013.csv")
    p.add_argument("--out", required=True, type=Path, help="folder for the recalibrated run (not --run)")
    p.add_argument("--images", type=int, help="use this many train/ images, chosen at random (default: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("average", help="average the weights of several checkpoints of one model (SWA, model soup)")
    p.add_argument(
        "--weights",
        required=True,
        type=Path,
        nargs="+",
        help="two or more checkpoints, or fit run folders, that share a starting point",
    )
    p.add_argument(
        "--data",
        required=True,
        type=Path,
        help="folder with train/ and val/, or fer2013.csv: BatchNorm is recalibrated on train/, "
        "the average scored on val/",
    )
    p.add_argument("--out", required=True, type=Path, help="folder for the averaged run")
    p.add_argument("--images", type=int, help="recalibrate on this many train/ images, chosen at random (default: all)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("pack", help="write train/ and val/ into one .npz, to carry to a GPU machine")
    p.add_argument("--data", required=True, type=Path, help="folder with train/ and val/, or fer2013.csv")
    p.add_argument("--out", required=True, type=Path, help="the .npz to write")

    args = parser.parse_args(argv)
    try:
        if args.command == "fit":
            return _fit(args)
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "pack":
            return _pack(args)
        if args.command == "recalibrate":
            return _recalibrate(args)
        if args.command == "average":
            return _average(args)
        return _export(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"emotion-train {args.command}: {exc}", file=sys.stderr)
        return 2


TRAIN_EXTRA = "pip install 'emotion-worker[train]'"


def _fit(args) -> int:
    import importlib.util

    missing = [m for m in ("tqdm", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise ValueError(f"needs {' and '.join(missing)}, which the base install leaves out: {TRAIN_EXTRA}")
    from training.fit import LIGHT_AUGMENT, RECIPES, fit

    recipe = RECIPES[args.recipe]
    if args.epochs:
        recipe = replace(recipe, epochs=args.epochs)
    if args.lr:
        recipe = replace(recipe, lr=args.lr)
    if args.dropout is not None:
        if not 0 <= args.dropout < 1:
            raise ValueError(f"--dropout must be in [0, 1), got {args.dropout}")
        recipe = replace(recipe, dropout=args.dropout)
    if args.augment == "light":
        recipe = replace(recipe, augment=LIGHT_AUGMENT)
    if args.kd_weight is not None:
        if not 0 <= args.kd_weight <= 1:
            raise ValueError(f"--kd-weight must be in [0, 1], got {args.kd_weight}")
        recipe = replace(recipe, kd_weight=args.kd_weight)
    if args.kd_temperature is not None:
        if not args.kd_temperature > 0:
            raise ValueError(f"--kd-temperature must be above 0, got {args.kd_temperature}")
        recipe = replace(recipe, kd_temperature=args.kd_temperature)
    fit(
        args.data,
        args.out,
        recipe,
        width=args.width,
        device=args.device,
        resume=args.resume,
        limit=args.limit,
        seed=args.seed,
        init=args.init,
        keep_epochs=args.keep_epochs,
        teacher=args.teacher,
    )
    return 0


def _evaluate(args) -> int:
    from training.data import load_split
    from training.evaluate import evaluate_model
    from worker.classify import load_model, plan, precision_name
    from worker.config import ModelSettings

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be 1 or more, got {args.batch_size}")
    chosen = plan(
        ModelSettings(
            weights=args.weights, device=args.device, backend=args.backend, precision=args.precision, tta="none"
        )
    )
    model, info = load_model(chosen)
    split = load_split(args.data, args.split, info.classes)
    result = evaluate_model(model, info, split, args.tta, amp=chosen.amp, batch_size=args.batch_size)
    result.update(
        weights=str(chosen.weights),
        device=str(chosen.device) if chosen.device.type != "cuda" else torch_device_name(chosen.device),
        backend=chosen.backend,
        precision=precision_name(model, chosen.amp),
        tta=args.tta,
    )
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"{chosen.weights} on {split.source} ({result['n']} images, TTA {args.tta}); {result['backend']} "
        f"{result['precision']} on {result['device']}, batch {args.batch_size}: {result['faces_per_s']:.1f} faces/s"
    )
    print(f"accuracy {result['accuracy']:.4f}")
    for name, acc in result["per_class"].items():
        print(f"  {name:9s} {acc:.4f}  ({result['counts'][name]} images)")
    width = max(len(c) for c in info.classes)
    print("confusion (rows true, columns predicted):")
    print(" " * (width + 1) + " ".join(f"{c[:5]:>5s}" for c in info.classes))
    for name, row in zip(info.classes, result["confusion"]):
        print(f"{name:>{width}s} " + " ".join(f"{v:5d}" for v in row))
    return 0


def _pack(args) -> int:
    from training.data import pack

    path = pack(args.data, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


def _recalibrate(args) -> int:
    from training.recalibrate import recalibrate

    result = recalibrate(args.run, args.data, args.out, images=args.images, device=args.device, seed=args.seed)
    before, after = result["before"], result["after"]
    print(f"BatchNorm statistics recomputed on {result['train_images']} train/ images; val accuracy before -> after:")
    for tta in after:
        print(f"  {tta:8s} {before[tta]['accuracy']:.4f} -> {after[tta]['accuracy']:.4f}")
    print(f"wrote {args.out}")
    return 0


def _average(args) -> int:
    from training.average import average

    metrics = average(args.weights, args.data, args.out, images=args.images, device=args.device, seed=args.seed)
    print(
        f"mean of {len(metrics['averaged'])} checkpoints, BatchNorm recalibrated on "
        f"{metrics['recalibration']['train_images']} train/ images; val accuracy:"
    )
    for tta, result in metrics["val"].items():
        print(f"  {tta:8s} {result['accuracy']:.4f}")
    print(f"wrote {args.out}")
    return 0


def _export(args) -> int:
    from training.export import export, export_onnx

    if args.int8 and not args.onnx:
        raise ValueError("--int8 applies to the ONNX export; add --onnx")
    if not args.onnx:
        path = export(Path(args.run), args.to)
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        return 0
    if args.data is None:
        raise ValueError("--onnx needs --data, a folder with val/ (and train/ for --int8)")
    if args.calibration < 1:
        raise ValueError(f"--calibration must be 1 or more, got {args.calibration}")
    path, scores = export_onnx(args.run, args.data, args.to, int8=args.int8, calibration=args.calibration)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); val accuracy (none / flip):")
    for precision, acc in scores.items():
        print(f"  {precision:5s} {acc['none']:.4f} / {acc['flip']:.4f}")
    return 0


def torch_device_name(device) -> str:
    import torch

    return torch.cuda.get_device_name(device)


if __name__ == "__main__":
    sys.exit(main())
