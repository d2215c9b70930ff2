"""``emotion-train export``: a trained checkpoint as the bundled fp16 model, or as an ONNX model.

The fp16 file is an ordinary checkpoint (see ``worker.model``) with its
floating-point tensors in fp16 and the metadata ``fit`` or ``average`` wrote
(recipe, data, accuracy, lineage), versioned on the day of the export.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import torch

from training.fit import BEST_FILE, version
from worker.classify import TTA_MODES, predict, val_acc_key
from worker.model import BUNDLED_WEIGHTS, CheckpointError, ModelInfo, load_checkpoint, save_checkpoint

MAX_BYTES = 25_000_000  # the bundled model ships inside the package and the image
# Largest difference in class probability allowed between the fp32 model and its fp16 copy.
FP16_TOLERANCE = 1e-2


def export(run: Path, to: Path | None = None) -> Path:
    """Export a fit run's checkpoint as an fp16 checkpoint; return the path written.

    ``run`` is the ``--out`` folder of ``emotion-train fit`` or ``average``, or a
    checkpoint file. ``to`` defaults to the bundled model,
    ``worker/weights/resnet9.safetensors``; a folder means that file name inside
    it. The version becomes ``YYYY.MM.DD-<recipe>-w<width>-e<epochs>[-avg<n>][-bn]``
    (:func:`training.fit.version`) of the export's day, and ``exported`` its time.
    Raises :class:`CheckpointError` (a ``ValueError``) naming the path when there
    is no checkpoint, the fp16 copy does not reproduce the model, or the result
    is 25 MB or more; the destination is then left as it was.
    """
    model, info = load_checkpoint(run_checkpoint(Path(run)))
    now = datetime.now(UTC)
    extra = {**info.extra, "exported": now.isoformat(timespec="seconds")}
    info = replace(info, version=version(extra, info.width, now), extra=extra)
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
    """The checkpoint ``run`` names: the ``best.safetensors`` of a run's folder, or ``run`` itself if a file.

    Raises :class:`CheckpointError` naming ``run`` when there is none.
    """
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


ONNX_OPSET = 20
# Largest fall in val/ accuracy allowed from the fp32 ONNX model to its int8 copy (0.3 points).
INT8_TOLERANCE = 0.003
CALIBRATION_FACES = 512  # train/ faces the int8 activation ranges are taken from
ONNX_TTA = ("none", "flip")  # the TTA modes whose val/ accuracy the ONNX model carries


def standard_elu(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with PyTorch's own ``nn.ELU`` in place of ``worker.model.ELU`` (same outputs).

    Exporters trace the custom autograd ELU as a chain of element-wise ops;
    ``nn.ELU`` becomes one ONNX ``Elu``.
    """
    from torch import nn

    from worker.model import ELU

    for block in model.modules():
        for name, child in block.named_children():
            if isinstance(child, ELU):
                setattr(block, name, nn.ELU(inplace=False))
    return model


def export_onnx(
    run: str | Path,
    data: str | Path,
    to: Path | None = None,
    int8: bool = False,
    calibration: int = CALIBRATION_FACES,
    seed: int = 0,
) -> tuple[Path, dict]:
    """Write a checkpoint as an ONNX model for ONNX Runtime; return the path and its val/ accuracy.

    ``run`` is a fit run's folder, a checkpoint file or a bundled model's name.
    With ``int8`` the model is quantized statically (QDQ, weights per output
    channel, S8S8), its activation ranges calibrated on ``calibration`` random
    faces of ``data``'s train/. Both the fp32 and the int8 models are scored on
    ``data``'s val/ with and without flip TTA, and the export is refused
    (:class:`CheckpointError`, nothing written) when int8 falls more than
    ``INT8_TOLERANCE`` below fp32. The file carries the checkpoint's metadata
    as ONNX ``metadata_props``, with ``val_acc`` / ``val_acc_flip`` its own
    (the checkpoint's figures kept as ``checkpoint_val_acc...``) and
    ``onnx_precision`` (``int8`` or ``fp32``). ``to`` defaults to
    ``<checkpoint>.int8.onnx`` (``<checkpoint>.onnx`` for fp32) beside the checkpoint.
    Returns ``(path, {"fp32": {tta: accuracy}, "int8": {tta: accuracy}})``.
    """
    from training.data import load_split
    from worker.model import OnnxModel, onnx_beside, resolve_weights

    run = Path(run)
    source = run_checkpoint(run) if run.exists() else resolve_weights(run)
    model, info = load_checkpoint(source)
    precision = "int8" if int8 else "fp32"
    to = Path(to) if to is not None else onnx_beside(source, precision)
    val = load_split(data, "val", info.classes)
    staged = to.with_name(to.name + ".export.tmp")
    work = [staged, to.with_name(f"{to.name}.fp32.tmp")]
    try:
        write_onnx(standard_elu(model).float(), info, work[1])
        set_onnx_metadata(work[1], info.to_metadata())
        scores = {"fp32": _score(OnnxModel(work[1]), info, val)}
        if int8:
            train = load_split(data, "train", info.classes)
            picked = train.images[
                torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:calibration]
            ]
            faces = ((picked.unsqueeze(1).float().div(255) - info.mean) / info.std).numpy()
            quantize_onnx(work[1], staged, faces)
            set_onnx_metadata(staged, info.to_metadata())
            scores["int8"] = _score(OnnxModel(staged), info, val)
            for tta in ONNX_TTA:
                drop = scores["fp32"][tta]["accuracy"] - scores["int8"][tta]["accuracy"]
                if drop > INT8_TOLERANCE:
                    raise CheckpointError(
                        f"{to}: int8 scores {drop * 100:.2f} points below fp32 on val/ (TTA {tta}), "
                        f"the limit is {INT8_TOLERANCE * 100:.1f}; try more calibration faces"
                    )
        else:
            os.replace(work[1], staged)
        set_onnx_metadata(staged, _onnx_metadata(info, scores, precision, calibration))
        os.replace(staged, to)
    finally:
        for path in work:
            path.unlink(missing_ok=True)
    return to, {p: {tta: r["accuracy"] for tta, r in s.items()} for p, s in scores.items()}


def set_onnx_metadata(path: Path, meta: dict[str, str]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    onnx.helper.set_model_props(model, meta)
    onnx.save(model, str(path))


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


def quantize_onnx(fp32: Path, out: Path, faces) -> None:
    """Quantize the fp32 ONNX model ``fp32`` into ``out``: static int8, QDQ, S8S8, weights per output channel.

    ``faces`` (float32 NumPy array (N, 1, 48, 48), normalised as the model takes
    them) calibrate the activation ranges (MinMax). S8S8 in QDQ form is what
    ONNX Runtime recommends for CPUs; it also avoids the saturation that U8S8
    can hit on x86 CPUs without VNNI, which are the ones this backend is for.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Faces(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"faces": faces[i : i + 64]} for i in range(0, len(faces), 64)])

        def get_next(self):
            return next(self.batches, None)

    pre = out.with_name(out.name + ".pre.tmp")
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


def _score(model, info: ModelInfo, val) -> dict:
    from training.evaluate import evaluate_model

    return {tta: evaluate_model(model, info, val, tta) for tta in ONNX_TTA}


def _onnx_metadata(info: ModelInfo, all_scores: dict, precision: str, calibration: int) -> dict[str, str]:
    """The metadata an ONNX model carries: its checkpoint's, with val/ figures of its own.

    ``all_scores`` holds :func:`evaluate_model` results by precision, then TTA mode.
    """
    scores = all_scores[precision]
    meta = info.to_metadata()
    for tta in TTA_MODES:
        key = val_acc_key(tta)
        if key in meta:
            meta[f"checkpoint_{key}"] = meta.pop(key)
    if "val_per_class" in meta:
        meta["checkpoint_val_per_class"] = meta.pop("val_per_class")
    meta.pop("val_acc_tta", None)
    for tta, result in scores.items():
        meta[val_acc_key(tta)] = f"{result['accuracy']:.4f}"
    meta["val_n"] = str(scores["none"]["n"])
    meta["val_per_class"] = json.dumps(scores["none"]["per_class"])
    meta["onnx_precision"] = precision
    if precision != "fp32":
        for tta, result in all_scores["fp32"].items():
            meta[f"fp32_{val_acc_key(tta)}"] = f"{result['accuracy']:.4f}"
    if precision == "int8":
        meta["quantization"] = (
            f"ONNX Runtime static, QDQ, S8S8, weights per channel, MinMax ranges of {calibration} train/ faces"
        )
    meta["onnx_exported"] = datetime.now(UTC).isoformat(timespec="seconds")
    return meta
