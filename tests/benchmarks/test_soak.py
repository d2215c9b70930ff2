"""benchmarks/soak.py, run for a few seconds: it drives a real worker and reports what that worker counted."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests.conftest import REPO, needs_proc


@needs_proc
def test_short_soak_reports_memory_and_the_workers_counts(tiny_checkpoint):
    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/soak.py",
            "--minutes",
            "0.25",
            "--fps",
            "20",
            "--sample-s",
            "3",
            "--warmup-s",
            "3",
            "--broker-restarts",
            "1",
            "--weights",
            str(tiny_checkpoint),
            "--tta",
            "none",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    samples = [line.split() for line in out.stdout.splitlines() if re.fullmatch(r"\s*\d+( +[\d.]+){6}", line)]
    assert len(samples) >= 4 and all(float(s[4]) > 50 for s in samples)  # RSS in MB: torch alone is more
    assert re.search(r"MB an hour, [+-][\d.]+ KB per 1,000 frames", out.stdout)
    code, counts = re.search(r"worker exit code (-?\d+); its counts: (\{.*\})", out.stdout).groups()
    counts = json.loads(counts)
    assert code == "0"
    # Every bad kind in the mix was rejected under its own reason, and the worker kept serving faces.
    assert set(counts["rejected_by_reason"]) == {"truncated_image", "bad_json", "payload_too_large"}
    assert counts["events"] > 0 and counts["no_face"] > 0
    # Every frame received is accounted for: an event, no face, rejected, or shed when behind or too old.
    outcomes = ("events", "no_face", "rejected", "dropped", "stale")
    assert counts["received"] == sum(counts.get(k, 0) for k in outcomes), counts
