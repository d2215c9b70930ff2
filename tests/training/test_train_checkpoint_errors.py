"""Checkpoints that do not describe their weights are refused with an error naming file and problem."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import save_file

from training.cli import main
from training.export import export
from worker.model import CheckpointError, ModelInfo, ResNet9, load_checkpoint, read_info


def write(path, model: ResNet9, metadata: dict[str, str] | None):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def tiny() -> ResNet9:
    torch.manual_seed(0)
    return ResNet9(width=0.125)


def good_metadata() -> dict[str, str]:
    return ModelInfo(width=0.125).to_metadata()


def refused(path, *problem: str) -> str:
    """Assert load_checkpoint refuses ``path`` with a message naming it and each ``problem``; return it."""
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert str(path) in message
    for part in problem:
        assert part in message, message
    return message


def test_a_good_checkpoint_loads(tiny, tmp_path):
    # The files below differ from this one only in what each test breaks.
    model, info = load_checkpoint(write(tmp_path / "good.safetensors", tiny, good_metadata()))
    assert info.width == 0.125 and len(info.classes) == 7
    assert torch.equal(model.classifier[-1].weight, tiny.classifier[-1].weight)


def test_metadata_without_format(tiny, tmp_path):
    meta = good_metadata()
    del meta["format"]
    refused(
        write(tmp_path / "noformat.safetensors", tiny, meta),
        "not an emotion model checkpoint",
        "'format' is None",
        "'emotion-resnet9'",
    )


def test_no_metadata_at_all(tiny, tmp_path):
    refused(write(tmp_path / "bare.safetensors", tiny, None), "not an emotion model checkpoint")


def test_classes_list_shorter_than_the_outputs(tiny, tmp_path):
    meta = good_metadata()
    meta["classes"] = json.dumps(["angry", "happy", "neutral", "sad", "surprise"])
    refused(
        write(tmp_path / "five.safetensors", tiny, meta),
        "do not match a ResNet9 of width 0.125 with 5 classes",
        "classifier.2.weight has shape (7, 64), expected (5, 64)",
    )


def test_width_that_does_not_match_the_tensors(tiny, tmp_path):
    meta = good_metadata()
    meta["width"] = "0.25"
    refused(
        write(tmp_path / "wide.safetensors", tiny, meta),
        "do not match a ResNet9 of width 0.25",
        "has shape (16, 1, 3, 3), expected (32, 1, 3, 3)",
    )


def test_malformed_metadata_values(tiny, tmp_path):
    meta = good_metadata()
    meta["normalization"] = "{not json"
    refused(write(tmp_path / "norm.safetensors", tiny, meta), "metadata is incomplete or malformed")
    meta = good_metadata()
    meta["classes"] = json.dumps(["happy", "happy", "sad"])
    refused(write(tmp_path / "dupes.safetensors", tiny, meta), "class names must be distinct")
    meta = good_metadata()
    meta["input_size"] = "64"
    refused(write(tmp_path / "size.safetensors", tiny, meta), "input size 64 is not supported")


def test_missing_tensor(tiny, tmp_path):
    state = {k: v for k, v in tiny.state_dict().items() if k != "conv1.0.weight"}
    save_file(state, str(tmp_path / "partial.safetensors"), metadata=good_metadata())
    refused(tmp_path / "partial.safetensors", "missing ['conv1.0.weight']")


def test_pickle_written_by_torch_save(tiny, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(tiny.state_dict(), path)
    refused(path, "not a readable safetensors file")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_info(path)


def test_truncated_file(tiny, tmp_path):
    good = write(tmp_path / "good.safetensors", tiny, good_metadata())
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    refused(cut)


def test_missing_file_and_a_folder(tmp_path):
    refused(tmp_path / "absent.safetensors", "does not exist")
    refused(tmp_path, "is not a file")


def test_commands_report_a_bad_checkpoint_and_fail(tiny, tmp_path, capsys):
    meta = good_metadata()
    meta["width"] = "0.25"
    bad = write(tmp_path / "wide.safetensors", tiny, meta)
    (tmp_path / "faces" / "happy").mkdir(parents=True)
    assert main(["evaluate", "--device", "cpu", "--weights", str(bad), "--data", str(tmp_path / "faces")]) == 2
    assert f"emotion-train evaluate: {bad}: tensors do not match" in capsys.readouterr().err
    assert main(["export", "--run", str(bad), "--to", str(tmp_path / "out.safetensors")]) == 2
    assert f"emotion-train export: {bad}: tensors do not match" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()
    with pytest.raises(CheckpointError):
        export(bad, tmp_path / "out.safetensors")
