"""benchmarks/model.py, on tiny networks: inference and training rates with both ELUs."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def test_model_benchmark_prints_both_rates_for_each_width_and_elu():
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/model.py",
            "--width",
            "0.125",
            "0.25",
            "--stages",
            "8,16,24",
            "--batch",
            "4",
            "--steps",
            "1",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.startswith("device cpu, precision torch.bfloat16, batch 4")
    rows = re.findall(
        r"((?:width|stages) \S+) +(ELU|nn\.ELU) +inference +([\d.]+) images/s +training +([\d.]+) images/s", out.stdout
    )
    assert [(w, elu) for w, elu, _, _ in rows] == [
        ("width 0.125", "ELU"),
        ("width 0.125", "nn.ELU"),
        ("width 0.25", "ELU"),
        ("width 0.25", "nn.ELU"),
        ("stages 8,16,24", "ELU"),
        ("stages 8,16,24", "nn.ELU"),
    ], out.stdout
    assert all(float(inference) > 0 and float(training) > 0 for _, _, inference, training in rows)
