"""emotion-train: fit, evaluate and export the emotion model."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from training.fit import Hyper
from worker.classify import TTA_MODES

DATA_HELP = "folder with train/ and val/, or fer2013.csv"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emotion-train", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    device = {"choices": ["auto", "cpu", "cuda"], "default": "auto"}

    p = sub.add_parser("fit", help="train a ResNet9 on FER2013; the defaults are the recipe in training/fit.py")
    p.add_argument("--data", required=True, type=Path, help=DATA_HELP)
    p.add_argument("--out", required=True, type=Path, help="output folder: best.safetensors and metrics.json")
    p.add_argument("--device", **device)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, help="train on a stratified subset of this many images")
    p.add_argument("--init", help="start from this checkpoint's weights (a wider one is pruned to the network trained)")
    p.add_argument("--teacher", help="distil this model (a bundled model's name or a checkpoint) into the one trained")
    recipe = p.add_argument_group("the recipe (training/fit.py, Hyper)")
    for f in fields(Hyper):
        if kind := {"int": int, "float": float, "int | None": int}.get(f.type):
            default = "a quarter of --epochs" if f.default is None else f.default
            flag, metavar = "--" + f.name.replace("_", "-"), kind.__name__.upper()
            recipe.add_argument(flag, type=kind, metavar=metavar, help=f"{f.metadata['help']} ({default})")
    recipe.add_argument(
        "--stages", type=stages_arg, metavar="C1,C2,C3", help=Hyper.__dataclass_fields__["stages"].metadata["help"]
    )

    p = sub.add_parser("evaluate", help="score a model on a labelled folder or CSV")
    p.add_argument("--weights", default="resnet9", help="a bundled model's name, a checkpoint or an ONNX model")
    p.add_argument("--data", required=True, type=Path, help="class folders, a folder with val/, or fer2013.csv")
    p.add_argument("--split", default="val", choices=["train", "val", "test"])
    tta = {"nargs": "?", "const": "tencrop", "default": "none", "choices": TTA_MODES}
    p.add_argument("--tta", **tta, help="test-time augmentation (--tta alone: tencrop)")
    p.add_argument("--device", **device)
    backend_help = "as the worker's model.backend: auto is torch on CUDA and on a CPU with bf16, else int8 onnxruntime"
    p.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], default="auto", help=backend_help)
    precisions = ["auto", "fp32", "bf16", "fp16"]
    p.add_argument("--precision", choices=precisions, default="auto", help="as the worker's model.precision")
    p.add_argument("--batch-size", type=int, default=128, help="faces per forward pass (%(default)s)")
    p.add_argument("--json", action="store_true", help="print one JSON object")

    p = sub.add_parser("export", help="write a checkpoint as the bundled fp16 model, or as an ONNX model")
    p.add_argument("--run", required=True, help="a run's --out folder, a checkpoint, or (--onnx) a bundled name")
    to_help = "default: worker/weights/resnet9.safetensors; with --onnx, <checkpoint>[.int8].onnx beside it"
    p.add_argument("--to", type=Path, help=to_help)
    p.add_argument("--onnx", action="store_true", help="write an ONNX model for the onnxruntime backend")
    p.add_argument("--int8", action="store_true", help="with --onnx: quantize to int8, calibrated on train/ faces")
    p.add_argument("--data", type=Path, help="with --onnx: folder with train/ (int8 calibration) and val/ (scores)")
    p.add_argument("--calibration", type=int, default=512, help="with --int8: train/ faces to calibrate on")

    p = sub.add_parser("average", help="one model from the mean of several checkpoints' weights (a model soup)")
    p.add_argument("--weights", required=True, type=Path, nargs="+", help="checkpoints or fit run folders")
    p.add_argument("--data", required=True, type=Path, help=DATA_HELP + ": BatchNorm is recalibrated on train/")
    p.add_argument("--out", required=True, type=Path, help="folder for the averaged run")
    p.add_argument("--device", **device)

    args = parser.parse_args(argv)
    commands = {"fit": _fit, "evaluate": _evaluate, "export": _export, "average": _average}
    try:
        return commands[args.command](args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"emotion-train {args.command}: {exc}", file=sys.stderr)
        return 2


def stages_arg(text: str) -> tuple[int, int, int]:
    from worker.model import parse_stages

    try:
        return parse_stages(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fit(args) -> int:
    from training.fit import fit

    hp = Hyper(**{f.name: getattr(args, f.name) for f in fields(Hyper) if getattr(args, f.name, None) is not None})
    fit(args.data, args.out, hp, args.device, args.limit, args.seed, args.init, args.teacher)
    return 0


def _evaluate(args) -> int:
    import torch

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
    cuda = chosen.device.type == "cuda"
    result |= {
        "weights": str(chosen.weights),
        "device": torch.cuda.get_device_name(chosen.device) if cuda else str(chosen.device),
        "backend": chosen.backend,
        "precision": precision_name(model, chosen.amp),
        "tta": args.tta,
    }
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
    import importlib.util

    if missing := [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]:
        raise ValueError(
            f"--onnx needs {' and '.join(missing)}, in the train extra: pip install 'emotion-worker[train]'"
        )
    if args.calibration < 1:
        raise ValueError(f"--calibration must be 1 or more, got {args.calibration}")
    path, scores = export_onnx(args.run, args.data, args.to, int8=args.int8, calibration=args.calibration)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB); val accuracy (none / flip):")
    for precision, acc in scores.items():
        print(f"  {precision:5s} {acc['none']:.4f} / {acc['flip']:.4f}")
    return 0


def _average(args) -> int:
    from training.average import average

    average(args.weights, args.data, args.out, device=args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
