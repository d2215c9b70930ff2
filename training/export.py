"""``emotion-train export``: a trained checkpoint as the bundled fp16 model, or as an ONNX model."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from training.fit import BEST_FILE, version
from worker.classify import predict, val_acc_key
from worker.model import BUNDLED_WEIGHTS, CheckpointError, ModelInfo, load_checkpoint, save_checkpoint

MAX_BYTES = 25_000_000  # the bundled model ships inside the package and the image
FP16_TOLERANCE = 1e-2  # largest change of a class probability allowed from the fp32 model to its fp16 copy
ONNX_OPSET = 20
INT8_TOLERANCE = 0.003  # largest fall in val/ accuracy allowed from the fp32 ONNX model to its int8 copy
ONNX_TTA = ("none", "flip")  # the TTA modes whose val/ accuracy an ONNX model carries


def export(run: Path, to: Path | None = None) -> Path:
    """Write the checkpoint of ``run`` (a fit run's folder or a checkpoint) in fp16 to ``to`` (default: the bundled
    model; a folder: that file name in it), versioned on the day. Returns the path written.

    Raises :class:`CheckpointError` (a ``ValueError``), leaving ``to`` as it was, when there is no checkpoint,
    the fp16 copy changes the outputs, or the file would be 25 MB or more.
    """
    model, info = load_checkpoint(run_checkpoint(Path(run)))
    now = datetime.now(UTC)
    extra = {**info.extra, "exported": now.isoformat(timespec="seconds")}
    info = replace(info, version=version(extra, info, now), extra=extra)
    to = Path(to) if to is not None else BUNDLED_WEIGHTS
    if to.is_dir():
        to = to / BUNDLED_WEIGHTS.name
    staged = to.with_name(to.name + ".export.tmp")  # moved into place once checked
    try:
        save_checkpoint(model, info, staged, dtype=torch.float16)
        if (size := staged.stat().st_size) >= MAX_BYTES:
            raise CheckpointError(
                f"{to}: the exported model would be {size / 1e6:.1f} MB, the limit is {MAX_BYTES / 1e6:.0f} MB; "
                f"export a narrower model ({info.shape} now)"
            )
        copy, _ = load_checkpoint(staged)
        faces = torch.randint(0, 256, (8, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        diff = (predict(model, info, faces) - predict(copy, info, faces)).abs().max().item()
        if not diff < FP16_TOLERANCE:  # also catches NaN
            raise CheckpointError(
                f"{to}: the fp16 copy changes class probabilities by up to {diff:.3g} "
                f"(tolerance {FP16_TOLERANCE}); the weights do not survive fp16"
            )
        os.replace(staged, to)
    finally:
        staged.unlink(missing_ok=True)
    return to


def run_checkpoint(run: Path) -> Path:
    """The ``best.safetensors`` of a run's folder, or ``run`` itself if a file; :class:`CheckpointError` if none."""
    if run.is_dir():
        if not (run / BEST_FILE).is_file():
            raise CheckpointError(
                f"{run}: no {BEST_FILE} in this folder; pass the --out folder of a finished "
                "'emotion-train fit' run or a checkpoint file"
            )
        return run / BEST_FILE
    if run.is_file():
        return run
    raise CheckpointError(f"{run} does not exist")


def export_onnx(run, data, to: Path | None = None, int8=False, calibration=512, seed=0) -> tuple[Path, dict]:
    """Write a checkpoint (``run``: a fit run's folder, a checkpoint or a bundled name) as an ONNX model.

    With ``int8`` it is quantized (:func:`quantize_onnx`) on ``calibration`` random faces of ``data``'s train/,
    and refused (:class:`CheckpointError`, nothing written) when it scores more than ``INT8_TOLERANCE`` below fp32
    on val/. The file carries the checkpoint's metadata with val/ figures of its own (the checkpoint's become
    ``checkpoint_val_...``). ``to`` defaults to ``<checkpoint>[.int8].onnx`` beside the checkpoint.
    Returns ``(path, {"fp32": {tta: val accuracy}, "int8": {...}})``.
    """
    from training.data import load_split
    from training.evaluate import evaluate_model
    from worker.model import OnnxModel, onnx_beside, resolve_weights

    run = Path(run)
    source = run_checkpoint(run) if run.exists() else resolve_weights(run)
    model, info = load_checkpoint(source)
    precision = "int8" if int8 else "fp32"
    to = Path(to) if to is not None else onnx_beside(source, precision)
    val = load_split(data, "val", info.classes)
    staged, fp32 = to.with_name(to.name + ".export.tmp"), to.with_name(to.name + ".fp32.tmp")
    scores = {}
    try:
        write_onnx(standard_elu(model).float(), info, fp32)
        set_onnx_metadata(fp32, info.to_metadata())  # OnnxModel reads the classes and normalisation from it
        scores["fp32"] = {tta: evaluate_model(OnnxModel(fp32), info, val, tta) for tta in ONNX_TTA}
        if int8:
            train = load_split(data, "train", info.classes)
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
            faces = ((train.images[order[:calibration]].unsqueeze(1).float().div(255) - info.mean) / info.std).numpy()
            quantize_onnx(fp32, staged, faces)
            set_onnx_metadata(staged, info.to_metadata())
            scores["int8"] = {tta: evaluate_model(OnnxModel(staged), info, val, tta) for tta in ONNX_TTA}
            for tta in ONNX_TTA:
                drop = scores["fp32"][tta]["accuracy"] - scores["int8"][tta]["accuracy"]
                if drop > INT8_TOLERANCE:
                    raise CheckpointError(
                        f"{to}: int8 scores {drop * 100:.2f} points below fp32 on val/ (TTA {tta}), "
                        f"the limit is {INT8_TOLERANCE * 100:.1f}; try more calibration faces"
                    )
        else:
            os.replace(fp32, staged)
        set_onnx_metadata(staged, onnx_metadata(info, scores, precision, calibration))
        os.replace(staged, to)
    finally:
        staged.unlink(missing_ok=True)
        fp32.unlink(missing_ok=True)
    return to, {p: {tta: r["accuracy"] for tta, r in s.items()} for p, s in scores.items()}


def onnx_metadata(info: ModelInfo, scores: dict, precision: str, calibration: int) -> dict[str, str]:
    """The checkpoint's metadata with the ONNX model's own val/ figures (``scores``: results by precision, then
    TTA mode); the checkpoint's figures are kept as ``checkpoint_val_...``, fp32's beside int8's as ``fp32_...``."""
    meta = {("checkpoint_" if k.startswith("val_") else "") + k: v for k, v in info.to_metadata().items()}
    own = scores[precision]
    meta |= {val_acc_key(tta): f"{r['accuracy']:.4f}" for tta, r in own.items()}
    meta |= {"val_n": str(own["none"]["n"]), "val_per_class": json.dumps(own["none"]["per_class"])}
    meta["onnx_precision"] = precision
    if precision == "int8":
        meta |= {f"fp32_{val_acc_key(tta)}": f"{r['accuracy']:.4f}" for tta, r in scores["fp32"].items()}
        meta["quantization"] = (
            f"ONNX Runtime static, QDQ, S8S8, weights per channel, MinMax ranges of {calibration} train/ faces"
        )
    meta["onnx_exported"] = datetime.now(UTC).isoformat(timespec="seconds")
    return meta


def standard_elu(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with ``nn.ELU`` in place of ``worker.model.ELU`` (same outputs): the exporter traces the custom
    autograd ELU as a chain of element-wise ops, and ``nn.ELU`` as one ONNX ``Elu``."""
    from worker.model import ELU

    for block in model.modules():
        for name, child in block.named_children():
            if isinstance(child, ELU):
                setattr(block, name, torch.nn.ELU(inplace=False))
    return model


def write_onnx(model: torch.nn.Module, info: ModelInfo, path: Path) -> None:
    import io
    import logging
    from contextlib import redirect_stdout

    # Without torchvision, which the project does not need, the exporter warns that it skips torchvision's ops.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    x = torch.zeros(2, 1, info.input_size, info.input_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with redirect_stdout(io.StringIO()):  # the exporter reports each of its passes on stdout
        torch.onnx.export(
            model.eval().to(memory_format=torch.contiguous_format),
            (x,),
            str(path),
            input_names=["faces"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            opset_version=ONNX_OPSET,
            external_data=False,
            dynamo=True,
        )


def set_onnx_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))


def quantize_onnx(fp32: Path, out: Path, faces) -> None:
    """Quantize the ONNX model ``fp32`` into ``out``: static int8, QDQ, S8S8, weights per output channel, activation
    ranges (MinMax) from ``faces`` (float32 NumPy (N, 1, 48, 48), normalised). S8S8 in QDQ form is what ONNX Runtime
    recommends for CPUs, and it avoids the saturation U8S8 can hit on x86 CPUs without VNNI."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Faces(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"faces": faces[i : i + 64]} for i in range(0, len(faces), 64)])

        def get_next(self):
            return next(self.batches, None)

    pre = Path(out).with_name(Path(out).name + ".pre.tmp")
    try:
        quant_pre_process(str(fp32), str(pre))  # shape inference and graph clean-up, as ONNX Runtime recommends
        quantize_static(
            str(pre),
            str(out),
            Faces(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
        )
    finally:
        pre.unlink(missing_ok=True)
