"""What survives what, end to end against a real Mosquitto: a worker restart in the middle of a QoS 1 stream."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import numpy as np
import pytest

from tests.conftest import publisher
from tests.worker.test_service import EVENTS, STARTUP_S, STATUS, envelope, payload, stop

pytestmark = pytest.mark.slow


def lines(log) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_restart_in_the_middle_of_a_qos1_stream_loses_no_frame_younger_than_max_age(
    worker, listen, mosquitto, protocol
):
    env = {
        "EMOTION_MQTT__PROTOCOL": protocol,
        "EMOTION_DETECTOR__KIND": "none",  # every frame is a face: an event per frame
        "EMOTION_MODEL__TTA": "none",
        "EMOTION_PIPELINE__MAX_AGE_S": "120",
        # The frames that waited at the broker arrive at once when the worker is back; the queue holds them.
        "EMOTION_PIPELINE__QUEUE_SIZE": "1000",
    }
    events = listen([EVENTS])
    status = listen([STATUS])
    first, first_log = worker(env)
    status.wait_for(lambda m: m.payload == b"online", STARTUP_S, "the first worker online")

    camera = publisher(mosquitto.port)
    image = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    sent: list[str] = []
    streaming = threading.Event()
    streaming.set()

    def stream():
        while streaming.is_set():
            frame_id = f"f{len(sent)}"
            camera.publish("emotion/frames/door", envelope(image, frame_id), qos=1)
            sent.append(frame_id)
            time.sleep(0.2)

    thread = threading.Thread(target=stream, daemon=True)
    thread.start()
    events.wait_for(lambda m: len(events.on(EVENTS)) >= 5, 30, "events before the restart")
    assert stop(first) == 0
    down_at = len(sent)
    # Taken long ago: older than max_age_s when they arrive, so they are skipped, counted and logged.
    for k in range(2):
        camera.publish("emotion/frames/door", envelope(image, f"old{k}", captured_at=time.time() - 600), qos=1)

    second, second_log = worker(env)
    status.wait_for(lambda m: m.payload == b"online" and len(status.on(m.topic)) >= 3, STARTUP_S, "back online")
    back_at = len(sent)
    events.wait_for(lambda m: len(sent) >= back_at + 5, 30, "frames after the restart")
    streaming.clear()
    thread.join(5)
    events.wait_for(lambda m: len(events.on(EVENTS)) >= len(sent), 60, "an event for every frame")
    time.sleep(0.5)

    seen = Counter(payload(m)["frame_id"] for m in events.on(EVENTS))
    assert back_at - down_at >= 5, "the stream went on while the worker was away"
    assert {f: seen[f] for f in sent} == dict.fromkeys(sent, 1), "each frame exactly once"
    assert not seen["old0"] and not seen["old1"]
    assert next(r for r in lines(second_log) if r["event"] == "connecting")["session_expiry_s"] == 3600
    assert next(r for r in lines(second_log) if r["event"] == "connected")["session_present"] is True
    camera.loop_stop()
    assert stop(second) == 0
    skipped = [r for r in lines(second_log) if r["event"] == "frames skipped, older than pipeline.max_age_s"]
    assert sum(r["count"] for r in skipped) == 2 and skipped[0]["by_device"]["door"] >= 1, skipped
    stopped = next(r for r in lines(second_log) if r["event"] == "stopped")
    assert stopped["stale"] == 2 and stopped.get("dropped", 0) == 0
