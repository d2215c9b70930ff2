"""MqttLink against a real Mosquitto: what happens to events while the broker is away."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest
import structlog

from tests.conftest import Listener, Mosquitto, free_port
from worker.config import Settings
from worker.log import setup_logging
from worker.mqtt import MqttLink

EVENTS = "emotion/events"


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.05)


def numbered(n: int):
    return lambda msg: json.loads(msg.payload)["n"] == n


def test_events_published_while_the_broker_is_away_arrive_after_it_returns(tmp_path):
    # Sessions survive the restart, so the test does not depend on who reconnects first.
    broker = Mosquitto(tmp_path, persistence=True)
    broker.start()
    settings = Settings(mqtt={"port": broker.port, "reconnect_min_s": 0.2, "reconnect_max_s": 1})
    link = MqttLink(settings, on_frame=lambda *a: None)
    listener = Listener(broker.port, [EVENTS], persistent=True)
    try:
        link.start()
        assert link.wait_connected(10), "the worker's client did not connect"
        link.publish_json(EVENTS, {"n": 0})
        listener.wait_for(numbered(0), 10, "event before the outage")

        broker.stop()
        assert (tmp_path / "mosquitto.db").is_file(), f"the broker kept no sessions: {broker.log.read_text()}"
        wait_until(lambda: not link.connected.is_set(), 10, "disconnect seen by the worker's client")
        for n in (1, 2, 3):
            link.publish_json(EVENTS, {"n": n})
        broker.start()

        assert link.wait_connected(15), "the worker's client did not reconnect"
        listener.wait_for(numbered(3), 15, "last event published during the outage")
        assert [json.loads(m.payload)["n"] for m in listener.on(EVENTS)] == [0, 1, 2, 3]
    finally:
        link.close()
        listener.close()
        broker.stop()


@pytest.fixture
def json_log():
    """The worker's JSON logging into a buffer; the process's logging is restored afterwards."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    buf = io.StringIO()
    setup_logging("info", "json", stream=buf)
    yield buf
    structlog.reset_defaults()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_library_log_records_are_json_lines_too(json_log):
    logging.getLogger("paho.mqtt.client").warning("socket %s closed", "x")
    logging.getLogger("amqtt.broker").info("below the library threshold")
    (line,) = json_log.getvalue().splitlines()
    record = json.loads(line)
    assert record["event"] == "socket x closed"
    assert record["level"] == "warning" and record["logger"] == "paho.mqtt.client"
    assert "timestamp" in record


def test_reconnection_attempts_log_warnings_not_paho_errors(json_log):
    settings = Settings(mqtt={"port": free_port(), "reconnect_min_s": 0.2, "reconnect_max_s": 1})
    link = MqttLink(settings, on_frame=lambda *a: None)
    link.start()
    try:
        wait_until(lambda: json_log.getvalue().count("broker unreachable") >= 3, 15, "three failed attempts")
    finally:
        link.close()
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert [r for r in records if r["level"] == "error"] == []
    assert all(r["level"] == "warning" for r in records if r["event"] == "broker unreachable, retrying")
