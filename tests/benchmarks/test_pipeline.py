"""benchmarks/pipeline.py, run for a second: each stage's figures, then frames through a real Mosquitto."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.conftest import REPO


def test_short_pipeline_benchmark_prints_stage_times_and_end_to_end_figures(tiny_checkpoint):
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/pipeline.py",
            "--weights",
            str(tiny_checkpoint),
            "--seconds",
            "1",
            "--fps",
            "5",
            "--tta",
            "none",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for stage in ("decode JPEG", "Haar, detect_width  640", "Haar, detect_width  320", "classify 32 faces"):
        assert re.search(rf"{stage} +[\d.]+ ms", out.stdout), (stage, out.stdout)
    assert "model: width 0.125, cpu" in out.stdout
    # Five frames offered at 5 frames/s are far below capacity: every one gets its event.
    assert (
        "end to end through Mosquitto, MQTT 5: 5 frames 5 frames/s offered, 5 events, 0 dropped, 0 stale" in out.stdout
    ), out.stdout
    p50, p95, worst = map(
        float, re.search(r"latency +p50 +([\d.]+) ms +p95 +([\d.]+) ms +max +([\d.]+) ms", out.stdout).groups()
    )
    assert 0 < p50 <= p95 <= worst
