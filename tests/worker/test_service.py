"""The worker as a service, end to end, against a real Mosquitto."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time

import cv2
import jsonschema
import numpy as np
import pytest

from tests.conftest import (
    REPO,
    free_port,
    needs_proc,
    publisher,
    signals_blocked_by_other_threads,
    start_worker,
    wait_port,
)
from worker.events import ERROR_SCHEMA, EVENT_SCHEMA, load_schema
from worker.frames import encode_jpeg

EVENTS, ERRORS = "emotion/events", "emotion/errors"
STATUS = "emotion/status/+"  # each worker's own availability topic
STARTUP_S = 60  # importing torch and warming up while the suite runs in parallel can be slow


def iou(a, b) -> float:
    ax, ay, aw, ah = a
    bx, by, bw, bh = b
    ix = max(0, min(ax + aw, bx + bw) - max(ax, bx))
    iy = max(0, min(ay + ah, by + bh) - max(ay, by))
    inter = ix * iy
    return inter / (aw * ah + bw * bh - inter)


def payload(msg) -> dict:
    return json.loads(msg.payload)


def wait_online(listener, timeout: float = STARTUP_S):
    return listener.wait_for(
        lambda m: m.topic.startswith("emotion/status/") and m.payload == b"online", timeout, "'online' status"
    )


def envelope(frame: np.ndarray, frame_id: str, **extra) -> bytes:
    return json.dumps(
        {
            "image": base64.b64encode(encode_jpeg(frame)).decode(),
            "frame_id": frame_id,
            "captured_at": time.time(),
            **extra,
        }
    ).encode()


def stop(proc: subprocess.Popen, sig=signal.SIGTERM, timeout: float = 15) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


def test_face_frame_gives_schema_valid_event(worker, listen, mosquitto, face_frames):
    events = listen([EVENTS, STATUS])
    proc, log = worker()
    wait_online(events)
    camera = publisher(mosquitto.port)
    frame, paste = face_frames[0]
    camera.publish("emotion/frames/kitchen", encode_jpeg(frame), qos=1)
    msg = events.wait_for(lambda m: m.topic == EVENTS, 30, "event for the raw JPEG")
    event = payload(msg)
    jsonschema.validate(event, load_schema(EVENT_SCHEMA))
    assert event["device_id"] == "kitchen"
    assert len(event["faces"]) == 1
    face = event["faces"][0]
    assert iou(face["box"], paste) > 0.5, (face["box"], paste)
    assert sum(face["scores"].values()) == pytest.approx(1.0, abs=2e-3)
    assert face["emotion"] == max(face["scores"], key=face["scores"].get) == event["emotion"]
    assert event["model"] == {"name": "tiny-test", "version": "t1"}

    # The JSON envelope: frame id, capture time and extra keys come back.
    captured = time.time() - 0.25
    camera.publish(
        "emotion/frames/hall",
        json.dumps(
            {
                "image": base64.b64encode(encode_jpeg(frame)).decode(),
                "frame_id": "f-42",
                "captured_at": captured,
                "room": "hall",
            }
        ),
        qos=1,
    )
    event = payload(events.wait_for(lambda m: m.topic == EVENTS and payload(m)["frame_id"] == "f-42", 30))
    jsonschema.validate(event, load_schema(EVENT_SCHEMA))
    assert event["device_id"] == "hall"
    assert event["meta"] == {"room": "hall"}
    assert event["latency_ms"] >= 250
    camera.loop_stop()
    assert stop(proc) == 0


def test_frame_without_face_publishes_nothing_unless_asked(worker, listen, mosquitto, face_frames):
    events = listen([EVENTS, STATUS])
    proc, _ = worker({"EMOTION_PIPELINE__PUBLISH_EMPTY": "false"})
    wait_online(events)
    camera = publisher(mosquitto.port)
    blank = np.full((240, 320, 3), 128, np.uint8)
    camera.publish("emotion/frames/porch", envelope(blank, "blank"), qos=1)
    camera.publish("emotion/frames/porch", envelope(face_frames[0][0], "face"), qos=1)
    events.wait_for(lambda m: m.topic == EVENTS and payload(m)["frame_id"] == "face", 30)
    assert [payload(m)["frame_id"] for m in events.on(EVENTS)] == ["face"]
    assert stop(proc) == 0

    events2 = listen([EVENTS])
    proc, _ = worker({"EMOTION_PIPELINE__PUBLISH_EMPTY": "true"})
    wait_online(listen([STATUS]))
    camera.publish("emotion/frames/porch", envelope(blank, "blank-2"), qos=1)
    event = payload(events2.wait_for(lambda m: m.topic == EVENTS, 30))
    jsonschema.validate(event, load_schema(EVENT_SCHEMA))
    assert event["frame_id"] == "blank-2" and event["faces"] == [] and event["emotion"] is None
    camera.loop_stop()


def _bad_inputs(frame: np.ndarray) -> list[tuple[str, str, bytes]]:
    jpeg = encode_jpeg(frame)
    _, png_bomb = cv2.imencode(".png", np.zeros((1500, 1500), np.uint8))  # 2.25 Mpx, a few kB
    return [
        ("not_an_image", "emotion/frames/kitchen", b"hello, I am not a picture"),
        ("truncated_image", "emotion/frames/kitchen", jpeg[: len(jpeg) // 2]),
        ("payload_too_large", "emotion/frames/kitchen", jpeg + b"\0" * 300_000),
        ("image_too_large", "emotion/frames/kitchen", png_bomb.tobytes()),
        ("bad_base64", "emotion/frames/kitchen", b'{"image": "%%% not base64 %%%"}'),
        ("bad_json", "emotion/frames/kitchen", b'{"image": '),
        ("bad_field", "emotion/frames/kitchen", b'{"frame_id": "no image here"}'),
        (
            "bad_field",
            "emotion/frames/kitchen",
            json.dumps({"image": base64.b64encode(jpeg).decode(), "captured_at": "yesterday"}).encode(),
        ),
        ("no_device_id", "emotion/frames/", jpeg),
    ]


def test_each_bad_input_gives_an_error_record_and_the_worker_keeps_serving(worker, listen, mosquitto, face_frames):
    listener = listen([EVENTS, ERRORS, STATUS])
    proc, log = worker({"EMOTION_PIPELINE__MAX_PAYLOAD_BYTES": "200000", "EMOTION_PIPELINE__MAX_PIXELS": "2000000"})
    wait_online(listener)
    camera = publisher(mosquitto.port)
    error_schema = load_schema(ERROR_SCHEMA)
    frame = face_frames[0][0]
    for i, (reason, topic, bad) in enumerate(_bad_inputs(frame)):
        camera.publish(topic, bad, qos=1)
        msg = listener.wait_for(lambda m: m.topic == ERRORS and len(listener.on(ERRORS)) > i, 30, f"error {reason}")
        record = payload(listener.on(ERRORS)[i])
        jsonschema.validate(record, error_schema)
        assert record["reason"] == reason, record
        assert record["topic"] == topic
        assert record["device_id"] == (None if reason == "no_device_id" else "kitchen")
        assert record["payload_bytes"] == len(bad)
        assert record["message"]
        # The next good frame still gives an event.
        camera.publish("emotion/frames/kitchen", envelope(frame, f"good-{i}"), qos=1)
        listener.wait_for(
            lambda m: m.topic == EVENTS and payload(m)["frame_id"] == f"good-{i}", 30, f"event after {reason}"
        )
        del msg
    assert proc.poll() is None, "worker exited"
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    rejected = [line for line in lines if line.get("event") == "frame rejected"]
    assert [r["reason"] for r in rejected] == [r for r, _, _ in _bad_inputs(frame)]
    camera.loop_stop()
    assert stop(proc) == 0
    stopped = [json.loads(line) for line in log.read_text().splitlines() if '"stopped"' in line][-1]
    assert stopped["rejected"] == len(_bad_inputs(frame))
    assert stopped["events"] == len(_bad_inputs(frame))


def test_status_online_while_running_offline_after_sigterm(worker, listen, mosquitto):
    proc, _ = worker()
    wait_online(listen([STATUS]))
    late = listen([STATUS])  # a client that connects later sees the retained status
    msg = wait_online(late, 10)
    assert msg.retain
    t0 = time.monotonic()
    assert stop(proc, signal.SIGTERM) == 0
    assert time.monotonic() - t0 < 10
    late.wait_for(lambda m: m.payload == b"offline", 10, "'offline' after SIGTERM")
    after = listen([STATUS])
    retained = after.wait_for(lambda m: True, 10, "retained status")
    assert retained.payload == b"offline" and retained.retain


@needs_proc
def test_only_the_main_thread_takes_stop_signals_and_two_sigterms_stop_once(worker, listen):
    proc, log = worker()
    status = listen([STATUS])
    wait_online(status)
    # The main thread waits in sigwait, which unblocks the signals it waits for while it
    # waits; every other thread must leave them to it.
    masks = signals_blocked_by_other_threads(proc.pid)
    assert len(masks) >= 3  # paho, the pipeline and torch run threads of their own
    assert all({signal.SIGTERM, signal.SIGINT} <= m for m in masks.values()), masks
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(15) == 0
    status.wait_for(lambda m: m.payload == b"offline", 10, "'offline' after two SIGTERMs")
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    assert [e["event"] for e in lines].count("stopping") == 1
    assert {"event": "signal received", "signal": "SIGTERM"}.items() <= next(
        e for e in lines if e["event"] == "signal received"
    ).items()


def test_sigint_also_stops_cleanly(worker, listen):
    proc, _ = worker()
    wait_online(listen([STATUS]))
    assert stop(proc, signal.SIGINT) == 0


def test_last_will_says_offline_after_kill_9(worker, listen):
    status = listen([STATUS])
    proc, _ = worker()
    wait_online(status)
    proc.kill()
    proc.wait()
    status.wait_for(lambda m: m.payload == b"offline", 20, "'offline' from the last will")
    retained = listen([STATUS]).wait_for(lambda m: True, 10, "retained status")
    assert retained.payload == b"offline"


def test_worker_reconnects_after_the_broker_restarts(worker, listen, mosquitto, face_frames):
    proc, log = worker()
    wait_online(listen([STATUS]))
    mosquitto.stop()
    deadline = time.monotonic() + 20
    while "disconnected from broker" not in log.read_text():  # the worker noticed, and goes on
        assert time.monotonic() < deadline, "the worker did not log the lost connection"
        time.sleep(0.05)
    assert proc.poll() is None, "worker exited while the broker was down"
    mosquitto.start()
    listener = listen([EVENTS, STATUS])
    wait_online(listener, 30)
    camera = publisher(mosquitto.port)
    camera.publish("emotion/frames/garage", envelope(face_frames[0][0], "after-restart"), qos=1)
    event = payload(listener.wait_for(lambda m: m.topic == EVENTS, 30, "event after the broker restart"))
    assert event["device_id"] == "garage" and event["frame_id"] == "after-restart"
    assert '"reconnected"' in log.read_text()
    camera.loop_stop()
    assert stop(proc) == 0


def test_two_workers_split_frames_through_a_shared_subscription_and_one_survives_kill_9(
    worker, listen, mosquitto, face_frames
):
    env = {"EMOTION_TOPICS__FRAMES": '["$share/emotion/emotion/frames/+"]'}
    status = listen([STATUS])
    (a, log_a), (b, log_b) = (
        worker({**env, "EMOTION_MQTT__CLIENT_ID": "worker-a"}),
        worker({**env, "EMOTION_MQTT__CLIENT_ID": "worker-b"}),
    )
    deadline = time.monotonic() + STARTUP_S
    while log_a.read_text().count('"connected"') + log_b.read_text().count('"connected"') < 2:
        assert time.monotonic() < deadline, "workers did not connect"
        time.sleep(0.2)
    wait_online(status)
    events = listen([EVENTS])
    camera = publisher(mosquitto.port)
    n = 12
    for i in range(n):
        camera.publish("emotion/frames/kitchen", envelope(face_frames[i % len(face_frames)][0], f"s-{i}"), qos=1)
        time.sleep(0.05)
    deadline = time.monotonic() + 60
    while len(events.on(EVENTS)) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    ids = sorted(payload(m)["frame_id"] for m in events.on(EVENTS))
    assert ids == sorted(f"s-{i}" for i in range(n)), "each frame exactly once"
    per_worker = [log.read_text().count('"event": "event"') for log in (log_a, log_b)]
    assert sum(per_worker) == n and min(per_worker) > 0, per_worker

    # kill -9 of one: the other takes every frame from then on, and each status topic tells the truth.
    a.kill()
    a.wait()
    status.wait_for(lambda m: m.topic == "emotion/status/worker-a" and m.payload == b"offline", 20, "a's last will")
    more = 10
    for i in range(n, n + more):
        camera.publish("emotion/frames/kitchen", envelope(face_frames[i % len(face_frames)][0], f"s-{i}"), qos=1)
        time.sleep(0.05)
    deadline = time.monotonic() + 60
    while len(events.on(EVENTS)) < n + more and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(0.5)
    ids = sorted(payload(m)["frame_id"] for m in events.on(EVENTS))
    assert ids == sorted(f"s-{i}" for i in range(n + more)), "each frame exactly once, after the kill too"
    assert log_b.read_text().count('"event": "event"') == per_worker[1] + more
    retained = listen([STATUS])
    retained.wait_for(lambda m: len(retained.messages) == 2, 10, "both retained status topics")
    assert {m.topic: m.payload for m in retained.messages} == {
        "emotion/status/worker-a": b"offline",
        "emotion/status/worker-b": b"online",
    }
    assert '"session_expiry_s": 0' in log_b.read_text()  # a $share/ group member keeps no session
    camera.loop_stop()
    assert stop(b) == 0


def test_missing_or_wrong_checkpoint_stops_start_with_a_clear_error(worker_env, tmp_path):
    missing = tmp_path / "nope.safetensors"
    env = {**worker_env, "EMOTION_MODEL__WEIGHTS": str(missing)}
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert str(missing) in out.stdout + out.stderr and "does not exist" in out.stdout + out.stderr

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(1000))
    env["EMOTION_MODEL__WEIGHTS"] = str(junk)
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert str(junk) in out.stdout + out.stderr and "safetensors" in out.stdout + out.stderr


def test_bad_config_value_stops_start_naming_the_key(worker_env):
    env = {**worker_env, "EMOTION_PIPELINE__QUEUE_SIZE": "many"}
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 2
    assert "pipeline.queue_size" in out.stderr and "many" in out.stderr


def test_embedded_broker_serves_mqtt_311_clients(worker_env, tmp_path, face_frames):
    import paho.mqtt.client as mqtt

    from tests.conftest import Listener

    port = free_port()
    env = {**worker_env, "EMOTION_BROKER__PORT": str(port), "EMOTION_BROKER__KIND": "amqtt"}
    proc = start_worker(env, tmp_path / "embedded.log", "--embedded-broker")
    try:
        wait_port(port, STARTUP_S)
        listener = Listener(port, [EVENTS, STATUS])
        wait_online(listener, 30)
        camera = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        camera.connect("127.0.0.1", port)
        camera.loop_start()
        camera.publish("emotion/frames/lounge", encode_jpeg(face_frames[0][0]), qos=1)
        event = payload(listener.wait_for(lambda m: m.topic == EVENTS, 30, "event via the embedded broker"))
        assert event["device_id"] == "lounge"
        text = (tmp_path / "embedded.log").read_text()
        assert f"(in-process) on 127.0.0.1:{port}, MQTT 3.1.1" in text and "amqtt 0.12" in text
        camera.loop_stop()
        listener.close()
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_tls_with_a_missing_ca_file_stops_start_naming_the_key(worker_env, tmp_path):
    env = {**worker_env, "EMOTION_MQTT__TLS__ENABLED": "true", "EMOTION_MQTT__TLS__CA_CERTS": str(tmp_path / "ca.pem")}
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2
    assert "mqtt.tls.ca_certs" in out.stderr and "ca.pem" in out.stderr


def test_the_default_model_is_the_small_one_on_a_cpu_and_the_log_says_why(worker, listen):
    proc, log = worker({"EMOTION_MODEL__WEIGHTS": "auto"})
    wait_online(listen([STATUS]))
    assert stop(proc) == 0
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    loaded = next(e for e in lines if e["event"] == "model loaded")
    assert loaded["path"].endswith("resnet9-small.safetensors") or loaded["path"].endswith("resnet9-small.int8.onnx")
    assert loaded["device"] == "cpu" and float(loaded["val_acc"]) >= 0.66  # without TTA, as recorded at export
    assert (loaded["size"], loaded["channels"]) == ("stages 16,64,192", [16, 64, 192])
    assert (loaded["backend"], loaded["precision"]) in {("torch", "bf16"), ("onnxruntime", "int8")}
    assert "small model" in loaded["why"][0] and "'resnet9'" in loaded["why"][0]  # and how to take the full one back
    assert ("bf16" if loaded["backend"] == "torch" else "lacks bf16") in loaded["why"][1]
    detector = next(e for e in lines if e["event"] == "face detector ready")
    assert (detector["threads"], detector["opencv_threads"]) == (2, 1)  # the default: two frames detected at once
