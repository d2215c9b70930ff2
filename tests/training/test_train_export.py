"""`emotion-train export`: an fp16 copy of the best checkpoint that says where it comes from."""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime

import cv2
import numpy as np
import pytest
import torch
from safetensors import safe_open

import training.export
from tests.training.conftest import fer_images
from training.cli import main
from training.export import export
from worker.classify import predict
from worker.model import CheckpointError, ModelInfo, ResNet9, load_checkpoint, save_checkpoint


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """64 real val faces of four classes (not among those the tiny runs trained or selected on)."""
    paths = [p for name in ("happy", "sad", "surprise", "angry") for p in fer_images("val", name, 16)]
    return torch.from_numpy(np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]))


def test_export_keeps_outputs_within_fp16_tolerance(tmp_path, faces):
    torch.manual_seed(0)
    model = ResNet9(width=0.125)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(30)  # outputs that differ from face to face, as a trained model's
    source = save_checkpoint(model, ModelInfo(width=0.125), tmp_path / "trained.safetensors")
    path = export(source, tmp_path / "model.safetensors")
    assert path == tmp_path / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
    assert dtypes == {"F16", "I64"}  # I64: BatchNorm's num_batches_tracked
    original_size = source.stat().st_size
    assert 0.45 * original_size < path.stat().st_size < 0.55 * original_size

    model, info = load_checkpoint(source)
    copy, copy_info = load_checkpoint(path)
    assert copy_info.classes == info.classes and copy_info.width == info.width
    assert (copy_info.mean, copy_info.std) == (info.mean, info.std)
    before, after = predict(model, info, faces), predict(copy, copy_info, faces)
    assert before.std(0).mean() > 1e-3, "the test model should not give every face the same probabilities"
    assert (before - after).abs().max() < 1e-2
    assert (before.argmax(1) == after.argmax(1)).float().mean() >= 0.95


def test_export_keeps_the_runs_metadata_and_versions_it_on_the_day(best_run, tmp_path):
    trained = load_checkpoint(best_run / "best.safetensors")[1]
    info = load_checkpoint(export(best_run, tmp_path / "model.safetensors"))[1]
    assert {k: v for k, v in info.extra.items() if k != "exported"} == trained.extra
    # What fit measured and recorded: scores in every TTA mode, the recipe, the data.
    metrics = json.loads((best_run / "metrics.json").read_text())
    assert info.extra["val_acc_flip"] == f"{metrics['val']['flip']['accuracy']:.4f}"
    assert json.loads(info.extra["hyperparameters"]) == metrics["hyperparameters"]
    exported = datetime.fromisoformat(info.extra["exported"])
    assert abs((datetime.now(UTC) - exported).total_seconds()) < 120
    assert info.version == f"{exported:%Y.%m.%d}-best-w0.125-e1-bn"


def test_export_of_a_checkpoint_without_training_metadata(tmp_path):
    torch.manual_seed(0)
    source = save_checkpoint(
        ResNet9(width=0.25), ModelInfo(width=0.25, extra={"recipe": "mine", "note": "kept"}), tmp_path / "m.safetensors"
    )
    (tmp_path / "out").mkdir()
    path = export(source, tmp_path / "out")  # a folder: the bundled model's file name inside it
    assert path == tmp_path / "out" / "resnet9.safetensors"
    info = load_checkpoint(path)[1]
    assert info.extra["note"] == "kept" and "val_acc" not in info.extra
    assert re.fullmatch(r"\d{4}\.\d{2}\.\d{2}-mine-w0\.25", info.version)  # no epochs recorded, none made up


def test_cli_export_writes_the_bundled_model_by_default(best_run, tmp_path, monkeypatch, capsys):
    bundled = tmp_path / "weights" / "resnet9.safetensors"
    monkeypatch.setattr(training.export, "BUNDLED_WEIGHTS", bundled)
    assert main(["export", "--run", str(best_run)]) == 0
    assert f"wrote {bundled} (0.4 MB)" in capsys.readouterr().out
    assert load_checkpoint(bundled)[1].extra["recipe"] == "best"
    assert sorted(p.name for p in bundled.parent.iterdir()) == ["resnet9.safetensors"]  # no leftovers


def test_export_refuses_a_folder_without_best_checkpoint(best_run, tmp_path, capsys):
    run = tmp_path / "unfinished"
    run.mkdir()
    shutil.copy(best_run / "metrics.json", run)
    with pytest.raises(CheckpointError, match=re.escape(f"{run}: no best.safetensors in this folder")):
        export(run, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()
    assert main(["export", "--run", str(run), "--to", str(tmp_path / "model.safetensors")]) == 2
    assert f"{run}: no best.safetensors" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="does not exist"):
        export(tmp_path / "nowhere", tmp_path / "model.safetensors")


def test_export_refuses_a_result_of_25_mb_or_more_and_keeps_the_old_file(best_run, tmp_path, monkeypatch):
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"the previous model")
    monkeypatch.setattr(training.export, "MAX_BYTES", 100_000)  # the tiny model is about 0.35 MB
    with pytest.raises(CheckpointError, match=r"would be 0\.\d MB, the limit is 0 MB"):
        export(best_run, dest)
    assert dest.read_bytes() == b"the previous model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


def test_full_width_export_is_under_25_mb(tmp_path):
    torch.manual_seed(0)
    source = save_checkpoint(ResNet9(width=1.0), ModelInfo(width=1.0), tmp_path / "full.safetensors")
    path = export(source, tmp_path / "model.safetensors")
    assert 10e6 < path.stat().st_size < 25e6


def test_export_refuses_weights_that_do_not_survive_fp16(tmp_path):
    torch.manual_seed(0)
    model = ResNet9(width=0.125)
    with torch.no_grad():
        model.classifier[-1].weight.mul_(1e6)  # beyond fp16's largest value, 65504
    source = save_checkpoint(model, ModelInfo(width=0.125), tmp_path / "huge.safetensors")
    with pytest.raises(CheckpointError, match="do not survive fp16"):
        export(source, tmp_path / "model.safetensors")
    assert not (tmp_path / "model.safetensors").exists()


# --- ONNX -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_export(best_run, small_fer, tmp_path_factory):
    """``export_onnx(best_run, --int8)`` on 64 calibration faces, with its returned val/ accuracy.

    The tolerance is lifted: a one-epoch model's accuracy on 84 faces moves by more
    than 0.3 points with any rounding. The bundled models are held to it (test_bundled_model).
    """
    to = tmp_path_factory.mktemp("onnx") / "best.int8.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training.export, "INT8_TOLERANCE", 1.0)
        path, scores = training.export.export_onnx(best_run, small_fer, to, int8=True, calibration=64)
    return path, scores


def test_int8_onnx_export_carries_the_metadata_and_its_own_accuracy(int8_export, best_run, small_fer):
    import onnx

    from training.data import load_split
    from training.evaluate import evaluate_model
    from worker.model import load_onnx

    path, scores = int8_export
    _, checkpoint = load_checkpoint(best_run / "best.safetensors")
    model, info = load_onnx(path)
    assert (info.name, info.version, info.classes, info.width) == (
        checkpoint.name,
        checkpoint.version,
        checkpoint.classes,
        checkpoint.width,
    )
    assert (info.mean, info.std, model.precision) == (checkpoint.mean, checkpoint.std, "int8")
    extra = info.extra
    assert (
        extra["val_acc"] == f"{scores['int8']['none']:.4f}" and extra["val_acc_flip"] == f"{scores['int8']['flip']:.4f}"
    )
    assert extra["fp32_val_acc"] == f"{scores['fp32']['none']:.4f}"
    assert extra["checkpoint_val_acc"] == checkpoint.extra["val_acc"] and "val_acc_tencrop" not in extra
    assert "64 train/ faces" in extra["quantization"] and "QDQ" in extra["quantization"]
    # The figures are those of this very file on val/.
    val = load_split(small_fer, "val")
    assert evaluate_model(model, info, val, "flip")["accuracy"] == scores["int8"]["flip"]
    # Static QDQ quantization, per output channel for the convolution weights.
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "Conv", "Elu"} <= ops
    sizes = {i.name: int(np.prod(i.dims)) for i in graph.initializer}
    axes = [n for n in graph.node if n.op_type == "DequantizeLinear" and sizes.get(n.input[1], 1) > 1]
    assert len(axes) >= 8  # the eight convolutions of a ResNet9 at least


def onnx_copy_of(source):
    """A stand-in for ``write_onnx`` that copies ``source``: the export path without a second trace."""

    def write(model, info, path):
        shutil.copy(source, path)

    return write


def test_int8_export_is_refused_below_the_tolerance_and_writes_nothing(tiny_onnx, small_fer, tmp_path, monkeypatch):
    monkeypatch.setattr(training.export, "write_onnx", onnx_copy_of(tiny_onnx["fp32"]))
    monkeypatch.setattr(training.export, "INT8_TOLERANCE", -1.0)  # every int8 model falls short
    with pytest.raises(CheckpointError, match="points below fp32 on val/ .TTA none.") as info:
        training.export.export_onnx(
            tiny_onnx["checkpoint"], small_fer, tmp_path / "m.int8.onnx", int8=True, calibration=32
        )
    assert str(tmp_path / "m.int8.onnx") in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_onnx_export_writes_beside_the_checkpoint(tiny_onnx, small_fer, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(training.export, "write_onnx", onnx_copy_of(tiny_onnx["fp32"]))
    checkpoint = tmp_path / "mine.safetensors"
    shutil.copy(tiny_onnx["checkpoint"], checkpoint)
    assert main(["export", "--run", str(checkpoint), "--onnx", "--data", str(small_fer)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'mine.onnx'}" in out and "fp32" in out and "int8" not in out
    from worker.model import load_onnx

    model, info = load_onnx(tmp_path / "mine.onnx")
    assert model.precision == "fp32" and info.extra["val_n"] == str(7 * 12)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.onnx", "mine.safetensors"]


@pytest.mark.parametrize(
    "args, error",
    [
        (["--int8"], "--int8 applies to the ONNX export; add --onnx"),
        (["--onnx"], "--onnx needs --data"),
        (["--onnx", "--int8", "--data", "D", "--calibration", "0"], "--calibration must be 1 or more"),
    ],
)
def test_cli_onnx_export_options_are_checked(best_run, args, error, capsys):
    assert main(["export", "--run", str(best_run), *args]) == 2
    assert error in capsys.readouterr().err
