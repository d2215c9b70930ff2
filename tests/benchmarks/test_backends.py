"""benchmarks/backends.py on a tiny model and the test images: one row per backend and TTA, as text and JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import FER, REPO


def test_backend_benchmark_prints_and_writes_a_row_per_configuration(tiny_onnx, tmp_path):
    checkpoint = str(tiny_onnx["checkpoint"])
    args = ["--data", str(FER), "--models", checkpoint, "--configs", "torch/fp32", "onnxruntime/int8"]
    out = subprocess.run(
        [sys.executable, "benchmarks/backends.py", *args, "--batch1-faces", "8", "--json", str(tmp_path / "b.json")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    rows = re.findall(r"tiny\.safetensors +(\S+) +(\S+) +(\S+) +([\d.]+) +([\d.]+) +([\d.]+)", out.stdout)
    assert [r[:3] for r in rows] == [
        ("torch", "fp32", "none"),
        ("torch", "fp32", "flip"),
        ("onnxruntime", "int8", "none"),
        ("onnxruntime", "int8", "flip"),
    ], out.stdout
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["faces"] == 7 * 16 and report["reference"] is None  # no full model in this run
    for row, printed in zip(report["rows"], rows):
        assert row["faces_per_s_batch1"] > 0 and row["faces_per_s_batch64"] > 0
        assert row["n"] == 7 * 16 and f"{row['accuracy']:.4f}" == printed[5]
        assert row["version"] == "t1"
