"""The steady per-camera state: smoothing, hysteresis and what is published, on synthetic scores and a fake clock."""

from __future__ import annotations

import math
from datetime import datetime

import pytest

from worker.config import StateSettings
from worker.model import CLASSES
from worker.state import StateTracker, combine_faces
from worker.stats import Stats

MODEL = {"name": "test-model", "version": "v1"}
BOX = [10, 10, 100, 100]


def scores(**given: float) -> dict:
    """All seven classes, the rest of the probability spread evenly over the classes not given."""
    rest = (1.0 - sum(given.values())) / (len(CLASSES) - len(given))
    return {c: given.get(c, rest) for c in CLASSES}


def face(box=BOX, **given: float) -> dict:
    return {"box": list(box), "scores": scores(**given)}


class Clock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class Recorder:
    """A tracker on a fake clock that records what it publishes and what its listeners see."""

    def __init__(self, **settings):
        self.clock = Clock()
        self.start = self.clock.t
        self.states: list[tuple[str, dict]] = []
        self.changes: list[dict] = []
        self.seen: list[tuple[dict, dict | None, float]] = []
        self.stats = Stats()
        self.tracker = StateTracker(
            StateSettings(**settings),
            CLASSES,
            MODEL,
            publish_state=lambda device, doc: self.states.append((device, doc)),
            publish_change=self.changes.append,
            clock=self.clock,
            stats=self.stats,
        )
        self.tracker.add_listener(lambda state, change, now: self.seen.append((state, change, now)))

    def frame(self, at: float, *faces: dict, device: str = "kitchen") -> dict:
        """One frame ``at`` seconds after the start."""
        self.clock.t = self.start + at
        return self.tracker.observe(device, list(faces))

    def tick(self, at: float) -> None:
        self.clock.t = self.start + at
        self.tracker.tick()

    def to(self) -> list[str]:
        return [c["to"] for c in self.changes]

    def change_times(self) -> list[float]:
        return [round(datetime.fromisoformat(c["at"]).timestamp() - self.start, 3) for c in self.changes]


SETTINGS = dict(time_constant_s=0.5, min_confidence=0.3, margin=0.1, hold_s=1.0, absent_after_s=5.0)


def test_no_flap_when_two_classes_alternate_55_45():
    r = Recorder(**SETTINGS)
    for i in range(5 * 120):  # two minutes at 5 frames/s
        lead, other = ("sad", "neutral") if i % 2 else ("neutral", "sad")
        r.frame(i * 0.2, face(**{lead: 0.55, other: 0.45}))
    assert len(r.changes) == 1, r.changes
    assert r.changes[0]["from"] == "none" and r.changes[0]["to"] in ("sad", "neutral")


def test_no_flap_at_55_45_even_without_smoothing():
    r = Recorder(**{**SETTINGS, "time_constant_s": 0.0})
    for i in range(5 * 120):
        lead, other = ("sad", "neutral") if i % 2 else ("neutral", "sad")
        r.frame(i * 0.2, face(**{lead: 0.55, other: 0.45}))
    assert len(r.changes) == 1, r.changes


def test_a_real_change_shows_after_hold_s_and_a_shorter_blip_does_not():
    r = Recorder(**{**SETTINGS, "time_constant_s": 0.0})
    t = 0.0
    while t < 10:
        r.frame(t, face(happy=0.9))
        t = round(t + 0.2, 3)
    assert r.to() == ["happy"]
    while t < 10.8:  # 0.8 s of sad: shorter than hold_s
        r.frame(t, face(sad=0.9))
        t = round(t + 0.2, 3)
    while t < 15:
        r.frame(t, face(happy=0.9))
        t = round(t + 0.2, 3)
    assert r.to() == ["happy"], "a lead shorter than hold_s changed the state"
    switch = t
    while t < 20:
        r.frame(t, face(sad=0.9))
        t = round(t + 0.2, 3)
    assert r.to() == ["happy", "sad"]
    assert r.change_times()[1] == pytest.approx(switch + 1.0)  # the first frame hold_s after the lead began
    change = r.changes[1]
    assert change["from"] == "happy" and change["confidence"] == pytest.approx(0.9)
    assert change["held_s"] == pytest.approx(switch + 1.0 - r.change_times()[0])


def test_a_smoothed_change_takes_the_time_constant_then_hold_s():
    r = Recorder(**SETTINGS)
    for i in range(50):
        r.frame(i * 0.2, face(happy=0.8, sad=0.1))
    for i in range(50, 100):
        r.frame(i * 0.2, face(sad=0.8, happy=0.1))
    assert r.to() == ["happy", "sad"]
    # Counted from the last happy frame (9.8 s), sad leads happy by the margin once exp(-t/tau) < (0.7 - 0.1) / 1.4;
    # it must then lead for hold_s, checked at the frames (every 0.2 s).
    lead_from = 0.5 * math.log(1.4 / 0.6) - 0.2
    delay = r.change_times()[1] - 10.0
    assert lead_from + 1.0 <= delay <= lead_from + 1.0 + 0.2 + 1e-6


def test_a_new_emotion_needs_min_confidence_and_margin():
    r = Recorder(**{**SETTINGS, "time_constant_s": 0.0, "min_confidence": 0.5, "margin": 0.2})
    for i in range(20):
        r.frame(i * 0.2, face(happy=0.6, sad=0.2))
    for i in range(20, 60):  # sad leads, but only by 0.15
        r.frame(i * 0.2, face(sad=0.55, happy=0.4))
    for i in range(60, 100):  # sad leads by 0.3, but is below min_confidence
        r.frame(i * 0.2, face(sad=0.45, happy=0.15))
    assert r.to() == ["happy"]
    for i in range(100, 120):
        r.frame(i * 0.2, face(sad=0.7, happy=0.2))
    assert r.to() == ["happy", "sad"]


def test_none_after_absent_after_s_without_a_face():
    r = Recorder(**SETTINGS)
    for i in range(20):
        r.frame(i * 0.2, face(surprise=0.9))
    last_face = 19 * 0.2
    t = last_face
    while t < last_face + 4.8:  # frames without a face, shorter than absent_after_s
        t = round(t + 0.2, 3)
        r.frame(t)
    assert r.to() == ["surprise"]
    assert r.tracker.state("kitchen")["faces"] == 0
    r.frame(round(last_face + 5.0, 3))
    assert r.to() == ["surprise", "none"]
    change = r.changes[-1]
    assert change["from"] == "surprise" and change["confidence"] == 0
    assert change["held_s"] == pytest.approx(last_face + 5.0 - r.change_times()[0])
    state = r.states[-1][1]
    assert state["emotion"] == "none" and state["confidence"] == 0 and state["faces"] == 0


def test_none_from_the_ticks_when_a_camera_stops_sending():
    r = Recorder(**SETTINGS)
    for i in range(20):
        r.frame(i * 0.2, face(angry=0.9))
    r.tick(3.8 + 4.9)
    assert r.to() == ["angry"]
    published = len(r.states)
    r.tick(3.8 + 5.0)
    assert r.to() == ["angry", "none"]
    assert len(r.states) == published + 1 and r.states[-1][1]["emotion"] == "none"
    r.tick(20)  # nothing new: nothing published
    assert len(r.states) == published + 1


def test_leaving_none_takes_a_face_seen_for_hold_s():
    r = Recorder(**SETTINGS)
    r.frame(0.0, face(happy=0.9))
    r.frame(0.6, face(happy=0.9))
    assert r.to() == []
    assert r.tracker.state("kitchen")["emotion"] == "none"
    r.frame(1.0, face(happy=0.9))
    assert r.to() == ["happy"]
    assert r.changes[0]["from"] == "none"
    # A face seen once long ago does not count towards the next one.
    r2 = Recorder(**SETTINGS)
    r2.frame(0.0, face(happy=0.9))
    r2.tick(6.0)
    r2.frame(20.0, face(happy=0.9))
    assert r2.to() == []


def test_irregular_spacing_weighs_frames_by_time():
    # A burst of ten sad frames in 0.1 s moves the scores as little as one frame would: the weight is time.
    burst = Recorder(**{**SETTINGS, "time_constant_s": 2.0})
    spread = Recorder(**{**SETTINGS, "time_constant_s": 2.0})
    for r in (burst, spread):
        for i in range(60):
            r.frame(i * 0.2, face(happy=0.9, sad=0.02))
    for k in range(10):
        burst.frame(12.0 + k * 0.01, face(sad=0.9, happy=0.02))
        spread.frame(12.0 + k * 0.4, face(sad=0.9, happy=0.02))
    b, s = burst.tracker.state("kitchen")["scores"], spread.tracker.state("kitchen")["scores"]
    # Exactly the exponential over the elapsed time, whatever the number of frames.
    expect_burst = 0.02 + (0.9 - 0.02) * math.exp(-(0.2 + 0.09) / 2.0)
    expect_spread = 0.02 + (0.9 - 0.02) * math.exp(-(0.2 + 3.6) / 2.0)
    assert b["happy"] == pytest.approx(expect_burst, abs=1e-3)
    assert s["happy"] == pytest.approx(expect_spread, abs=1e-3)
    assert b["happy"] > 0.6 > s["happy"]


def test_out_of_order_frames_do_not_break_the_smoothing():
    r = Recorder(**SETTINGS)
    r.frame(1.0, face(happy=0.9))
    r.frame(0.5, face(sad=0.9))  # processed late: counts as no time passed
    state = r.tracker.state("kitchen")
    assert state["scores"]["happy"] == pytest.approx(0.9)
    assert all(0 <= v <= 1 for v in state["scores"].values())


def test_state_document_and_change_record_fields():
    r = Recorder(**SETTINGS)
    for i in range(10):
        r.frame(i * 0.2, face(happy=0.8), face(box=[0, 0, 20, 20], sad=0.9))
    device, state = r.states[-1]
    assert device == "kitchen"
    assert set(state) == {"device_id", "emotion", "confidence", "scores", "faces", "since", "updated_at", "model"}
    assert state["device_id"] == "kitchen" and state["emotion"] == "happy" and state["faces"] == 2
    assert set(state["scores"]) == set(CLASSES)
    assert state["confidence"] == pytest.approx(0.8) == state["scores"]["happy"]
    assert state["model"] == MODEL
    assert datetime.fromisoformat(state["since"]).timestamp() == pytest.approx(r.start + 1.0)
    assert state["updated_at"].endswith("Z")
    (change,) = r.changes
    assert set(change) == {"device_id", "from", "to", "confidence", "at", "held_s"}
    assert change["at"] == state["since"]


def test_faces_combine_largest_or_mean():
    small, large = face(box=[0, 0, 20, 20], sad=0.9), face(box=[0, 0, 90, 90], happy=0.7)
    assert combine_faces([small, large], CLASSES, "largest") == [large["scores"][c] for c in CLASSES]
    mean = combine_faces([small, large], CLASSES, "mean")
    assert mean[CLASSES.index("sad")] == pytest.approx((0.9 + large["scores"]["sad"]) / 2)
    r = Recorder(**{**SETTINGS, "combine": "mean"})
    for i in range(10):
        r.frame(i * 0.2, face(box=[0, 0, 20, 20], sad=0.9), face(box=[0, 0, 90, 90], sad=0.5, happy=0.4))
    assert r.to() == ["sad"]


def test_published_on_changes_and_at_most_every_state_interval_s():
    r = Recorder(**SETTINGS, state_interval_s=10.0)
    for i in range(5 * 60):  # a minute of one steady face
        r.frame(i * 0.2, face(neutral=0.8))
    times = [datetime.fromisoformat(doc["updated_at"]).timestamp() - r.start for _, doc in r.states]
    # First sight, the change to neutral, then every 10 s while it holds.
    assert times == pytest.approx([0.0, 1.0, 11.0, 21.0, 31.0, 41.0, 51.0])
    assert len(r.changes) == 1

    quiet = Recorder(**SETTINGS, state_interval_s=0)
    for i in range(5 * 60):
        quiet.frame(i * 0.2, face(neutral=0.8))
    assert [doc["emotion"] for _, doc in quiet.states] == ["none", "neutral"]


def test_listeners_see_every_evaluation_and_a_failing_one_is_counted():
    r = Recorder(**SETTINGS)
    calls = []

    def broken(state, change, now):
        raise RuntimeError("listener bug")

    r.tracker.add_listener(broken)
    r.tracker.add_listener(lambda state, change, now: calls.append(now))
    for i in range(10):
        r.frame(i * 0.2, face(fear=0.9))
    r.tick(2.5)
    assert len(r.seen) == len(calls) == 11
    assert [c for _, c, _ in r.seen if c] == r.changes
    state, change, now = r.seen[-1]
    assert change is None and now == pytest.approx(r.start + 2.5) and state["emotion"] == "fear"
    assert r.stats.snapshot()["listener_errors"] == 11
    assert r.stats.snapshot()["state_changes"] == 1


def test_cameras_are_independent_and_can_be_forgotten():
    r = Recorder(**SETTINGS)
    for i in range(10):
        r.frame(i * 0.2, face(happy=0.9), device="kitchen")
        r.frame(i * 0.2, face(sad=0.9), device="hall")
    assert sorted(c["to"] + "@" + c["device_id"] for c in r.changes) == ["happy@kitchen", "sad@hall"]
    assert r.tracker.forget("hall") and not r.tracker.forget("hall")
    assert r.tracker.devices() == ["kitchen"] and r.tracker.state("hall") is None


def test_a_failing_publish_is_counted_and_the_state_goes_on():
    r = Recorder(**SETTINGS)

    def fail(device, doc):
        raise ConnectionError("broker away")

    r.tracker.publish_state = fail
    for i in range(10):
        r.frame(i * 0.2, face(happy=0.9))
    assert r.to() == ["happy"]
    assert r.stats.snapshot()["state_publish_errors"] == 2  # first sight and the change
