"""The emotion-worker command line: classify, publish, watch, config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cv2
import jsonschema
import pytest

from tests.conftest import FER, REPO, needs_proc, publisher, signals_blocked_by_other_threads, start_worker
from worker.events import EVENT_SCHEMA, load_schema
from worker.signals import hold_stop_signals, wait_for_stop


def cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_classify_prints_one_json_line_per_image(worker_env, tmp_path, face_frames):
    face = tmp_path / "face.jpg"
    cv2.imwrite(str(face), face_frames[0][0])
    blank = tmp_path / "blank.png"
    cv2.imwrite(str(blank), face_frames[0][0] * 0 + 128)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    out = cli("classify", "--json", str(face), str(blank), str(broken), env=worker_env)
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(face), str(blank), str(broken)]
    first = lines[0]
    assert len(first["faces"]) == 1 and first["emotion"] == first["faces"][0]["emotion"]
    x, y, w, h = first["faces"][0]["box"]
    px, py, pw, ph = face_frames[0][1]
    assert abs(x - px) < 40 and abs(y - py) < 40 and abs(w - pw) < 60
    assert lines[1]["faces"] == [] and lines[1]["emotion"] is None
    assert "error" in lines[2]
    assert out.returncode == 1  # one image could not be read

    # --detector none: the image is the face crop itself.
    crop = tmp_path / "crop.jpg"
    cv2.imwrite(str(crop), cv2.imread(str(next((FER / "val" / "sad").glob("*.jpg")))))
    out = cli("classify", "--json", "--detector", "none", str(crop), env=worker_env)
    line = json.loads(out.stdout)
    assert out.returncode == 0 and line["faces"][0]["box"] == [0, 0, 48, 48]


def test_publish_and_watch_round_trip_through_the_worker(worker_env, tmp_path, face_frames, mosquitto):
    images = tmp_path / "photos"
    images.mkdir()
    for i, (frame, _) in enumerate(face_frames[:2]):
        cv2.imwrite(str(images / f"{i}.jpg"), frame)
    worker = start_worker(worker_env, tmp_path / "worker.log")
    try:
        watch = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "watch", "--json", "--count", "2", "--timeout", "90"],
            env=worker_env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        # Wait for the worker's retained 'online' before publishing.
        first = json.loads(watch.stdout.readline())
        assert first["topic"].startswith("emotion/status/") and first["payload"] == "online"
        pub = cli("publish", "--device", "desk", "--images", str(images), "--fps", "10", env=worker_env)
        assert pub.returncode == 0, pub.stderr
        assert pub.stderr.count("published desk-") == 2
        out, _ = watch.communicate(timeout=90)
        assert watch.returncode == 0
        events = [json.loads(line)["payload"] for line in out.splitlines()]
        events = [e for e in events if isinstance(e, dict)]
        assert [e["frame_id"] for e in events] == ["desk-0", "desk-1"]
        for e in events:
            jsonschema.validate(e, load_schema(EVENT_SCHEMA))
            assert e["device_id"] == "desk" and e["meta"]["source"] in ("0.jpg", "1.jpg")
    finally:
        worker.terminate()
        worker.wait(15)


def test_config_prints_effective_settings_with_the_password_masked(worker_env, tmp_path):
    conf = tmp_path / "worker.toml"
    conf.write_text('[mqtt]\nhost = "broker.lan"\nusername = "cam"\npassword = "hunter2"\n[model]\ntta = "none"\n')
    env = {**worker_env, "EMOTION_MQTT__HOST": "from-env.lan"}
    out = cli("config", "--config", str(conf), "--json", env=env)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["mqtt"]["host"] == "from-env.lan"  # environment beats the file
    assert data["mqtt"]["username"] == "cam"
    assert data["mqtt"]["password"] == "**********"
    assert data["model"]["tta"] == "none"
    assert "hunter2" not in out.stdout + out.stderr
    toml_out = cli("config", "--config", str(conf), env=env)
    assert 'password = "**********"' in toml_out.stdout and "hunter2" not in toml_out.stdout


def test_config_with_unknown_key_fails_naming_it(worker_env, tmp_path):
    conf = tmp_path / "worker.toml"
    conf.write_text('[detector]\nkind = "haar"\nmin_face = 30\n')
    out = cli("config", "--config", str(conf), env=worker_env)
    assert out.returncode == 2
    assert "detector.min_face" in out.stderr and "unknown key" in out.stderr


# A process that holds the stop signals, keeps three threads busy (as paho, the
# pipeline and torch do) and reports which signal ended its wait.
WAITER = """
import sys, threading
from worker.signals import hold_stop_signals, wait_for_stop
hold_stop_signals()
def spin():
    while True:
        sum(range(1000))
for _ in range(3):
    threading.Thread(target=spin, daemon=True).start()
print("ready", flush=True)
print(wait_for_stop().name, flush=True)
"""


def test_two_sigterms_at_once_end_the_wait_every_time():
    # `timeout make run` sends two SIGTERMs microseconds apart. A Python handler that
    # sets an Event deadlocked on about one such pair in twenty; hold 25 pairs here.
    for attempt in range(25):
        proc = subprocess.Popen([sys.executable, "-c", WAITER], cwd=REPO, stdout=subprocess.PIPE, text=True)
        try:
            assert proc.stdout.readline() == "ready\n"
            time.sleep(0.01 * (attempt % 5))
            os.kill(proc.pid, signal.SIGTERM)
            os.kill(proc.pid, signal.SIGTERM)
            out, _ = proc.communicate(timeout=10)
        finally:
            proc.kill()
            proc.wait()
        assert (proc.returncode, out) == (0, "SIGTERM\n"), f"attempt {attempt}"


def test_threads_started_after_holding_inherit_the_block():
    masks = {}

    def starter():
        hold_stop_signals()
        child = threading.Thread(target=lambda: masks.update(child=signal.pthread_sigmask(signal.SIG_BLOCK, [])))
        child.start()
        child.join()

    t = threading.Thread(target=starter)
    t.start()
    t.join()
    assert {signal.SIGTERM, signal.SIGINT} <= masks["child"]
    assert signal.SIGTERM not in signal.pthread_sigmask(signal.SIG_BLOCK, [])  # the caller's thread only


def test_wait_for_stop_returns_none_when_done_or_out_of_time():
    done = threading.Event()
    threading.Timer(0.2, done.set).start()
    t0 = time.monotonic()
    assert wait_for_stop(done, timeout=30) is None
    assert 0.15 < time.monotonic() - t0 < 5
    t0 = time.monotonic()
    assert wait_for_stop(threading.Event(), timeout=0.3) is None
    assert 0.25 < time.monotonic() - t0 < 5


@needs_proc
def test_watch_stops_on_ctrl_c(worker_env, mosquitto):
    watch = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "watch"],
        env=worker_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stderr.readline().startswith("watching ")
        # numpy's OpenBLAS threads start at import: they too must leave Ctrl-C to the main thread.
        masks = signals_blocked_by_other_threads(watch.pid)
        assert masks and all({signal.SIGTERM, signal.SIGINT} <= m for m in masks.values()), masks
        watch.send_signal(signal.SIGINT)
        watch.send_signal(signal.SIGINT)
        _, err = watch.communicate(timeout=10)
    finally:
        watch.kill()
        watch.wait()
    assert watch.returncode == 0 and "Traceback" not in err, err


def _can_unshare_pid() -> bool:
    try:
        return (
            subprocess.run(
                ["unshare", "--fork", "--pid", "--mount-proc", "true"], capture_output=True, timeout=10
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_unshare_pid(), reason="needs unshare and the right to make a PID namespace")
def test_sigterm_stops_the_wait_as_pid_1():
    # The Docker image runs the worker as PID 1, where the kernel drops a SIGTERM
    # that has no handler unless the signal is blocked; `docker stop` must still work.
    proc = subprocess.Popen(
        [
            "unshare",
            "--fork",
            "--pid",
            "--mount-proc",
            sys.executable,
            "-c",
            "import os; print(os.getpid(), flush=True)\n" + WAITER,
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline() == "1\n"
        assert proc.stdout.readline() == "ready\n"
        inner = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(inner) == 1  # the Python process, PID 1 inside its namespace
        os.kill(int(inner[0]), signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert out == "SIGTERM\n"


def test_publish_prints_what_became_of_each_image(worker_env, tmp_path, face_frames, mosquitto):
    images = tmp_path / "photos"
    images.mkdir()
    cv2.imwrite(str(images / "0-face.jpg"), face_frames[0][0])
    cv2.imwrite(str(images / "1-wall.jpg"), face_frames[0][0] * 0 + 120)  # no face to find
    worker = start_worker(worker_env, tmp_path / "worker.log")
    try:
        watch = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "watch", "--count", "1", "--timeout", "90"],
            env=worker_env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert watch.stdout.readline().startswith("status: ")  # the worker is online
        pub = cli("publish", "--device", "desk", "--images", str(images), "--fps", "10", env=worker_env)
        assert pub.returncode == 0, pub.stdout + pub.stderr
        lines = pub.stdout.splitlines()
        assert len(lines) == 2, lines
        assert lines[0].startswith("desk-0 (0-face.jpg): ") and "at [" in lines[0] and " ms" in lines[0]
        assert lines[1] == "desk-1 (1-wall.jpg): no face found (detector haar)"
        out, _ = watch.communicate(timeout=90)
        # watch shows the frame without a face too, from the skipped topic.
        assert "desk/desk-1: no face found (detector haar)" in out
        assert "desk/desk-0: " in out
        # A bare JPEG asks for its outcome with an MQTT 5 response topic.
        raw = cli("publish", "--device", "door", "--images", str(images / "1-wall.jpg"), "--raw", env=worker_env)
        assert raw.returncode == 0, raw.stdout + raw.stderr
        assert raw.stdout == "door-0 (1-wall.jpg): no face found (detector haar)\n"
    finally:
        worker.terminate()
        worker.wait(15)


def test_publish_says_when_no_worker_answers(worker_env, tmp_path, face_frames, mosquitto):
    image = tmp_path / "face.jpg"
    cv2.imwrite(str(image), face_frames[0][0])
    pub = cli("publish", "--device", "desk", "--images", str(image), "--wait", "1", env=worker_env)
    assert pub.returncode == 1
    assert pub.stdout.startswith("desk-0: no answer within 1 s; is a worker running")


def test_config_shows_the_file_the_weights_and_the_protocol_really_used(worker_env, tmp_path, mosquitto):
    conf = tmp_path / "worker.toml"
    conf.write_text('[mqtt]\nprotocol = "3.1.1"\n')
    out = cli("config", "--config", str(conf), "--json", env=worker_env)
    data = json.loads(out.stdout)
    assert data["used"]["config_file"] == str(conf)
    assert data["model"]["weights"] == worker_env["EMOTION_MODEL__WEIGHTS"]
    assert data["mqtt"]["protocol"] == "3.1.1"
    # With the embedded broker, the protocol is the one of the broker that would be used:
    # here the Mosquitto already on the port, which speaks MQTT 5.
    env = {**worker_env, "EMOTION_BROKER__PORT": str(mosquitto.port)}
    out = cli("config", "--config", str(conf), "--embedded-broker", "--json", env=env)
    data = json.loads(out.stdout)
    assert data["mqtt"]["protocol"] == "5" and data["mqtt"]["port"] == mosquitto.port
    assert data["used"]["broker"] == f"the broker already on 127.0.0.1:{mosquitto.port}, MQTT 5"
    toml_out = cli(
        "config",
        "--config",
        str(conf),
        "--embedded-broker",
        "--set",
        "broker.kind=amqtt",
        env={**worker_env, "EMOTION_BROKER__PORT": "0"},
    )
    assert f"# config file: {conf}" in toml_out.stdout
    assert "# broker: amqtt, started in the worker on 127.0.0.1:0, MQTT 3.1.1" in toml_out.stdout
    assert 'protocol = "3.1.1"' in toml_out.stdout


def test_set_on_the_command_line_beats_the_environment_and_the_file(worker_env, tmp_path):
    conf = tmp_path / "worker.toml"
    conf.write_text('[mqtt]\nhost = "from-file.lan"\nkeepalive_s = 45\n[topics]\nframes = ["a/+"]\n')
    env = {**worker_env, "EMOTION_MQTT__HOST": "from-env.lan"}
    out = cli(
        "config",
        "--config",
        str(conf),
        "--json",
        "--set",
        "mqtt.host=from-cli.lan",
        "--set",
        "mqtt.tls.enabled=true",
        "--set",
        'topics.frames=["b/+", "c/+"]',
        env=env,
    )
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["mqtt"]["host"] == "from-cli.lan" and data["mqtt"]["keepalive_s"] == 45
    assert data["mqtt"]["tls"]["enabled"] is True and data["topics"]["frames"] == ["b/+", "c/+"]
    bad = cli("config", "--set", "mqtt.prot=5", env=env)
    assert bad.returncode == 2 and "mqtt.prot: unknown key" in bad.stderr
    malformed = cli("config", "--set", "mqtt", env=env)
    assert malformed.returncode == 2 and "expected section.key=value" in malformed.stderr


def test_help_is_plain_text():
    for args in (
        ["-m", "worker.cli", "--help"],
        ["-m", "worker.cli", "run", "--help"],
        ["-m", "training.cli", "--help"],
    ):
        out = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "usage:" in out.stdout
        assert "``" not in out.stdout, out.stdout


def test_watch_topic_prints_the_messages_of_any_topic(worker_env, mosquitto):
    watch = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "watch", "--topic", "zigbee2mqtt/#", "--count", "2", "--timeout", "60"],
        env=worker_env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watch.stderr.readline().startswith("watching zigbee2mqtt/# on ")
        camera = publisher(mosquitto.port)
        camera.publish("emotion/events", b"{}", qos=1).wait_for_publish(5)  # not watched
        camera.publish("zigbee2mqtt/kitchen_light/set", b'{"state": "ON"}', qos=1).wait_for_publish(5)
        camera.publish("zigbee2mqtt/hall/set", b"OFF", qos=1, retain=True).wait_for_publish(5)
        camera.loop_stop()
        out, _ = watch.communicate(timeout=60)
    finally:
        watch.kill()
        watch.wait()
    lines = [line.split(" ", 1)[1] for line in out.splitlines()]  # without the time of day
    assert watch.returncode == 0
    assert lines == ['zigbee2mqtt/kitchen_light/set: {"state": "ON"}', "zigbee2mqtt/hall/set: OFF"]
