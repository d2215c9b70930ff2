"""``emotion-worker``: run the worker, classify images, play a camera, watch events, show the config, check health."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

EXIT_CONFIG = 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emotion-worker", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p):
        p.add_argument("--config", type=Path, help="TOML config file (default: $EMOTION_CONFIG or config/worker.toml)")
        return p

    p = with_config(sub.add_parser("run", help="serve: frames from MQTT in, emotion events out"))
    p.add_argument(
        "--embedded-broker", action="store_true", help="start an in-process MQTT 3.1.1 broker (amqtt) and connect to it"
    )

    p = with_config(sub.add_parser("classify", help="print the faces and emotions in image files"))
    p.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    p.add_argument("--detector", choices=["haar", "yunet", "none"], help="face detector (none: images are face crops)")
    p.add_argument("--yunet-model", type=Path, help="YuNet ONNX file for --detector yunet")
    p.add_argument("--weights", type=Path, help="checkpoint (default: the configured or bundled model)")
    p.add_argument("--json", action="store_true", help="one JSON line per image")

    p = with_config(sub.add_parser("publish", help="play a camera: publish frames to the frames topic"))
    p.add_argument("--device", required=True, help="device id, the '+' level of the frames topic")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="an image file or a folder of images (sorted by name)")
    src.add_argument("--video", type=Path, help="a video file")
    src.add_argument("--camera", type=int, help="a camera index (0 is the first)")
    p.add_argument("--fps", type=float, default=2.0, help="frames per second (default 2)")
    p.add_argument("--count", type=int, help="stop after this many frames")
    p.add_argument("--loop", action="store_true", help="start the images or video again at the end")
    p.add_argument("--max-width", type=int, default=640, help="scale wider frames down to this, in pixels")
    p.add_argument("--raw", action="store_true", help="publish bare JPEG bytes instead of the JSON envelope")

    p = with_config(sub.add_parser("watch", help="print emotion events as they arrive"))
    p.add_argument("--errors", action="store_true", help="also print rejected-frame records")
    p.add_argument("--json", action="store_true", help="print each message as received, one JSON line each")
    p.add_argument("--count", type=int, help="exit after this many events")
    p.add_argument("--timeout", type=float, help="exit after this many seconds")

    p = with_config(sub.add_parser("config", help="print the effective configuration, secrets masked"))
    p.add_argument("--json", action="store_true", help="as JSON instead of TOML")

    with_config(
        sub.add_parser(
            "health",
            help="exit 0 when the running worker's pipeline made progress or was idle within health.max_age_s, else 1",
        )
    )

    args = parser.parse_args(argv)
    if args.command in ("run", "watch"):
        # Before any import starts a thread (numpy's OpenBLAS, torch, paho, the pipeline).
        from worker.signals import hold_stop_signals

        hold_stop_signals()
    from worker.config import ConfigError, load_settings

    overrides: dict = {}
    if args.command == "run" and args.embedded_broker:
        overrides["broker"] = {"embedded": True}
    try:
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"emotion-worker: {exc}", file=sys.stderr)
        return 1 if args.command == "health" else EXIT_CONFIG  # Docker reserves a health check's exit 2
    return {
        "run": _run,
        "classify": _classify,
        "publish": _publish,
        "watch": _watch,
        "config": _config,
        "health": _health,
    }[args.command](settings, args)


def _run(settings, args) -> int:
    from worker.app import Worker
    from worker.broker import EmbeddedBrokerError
    from worker.faces import DetectorError
    from worker.log import get_logger, setup_logging
    from worker.model import CheckpointError

    setup_logging(settings.log.level, settings.log.format)
    log = get_logger()
    if settings.broker.embedded:
        host = "127.0.0.1" if settings.broker.host in ("0.0.0.0", "::") else settings.broker.host
        settings.mqtt = settings.mqtt.model_copy(
            update={"host": host, "port": settings.broker.port, "protocol": "3.1.1"}
        )
    worker = Worker(settings)
    try:
        worker.start()
    except (CheckpointError, DetectorError, EmbeddedBrokerError, ValueError) as exc:
        log.error("cannot start", error=str(exc))
        worker.stop(drain_timeout=0)
        return EXIT_CONFIG
    worker.serve_until_signal()
    return 0


def _classify(settings, args) -> int:
    import cv2

    from worker.classify import Classifier
    from worker.events import face_record
    from worker.faces import DetectorError, FaceDetector, crop_faces
    from worker.log import setup_logging
    from worker.model import CheckpointError

    setup_logging("warning", settings.log.format)
    det = settings.detector.model_copy(
        update={k: v for k, v in (("kind", args.detector), ("yunet_model", args.yunet_model)) if v}
    )
    model = settings.model.model_copy(update={"weights": args.weights} if args.weights else {})
    try:
        detector = FaceDetector(type(det).model_validate(det.model_dump()))
        classifier = Classifier(model)
    except (CheckpointError, DetectorError, ValueError) as exc:
        print(f"emotion-worker classify: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    status = 0
    for path in args.images:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if image is None:
            status = 1
            if args.json:
                print(json.dumps({"image": str(path), "error": "not a readable image"}))
            else:
                print(f"{path}: not a readable image", file=sys.stderr)
            continue
        boxes = detector.detect(image)
        probs = classifier.predict(crop_faces(image, boxes)).tolist() if boxes else []
        faces = [face_record(b, p, classifier.info.classes) for b, p in zip(boxes, probs)]
        if args.json:
            print(
                json.dumps(
                    {
                        "image": str(path),
                        "width": image.shape[1],
                        "height": image.shape[0],
                        "faces": faces,
                        "emotion": faces[0]["emotion"] if faces else None,
                    }
                )
            )
        elif not faces:
            print(f"{path}: no face found")
        else:
            for f in faces:
                top = sorted(f["scores"].items(), key=lambda kv: -kv[1])[:3]
                print(
                    f"{path}: {f['emotion']} {f['confidence']:.2f} at {f['box']}  ("
                    + ", ".join(f"{k} {v:.2f}" for k, v in top)
                    + ")"
                )
    return status


def _client(settings, name: str):
    """A plain MQTT 3.1.1 client for the helper commands (works with every broker, amqtt included)."""
    import paho.mqtt.client as mqtt

    from worker.mqtt import configure_tls

    mq = settings.mqtt
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=f"emotion-{name}-{time.time_ns() % 10**9}", protocol=mqtt.MQTTv311
    )
    try:
        if mq.username:
            client.username_pw_set(mq.username, mq.secret())
        if mq.tls.enabled:
            configure_tls(client, mq.tls)
        client.connect(mq.host, mq.port, mq.keepalive_s)
    except ValueError as exc:
        raise SystemExit(f"emotion-worker {name}: {exc}") from None
    except OSError as exc:
        from worker.mqtt import describe_connect_error

        raise SystemExit(
            f"emotion-worker {name}: cannot connect to the broker at {mq.host}:{mq.port}: "
            f"{describe_connect_error(exc, mq.tls)}"
        ) from None
    return client


def _frames(args):
    """Yield BGR frames from --images, --video or --camera, forever with --loop."""
    import cv2

    from worker.frames import IMAGE_SUFFIXES

    while True:
        if args.images is not None:
            paths = (
                [args.images]
                if args.images.is_file()
                else sorted(p for p in args.images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            )
            if not paths:
                raise SystemExit(f"emotion-worker publish: no images in {args.images}")
            for p in paths:
                image = cv2.imread(str(p), cv2.IMREAD_COLOR)
                if image is not None:
                    yield p.name, image
        else:
            cap = cv2.VideoCapture(str(args.video) if args.video is not None else args.camera)
            if not cap.isOpened():
                raise SystemExit(f"emotion-worker publish: cannot open {args.video or f'camera {args.camera}'}")
            while True:
                ok, image = cap.read()
                if not ok:
                    break
                yield None, image
            cap.release()
        if not args.loop or args.camera is not None:
            return


def _publish(settings, args) -> int:
    import base64

    import cv2

    from worker.frames import encode_jpeg
    from worker.topics import frame_topic

    topic = frame_topic(settings.topics.frames, args.device)
    client = _client(settings, "publish")
    client.loop_start()
    period = 1 / args.fps if args.fps > 0 else 0
    sent, next_at = 0, time.monotonic()
    try:
        for name, image in _frames(args):
            if args.max_width and image.shape[1] > args.max_width:
                scale = args.max_width / image.shape[1]
                image = cv2.resize(image, (args.max_width, round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA)
            jpeg = encode_jpeg(image)
            frame_id = f"{args.device}-{sent}"
            payload = (
                jpeg
                if args.raw
                else json.dumps(
                    {
                        "image": base64.b64encode(jpeg).decode(),
                        "frame_id": frame_id,
                        "captured_at": time.time(),
                        **({"source": name} if name else {}),
                    }
                )
            )
            client.publish(topic, payload, qos=0).wait_for_publish(5)
            sent += 1
            print(f"published {frame_id} ({len(payload)} bytes) to {topic}", file=sys.stderr)
            if args.count and sent >= args.count:
                break
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
    except KeyboardInterrupt:
        pass
    finally:
        client.loop_stop()
        client.disconnect()
    return 0 if sent else 1


def _watch(settings, args) -> int:
    topics = settings.topics
    done = threading.Event()
    seen = {"events": 0}

    def on_message(client, userdata, msg):
        text = msg.payload.decode(errors="replace")
        if args.json:
            print(
                json.dumps({"topic": msg.topic, "retained": bool(msg.retain), "payload": _maybe_json(text)}), flush=True
            )
        else:
            print(_describe(msg.topic, text, topics), flush=True)
        if msg.topic == topics.events:
            seen["events"] += 1
            if args.count and seen["events"] >= args.count:
                done.set()

    client = _client(settings, "watch")
    client.on_message = on_message
    subs = [(topics.events, 1), (f"{topics.status}/+", 1)] + ([(topics.errors, 0)] if args.errors else [])
    client.subscribe(subs)
    client.loop_start()
    print(f"watching {', '.join(t for t, _ in subs)} on {settings.mqtt.host}:{settings.mqtt.port}", file=sys.stderr)
    from worker.signals import wait_for_stop

    wait_for_stop(done, args.timeout)
    client.loop_stop()
    client.disconnect()
    return 0 if not args.count or done.is_set() else 1


def _maybe_json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _describe(topic: str, text: str, topics) -> str:
    doc = _maybe_json(text)
    if topic.startswith(f"{topics.status}/"):
        return f"status: {topic[len(topics.status) + 1 :]} {text}"
    if not isinstance(doc, dict):
        return f"{topic}: {text}"
    if topic == topics.errors:
        return f"rejected frame from {doc.get('device_id')}: {doc.get('reason')}: {doc.get('message')}"
    faces = doc.get("faces", [])
    detail = ", ".join(f"{f['emotion']} {f['confidence']:.2f} at {f['box']}" for f in faces) or "no face"
    return (
        f"{doc.get('processed_at', '')} {doc.get('device_id')}/{doc.get('frame_id')}: "
        f"{doc.get('emotion')}  [{detail}]  {doc.get('latency_ms')} ms"
    )


def _config(settings, args) -> int:
    from worker.config import masked, to_toml

    data = masked(settings)
    print(json.dumps(data, indent=2) if args.json else to_toml(data))
    return 0


def _health(settings, args) -> int:
    from worker.health import check, heartbeat_path

    ok, message = check(heartbeat_path(settings.health.heartbeat_file), settings.health.max_age_s)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
