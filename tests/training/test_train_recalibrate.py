"""`emotion-train recalibrate`: BatchNorm statistics recomputed on clean train/ images, weights untouched."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pytest
import torch

from tests.training.conftest import fer_images
from training.cli import main
from training.export import export
from training.recalibrate import recalibrate_batchnorm
from worker.classify import TTA_MODES
from worker.model import ResNet9, load_checkpoint

MEAN, STD = 0.5, 0.25


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """64 real train faces (N, 48, 48) of four classes."""
    paths = [p for name in ("happy", "sad", "surprise", "neutral") for p in fer_images("train", name, 16)]
    return torch.from_numpy(np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]))


def small_model() -> ResNet9:
    torch.manual_seed(0)
    model = ResNet9(width=0.125)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics that fit no data, as after augmented training
            m.running_mean.fill_(3.0)
            m.running_var.fill_(9.0)
    return model.eval()


def test_statistics_become_those_of_the_images(faces):
    model = small_model()
    recalibrate_batchnorm(model, faces, MEAN, STD, mirror=False, batch_size=16)

    conv, norm = model.conv1[0], model.conv1[1]
    x = (faces.unsqueeze(1).float() / 255 - MEAN) / STD
    with torch.no_grad():
        batches = [conv(x[i : i + 16]) for i in range(0, len(x), 16)]
    # Cumulative mode: the plain average over the four batches of each batch's mean and unbiased variance.
    expected_mean = torch.stack([b.mean(dim=(0, 2, 3)) for b in batches]).mean(0)
    expected_var = torch.stack([b.transpose(0, 1).flatten(1).var(1) for b in batches]).mean(0)
    assert torch.allclose(norm.running_mean, expected_mean, atol=1e-4)
    assert torch.allclose(norm.running_var, expected_var, rtol=1e-3, atol=1e-5)
    assert norm.num_batches_tracked.item() == 4


def test_dropout_is_off_weights_are_kept_and_the_model_is_left_ready(faces):
    model = small_model()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    torch.manual_seed(1)
    recalibrate_batchnorm(model, faces, MEAN, STD, generator=torch.Generator().manual_seed(0))
    first = {k: v.clone() for k, v in model.named_buffers() if "running" in k}
    torch.manual_seed(2)  # dropout draws from the global generator: with it on, the deep statistics would change
    recalibrate_batchnorm(model, faces, MEAN, STD, generator=torch.Generator().manual_seed(0))
    second = {k: v for k, v in model.named_buffers() if "running" in k}

    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not torch.allclose(second["res3.1.1.running_mean"], torch.full_like(second["res3.1.1.running_mean"], 3.0))
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    assert not model.training and not any(m.training for m in model.modules())
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}


def test_mirroring_changes_the_statistics(faces):
    plain, mirrored = small_model(), small_model()
    recalibrate_batchnorm(plain, faces, MEAN, STD, mirror=False)
    recalibrate_batchnorm(mirrored, faces, MEAN, STD, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(plain.conv1[1].running_mean, mirrored.conv1[1].running_mean)


def test_no_images_is_an_error():
    with pytest.raises(ValueError, match="no images"):
        recalibrate_batchnorm(small_model(), torch.empty(0, 48, 48, dtype=torch.uint8), MEAN, STD)


def test_recalibrated_run_is_scored_and_exportable(best_run, small_fer, tmp_path, capsys):
    out = tmp_path / "bn"
    assert (
        main(["recalibrate", "--run", str(best_run), "--data", str(small_fer), "--out", str(out), "--device", "cpu"])
        == 0
    )
    printed = capsys.readouterr().out
    assert "350 train/ images" in printed and "flip" in printed

    trained, trained_info = load_checkpoint(best_run / "best.safetensors")
    model, info = load_checkpoint(out / "best.safetensors")
    params = dict(model.named_parameters())
    assert all(torch.equal(v, params[k]) for k, v in trained.named_parameters())
    assert not torch.allclose(model.conv1[1].running_mean, trained.conv1[1].running_mean)
    assert "350 clean" in info.extra["recalibrated"]
    assert info.classes == trained_info.classes and info.extra["recipe"] == "best"

    run_metrics = json.loads((best_run / "metrics.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["val_before_recalibration"] == run_metrics["val"]
    assert metrics["recalibration"]["train_images"] == 350
    assert (out / "confusion.png").stat().st_size > 0

    # The scores it records are what `evaluate` measures on the recalibrated checkpoint.
    assert (
        main(
            [
                "evaluate",
                "--weights",
                str(out / "best.safetensors"),
                "--data",
                str(small_fer),
                "--tta",
                "flip",
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    measured = json.loads(capsys.readouterr().out)
    assert measured["n"] == metrics["val"]["flip"]["n"] == 84
    assert measured["accuracy"] == metrics["val"]["flip"]["accuracy"]

    exported = load_checkpoint(export(out, tmp_path / "model.safetensors"))[1]
    assert exported.version.endswith("-best-w0.125-e1-bn")
    assert exported.extra["val_acc_flip"] == f"{metrics['val']['flip']['accuracy']:.4f}"


def test_a_run_scored_before_a_tta_mode_existed_gets_that_mode_scored(best_run, small_fer, tmp_path, capsys):
    old = tmp_path / "old-run"
    shutil.copytree(best_run, old)
    metrics = json.loads((old / "metrics.json").read_text())
    del metrics["val"]["rotate"]
    (old / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "bn"
    assert main(["recalibrate", "--run", str(old), "--data", str(small_fer), "--out", str(out), "--device", "cpu"]) == 0
    assert "rotate" in capsys.readouterr().out
    before = json.loads((out / "metrics.json").read_text())["val_before_recalibration"]
    assert set(before) == set(TTA_MODES)
    assert before["flip"] == metrics["val"]["flip"]  # recorded scores are kept, not recomputed
    # The missing one is the original checkpoint's own score.
    assert (
        main(
            [
                "evaluate",
                "--weights",
                str(old / "best.safetensors"),
                "--data",
                str(small_fer),
                "--tta",
                "rotate",
                "--json",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert before["rotate"]["accuracy"] == json.loads(capsys.readouterr().out)["accuracy"]


def test_images_limits_the_train_images(best_run, small_fer, tmp_path, capsys):
    bare = tmp_path / "model.safetensors"  # a checkpoint file with no run's metrics.json beside it
    shutil.copy(best_run / "best.safetensors", bare)
    out = tmp_path / "bn"
    assert (
        main(
            [
                "recalibrate",
                "--run",
                str(bare),
                "--data",
                str(small_fer),
                "--out",
                str(out),
                "--images",
                "100",
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    assert "100 train/ images" in capsys.readouterr().out
    assert "100 clean" in load_checkpoint(out / "best.safetensors")[1].extra["recalibrated"]
    assert (out / "best.safetensors").is_file() and not (out / "metrics.json").exists()
    for bad in ("0", "-5"):  # -5 must not quietly mean all but the last five
        assert (
            main(
                [
                    "recalibrate",
                    "--run",
                    str(bare),
                    "--data",
                    str(small_fer),
                    "--out",
                    str(tmp_path / "x"),
                    "--images",
                    bad,
                ]
            )
            == 2
        )
        assert f"--images must be at least 1, got {bad}" in capsys.readouterr().err


def test_missing_checkpoint_and_overwriting_the_run_are_refused(best_run, small_fer, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["recalibrate", "--run", str(empty), "--data", str(small_fer), "--out", str(tmp_path / "o")]) == 2
    assert f"{empty}: no best.safetensors in this folder" in capsys.readouterr().err
    before = (best_run / "best.safetensors").read_bytes()
    assert main(["recalibrate", "--run", str(best_run), "--data", str(small_fer), "--out", str(best_run)]) == 2
    assert "another folder than the run" in capsys.readouterr().err
    assert (best_run / "best.safetensors").read_bytes() == before
