"""MqttLink against a real Mosquitto: what happens to events while the broker is away, and every way one is lost."""

from __future__ import annotations

import io
import json
import logging
import time

import paho.mqtt.client as mqtt
import pytest

from tests.conftest import Listener, Mosquitto, Outage, free_port, publisher
from worker.config import Settings
from worker.mqtt import DEFAULT_SESSION_EXPIRY_S, MqttLink, session_expiry_s

EVENTS = "emotion/events"
ERRORS = "emotion/errors"
STATE = "emotion/state/kitchen"


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


def records(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def by_topic(lines: list[dict]) -> dict:
    """The per-topic counts of throttled log lines, added up."""
    total: dict = {}
    for line in lines:
        for topic, n in line["by_topic"].items():
            total[topic] = total.get(topic, 0) + n
    return total


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


@pytest.fixture
def broker(tmp_path):
    made = []

    def make(extra: str = "", persistence: bool = False) -> Mosquitto:
        workdir = tmp_path / f"broker-{len(made)}"
        workdir.mkdir()
        made.append(Mosquitto(workdir, persistence=persistence, extra=extra))
        made[-1].start()
        return made[-1]

    yield make
    for b in made:
        b.stop()


@pytest.fixture
def clients():
    """``clients(x)`` registers a link, listener or relay to be closed after the test."""
    made = []

    def keep(x):
        made.append(x)
        return x

    yield keep
    for x in reversed(made):
        x.close()


def link_to(port: int, on_frame=lambda *a: None, **mqtt_settings) -> MqttLink:
    settings = Settings(
        mqtt={"port": port, "client_id": "w1", "reconnect_min_s": 0.2, "reconnect_max_s": 1, **mqtt_settings}
    )
    link = MqttLink(settings, on_frame=on_frame)
    link.start()
    assert link.wait_connected(10), "the worker's client did not connect"
    return link


def lost(link: MqttLink) -> dict:
    return link.stats.snapshot()["publishes_dropped_by_reason"]


def test_an_outage_longer_than_the_queue_keeps_the_newest_and_online_goes_out_first(broker, clients, json_log):
    b = broker()
    relay = clients(Outage(b.port))
    listener = clients(Listener(b.port, [EVENTS, "emotion/status/+", "emotion/state/+"]))
    link = clients(link_to(relay.port, queue_size=50))
    listener.wait_for(lambda m: m.topic == link.status_topic and m.payload == b"online", 10, "'online'")

    relay.cut()  # the broker stays up and sees the worker vanish: its last will says offline
    listener.wait_for(lambda m: m.topic == link.status_topic and m.payload == b"offline", 15, "the last will")
    wait_until(lambda: not link.connected.is_set(), 10, "disconnect seen by the worker's client")
    for n in range(120):
        link.publish_json(EVENTS, {"n": n})
        if n % 40 == 0:
            link.publish_json(STATE, {"n": n}, retain=True)  # retained: only the last one matters, never dropped
    assert link.held == 50 + 1
    assert lost(link) == {"queue_full": {EVENTS: 70}}
    seen = len(listener.messages)

    relay.restore()
    assert link.wait_connected(15), "the worker's client did not reconnect"
    listener.wait_for(lambda m: m.topic == EVENTS and numbered(119)(m), 15, "the newest event")
    after = listener.messages[seen:]
    assert (after[0].topic, after[0].payload) == (link.status_topic, b"online"), "online must come first"
    assert [json.loads(m.payload)["n"] for m in after if m.topic == EVENTS] == list(range(70, 120))
    assert [json.loads(m.payload)["n"] for m in after if m.topic == STATE] == [80]
    retained = clients(Listener(b.port, [link.status_topic])).wait_for(lambda m: True, 10, "retained status")
    assert retained.payload == b"online" and retained.retain
    lines = [r for r in records(json_log) if r["event"] == "outage queue full, dropping the oldest messages"]
    assert sum(r["count"] for r in lines) == 70 and 1 <= len(lines) <= 3, lines
    assert all(r["level"] == "warning" and r["loss"] == "queue_full" and r["queue_size"] == 50 for r in lines)
    assert by_topic(lines) == {EVENTS: 70}
    sent = next(r for r in records(json_log) if r["event"] == "sent what waited for the broker")
    assert sent["messages"] == 51


def test_a_retained_value_that_waited_is_not_overwritten_by_an_older_one_sent_again(broker, clients):
    b = broker()
    relay = clients(Outage(b.port))
    link = clients(link_to(relay.port))
    wait_until(lambda: link.unacknowledged == 0, 10, "'online' acknowledged")
    relay.pause()  # what the worker sends now stays in socket buffers, unacknowledged
    link.publish_json(STATE, {"n": 1}, retain=True)
    relay.cut()  # paho sends {"n": 1} again on the next connection
    wait_until(lambda: not link.connected.is_set(), 10, "disconnect")
    link.publish_json(STATE, {"n": 2}, retain=True)  # waits in the outage queue
    relay.restore()
    assert link.wait_connected(15)
    wait_until(lambda: link.unacknowledged == 0, 10, "everything acknowledged")
    retained = clients(Listener(b.port, [STATE])).wait_for(lambda m: True, 10, "the retained state")
    assert json.loads(retained.payload) == {"n": 2}


def test_a_queue_of_zero_keeps_nothing_but_the_retained(broker, clients):
    b = broker()
    relay = clients(Outage(b.port))
    link = clients(link_to(relay.port, queue_size=0))
    relay.cut()
    wait_until(lambda: not link.connected.is_set(), 10, "disconnect")
    link.publish_json(EVENTS, {"n": 1})
    link.publish_json(STATE, {"n": 1}, retain=True)
    assert link.held == 1
    assert lost(link) == {"queue_full": {EVENTS: 1}}


ACL_DENY_EVENTS = "topic readwrite #\ntopic deny emotion/events\n"


def test_publishes_the_broker_refuses_are_logged_and_counted_by_topic(broker, clients, tmp_path, json_log):
    acl = tmp_path / "acl"
    acl.write_text(ACL_DENY_EVENTS)
    b = broker(extra=f"acl_file {acl}\n")
    listener = clients(Listener(b.port, [EVENTS, ERRORS]))
    link = clients(link_to(b.port))
    for n in range(3):
        link.publish_json(EVENTS, {"n": n})
    link.publish_json(ERRORS, {"n": 9})
    listener.wait_for(lambda m: m.topic == ERRORS, 10, "the error record, which the broker allows")
    wait_until(lambda: lost(link).get("refused", {}).get(EVENTS) == 3, 10, "three refusals")
    assert lost(link) == {"refused": {EVENTS: 3}}
    assert listener.on(EVENTS) == []
    link.close()
    lines = [r for r in records(json_log) if r["event"] == "broker refused messages"]
    assert lines and all(r["level"] == "error" and r["reason"] == "Not authorized" for r in lines), lines
    assert by_topic(lines) == {EVENTS: 3}


def test_a_second_client_with_the_same_id_is_named_in_an_error_not_silently_fought(broker, clients, json_log):
    # Mosquitto 2.0.11 closes the taken-over connection without a DISCONNECT reason (2.0.15 sends
    # "Session taken over"); the worker tells a tug of war by connections the broker keeps closing at once.
    b = broker()
    link = clients(link_to(b.port, client_id="twin", reconnect_max_s=2))
    other = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="twin", protocol=mqtt.MQTTv5)
    other.connect("127.0.0.1", b.port)
    other.loop_start()
    wait_until(lambda: link.stats.counts["client_id_conflicts"] >= 1, 30, "the conflict seen by the worker")
    other.disconnect()
    other.loop_stop()
    line = next(r for r in records(json_log) if r["level"] == "error")
    assert "another client probably uses this worker's client id" in line["event"], line
    assert "mqtt.client_id" in line["event"] and line["client_id"] == "twin" and line["retry_in_s"] == 2
    assert link.wait_connected(15), "the worker did not come back once the other client left"


def test_a_session_taken_over_reason_is_reported_at_once(json_log):
    from paho.mqtt.client import DisconnectFlags
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.reasoncodes import ReasonCode

    link = MqttLink(Settings(mqtt={"client_id": "twin", "reconnect_max_s": 7}), on_frame=lambda *a: None)
    taken = ReasonCode(PacketTypes.DISCONNECT, identifier=0x8E)
    link._in_session = True  # as after an accepted connection
    link._on_disconnect(link.client, None, DisconnectFlags(False), taken, Properties(PacketTypes.DISCONNECT))
    assert link.stats.counts["client_id_conflicts"] == 1
    (line,) = records(json_log)
    assert line["event"].startswith("another client connected with this worker's client id and took its session")
    assert line["level"] == "error" and line["client_id"] == "twin" and line["retry_in_s"] == 7
    assert link.client._reconnect_min_delay == 7  # no tug of war: the next try waits the longest delay


def test_messages_still_waiting_at_shutdown_are_counted(broker, clients, json_log):
    b = broker()
    relay = clients(Outage(b.port))
    link = link_to(relay.port)
    wait_until(lambda: link.unacknowledged == 0, 10, "'online' acknowledged")
    relay.cut()
    wait_until(lambda: not link.connected.is_set(), 10, "disconnect")
    for n in range(5):
        link.publish_json(EVENTS, {"n": n})
    link.publish_json(ERRORS, {"n": 5}, qos=0)
    link.close(timeout=0.5)
    assert lost(link) == {"shutdown": {EVENTS: 5, ERRORS: 1}}
    lines = [r for r in records(json_log) if r["event"].startswith("messages still waiting")]
    assert sum(r["count"] for r in lines) == 6 and by_topic(lines) == {EVENTS: 5, ERRORS: 1}
    assert all(r["level"] == "error" and r["loss"] == "shutdown" for r in lines)


def test_qos0_messages_the_client_had_not_written_when_the_link_dropped_are_counted(broker, clients):
    b = broker()
    relay = clients(Outage(b.port))
    listener = clients(Listener(b.port, [ERRORS]))
    link = clients(link_to(relay.port))
    relay.pause()  # the link stalls: the socket buffers fill and paho keeps the rest
    big = b"x" * 1_000_000
    sent = 30
    for _ in range(sent):
        link.publish(ERRORS, big, qos=0)
    relay.cut()
    relay.restore()
    assert link.wait_connected(15)
    wait_until(lambda: "connection_lost" in lost(link), 10, "the count of unwritten QoS 0 messages")
    counted = lost(link)["connection_lost"][ERRORS]
    time.sleep(1)
    # Some of the 30 MB sat in socket buffers and went with the connection too; those no client can see.
    assert 1 <= counted and counted + len(listener.on(ERRORS)) <= sent, (counted, len(listener.on(ERRORS)))


def test_a_publish_the_client_itself_refuses_is_counted(broker, clients):
    b = broker()
    relay = clients(Outage(b.port))
    settings = Settings(mqtt={"port": relay.port, "client_id": "w1", "reconnect_min_s": 0.2, "reconnect_max_s": 1})
    link = clients(MqttLink(settings, on_frame=lambda *a: None))
    link.client.max_queued_messages_set(1)  # paho's own limit, which the worker leaves unset, refuses the second
    link.start()
    assert link.wait_connected(10)
    wait_until(lambda: link.unacknowledged == 0, 10, "'online' acknowledged")
    relay.pause()  # no acknowledgement comes back, so the first event keeps paho's one place
    for n in range(3):
        link.publish_json(EVENTS, {"n": n})
    assert lost(link) == {"publish_error": {EVENTS: 2}}


# -- persistent sessions ----------------------------------------------------------------------------------


def test_session_expiry_defaults_to_an_hour_and_to_none_for_a_shared_group():
    assert session_expiry_s(Settings()) == DEFAULT_SESSION_EXPIRY_S == 3600
    shared = {"frames": ["$share/emotion/emotion/frames/+"]}
    assert session_expiry_s(Settings(topics=shared)) == 0
    assert session_expiry_s(Settings(topics=shared, mqtt={"session_expiry_s": 60})) == 60
    assert session_expiry_s(Settings(mqtt={"session_expiry_s": 0})) == 0


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_frames_published_while_the_worker_is_away_wait_for_it(broker, clients, protocol):
    b = broker()
    camera = publisher(b.port)
    got: list[bytes] = []

    def frame(topic, payload, at, reply=None):
        got.append(payload)

    link = link_to(b.port, on_frame=frame, protocol=protocol)
    camera.publish("emotion/frames/cam", b"before", qos=1)
    wait_until(lambda: got == [b"before"], 10, "the frame before the restart")
    link.stop_consuming()
    camera.publish("emotion/frames/cam", b"while stopping", qos=1)  # arrives, is left unacknowledged
    wait_until(lambda: link.left_at_stop == 1, 10, "the frame that came while stopping")
    link.close()
    for n in range(3):
        camera.publish("emotion/frames/cam", f"away {n}".encode(), qos=1).wait_for_publish(5)

    clients(link_to(b.port, on_frame=frame, protocol=protocol))
    wait_until(lambda: len(got) == 5, 10, "the frames kept by the broker")
    assert got == [b"before", b"while stopping", b"away 0", b"away 1", b"away 2"]
    camera.loop_stop()


def test_without_a_session_frames_published_while_away_are_not_kept(broker, clients):
    b = broker()
    camera = publisher(b.port)
    got: list[bytes] = []
    link = link_to(b.port, on_frame=lambda t, p, a, r=None: got.append(p), session_expiry_s=0)
    link.stop_consuming()
    link.close()
    camera.publish("emotion/frames/cam", b"away", qos=1).wait_for_publish(5)
    clients(link_to(b.port, on_frame=lambda t, p, a, r=None: got.append(p), session_expiry_s=0))
    deadline = time.monotonic() + 10
    while not got:  # until the new subscription is in place
        assert time.monotonic() < deadline, "no frame after the return"
        camera.publish("emotion/frames/cam", b"back", qos=1)
        time.sleep(0.2)
    assert b"away" not in got and got[0] == b"back"
    camera.loop_stop()
