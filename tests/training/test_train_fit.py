"""`emotion-train fit`: a tiny run, the weight averages, BatchNorm recalibration, --init and --teacher."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

import training.fit
from tests.training.conftest import TINY_FIT, fer_images
from training.cli import main
from training.export import export
from training.fit import Hyper, averaging, recalibrate
from worker.classify import TTA_MODES, val_acc_key
from worker.model import CLASSES, ModelInfo, ResNet9, load_checkpoint

METRICS_KEYS = {
    "version",
    "recipe",
    "hyperparameters",
    "width",
    "epochs",
    "device",
    "host",
    "threads",
    "precision",
    "train_images",
    "train_seconds",
    "images_per_s",
    "val",
    "val_confusion",
    "classes",
    "init",
    "teacher",
    "averaged",
    "recalibrated",
    "data",
    "history",
}
HISTORY_KEYS = {"epoch", "loss", "train_acc", "val_acc", "val_acc_flip", "lr", "images_per_s", "seconds"}


def check_run(out, epochs: int = 1) -> dict:
    """Assert what a finished fit run leaves in ``out``; return its metrics."""
    model, info = load_checkpoint(out / "best.safetensors")
    assert info.width == 0.125 and info.classes == CLASSES
    assert model.classifier[-1].out_features == len(CLASSES)
    extra = info.extra
    assert extra["recipe"] == "best" and extra["epochs"] == str(epochs)
    assert json.loads(extra["hyperparameters"])["epochs"] == epochs
    assert extra["data_split"].startswith("trained on train/")
    # A stratified 300 of the 350 copied images, rounding per class; BatchNorm recalibrated on all of them.
    assert 295 <= int(extra["train_images"]) <= 305
    assert f"from {extra['train_images']} clean train/ faces" in extra["recalibrated"]

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == METRICS_KEYS
    assert metrics["version"] == info.version and info.version.endswith(f"-best-w0.125-e{epochs}-bn")
    assert metrics["hyperparameters"] == json.loads(extra["hyperparameters"])
    assert (metrics["width"], metrics["device"], metrics["classes"]) == (0.125, "cpu", list(CLASSES))
    assert [r["epoch"] for r in metrics["history"]] == list(range(1, epochs + 1))
    assert all(set(r) == HISTORY_KEYS for r in metrics["history"])
    assert float(extra["train_minutes"]) == pytest.approx(metrics["train_seconds"] / 60, abs=0.051)
    # --limit 300 validates on max(300 // 4, 50) = 75 of the 84 val images.
    assert set(metrics["val"]) == set(TTA_MODES)
    for tta, result in metrics["val"].items():
        assert set(result) == {"accuracy", "per_class", "n"} and 73 <= result["n"] <= 77
        assert set(result["per_class"]) == set(CLASSES)
        assert extra[val_acc_key(tta)] == f"{result['accuracy']:.4f}"  # the checkpoint carries its own scores
    assert extra["val_n"] == str(metrics["val"]["none"]["n"])
    confusion = metrics["val_confusion"]
    assert sum(map(sum, confusion)) == metrics["val"]["none"]["n"]
    correct = sum(confusion[i][i] for i in range(len(CLASSES)))
    assert metrics["val"]["none"]["accuracy"] == round(correct / metrics["val"]["none"]["n"], 4)
    return metrics


def test_fit_writes_checkpoint_and_metrics(best_run):
    metrics = check_run(best_run)
    # The recipe's defaults with the flags given; the averaging covers the last quarter of the epochs, at least one.
    assert metrics["hyperparameters"] == json.loads(json.dumps(asdict(Hyper(epochs=1, width=0.125))))
    assert metrics["hyperparameters"]["swa_epochs"] == 1 and Hyper().swa_epochs == 15
    # One epoch: the mean of the moving averages is the moving average itself, nothing to list.
    assert metrics["averaged"] == [] and "averaged" not in load_checkpoint(best_run / "best.safetensors")[1].extra


def test_averaging_warms_the_ema_decay_up_and_takes_plain_means():
    model = torch.nn.BatchNorm1d(1)  # a weight, and an integer batch counter
    ema = AveragedModel(model, multi_avg_fn=averaging(0.9), use_buffers=True)
    mean = AveragedModel(model, multi_avg_fn=averaging(None), use_buffers=True)
    expected = None
    for n, value in enumerate([1.0, 3.0, 8.0, 2.0, 5.0]):
        with torch.no_grad():
            model.weight.fill_(value)
            model.num_batches_tracked.fill_(n)
        ema.update_parameters(model)
        mean.update_parameters(model)
        decay = min(0.9, (1 + n) / (10 + n))
        expected = value if expected is None else decay * expected + (1 - decay) * value
        assert ema.module.weight.item() == pytest.approx(expected)
    assert mean.module.weight.item() == pytest.approx((1 + 3 + 8 + 2 + 5) / 5)
    assert ema.module.num_batches_tracked.item() == mean.module.num_batches_tracked.item() == 4  # copied


@pytest.fixture(scope="module")
def faces() -> torch.Tensor:
    """64 real train faces (N, 48, 48) of four classes."""
    import cv2
    import numpy as np

    paths = [p for name in ("happy", "sad", "surprise", "neutral") for p in fer_images("train", name, 16)]
    return torch.from_numpy(np.stack([cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in paths]))


def untrained() -> ResNet9:
    torch.manual_seed(0)
    model = ResNet9(width=0.125)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics that fit no data, as after augmented training
            m.running_mean.fill_(3.0)
            m.running_var.fill_(9.0)
    return model.eval()


def test_recalibration_takes_the_statistics_of_clean_mirrored_faces_with_dropout_off(faces):
    info = ModelInfo(width=0.125, mean=0.5, std=0.25)
    model = untrained()
    weights = {k: v.clone() for k, v in model.named_parameters()}
    torch.manual_seed(1)
    recalibrate(model, faces, info, torch.Generator().manual_seed(0))
    first = {k: v.clone() for k, v in model.named_buffers() if "running" in k}

    # One batch: the first layer's statistics are its outputs' mean and unbiased variance on the mirrored faces.
    mirror = torch.rand(len(faces), generator=torch.Generator().manual_seed(0)) < 0.5
    x = faces.unsqueeze(1).float() / 255
    x = (torch.where(mirror.view(-1, 1, 1, 1), x.flip(-1), x) - 0.5) / 0.25
    with torch.no_grad():
        out = model.conv1[0](x)
    torch.testing.assert_close(first["conv1.1.running_mean"], out.mean(dim=(0, 2, 3)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        first["conv1.1.running_var"], out.transpose(0, 1).flatten(1).var(1), rtol=1e-3, atol=1e-5
    )

    # Dropout draws from the global generator: with it on, another seed would change the deep statistics.
    torch.manual_seed(2)
    recalibrate(model, faces, info, torch.Generator().manual_seed(0))
    assert all(torch.equal(v, first[k]) for k, v in model.named_buffers() if "running" in k)
    assert all(torch.equal(v, weights[k]) for k, v in model.named_parameters())
    assert not any(m.training for m in model.modules())
    assert {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)} == {0.5}
    assert {m.momentum for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)} == {0.1}


@pytest.mark.slow
def test_the_kept_model_is_the_mean_of_the_last_epochs_ema(small_fer, tmp_path, monkeypatch):
    ema_at_end: list[dict] = []  # the moving average as fit scores it on val/ at the end of each epoch
    predict = training.fit.predict

    def record(model, info, faces, tta, **kwargs):
        if tta == "none":
            ema_at_end.append({k: v.clone() for k, v in model.named_parameters()})
        return predict(model, info, faces, tta, **kwargs)

    monkeypatch.setattr(training.fit, "predict", record)
    args = ["fit", "--data", str(small_fer), *TINY_FIT, "--epochs", "3"]
    assert main([*args, "--out", str(tmp_path / "swa"), "--swa-epochs", "2"]) == 0
    kept, info = load_checkpoint(tmp_path / "swa" / "best.safetensors")
    assert [a["epoch"] for a in json.loads(info.extra["averaged"])] == [2, 3]
    for name, value in kept.named_parameters():
        torch.testing.assert_close(value, (ema_at_end[1][name] + ema_at_end[2][name]) / 2, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(kept.classifier[-1].bias, ema_at_end[2]["classifier.2.bias"])


@pytest.mark.parametrize(
    "flag, value, error",
    [
        ("--kd-weight", "1.5", "--kd-weight must be in [0, 1], got 1.5"),
        ("--kd-temperature", "0", "--kd-temperature must be above 0"),
        ("--epochs", "0", "--epochs must be 1 or more"),
        ("--swa-epochs", "2", "--swa-epochs must be in [0, epochs], got 2"),
        ("--width", "0", "--width must be in (0, 4]"),
    ],
)
def test_hyperparameters_are_checked(small_fer, tmp_path, capsys, flag, value, error):
    assert main(["fit", "--data", str(small_fer), "--out", str(tmp_path / "run"), *TINY_FIT, flag, value]) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("value", ["16,64", "16,0,64", "x"])
def test_a_bad_stages_flag_is_refused_naming_it(small_fer, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--data", str(small_fer), "--out", str(tmp_path / "run"), *TINY_FIT, "--stages", value])
    assert exit.value.code == 2
    assert "--stages" in (err := capsys.readouterr().err) and "three channel counts" in err and repr(value) in err
    assert not (tmp_path / "run").exists()


def test_init_starts_from_a_checkpoint_and_records_it(best_run, warm_run, tmp_path):
    from training.fit import start_from
    from worker.model import CheckpointError

    source, source_info = load_checkpoint(best_run / "best.safetensors")
    model = ResNet9(width=0.125)
    start_from(model, best_run / "best.safetensors")
    for (name, a), b in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(
        CheckpointError, match=r"at least the channels of the network trained \(\(32, 64, 128\)\); it has width 0.125"
    ):
        start_from(ResNet9(width=0.25), best_run / "best.safetensors")

    info = load_checkpoint(warm_run / "best.safetensors")[1]
    assert info.extra["init"] == str(best_run / "best.safetensors")
    # The lineage: which model it started from and the epochs and minutes behind those weights.
    assert info.extra["init_version"] == source_info.version
    assert (info.extra["init_epochs"], info.extra["init_train_minutes"]) == ("1", source_info.extra["train_minutes"])
    metrics = json.loads((warm_run / "metrics.json").read_text())
    assert (metrics["init"], metrics["init_epochs"]) == (str(best_run / "best.safetensors"), "1")
    assert metrics["hyperparameters"]["lr"] == 0.01
    # Its version counts the epochs of both runs.
    assert load_checkpoint(export(warm_run, tmp_path / "exported.safetensors"))[1].version.endswith(
        "-best-w0.125-e2-bn"
    )


def test_pruning_keeps_the_channels_with_the_largest_batchnorm_scales():
    """A wide network whose other channels are silent (BatchNorm scale and shift 0, so they output ELU(0) = 0)
    computes what the narrow one pruned from it computes, if pruning keeps exactly the channels that are not."""
    from training.fit import conv_blocks, prune_into

    torch.manual_seed(0)
    wide, narrow = ResNet9(width=0.125).eval(), ResNet9(stages=(8, 16, 24)).eval()
    with torch.no_grad():
        for k, block in enumerate(conv_blocks(wide)):
            bn, n = block[1], block[1].num_features
            bn.running_mean.uniform_(-0.2, 0.2), bn.running_var.uniform_(0.5, 2)
            keep = narrow.stages[k // 4]
            # The stream of a stage (its second conv and its block's second) keeps channels spread over the range.
            live = torch.arange(0, n, n // keep)[:keep] if k % 4 in (1, 3) else torch.randperm(n)[:keep]
            silent = torch.ones(n, dtype=torch.bool)
            silent[live] = False
            bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.3, 0.3)
            bn.weight[silent], bn.bias[silent] = 0.0, 0.0
    prune_into(narrow, wide)
    x = torch.randn(4, 1, 48, 48)
    with torch.no_grad():
        assert torch.allclose(narrow(x), wide(x), atol=1e-5)
    same = ResNet9(width=0.125).eval()
    prune_into(same, wide)  # nothing to prune: every tensor is copied as it is
    for (name, a), b in zip(same.state_dict().items(), wide.state_dict().values()):
        assert torch.equal(a, b), name


def test_fit_prunes_a_wider_init_to_the_stages_asked_for(best_run, small_fer, tmp_path):
    out = tmp_path / "run"
    stages = ["--stages", "8,16,24", "--init", str(best_run / "best.safetensors")]
    assert main(["fit", "--data", str(small_fer), "--out", str(out), *TINY_FIT, *stages]) == 0
    model, info = load_checkpoint(out / "best.safetensors")
    assert (info.stages, model.stages, info.shape) == ((8, 16, 24), (8, 16, 24), "stages 8,16,24")
    assert "-best-s8.16.24-e2" in info.version and info.extra["init_epochs"] == "1"
    assert json.loads((out / "metrics.json").read_text())["stages"] == [8, 16, 24]


def test_lineage_adds_up_over_a_chain_of_runs():
    from training.fit import lineage

    first = ModelInfo(width=0.5, version="a", extra={"best_epoch": "67", "epochs": "70", "train_minutes": "196.6"})
    assert lineage(first) == {"init_version": "a", "init_epochs": "67", "init_train_minutes": "196.6"}
    second = ModelInfo(width=0.5, version="b", extra={"epochs": "22", "train_minutes": "110.0", **lineage(first)})
    assert lineage(second) == {"init_version": "b", "init_epochs": "89", "init_train_minutes": "306.6"}
    # A start whose own start does not record its minutes: the epochs add up, the minutes are left out.
    third = ModelInfo(
        width=0.5, version="c", extra={"epochs": "19", "train_minutes": "9", "init_epochs": "91", "init_version": "x"}
    )
    assert lineage(third) == {"init_version": "c", "init_epochs": "110"}


# --- distillation --------------------------------------------------------------------------------


def test_distill_loss_is_the_scaled_kl_divergence_of_the_softened_distributions():
    from training.fit import distill_loss

    torch.manual_seed(0)
    teacher = torch.randn(6, 7).log_softmax(1)
    assert distill_loss(teacher.clone(), teacher, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    assert distill_loss(teacher + 5.0, teacher, 4.0).item() == pytest.approx(0.0, abs=1e-6)  # softmax ignores shifts
    student = torch.randn(6, 7)
    p, q = (teacher / 2).softmax(1), (student / 2).softmax(1)
    expected = (p * (p.log() - q.log())).sum(1).mean() * 4
    assert distill_loss(student, teacher, 2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_teacher_targets_are_computed_once_and_keyed_by_teacher_and_data(
    tiny_checkpoint, best_run, small_fer, tmp_path, monkeypatch, capsys
):
    from training.data import load_split
    from training.fit import teacher_targets

    train, cpu, cache = load_split(small_fer, "train"), torch.device("cpu"), tmp_path / "cache"
    first, version = teacher_targets(tiny_checkpoint, train, cpu, None, cache)
    assert first.shape == (len(train), len(CLASSES)) and version == load_checkpoint(tiny_checkpoint)[1].version
    torch.testing.assert_close(first.exp().sum(1), torch.ones(len(train)))  # log-probabilities of the flip TTA
    assert "of the train faces right with flip TTA" in capsys.readouterr().err
    assert len(list(cache.iterdir())) == 1

    def no_inference(*args, **kwargs):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(training.fit, "predict", no_inference)
    again, _ = teacher_targets(tiny_checkpoint, train, cpu, None, cache)
    assert torch.equal(again, first) and "read from" in capsys.readouterr().err
    monkeypatch.undo()
    # Another teacher, or other images, are other targets.
    teacher_targets(best_run / "best.safetensors", train, cpu, None, cache)
    teacher_targets(tiny_checkpoint, train.subset(100), cpu, None, cache)
    assert len(list(cache.iterdir())) == 3


@pytest.mark.slow
def test_fit_with_a_teacher_distils_it_and_records_it(tiny_checkpoint, best_run, small_fer, tmp_path):
    out = tmp_path / "student"
    args = ["fit", "--data", str(small_fer), "--out", str(out), *TINY_FIT, "--teacher", str(tiny_checkpoint)]
    assert main([*args, "--kd-weight", "0.9", "--kd-temperature", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    teacher_version = load_checkpoint(tiny_checkpoint)[1].version
    assert metrics["teacher"] == load_checkpoint(out / "best.safetensors")[1].extra["teacher"] == teacher_version
    assert (metrics["hyperparameters"]["kd_weight"], metrics["hyperparameters"]["kd_temperature"]) == (0.9, 3.0)
    assert len(list((tmp_path / "teacher-targets").glob(f"{teacher_version}-*.safetensors"))) == 1
    # Same seed, data order and recipe as best_run: only the soft targets change the loss.
    reference = json.loads((best_run / "metrics.json").read_text())
    assert reference["teacher"] is None
    assert metrics["history"][0]["loss"] != pytest.approx(reference["history"][0]["loss"], rel=1e-2)


def test_a_missing_teacher_is_named(small_fer, tmp_path, capsys):
    missing = tmp_path / "teacher.safetensors"
    args = ["fit", "--data", str(small_fer), "--out", str(tmp_path / "run"), *TINY_FIT, "--teacher", str(missing)]
    assert main(args) == 2
    assert f"{missing} does not exist" in capsys.readouterr().err
