"""`emotion-train average` and `fit --keep-epochs`: one model from the mean of several checkpoints' weights."""

from __future__ import annotations

import json

import pytest
import torch

from tests.training.conftest import TINY_FIT
from training.average import mean_state
from training.cli import main
from training.export import export
from worker.model import CLASSES, ModelInfo, ResNet9, load_checkpoint, save_checkpoint


def constant_model(value: float, width: float = 0.125) -> ResNet9:
    model = ResNet9(len(CLASSES), width)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.fill_(value if tensor.is_floating_point() else int(value))
    return model


def test_mean_state_is_the_mean_of_each_tensor():
    one, three, eight = constant_model(1.0), constant_model(3.0), constant_model(8.0)
    mean = mean_state([one, three, eight])
    assert mean.keys() == one.state_dict().keys()
    for key, tensor in mean.items():
        if tensor.is_floating_point():
            assert tensor.dtype == torch.float32
            assert torch.equal(tensor, torch.full_like(tensor, 4.0)), key
        else:  # BatchNorm's batch counters are the first model's, not averaged
            assert torch.equal(tensor, torch.full_like(tensor, 1)), key


@pytest.fixture(scope="module")
def kept_run(small_fer, tmp_path_factory):
    """A two-epoch tiny fit run with --keep-epochs."""
    out = tmp_path_factory.mktemp("run-kept")
    assert (
        main(
            [
                "fit",
                "--data",
                str(small_fer),
                "--out",
                str(out),
                "--recipe",
                "seed",
                "--keep-epochs",
                *TINY_FIT,
                "--epochs",
                "2",
            ]
        )
        == 0
    )
    return out


def test_keep_epochs_writes_every_epochs_checkpoint(kept_run):
    first = load_checkpoint(kept_run / "epochs" / "epoch-001.safetensors")
    second = load_checkpoint(kept_run / "epochs" / "epoch-002.safetensors")
    assert sorted(p.name for p in (kept_run / "epochs").iterdir()) == ["epoch-001.safetensors", "epoch-002.safetensors"]
    assert (first[1].extra["epoch"], second[1].extra["epoch"]) == ("1", "2")
    assert not torch.equal(first[0].conv1[0].weight, second[0].conv1[0].weight)
    # The run's kept model is one of them, unchanged.
    best, info = load_checkpoint(kept_run / "best.safetensors")
    same = first if info.extra["epoch"] == "1" else second
    assert all(torch.equal(v, same[0].state_dict()[k]) for k, v in best.state_dict().items())


def test_average_writes_the_mean_recalibrated_scored_and_exportable(kept_run, small_fer, tmp_path, capsys):
    epochs = [kept_run / "epochs" / f"epoch-00{e}.safetensors" for e in (1, 2)]
    out = tmp_path / "avg"
    assert (
        main(
            ["average", "--weights", *map(str, epochs), "--data", str(small_fer), "--out", str(out), "--device", "cpu"]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "mean of 2 checkpoints" in printed and "350 train/ images" in printed

    (m1, i1), (m2, _) = (load_checkpoint(p) for p in epochs)
    model, info = load_checkpoint(out / "best.safetensors")
    p1, p2 = dict(m1.named_parameters()), dict(m2.named_parameters())
    for key, value in model.named_parameters():
        assert torch.allclose(value, (p1[key] + p2[key]) / 2, atol=1e-7), key
    # Recalibrated: the running statistics are those of the mean network, not the mean of the statistics.
    assert not torch.allclose(model.conv1[1].running_mean, (m1.conv1[1].running_mean + m2.conv1[1].running_mean) / 2)
    assert "350 clean" in info.extra["recalibrated"]
    assert [a["checkpoint"] for a in json.loads(info.extra["averaged"])] == list(map(str, epochs))
    assert info.extra["epoch"] == "2"  # metadata of the checkpoint with the most training behind it

    metrics = json.loads((out / "metrics.json").read_text())
    minutes = max(float(load_checkpoint(p)[1].extra["train_minutes"]) for p in epochs)
    assert metrics["train_seconds"] == pytest.approx(minutes * 60, abs=6)  # one run: counted once, to its last epoch
    assert (out / "confusion.png").stat().st_size > 0
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
    assert measured["accuracy"] == metrics["val"]["flip"]["accuracy"]
    assert info.extra["val_acc_tta"] == f"{measured['accuracy']:.4f}"

    exported = load_checkpoint(export(out, tmp_path / "model.safetensors"))[1]
    assert exported.version.endswith("-seed-w0.125-e2-avg2-bn")
    assert exported.extra["val_acc_flip"] == f"{measured['accuracy']:.4f}"


def test_runs_of_a_soup_each_count_their_training_time(kept_run, best_run, small_fer, tmp_path):
    from training.average import train_seconds

    paths = [
        kept_run / "epochs" / "epoch-001.safetensors",
        kept_run / "epochs" / "epoch-002.safetensors",
        best_run / "best.safetensors",
    ]
    infos = [load_checkpoint(p)[1] for p in paths]
    minutes = [float(i.extra["train_minutes"]) for i in infos]
    assert train_seconds(infos, paths) == pytest.approx((max(minutes[:2]) + minutes[2]) * 60)


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
