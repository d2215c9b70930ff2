"""The models bundled with the worker: the full one, the small one and their int8 ONNX copies, each checked once."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import cv2
import pytest
import torch
from safetensors import safe_open

from tests.conftest import FER, REPO
from training.cli import main as train_cli
from training.data import load_split
from worker.classify import predict
from worker.model import BUNDLED, BUNDLED_WEIGHTS, CLASSES, load_checkpoint, load_onnx, onnx_beside


def test_bundled_model_is_a_trained_fp16_checkpoint_under_25_mb():
    assert BUNDLED_WEIGHTS.is_file(), f"{BUNDLED_WEIGHTS} is missing: export one with 'emotion-train export'"
    assert BUNDLED_WEIGHTS.stat().st_size < 25_000_000
    with safe_open(str(BUNDLED_WEIGHTS), "pt") as f:
        dtypes = {f.get_tensor(key).dtype for key in f.keys() if f.get_tensor(key).is_floating_point()}
    assert dtypes == {torch.float16}
    _, info = load_checkpoint(BUNDLED_WEIGHTS)
    assert info.classes == CLASSES
    assert info.extra["recipe"] == "best"
    # The accuracy recorded at export is that of the full val/ split, with and without test-time augmentation.
    assert int(info.extra["val_n"]) == 3589
    assert float(info.extra["val_acc"]) > 0.6 and float(info.extra["val_acc_flip"]) > 0.6
    assert set(json.loads(info.extra["val_per_class"])) == set(CLASSES)


def test_evaluate_without_weights_scores_the_bundled_model(capsys):
    assert train_cli(["evaluate", "--data", str(FER / "val"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["n"] == 7 * 16
    assert result["accuracy"] > 0.45  # chance is 1/7; the bundled model scores about 0.69-0.70 on val/


def test_classify_serves_the_bundled_model_when_no_weights_are_set(tmp_path):
    # A surprised face: the class FER2013 models get right most often.
    crops = sorted((FER / "val" / "surprise").glob("*.jpg"))[:8]
    paths = []
    for i, crop in enumerate(crops):
        path = tmp_path / f"{i}.png"
        cv2.imwrite(str(path), cv2.imread(str(crop)))
        paths.append(str(path))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTION_")}  # config/worker.toml: no weights set
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "classify", "--json", "--detector", "none", *paths],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["image"] for line in lines] == paths
    assert sum(line["emotion"] == "surprise" for line in lines) >= 5


def test_bundled_small_model_is_distilled_from_the_full_one_and_scores_66_percent():
    small = BUNDLED["resnet9-small"]
    assert small.stat().st_size < 3_000_000  # fp16: 1.2 M parameters
    with safe_open(str(small), "pt") as f:
        dtypes = {f.get_tensor(key).dtype for key in f.keys() if f.get_tensor(key).is_floating_point()}
    assert dtypes == {torch.float16}
    model, info = load_checkpoint(small)
    _, full = load_checkpoint(BUNDLED["resnet9"])
    assert info.classes == CLASSES and model.stages == info.channels == (16, 64, 192)
    assert all(mine < theirs for mine, theirs in zip(info.channels, full.channels))
    assert info.extra["teacher"] == full.version
    # What the worker serves on a CPU is this model without TTA.
    assert int(info.extra["val_n"]) == 3589 and float(info.extra["val_acc"]) >= 0.66


@pytest.mark.parametrize("name", sorted(BUNDLED))
def test_bundled_int8_onnx_is_its_checkpoint_within_0_3_points(name):
    path = onnx_beside(BUNDLED[name])
    model, info = load_onnx(path)
    checkpoint, source = load_checkpoint(BUNDLED[name])
    assert (info.name, info.version, info.classes, info.channels) == (
        source.name,
        source.version,
        source.classes,
        source.channels,
    )
    assert model.precision == "int8" and path.stat().st_size < 0.75 * BUNDLED[name].stat().st_size
    extra = info.extra
    assert int(extra["val_n"]) == 3589
    for key in ("val_acc", "val_acc_flip"):
        assert abs(float(extra[key]) - float(extra[f"fp32_{key}"])) <= 0.003, key
    # On the test images it answers as the checkpoint does.
    faces = load_split(FER, "val").images
    ours, theirs = predict(model, info, faces, "flip"), predict(checkpoint, source, faces, "flip")
    assert (ours.argmax(1) == theirs.argmax(1)).float().mean() >= 0.9
