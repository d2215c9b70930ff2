"""Measure the worker: each stage on its own, then frames through MQTT end to end.

    python benchmarks/pipeline.py [--weights W] [--seconds S] [--fps F ...] [--tta T] [--threads T]

Prints milliseconds per stage (decode, face detection at two detection widths,
classification at several batch sizes) and, with a worker running in this
process against a Mosquitto it starts (or the embedded amqtt broker when
Mosquitto is missing), the frames per second it sustains and the end-to-end
latency from publishing a frame to receiving its event.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.conftest import Mosquitto, free_port  # noqa: E402
from worker.app import Worker  # noqa: E402
from worker.classify import TTA_MODES, Classifier  # noqa: E402
from worker.config import ModelSettings, load_settings  # noqa: E402
from worker.faces import FaceDetector, crop_faces  # noqa: E402
from worker.frames import decode_payload, encode_jpeg  # noqa: E402
from worker.log import setup_logging  # noqa: E402

# The full data set next to the checkout when there is one, else the images kept for the tests.
FER = next(
    d
    for d in (REPO.parent / "shared" / "data" / "fer2013", REPO / "tests" / "data" / "fer2013-mini")
    if (d / "val" / "happy").is_dir()
)


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
    fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1000


def stages(settings, frame: np.ndarray) -> None:
    jpeg = encode_jpeg(frame)
    print(f"frame {frame.shape[1]}x{frame.shape[0]}, JPEG {len(jpeg)} bytes; torch threads {torch.get_num_threads()}")
    print(f"  decode JPEG                {timed(lambda: decode_payload(jpeg, 'd', 't', 10**7, 10**8), 50):7.2f} ms")
    for width in (640, 320):
        det = FaceDetector(settings.detector.model_copy(update={"detect_width": width}))
        print(f"  Haar, detect_width {width:4d}   {timed(lambda: det.detect(frame), 20):7.2f} ms")
    clf = Classifier(settings.model)
    boxes = FaceDetector(settings.detector).detect(frame)
    crop = crop_faces(frame, boxes)
    print(f"  model: width {clf.info.width}, {clf.device}, {clf.precision}, TTA {clf.tta}")
    for n in (1, 8, 32):
        crops = np.repeat(crop, n, axis=0)
        ms = timed(lambda: clf.predict(crops), 10)
        print(f"  classify {n:2d} faces          {ms:7.2f} ms  ({ms / n:.2f} ms a face)")


def end_to_end(settings, frame: np.ndarray, frames: int, fps: float) -> None:
    with tempfile.TemporaryDirectory() as work:
        try:
            broker = Mosquitto(Path(work))
        except RuntimeError:
            broker, port = None, free_port()
            overrides = {"broker": {"embedded": True, "port": port}, "mqtt": {"port": port, "protocol": "3.1.1"}}
            kind = "embedded amqtt, MQTT 3.1.1"
        else:
            broker.start()
            port, kind = broker.port, "Mosquitto, MQTT 5"
            overrides = {"mqtt": {"port": port}}
        try:
            _end_to_end(settings, frame, frames, fps, port, kind, overrides)
        finally:
            if broker:
                broker.stop()


def _end_to_end(settings, frame, frames: int, fps: float, port: int, kind: str, overrides: dict) -> None:
    s = load_settings(
        None,
        model=settings.model.model_dump(),
        detector=settings.detector.model_dump(),
        pipeline={**settings.pipeline.model_dump(), "stats_interval_s": 0},
        **overrides,
    )
    worker = Worker(s)
    worker.start()
    assert worker.link.wait_connected(20), "worker did not connect"
    got: dict[str, float] = {}
    done = threading.Event()

    def on_message(client, userdata, msg):
        got[json.loads(msg.payload)["frame_id"]] = time.time()
        if len(got) >= frames:
            done.set()

    sub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    sub.on_message = on_message
    sub.connect("127.0.0.1", port)
    sub.subscribe(s.topics.events, qos=1)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    time.sleep(0.5)
    jpeg = encode_jpeg(frame)
    sent: dict[str, float] = {}
    t0 = time.time()
    for i in range(frames):
        time.sleep(max(0.0, t0 + i / fps - time.time()))
        sent[f"b-{i}"] = time.time()
        pub.publish(
            "emotion/frames/bench",
            json.dumps({"image": base64.b64encode(jpeg).decode(), "frame_id": f"b-{i}", "captured_at": sent[f"b-{i}"]}),
            qos=0,
        )
    done.wait(10.0)
    elapsed = (max(got.values()) if got else time.time()) - t0
    lat = sorted((got[k] - sent[k]) * 1000 for k in got)
    stats = worker.pipeline.stats.snapshot()
    worker.stop()
    sub.loop_stop()
    pub.loop_stop()
    rate = f"{fps:g} frames/s offered"
    print(
        f"end to end through {kind}: {frames} frames {rate}, {len(got)} events, "
        f"{stats.get('dropped', 0)} dropped, {stats.get('stale', 0)} stale"
    )
    if lat:
        print(f"  throughput {len(got) / elapsed:6.1f} events/s (first frame published to last event)")
        print(
            f"  latency    p50 {statistics.median(lat):6.1f} ms   p95 {lat[int(len(lat) * 0.95) - 1]:6.1f} ms   "
            f"max {lat[-1]:6.1f} ms"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", type=Path, help="checkpoint (default: the bundled model)")
    ap.add_argument("--seconds", type=float, default=10, help="length of each end-to-end run")
    ap.add_argument(
        "--fps",
        type=float,
        nargs="+",
        default=[100.0, 5.0],
        help="offered frame rates: a high one measures capacity (frames beyond it are shed), a low one latency",
    )
    ap.add_argument(
        "--tta",
        choices=TTA_MODES,
        default=ModelSettings.model_fields["tta"].default,
        help="test-time augmentation (default: the worker's, %(default)s)",
    )
    ap.add_argument("--threads", type=int, default=2, help="pipeline threads (decode and detect)")
    args = ap.parse_args()
    setup_logging("warning", "console")
    settings = load_settings(
        None, model={"weights": args.weights, "tta": args.tta}, pipeline={"threads": args.threads, "queue_size": 8}
    )
    frame = test_frame()
    stages(settings, frame)
    for fps in args.fps:
        end_to_end(settings, frame, max(1, round(fps * args.seconds)), fps)


if __name__ == "__main__":
    main()
