"""Every frame the pipeline takes ends in exactly one outcome, sent to its reply topic when it asked for one."""

from __future__ import annotations

import base64
import json
import threading
import time

import jsonschema
import numpy as np
import pytest

from worker.classify import Classifier
from worker.config import load_settings
from worker.events import OUTCOME_SCHEMA, load_schema
from worker.faces import FaceDetector
from worker.frames import encode_jpeg
from worker.pipeline import Pipeline


class GatedClassifier:
    """The real classifier, which waits for ``gate`` before each batch."""

    def __init__(self, inner: Classifier):
        self.inner, self.info = inner, inner.info
        self.gate, self.entered = threading.Event(), threading.Event()
        self.gate.set()

    def predict(self, crops):
        self.entered.set()
        self.gate.wait()
        return self.inner.predict(crops)


@pytest.fixture
def pipeline(request, tiny_checkpoint, monkeypatch):
    """(pipeline, classifier, outcomes); ``@pytest.mark.parametrize("pipeline", [n], indirect=True)`` sets the queues."""
    for k in list(__import__("os").environ):
        if k.startswith("EMOTION_"):
            monkeypatch.delenv(k)
    settings = load_settings(
        None,
        model={"weights": tiny_checkpoint, "tta": "none"},
        pipeline={"stats_interval_s": 0, "queue_size": getattr(request, "param", 8), "threads": 1, "max_age_s": 5},
    )
    classifier = GatedClassifier(Classifier(settings.model))
    outcomes: list[tuple[dict, object]] = []
    p = Pipeline(
        settings,
        classifier,
        FaceDetector(settings.detector),
        lambda e: None,
        lambda e: None,
        report=lambda doc, reply: outcomes.append((doc, reply)),
    )
    p.start()
    yield p, classifier, outcomes
    p.stop()


def envelope(frame: np.ndarray, frame_id: str, **extra) -> bytes:
    return json.dumps({"image": base64.b64encode(encode_jpeg(frame)).decode(), "frame_id": frame_id, **extra}).encode()


def test_each_frame_gets_one_outcome_and_its_reply(pipeline, face_frames):
    p, classifier, outcomes = pipeline
    face = face_frames[0][0]
    blank = np.full((240, 320, 3), 128, np.uint8)
    p.submit("emotion/frames/a", envelope(face, "f1"), time.time(), ("r/mqtt5", b"c1"))  # MQTT 5 response topic
    p.submit("emotion/frames/a", envelope(blank, "f2", reply_to="r/env"), time.time())  # reply_to in the envelope
    p.submit("emotion/frames/a", b"not a picture", time.time(), ("r/bad", None))
    p.submit("emotion/frames/a", envelope(face, "f4"), time.time() - 60, ("r/old", None))  # arrived a minute ago
    p.submit("emotion/frames/a", envelope(face, "f5"), time.time())  # asks for nothing: outcome without reply
    assert p.drain(30)
    by_reply = {reply[0] if reply else None: doc for doc, reply in outcomes}
    assert len(outcomes) == 5
    assert by_reply["r/mqtt5"]["outcome"] == "event" and by_reply["r/mqtt5"]["event"]["frame_id"] == "f1"
    assert ("r/mqtt5", b"c1") in [reply for _, reply in outcomes]  # the correlation data goes back with it
    assert by_reply["r/env"]["outcome"] == "no_face"
    assert by_reply["r/env"]["message"] == "no face found (detector haar)" and by_reply["r/env"]["frame_id"] == "f2"
    assert by_reply["r/bad"]["outcome"] == "error" and by_reply["r/bad"]["error"]["reason"] == "not_an_image"
    assert by_reply["r/old"]["outcome"] == "stale" and "pipeline.max_age_s" in by_reply["r/old"]["message"]
    assert by_reply[None]["outcome"] == "event" and by_reply[None]["frame_id"] == "f5"
    schema = load_schema(OUTCOME_SCHEMA)
    for doc, _ in outcomes:
        jsonschema.validate(doc, schema)


@pytest.mark.parametrize("pipeline", [1], indirect=True)
def test_a_dropped_frame_is_answered_too(pipeline, face_frames):
    p, classifier, outcomes = pipeline
    classifier.gate.clear()  # hold inference: the next frames queue up behind it (queues of one)
    face = envelope(face_frames[0][0], "first")
    p.submit("emotion/frames/b", face, time.time())
    assert classifier.entered.wait(20)
    for i in range(4):
        p.submit("emotion/frames/b", envelope(face_frames[0][0], f"q{i}"), time.time(), (f"r/q{i}", None))
        time.sleep(0.3)
    classifier.gate.set()
    assert p.drain(30)
    kinds = [doc["outcome"] for doc, _ in outcomes]
    assert len(outcomes) == 5 and "dropped" in kinds
    dropped = next(doc for doc, _ in outcomes if doc["outcome"] == "dropped")
    assert "pipeline.queue_size" in dropped["message"]
    assert p.stats.snapshot()["dropped"] == kinds.count("dropped")
    answered = {reply[0] for _, reply in outcomes if reply}
    assert answered == {f"r/q{i}" for i in range(4)}, "a queued frame went unanswered"
