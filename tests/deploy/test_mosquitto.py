"""The compose broker's configuration, run in a real Mosquitto with the logins make-secrets.sh creates."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from tests.conftest import REPO, free_port, wait_port


def connect(port: int, user: str | None = None, password: str | None = None) -> str:
    """The broker's answer to a login: 'Success' or its refusal."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    if user is not None:
        client.username_pw_set(user, password)
    answer, done = [], threading.Event()
    client.on_connect = lambda c, u, f, rc, p: (answer.append(str(rc)), done.set())
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK"
    finally:
        client.loop_stop()
        client.disconnect()
    return answer[0]


@pytest.fixture
def compose_broker(tmp_path):
    """config/mosquitto.conf with its container paths pointed at the test's files, and the logins from
    docker/make-secrets.sh."""
    secrets = tmp_path / "secrets"
    out = subprocess.run(
        ["sh", str(REPO / "docker" / "make-secrets.sh"), str(secrets)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    port = free_port()
    conf = (REPO / "config" / "mosquitto.conf").read_text()
    for container, here in {
        "listener 1883": f"listener {port} 127.0.0.1",
        "/mosquitto/config/passwd": str(secrets / "mosquitto_passwd"),
        "/mosquitto/config/acl": str(REPO / "config" / "mosquitto.acl"),
        "/mosquitto/data/": f"{tmp_path}/",
    }.items():
        assert container in conf
        conf = conf.replace(container, here)
    # As root Mosquitto would switch to its own user, who cannot read the test's folder.
    (tmp_path / "mosquitto.conf").write_text(conf + ("\nuser root\n" if os.geteuid() == 0 else ""))
    proc = subprocess.Popen(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(tmp_path / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port, secrets, proc
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_compose_broker_takes_logins_only(compose_broker):
    port, secrets, _ = compose_broker
    password = (secrets / "mqtt_password").read_text().strip()
    assert len(password) >= 20
    assert connect(port) == "Not authorized"  # anonymous
    assert connect(port, "emotion", "guess") == "Not authorized"
    assert connect(port, "emotion", password) == "Success"


def test_make_secrets_leaves_existing_logins_alone(compose_broker):
    _, secrets, _ = compose_broker
    before = (secrets / "mqtt_password").read_bytes()
    out = subprocess.run(
        ["sh", str(REPO / "docker" / "make-secrets.sh"), str(secrets)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1 and "already holds the logins" in out.stderr
    assert (secrets / "mqtt_password").read_bytes() == before
    if os.geteuid() == 0:  # the images' users: the worker's 10001, Mosquitto's 1883
        assert (secrets / "mqtt_password").stat().st_uid == 10001
        assert (secrets / "mosquitto_passwd").stat().st_uid == 1883
    assert (secrets / "mqtt_password").stat().st_mode & 0o077 == 0


def test_a_camera_added_with_mosquitto_passwd_can_log_in_after_a_reload(compose_broker):
    port, secrets, proc = compose_broker
    assert connect(port, "kitchen", "its password") == "Not authorized"
    subprocess.run(
        ["mosquitto_passwd", "-b", str(secrets / "mosquitto_passwd"), "kitchen", "its password"], check=True, timeout=30
    )
    proc.send_signal(signal.SIGHUP)  # `docker compose kill -s HUP mosquitto`
    deadline = time.monotonic() + 10
    while connect(port, "kitchen", "its password") != "Success":
        assert time.monotonic() < deadline, "the camera's login did not work after the reload"
        time.sleep(0.2)
