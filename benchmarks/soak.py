"""Run the worker for a while on a mix of good and bad frames and watch its memory, threads and files.

    python benchmarks/soak.py [--minutes M] [--fps F] [--broker-restarts N] [--weights W] [--tta T]

Starts a Mosquitto on a free port and ``emotion-worker run`` as a subprocess,
then publishes, at F frames a second, a repeating mix: faces (JSON envelope),
a raw JPEG with no face, a truncated JPEG, a payload that is not JSON and an
oversized one. The broker is stopped for a few seconds N times along the way,
so the worker reconnects. Every --sample-s seconds it prints the worker's
resident memory (VmRSS), threads and open file descriptors; at the end the
growth after warm-up, per hour and per 1,000 frames, and the worker's own
counts from its "stopped" log line. A worker meant to run for months should
show flat lines here.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline import REPO, test_frame  # noqa: E402

from tests.conftest import Mosquitto  # noqa: E402
from worker.classify import TTA_MODES  # noqa: E402
from worker.config import ModelSettings  # noqa: E402
from worker.frames import encode_jpeg  # noqa: E402

MAX_PAYLOAD = 300_000  # bytes; the worker's pipeline.max_payload_bytes in this run


def payloads(frame: np.ndarray) -> list[tuple[str, bytes]]:
    """One cycle of the mix, as (kind, payload)."""
    face = encode_jpeg(frame)
    blank = encode_jpeg(np.full((480, 640, 3), 90, np.uint8))
    envelope = json.dumps({"image": base64.b64encode(face).decode()}).encode()
    return [("face", envelope)] * 6 + [
        ("no face", blank),
        ("truncated JPEG", face[: len(face) // 2]),
        ("not JSON", b'{"image": '),
        ("oversized", b"\xff\xd8" + os.urandom(MAX_PAYLOAD)),
    ]


def sample(pid: int) -> tuple[float, int, int]:
    """Resident memory in MB, threads and open file descriptors of a Linux process."""
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:")))
    threads = int(next(line.split()[1] for line in status.splitlines() if line.startswith("Threads:")))
    return rss_kb / 1024, threads, len(os.listdir(f"/proc/{pid}/fd"))


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10, help="length of the run (default 10)")
    ap.add_argument("--fps", type=float, default=10, help="frames published a second (default 10)")
    ap.add_argument("--broker-restarts", type=int, default=2, help="times the broker goes away for 3 s (default 2)")
    ap.add_argument("--sample-s", type=float, default=30, help="seconds between samples (default 30)")
    ap.add_argument("--warmup-s", type=float, default=60, help="growth is measured after this (default 60)")
    ap.add_argument("--weights", type=Path, help="checkpoint (default: the bundled model)")
    ap.add_argument("--tta", choices=TTA_MODES, default=ModelSettings.model_fields["tta"].default)
    args = ap.parse_args()
    if not Path("/proc/self/status").exists():
        raise SystemExit("soak.py reads the worker's memory from Linux /proc")

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        broker = Mosquitto(work)
    except RuntimeError as exc:
        raise SystemExit(f"soak.py: {exc}") from None
    broker.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTION_")}
    env.update(
        EMOTION_MQTT__PORT=str(broker.port),
        EMOTION_MQTT__RECONNECT_MIN_S="0.5",
        EMOTION_MQTT__RECONNECT_MAX_S="2",
        EMOTION_MODEL__TTA=args.tta,
        EMOTION_LOG__FORMAT="json",
        EMOTION_PIPELINE__MAX_PAYLOAD_BYTES=str(MAX_PAYLOAD),
        EMOTION_PIPELINE__STATS_INTERVAL_S="0",
        PYTHONUNBUFFERED="1",
    )
    if args.weights:
        env["EMOTION_MODEL__WEIGHTS"] = str(args.weights)
    log_path = work / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT
        )

    counts = {"events": 0, "errors": 0}

    def on_message(client, userdata, msg):
        counts["events" if msg.topic == "emotion/events" else "errors"] += 1

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = on_message
    sub.on_connect = lambda c, *_: c.subscribe([("emotion/events", 0), ("emotion/errors", 0)])
    sub.connect("127.0.0.1", broker.port)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", broker.port)
    pub.loop_start()
    deadline = time.monotonic() + 60
    while '"connected"' not in log_path.read_text():
        if worker.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the worker did not connect; its log:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)

    mix = payloads(test_frame())
    seconds = args.minutes * 60
    restarts = [seconds * (i + 1) / (args.broker_restarts + 1) for i in range(args.broker_restarts)]
    sent = {"n": 0}
    stop = threading.Event()

    def publish():
        t0 = time.monotonic()
        while not stop.is_set():
            time.sleep(max(0.0, t0 + sent["n"] / args.fps - time.monotonic()))
            _, payload = mix[sent["n"] % len(mix)]
            pub.publish(f"emotion/frames/soak{sent['n'] % 3}", payload, qos=0)
            sent["n"] += 1

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    print(
        f"worker pid {worker.pid}, Mosquitto on port {broker.port}, {args.fps:g} frames/s for "
        f"{args.minutes:g} min, {args.broker_restarts} broker restarts, TTA {args.tta}; log {log_path}"
    )
    print(f"{'s':>6} {'frames':>8} {'events':>8} {'errors':>7} {'RSS MB':>8} {'threads':>7} {'fds':>4}")
    rows = []
    t0 = time.monotonic()
    next_sample = 0.0
    while (elapsed := time.monotonic() - t0) < seconds:
        if restarts and elapsed >= restarts[0]:
            restarts.pop(0)
            broker.stop()
            time.sleep(3)
            broker.start()
        if elapsed >= next_sample:
            rss, threads, fds = sample(worker.pid)
            rows.append((elapsed, sent["n"], rss, threads, fds))
            print(
                f"{elapsed:6.0f} {sent['n']:8d} {counts['events']:8d} {counts['errors']:7d} {rss:8.1f} "
                f"{threads:7d} {fds:4d}",
                flush=True,
            )
            next_sample += args.sample_s
        if worker.poll() is not None:
            raise SystemExit(f"the worker exited with {worker.returncode}; its log:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    stop.set()
    publisher.join(5)
    rss, threads, fds = sample(worker.pid)
    rows.append((time.monotonic() - t0, sent["n"], rss, threads, fds))
    worker.send_signal(signal.SIGTERM)
    code = worker.wait(60)
    sub.loop_stop()
    pub.loop_stop()
    broker.stop()

    after = [r for r in rows if r[0] >= args.warmup_s] or rows[-2:]
    hours = [r[0] / 3600 for r in after]
    per_hour = slope(hours, [r[2] for r in after])
    per_kframe = slope([r[1] / 1000 for r in after], [r[2] for r in after])
    print(
        f"RSS after warm-up {after[0][2]:.1f} MB, at the end {rows[-1][2]:.1f} MB: "
        f"{per_hour:+.1f} MB an hour, {per_kframe * 1024:+.1f} KB per 1,000 frames (least squares)"
    )
    print(
        f"threads {min(r[3] for r in after)}-{max(r[3] for r in after)}, "
        f"open files {min(r[4] for r in after)}-{max(r[4] for r in after)}"
    )
    stopped = [json.loads(line) for line in log_path.read_text().splitlines() if '"stopped"' in line]
    print(
        f"worker exit code {code}; its counts: "
        + (
            json.dumps({k: v for k, v in stopped[-1].items() if k not in ("event", "level", "timestamp")})
            if stopped
            else "no 'stopped' line in its log"
        )
    )


if __name__ == "__main__":
    main()
