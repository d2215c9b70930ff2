"""The heartbeat, its file, `emotion-worker health`, and the watchdog pings that depend on it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.worker.test_systemd import FakeNotifySocket
from worker.classify import Classifier
from worker.config import HealthSettings, load_settings
from worker.faces import FaceDetector
from worker.frames import encode_jpeg
from worker.health import HealthReporter, Heartbeat, check, heartbeat_path, write_heartbeat
from worker.pipeline import Pipeline


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def test_heartbeat_age_is_that_of_the_stage_that_beat_least_recently():
    clock = Clock()
    hb = Heartbeat(("prepare", "inference"), clock=clock)
    clock.now += 3
    assert hb.age() == 3
    hb.beat("prepare")
    assert hb.age() == 3 and hb.stalest() == "inference"
    clock.now += 2
    hb.beat("inference")
    assert hb.age() == 2 and hb.stalest() == "prepare"


def test_heartbeat_path_prefers_the_setting_then_systemds_runtime_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(tmp_path / "run"))
    assert heartbeat_path(tmp_path / "mine") == tmp_path / "mine"
    assert heartbeat_path(None) == tmp_path / "run" / "heartbeat"
    monkeypatch.delenv("RUNTIME_DIRECTORY")
    default = heartbeat_path(None)
    assert default.name == "heartbeat" and default.parent.name.startswith("emotion-worker-")


def test_check_reads_the_age_from_the_file(tmp_path):
    path = tmp_path / "heartbeat"
    ok, message = check(path, 30)
    assert not ok and "no heartbeat file" in message and str(path) in message
    write_heartbeat(path, {"pid": 1, "beat_monotonic": 100.0, "connected": True})
    ok, message = check(path, 30, now=110.0)
    assert ok and message.startswith("healthy: heartbeat 10.0 s ago (limit 30 s)")
    ok, message = check(path, 30, now=140.5)
    assert not ok and "no progress for 40.5 s (limit 30 s, health.max_age_s)" in message
    write_heartbeat(path, {"starting": True})
    ok, message = check(path, 30)
    assert not ok and "still starting" in message
    path.write_text("{half a fi")
    ok, message = check(path, 30)
    assert not ok and "cannot read the heartbeat file" in message


def test_a_heartbeat_from_an_earlier_boot_is_not_healthy(tmp_path):
    if not Path("/proc/sys/kernel/random/boot_id").is_file():
        pytest.skip("needs Linux's boot id")
    path = tmp_path / "heartbeat"
    write_heartbeat(path, {"beat_monotonic": time.monotonic(), "boot_id": "not-this-boot"})
    ok, message = check(path, 30)
    assert not ok and "before the last boot" in message


def test_watchdog_pings_stop_while_the_heartbeat_is_stale_and_resume_after(tmp_path, monkeypatch, json_log):
    fake = FakeNotifySocket(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", fake.address)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    clock = Clock()
    heartbeat = Heartbeat(("prepare", "inference"), clock=clock)
    ready = threading.Event()
    settings = HealthSettings(max_age_s=1.0, heartbeat_file=tmp_path / "hb")
    reporter = HealthReporter(settings, heartbeat, ready=ready.is_set, status=lambda: "testing")
    received: list[str] = []

    def drain() -> None:
        fake.sock.settimeout(0)
        try:
            while True:
                received.append(fake.receive())
        except BlockingIOError:
            pass

    def written() -> dict:
        try:
            return json.loads(settings.heartbeat_file.read_text())
        except (OSError, ValueError):
            return {}

    reporter.start()
    try:
        wait_until(lambda: (drain(), "WATCHDOG=1" in received)[1], 10, "watchdog ping")
        assert not any("READY=1" in m for m in received), "READY before the worker is ready"
        ready.set()
        wait_until(lambda: (drain(), any("READY=1" in m for m in received))[1], 10, "READY=1")

        clock.now += 5  # the inference stage has been stuck for 5 s
        first = wait_until(lambda: (w := written()).get("fresh") is False and w, 10, "stale heartbeat file")
        drain()
        received.clear()
        # A whole write interval later, every turn of the loop in between has seen the stale heartbeat.
        wait_until(lambda: written().get("written_at", 0) > first["written_at"], 10, "next heartbeat write")
        drain()
        assert "WATCHDOG=1" not in received, received
        assert check(settings.heartbeat_file, settings.max_age_s, now=clock.now)[0] is False

        heartbeat.beat("prepare")
        heartbeat.beat("inference")
        wait_until(lambda: (drain(), "WATCHDOG=1" in received)[1], 10, "watchdog ping after recovery")
        reporter.stopping()
        wait_until(lambda: (drain(), any("STOPPING=1" in m for m in received))[1], 10, "STOPPING=1")
    finally:
        reporter.stop()
        fake.close()
    assert not settings.heartbeat_file.exists(), "the heartbeat file outlived the worker"
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    stuck = [r for r in records if r["event"].startswith("the pipeline is stuck")]
    assert len(stuck) == 1 and stuck[0]["level"] == "error" and stuck[0]["age_s"] == 5.0
    assert "watchdog will restart" in stuck[0]["event"]
    assert any(r["event"] == "the pipeline makes progress again" for r in records)


class GatedClassifier:
    """The real classifier, held at a gate: a stuck inference stage."""

    def __init__(self, inner: Classifier):
        self.inner, self.info = inner, inner.info
        self.gate, self.entered = threading.Event(), threading.Event()

    def predict(self, crops):
        self.entered.set()
        self.gate.wait()
        return self.inner.predict(crops)


def test_the_pipeline_heartbeat_stays_fresh_while_idle_and_ages_while_inference_is_stuck(
    tiny_checkpoint, face_frames, monkeypatch
):
    for k in list(__import__("os").environ):
        if k.startswith("EMOTION_"):
            monkeypatch.delenv(k)
    settings = load_settings(None, model={"weights": tiny_checkpoint, "tta": "none"}, pipeline={"stats_interval_s": 0})
    classifier = GatedClassifier(Classifier(settings.model))
    events: list[dict] = []
    pipeline = Pipeline(settings, classifier, FaceDetector(settings.detector), events.append, lambda e: None)
    pipeline.start()
    try:
        # Idle: both stages find nothing to do ten times a second.
        ages = []
        for _ in range(15):
            time.sleep(0.1)
            ages.append(pipeline.heartbeat.age())
        assert max(ages) < 2.0, ages

        pipeline.submit("emotion/frames/kitchen", encode_jpeg(face_frames[0][0]), time.time())
        assert classifier.entered.wait(20)
        wait_until(lambda: pipeline.heartbeat.age() > 3.0, 30, "the heartbeat to age past 3 s")
        assert pipeline.heartbeat.stalest() == "inference"

        classifier.gate.set()
        assert pipeline.drain(20)
        wait_until(lambda: pipeline.heartbeat.age() < 1.0, 10, "a fresh heartbeat after inference resumed")
        assert len(events) == 1
    finally:
        classifier.gate.set()
        pipeline.stop()
    # One batch went through the pipeline (the classifier's warm-up at load is not the pipeline's).
    assert pipeline.stats.histogram("inference_seconds")[0][-1][1] == 1
    assert pipeline.stats.histogram("batch_faces")[0][-1][1] == 1
    assert pipeline.stats.counts["processed"] == 1


def health_cli(env, *args, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "health", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_health_command_exits_0_or_1_from_the_heartbeat_file(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "RUNTIME_DIRECTORY": str(tmp_path), "EMOTION_HEALTH__MAX_AGE_S": "30"}
    out = health_cli(env)
    assert out.returncode == 1 and "no heartbeat file" in out.stderr
    write_heartbeat(tmp_path / "heartbeat", {"pid": 1, "beat_monotonic": time.monotonic(), "connected": True})
    out = health_cli(env)
    assert out.returncode == 0 and out.stdout.startswith("healthy"), out
    write_heartbeat(tmp_path / "heartbeat", {"pid": 1, "beat_monotonic": time.monotonic() - 60})
    out = health_cli(env)
    assert out.returncode == 1 and "unhealthy: no progress for 6" in out.stderr, out
    # A configuration error is unhealthy too: Docker reserves exit status 2 of a health check.
    out = health_cli({**env, "EMOTION_HEALTH__MAX_AGE_S": "soon"})
    assert out.returncode == 1 and "health.max_age_s" in out.stderr


def test_health_command_does_not_import_torch(tmp_path):
    code = "import sys; from worker.cli import main; main(['health']); print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PATH": "/usr/bin:/bin", "RUNTIME_DIRECTORY": str(tmp_path)},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.stdout.strip() == "False", out
