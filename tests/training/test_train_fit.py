"""`emotion-train fit`: a tiny run of each recipe, and --resume after an interruption."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

import training.fit
from tests.training.conftest import TINY_FIT
from training.cli import main
from training.export import export
from worker.model import CLASSES, load_checkpoint

METRICS_KEYS = {
    "recipe",
    "hyperparameters",
    "width",
    "epochs",
    "best_epoch",
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
    "data",
    "history",
}
HISTORY_KEYS = {"epoch", "loss", "train_acc", "val_acc", "val_acc_tta", "lr", "images_per_s", "seconds"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def check_run(out, recipe: str, epochs: int = 1) -> dict:
    """Assert what a finished fit run leaves in ``out``; return its metrics."""
    model, info = load_checkpoint(out / "best.safetensors")
    assert info.width == 0.125
    assert info.classes == CLASSES
    assert model.classifier[-1].out_features == len(CLASSES)
    assert info.extra["recipe"] == recipe
    assert info.extra["epochs"] == str(epochs)
    assert info.extra["data_split"].startswith("trained on train/")

    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == METRICS_KEYS
    assert metrics["recipe"] == recipe
    assert metrics["hyperparameters"]["name"] == recipe
    assert metrics["width"] == 0.125
    assert metrics["epochs"] == epochs
    assert metrics["device"] == "cpu"
    assert metrics["classes"] == list(CLASSES)
    # A stratified 300 of the 350 copied images, rounding per class.
    assert 295 <= metrics["train_images"] <= 305
    assert [r["epoch"] for r in metrics["history"]] == list(range(1, epochs + 1))
    assert all(set(r) == HISTORY_KEYS for r in metrics["history"])
    assert metrics["best_epoch"] == max(metrics["history"], key=lambda r: r["val_acc_tta"])["epoch"]
    assert info.extra["epoch"] == str(metrics["best_epoch"])
    # The minutes of this run up to the epoch kept, so a warm restart from it can count them.
    seconds = sum(r["seconds"] for r in metrics["history"][: metrics["best_epoch"]])
    assert float(info.extra["train_minutes"]) == pytest.approx(seconds / 60, abs=0.051)
    assert set(metrics["val"]) == {"none", "flip", "tencrop", "rotate"}
    # --limit 300 validates on max(300 // 4, 50) = 75 of the 84 val images.
    for result in metrics["val"].values():
        assert set(result) == {"accuracy", "per_class", "n"}
        assert 73 <= result["n"] <= 77
        assert 0.0 <= result["accuracy"] <= 1.0
        assert set(result["per_class"]) == set(CLASSES)
    confusion = metrics["val_confusion"]
    assert len(confusion) == len(CLASSES) and all(len(row) == len(CLASSES) for row in confusion)
    assert sum(map(sum, confusion)) == metrics["val"]["none"]["n"]
    correct = sum(confusion[i][i] for i in range(len(CLASSES)))
    assert metrics["val"]["none"]["accuracy"] == round(correct / metrics["val"]["none"]["n"], 4)
    # The checkpoint kept is the one scored in metrics.json.
    assert info.extra["val_acc"] == f"{metrics['history'][metrics['best_epoch'] - 1]['val_acc']:.4f}"

    for png in ("curves.png", "confusion.png"):
        data = (out / png).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, png
    return metrics


def test_fit_best_recipe_writes_checkpoint_metrics_and_plots(best_run):
    metrics = check_run(best_run, "best")
    assert metrics["hyperparameters"]["optimizer"] == "sgd"
    assert (best_run / "train_state.safetensors").is_file()


def test_fit_seed_recipe_writes_checkpoint_metrics_and_plots(seed_run):
    metrics = check_run(seed_run, "seed")
    assert metrics["hyperparameters"]["optimizer"] == "adam"


class Interrupted(Exception):
    pass


def test_resume_continues_after_the_last_finished_epoch(small_fer, tmp_path, monkeypatch, capsys):
    args = ["fit", "--data", str(small_fer), "--recipe", "best", *TINY_FIT, "--epochs", "2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main([*args, "--out", str(full)]) == 0
    full_metrics = json.loads((full / "metrics.json").read_text())

    save_state = training.fit.save_state
    saved_epochs: list[int] = []

    def save_then_stop(path, model, ema, opt, gen, recipe, width, epoch, *rest):
        save_state(path, model, ema, opt, gen, recipe, width, epoch, *rest)
        saved_epochs.append(epoch)
        if epoch == 1:
            raise Interrupted  # as if the machine went down right after epoch 1

    monkeypatch.setattr(training.fit, "save_state", save_then_stop)
    with pytest.raises(Interrupted):
        main([*args, "--out", str(cut)])
    assert saved_epochs == [1]
    assert not (cut / "metrics.json").exists()
    with safe_open(str(cut / "train_state.safetensors"), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
    assert state["epoch"] == 1 and len(state["history"]) == 1

    capsys.readouterr()
    saved_epochs.clear()
    assert main([*args, "--out", str(cut), "--resume"]) == 0
    assert "resuming after epoch 1" in capsys.readouterr().err
    assert saved_epochs == [2], "the resumed run must train epoch 2 only"

    metrics = check_run(cut, "best", epochs=2)
    history = metrics["history"]
    assert len(history) == len(full_metrics["history"]) == 2
    # Epoch 1 is the interrupted run's own row (its timing included), not a re-run.
    assert history[0] == state["history"][0]
    assert metrics["train_seconds"] == pytest.approx(sum(r["seconds"] for r in history), abs=0.2)
    # The one-cycle schedule went on where it stopped: the same learning rates as uninterrupted.
    assert [r["lr"] for r in history] == pytest.approx([r["lr"] for r in full_metrics["history"]], rel=1e-9)
    # Same seed, same data order: epoch 1 trains the same; epoch 2 from the restored
    # weights, optimiser and generator (not bit-exact: dropout's RNG is not stored).
    assert history[0]["loss"] == pytest.approx(full_metrics["history"][0]["loss"], rel=1e-3)
    assert history[1]["loss"] == pytest.approx(full_metrics["history"][1]["loss"], rel=0.05)


def test_resume_refuses_a_state_written_with_another_width(best_run, small_fer, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("train_state.safetensors", "best.safetensors"):
        (out / name).write_bytes((best_run / name).read_bytes())
    args = ["fit", "--data", str(small_fer), "--out", str(out), "--recipe", "best", *TINY_FIT, "--resume"]
    with pytest.raises(SystemExit, match="another recipe or width"):
        main([*args, "--width", "0.25"])
    # The same recipe and width resume: the one epoch is already done, so it only finishes.
    assert main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["history"][0]["epoch"] == 1


def test_init_starts_from_a_checkpoint_and_records_it(seed_run, small_fer, tmp_path):
    import torch

    from training.fit import start_from
    from worker.model import CheckpointError, ResNet9

    source, _ = load_checkpoint(seed_run / "best.safetensors")
    model = ResNet9(width=0.125)
    start_from(model, seed_run / "best.safetensors")
    for (name, a), b in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name
    with pytest.raises(CheckpointError, match="--init needs a checkpoint of width 0.0625 or less"):
        start_from(ResNet9(width=0.0625), seed_run / "best.safetensors")

    # A narrower checkpoint is widened and keeps its outputs.
    wide = ResNet9(width=0.25).eval()
    start_from(wide, seed_run / "best.safetensors")
    x = torch.randn(2, 1, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(wide(x), source.float()(x), rtol=1e-3, atol=1e-3)

    out = tmp_path / "warm"
    args = [
        "fit",
        "--data",
        str(small_fer),
        "--out",
        str(out),
        "--recipe",
        "best",
        "--lr",
        "0.01",
        "--init",
        str(seed_run / "best.safetensors"),
        *TINY_FIT,
    ]
    assert main(args) == 0
    _, info = load_checkpoint(out / "best.safetensors")
    _, source_info = load_checkpoint(seed_run / "best.safetensors")
    assert info.extra["init"] == str(seed_run / "best.safetensors")
    # The lineage: which model it started from and the epochs behind those weights.
    assert info.extra["init_version"] == source_info.version
    assert info.extra["init_epochs"] == source_info.extra["epoch"]
    assert info.extra["init_train_minutes"] == source_info.extra["train_minutes"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["init"] == str(seed_run / "best.safetensors")
    assert metrics["init_epochs"] == source_info.extra["epoch"]
    assert metrics["hyperparameters"]["lr"] == 0.01
    # Exported, its version counts the epochs of both runs.
    exported = load_checkpoint(export(out, tmp_path / "exported.safetensors"))[1]
    assert exported.version.endswith("-best-w0.125-e2")


def test_lineage_adds_up_over_a_chain_of_warm_restarts():
    from training.fit import lineage
    from worker.model import ModelInfo

    first = ModelInfo(
        width=0.5, version="2026.11.28-best-w0.5", extra={"best_epoch": "67", "epochs": "70", "train_minutes": "196.6"}
    )
    assert lineage(first) == {
        "init_version": "2026.11.28-best-w0.5",
        "init_epochs": "67",
        "init_train_minutes": "196.6",
    }
    second = ModelInfo(
        width=0.5,
        version="2026.11.29-best-w0.5",
        extra={"best_epoch": "20", "epochs": "22", "train_minutes": "110.0", **lineage(first)},
    )
    assert lineage(second) == {
        "init_version": "2026.11.29-best-w0.5",
        "init_epochs": "87",
        "init_train_minutes": "306.6",
    }
    # A start whose own start does not record its minutes: the epochs add up, the minutes are left out.
    third = ModelInfo(
        width=0.5,
        version="2026.11.30-best-w0.5",
        extra={"epoch": "19", "train_minutes": "98.0", "init_version": "2026.11.29", "init_epochs": "91"},
    )
    assert lineage(third) == {"init_version": "2026.11.30-best-w0.5", "init_epochs": "110"}


def test_dropout_changes_training_and_is_recorded(seed_run, small_fer, tmp_path, capsys):
    out = tmp_path / "run"
    assert (
        main(["fit", "--data", str(small_fer), "--out", str(out), "--recipe", "seed", *TINY_FIT, "--dropout", "0"]) == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hyperparameters"]["dropout"] == 0.0
    # Same seed and data order as seed_run; only the dropout differs, and with it the training loss.
    reference = json.loads((seed_run / "metrics.json").read_text())
    assert reference["hyperparameters"]["dropout"] == 0.5
    assert metrics["history"][0]["loss"] != pytest.approx(reference["history"][0]["loss"], rel=1e-2)

    assert main(["fit", "--data", str(small_fer), "--out", str(tmp_path / "bad"), *TINY_FIT, "--dropout", "1"]) == 2
    assert "--dropout must be in [0, 1), got 1.0" in capsys.readouterr().err


def test_resume_takes_a_state_from_before_the_dropout_setting_as_dropout_one_half(best_run, small_fer, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = tmp_path / "run"
    out.mkdir()
    (out / "best.safetensors").write_bytes((best_run / "best.safetensors").read_bytes())
    with safe_open(str(best_run / "train_state.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        state = json.loads(f.metadata()["state"])
    del state["recipe"]["dropout"]
    save_file(tensors, str(out / "train_state.safetensors"), metadata={"state": json.dumps(state)})

    args = ["fit", "--data", str(small_fer), "--out", str(out), "--recipe", "best", *TINY_FIT, "--resume"]
    with pytest.raises(SystemExit, match="another recipe or width"):
        main([*args, "--dropout", "0.2"])
    assert main(args) == 0
    assert json.loads((out / "metrics.json").read_text())["history"][0]["epoch"] == 1


def test_light_augmentation_changes_training_and_is_recorded(seed_run, small_fer, tmp_path):
    out = tmp_path / "run"
    assert (
        main(["fit", "--data", str(small_fer), "--out", str(out), "--recipe", "seed", *TINY_FIT, "--augment", "light"])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    augment = metrics["hyperparameters"]["augment"]
    assert augment["flip"] is True and augment["shift_px"] == 2
    assert augment["rotate_deg"] == 0 and augment["scale"] == 0 and augment["erase_p"] == 0
    # Same seed and data order as seed_run, whose recipe rotates by up to 30 degrees.
    reference = json.loads((seed_run / "metrics.json").read_text())
    assert reference["hyperparameters"]["augment"]["rotate_deg"] == 30
    assert metrics["history"][0]["loss"] != pytest.approx(reference["history"][0]["loss"], rel=1e-2)

    # The augmentation is part of the recipe a resumed run must match.
    args = ["fit", "--data", str(small_fer), "--out", str(out), "--recipe", "seed", *TINY_FIT, "--resume"]
    with pytest.raises(SystemExit, match="another recipe or width"):
        main(args)
    assert main([*args, "--augment", "light"]) == 0


# --- distillation --------------------------------------------------------------------------------


def test_distill_loss_is_the_scaled_kl_divergence_of_the_softened_distributions():
    import torch

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
    seed_run, best_run, small_fer, tmp_path, monkeypatch, capsys
):
    import torch

    from training.data import load_split
    from training.fit import teacher_targets

    train = load_split(small_fer, "train")
    cache = tmp_path / "cache"
    first, version = teacher_targets(seed_run / "best.safetensors", train, torch.device("cpu"), None, cache)
    assert (
        first.shape == (len(train), len(CLASSES))
        and version == load_checkpoint(seed_run / "best.safetensors")[1].version
    )
    torch.testing.assert_close(first.exp().sum(1), torch.ones(len(train)))  # log-probabilities of the flip TTA
    assert "of the train faces right with flip TTA" in capsys.readouterr().err
    assert len(list(cache.iterdir())) == 1

    def no_inference(*args, **kwargs):
        raise AssertionError("the teacher ran again")

    monkeypatch.setattr(training.fit, "predict", no_inference)
    again, _ = teacher_targets(seed_run / "best.safetensors", train, torch.device("cpu"), None, cache)
    assert torch.equal(again, first) and "read from" in capsys.readouterr().err
    monkeypatch.undo()
    # Another teacher, or other images, are other targets.
    teacher_targets(best_run / "best.safetensors", train, torch.device("cpu"), None, cache)
    teacher_targets(seed_run / "best.safetensors", train.subset(100), torch.device("cpu"), None, cache)
    assert len(list(cache.iterdir())) == 3


def test_fit_with_a_teacher_distils_it_and_records_it(seed_run, best_run, small_fer, tmp_path, capsys):
    out = tmp_path / "student"
    teacher = seed_run / "best.safetensors"
    args = ["fit", "--data", str(small_fer), "--out", str(out), "--recipe", "best", *TINY_FIT]
    assert main([*args, "--teacher", str(teacher), "--kd-weight", "0.9", "--kd-temperature", "3"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    teacher_version = load_checkpoint(teacher)[1].version
    assert metrics["teacher"] == teacher_version
    assert (metrics["hyperparameters"]["kd_weight"], metrics["hyperparameters"]["kd_temperature"]) == (0.9, 3.0)
    assert load_checkpoint(out / "best.safetensors")[1].extra["teacher"] == teacher_version
    assert len(list((tmp_path / "teacher-targets").glob(f"{teacher_version}-*.safetensors"))) == 1
    # Same seed, data order and recipe as best_run: only the soft targets change the loss.
    reference = json.loads((best_run / "metrics.json").read_text())
    assert reference["teacher"] is None
    assert metrics["history"][0]["loss"] != pytest.approx(reference["history"][0]["loss"], rel=1e-2)
    assert export(out, tmp_path / "student.safetensors").is_file()


@pytest.mark.parametrize(
    "flag, value, error",
    [("--kd-weight", "1.5", "--kd-weight must be in [0, 1]"), ("--kd-temperature", "0", "--kd-temperature must be")],
)
def test_distillation_settings_are_checked(small_fer, tmp_path, capsys, flag, value, error):
    args = ["fit", "--data", str(small_fer), "--out", str(tmp_path / "run"), *TINY_FIT, "--teacher", "resnet9"]
    assert main([*args, flag, value]) == 2
    assert error in capsys.readouterr().err


def test_a_missing_teacher_is_named(small_fer, tmp_path, capsys):
    missing = tmp_path / "teacher.safetensors"
    assert (
        main(["fit", "--data", str(small_fer), "--out", str(tmp_path / "run"), *TINY_FIT, "--teacher", str(missing)])
        == 2
    )
    assert f"{missing} does not exist" in capsys.readouterr().err
