"""`emotion-train evaluate` on a model whose every prediction is known in advance."""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.conftest import copy_images, fer_images
from training.cli import main
from worker.model import CLASSES, ModelInfo, ResNet9, save_checkpoint


def constant_model(path, answer: str, classes: tuple[str, ...] = CLASSES):
    """A width-0.125 ResNet9 that predicts ``answer`` for every image: zero classifier weights, biased."""
    torch.manual_seed(0)
    model = ResNet9(len(classes), width=0.125)
    head = model.classifier[-1]
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(-1.0)
        head.bias[classes.index(answer)] = 3.0
    return save_checkpoint(model, ModelInfo(classes=classes, width=0.125, name="always-" + answer), path)


@pytest.fixture(scope="module")
def happy_and_sad(tmp_path_factory):
    """Class folders holding only 5 happy and 7 sad val faces: five classes are absent."""
    root = tmp_path_factory.mktemp("happy-sad")
    copy_images(fer_images("val", "happy", 5), root / "happy")
    copy_images(fer_images("val", "sad", 7), root / "sad")
    return root


def evaluate_json(capsys, *args: str) -> dict:
    capsys.readouterr()
    assert main(["evaluate", "--device", "cpu", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("tta", ["none", "flip", "tencrop", "rotate"])
def test_accuracy_of_a_model_that_always_says_happy(tmp_path, happy_and_sad, capsys, tta):
    weights = constant_model(tmp_path / "happy.safetensors", "happy")
    result = evaluate_json(capsys, "--weights", str(weights), "--data", str(happy_and_sad), "--tta", tta)
    assert result["n"] == 12
    assert result["accuracy"] == round(5 / 12, 4)
    assert result["per_class"] == {"happy": 1.0, "sad": 0.0}
    assert result["counts"] == {"happy": 5, "sad": 7}
    happy, sad = CLASSES.index("happy"), CLASSES.index("sad")
    expected = [[0] * len(CLASSES) for _ in CLASSES]
    expected[happy][happy], expected[sad][happy] = 5, 7
    assert result["confusion"] == expected


def test_labels_are_matched_by_name_when_the_model_orders_classes_differently(tmp_path, happy_and_sad, capsys):
    # "sad" is output 1 of this model, "happy" output 5: scoring by position would go wrong.
    classes = ("neutral", "sad", "surprise", "angry", "fear", "happy", "disgust")
    weights = constant_model(tmp_path / "sad.safetensors", "sad", classes)
    result = evaluate_json(capsys, "--weights", str(weights), "--data", str(happy_and_sad))
    assert result["accuracy"] == round(7 / 12, 4)
    assert result["per_class"] == {"happy": 0.0, "sad": 1.0}
    assert result["confusion"][classes.index("happy")][classes.index("sad")] == 5
    assert result["confusion"][classes.index("sad")][classes.index("sad")] == 7


def test_readable_report_and_a_split_folder(tmp_path, happy_and_sad, capsys):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "val").symlink_to(happy_and_sad, target_is_directory=True)
    weights = constant_model(tmp_path / "happy.safetensors", "happy")
    capsys.readouterr()
    assert main(["evaluate", "--device", "cpu", "--weights", str(weights), "--data", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "12 images" in out
    assert "accuracy 0.4167" in out
    assert "happy     1.0000  (5 images)" in out
    assert "sad       0.0000  (7 images)" in out


def test_missing_weights_is_an_error_naming_the_file(tmp_path, happy_and_sad, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(["evaluate", "--device", "cpu", "--weights", str(missing), "--data", str(happy_and_sad)]) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err


def test_json_reports_throughput_device_precision_backend_and_batch_size(tmp_path, happy_and_sad, capsys):
    weights = constant_model(tmp_path / "happy.safetensors", "happy")
    args = ["--weights", str(weights), "--data", str(happy_and_sad), "--precision", "fp32", "--batch-size", "5"]
    result = evaluate_json(capsys, *args)
    assert result["faces_per_s"] > 0 and result["batch_size"] == 5
    assert (result["device"], result["precision"], result["backend"]) == ("cpu", "fp32", "torch")
    assert result["accuracy"] == round(5 / 12, 4)


def test_evaluate_an_onnx_model_and_a_checkpoint_on_onnxruntime(tiny_onnx, happy_and_sad, capsys):
    direct = evaluate_json(capsys, "--weights", str(tiny_onnx["int8"]), "--data", str(happy_and_sad))
    assert (direct["backend"], direct["precision"], direct["device"]) == ("onnxruntime", "int8", "cpu")
    assert direct["n"] == 12 and direct["faces_per_s"] > 0
    beside = evaluate_json(
        capsys, "--weights", str(tiny_onnx["checkpoint"]), "--backend", "onnxruntime", "--data", str(happy_and_sad)
    )
    assert beside["weights"] == str(tiny_onnx["int8"])
    assert beside["confusion"] == direct["confusion"]


def test_evaluate_takes_a_bundled_name(happy_and_sad, capsys):
    result = evaluate_json(capsys, "--weights", "resnet9", "--data", str(happy_and_sad), "--batch-size", "4")
    assert result["weights"].endswith("worker/weights/resnet9.safetensors") and result["n"] == 12
