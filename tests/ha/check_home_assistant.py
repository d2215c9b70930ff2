"""What a real Home Assistant makes of the worker's discovery: entities, devices, device triggers, availability.

    python tests/ha/check_home_assistant.py [--ha-tool ../shared/tools/ha.py] [--json FILE]

Starts Mosquitto, Home Assistant 2024.3 (``ha.py``, which installs it once into
~/.cache/emotion-ha-venv) and the worker with its bundled model. Faces are
published for the cameras ``kitchen`` and ``living_room``; the automations of
docs/home-assistant.md run against two MQTT lights. Prints one line per check and
a summary; exits 1 if a check failed. Opt-in (``make test-ha``), not part of
``make test``: it downloads Home Assistant.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import paho.mqtt.client as mqtt
import yaml

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from worker.discovery import CAMERA_ID, WORKER_ID  # noqa: E402
from worker.frames import encode_jpeg  # noqa: E402
from worker.model import read_info  # noqa: E402

FACES = REPO / "tests" / "data" / "fer2013-mini" / "val"
CLIENT_ID = "ha-check-worker"
LIGHTS = ("kitchen", "living_room")


class Checks:
    def __init__(self):
        self.failed = 0
        self.results: list[dict] = []

    def __call__(self, ok: bool, what: str, detail=None) -> bool:
        print(("ok   " if ok else "FAIL ") + what + (f": {detail}" if detail is not None else ""), flush=True)
        self.failed += not ok
        self.results.append({"ok": bool(ok), "check": what, "detail": detail})
        return ok


def frames(emotion: str) -> list[bytes]:
    """640x480 JPEGs, each a FER2013 face of ``emotion`` enlarged to 160 px (as the tests' face frames)."""
    out = []
    for path in sorted((FACES / emotion).glob("*.jpg"))[:8]:
        face = cv2.resize(cv2.imread(str(path), cv2.IMREAD_GRAYSCALE), (160, 160), interpolation=cv2.INTER_CUBIC)
        canvas = np.full((480, 640), 90, np.uint8)
        canvas[120:280, 240:400] = face
        out.append(encode_jpeg(cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR)))
    return out


class Camera(threading.Thread):
    """Publishes faces at 5 frames/s on one camera's frames topic while ``on`` is set."""

    def __init__(self, client, device: str, jpegs: list[bytes]):
        super().__init__(daemon=True)
        self.client, self.device, self.jpegs = client, device, jpegs
        self.on, self.done = threading.Event(), threading.Event()

    def run(self):
        i = 0
        while not self.done.is_set():
            if self.on.wait(0.1):
                payload = {
                    "image": base64.b64encode(self.jpegs[i % len(self.jpegs)]).decode(),
                    "captured_at": time.time(),
                }
                self.client.publish(f"emotion/frames/{self.device}", json.dumps(payload), qos=0)
                i += 1
                time.sleep(0.2)


def doc_automations() -> list[dict]:
    """The automations of docs/home-assistant.md that are marked as run by this check."""
    text = (REPO / "docs" / "home-assistant.md").read_text()
    blocks = re.findall(r"<!-- make test-ha runs this automation -->\n```yaml\n(.*?)```", text, re.S)
    return [a for b in blocks for a in yaml.safe_load(b)]


def light_config(name: str) -> dict:
    return {
        "name": name.replace("_", " ").title(),
        "unique_id": f"check_light_{name}",
        "object_id": name,
        "schema": "json",
        "command_topic": f"check/light/{name}/set",
        "state_topic": f"check/light/{name}/state",
        "color_mode": True,  # with supported_color_modes, as Home Assistant 2024.3 requires
        "supported_color_modes": ["rgb"],
        "brightness": True,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ha-tool", type=Path, default=Path(os.environ.get("HA_TOOL", REPO.parent / "shared/tools/ha.py")))
    p.add_argument("--json", type=Path, help="also write the checks and timings as JSON here")
    args = p.parse_args(argv)
    if not args.ha_tool.is_file():
        print(f"check_home_assistant: no Home Assistant harness at {args.ha_tool} (set HA_TOOL)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(args.ha_tool.resolve().parent))
    import ha

    check, t0 = Checks(), time.time()
    summary: dict = {"home_assistant": ha.HA_VERSION}
    ha.ensure_ha_venv()
    summary["install_s"] = round(time.time() - t0, 1)
    model = read_info(REPO / "worker" / "weights" / "resnet9.safetensors")
    emotions = [*model.classes, "none"]
    with contextlib.ExitStack() as stack:
        mq = stack.enter_context(ha.running_mosquitto())
        h = stack.enter_context(ha.running_ha(mq.host, mq.port))
        summary["ha_startup_s"] = round(h.startup_seconds, 1)
        print(f"Home Assistant {ha.HA_VERSION} up in {h.startup_seconds:.1f} s, Mosquitto on port {mq.port}")

        # What the worker publishes, as a plain subscriber sees it.
        seen: list = []
        listener = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="ha-check-listener")
        listener.on_message = lambda c, u, m: seen.append((time.time(), m.topic, m.payload))
        listener.on_connect = lambda c, *a: c.subscribe([("emotion/#", 1), ("check/#", 1)])
        listener.connect(mq.host, mq.port)
        listener.loop_start()
        stack.callback(listener.loop_stop)

        def wait_seen(pred, timeout, what):
            end = time.time() + timeout
            while time.time() < end:
                hit = next((m for m in list(seen) if pred(m)), None)
                if hit:
                    return hit
                time.sleep(0.1)
            raise TimeoutError(f"no {what} within {timeout} s")

        for name in LIGHTS:
            h.publish(f"homeassistant/light/check/{name}/config", light_config(name), retain=True)

        # The worker, with the bundled model.
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTION_")}
        env.update(
            EMOTION_MQTT__HOST=mq.host,
            EMOTION_MQTT__PORT=str(mq.port),
            EMOTION_MQTT__CLIENT_ID=CLIENT_ID,
            EMOTION_PIPELINE__STATS_INTERVAL_S="2",
            EMOTION_STATE__ABSENT_AFTER_S="2",
            EMOTION_HOMEASSISTANT__CAMERAS=json.dumps({"porch": {"name": "Porch camera", "area": "Porch"}}),
            EMOTION_LOG__FORMAT="json",
            PYTHONUNBUFFERED="1",
        )
        log_path = Path(tempfile.mkdtemp(prefix="ha-check-")) / "worker.log"
        worker = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"],
            cwd=REPO,
            env=env,
            stdout=open(log_path, "wb"),
            stderr=subprocess.STDOUT,
        )
        stack.callback(lambda: worker.poll() is None and (worker.kill(), worker.wait()))
        wait_seen(lambda m: m[1] == f"emotion/status/{CLIENT_ID}" and m[2] == b"online", 120, "worker online")
        print(f"worker online (log {log_path})")

        # A configured camera, before any frame.
        porch = h.wait_device(identifier=CAMERA_ID + "porch")
        check(
            porch["name"] == "Porch camera" and porch["area_id"] == "porch",
            "configured camera is a device with its area",
            {k: porch[k] for k in ("name", "area_id", "model", "sw_version")},
        )
        worker_dev = h.wait_device(identifier=WORKER_ID + CLIENT_ID)
        check(
            porch["via_device_id"] == worker_dev["id"],
            "camera device is linked to the worker's device",
            worker_dev["name"],
        )

        # One frame per camera announces it; the automations need the kitchen camera's device id.
        cams = {}
        for device, emotion in (("kitchen", "happy"), ("living_room", "surprise")):
            cams[device] = Camera(listener, device, frames(emotion))
            cams[device].start()
            stack.callback(cams[device].done.set)
        listener.publish("emotion/frames/kitchen", cams["kitchen"].jpegs[0])
        listener.publish("emotion/frames/living_room", cams["living_room"].jpegs[0])
        t = time.time()
        kitchen = h.wait_device(identifier=CAMERA_ID + "kitchen")
        summary["announce_to_device_registry_s"] = round(time.time() - t, 1)
        check(
            kitchen["via_device_id"] == worker_dev["id"] and kitchen["name"] == "kitchen",
            "a camera seen on a frames topic is a device",
            {k: kitchen[k] for k in ("name", "model", "sw_version")},
        )
        entities = {e["entity_id"]: e for e in h.entities() if e.get("device_id") == kitchen["id"]}
        expected = {
            "sensor.kitchen_emotion",
            "sensor.kitchen_emotion_confidence",
            "binary_sensor.kitchen_face",
            "event.kitchen_emotion",
        }
        end = time.time() + 30
        while set(entities) != expected and time.time() < end:
            time.sleep(0.5)
            entities = {e["entity_id"]: e for e in h.entities() if e.get("device_id") == kitchen["id"]}
        check(set(entities) == expected, "the camera's entities", sorted(entities))
        worker_entities = sorted(e["entity_id"] for e in h.entities() if e.get("device_id") == worker_dev["id"])
        check(len(worker_entities) == 4, "the worker's entities", worker_entities)

        # The automations of the docs, and a watcher on every device trigger of the kitchen camera.
        automations = doc_automations()
        for a in automations:
            for trig in a["trigger"]:
                if trig.get("device_id") == "KITCHEN_CAMERA_DEVICE_ID":
                    trig["device_id"] = kitchen["id"]
            a["id"] = re.sub(r"\W+", "_", a["alias"]).lower()
        tpl = "{{ {'type': dt_type, 'subtype': dt_subtype, 'payload': trigger.payload} | to_json }}"
        watchers = [
            {
                "id": f"check_trigger_{e}",
                "alias": f"check trigger {e}",
                "mode": "queued",
                "variables": {"dt_type": "emotion", "dt_subtype": e},
                "trigger": [
                    {
                        "platform": "device",
                        "domain": "mqtt",
                        "device_id": kitchen["id"],
                        "type": "emotion",
                        "subtype": e,
                    }
                ],
                "action": [{"service": "mqtt.publish", "data": {"topic": h.trigger_topic, "payload": tpl}}],
            }
            for e in emotions
        ]
        h.add_automations(automations + watchers)
        check(
            len(automations) == 2, "the automations of docs/home-assistant.md load", [a["alias"] for a in automations]
        )

        # Faces for a few seconds: one change per camera.
        t_faces = time.time()
        for cam in cams.values():
            cam.on.set()
        change = json.loads(
            wait_seen(
                lambda m: m[1] == "emotion/changes" and b'"kitchen"' in m[2] and m[0] >= t_faces, 60, "kitchen change"
            )[2]
        )
        summary["kitchen_change"] = change
        r = h.wait_state("sensor.kitchen_emotion", change["to"], since=t_faces)
        check(
            True,
            f"sensor.kitchen_emotion is {change['to']!r}",
            {k: r["attributes"].get(k) for k in ("confidence", "faces", "since", "friendly_name")},
        )
        check(
            set(r["attributes"].get("scores", {})) == set(model.classes),
            "its attributes hold the state document",
            sorted(r["attributes"]),
        )
        conf = h.wait_state(
            "sensor.kitchen_emotion_confidence",
            pred=lambda r: r["state"] not in ("unknown", "unavailable"),
            since=t_faces,
        )
        check(
            0 < float(conf["state"]) <= 100 and conf["attributes"].get("unit_of_measurement") == "%",
            "sensor.kitchen_emotion_confidence",
            conf["state"] + " %",
        )
        face = h.wait_state("binary_sensor.kitchen_face", "on", since=t_faces)
        check(face["attributes"].get("device_class") == "occupancy", "binary_sensor.kitchen_face is on (occupancy)")
        ev = h.wait_state(
            "event.kitchen_emotion", pred=lambda r: r["attributes"].get("event_type") == change["to"], since=t_faces
        )
        check(
            True,
            "event.kitchen_emotion fired",
            {k: ev["attributes"].get(k) for k in ("event_type", "from", "confidence", "held_s")},
        )
        check(ev["attributes"].get("event_types") == emotions, "its event types", ev["attributes"].get("event_types"))
        fired = h.wait_trigger(subtype=change["to"], since=t_faces)
        fired_change = json.loads(fired["payload"])  # the trigger's payload is the change record it matched
        check(
            fired_change["device_id"] == "kitchen" and fired_change["to"] == change["to"],
            f"the device trigger 'emotion {change['to']}' fired an automation",
            fired_change,
        )
        if change["to"] == "happy":
            cmd = wait_seen(
                lambda m: m[1] == "check/light/kitchen/set" and m[0] >= t_faces, 20, "kitchen light command"
            )
            check(
                b'"ON"' in cmd[2] and b'"r": 255' in cmd[2].replace(b'"r":', b'"r": '),
                "docs automation on the device trigger set light.kitchen",
                cmd[2].decode(),
            )
        else:
            check(
                False, "docs automation on the device trigger", f"the kitchen camera showed {change['to']}, not happy"
            )
        cmd = wait_seen(
            lambda m: m[1] == "check/light/living_room/set" and m[0] >= t_faces, 60, "living room light command"
        )
        check(b'"ON"' in cmd[2], "docs automation on emotion/changes set light.living_room", cmd[2].decode())
        time.sleep(3)
        n_changes = [json.loads(m[2])["device_id"] for m in seen if m[1] == "emotion/changes" and m[0] >= t_faces]
        check(
            n_changes.count("kitchen") == 1,
            "one change, not one per frame",
            f"{len([m for m in seen if m[1] == 'emotion/frames/kitchen' and m[0] >= t_faces])} kitchen frames, changes {n_changes}",
        )

        # The worker's sensors, from its stats.
        fps = h.wait_state(
            "sensor.ha_check_worker_frames_per_second",
            pred=lambda r: r["state"] not in ("unknown", "unavailable") and float(r["state"]) > 0,
            timeout=30,
        )
        lat = h.wait_state(
            "sensor.ha_check_worker_latency_p95",
            pred=lambda r: r["state"] not in ("unknown", "unavailable"),
            timeout=30,
        )
        ver = h.wait_state(
            "sensor.ha_check_worker_model_version",
            pred=lambda r: r["state"] not in ("unknown", "unavailable"),
            timeout=30,
        )
        drop = h.wait_state(
            "sensor.ha_check_worker_dropped_frames",
            pred=lambda r: r["state"] not in ("unknown", "unavailable"),
            timeout=30,
        )
        check(
            float(fps["state"]) > 0 and float(lat["state"]) > 0 and ver["state"] == model.version,
            "the worker's sensors",
            {"frames/s": fps["state"], "latency p95 ms": lat["state"], "dropped": drop["state"], "model": ver["state"]},
        )

        # Nobody in view: none, Face off.
        for cam in cams.values():
            cam.on.clear()
        t = time.time()
        h.wait_state("sensor.kitchen_emotion", "none", since=t, timeout=30)
        h.wait_state("binary_sensor.kitchen_face", "off", since=t, timeout=30)
        fired = json.loads(h.wait_trigger(subtype="none", since=t)["payload"])
        check(fired["to"] == "none", "no face: sensor 'none', Face off, device trigger 'emotion none' fired", fired)
        cmd = wait_seen(
            lambda m: m[1] == "check/light/living_room/set" and m[0] >= t and b'"OFF"' in m[2],
            30,
            "living room light off",
        )
        check(True, "docs automation turned light.living_room off on 'none'", cmd[2].decode())

        # Home Assistant restarts: the entities come back with the retained state, and its birth message makes
        # the worker announce again.
        t = time.time()
        h.restart()
        snap = {r["entity_id"]: r["state"] for r in h.states if r["_t"] >= t and r.get("snapshot")}
        check(
            snap.get("sensor.kitchen_emotion") == "none" and snap.get("binary_sensor.kitchen_face") == "off",
            "after a Home Assistant restart the camera's entities hold their retained state",
            {k: v for k, v in snap.items() if "kitchen" in k},
        )
        announced = log_path.read_text().count("Home Assistant is online, announcing again")
        check(announced >= 1, "the worker announced again on Home Assistant's birth message", f"{announced} times")

        # Stopping the worker: every camera entity and worker sensor unavailable.
        t = time.time()
        worker.terminate()
        check(worker.wait(30) == 0, "the worker stops cleanly")
        for eid in (
            "sensor.kitchen_emotion",
            "binary_sensor.kitchen_face",
            "event.kitchen_emotion",
            "sensor.ha_check_worker_frames_per_second",
        ):
            r = h.wait_state(eid, "unavailable", since=t, timeout=20)
        summary["stop_to_unavailable_s"] = round(r["_t"] - t, 2)
        check(
            True,
            "after the worker stops, the cameras' and the worker's entities are unavailable",
            f"{summary['stop_to_unavailable_s']} s",
        )

        # forget: Home Assistant removes the camera.
        out = subprocess.run(
            [sys.executable, "-m", "worker.cli", "forget", "kitchen"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        check(out.returncode == 0, "emotion-worker forget kitchen", out.stdout.strip())
        end = time.time() + 45
        while time.time() < end and (
            any(e.get("device_id") == kitchen["id"] for e in h.entities())
            or any(d["id"] == kitchen["id"] for d in h.devices())
        ):
            time.sleep(0.5)
        left = [e["entity_id"] for e in h.entities() if e.get("device_id") == kitchen["id"]]
        check(
            not left and not any(d["id"] == kitchen["id"] for d in h.devices()),
            "after forget, the kitchen camera's device and entities are gone",
            left,
        )

        log = h.log_text().splitlines()
        errors = [line for line in log if " ERROR " in line]
        warnings = [line for line in log if " WARNING " in line and "mqtt" in line.lower()]
        check(not errors, "no ERROR in Home Assistant's log", errors[:5])
        check(not warnings, "no MQTT WARNING in Home Assistant's log", warnings[:5])
    summary["total_s"] = round(time.time() - t0, 1)
    summary["checks"] = len(check.results)
    summary["failed"] = check.failed
    print("summary: " + json.dumps(summary))
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "checks": check.results}, indent=1) + "\n")
    print("HOME ASSISTANT CHECK " + ("PASSED" if not check.failed else "FAILED"))
    return 1 if check.failed else 0


if __name__ == "__main__":
    sys.exit(main())
