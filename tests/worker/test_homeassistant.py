"""Home Assistant discovery, the per-camera state and the stats, end to end against a real Mosquitto.

One worker serves several checks in a row, as starting one takes seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from tests.conftest import REPO, publisher
from worker.discovery import CAMERA_ID, CONFIGURED_KEY, NODE_ID, WORKER_ID
from worker.frames import encode_jpeg
from worker.model import CLASSES

CLIENT_ID = "test-worker"
STATUS = f"emotion/status/{CLIENT_ID}"
STARTUP_S = 60
EMOTIONS = [*CLASSES, "none"]
# What Home Assistant refuses a config without (2023.8 and later), by component.
REQUIRED = {
    "sensor": {"state_topic"},
    "binary_sensor": {"state_topic"},
    "event": {"state_topic", "event_types"},
    "device_automation": {"automation_type", "topic", "type", "subtype", "device"},
}


def retained(port: int, topic_filter: str) -> dict[str, bytes]:
    """The retained messages under ``topic_filter``, read by a fresh subscriber (topic -> payload)."""
    got: dict[str, bytes] = {}
    acked: set[int] = set()
    cond = threading.Condition()

    def on_subscribe(client, userdata, mid, *rest):
        with cond:
            acked.add(mid)
            cond.notify_all()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"test-retained-{time.time_ns()}")
    client.on_message = lambda c, u, m: m.retain and got.__setitem__(m.topic, m.payload)
    client.on_subscribe = on_subscribe
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        # Retained messages come right after their subscription is acknowledged: a second one marks their end.
        # At QoS 0, as the broker holds back QoS 1 messages beyond 20 in flight but not the acknowledgement.
        client.subscribe(topic_filter, 0)
        mid = client.subscribe("test/marker", 0)[1]
        with cond:
            assert cond.wait_for(lambda: mid in acked, 10), "the broker did not acknowledge a subscription"
        return dict(got)
    finally:
        client.loop_stop()
        client.disconnect()


def configs_of(messages: dict[str, bytes]) -> dict[str, dict]:
    return {t: json.loads(p) for t, p in messages.items() if p}


def camera_configs(configs: dict[str, dict], device: str) -> dict[str, dict]:
    return {t: c for t, c in configs.items() if CAMERA_ID + device in c["device"]["identifiers"]}


def check_entity_configs(configs: dict[str, dict]) -> None:
    """Each config has what Home Assistant needs: required keys, unique ids, a named device, availability."""
    unique_ids = [c["unique_id"] for c in configs.values() if "unique_id" in c]
    assert len(unique_ids) == len(set(unique_ids)), "duplicate unique_id"
    for topic, c in configs.items():
        prefix, component, node, obj, last = topic.split("/")
        assert (prefix, node, last) == ("homeassistant", NODE_ID, "config"), topic
        assert REQUIRED[component] <= set(c), (topic, REQUIRED[component] - set(c))
        assert c["device"]["identifiers"] and c["device"]["name"], topic
        if component != "device_automation":
            assert c["unique_id"] and c["name"], topic
            assert c.get("availability") or c.get("availability_topic"), topic


@pytest.fixture
def ha_worker(worker):
    """Start workers with the test's environment plus ``extra``; killed at the end of the test."""

    def run(extra: dict | None = None):
        proc, _ = worker(
            {"EMOTION_MQTT__CLIENT_ID": CLIENT_ID, "EMOTION_PIPELINE__STATS_INTERVAL_S": "1", **(extra or {})}
        )
        return proc

    return run


def forget(worker_env: dict, *devices: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "forget", *devices],
        env=worker_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_camera_appears_in_home_assistant_with_its_state_and_one_change(
    ha_worker, worker_env, listen, mosquitto, face_frames
):
    configured = {"hall": {"name": "Hall camera", "area": "Hall"}, "porch": {}}
    hall = {"EMOTION_HOMEASSISTANT__CAMERAS": json.dumps(configured)}
    watch = listen(["homeassistant/#", "emotion/#"])
    proc = ha_worker(hall)
    watch.wait_for(lambda m: m.topic == STATUS and m.payload == b"online", STARTUP_S, "the worker online")
    # The configured camera and the worker are announced before any frame.
    watch.wait_for(lambda m: m.topic.endswith("camera_hall_event/config"), 30, "the hall camera's configs")

    # A steady face on the kitchen camera for a few seconds: one state, one change.
    camera = publisher(mosquitto.port)
    jpeg = encode_jpeg(face_frames[0][0])
    deadline = time.monotonic() + 60
    while not watch.on("emotion/changes") and time.monotonic() < deadline:
        camera.publish("emotion/frames/kitchen", jpeg, qos=1)
        time.sleep(0.2)
    changes = [json.loads(m.payload) for m in watch.on("emotion/changes")]
    assert changes, "no change record within 60 s of frames"
    for _ in range(15):  # three more seconds of the same face
        camera.publish("emotion/frames/kitchen", jpeg, qos=1)
        time.sleep(0.2)
    watch.wait_for(lambda m: m.topic.startswith("emotion/stats/"), 30, "the stats")
    changes = [json.loads(m.payload) for m in watch.on("emotion/changes")]
    assert len(changes) == 1, changes
    change = changes[0]
    assert change["device_id"] == "kitchen" and change["from"] == "none" and change["to"] in CLASSES
    assert set(change) == {"device_id", "from", "to", "confidence", "at", "held_s"}

    # The retained state.
    state = json.loads(retained(mosquitto.port, "emotion/state/kitchen")["emotion/state/kitchen"])
    assert state["device_id"] == "kitchen" and state["emotion"] == change["to"] and state["faces"] == 1
    assert set(state["scores"]) == set(CLASSES) and 0 < state["confidence"] <= 1
    assert state["since"] == change["at"] and state["model"] == {"name": "tiny-test", "version": "t1"}

    # The retained discovery configs: the two cameras and the worker.
    configs = configs_of(retained(mosquitto.port, "homeassistant/#"))
    check_entity_configs(configs)
    kitchen, hall_cfg = camera_configs(configs, "kitchen"), camera_configs(configs, "hall")
    porch = camera_configs(configs, "porch")
    by_component = sorted(t.split("/")[1] for t in kitchen)
    assert by_component == sorted(["sensor", "sensor", "binary_sensor", "event"] + ["device_automation"] * 8)
    triggers = {c["subtype"]: c for c in kitchen.values() if "automation_type" in c}
    assert sorted(triggers) == sorted(EMOTIONS)
    assert {(c["type"], c["payload"], c["topic"]) for c in triggers.values()} == {
        ("emotion", e, "emotion/changes") for e in EMOTIONS
    }
    event = next(c for t, c in kitchen.items() if t.split("/")[1] == "event")
    assert event["event_types"] == EMOTIONS and event["state_topic"] == "emotion/changes"
    face = next(c for t, c in kitchen.items() if t.split("/")[1] == "binary_sensor")
    assert face["device_class"] == "occupancy" and face["state_topic"] == "emotion/state/kitchen"
    sensors = {c["name"]: c for t, c in kitchen.items() if t.split("/")[1] == "sensor"}
    assert sensors["Emotion"]["json_attributes_topic"] == "emotion/state/kitchen"
    assert sensors["Emotion confidence"]["unit_of_measurement"] == "%"
    for c in kitchen.values():
        if "availability" in c:
            assert c["availability"][0] == {"topic": STATUS} and c["availability_mode"] == "any"
    device = sensors["Emotion"]["device"]
    assert device["name"] == "kitchen" and device["via_device"] == WORKER_ID + CLIENT_ID
    assert "tiny-test t1" in device["sw_version"]
    assert len(hall_cfg) == len(porch) == len(kitchen)
    hall_device = next(iter(hall_cfg.values()))["device"]
    assert hall_device["name"] == "Hall camera" and hall_device["suggested_area"] == "Hall"
    assert any(c.get(CONFIGURED_KEY) for c in hall_cfg.values())
    assert not any(c.get(CONFIGURED_KEY) for c in kitchen.values())
    worker = {c["name"]: c for c in configs.values() if WORKER_ID + CLIENT_ID in c["device"]["identifiers"]}
    assert sorted(worker) == ["Dropped frames", "Frames per second", "Latency p95", "Model version"]
    assert all(c["availability_topic"] == STATUS for c in worker.values())

    # The stats the worker's sensors read.
    stats_topic = next(iter(worker.values()))["state_topic"]
    stats = json.loads(retained(mosquitto.port, stats_topic)[stats_topic])
    assert stats["frames"]["received"] >= stats["frames"]["processed"] >= 1
    assert stats["faces"] >= 1 and stats["model"]["version"] == "t1" and stats["detector"] == "haar"
    assert {"uptime_s", "frames_per_s", "latency_ms", "queue_depth", "batch_mean", "device", "precision"} <= set(stats)
    assert set(stats["latency_ms"]) == {"p50", "p95", "p99"}

    # Home Assistant's birth message makes the worker send every config again.
    before = len(watch.messages)
    watch.client.publish("homeassistant/status", b"online", qos=1)
    for topic in configs:
        watch.wait_for(
            lambda m: m.topic == topic and not m.retain and watch.messages.index(m) >= before, 20, f"{topic} again"
        )

    # `forget` empties the kitchen camera's retained configs and state; the running worker forgets it too.
    out = forget(worker_env, "kitchen")
    assert out.returncode == 0, out.stderr
    assert "kitchen: emptied" in out.stdout
    left = retained(mosquitto.port, "#")
    assert not [t for t in left if t in kitchen or t == "emotion/state/kitchen"], sorted(left)
    assert all(t in left for t in hall_cfg)
    before = len(watch.messages)
    watch.client.publish("homeassistant/status", b"online", qos=1)
    hall_event = next(t for t in hall_cfg if t.split("/")[1] == "event")
    watch.wait_for(lambda m: m.topic == hall_event and watch.messages.index(m) >= before, 20, "the hall configs")
    time.sleep(0.5)  # the kitchen configs would have come with the hall ones
    assert not [m.topic for m in watch.messages[before:] if m.topic in kitchen]

    # Stopping the worker makes the cameras unavailable: its status, their only availability topic, is offline.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert retained(mosquitto.port, STATUS)[STATUS] == b"offline"

    # Started again without the configured cameras (more retained configs than a broker sends at once), the
    # worker removes them from Home Assistant.
    ha_worker()
    for gone in ("hall", "porch"):  # the state is emptied last, after the configs
        watch.wait_for(
            lambda m: m.topic == f"emotion/state/{gone}" and m.payload == b"" and watch.messages.index(m) >= before,
            STARTUP_S,
            f"{gone}'s state emptied",
        )
    left = retained(mosquitto.port, "homeassistant/#")
    assert not [t for t in left if t in hall_cfg or t in porch or t in kitchen], sorted(left)
    assert all(t in left for t in worker_topics(configs))


def worker_topics(configs: dict[str, dict]) -> list[str]:
    return [t for t, c in configs.items() if WORKER_ID + CLIENT_ID in c["device"]["identifiers"]]


def test_forget_refuses_a_device_id_that_is_no_topic_level(worker_env):
    out = forget(worker_env, "kitchen/2")
    assert out.returncode == 2
    assert "device id 'kitchen/2'" in out.stderr
