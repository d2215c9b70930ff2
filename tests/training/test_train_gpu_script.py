"""training/gpu.sh, the one-shot script for a GPU machine, tried on the CPU with tiny settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from training.data import pack
from worker.model import CLASSES, load_checkpoint

SCRIPT = Path(__file__).resolve().parents[2] / "training" / "gpu.sh"


def run_script(data: Path, out: Path, **settings: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OUT": str(out),
        "PYTHON": sys.executable,
        "DEVICE": "cpu",
        "LIMIT": "300",
        "WIDTH": "0.125",
        **settings,
    }
    return subprocess.run(["bash", str(SCRIPT), str(data)], env=env, capture_output=True, text=True, timeout=300)


def test_gpu_script_trains_both_recipes_from_a_packed_file(small_fer, tmp_path):
    data = pack(small_fer, tmp_path / "fer.npz")
    out = tmp_path / "out"
    done = run_script(data, out, BEST_EPOCHS="1", SEED_EPOCHS="1")
    assert done.returncode == 0, done.stderr
    for recipe in ("best", "seed"):
        run = out / f"{recipe}-w0.125"
        info = load_checkpoint(run / "best.safetensors")[1]
        assert info.extra["recipe"] == recipe and info.width == 0.125
        assert {"curves.png", "confusion.png", "metrics.json"} <= {p.name for p in run.iterdir()}
        val = json.loads((run / "metrics.json").read_text())["val"]
        assert set(val) == {"none", "flip", "tencrop", "rotate"}
        assert val["tencrop"]["n"] > 0 and set(val["tencrop"]["per_class"]) <= set(CLASSES)
        assert "epoch   1/1" in (out / f"{recipe}-w0.125.log").read_text()
    assert "best: " in (out / "device.txt").read_text()
    recalibrated = out / "best-w0.125-bn"
    assert "recalibrated" in load_checkpoint(recalibrated / "best.safetensors")[1].extra
    metrics = json.loads((recalibrated / "metrics.json").read_text())
    assert metrics["val_before_recalibration"] == json.loads((out / "best-w0.125" / "metrics.json").read_text())["val"]


def test_gpu_script_stops_at_the_first_failure_naming_it(tmp_path):
    done = run_script(tmp_path / "nowhere", tmp_path / "out", BEST_EPOCHS="1", SEED_EPOCHS="1")
    assert done.returncode != 0
    assert "nowhere" in done.stdout + done.stderr
    assert not (tmp_path / "out" / "seed-w0.125.log").exists()
