"""What survives what: frames and events through worker restarts, kill -9, broker restarts and outages.

    python benchmarks/reliability.py [--fps F] [--pipeline-queue P] [--weights W] [--queue-size Q] [--outage-events N]

Each scenario starts its own Mosquitto on a free port. A camera publishes numbered
frames with QoS 1 at F frames a second; the worker (``emotion-worker run``, detector
``none``, so every frame that is processed gives an event) is restarted, killed or
cut off from the broker in the middle, and a listener counts the events and reads
the retained status topics. Frames without an event are split into those the
workers counted (shed when behind, older than pipeline.max_age_s) and the rest. The outage scenario drives the worker's MQTT client
directly: N events are published while a TCP relay between it and the broker is
cut (the broker stays up and publishes the last will), more than its outage queue
of Q holds.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import Listener, Mosquitto, Outage  # noqa: E402
from worker.config import Settings  # noqa: E402
from worker.frames import encode_jpeg  # noqa: E402
from worker.mqtt import MqttLink  # noqa: E402

EVENTS = "emotion/events"
WORK = Path(tempfile.mkdtemp(prefix="reliability-"))


def worker(port: int, name: str, args, **env) -> tuple[subprocess.Popen, Path]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("EMOTION_")}
    full.update(
        EMOTION_PIPELINE__QUEUE_SIZE=str(args.pipeline_queue),
        EMOTION_MQTT__PORT=str(port),
        EMOTION_MQTT__RECONNECT_MIN_S="1",
        EMOTION_MQTT__RECONNECT_MAX_S="2",
        EMOTION_DETECTOR__KIND="none",
        EMOTION_MODEL__TTA="none",
        EMOTION_LOG__FORMAT="json",
        EMOTION_PIPELINE__STATS_INTERVAL_S="0",
        PYTHONUNBUFFERED="1",
        **env,
    )
    if args.weights:
        full["EMOTION_MODEL__WEIGHTS"] = str(args.weights)
    log = WORK / f"{name}-{time.monotonic_ns()}.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run"],
        env=full,
        cwd=REPO,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )
    return proc, log


def wait(predicate, timeout: float, what: str) -> float:
    """Seconds until ``predicate()`` held."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise SystemExit(f"no {what} within {timeout} s; logs in {WORK}")
        time.sleep(0.05)
    return time.monotonic() - t0


def online(listener: Listener, topic: str, after: int = 0) -> bool:
    return any(m.payload == b"online" for m in listener.on(topic)[after:])


class Camera:
    """Publishes numbered JSON frames with QoS 1 at ``fps`` until stopped."""

    def __init__(self, port: int, fps: float):
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"camera-{time.time_ns()}")
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.fps, self.sent, self._go = fps, 0, threading.Event()
        image = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
        self.b64 = __import__("base64").b64encode(encode_jpeg(image)).decode()

    def start(self) -> None:
        self._go.set()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        t0 = time.monotonic()
        while self._go.is_set():
            doc = {"image": self.b64, "frame_id": f"f{self.sent}", "captured_at": time.time()}
            self.client.publish("emotion/frames/door", json.dumps(doc), qos=1)
            self.sent += 1
            time.sleep(max(0.0, t0 + self.sent / self.fps - time.monotonic()))

    def stop(self) -> None:
        self._go.clear()
        time.sleep(0.5)
        self.client.loop_stop()


def outcome(listener: Listener, sent: int) -> tuple[int, int]:
    """(frames with no event, frames with more than one)."""
    seen = Counter(json.loads(m.payload)["frame_id"] for m in listener.on(EVENTS))
    return sum(1 for i in range(sent) if not seen[f"f{i}"]), sum(1 for n in seen.values() if n > 1)


def settle(listener: Listener, sent: int, timeout: float = 30) -> None:
    t0 = time.monotonic()
    while outcome(listener, sent)[0] and time.monotonic() - t0 < timeout:
        time.sleep(0.2)


def stopped_counts(log: Path) -> dict:
    lines = [json.loads(line) for line in log.read_text().splitlines() if '"stopped"' in line]
    return lines[-1] if lines else {}


def accounted(listener: Listener, sent: int, logs: list[Path]) -> str:
    """Frames with no event, split into those the workers counted (shed when behind, too old) and the rest."""
    missing, dups = outcome(listener, sent)
    counts = [stopped_counts(log) for log in logs]
    dropped = sum(c.get("dropped", 0) for c in counts)
    stale = sum(c.get("stale", 0) for c in counts)
    return (
        f"without an event {missing}: counted as dropped when behind {dropped}, as older than max_age_s {stale}, "
        f"not counted {missing - dropped - stale}; with two events {dups}"
    )


def worker_restart(args, kill: bool) -> str:
    broker = Mosquitto(_dir("restart"))
    broker.start()
    status = f"emotion/status/emotion-worker-{os.uname().nodename}"
    listener = Listener(broker.port, [EVENTS, status])
    proc, first_log = worker(broker.port, "first", args)
    wait(lambda: online(listener, status), 120, "first worker online")
    camera = Camera(broker.port, args.fps)
    camera.start()
    time.sleep(3)
    at_stop = camera.sent
    proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    proc.wait(30)
    seen = len(listener.on(status))
    proc, log = worker(broker.port, "second", args)
    down = wait(lambda: online(listener, status, seen), 120, "second worker online")
    during = camera.sent - at_stop
    time.sleep(3)
    camera.stop()
    settle(listener, camera.sent)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    broker.stop()
    what = "kill -9, then start" if kill else "restart (SIGTERM, start)"
    return f"worker {what}: {camera.sent} frames, {during} of them in the {down:.1f} s it was away; " + accounted(
        listener, camera.sent, [first_log, log]
    )


def broker_restart(args) -> str:
    broker = Mosquitto(_dir("broker"), persistence=True)
    broker.start()
    listener = Listener(broker.port, [EVENTS], persistent=True)
    status = "emotion/status/w1"
    proc, log = worker(broker.port, "worker", args, EMOTION_MQTT__CLIENT_ID="w1")
    watcher = Listener(broker.port, [status])
    wait(lambda: online(watcher, status), 120, "worker online")
    camera = Camera(broker.port, args.fps)
    camera.start()
    time.sleep(3)
    broker.stop()
    time.sleep(5)
    t0 = time.monotonic()
    broker.start()
    wait(lambda: '"reconnected"' in log.read_text(), 60, "the worker's reconnection")
    back = time.monotonic() - t0
    time.sleep(3)
    camera.stop()
    settle(listener, camera.sent)
    retained = Listener(broker.port, [status])
    wait(lambda: retained.messages, 10, "the retained status")
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    broker.stop()
    return (
        f"broker restart (5 s away, persistence on): {camera.sent} frames; "
        + accounted(listener, camera.sent, [log])
        + f"; worker back {back:.1f} s after the broker started; status then '{retained.messages[0].payload.decode()}'"
    )


def outage_longer_than_the_queue(args) -> str:
    broker = Mosquitto(_dir("outage"))
    broker.start()
    relay = Outage(broker.port)
    settings = Settings(mqtt={"port": relay.port, "client_id": "w1", "queue_size": args.queue_size})
    link = MqttLink(settings, on_frame=lambda *a: None)
    listener = Listener(broker.port, [EVENTS, link.status_topic])
    link.start()
    link.wait_connected(10)
    relay.cut()
    wait(lambda: any(m.payload == b"offline" for m in listener.on(link.status_topic)), 30, "the last will")
    wait(lambda: not link.connected.is_set(), 30, "the disconnect")
    for n in range(args.outage_events):
        link.publish_json(EVENTS, {"n": n})
    t0 = time.monotonic()
    relay.restore()
    link.wait_connected(30)
    wait(lambda: len(listener.on(EVENTS)) >= min(args.queue_size, args.outage_events), 30, "the queued events")
    first = next(i for i, m in enumerate(listener.on(link.status_topic)) if m.payload == b"offline")
    after = [m.payload for m in listener.on(link.status_topic)[first + 1 :]]
    took = time.monotonic() - t0
    ns = [json.loads(m.payload)["n"] for m in listener.on(EVENTS)]
    lost = link.stats.snapshot()["publishes_dropped_by_reason"]
    link.close()
    relay.close()
    broker.stop()
    return (
        f"outage longer than the queue ({args.outage_events} events, mqtt.queue_size {args.queue_size}): "
        f"delivered {len(ns)} (numbers {min(ns)}-{max(ns)}), counted lost {lost}; "
        f"status after the last will: {[p.decode() for p in after]}; all delivered {took:.1f} s after the link came back"
    )


def two_workers_kill_one(args) -> str:
    broker = Mosquitto(_dir("pair"))
    broker.start()
    listener = Listener(broker.port, [EVENTS, "emotion/status/+"])
    shared = {"EMOTION_TOPICS__FRAMES": '["$share/emotion/emotion/frames/+"]'}
    a, log_a = worker(broker.port, "a", args, EMOTION_MQTT__CLIENT_ID="worker-a", **shared)
    b, log_b = worker(broker.port, "b", args, EMOTION_MQTT__CLIENT_ID="worker-b", **shared)
    for name in ("a", "b"):
        wait(lambda: online(listener, f"emotion/status/worker-{name}"), 120, f"worker-{name} online")
    camera = Camera(broker.port, args.fps)
    camera.start()
    time.sleep(3)
    a.kill()
    a.wait()
    at_kill = camera.sent
    a_events = log_a.read_text().count('"event": "event"')
    time.sleep(3)
    camera.stop()
    settle(listener, camera.sent)
    b_after = sum(
        1
        for line in log_b.read_text().splitlines()
        if '"event": "event"' in line and int(json.loads(line)["frame"][1:]) >= at_kill
    )
    retained = Listener(broker.port, ["emotion/status/+"])
    wait(lambda: len(retained.messages) >= 2, 10, "both retained status topics")
    statuses = {m.topic.rsplit("/", 1)[1]: m.payload.decode() for m in retained.messages}
    b.send_signal(signal.SIGTERM)
    b.wait(30)
    broker.stop()
    return (
        f"two workers on $share/, kill -9 of one: {camera.sent} frames; "
        + accounted(listener, camera.sent, [log_b])
        + f"; before the kill a took {a_events} of {at_kill}; after it b took {b_after} of "
        f"{camera.sent - at_kill}; status {statuses}"
    )


def _dir(name: str) -> Path:
    path = WORK / f"{name}-{time.monotonic_ns()}"
    path.mkdir()
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fps", type=float, default=10, help="frames a second from the camera (default 10)")
    ap.add_argument("--weights", type=Path, help="checkpoint (default: the bundled model)")
    ap.add_argument(
        "--pipeline-queue", type=int, default=8, help="the workers' pipeline.queue_size (default 8, the default)"
    )
    ap.add_argument("--queue-size", type=int, default=1000, help="mqtt.queue_size in the outage (default 1000)")
    ap.add_argument("--outage-events", type=int, default=2000, help="events made during the outage (default 2000)")
    args = ap.parse_args()
    print(f"logs in {WORK}", flush=True)
    for scenario in (
        lambda: worker_restart(args, kill=False),
        lambda: worker_restart(args, kill=True),
        lambda: broker_restart(args),
        lambda: outage_longer_than_the_queue(args),
        lambda: two_workers_kill_one(args),
    ):
        print(scenario(), flush=True)


if __name__ == "__main__":
    main()
