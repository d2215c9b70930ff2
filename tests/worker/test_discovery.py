"""Discovery configs, without a broker: names, the templates Home Assistant renders, configured cameras."""

from __future__ import annotations

import json
import os

import jinja2
import pytest

from worker.config import ConfigError, load_settings
from worker.discovery import (
    CONFIGURED_KEY,
    camera_configs,
    camera_of,
    camera_topics,
    jinja_string,
    object_id,
    worker_configs,
)
from worker.model import CLASSES

EMOTIONS = (*CLASSES, "none")
MODEL = {"name": "m", "version": "v1"}


@pytest.fixture
def settings(monkeypatch):
    for k in list(os.environ):
        if k.startswith("EMOTION_"):
            monkeypatch.delenv(k)
    return load_settings(None, homeassistant={"cameras": {"hall": {"name": "Hall camera", "area": "Hall"}}})


def render(template: str, payload: dict) -> str:
    """``template`` as Home Assistant renders an MQTT value template (``value_json``, ``to_json``)."""
    env = jinja2.Environment()
    env.filters["to_json"] = json.dumps
    return env.from_string(template).render(value_json=payload, value=json.dumps(payload))


def change(device: str, to: str = "happy") -> dict:
    return {"device_id": device, "from": "none", "to": to, "confidence": 0.8, "at": "x", "held_s": 3.5}


def test_object_ids_are_safe_and_distinct():
    assert object_id("kitchen") == "kitchen"
    assert object_id("front-door_2") == "front-door_2"
    odd = object_id("café door")
    assert odd.startswith("caf__door_") and len(odd) == len("caf__door_") + 6
    assert object_id("a.b") != object_id("a_b") and object_id("a.b") != object_id("a,b")


@pytest.mark.parametrize("device", ["kitchen", 'we"ird', "a'b", "x}}y{%z", "ça #1", "back\\slash"])
def test_templates_pick_their_own_camera(settings, device):
    configs = camera_configs(settings, device, EMOTIONS, ["emotion/status/w"], "w", MODEL)
    event = next(c for t, c in configs.items() if t.split("/")[1] == "event")
    fired = json.loads(render(event["value_template"], change(device, "sad")))
    assert fired == {"event_type": "sad", "from": "none", "confidence": 0.8, "held_s": 3.5}
    assert render(event["value_template"], change(device + "x")) == ""
    assert render(jinja_string(device).join(["{{ ", " }}"]), {}) == device
    triggers = [c for c in configs.values() if c.get("automation_type") == "trigger"]
    assert sorted(c["subtype"] for c in triggers) == sorted(EMOTIONS)
    happy = next(c for c in triggers if c["subtype"] == "happy")
    assert render(happy["value_template"], change(device)) == happy["payload"] == "happy"
    assert render(happy["value_template"], change("other")) != "happy"


def test_state_templates(settings):
    configs = camera_configs(settings, "kitchen", EMOTIONS, ["emotion/status/w"], "w", MODEL)
    by_name = {(t.split("/")[1], c.get("name")): c for t, c in configs.items()}
    state = {"emotion": "happy", "confidence": 0.8123, "faces": 1}
    assert render(by_name[("sensor", "Emotion")]["value_template"], state) == "happy"
    assert render(by_name[("sensor", "Emotion confidence")]["value_template"], state) == "81.2"
    face = by_name[("binary_sensor", "Face")]["value_template"]
    assert render(face, state) == "ON"
    assert render(face, {**state, "emotion": "none"}) == "OFF"


def test_configured_camera_has_its_name_area_and_marker(settings):
    configs = camera_configs(settings, "hall", EMOTIONS, ["emotion/status/w", "emotion/status/v"], "w", MODEL)
    assert list(configs) == camera_topics("homeassistant", "hall", EMOTIONS)
    emotion = next(iter(configs.values()))
    assert emotion[CONFIGURED_KEY] is True
    assert emotion["device"]["name"] == "Hall camera" and emotion["device"]["suggested_area"] == "Hall"
    assert emotion["availability"] == [{"topic": "emotion/status/w"}, {"topic": "emotion/status/v"}]
    assert camera_of(emotion) == ("hall", True)
    seen = camera_configs(settings, "kitchen", EMOTIONS, ["emotion/status/w"], "w", MODEL)
    first = next(iter(seen.values()))
    assert CONFIGURED_KEY not in first and "suggested_area" not in first["device"]
    assert camera_of(first) == ("kitchen", False)
    assert camera_of({"device": {"identifiers": "zigbee-1"}}) == (None, False)


def test_worker_sensors_read_the_stats(settings):
    configs = worker_configs(settings, "emotion-worker-nas", "emotion/status/emotion-worker-nas", MODEL)
    stats = {"frames_per_s": 4.5, "latency_ms": {"p95": 81.0}, "frames": {"dropped": 3}, "model": MODEL}
    values = {c["name"]: render(c["value_template"], stats) for c in configs.values()}
    assert values == {"Frames per second": "4.5", "Latency p95": "81.0", "Dropped frames": "3", "Model version": "v1"}
    latency = next(c for c in configs.values() if c["name"] == "Latency p95")
    assert render(latency["value_template"], {**stats, "latency_ms": {"p95": None}}) == "None"
    assert {c["state_topic"] for c in configs.values()} == {"emotion/stats/emotion-worker-nas"}


@pytest.mark.parametrize("device", ["", "a/b", "a+", "#"])
def test_a_configured_camera_must_be_a_topic_level(monkeypatch, device):
    for k in list(os.environ):
        if k.startswith("EMOTION_"):
            monkeypatch.delenv(k)
    with pytest.raises(ConfigError, match="homeassistant.cameras"):
        load_settings(None, homeassistant={"cameras": {device: {"name": "x"}}})
