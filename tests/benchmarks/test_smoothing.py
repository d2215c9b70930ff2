"""benchmarks/smoothing.py on the repository's few FER2013 faces and a tiny model: its report and its JSON."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import FER, REPO
from worker.model import CLASSES


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "benchmarks/smoothing.py", "--data", str(FER / "val"), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_smoothing_benchmark_reports_changes_per_class_and_delays_per_pair(tiny_checkpoint, tmp_path):
    out = run(
        "--weights", str(tiny_checkpoint), "--tta", "none", "--runs", "2", "--minutes", "1", "--change-s", "10",
        "--json", str(tmp_path / "s.json"), "--cache", str(tmp_path / "scores.npz"),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "model tiny-test t1, tta none" in out.stdout
    rows = re.findall(r"^(\w+) +(\d+) +([\d.]+)% +(\d+) +([\d.]+)", out.stdout, re.M)
    assert [r[0] for r in rows] == list(CLASSES)
    doc = json.loads((tmp_path / "s.json").read_text())
    assert doc["state"]["hold_s"] == 1.0 and doc["runs"] == 2
    for c, (_, faces, _, changes, per_min) in zip(CLASSES, rows):
        assert int(faces) == len(list((FER / "val" / c).glob("*.jpg")))
        assert doc["steady"][c]["changes"] == int(changes)
        assert doc["steady"][c]["minutes"] == 2
        assert doc["steady"][c]["per_min"] == float(per_min) == int(changes) / 2
    assert len(doc["changes"]) == len(CLASSES) * (len(CLASSES) - 1)
    for pair in doc["changes"].values():
        assert pair["missed"] + len(pair["delays_s"]) == 2
        assert all(0 <= d <= 10 for d in pair["delays_s"])
    assert "well recognised:" in out.stdout
    # A rerun reads the scores from the cache instead of classifying again.
    again = run(
        "--weights", str(tiny_checkpoint), "--tta", "none", "--runs", "2", "--minutes", "1", "--change-s", "10",
        "--json", str(tmp_path / "t.json"), "--cache", str(tmp_path / "scores.npz"),
    )  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert "read from " in again.stdout and "read from " not in out.stdout
    assert json.loads((tmp_path / "t.json").read_text())["steady"] == doc["steady"]


def test_smoothing_sweep_ranks_settings(tiny_checkpoint):
    out = run(
        "--weights", str(tiny_checkpoint), "--tta", "none", "--runs", "1", "--minutes", "0.5", "--change-s", "5",
        "--sweep", "--grid-time-constant", "0.5", "1", "--grid-min-confidence", "0", "--grid-margin", "0.1",
        "--grid-hold", "0.5",
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rows = re.findall(r"^ +([\d.]+) +0 +0\.1 +0\.5 +(\d+)", out.stdout, re.M)
    assert sorted(r[0] for r in rows) == ["0.5", "1"]
    changes = [int(r[1]) for r in rows]
    assert changes == sorted(changes)  # fewest false changes first
