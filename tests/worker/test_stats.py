"""The periodic stats document, and the pipeline counts it reads."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from worker.classify import Classifier
from worker.config import load_settings
from worker.faces import FaceDetector
from worker.frames import encode_jpeg
from worker.pipeline import Pipeline
from worker.stats import IntervalStats, Stats, StatsReporter, percentile


def test_percentile_is_the_nearest_rank():
    values = sorted(float(v) for v in range(1, 101))
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.95) == 95
    assert percentile(values, 0.99) == 99
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_stats_document_counts_since_start_and_rates_over_the_interval():
    stats, interval, clock = Stats(), IntervalStats(), Clock()
    published = []
    context = {"queue_depth": 3, "device": "cpu", "precision": "bf16", "model": {"name": "m", "version": "v"}}
    reporter = StatsReporter(
        stats, interval, 60, lambda: {**context, "detector": "haar"}, published.append, clock=clock
    )
    stats.add("received", 130)
    stats.add("processed", 120)
    stats.add("dropped", 4)
    stats.add("stale", 1)
    stats.add("events", 100)
    stats.add("faces", 110)
    stats.add("state_changes", 2)
    stats.reject("bad_json")
    stats.reject("bad_json")
    stats.reject("too_large")
    for ms in range(1, 101):
        interval.latency(float(ms))
    interval.batch(4)
    interval.batch(2)
    clock.t += 60
    doc = reporter.report()
    assert published == [doc]
    assert doc["uptime_s"] == 60 and doc["interval_s"] == 60
    assert doc["frames"] == {
        "received": 130,
        "processed": 120,
        "dropped": 4,
        "stale": 1,
        "no_face": 0,
        "rejected": 3,
        "rejected_by_reason": {"bad_json": 2, "too_large": 1},
    }
    assert doc["events"] == 100 and doc["faces"] == 110
    assert doc["frames_per_s"] == 2.0
    assert doc["latency_ms"] == {"p50": 50.0, "p95": 95.0, "p99": 99.0}
    assert doc["batch_mean"] == 3.0
    assert doc["queue_depth"] == 3 and doc["device"] == "cpu" and doc["precision"] == "bf16"
    assert doc["model"] == {"name": "m", "version": "v"} and doc["detector"] == "haar"
    assert doc["counts"] == {"state_changes": 2}
    assert doc["publishes_dropped_by_reason"] == {}
    stats.publish_dropped("emotion/events", 3, reason="queue_full")
    doc = reporter.report()
    assert doc["counts"]["publishes_dropped"] == 3
    assert doc["publishes_dropped_by_reason"] == {"queue_full": {"emotion/events": 3}}

    # The next interval: rates and latencies of that interval only.
    stats.add("processed", 30)
    clock.t += 10
    doc = reporter.report()
    assert doc["uptime_s"] == 70 and doc["frames_per_s"] == 3.0 and doc["frames"]["processed"] == 150
    assert doc["latency_ms"] == {"p50": None, "p95": None, "p99": None} and doc["batch_mean"] is None


def test_a_failing_stats_publish_is_counted():
    stats = Stats()

    def fail(doc):
        raise ConnectionError("broker away")

    reporter = StatsReporter(stats, IntervalStats(), 60, dict, fail)
    reporter.report()
    assert stats.snapshot()["stats_publish_errors"] == 1


def test_stats_interval_zero_starts_no_thread():
    reporter = StatsReporter(Stats(), IntervalStats(), 0, dict)
    reporter.start()
    assert reporter._thread is None
    reporter.stop()


@pytest.fixture
def settings(tiny_checkpoint, monkeypatch):
    for k in list(os.environ):
        if k.startswith("EMOTION_"):
            monkeypatch.delenv(k)
    return load_settings(
        None,
        model={"weights": tiny_checkpoint, "tta": "none"},
        pipeline={"stats_interval_s": 0, "publish_events": False},
    )


def test_without_events_frames_still_reach_the_state_and_the_counts(settings, face_frames):
    observed, events = [], []
    pipeline = Pipeline(
        settings,
        Classifier(settings.model),
        FaceDetector(settings.detector),
        events.append,
        lambda e: None,
        observe=lambda frame, faces: observed.append((frame.device_id, len(faces))),
    )
    pipeline.start()
    try:
        pipeline.submit("emotion/frames/kitchen", encode_jpeg(face_frames[0][0]), time.time())
        pipeline.submit("emotion/frames/hall", encode_jpeg(np.full((240, 320, 3), 90, np.uint8)), time.time())
        assert pipeline.drain(30)
    finally:
        pipeline.stop()
    assert events == []
    assert sorted(observed) == [("hall", 0), ("kitchen", 1)]
    snap = pipeline.stats.snapshot()
    assert snap["processed"] == 2 and snap["no_face"] == 1 and snap.get("events", 0) == 0
    latencies, batches, faces = pipeline.interval.take()
    assert len(latencies) == 1 and batches == 1 and faces == 1
