"""benchmarks/pipeline.py, run for a second: each stage's figures, then frames through a worker and a real Mosquitto."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import REPO


def test_short_pipeline_benchmark_prints_stage_times_and_end_to_end_figures(tiny_checkpoint, tmp_path):
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
            "--json",
            str(tmp_path / "pipeline.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    for stage in ("decode JPEG", "Haar, detect_width  640", "Haar, detect_width  320", "classify 32 faces"):
        assert re.search(rf"{stage} +[\d.]+ ms", out.stdout), (stage, out.stdout)
    assert re.search(r"model: width 0.125, cpu, torch, (bf16|fp32), TTA none", out.stdout), out.stdout
    # Five frames offered at 5 frames/s are far below capacity: every one gets its event.
    assert "5 offered (5 frames/s, 5 frames): 5 processed, 0 lost (0 dropped, 0 stale)" in out.stdout, out.stdout
    p50, p95, p99, worst = map(
        float,
        re.search(r"p50 ([\d.]+) ms +p95 ([\d.]+) ms +p99 ([\d.]+) ms +max ([\d.]+) ms", out.stdout).groups(),
    )
    assert 0 < p50 <= p95 <= p99 <= worst

    report = json.loads((tmp_path / "pipeline.json").read_text())
    assert report["machine"]["cpus"] >= 1 and report["machine"]["cpu"]
    assert report["settings"] == {"EMOTION_MODEL__WEIGHTS": str(tiny_checkpoint), "EMOTION_MODEL__TTA": "none"}
    assert set(report["stages"]["haar_ms"]) == {"160", "240", "320", "480", "640"}
    assert report["stages"]["model"]["version"] == "t1" and report["stages"]["model"]["backend"] == "torch"
    (run,) = report["end_to_end"]
    assert (run["frames"], run["processed"], run["lost"], run["dropped"]) == (5, 5, 0, 0)
    assert run["latency_ms_p50"] == p50 and run["latency_ms_p99"] == p99
