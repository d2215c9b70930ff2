"""Running it for real (docs/running.md), against a real Mosquitto with TLS, logins and the shipped ACL.

One broker and one worker serve most tests here, as they would in a home: the
worker logs in over TLS with its password from a systemd credential, reports to a
fake systemd notify socket, writes its heartbeat under $RUNTIME_DIRECTORY and
serves Prometheus metrics. Certificates are made by `openssl` for the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, Listener, free_port, wait_port
from worker.config import Settings
from worker.frames import encode_jpeg
from worker.mqtt import MqttLink

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="makes its certificates with openssl")

PASSWORD = "Tr0ub4dor-3-swordfish"  # the worker's; no log line and no `config` output may hold it
CAMERA_PASSWORD = "kitchen-camera-pw-5150"
STARTUP_S = 90
ACL = REPO / "config" / "mosquitto.acl"
WORKER_ID = "emotion-worker-test"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_cert(cwd: Path, name: str, subject: str, ca: str | None, san: str | None = None) -> None:
    """``name``.key and ``name``.crt: a P-256 key, self-signed when ``ca`` is None, else signed by ``ca``."""
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{name}.key"]
    if ca is None:
        openssl("req", "-x509", *key, "-days", "2", "-subj", subject, "-out", f"{name}.crt", cwd=cwd)
        return
    openssl("req", *key, "-subj", subject, "-out", f"{name}.csr", cwd=cwd)
    ext = []
    if san:
        (cwd / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        ext = ["-extfile", f"{name}.ext"]
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
        "-days", "2", *ext, "-out", f"{name}.crt", cwd=cwd,
    )  # fmt: skip


@pytest.fixture(scope="module")
def certs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("certs")
    make_cert(d, "ca", "/CN=emotion test CA", None)
    make_cert(d, "server", "/CN=localhost", "ca", "DNS:localhost,IP:127.0.0.1")
    make_cert(d, "elsewhere", "/CN=elsewhere.invalid", "ca", "DNS:elsewhere.invalid")
    make_cert(d, "client", "/CN=emotion", "ca")  # the user name the broker takes from it
    make_cert(d, "rogue-ca", "/CN=some other CA", None)
    make_cert(d, "rogue", "/CN=emotion", "rogue-ca")
    return d


class Broker:
    """Mosquitto with four listeners on 127.0.0.1 (per-listener settings):

    ``tls``: TLS, logins, the shipped ACL; ``mtls``: client certificates (the user name is the
    certificate's CN), the shipped ACL; ``elsewhere``: TLS with a certificate for another name;
    ``plain``: anonymous and unrestricted, for the test's own observer.
    """

    def __init__(self, workdir: Path, certs: Path):
        self.ports = {name: free_port() for name in ("tls", "mtls", "elsewhere", "plain")}
        self.log = workdir / "mosquitto.log"
        passwd = workdir / "passwd"
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(passwd), "emotion", PASSWORD], check=True, timeout=30)
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), "kitchen", CAMERA_PASSWORD], check=True, timeout=30)
        server = f"cafile {certs}/ca.crt\ncertfile {certs}/server.crt\nkeyfile {certs}/server.key\n"
        p = self.ports
        conf = (
            "per_listener_settings true\n"
            f"listener {p['tls']} 127.0.0.1\n{server}allow_anonymous false\npassword_file {passwd}\nacl_file {ACL}\n"
            f"listener {p['mtls']} 127.0.0.1\n{server}require_certificate true\nuse_identity_as_username true\n"
            f"allow_anonymous false\nacl_file {ACL}\n"
            f"listener {p['elsewhere']} 127.0.0.1\ncafile {certs}/ca.crt\ncertfile {certs}/elsewhere.crt\n"
            f"keyfile {certs}/elsewhere.key\nallow_anonymous true\n"
            f"listener {p['plain']} 127.0.0.1\nallow_anonymous true\n"
            "persistence false\nlog_type all\n"
            f"log_dest file {self.log}\n" + ("user root\n" if os.geteuid() == 0 else "")
        )
        self.conf = workdir / "mosquitto.conf"
        self.conf.write_text(conf)
        self.proc = subprocess.Popen(
            [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for port in self.ports.values():
            wait_port(port)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def broker(tmp_path_factory, certs):
    b = Broker(tmp_path_factory.mktemp("broker"), certs)
    yield b
    b.stop()


def tls_client(port: int, certs: Path, user: str, password: str, client_id: str) -> mqtt.Client:
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id)
    client.tls_set(ca_certs=str(certs / "ca.crt"))
    client.username_pw_set(user, password)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, p: connected.set() if not rc.is_failure else None
    client.connect("127.0.0.1", port)
    client.loop_start()
    assert connected.wait(15), f"{user} could not log in"
    return client


class Notifications:
    """A fake systemd notify socket that records every datagram."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096).decode()
            except (TimeoutError, OSError):
                continue
            with self._cond:
                self.messages.extend(data.split("\n"))
                self._cond.notify_all()

    def lines(self, prefix: str) -> list[str]:
        with self._cond:
            return [m for m in self.messages if m.startswith(prefix)]

    def wait_for(self, predicate, timeout: float, what: str) -> list[str]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self.messages):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no {what} within {timeout} s; got {self.messages[-20:]}")
                self._cond.wait(left)
            return list(self.messages)

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()


def worker_env(broker: Broker, certs: Path, tiny_checkpoint: Path, workdir: Path, password: str) -> dict[str, str]:
    """A worker on the TLS listener, its password a systemd credential, notify socket, metrics and heartbeat on."""
    creds = workdir / "credentials"
    creds.mkdir()
    (creds / "mqtt_password").write_text(password + "\n")
    (workdir / "run").mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTION_")}
    env.update(
        EMOTION_MQTT__HOST="127.0.0.1",
        EMOTION_MQTT__PORT=str(broker.ports["tls"]),
        EMOTION_MQTT__CLIENT_ID=WORKER_ID,
        EMOTION_MQTT__USERNAME="emotion",
        EMOTION_MQTT__TLS__ENABLED="true",
        EMOTION_MQTT__TLS__CA_CERTS=str(certs / "ca.crt"),
        EMOTION_MQTT__RECONNECT_MIN_S="0.2",
        EMOTION_MQTT__RECONNECT_MAX_S="1",
        EMOTION_TOPICS__FRAMES='["$share/emotion/emotion/frames/+"]',
        EMOTION_MODEL__WEIGHTS=str(tiny_checkpoint),
        EMOTION_MODEL__THREADS="1",
        EMOTION_LOG__FORMAT="json",
        EMOTION_LOG__LEVEL="debug",
        EMOTION_PIPELINE__STATS_INTERVAL_S="0",
        EMOTION_METRICS__PORT=str(free_port()),
        EMOTION_METRICS__HOST="127.0.0.1",
        CREDENTIALS_DIRECTORY=str(creds),
        RUNTIME_DIRECTORY=str(workdir / "run"),
        NOTIFY_SOCKET=str(workdir / "notify"),
        WATCHDOG_USEC="1000000",
        PYTHONUNBUFFERED="1",
    )
    return env


def log_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


class Service:
    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir, self.env = workdir, env
        self.notify = Notifications(Path(env["NOTIFY_SOCKET"]))
        self.log = workdir / "worker.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"],
            env=env,
            cwd=REPO,
            stdout=open(self.log, "wb"),
            stderr=subprocess.STDOUT,
        )

    def cli(self, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "worker.cli", *args],
            env=env or self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.notify.close()
        return self.proc.wait()


@pytest.fixture(scope="module")
def observer(broker):
    listener = Listener(broker.ports["plain"], ["emotion/#", "homeassistant/#"])
    yield listener
    listener.close()


@pytest.fixture(scope="module")
def service(broker, certs, tiny_checkpoint, tmp_path_factory, observer):
    workdir = tmp_path_factory.mktemp("service")
    svc = Service(workdir, worker_env(broker, certs, tiny_checkpoint, workdir, PASSWORD))
    try:
        svc.notify.wait_for(lambda m: "READY=1" in m, STARTUP_S, f"READY=1 (log: {svc.log})")
    except AssertionError:
        svc.stop()
        raise AssertionError(f"the worker did not get ready: {svc.log.read_text()[-3000:]}") from None
    yield svc
    svc.stop()


def test_ready_comes_once_the_model_is_warm_and_the_broker_accepted_the_login(service, observer):
    events = [r["event"] for r in log_records(service.log)]
    assert "model loaded" in events and "connected" in events
    assert events.index("model loaded") < events.index("connected")
    assert service.notify.lines("READY=1") == ["READY=1"]
    status = observer.wait_for(lambda m: m.topic == f"emotion/status/{WORKER_ID}", 10, "worker status")
    assert status.payload == b"online"
    port = service.env["EMOTION_MQTT__PORT"]
    service.notify.wait_for(
        lambda m: any(line.startswith(f"STATUS=serving 127.0.0.1:{port}") for line in m), 10, "STATUS=serving"
    )


def test_watchdog_is_pinged_while_the_pipeline_is_fresh(service):
    # WATCHDOG_USEC is 1 s: a ping every 0.5 s.
    service.notify.wait_for(lambda m: m.count("WATCHDOG=1") >= 3, 30, "three WATCHDOG=1")


def test_health_command_reads_the_heartbeat_from_a_second_process(service):
    out = service.cli("health")
    assert out.returncode == 0, out
    assert out.stdout.startswith("healthy: heartbeat") and "connected to the broker" in out.stdout
    assert (Path(service.env["RUNTIME_DIRECTORY"]) / "heartbeat").is_file()


@pytest.fixture(scope="module")
def traffic(service, broker, certs, face_frames, observer):
    """A camera logged in as 'kitchen' sends two faces and a broken frame, then tries what the ACL forbids."""
    camera = tls_client(broker.ports["tls"], certs, "kitchen", CAMERA_PASSWORD, "kitchen-cam")
    jpeg = encode_jpeg(face_frames[0][0])
    try:
        camera.publish("emotion/frames/hall", jpeg, qos=1).wait_for_publish(10)  # not its own topic
        camera.publish("emotion/events", b'{"forged": true}', qos=1).wait_for_publish(10)
        for i, payload in enumerate((jpeg, b"not a picture", jpeg)):
            camera.publish("emotion/frames/kitchen", payload, qos=1).wait_for_publish(10)
            observer.wait_for(
                lambda m: m.topic in ("emotion/events", "emotion/errors") and len(outputs(observer)) > i,
                30,
                f"the worker's answer to frame {i}",
            )
    finally:
        camera.loop_stop()
        camera.disconnect()
    return observer


def outputs(observer: Listener) -> list:
    return observer.on("emotion/events") + observer.on("emotion/errors")


def test_a_camera_may_write_only_its_own_frames_topic(traffic, broker):
    events = [json.loads(m.payload) for m in traffic.on("emotion/events")]
    assert [e["device_id"] for e in events] == ["kitchen", "kitchen"]
    assert all("forged" not in e for e in events)
    assert traffic.on("emotion/frames/hall") == []
    (error,) = traffic.on("emotion/errors")
    assert json.loads(error.payload)["reason"] == "not_an_image"
    denied = [line for line in broker.log.read_text().splitlines() if "Denied PUBLISH from kitchen-cam" in line]
    assert len(denied) == 2 and "'emotion/frames/hall'" in denied[0] and "'emotion/events'" in denied[1]


def test_metrics_endpoint_exports_what_the_worker_did(traffic, service):
    url = f"http://127.0.0.1:{service.env['EMOTION_METRICS__PORT']}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def value(name: str, **labels) -> float:
        return samples[(name, tuple(sorted(labels.items())))]

    assert value("emotion_frames_received_total") == 3  # the frame to emotion/frames/hall never arrived
    assert value("emotion_frames_total", outcome="processed") == 2
    assert value("emotion_frames_total", outcome="rejected") == 1
    assert value("emotion_frames_total", outcome="dropped") == 0
    assert value("emotion_frames_total", outcome="stale") == 0
    assert value("emotion_frames_rejected_total", reason="not_an_image") == 1
    assert value("emotion_events_total") == 2
    assert value("emotion_faces_total") == 2
    assert value("emotion_latency_seconds_count") == 2
    assert value("emotion_latency_seconds_bucket", le="+Inf") == 2
    assert 0 < value("emotion_latency_seconds_sum") < 60
    assert value("emotion_inference_seconds_count") in (1, 2)  # the two faces may share a batch
    assert value("emotion_batch_faces_sum") == 2
    assert value("emotion_queue_depth", queue="inbox") == 0
    assert value("emotion_queue_depth", queue="ready") == 0
    assert value("emotion_mqtt_connected") == 1
    assert 0 <= value("emotion_heartbeat_age_seconds") < 30
    model = dict(next(labels for (name, labels) in samples if name == "emotion_model_info"))
    assert model.pop("precision") in ("fp32", "bf16")
    assert model == {"name": "tiny-test", "version": "t1", "device": "cpu", "tta": "none"}  # auto on a CPU
    assert value("emotion_worker_info", version=__import__("worker").__version__) == 1
    assert not any(name.startswith("emotion_gpu_memory") for name, _ in samples)  # on the CPU
    assert "# TYPE emotion_publishes_dropped_total counter" in text
    # Every metric docs/running.md names is exported (GPU memory on CUDA only: tests/worker/test_metrics.py).
    exported = set(re.findall(r"^# TYPE (\S+)", text, re.M)) | {name for name, _ in samples}
    documented = set(re.findall(r"\bemotion_[a-z_]+", (REPO / "docs" / "running.md").read_text()))
    assert documented - exported == {"emotion_gpu_memory_bytes"}, documented - exported


def test_the_worker_may_write_every_topic_the_acl_names_and_a_camera_none(broker, certs, observer):
    topics = [
        "emotion/state/kitchen",
        "emotion/changes",
        "emotion/stats",
        "emotion/actions",
        "emotion/status/other-worker",
        "homeassistant/sensor/kitchen_emotion/config",
    ]
    worker = tls_client(broker.ports["tls"], certs, "emotion", PASSWORD, "acl-worker")
    camera = tls_client(broker.ports["tls"], certs, "kitchen", CAMERA_PASSWORD, "acl-camera")
    try:
        for topic in topics:
            camera.publish(topic, b"from the camera", qos=1).wait_for_publish(10)
            worker.publish(topic, b"from the worker", qos=1).wait_for_publish(10)
        for topic in topics:
            observer.wait_for(lambda m: m.topic == topic and m.payload == b"from the worker", 10, topic)
        assert [m.topic for m in observer.messages if m.payload == b"from the camera"] == []

        # It reads Home Assistant's online message, and not the events (of another worker, say).
        got, arrived = [], threading.Event()
        worker.on_message = lambda c, u, m: (got.append(m.topic), arrived.set() if m.topic.startswith("home") else None)
        subscribed = threading.Event()
        worker.on_subscribe = lambda *a: subscribed.set()
        worker.subscribe([("emotion/events", 1), ("homeassistant/status", 1)])
        assert subscribed.wait(10)
        observer.client.publish("emotion/events", b"{}", qos=1).wait_for_publish(10)
        observer.client.publish("homeassistant/status", b"online", qos=1).wait_for_publish(10)
        assert arrived.wait(10), got
        assert got == ["homeassistant/status"]
    finally:
        for c in (worker, camera):
            c.loop_stop()
            c.disconnect()


def test_under_the_acl_the_worker_reads_back_what_it_announced_to_home_assistant(service, observer):
    """Discovery reads its own retained configs and the workers' status topics; the ACL must allow both."""
    observer.wait_for(
        lambda m: m.topic.startswith("homeassistant/sensor/emotion_worker/worker_"), 30, "the worker's discovery"
    )
    deadline = time.monotonic() + 30
    while not (begun := [r for r in log_records(service.log) if r["event"] == "announcing to Home Assistant"]):
        assert time.monotonic() < deadline, "discovery did not start"
        time.sleep(0.2)
    assert begun[0]["read_back"] is True, begun


def link_settings(port: int, certs: Path, **mqtt_settings) -> Settings:
    tls = {"enabled": True, "ca_certs": certs / "ca.crt", **mqtt_settings.pop("tls", {})}
    return Settings(
        mqtt={
            "host": "127.0.0.1",
            "port": port,
            "reconnect_min_s": 0.2,
            "reconnect_max_s": 1,
            "tls": tls,
            **mqtt_settings,
        }
    )


def test_mutual_tls_with_a_client_certificate(broker, certs, observer):
    settings = link_settings(
        broker.ports["mtls"],
        certs,
        client_id="mtls-worker",
        tls={"certfile": certs / "client.crt", "keyfile": certs / "client.key"},
    )
    link = MqttLink(settings, on_frame=lambda *a: None)
    link.start()
    try:
        assert link.wait_connected(15), link.last_error
        # The broker took the user name 'emotion' from the certificate, and the ACL let it announce itself.
        observer.wait_for(
            lambda m: m.topic == "emotion/status/mtls-worker" and m.payload == b"online", 10, "status over mTLS"
        )
    finally:
        link.close()


def test_password_from_a_file(broker, certs, tmp_path):
    secret = tmp_path / "mqtt_password"
    secret.write_text(PASSWORD + "\n")
    settings = link_settings(
        broker.ports["tls"], certs, client_id="file-worker", username="emotion", password_file=secret
    )
    link = MqttLink(settings, on_frame=lambda *a: None)
    link.start()
    try:
        assert link.wait_connected(15), link.last_error
    finally:
        link.close()


def assert_backoff(records: list[dict]) -> None:
    """Attempts at least the backoff's 1 s apart (reconnect_max_s): retried, and not in a tight loop."""
    stamps = [datetime.fromisoformat(r["timestamp"].replace("Z", "+00:00")).timestamp() for r in records]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    assert gaps and all(g >= 0.8 for g in gaps), f"retries without backoff: {gaps}"


def attempts(json_log, event: str, n: int, timeout: float = 30) -> list[dict]:
    """Wait for ``n`` log records of ``event``, retried with backoff, and none that fails to name the cause."""
    deadline = time.monotonic() + timeout
    while True:
        records = [json.loads(line) for line in json_log.getvalue().splitlines()]
        found = [r for r in records if r["event"] == event]
        if len(found) >= n:
            break
        assert time.monotonic() < deadline, f"fewer than {n} '{event}' within {timeout} s: {records}"
        time.sleep(0.1)
    assert_backoff(found)
    assert not [r for r in records if r["event"] == "broker unreachable, retrying"], "the cause was not named"
    return found


@pytest.mark.parametrize(
    "case, expected",
    [
        ("untrusted", r"^TLS handshake failed: certificate verify failed: .+ \(is mqtt\.tls\.ca_certs the CA"),
        ("other name", r"^TLS handshake failed: certificate verify failed: IP address mismatch.+does not match"),
    ],
)
def test_a_broker_certificate_that_does_not_match_is_named_and_retried(broker, certs, json_log, case, expected):
    if case == "untrusted":
        settings = link_settings(broker.ports["tls"], certs, tls={"ca_certs": certs / "rogue-ca.crt"})
    else:
        settings = link_settings(broker.ports["elsewhere"], certs)
    link = MqttLink(settings, on_frame=lambda *a: None)
    link.start()
    try:
        found = attempts(json_log, "TLS handshake failed, retrying", 2)
    finally:
        link.close()
    assert all(r["level"] == "error" and re.search(expected, r["error"]) for r in found), found
    assert not link.connected.is_set()


@pytest.mark.parametrize(
    "cert, event, expected",
    [
        (
            None,
            "TLS handshake failed, retrying",
            "TLS handshake failed: the broker requires a client certificate (mqtt.tls.certfile, mqtt.tls.keyfile): "
            "tlsv13 alert certificate required",
        ),
        (
            "rogue",
            "TLS handshake failed, retrying",
            "TLS handshake failed: the broker does not trust the client certificate (mqtt.tls.certfile): "
            "tlsv1 alert unknown ca",
        ),
    ],
)
def test_a_client_certificate_missing_or_not_trusted_is_named_and_retried(
    broker, certs, json_log, cert, event, expected
):
    tls = {"certfile": certs / f"{cert}.crt", "keyfile": certs / f"{cert}.key"} if cert else {}
    link = MqttLink(link_settings(broker.ports["mtls"], certs, tls=tls), on_frame=lambda *a: None)
    link.start()
    try:
        found = attempts(json_log, event, 2)
    finally:
        link.close()
    assert all(r["error"] == expected and r["level"] == "error" for r in found), found
    assert link.last_error == expected


def test_plain_mqtt_to_a_tls_port_is_named_and_retried(broker, json_log):
    settings = Settings(
        mqtt={"host": "127.0.0.1", "port": broker.ports["tls"], "reconnect_min_s": 0.2, "reconnect_max_s": 1}
    )
    link = MqttLink(settings, on_frame=lambda *a: None)
    link.start()
    try:
        found = attempts(json_log, "broker closed the connection before accepting it, retrying", 2)
    finally:
        link.close()
    expected = "the broker closed the connection before accepting it: does this port require TLS (mqtt.tls.enabled)?"
    assert all(r["error"] == expected for r in found), found
    records = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert not [r for r in records if r.get("logger", "").startswith("paho")], "paho's own lines repeat the cause"


def test_a_wrong_password_is_named_and_the_worker_retries_without_getting_ready(
    broker, certs, tiny_checkpoint, tmp_path
):
    wrong = "not-the-" + PASSWORD
    svc = Service(tmp_path, worker_env(broker, certs, tiny_checkpoint, tmp_path, wrong))
    try:
        deadline = time.monotonic() + STARTUP_S
        while len([r for r in log_records(svc.log) if r["event"] == "broker refused the connection, retrying"]) < 3:
            assert svc.proc.poll() is None, f"the worker exited: {svc.log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, svc.log.read_text()[-2000:]
            time.sleep(0.2)
        refused = [r for r in log_records(svc.log) if r["event"] == "broker refused the connection, retrying"]
        assert all(r["level"] == "error" for r in refused)
        assert_backoff(refused)
        assert all(
            r["error"].startswith(
                "Not authorized: check mqtt.username and the password (mqtt.password, "
                "mqtt.password_file or the credential mqtt_password)"
            )
            for r in refused
        ), refused
        svc.notify.wait_for(
            lambda m: any(line.startswith("STATUS=waiting for the broker") and "Not authorized" in line for line in m),
            15,
            "STATUS naming the refusal",
        )
        assert svc.notify.lines("READY=1") == []
        # An idle pipeline is healthy while the worker waits for the broker; the check says it is not connected.
        out = svc.cli("health")
        assert out.returncode == 0 and "not connected to the broker" in out.stdout, out
        assert svc.proc.poll() is None
    finally:
        assert svc.stop() == 0
    text = svc.log.read_text()
    assert wrong not in text and PASSWORD not in text


def test_config_output_never_shows_the_password(service, tmp_path):
    secret = tmp_path / "mqtt_password"
    secret.write_text(PASSWORD)
    for extra in ({}, {"EMOTION_MQTT__PASSWORD": PASSWORD}, {"EMOTION_MQTT__PASSWORD_FILE": str(secret)}):
        for fmt in ((), ("--json",)):
            out = service.cli("config", *fmt, env={**service.env, **extra})
            assert out.returncode == 0, out
            assert PASSWORD not in out.stdout + out.stderr
    out = service.cli("config", env={**service.env, "EMOTION_MQTT__PASSWORD": PASSWORD})
    assert 'password = "**********"' in out.stdout
    out = service.cli("config", env={**service.env, "EMOTION_MQTT__PASSWORD_FILE": str(secret)})
    assert f'password_file = "{secret}"' in out.stdout
    # A bad value next to the password: the error names the key, never the secret.
    out = service.cli(
        "config", env={**service.env, "EMOTION_MQTT__PASSWORD": PASSWORD, "EMOTION_MQTT__PASSWORD_FILE": str(secret)}
    )
    assert out.returncode == 2 and "password or password_file, not both" in out.stderr
    assert PASSWORD not in out.stdout + out.stderr


# Last: stops the shared worker.
def test_stop_says_stopping_removes_the_heartbeat_and_no_log_line_holds_the_password(service, broker):
    code = service.stop()
    assert code == 0
    assert "STOPPING=1" in service.notify.messages
    assert not (Path(service.env["RUNTIME_DIRECTORY"]) / "heartbeat").exists()
    out = service.cli("health")
    assert out.returncode == 1 and "no heartbeat file" in out.stderr
    text = service.log.read_text()
    assert len(text.splitlines()) > 10 and PASSWORD not in text
    # The stats log line counts what the metrics exported (test_metrics_endpoint_exports_what_the_worker_did).
    (stopped,) = [r for r in log_records(service.log) if r["event"] == "stopped"]
    assert (stopped["received"], stopped["processed"], stopped["events"], stopped["rejected"]) == (3, 2, 2, 1)
    broker_log = broker.log.read_text()
    assert (
        f"Denied PUBLISH from {WORKER_ID}" not in broker_log and f"Denied SUBSCRIBE from {WORKER_ID}" not in broker_log
    )
    assert PASSWORD not in broker_log
