"""`emotion-train average`: one model from the mean of several checkpoints' weights."""

from __future__ import annotations

import json

import pytest
import torch

from training.cli import main
from training.export import export
from worker.model import CLASSES, ModelInfo, ResNet9, load_checkpoint, save_checkpoint


def constant_model(value: float, width: float = 0.125) -> ResNet9:
    model = ResNet9(len(CLASSES), width)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(value if tensor.is_floating_point() else int(value))
    return model


def test_average_writes_the_mean_recalibrated_scored_and_exportable(best_run, warm_run, small_fer, tmp_path, capsys):
    runs = [best_run, warm_run]
    out = tmp_path / "avg"
    assert (
        main(["average", "--weights", *map(str, runs), "--data", str(small_fer), "--out", str(out), "--device", "cpu"])
        == 0
    )

    (m1, i1), (m2, i2) = (load_checkpoint(r / "best.safetensors") for r in runs)
    model, info = load_checkpoint(out / "best.safetensors")
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    for key, value in model.named_parameters():
        torch.testing.assert_close(value, (p1[key] + p2[key]) / 2, rtol=1e-6, atol=1e-7)
    # Recalibrated on all 350 train/ faces: the statistics of the mean network, not the mean of the statistics.
    assert not torch.allclose(model.conv1[1].running_mean, (m1.conv1[1].running_mean + m2.conv1[1].running_mean) / 2)
    assert "from 350 clean train/ faces" in info.extra["recalibrated"]
    assert [a["checkpoint"] for a in json.loads(info.extra["averaged"])] == [str(r / "best.safetensors") for r in runs]
    # The metadata of the checkpoint with the most training behind it, and both runs' minutes.
    assert info.extra["init_version"] == i1.version
    assert info.extra["init"] == i2.extra["init"]
    minutes = float(i1.extra["train_minutes"]) + float(i2.extra["train_minutes"])
    assert float(info.extra["train_minutes"]) == pytest.approx(minutes, abs=0.051)

    metrics = json.loads((out / "metrics.json").read_text())
    assert [a["version"] for a in metrics["averaged"]] == [i1.version, i2.version]
    capsys.readouterr()
    args = ["--weights", str(out / "best.safetensors"), "--data", str(small_fer), "--tta", "flip", "--device", "cpu"]
    assert main(["evaluate", *args, "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    assert measured["accuracy"] == metrics["val"]["flip"]["accuracy"]
    assert info.extra["val_acc_flip"] == f"{measured['accuracy']:.4f}"

    exported = load_checkpoint(export(out, tmp_path / "model.safetensors"))[1]
    assert exported.version.endswith("-best-w0.125-e2-avg2-bn")
    assert exported.extra["val_acc_flip"] == f"{measured['accuracy']:.4f}"


def write(model: ResNet9, info: ModelInfo, path):
    save_checkpoint(model, info, path)
    return str(path)


def test_checkpoints_of_other_networks_are_refused(small_fer, tmp_path, capsys):
    a = write(constant_model(1.0), ModelInfo(width=0.125), tmp_path / "a" / "a.safetensors")
    wider = write(constant_model(1.0, 0.25), ModelInfo(width=0.25), tmp_path / "wider.safetensors")
    reordered = write(
        constant_model(1.0),
        ModelInfo(width=0.125, classes=tuple(reversed(CLASSES))),
        tmp_path / "reordered.safetensors",
    )
    out = str(tmp_path / "out")
    for other, what in ((wider, "width 0.25"), (reordered, "classes ['surprise'")):
        assert main(["average", "--weights", a, other, "--data", str(small_fer), "--out", out]) == 2
        err = capsys.readouterr().err
        assert f"{other}: cannot be averaged with {a}" in err and what in err
    assert main(["average", "--weights", a, "--data", str(small_fer), "--out", out]) == 2
    assert "two or more checkpoints, got 1" in capsys.readouterr().err
    assert main(["average", "--weights", a, a, "--data", str(small_fer), "--out", out]) == 2
    assert "given twice" in capsys.readouterr().err
    b = write(constant_model(2.0), ModelInfo(width=0.125), tmp_path / "b.safetensors")
    assert main(["average", "--weights", a, b, "--data", str(small_fer), "--out", str(tmp_path / "a")]) == 2
    assert "another folder than those of its checkpoints" in capsys.readouterr().err
    assert (
        main(["average", "--weights", a, str(tmp_path / "nothing.safetensors"), "--data", str(small_fer), "--out", out])
        == 2
    )
    assert "nothing.safetensors does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
