"""Measure the worker: each stage on its own, then frames through MQTT end to end.

    python benchmarks/pipeline.py [--weights W] [--backend B] [--tta T] [--seconds S] [--fps F ...] [--json PATH]

Prints milliseconds per stage (decode, Haar face detection at each detection
width, classification at several batch sizes), then runs the worker as a
separate process (``python -m worker.cli run``, as a service runs it) against a
Mosquitto this script starts, offers 640x480 JPEG frames with one face at each
rate of ``--fps`` (``max``: as fast as ``--max-fps``, which measures the
capacity), and prints the frames processed (events received), lost, dropped
and stale, the throughput and the latency from publishing a frame to receiving
its event (p50, p95, p99, max). Each rate gets a fresh worker, which first
serves two seconds of frames that are not counted: a service runs for months,
its first second is not its usual one. Unset options are the worker's defaults
(``config/worker.toml``). ``--json PATH`` also writes the figures as JSON
(``-`` for standard output).
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.machine import describe, machine, write_report  # noqa: E402
from tests.conftest import Mosquitto  # noqa: E402
from worker.classify import Classifier  # noqa: E402
from worker.config import DEFAULT_CONFIG, load_settings  # noqa: E402
from worker.faces import FaceDetector, crop_faces, share_cores  # noqa: E402
from worker.frames import decode_payload, encode_jpeg  # noqa: E402
from worker.log import setup_logging  # noqa: E402

# The full data set next to the checkout when there is one, else the images kept for the tests.
FER = next(
    d
    for d in (REPO.parent / "shared" / "data" / "fer2013", REPO / "tests" / "data" / "fer2013-mini")
    if (d / "val" / "happy").is_dir()
)
DETECT_WIDTHS = (160, 240, 320, 480, 640)
WARMUP_S = 2.0


def test_frame(size=(640, 480)) -> np.ndarray:
    """A grey background with one FER2013 face enlarged to 160 px, which the Haar cascade finds."""
    detector = FaceDetector(load_settings(None).detector)
    for path in sorted((FER / "val" / "happy").glob("*.jpg")):
        face = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (160, 160), interpolation=cv2.INTER_CUBIC)
        canvas = np.full((size[1], size[0]), 90, np.uint8)
        canvas[120:280, 240:400] = face
        frame = cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR)
        if detector.detect(frame):
            return frame
    raise SystemExit("no detectable face found in FER2013 val/happy")


def timed(fn, n: int) -> float:
    """Milliseconds per call of ``fn``, the mean of ``n`` calls after one warm-up call."""
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def stages(settings, frame: np.ndarray) -> dict:
    jpeg = encode_jpeg(frame)
    out: dict = {"jpeg_bytes": len(jpeg)}
    out["opencv_threads"] = share_cores(settings.pipeline.threads)  # as the worker does
    print(f"frame {frame.shape[1]}x{frame.shape[0]}, JPEG {len(jpeg)} bytes; OpenCV threads {out['opencv_threads']}")
    out["decode_ms"] = timed(lambda: decode_payload(jpeg, "d", "t", 10**7, 10**8), 50)
    print(f"  decode JPEG                {out['decode_ms']:7.2f} ms")
    out["haar_ms"] = {}
    for width in DETECT_WIDTHS:
        det = FaceDetector(settings.detector.model_copy(update={"detect_width": width}))
        ms = out["haar_ms"][width] = timed(lambda: det.detect(frame), 20)
        found = len(det.detect(frame))
        print(f"  Haar, detect_width {width:4d}   {ms:7.2f} ms  ({found} face{'s' * (found != 1)})")
    clf = Classifier(settings.model, reserve_cores=settings.pipeline.threads)
    crop = crop_faces(frame, FaceDetector(settings.detector).detect(frame))
    out["model"] = {
        "path": str(clf.path),
        "version": clf.info.version,
        "width": clf.info.width,
        "stages": list(clf.info.channels),
        "backend": clf.backend,
        "device": str(clf.device),
        "precision": clf.precision,
        "tta": clf.tta,
        "threads": clf.threads,
        "why": list(clf.plan.why),
    }
    print(
        f"  model: {clf.info.shape}, {clf.device}, {clf.backend}, {clf.precision}, TTA {clf.tta}, {clf.threads} threads"
    )
    out["classify_ms"] = {}
    for n in (1, 8, 32):
        crops = np.repeat(crop, n, axis=0)
        ms = out["classify_ms"][n] = timed(lambda: clf.predict(crops), 10)
        print(f"  classify {n:2d} faces          {ms:7.2f} ms  ({ms / n:.2f} ms a face)")
    return out


def percentile(sorted_ms: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0-100) of an ascending list."""
    return sorted_ms[max(0, math.ceil(q / 100 * len(sorted_ms)) - 1)]


class Camera:
    """Publishes the frame at a steady rate and records when each event comes back."""

    def __init__(self, port: int, jpeg: bytes, events_topic: str):
        self.image = base64.b64encode(jpeg).decode()
        self.got: dict[str, float] = {}
        self.sent: dict[str, float] = {}
        self._lock = threading.Lock()
        self.sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.sub.on_message = self._on_message
        self.sub.on_connect = lambda c, *a: c.subscribe(events_topic, qos=1)
        self.sub.connect("127.0.0.1", port)
        self.sub.loop_start()
        self.pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        self.pub.connect("127.0.0.1", port)
        self.pub.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        frame_id = json.loads(msg.payload)["frame_id"]
        with self._lock:
            self.got[frame_id] = time.time()

    def offer(self, prefix: str, fps: float, n: int) -> float:
        """Publish ``n`` frames at ``fps``; returns the time the first was published."""
        t0 = time.time()
        for i in range(n):
            time.sleep(max(0.0, t0 + i / fps - time.time()))
            frame_id = f"{prefix}-{i}"
            now = time.time()
            self.sent[frame_id] = now
            payload = f'{{"image": "{self.image}", "frame_id": "{frame_id}", "captured_at": {now}}}'
            self.pub.publish("emotion/frames/bench", payload, qos=0)
        return t0

    def wait(self, prefix: str, n: int, timeout: float) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline and self.count(prefix) < n:
            time.sleep(0.05)

    def count(self, prefix: str) -> int:
        with self._lock:
            return sum(k.startswith(prefix + "-") for k in self.got)

    def close(self) -> None:
        for client in (self.sub, self.pub):
            client.loop_stop()
            client.disconnect()


def end_to_end(overrides: dict[str, str], jpeg: bytes, fps: float, label: str, seconds: float, work: Path) -> dict:
    """One worker process, one broker, frames offered at ``fps`` for ``seconds``: the figures of that run."""
    broker = Mosquitto(work)
    broker.start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTION_")}
    env.update(overrides)
    env.update(
        EMOTION_MQTT__PORT=str(broker.port),
        EMOTION_MQTT__CLIENT_ID="emotion-worker-bench",
        EMOTION_LOG__FORMAT="json",
        PYTHONUNBUFFERED="1",
    )
    log_path = work / "worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "run"],
        env=env,
        cwd=REPO,
        stdout=open(log_path, "wb"),
        stderr=subprocess.STDOUT,
    )
    camera = None
    try:
        camera = Camera(broker.port, jpeg, "emotion/events")
        deadline = time.time() + 120
        while camera.count("warm") == 0:  # the worker is up once it answers a frame
            if worker.poll() is not None or time.time() > deadline:
                raise SystemExit(f"the worker did not start; its log:\n{log_path.read_text()[-3000:]}")
            camera.offer("warm", 10, 1)
            time.sleep(0.5)
        camera.offer("warmup", min(fps, 30), round(min(fps, 30) * WARMUP_S))
        time.sleep(1.0)
        frames = max(1, round(fps * seconds))
        t0 = camera.offer(label, fps, frames)
        camera.wait(label, frames, 10.0)
        got = {k: v for k, v in camera.got.items() if k.startswith(label + "-")}
    finally:
        if camera:
            camera.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
        broker.stop()
    counters = None  # the worker's own counters, logged as it stops
    for line in log_path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "stopped":
            counters = record
    latencies = sorted((got[k] - camera.sent[k]) * 1000 for k in got)
    elapsed = (max(got.values()) - t0) if got else float("nan")
    result = {
        "offered_fps": fps,
        "label": label,
        "frames": frames,
        "processed": len(got),
        "lost": frames - len(got),
        # The worker's own counters over its whole run, the uncounted first frames included.
        "dropped": counters.get("dropped", 0) if counters else None,
        "stale": counters.get("stale", 0) if counters else None,
        "no_face": counters.get("no_face", 0) if counters else None,
        "events_per_s": round(len(got) / elapsed, 1) if got else 0.0,
    }
    if latencies:
        result.update(
            {f"latency_ms_p{q}": round(percentile(latencies, q), 1) for q in (50, 95, 99)},
            latency_ms_max=round(latencies[-1], 1),
        )
    print(
        f"  {label:>4s} offered ({fps:g} frames/s, {frames} frames): {len(got)} processed, {frames - len(got)} lost "
        f"({result['dropped']} dropped, {result['stale']} stale); {result['events_per_s']:.1f} events/s; latency "
        + (
            f"p50 {result['latency_ms_p50']:.1f} ms  p95 {result['latency_ms_p95']:.1f} ms  "
            f"p99 {result['latency_ms_p99']:.1f} ms  max {result['latency_ms_max']:.1f} ms"
            if latencies
            else "-"
        ),
        flush=True,
    )
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", help="model.weights: a bundled model's name or a path (default: the worker's)")
    ap.add_argument("--backend", choices=["auto", "torch", "onnxruntime"], help="model.backend")
    ap.add_argument("--precision", choices=["auto", "fp32", "bf16"], help="model.precision")
    ap.add_argument("--tta", choices=["auto", "none", "flip", "tencrop", "rotate"], help="model.tta")
    ap.add_argument("--threads", type=int, help="model.threads")
    ap.add_argument("--detect-width", type=int, help="detector.detect_width")
    ap.add_argument("--seconds", type=float, default=20, help="length of each end-to-end run (default: 20)")
    ap.add_argument(
        "--fps",
        nargs="+",
        default=["10", "30", "60", "max"],
        help="offered frame rates; max offers --max-fps and measures the capacity (default: 10 30 60 max)",
    )
    ap.add_argument("--max-fps", type=float, default=150, help="the rate 'max' offers (default: 150)")
    ap.add_argument("--json", help="also write the figures as JSON to this file ('-': standard output)")
    args = ap.parse_args()
    setup_logging("warning", "console")

    overrides = {
        f"EMOTION_{section.upper()}__{key.upper()}": str(value)
        for section, key, value in (
            ("model", "weights", args.weights),
            ("model", "backend", args.backend),
            ("model", "precision", args.precision),
            ("model", "tta", args.tta),
            ("model", "threads", args.threads),
            ("detector", "detect_width", args.detect_width),
        )
        if value is not None
    }
    settings = load_settings(
        REPO / DEFAULT_CONFIG,
        model={k.split("__")[1].lower(): v for k, v in overrides.items() if k.startswith("EMOTION_MODEL__")},
        detector={"detect_width": args.detect_width} if args.detect_width else {},
    )
    m = machine()
    print(describe(m), flush=True)
    frame = test_frame()
    report = {"machine": m, "settings": overrides, "stages": stages(settings, frame), "end_to_end": []}
    print("end to end: a worker process, Mosquitto, 640x480 JPEG frames with one face", flush=True)
    for rate in args.fps:
        fps = args.max_fps if rate == "max" else float(rate)
        with tempfile.TemporaryDirectory() as work:
            report["end_to_end"].append(end_to_end(overrides, encode_jpeg(frame), fps, rate, args.seconds, Path(work)))
    write_report(report, args.json)


if __name__ == "__main__":
    main()
