"""Queues, batching, shedding and draining of the pipeline, without a broker."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from worker.classify import Classifier
from worker.config import load_settings
from worker.faces import FaceDetector
from worker.frames import encode_jpeg
from worker.pipeline import DropOldestQueue, Pipeline


def test_drop_oldest_queue_keeps_the_newest():
    q = DropOldestQueue(3)
    dropped = [q.put(i) for i in range(5)]
    assert dropped == [None, None, None, 0, 1]
    assert [q.get(0.01) for _ in range(4)] == [2, 3, 4, None]


class SlowClassifier:
    """The real classifier, made slow, recording the batch sizes it was given."""

    def __init__(self, inner: Classifier, delay_s: float):
        self.inner, self.delay_s, self.batches = inner, delay_s, []
        self.info = inner.info
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()

    def predict(self, crops):
        self.entered.set()
        self.gate.wait()
        self.batches.append(len(crops))
        time.sleep(self.delay_s)
        return self.inner.predict(crops)


@pytest.fixture
def make_pipeline(tiny_checkpoint, monkeypatch):
    for k in list(__import__("os").environ):
        if k.startswith("EMOTION_"):
            monkeypatch.delenv(k)
    made = []

    def make(delay_s=0.0, **pipeline):
        settings = load_settings(
            None,
            model={"weights": tiny_checkpoint, "tta": "none", "batch_size": 8, "max_wait_ms": 50},
            pipeline={"stats_interval_s": 0, **pipeline},
        )
        classifier = SlowClassifier(Classifier(settings.model), delay_s)
        events, errors = [], []
        p = Pipeline(settings, classifier, FaceDetector(settings.detector), events.append, errors.append)
        p.start()
        made.append(p)
        return p, classifier, events, errors

    yield make
    for p in made:
        p.stop()


def test_faces_of_several_frames_are_classified_in_one_batch(make_pipeline, face_frames):
    pipeline, classifier, events, errors = make_pipeline(threads=2)
    classifier.gate.clear()  # hold inference: the first frame occupies it while the others queue up
    jpeg = encode_jpeg(face_frames[0][0])
    pipeline.submit("emotion/frames/kitchen", jpeg, time.time())
    assert classifier.entered.wait(20)
    for _ in range(4):
        pipeline.submit("emotion/frames/kitchen", jpeg, time.time())
    deadline = time.monotonic() + 20
    while len(pipeline.ready) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    classifier.gate.set()
    assert pipeline.drain(20)
    assert len(events) == 5 and not errors
    assert classifier.batches == [1, 4]


def test_when_behind_the_oldest_frames_are_dropped_and_counted(make_pipeline, face_frames):
    pipeline, classifier, events, errors = make_pipeline(delay_s=0.3, queue_size=2, threads=1)
    jpegs = [encode_jpeg(face_frames[i % len(face_frames)][0]) for i in range(20)]
    for jpeg in jpegs:
        pipeline.submit("emotion/frames/kitchen", jpeg, time.time())
    assert pipeline.drain(30)
    stats = pipeline.stats.snapshot()
    assert stats["received"] == 20
    assert stats["dropped"] > 0
    assert stats["events"] + stats["dropped"] == 20
    assert len(events) == stats["events"] < 20
    assert not errors


def test_frames_older_than_max_age_are_skipped(make_pipeline, face_frames):
    pipeline, classifier, events, errors = make_pipeline(max_age_s=1.0)
    jpeg = encode_jpeg(face_frames[0][0])
    pipeline.submit("emotion/frames/kitchen", jpeg, time.time() - 5)
    pipeline.submit("emotion/frames/kitchen", jpeg, time.time())
    assert pipeline.drain(20)
    assert pipeline.stats.snapshot()["stale"] == 1
    assert len(events) == 1


def fail_first(fn, message):
    """``fn``, except that its first call raises RuntimeError(message)."""
    calls = {"n": 0}

    def wrapped(*args):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError(message)
        return fn(*args)

    return wrapped


def submit_one_by_one(pipeline, topic, payload, n):
    """Submit ``payload`` ``n`` times, each after the one before has been handled."""
    for _ in range(n):
        pipeline.submit(topic, payload, time.time())
        assert pipeline.drain(20)


def test_an_internal_error_costs_one_frame_not_the_worker(make_pipeline, face_frames):
    pipeline, classifier, events, errors = make_pipeline()
    classifier.inner.predict = fail_first(classifier.inner.predict, "boom")
    jpeg = encode_jpeg(face_frames[0][0])
    submit_one_by_one(pipeline, "emotion/frames/kitchen", jpeg, 2)
    assert [e["reason"] for e in errors] == ["internal"]
    assert "boom" in errors[0]["message"]
    assert len(events) == 1


@pytest.mark.parametrize("with_face", [True, False], ids=["face", "no-face"])
def test_a_failed_publish_costs_that_frame_not_the_thread(make_pipeline, face_frames, with_face):
    # Events of frames with faces are published by the inference thread, those of faceless
    # frames (publish_empty) by a prepare thread.
    pipeline, classifier, events, errors = make_pipeline(threads=1, publish_empty=True)
    pipeline.publish_event = fail_first(events.append, "broker gone")
    image = face_frames[0][0] if with_face else np.full((120, 160, 3), 128, np.uint8)
    submit_one_by_one(pipeline, "emotion/frames/hall", encode_jpeg(image), 2)
    assert [e["reason"] for e in errors] == ["internal"]
    assert "publish failed" in errors[0]["message"] and "broker gone" in errors[0]["message"]
    assert len(events) == 1
    assert bool(events[0]["faces"]) == with_face
