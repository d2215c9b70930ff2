"""Measure each model × backend × precision × TTA: faces/s at batch 1 and batch 64, and val/ accuracy.

    python benchmarks/backends.py [--data D] [--models M ...] [--configs C ...] [--tta T ...] [--json PATH]

For each row the model classifies all of val/ at batch 64 (accuracy, and
faces/s over that pass) and its first ``--batch1-faces`` faces one at a time
(faces/s at batch 1). Faces are decoded beforehand, so the figures are the
model's alone, as ``emotion-train evaluate --json`` reports them. A face with
flip TTA costs two forward passes; faces/s counts faces. The last column
compares with the full model in PyTorch at this CPU's own precision, no TTA, batch 64, from the same run.

Configurations: torch/bf16 (skipped on a CPU without bf16), torch/fp32,
onnxruntime/int8 (the bundled ``<model>.int8.onnx``), onnxruntime/fp32 (exported
into a temporary folder for this run). ``--json PATH`` also writes the figures
as JSON (``-`` for standard output).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe, machine, write_report  # noqa: E402
from training.data import load_split  # noqa: E402
from training.evaluate import evaluate_model  # noqa: E402
from training.export import set_onnx_metadata, standard_elu, write_onnx  # noqa: E402
from worker.classify import cpu_has_bf16, load_model, plan, precision_name, predict  # noqa: E402
from worker.config import ModelSettings  # noqa: E402
from worker.model import BUNDLED, OnnxModel, load_checkpoint, resolve_weights  # noqa: E402

CONFIGS = ("torch/bf16", "torch/fp32", "onnxruntime/int8", "onnxruntime/fp32")
DATA = REPO.parent / "shared" / "data" / "fer2013"


def load(model_name: str, config: str, tmp: Path):
    """(network, info, amp) for one configuration, or None when this machine cannot run it."""
    backend, precision = config.split("/")
    if config == "torch/bf16" and not cpu_has_bf16():
        return None
    if config == "onnxruntime/fp32":
        net, info = load_checkpoint(resolve_weights(model_name))
        path = tmp / f"{model_name}.onnx"
        if not path.exists():
            write_onnx(standard_elu(net).float(), info, path)
            set_onnx_metadata(path, {**info.to_metadata(), "onnx_precision": "fp32"})
        return OnnxModel(path), info, None
    settings = ModelSettings(
        weights=model_name, device="cpu", backend=backend, precision="auto" if backend != "torch" else precision
    )
    p = plan(settings)
    net, info = load_model(p)
    return net, info, p.amp


def batch1_rate(net, info, faces: torch.Tensor, tta: str, amp) -> float:
    predict(net, info, faces[:8], tta, batch_size=1, amp=amp)  # warm-up: kernels are chosen on the first calls
    start = time.perf_counter()
    predict(net, info, faces, tta, batch_size=1, amp=amp)
    return len(faces) / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA, help="FER2013 folder with val/ (default: %(default)s)")
    ap.add_argument("--models", nargs="+", default=["resnet9", "resnet9-small"], help="bundled names or paths")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--tta", nargs="+", default=["none", "flip"], choices=["none", "flip", "tencrop", "rotate"])
    ap.add_argument("--faces", type=int, help="score only the first N val/ faces (default: all)")
    ap.add_argument("--batch1-faces", type=int, default=256, help="faces timed one at a time (default: 256)")
    ap.add_argument("--json", help="also write the figures as JSON to this file ('-': standard output)")
    args = ap.parse_args()

    m = machine()
    print(describe(m), flush=True)
    val = load_split(args.data, "val")
    if args.faces:
        val = type(val)(val.images[: args.faces], val.labels[: args.faces], val.classes, val.source)
    print(f"{len(val)} faces of {val.source}; batch 1 on the first {min(args.batch1_faces, len(val))}", flush=True)
    header = f"{'model':14s} {'backend':12s} {'precision':9s} {'TTA':5s} {'batch 1':>9s} {'batch 64':>9s} "
    print(header + f"{'accuracy':>9s} {'vs ref':>7s}")
    rows, reference = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for model_name in args.models:
            for config in args.configs:
                loaded = load(model_name, config, Path(tmp))
                if loaded is None:
                    print(f"{model_name:14s} {config}: skipped, this CPU has no bf16", flush=True)
                    continue
                net, info, amp = loaded
                label = model_name if model_name in BUNDLED else Path(model_name).name
                backend = config.split("/")[0]
                for tta in args.tta:
                    result = evaluate_model(net, info, val, tta, amp=amp, batch_size=64)
                    row = {
                        "model": label,
                        "version": info.version,
                        "width": info.width,
                        "stages": list(info.channels),
                        "backend": backend,
                        "precision": precision_name(net, amp),
                        "tta": tta,
                        "faces_per_s_batch1": round(
                            batch1_rate(net, info, val.images[: args.batch1_faces], tta, amp), 1
                        ),
                        "faces_per_s_batch64": result["faces_per_s"],
                        "accuracy": result["accuracy"],
                        "n": result["n"],
                    }
                    if reference is None and model_name == "resnet9" and backend == "torch" and tta == "none":
                        reference = row
                    row["vs_reference"] = (
                        round(row["faces_per_s_batch64"] / reference["faces_per_s_batch64"], 2) if reference else None
                    )
                    rows.append(row)
                    ratio = f"{row['vs_reference']:6.2f}x" if reference else "      -"
                    print(
                        f"{label:14s} {backend:12s} {row['precision']:9s} {tta:5s} "
                        f"{row['faces_per_s_batch1']:9.1f} {row['faces_per_s_batch64']:9.1f} "
                        f"{row['accuracy']:9.4f} {ratio}",
                        flush=True,
                    )
                del net
    ref = None if reference is None else {k: reference[k] for k in ("model", "backend", "precision", "tta")}
    report = {"machine": m, "val": val.source, "faces": len(val), "reference": ref, "rows": rows}
    write_report(report, args.json)


if __name__ == "__main__":
    main()
