"""Home Assistant MQTT discovery: every camera a device with its entities, and the worker a device of its own.

Each camera (a device id seen on a frames topic, or listed in ``[homeassistant.cameras]``) gets:
a sensor "Emotion" (the steady emotion, the state document as attributes), a sensor "Emotion
confidence" (%), a binary sensor "Face" (occupancy), an event entity "Emotion" fired on each
change, and one device trigger per emotion. The worker's device carries sensors from its stats.

Only what Home Assistant 2023.8 knows is used: one retained config per entity on
``<prefix>/<component>/<node_id>/<object_id>/config``, availability lists with
``availability_mode: any``, the event entity (new in 2023.8). Configs are sent again when Home
Assistant announces itself (``online`` on its status topic). An empty retained config removes an
entity; :func:`forget_cameras` and the start-up clean-up of cameras dropped from the config send those.

Which cameras were announced is read back from the broker's retained configs (subscribed under
:data:`NODE_ID`), so no local file is needed.
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import threading
import time
from collections.abc import Callable

from worker import __version__
from worker.log import get_logger
from worker.state import NONE
from worker.topics import device_topic, discovery_config, discovery_filter, worker_stats

log = get_logger("emotion-worker.discovery")

NODE_ID = "emotion_worker"  # every config this worker sends is below <prefix>/<component>/emotion_worker/
CAMERA_ID = "emotion-worker:camera:"  # + device id: a camera's device identifier
WORKER_ID = "emotion-worker:worker:"  # + client id: a worker's device identifier
# Set in the "Emotion" sensor's config of a camera listed in [homeassistant.cameras], so that a later start
# knows it was configured (and removes it when it no longer is). Home Assistant drops unknown keys.
CONFIGURED_KEY = "emotion_worker_configured"
CAMERA_PARTS = ("emotion", "emotion_confidence", "face", "event")
WAIT_FOR_SCAN_S = 10.0
# Between emptying a camera's configs and its state: Home Assistant removes the entities first, so they never
# read the empty state (which they would log as an error: not JSON).
STATE_AFTER_CONFIGS_S = 1.0


def object_id(name: str) -> str:
    """``name`` as a discovery object id (letters, digits, ``_`` and ``-``); a short hash keeps changed ones apart."""
    safe = re.sub(r"[^a-zA-Z0-9_-]", "_", name)
    return safe if safe == name else f"{safe}_{hashlib.sha1(name.encode()).hexdigest()[:6]}"


def jinja_string(text: str) -> str:
    """``text`` as a Jinja string literal that cannot end the template it is in."""
    quoted = json.dumps(text)  # ASCII, with \\uXXXX escapes, which Jinja string literals decode too
    return quoted.translate({ord(c): f"\\u{ord(c):04x}" for c in "{}%#"})


def camera_topics(prefix: str, device: str, emotions: tuple[str, ...]) -> list[str]:
    """The discovery config topics of ``device``'s entities and device triggers."""
    obj = object_id(device)
    components = {"emotion": "sensor", "emotion_confidence": "sensor", "face": "binary_sensor", "event": "event"}
    out = [discovery_config(prefix, components[p], NODE_ID, f"camera_{obj}_{p}") for p in CAMERA_PARTS]
    out += [discovery_config(prefix, "device_automation", NODE_ID, f"camera_{obj}_{object_id(e)}") for e in emotions]
    return out


def camera_configs(
    settings,
    device: str,
    emotions: tuple[str, ...],
    availability: list[str],
    client_id: str,
    model: dict,
) -> dict[str, dict]:
    """Discovery config per topic for the camera ``device`` (see :func:`camera_topics` for the order).

    ``settings`` is the whole configuration; ``emotions`` the model's classes and ``none``; ``availability``
    the status topics of the workers that may serve the camera; ``model`` ``{"name", "version"}``.
    """
    ha = settings.homeassistant
    camera = ha.cameras.get(device)
    state = device_topic(settings.topics.state, device)
    is_device = f"value_json.device_id == {jinja_string(device)}"
    dev = {
        "identifiers": [CAMERA_ID + device],
        "name": (camera.name if camera and camera.name else device),
        "manufacturer": "emotion-worker",
        "model": "Camera",
        "sw_version": f"emotion-worker {__version__}, model {model['name']} {model['version']}",
        "via_device": WORKER_ID + client_id,
    }
    if camera and camera.area:
        dev["suggested_area"] = camera.area
    common = {
        "device": dev,
        "availability": [{"topic": t} for t in availability],
        "availability_mode": "any",
        "qos": 1,
    }
    uid = f"{CAMERA_ID}{device}:"
    entities = [
        {
            "name": "Emotion",
            "unique_id": uid + "emotion",
            "state_topic": state,
            "value_template": "{{ value_json.emotion }}",
            "json_attributes_topic": state,
            "icon": "mdi:emoticon-outline",
            **({CONFIGURED_KEY: True} if camera else {}),
        },
        {
            "name": "Emotion confidence",
            "unique_id": uid + "emotion_confidence",
            "state_topic": state,
            "value_template": "{{ (value_json.confidence * 100) | round(1) }}",
            "unit_of_measurement": "%",
            "state_class": "measurement",
            "icon": "mdi:gauge",
        },
        {
            "name": "Face",
            "unique_id": uid + "face",
            "state_topic": state,
            "value_template": f"{{{{ 'OFF' if value_json.emotion == '{NONE}' else 'ON' }}}}",
            "device_class": "occupancy",
        },
        {
            "name": "Emotion",
            "unique_id": uid + "event",
            "state_topic": settings.topics.changes,
            # The changes of every camera come on one topic; an empty result is ignored.
            "value_template": f"{{% if {is_device} %}}"
            '{{ {"event_type": value_json.to, "from": value_json["from"], "confidence": value_json.confidence, '
            '"held_s": value_json.held_s} | to_json }}{% endif %}',
            "event_types": list(emotions),
            "icon": "mdi:emoticon-outline",
        },
    ]
    topics = camera_topics(ha.prefix, device, emotions)
    out = {t: {**e, **common} for t, e in zip(topics, entities)}
    for t, e in zip(topics[len(entities) :], emotions):
        out[t] = {
            "automation_type": "trigger",
            "topic": settings.topics.changes,
            "type": "emotion",
            "subtype": e,
            "payload": e,
            "value_template": f"{{{{ value_json.to if {is_device} else '' }}}}",
            "qos": 1,
            "device": dev,
        }
    return out


def worker_configs(settings, client_id: str, status_topic: str, model: dict) -> dict[str, dict]:
    """Discovery config per topic for the worker's own device: sensors read from its retained stats."""
    prefix, obj = settings.homeassistant.prefix, object_id(client_id)
    stats = worker_stats(settings.topics.stats, client_id)
    dev = {
        "identifiers": [WORKER_ID + client_id],
        "name": client_id,
        "manufacturer": "emotion-worker",
        "model": "Emotion worker",
        "sw_version": f"emotion-worker {__version__}, model {model['name']} {model['version']}",
    }
    sensors = {
        "frames_per_s": {
            "name": "Frames per second",
            "value_template": "{{ value_json.frames_per_s }}",
            "unit_of_measurement": "frames/s",
            "state_class": "measurement",
            "icon": "mdi:speedometer",
        },
        "latency_p95": {
            "name": "Latency p95",
            # No frame in the interval: no latency; 'None' leaves the sensor unknown.
            "value_template": "{{ value_json.latency_ms.p95 if value_json.latency_ms.p95 is not none else 'None' }}",
            "unit_of_measurement": "ms",
            "device_class": "duration",
            "state_class": "measurement",
        },
        "dropped": {
            "name": "Dropped frames",
            "value_template": "{{ value_json.frames.dropped }}",
            "state_class": "total_increasing",
            "icon": "mdi:image-remove",
        },
        "model_version": {
            "name": "Model version",
            "value_template": "{{ value_json.model.version }}",
            "entity_category": "diagnostic",
            "icon": "mdi:brain",
        },
    }
    return {
        discovery_config(prefix, "sensor", NODE_ID, f"worker_{obj}_{key}"): {
            **cfg,
            "unique_id": f"{WORKER_ID}{client_id}:{key}",
            "state_topic": stats,
            "availability_topic": status_topic,
            "qos": 1,
            "device": dev,
        }
        for key, cfg in sensors.items()
    }


def camera_of(config: dict) -> tuple[str | None, bool]:
    """The camera device id a retained discovery config belongs to (None for others), and whether it was
    configured (:data:`CONFIGURED_KEY`)."""
    ids = (config.get("device") or {}).get("identifiers") or []
    ids = [ids] if isinstance(ids, str) else ids
    device = next((i[len(CAMERA_ID) :] for i in ids if isinstance(i, str) and i.startswith(CAMERA_ID)), None)
    return device or None, bool(config.get(CONFIGURED_KEY))


class Discovery:
    """Announces cameras and the worker; reads back what the broker holds. Its own thread does the publishing.

    ``publish(topic, payload, retain)`` sends through the worker's MQTT link; ``tracker`` is the
    :class:`worker.state.StateTracker` (new cameras come from its listener, forgotten ones leave it).
    """

    def __init__(
        self,
        settings,
        client_id: str,
        status_topic: str,
        model: dict,
        classes: tuple[str, ...],
        tracker,
        publish: Callable[[str, bytes, bool], None],
        is_connected: Callable[[], bool] = lambda: True,
    ):
        self.settings = settings
        self.client_id = client_id
        self.status_topic = status_topic
        self.model = dict(model)
        self.emotions = tuple(classes) + (NONE,)
        self.tracker = tracker
        self.publish = publish
        self.is_connected = is_connected
        self._lock = threading.Lock()
        self._announced: set[str] = set()  # cameras whose configs this process sent
        self._wanted: set[str] = set()  # cameras queued for announcement
        self._retained: dict[str, str] = {}  # config topic -> camera, from the broker
        self._configured_before: set[str] = set()
        self._workers: list[str] = [status_topic]  # availability list: own first, then every worker seen
        self._tasks: queue.Queue = queue.Queue()
        self._scanned = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sent = 0  # configs published, for tests and logs

    # -- wiring --------------------------------------------------------------------------------------
    def subscribe(self, link) -> None:
        """Subscribe through ``link`` (before it connects): retained configs first, then the status topics,
        so the worker's own ``online`` arrives after every retained config (the read-back is complete). Both at
        QoS 1: the broker delivers QoS 1 messages to one client in order."""
        ha, topics = self.settings.homeassistant, self.settings.topics
        link.subscribe(discovery_filter(ha.prefix, NODE_ID), 1, self._on_config)
        link.subscribe(f"{topics.status}/#", 1, self._on_worker_status)
        link.subscribe(ha.status_topic, 1, self._on_ha_status)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="discovery", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._tasks.put(("stop",))
        if self._thread:
            self._thread.join(timeout)

    # -- inputs (paho's network thread, the pipeline, the ticks): hand on, never block ---------------------
    def on_state(self, state: dict, change: dict | None, now: float) -> None:
        """A :class:`StateTracker` listener: a camera not announced yet is queued for announcement."""
        device = state["device_id"]
        with self._lock:
            if device in self._announced or device in self._wanted:
                return
            self._wanted.add(device)
        self._tasks.put(("announce", device))

    def _on_config(self, topic: str, payload: bytes, retained: bool) -> None:
        try:
            config = json.loads(payload) if payload else None
        except ValueError:
            return
        with self._lock:
            if isinstance(config, dict):
                device, configured = camera_of(config)
                if device is not None:
                    self._retained[topic] = device
                    if configured and retained and not self._scanned.is_set():
                        self._configured_before.add(device)
                return
            device = self._retained.pop(topic, None)
        if device is not None and not retained:
            self._tasks.put(("removed", device))

    def _on_worker_status(self, topic: str, payload: bytes, retained: bool) -> None:
        if not topic.startswith(self.settings.topics.status + "/"):
            return
        if topic == self.status_topic:
            if payload == b"online":
                self._tasks.put(("online",))
            return
        with self._lock:
            if topic in self._workers:
                return
            self._workers.append(topic)
        if self._scanned.is_set():
            self._tasks.put(("resend",))  # the cameras' availability lists grew

    def _on_ha_status(self, topic: str, payload: bytes, retained: bool) -> None:
        if payload.strip().lower() == b"online":
            log.info("Home Assistant is online, announcing again", topic=topic)
            self._tasks.put(("resend",))

    # -- the discovery thread ---------------------------------------------------------------------------
    def _loop(self) -> None:
        connected_at = None
        while not self._stop.is_set():
            try:
                task = self._tasks.get(timeout=1.0)
            except queue.Empty:
                if self._scanned.is_set() or not self.is_connected():
                    continue
                connected_at = connected_at or time.monotonic()
                if time.monotonic() - connected_at > WAIT_FOR_SCAN_S:
                    log.warning(
                        "the worker's own status did not come back (may it read it? see config/mosquitto.acl); "
                        "cameras removed from the config are not cleared this time",
                        status=self.status_topic,
                    )
                    self._begin(read_back=False)
                continue
            try:
                self._run(task)
            except Exception:  # a bug must cost one announcement, never the thread
                log.exception("discovery failed", task=task[0])

    def _run(self, task: tuple) -> None:
        kind = task[0]
        if kind == "online":
            if not self._scanned.is_set():
                self._begin(read_back=True)
            else:
                self._announce_all()  # a reconnect: the broker may have lost its retained messages
        elif kind == "announce" and self._scanned.is_set():
            self._announce(task[1])
        elif kind == "resend" and self._scanned.is_set():
            self._announce_all()
        elif kind == "removed":
            self._removed(task[1])

    def _begin(self, read_back: bool) -> None:
        """The retained configs are read: clear cameras dropped from the config, then announce everything."""
        self._scanned.set()
        configured = set(self.settings.homeassistant.cameras)
        removed = sorted(self._configured_before - configured)
        with self._lock:
            announced_before = sorted(set(self._retained.values()))
        log.info(
            "announcing to Home Assistant",
            read_back=read_back,
            cameras_announced_before=announced_before,
            cameras_removed=removed,
            workers=len(self._workers),
        )
        for device in removed:
            log.info("camera removed from the config, removing it from Home Assistant", device=device)
        if removed:
            self.forget(removed)
        self._announce_all()

    def _announce_all(self) -> None:
        for topic, config in worker_configs(self.settings, self.client_id, self.status_topic, self.model).items():
            self._send(topic, config)
        cameras = set(self.settings.homeassistant.cameras) | set(self.tracker.devices())
        with self._lock:
            cameras |= self._announced | self._wanted
        for device in sorted(cameras):
            self._announce(device)

    def _announce(self, device: str) -> None:
        if device not in self.settings.homeassistant.cameras and self.tracker.state(device) is None:
            with self._lock:  # forgotten meanwhile
                self._wanted.discard(device)
            return
        with self._lock:
            workers = list(self._workers)
        configs = camera_configs(self.settings, device, self.emotions, workers, self.client_id, self.model)
        for topic, config in configs.items():
            self._send(topic, config)
        with self._lock:
            first = device not in self._announced
            self._announced.add(device)
            self._wanted.discard(device)
        if first:
            log.info("camera announced to Home Assistant", device=device, entities=len(configs))

    def _removed(self, device: str) -> None:
        """A camera's config was emptied on the broker (``emotion-worker forget``): forget it here too."""
        with self._lock:
            known = device in self._announced
            self._announced.discard(device)
        if known and self.tracker.forget(device):
            log.info("camera forgotten", device=device)

    def forget(self, devices: list[str]) -> list[str]:
        """Empty the retained configs, then the state, of each of ``devices``; returns the topics cleared."""
        configs = []
        for device in devices:
            with self._lock:
                self._announced.discard(device)
                topics = {t for t, d in self._retained.items() if d == device}
            self.tracker.forget(device)
            configs += sorted(topics | set(camera_topics(self.settings.homeassistant.prefix, device, self.emotions)))
        for t in configs:
            self.publish(t, b"", True)
        time.sleep(STATE_AFTER_CONFIGS_S)
        states = [device_topic(self.settings.topics.state, device) for device in devices]
        for t in states:
            self.publish(t, b"", True)
        return configs + states

    def _send(self, topic: str, config: dict) -> None:
        self.publish(topic, json.dumps(config, separators=(",", ":")).encode(), True)
        self.sent += 1


def read_announced(client, settings, timeout: float = 10.0) -> dict[str, set[str]]:
    """The retained discovery config topics on the broker, by camera, read with a connected paho ``client``.

    Subscribes to the worker's discovery configs, then to Home Assistant's status topic: once the second
    subscription is acknowledged, the retained messages of the first have all arrived (at QoS 0).
    """
    found: dict[str, set[str]] = {}
    config_filter = discovery_filter(settings.homeassistant.prefix, NODE_ID)

    def on_config(client, userdata, msg):
        try:
            device, _ = camera_of(json.loads(msg.payload)) if msg.payload else (None, False)
        except (ValueError, AttributeError):
            return
        if device is not None:
            found.setdefault(device, set()).add(msg.topic)

    acked: set[int] = set()
    cond = threading.Condition()

    def on_subscribe(client, userdata, mid, *rest):
        with cond:
            acked.add(mid)
            cond.notify_all()

    client.message_callback_add(config_filter, on_config)
    client.on_subscribe = on_subscribe
    # QoS 0: the broker sends QoS 1 messages only a few at a time (Mosquitto: 20 in flight), and may then
    # acknowledge the second subscription before the first one's retained messages are all out.
    client.subscribe(config_filter, 0)
    mid = client.subscribe(settings.homeassistant.status_topic, 0)[1]
    with cond:
        if not cond.wait_for(lambda: mid in acked, timeout):
            raise TimeoutError(f"the broker did not answer a subscription within {timeout} s")
    client.unsubscribe([config_filter, settings.homeassistant.status_topic])
    client.message_callback_remove(config_filter)
    return found


def forget_cameras(client, settings, devices: list[str], classes: tuple[str, ...], timeout: float = 10.0) -> dict:
    """Empty the retained discovery configs and state of each of ``devices``; returns the topics cleared, by device.

    ``client`` is a connected paho client with its network loop running.
    """
    announced = read_announced(client, settings, timeout)
    emotions = tuple(classes) + (NONE,)
    configs = {
        d: sorted(announced.get(d, set()) | set(camera_topics(settings.homeassistant.prefix, d, emotions)))
        for d in devices
    }
    states = {d: device_topic(settings.topics.state, d) for d in devices}

    def clear(topics: list[str]) -> None:
        for info in [client.publish(t, b"", qos=1, retain=True) for t in topics]:
            info.wait_for_publish(timeout)

    clear([t for topics in configs.values() for t in topics])
    time.sleep(STATE_AFTER_CONFIGS_S)
    clear(list(states.values()))
    return {d: configs[d] + [states[d]] for d in devices}
