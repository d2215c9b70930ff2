"""The training commands report a checkpoint that does not describe its weights, and fail.

The checkpoint checks themselves are tested in tests/worker/test_model.py.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from training.cli import main
from training.export import export
from worker.model import CheckpointError, ModelInfo, ResNet9


def write(path, model: ResNet9, metadata: dict[str, str] | None):
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def tiny() -> ResNet9:
    torch.manual_seed(0)
    return ResNet9(width=0.125)


def good_metadata() -> dict[str, str]:
    return ModelInfo(width=0.125).to_metadata()


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
