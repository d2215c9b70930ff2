"""emotion-worker: run the worker, classify images, play a camera, watch events, show the config, check health,
check and try rules."""

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
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="SECTION.KEY=VALUE",
            help="a setting, above the environment and the config file; repeatable (e.g. --set mqtt.port=8883)",
        )
        return p

    embedded_help = (
        "use the MQTT broker already on broker.host:broker.port, else start one there "
        "(Mosquitto when installed, MQTT 5; else amqtt, MQTT 3.1.1)"
    )
    p = with_config(sub.add_parser("run", help="serve: frames from MQTT in, emotion events out"))
    p.add_argument("--embedded-broker", action="store_true", help=embedded_help)

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
    p.add_argument(
        "--wait",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="wait this long for each frame's outcome from the worker (default 5; 0: do not wait)",
    )

    p = with_config(sub.add_parser("watch", help="print emotion events as they arrive"))
    p.add_argument("--errors", action="store_true", help="print rejected-frame records (the default; kept for scripts)")
    p.add_argument("--json", action="store_true", help="print each message as received, one JSON line each")
    p.add_argument(
        "--topic",
        action="append",
        default=[],
        metavar="FILTER",
        help="watch this topic filter instead (e.g. a rule's topic, or 'zigbee2mqtt/#'); repeatable",
    )
    p.add_argument("--count", type=int, help="exit after this many events (with --topic: messages)")
    p.add_argument("--timeout", type=float, help="exit after this many seconds")

    p = with_config(
        sub.add_parser("forget", help="remove cameras from Home Assistant: empty their retained configs and state")
    )
    p.add_argument("devices", nargs="+", metavar="DEVICE", help="device id, the '+' level of the frames topic")

    p = with_config(sub.add_parser("config", help="print the effective configuration, secrets masked"))
    p.add_argument("--json", action="store_true", help="as JSON instead of TOML")
    p.add_argument("--embedded-broker", action="store_true", help="as `run --embedded-broker` would use it")

    rules = sub.add_parser("rules", help="check the rules file, or try it on a made-up state").add_subparsers(
        dest="rules_command", required=True
    )
    p = with_config(rules.add_parser("check", help="validate a rules file and print a summary (exit 2 on errors)"))
    p.add_argument("file", nargs="?", type=Path, help="rules file (default: rules.file, else config/rules.toml)")
    p = with_config(
        rules.add_parser(
            "test",
            help="print what each rule would publish for a camera's state, and why a rule would not; publishes nothing",
        )
    )
    p.add_argument("file", nargs="?", type=Path, help="rules file (default: rules.file, else config/rules.toml)")
    p.add_argument("--device", required=True, help="device id of the camera")
    p.add_argument("--emotion", required=True, help="its steady emotion: one of the model's classes, or none")
    p.add_argument("--confidence", type=float, default=0.8, help="the state's confidence, 0-1 (default 0.8)")
    p.add_argument("--at", metavar="HH:MM", help="local time of day to try (default: now), for quiet hours")

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

        hold_stop_signals(reload=args.command == "run")  # the worker reloads its rules on SIGHUP
    from worker.config import ConfigError, load_settings, parse_set

    try:
        overrides = parse_set(args.set)
        if getattr(args, "embedded_broker", False):
            overrides.setdefault("broker", {})["embedded"] = True
        settings = load_settings(args.config, **overrides)
    except ConfigError as exc:
        print(f"emotion-worker: {exc}", file=sys.stderr)
        return 1 if args.command == "health" else EXIT_CONFIG  # Docker reserves a health check's exit 2
    return {
        "run": _run,
        "classify": _classify,
        "publish": _publish,
        "watch": _watch,
        "forget": _forget,
        "config": _config,
        "health": _health,
        "rules": _rules,
    }[args.command](settings, args)


def _run(settings, args) -> int:
    from worker.app import Worker
    from worker.broker import BrokerError
    from worker.faces import DetectorError
    from worker.log import get_logger, setup_logging
    from worker.model import CheckpointError

    setup_logging(settings.log.level, settings.log.format)
    log = get_logger()
    worker = Worker(settings)
    try:
        worker.start()
    except (CheckpointError, DetectorError, BrokerError, ValueError) as exc:
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


def _client(settings, name: str, on_message=None, subscriptions=()):
    """A connected, running paho client for the helper commands, and the protocol it speaks ("5" or "3.1.1").

    MQTT 5 first (unless mqtt.protocol is "3.1.1"), then MQTT 3.1.1 when the broker does
    not speak 5 (amqtt); ``subscriptions`` are made and acknowledged before it returns.
    """
    import paho.mqtt.client as mqtt

    from worker.mqtt import configure_tls

    mq = settings.mqtt
    protocols = ["5", "3.1.1"] if mq.protocol == "5" else ["3.1.1"]
    for protocol in protocols:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"emotion-{name}-{time.time_ns() % 10**9}",
            protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
        )
        answer: dict = {}
        ready = threading.Event()

        def on_connect(c, userdata, flags, reason_code, properties, answer=answer, ready=ready):
            answer["reason"] = reason_code
            if reason_code.is_failure or not subscriptions:
                ready.set()
            else:
                c.subscribe(list(subscriptions))

        client.on_connect = on_connect
        client.on_subscribe = lambda *a, ready=ready: ready.set()
        client.on_message = on_message
        if mq.username:
            client.username_pw_set(mq.username, mq.secret())
        try:
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
        client.loop_start()
        ready.wait(10)
        reason = answer.get("reason")
        if reason is not None and not reason.is_failure:
            return client, protocol
        client.loop_stop()
        client.disconnect()
        if protocol == "5" and reason is not None and reason.value == 0x84 and len(protocols) > 1:
            continue  # an MQTT 3.1.1 broker: try again with 3.1.1
        why = f"the broker refused the connection: {reason}" if reason is not None else "no answer within 10 s"
        raise SystemExit(f"emotion-worker {name}: {mq.host}:{mq.port}: {why}")
    raise AssertionError("unreachable")


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
    """Publish the frames, then print what became of each, as the worker answers on a reply topic per frame."""
    import base64

    import cv2

    from worker.frames import encode_jpeg
    from worker.topics import frame_topic

    topic = frame_topic(settings.topics.frames, args.device)
    reply_base = f"emotion/replies/emotion-publish-{time.time_ns() % 10**9}"
    answered: dict[str, str] = {}
    sources: dict[str, str] = {}
    cond = threading.Condition()

    def on_reply(client, userdata, msg):
        frame_id = msg.topic.rsplit("/", 1)[-1]
        line = _outcome_line(_maybe_json(msg.payload.decode(errors="replace")))
        with cond:
            if frame_id in sources and frame_id not in answered:
                answered[frame_id] = line
                source = f" ({sources[frame_id]})" if sources[frame_id] else ""
                print(f"{frame_id}{source}: {line}", flush=True)
                cond.notify_all()

    wait = max(0.0, args.wait)
    client, protocol = _client(settings, "publish", on_reply, [(f"{reply_base}/#", 0)] if wait else [])
    asks = wait > 0 and (protocol == "5" or not args.raw)
    if wait and not asks:
        print(
            "emotion-worker publish: raw frames over MQTT 3.1.1 cannot ask for their outcome; "
            f"`emotion-worker watch` shows it (events, {settings.topics.errors}, {settings.topics.skipped})",
            file=sys.stderr,
        )
    period = 1 / args.fps if args.fps > 0 else 0
    sent, next_at = 0, time.monotonic()
    try:
        for name, image in _frames(args):
            if args.max_width and image.shape[1] > args.max_width:
                scale = args.max_width / image.shape[1]
                image = cv2.resize(image, (args.max_width, round(image.shape[0] * scale)), interpolation=cv2.INTER_AREA)
            jpeg = encode_jpeg(image)
            frame_id = f"{args.device}-{sent}"
            reply_topic = f"{reply_base}/{frame_id}"
            envelope = {
                "image": base64.b64encode(jpeg).decode(),
                "frame_id": frame_id,
                "captured_at": time.time(),
                **({"source": name} if name else {}),
                **({"reply_to": reply_topic} if asks else {}),
            }
            payload = jpeg if args.raw else json.dumps(envelope)
            with cond:
                sources[frame_id] = name or ""
            # Said before publishing, so that it comes before the answer, which can be quick.
            print(f"published {frame_id} ({len(payload)} bytes) to {topic}", file=sys.stderr, flush=True)
            client.publish(
                topic,
                payload,
                qos=0,
                properties=_reply_properties(reply_topic, frame_id) if asks and protocol == "5" else None,
            ).wait_for_publish(5)
            sent += 1
            if args.count and sent >= args.count:
                break
            next_at += period
            time.sleep(max(0.0, next_at - time.monotonic()))
        if asks:
            deadline = time.monotonic() + wait
            with cond:
                while len(answered) < len(sources) and cond.wait(max(0.0, deadline - time.monotonic())):
                    pass
    except KeyboardInterrupt:
        pass
    finally:
        client.loop_stop()
        client.disconnect()
    missing = [f for f in sources if f not in answered] if asks else []
    for frame_id in missing:
        print(
            f"{frame_id}: no answer within {wait:g} s; is a worker running and subscribed to "
            f"{', '.join(settings.topics.frames)} on {settings.mqtt.host}:{settings.mqtt.port}?",
            flush=True,
        )
    return 0 if sent and not missing else 1


def _reply_properties(reply_topic: str, frame_id: str):
    """MQTT 5 PUBLISH properties that ask for the frame's outcome on ``reply_topic``."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.PUBLISH)
    props.ResponseTopic = reply_topic
    props.CorrelationData = frame_id.encode()
    return props


def _faces_text(faces: list) -> str:
    return ", ".join(f"{f['emotion']} {f['confidence']:.2f} at {f['box']}" for f in faces) or "no face"


def _outcome_line(doc) -> str:
    """A frame's outcome record (``worker/schemas/outcome.schema.json``) in a line."""
    if not isinstance(doc, dict):
        return f"unreadable answer: {doc!r}"
    if doc.get("outcome") == "event" and isinstance(doc.get("event"), dict):
        event = doc["event"]
        return f"{event.get('emotion')}  [{_faces_text(event.get('faces', []))}]  {event.get('latency_ms')} ms"
    return str(doc.get("message") or doc.get("outcome"))


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
        elif args.topic:
            print(f"{time.strftime('%H:%M:%S')} {msg.topic}{' (retained)' if msg.retain else ''}: {text}", flush=True)
        else:
            print(_describe(msg.topic, text, topics), flush=True)
        if args.topic or msg.topic == topics.events:
            seen["events"] += 1
            if args.count and seen["events"] >= args.count:
                done.set()

    if args.topic:
        subs = [(t, 1) for t in args.topic]
    else:
        subs = [
            (topics.events, 1),
            (f"{topics.status}/+", 1),
            (topics.skipped, 0),
            (topics.errors, 0),
            (topics.actions, 1),
        ]
    client, protocol = _client(settings, "watch", on_message, subs)
    print(
        f"watching {', '.join(t for t, _ in subs)} on {settings.mqtt.host}:{settings.mqtt.port} (MQTT {protocol})",
        file=sys.stderr,
        flush=True,
    )
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
    if topic == topics.errors and "rule" in doc:
        return f"{doc.get('at', '')} rule failed: {doc.get('message')}"
    if topic == topics.errors:
        return f"rejected frame from {doc.get('device_id')}: {doc.get('reason')}: {doc.get('message')}"
    if topic == topics.actions:
        return (
            f"{doc.get('at', '')} rule {doc.get('rule')}: {doc.get('device_id')} {doc.get('emotion')} "
            f"{doc.get('confidence')} -> {doc.get('topic')}"
        )
    if topic == topics.skipped:
        return f"{doc.get('at', '')} {doc.get('device_id')}/{doc.get('frame_id') or '?'}: {doc.get('message')}"
    detail = _faces_text(doc.get("faces", []))
    return (
        f"{doc.get('processed_at', '')} {doc.get('device_id')}/{doc.get('frame_id')}: "
        f"{doc.get('emotion')}  [{detail}]  {doc.get('latency_ms')} ms"
    )


def _forget(settings, args) -> int:
    from worker.discovery import forget_cameras
    from worker.model import BUNDLED_WEIGHTS, CLASSES, CheckpointError, read_info
    from worker.topics import check_device_id

    try:
        devices = [check_device_id(d) for d in args.devices]
    except ValueError as exc:
        print(f"emotion-worker forget: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:  # the device triggers are one per class of the model
        classes = read_info(settings.model.weights or BUNDLED_WEIGHTS).classes
    except CheckpointError:
        classes = CLASSES
    client, _ = _client(settings, "forget")
    try:
        cleared = forget_cameras(client, settings, devices, classes)
    except TimeoutError as exc:
        print(f"emotion-worker forget: {exc}", file=sys.stderr)
        return 1
    finally:
        client.loop_stop()
        client.disconnect()
    for device, topics in cleared.items():
        print(f"{device}: emptied {len(topics)} retained topics (discovery configs and state)")
        if device in settings.homeassistant.cameras:
            print(
                f"{device}: still listed in [homeassistant.cameras]; a worker announces it again at its next start",
                file=sys.stderr,
            )
    return 0


def _config(settings, args) -> int:
    """Print the settings, and what they resolve to: the config file read, the model weights, the broker."""
    from worker.config import config_path, masked, to_toml
    from worker.model import BUNDLED_WEIGHTS

    data = masked(settings)
    file = config_path(args.config)
    weights = settings.model.weights or BUNDLED_WEIGHTS
    data["model"]["weights"] = str(Path(weights).resolve())
    used = {
        "config_file": str(file) if file else None,
        "model_weights": f"{Path(weights).resolve()}" + (" (bundled)" if settings.model.weights is None else ""),
        "broker": None,
    }
    if settings.broker.embedded:
        from worker.broker import find_mosquitto, planned

        b = planned(settings.broker.kind, settings.broker.host, settings.broker.port)
        data["mqtt"].update(host=b.host, port=b.port, protocol=b.protocol)
        used["broker"] = {
            "existing": f"the broker already on {b.host}:{b.port}, MQTT {b.protocol}",
            "mosquitto": f"Mosquitto ({find_mosquitto()}), started by the worker on {b.host}:{b.port}, MQTT 5",
            "amqtt": f"amqtt, started in the worker on {b.host}:{b.port}, MQTT 3.1.1 (install Mosquitto for MQTT 5)",
        }[b.kind]
    if args.json:
        print(json.dumps({**data, "used": used}, indent=2))
        return 0
    print(f"# config file: {used['config_file'] or 'none (defaults, environment and --set only)'}")
    print(f"# model weights: {used['model_weights']}")
    print(f"# broker: {used['broker'] or f'{settings.mqtt.host}:{settings.mqtt.port}, MQTT {settings.mqtt.protocol}'}")
    print()
    print(to_toml(data))
    return 0


def _rules(settings, args) -> int:
    """`rules check` and `rules test`: the rules file validated as the worker would, nothing published."""
    from worker.rules import RulesError, load_rules, local_zone, model_classes

    path = args.file or settings.rules.path()
    classes = model_classes(settings)
    zone = local_zone(settings.rules.timezone)
    try:
        ruleset = load_rules(path, classes, settings.topics.frames)
    except RulesError as exc:
        hint = "" if args.file or settings.rules.file or path.exists() else " (set rules.file, or give the file)"
        print(f"emotion-worker rules {args.rules_command}: {exc}{hint}", file=sys.stderr)
        return EXIT_CONFIG
    if args.rules_command == "check":
        return _rules_check(path, ruleset, classes, zone)
    return _rules_test(settings, args, path, ruleset, classes, zone)


def _rules_check(path, ruleset, classes, zone) -> int:
    from worker.rules import template_warnings

    n = len(ruleset.rules)
    print(f"{path}: {n} rule{'s' if n != 1 else ''}, valid")
    for rule in ruleset.rules:
        r = rule.rule
        when = [f"min_confidence {r.min_confidence:g}"] if r.min_confidence else []
        when += [f"held {r.for_s:g} s"] if r.for_s else []
        when += [f"cooldown {r.cooldown_s:g} s"] if r.cooldown_s else []
        when += [f"quiet {rule.quiet}"] if rule.quiet else []
        print(
            f"  {r.name}: devices {', '.join(r.devices)}; emotions {', '.join(r.emotions)}"
            + (f"; {', '.join(when)}" if when else "")
            + f" -> {r.topic} (qos {r.qos}{', retained' if r.retain else ''})"
        )
    for line in template_warnings(ruleset, classes, zone):
        print(f"warning: {line}", file=sys.stderr)
    return 0


def _rules_test(settings, args, path, ruleset, classes, zone) -> int:
    from datetime import datetime

    from worker.rules import NONE, local_time, sample_state, try_rule
    from worker.topics import check_device_id

    try:
        check_device_id(args.device)
        if args.emotion not in (*classes, NONE):
            raise ValueError(f"unknown emotion {args.emotion!r}; known: {', '.join((*classes, NONE))}")
        if not 0 <= args.confidence <= 1:
            raise ValueError(f"--confidence {args.confidence:g} is not between 0 and 1")
        now = time.time()
        local = local_time(now, zone)
        if args.at:
            at = datetime.strptime(args.at, "%H:%M")
            local = local.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0)
            now = local.timestamp()
    except ValueError as exc:
        print(f"emotion-worker rules test: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    zone_name = settings.rules.timezone or "local time"
    confidence = f" {args.confidence:.2f}" if args.emotion != NONE else ""
    print(
        f"{path}: camera {args.device!r}, {args.emotion}{confidence}, at {local:%H:%M} ({zone_name}); "
        "nothing is published"
    )
    for rule in ruleset.rules:
        r = rule.rule
        state = sample_state(args.device, args.emotion, args.confidence, classes, now, r.for_s)
        result = try_rule(rule, state, local)
        if isinstance(result, str):
            print(f"  {r.name}: {result}")
            continue
        topic, payload = result
        when = f" once the state has held {r.for_s:g} s" if r.for_s else ""
        print(f"  {r.name}: publishes to {topic} (qos {r.qos}{', retained' if r.retain else ''}){when}:")
        print("    " + payload.strip().replace("\n", "\n    "))
    return 0


def _health(settings, args) -> int:
    from worker.health import check, heartbeat_path

    ok, message = check(heartbeat_path(settings.health.heartbeat_file), settings.health.max_age_s)
    print(message, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
