"""The embedded default broker: Mosquitto as a child, amqtt with its front end, or the broker already there."""

from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from tests.conftest import REPO, Listener, free_port, start_worker, wait_port
from worker.broker import AmqttBroker, BrokerError, find_mosquitto, probe, start_broker
from worker.frames import encode_jpeg

EVENTS, STATUS = "emotion/events", "emotion/status/+"
STARTUP_S = 60
needs_mosquitto = pytest.mark.skipif(find_mosquitto() is None, reason="Mosquitto is not installed")


# -- a client as small as mosquitto_pub ------------------------------------------------------------------------


def _string(text: str) -> bytes:
    return struct.pack(">H", len(text.encode())) + text.encode()


def _packet(kind: int, body: bytes) -> bytes:
    length, n = bytearray(), len(body)
    while True:
        n, digit = n // 128, n % 128
        length.append(digit | (0x80 if n else 0))
        if not n:
            return bytes([kind]) + bytes(length) + body


def connect_publish_disconnect(port: int, topic: str, payload: bytes, *, burst: bool = False) -> None:
    """One QoS 0 PUBLISH from a client that connects, publishes and disconnects, as ``mosquitto_pub -f`` does.

    ``burst``: CONNECT, PUBLISH, DISCONNECT and the end of stream in one go, with keep-alive
    0, before the CONNACK (allowed by MQTT): the broker then finds them all buffered at once.
    """
    connect = _packet(
        0x10, _string("MQTT") + bytes([4, 2]) + struct.pack(">H", 0 if burst else 60) + _string(f"cam-{time.time_ns()}")
    )
    publish = _packet(0x30, _string(topic) + payload)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        if burst:
            sock.sendall(connect + publish + b"\xe0\x00")
            sock.shutdown(socket.SHUT_WR)  # the end of stream right behind the DISCONNECT
            # Read the CONNACK before closing: closing with unread data sends a reset, which
            # lets the broker's kernel discard what it has not read yet.
            sock.recv(4)
            return
        sock.sendall(connect)
        assert sock.recv(4)[:1] == b"\x20", "no CONNACK"
        sock.sendall(publish + b"\xe0\x00")


def camera_jpeg(face_frames, size: int) -> bytes:
    """A 640x480 JPEG with a detectable face, padded with noise around it to about ``size`` bytes."""
    frame, (x, y, w, h) = face_frames[0]
    rng = np.random.default_rng(0)
    for sigma in (10, 20, 30, 45, 60, 80):
        noisy = np.clip(frame.astype(np.int16) + rng.normal(0, sigma, frame.shape), 0, 255).astype(np.uint8)
        noisy[y : y + h, x : x + w] = frame[y : y + h, x : x + w]
        jpeg = encode_jpeg(noisy, 92)
        if len(jpeg) >= size:
            return jpeg
    raise AssertionError(f"could not make a {size}-byte JPEG")


def worker_with_embedded_broker(worker_env, tmp_path, kind: str, port: int | None = None, log_name="worker.log"):
    port = port or free_port()
    env = {**worker_env, "EMOTION_BROKER__PORT": str(port), "EMOTION_BROKER__KIND": kind}
    log = tmp_path / log_name
    return start_worker(env, log, "--embedded-broker"), log, port


def log_records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def stop(proc, timeout=20) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


# -- end to end, through the worker ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [pytest.param("mosquitto", marks=needs_mosquitto), "amqtt"])
def test_camera_sized_qos0_frames_from_connect_publish_disconnect_clients_all_arrive(
    kind, worker_env, tmp_path, face_frames
):
    proc, log, port = worker_with_embedded_broker(worker_env, tmp_path, kind)
    try:
        wait_port(port, STARTUP_S)
        listener = Listener(port, [EVENTS, STATUS])
        listener.wait_for(lambda m: m.payload == b"online", STARTUP_S, "'online' status")
        jpeg = camera_jpeg(face_frames, 150_000)
        assert 150_000 <= len(jpeg) < 200_000
        sent = 6
        for i in range(sent):
            connect_publish_disconnect(port, f"emotion/frames/cam{i}", jpeg, burst=i % 2 == 1)
            time.sleep(0.2)  # one camera's pace; the worker drops frames only when behind
        for i in range(sent):
            listener.wait_for(
                lambda m: m.topic == EVENTS and json.loads(m.payload)["device_id"] == f"cam{i}", 60, f"event of cam{i}"
            )
        assert len(listener.on(EVENTS)) == sent
        started = next(r for r in log_records(log) if r["event"] == "embedded broker started")
        assert kind in started["broker"].lower()
        assert ("MQTT 5" if kind == "mosquitto" else "MQTT 3.1.1") in started["broker"]
        listener.close()
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    errors = [r for r in log_records(log) if r["level"] == "error"]
    assert errors == []
    if kind == "mosquitto":  # the child stopped with the worker and left its port free
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", port), timeout=1).close()


@needs_mosquitto
def test_mqtt5_clients_work_against_the_embedded_mosquitto(worker_env, tmp_path, face_frames):
    proc, log, port = worker_with_embedded_broker(worker_env, tmp_path, "auto")
    env = {**worker_env, "EMOTION_MQTT__PORT": str(port)}
    try:
        wait_port(port, STARTUP_S)
        watch = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "watch", "--json", "--count", "1", "--timeout", "90"],
            env=env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert "(MQTT 5)" in watch.stderr.readline()
        first = json.loads(watch.stdout.readline())  # the worker's retained 'online', once
        assert first["topic"].startswith("emotion/status/") and first["payload"] == "online"

        # paho with protocol 5: a frame that asks for its outcome with a response topic and correlation data.
        answers = []
        got = threading.Event()
        cam = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="mqtt5-camera", protocol=mqtt.MQTTv5)
        subscribed = threading.Event()
        cam.on_message = lambda c, u, m: (answers.append(m), got.set())
        cam.on_subscribe = lambda *a: subscribed.set()
        cam.connect("127.0.0.1", port)
        cam.subscribe("cam5/answers", qos=0)
        cam.loop_start()
        props = Properties(PacketTypes.PUBLISH)
        props.ResponseTopic = "cam5/answers"
        props.CorrelationData = b"frame-77"
        assert subscribed.wait(10), "the camera's subscription was not acknowledged"
        cam.publish("emotion/frames/cam5", encode_jpeg(face_frames[0][0]), qos=1, properties=props)
        assert got.wait(60), "no answer on the response topic"
        answer = answers[0]
        assert answer.properties.CorrelationData == b"frame-77"
        doc = json.loads(answer.payload)
        assert doc["outcome"] == "event" and doc["device_id"] == "cam5" and doc["event"]["faces"]
        cam.loop_stop()
        cam.disconnect()

        out, err = watch.communicate(timeout=90)
        assert watch.returncode == 0, err
        lines = [json.loads(line) for line in out.splitlines()]
        assert [x["payload"]["device_id"] for x in lines if x["topic"] == EVENTS] == ["cam5"]
        assert all(x["topic"] == EVENTS for x in lines), "status came again"
        connecting = next(r for r in log_records(log) if r["event"] == "connecting")
        assert connecting["protocol"] == "MQTT 5"
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_run_embedded_broker_uses_the_broker_already_on_the_port(worker_env, mosquitto, tmp_path, face_frames):
    proc, log, port = worker_with_embedded_broker(worker_env, tmp_path, "auto", port=mosquitto.port)
    try:
        listener = Listener(mosquitto.port, [EVENTS, STATUS])
        listener.wait_for(lambda m: m.payload == b"online", STARTUP_S, "'online' status")
        connect_publish_disconnect(mosquitto.port, "emotion/frames/hall", encode_jpeg(face_frames[0][0]))
        event = json.loads(listener.wait_for(lambda m: m.topic == EVENTS, 30, "event").payload)
        assert event["device_id"] == "hall"
        used = next(r for r in log_records(log) if r["event"] == "using the broker already running")
        assert "mosquitto version 2" in used["broker"] and f":{mosquitto.port}, MQTT 5" in used["broker"]
        listener.close()
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert mosquitto.proc.poll() is None, "the worker stopped a broker it did not start"


def test_a_port_taken_by_something_else_stops_start_with_what_to_do(worker_env, tmp_path):
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    threading.Thread(target=lambda: [server.accept()[0].recv(1) for _ in range(4)], daemon=True).start()
    try:
        env = {**worker_env, "EMOTION_BROKER__PORT": str(port)}
        out = subprocess.run(
            [sys.executable, "-m", "worker.cli", "run", "--embedded-broker"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        server.close()
    assert out.returncode == 2
    assert f"127.0.0.1:{port} is taken by a program that does not answer MQTT" in out.stdout + out.stderr
    assert "broker.port" in out.stdout + out.stderr


# -- amqtt and its front end, in-process -------------------------------------------------------------------------


@pytest.fixture
def amqtt_broker():
    broker = AmqttBroker("127.0.0.1", 0)
    broker.start()
    yield broker
    broker.stop()


def client(port: int, protocol=mqtt.MQTTv311, name="c") -> mqtt.Client:
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{time.time_ns()}", protocol=protocol)
    c.connect("127.0.0.1", port)
    c.loop_start()
    return c


def test_amqtt_keeps_every_message_of_a_client_that_publishes_and_disconnects_at_once(amqtt_broker):
    # Without the front end, amqtt 0.12 loses each of these: it cancels the task that
    # holds the PUBLISH when it reads the end of the stream before that task ran.
    listener = Listener(amqtt_broker.port, ["t/#"])
    assert listener.subscribed.wait(10)
    for i in range(10):
        connect_publish_disconnect(amqtt_broker.port, f"t/{i}", b"x" * (100 if i % 2 else 150_000), burst=True)
    deadline = time.monotonic() + 10
    while len(listener.messages) < 10 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(m.topic for m in listener.messages) == sorted(f"t/{i}" for i in range(10))
    listener.close()


def test_amqtt_sends_a_retained_message_once_per_subscription(amqtt_broker):
    port = amqtt_broker.port
    worker = client(port, name="w")
    worker.publish("emotion/status/w1", b"online", qos=1, retain=True).wait_for_publish(5)
    others = [Listener(port, ["emotion/status/+"]), Listener(port, ["#"])]  # filters that match it already exist
    for other in others:
        other.wait_for(lambda m: m.payload == b"online", 10)
    late = Listener(port, ["emotion/status/+"])
    late.wait_for(lambda m: m.payload == b"online", 10)
    time.sleep(1.0)  # time for copies to arrive, if any were sent
    assert [(m.topic, m.payload) for m in late.messages] == [("emotion/status/w1", b"online")]
    for listener in [*others, late]:
        listener.close()
    worker.loop_stop()
    worker.disconnect()


def test_amqtt_refuses_an_mqtt5_client_at_once(amqtt_broker, caplog):
    answers = []
    answered = threading.Event()
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="v5", protocol=mqtt.MQTTv5)
    c.on_connect = lambda cl, u, f, rc, p: (answers.append(rc), answered.set())
    c.connect("127.0.0.1", amqtt_broker.port)
    c.loop_start()
    try:
        assert answered.wait(5), "the MQTT 5 client hung"
    finally:
        c.loop_stop()
    assert answers[0].value == 0x84  # unsupported protocol version: the client can fall back to 3.1.1
    # The port stays usable, and a port probe that sends nothing logs no error.
    socket.create_connection(("127.0.0.1", amqtt_broker.port)).close()
    assert probe("127.0.0.1", amqtt_broker.port) == "3.1.1"
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


def test_watch_and_publish_fall_back_to_mqtt_311_on_amqtt(amqtt_broker, worker_env, tmp_path):
    env = {**worker_env, "EMOTION_MQTT__PORT": str(amqtt_broker.port)}
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "watch", "--timeout", "1"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert f"on 127.0.0.1:{amqtt_broker.port} (MQTT 3.1.1)" in out.stderr


def test_probe_tells_mqtt_5_from_nothing(mosquitto):
    assert probe("127.0.0.1", mosquitto.port) == "5"
    assert probe("127.0.0.1", free_port()) is None


def test_start_broker_refuses_a_missing_mosquitto(monkeypatch):
    monkeypatch.setattr("worker.broker.find_mosquitto", lambda: None)
    with pytest.raises(BrokerError, match="apt install mosquitto"):
        start_broker("mosquitto", "127.0.0.1", free_port())


@needs_mosquitto
def test_mosquitto_child_stops_when_the_worker_is_killed(worker_env, tmp_path):
    proc, log, port = worker_with_embedded_broker(worker_env, tmp_path, "mosquitto")
    try:
        wait_port(port, STARTUP_S)
        status = Listener(port, [STATUS])
        status.wait_for(lambda m: m.payload == b"online", STARTUP_S, "'online'")
        status.close()
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        except OSError:
            return
        time.sleep(0.1)
    raise AssertionError("Mosquitto still listens after the worker was killed")
