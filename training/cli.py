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
        "--keep-epochs",
        action="store_true",
        help="also write each epoch's checkpoint to OUT/epochs/, for `emotion-train average`",
    )

    p = sub.add_parser("evaluate", help="score a checkpoint on a labelled folder or CSV")
    p.add_argument("--weights", type=Path, help="checkpoint (default: the bundled model)")
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
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("export", help="write a checkpoint as the bundled fp16 model")
    p.add_argument("--run", required=True, type=Path, help="output folder of a fit run (or a checkpoint file)")
    p.add_argument("--to", type=Path, help="destination (default: worker/weights/resnet9.safetensors)")

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
    )
    return 0


def _evaluate(args) -> int:
    from training.data import load_split
    from training.evaluate import evaluate_model
    from training.fit import pick_device
    from worker.classify import autocast_dtype
    from worker.model import BUNDLED_WEIGHTS, load_checkpoint

    dev = pick_device(args.device)
    model, info = load_checkpoint(args.weights or BUNDLED_WEIGHTS, dev)
    split = load_split(args.data, args.split, info.classes)
    result = evaluate_model(model, info, split, args.tta, amp=autocast_dtype(dev))
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.weights or BUNDLED_WEIGHTS} on {split.source} ({result['n']} images, TTA {args.tta})")
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
    from training.export import export

    path = export(args.run, args.to)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
