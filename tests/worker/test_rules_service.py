"""Rules in a running worker, end to end against a real Mosquitto: face frames in, one action per change out,
and the rules file reloaded on a change and on SIGHUP.

The tiny untrained test model gives near-uniform scores, so the rules here take any emotion at any confidence,
and the state's min_confidence is set out of reach: the state moves only between 'none' and one emotion.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jsonschema

from tests.conftest import REPO, needs_proc, publisher, signals_blocked_by_other_threads, start_worker
from tests.worker.test_service import envelope
from worker.events import ERROR_SCHEMA, SCHEMAS, load_schema

CLIENT_ID = "test-rules-worker"
STARTUP_S = 60
ACTIONS, ERRORS, EVENTS = "emotion/actions", "emotion/errors", "emotion/events"


def rules_env(worker_env: dict, rules: Path, watch_s: float) -> dict:
    return {
        **worker_env,
        "EMOTION_MQTT__CLIENT_ID": CLIENT_ID,
        "EMOTION_RULES__FILE": str(rules),
        "EMOTION_RULES__WATCH_S": str(watch_s),
        "EMOTION_HOMEASSISTANT__DISCOVERY": "false",
        "EMOTION_STATE__HOLD_S": "0.3",
        "EMOTION_STATE__MIN_CONFIDENCE": "0.95",  # no change from one emotion to another with the tiny model
        "EMOTION_STATE__ABSENT_AFTER_S": "1.5",
        "EMOTION_STATE__TICK_S": "0.2",
    }


def write_rules(path: Path, text: str) -> None:
    path.write_text(textwrap.dedent(text))


def wait_log(log: Path, text: str, timeout: float = 30, after: int = 0) -> dict:
    """The first JSON log line (from line ``after`` on) whose event is ``text``, waiting up to ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text(errors="replace").splitlines()[after:] if log.exists() else []
        for line in lines:
            if line.startswith("{") and json.loads(line).get("event") == text:
                return json.loads(line)
        if time.monotonic() > deadline:
            raise AssertionError(f"no {text!r} in the worker's log within {timeout} s:\n" + "\n".join(lines[-20:]))
        time.sleep(0.1)


def log_lines(log: Path) -> int:
    return len(log.read_text(errors="replace").splitlines())


class Camera:
    """Publishes face frames, paced like a camera, until something has happened."""

    def __init__(self, port: int, frames, device: str = "kitchen"):
        self.client = publisher(port)
        self.frames = frames
        self.device = device
        self.sent = 0

    def until(self, done, listener, timeout: float = 60, then: int = 3, fps: float = 5) -> None:
        """Frames at ``fps`` until ``done()``, then ``then`` more, returning once their events are in."""
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"nothing happened after {self.sent} frames in {timeout} s"
            self.send()
            time.sleep(1 / fps)
        last = [self.send() for _ in range(then)][-1] if then else None
        if last:
            listener.wait_for(lambda m: m.topic == EVENTS and json.loads(m.payload)["frame_id"] == last, 30)

    def send(self) -> str:
        frame_id = f"{self.device}-{self.sent}"
        frame = self.frames[self.sent % len(self.frames)][0]
        self.client.publish(f"emotion/frames/{self.device}", envelope(frame, frame_id), qos=1)
        self.sent += 1
        return frame_id

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def test_face_frames_fire_the_rule_once_per_change_and_a_bad_new_file_keeps_the_rules(
    worker_env, listen, mosquitto, face_frames, tmp_path
):
    rules = tmp_path / "rules.toml"
    write_rules(
        rules,
        """
        [[rules]]
        name = "typo"
        topic = "test/typo"
        payload = "{{ colours[emotion] }}"

        [[rules]]
        name = "light-on"
        topic = "test/light"
        payload = '{"state": "ON", "emotion": "{{ emotion }}", "device": "{{ device_id }}"}'

        [[rules]]
        name = "light-off"
        emotions = ["none"]
        topic = "test/light"
        payload = '{"state": "OFF"}'
        """,
    )
    seen = listen(["test/#", ACTIONS, ERRORS, EVENTS, f"emotion/status/{CLIENT_ID}"])
    log = tmp_path / "worker.log"
    proc = start_worker(rules_env(worker_env, rules, watch_s=0.3), log)
    camera = Camera(mosquitto.port, face_frames)
    try:
        seen.wait_for(lambda m: m.payload == b"online", STARTUP_S, "'online'")
        light = lambda: [json.loads(m.payload) for m in seen.on("test/light")]
        # Someone comes into view: the camera's first frame says 'none' (off), then its emotion (on), once.
        camera.until(lambda: len(light()) >= 2, seen, then=5)
        first = light()
        assert [m["state"] for m in first] == ["OFF", "ON"], first
        assert first[1]["device"] == "kitchen"
        # The rule with the typo was reported, and the action after it still went out.
        [error] = [json.loads(m.payload) for m in seen.on(ERRORS)]
        jsonschema.validate(error, load_schema(ERROR_SCHEMA))
        assert (error["rule"], error["device_id"], error["reason"]) == ("typo", "kitchen", "template_error")
        assert "'colours' is undefined" in error["message"]
        assert seen.on("test/typo") == []
        # They leave (off, after absent_after_s), and come back (on): once per change, not once per frame.
        seen.wait_for(
            lambda m: m.topic == "test/light" and json.loads(m.payload)["state"] == "OFF" and len(light()) == 3
        )
        camera.until(lambda: len(light()) >= 4, seen, then=5)
        assert [m["state"] for m in light()] == ["OFF", "ON", "OFF", "ON"]
        assert camera.sent >= 12  # many more frames than actions

        seen.wait_for(lambda m: len(light()) == 5, 30, "'off' once they left again")

        # A bad new file: logged, and the rules in force stay.
        after = log_lines(log)
        rules.write_text(rules.read_text().replace('name = "light-off"', 'name = "light-off"\nemotion = ["none"]'))
        refused = wait_log(log, "rules not reloaded, the old rules stay", after=after)
        assert "rule 'light-off' (rules[2]): emotion: unknown key" in refused["error"]
        assert refused["rules"] == ["typo", "light-on", "light-off"]
        camera.until(lambda: len(light()) >= 6, seen, then=0)
        assert [m["state"] for m in light()] == ["OFF", "ON"] * 3

        actions = [json.loads(m.payload) for m in seen.on(ACTIONS)]
        schema = load_schema(SCHEMAS / "action.schema.json")
        for a in actions:
            jsonschema.validate(a, schema)
        assert [(a["rule"], a["emotion"] == "none") for a in actions] == [("light-off", True), ("light-on", False)] * 3
        assert all(a["topic"] == "test/light" and a["device_id"] == "kitchen" for a in actions)
    finally:
        camera.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    stopped = wait_log(log, "stopped")
    assert (stopped["actions"], stopped["action_errors"], stopped["rules_reload_errors"]) == (6, 3, 1)


@needs_proc
def test_sighup_reloads_the_rules_of_a_running_worker(worker_env, listen, mosquitto, face_frames, tmp_path):
    rules = tmp_path / "rules.toml"
    rule = """
        [[rules]]
        name = "{name}"
        emotions = ["*", "none"]
        topic = "test/{name}"
        payload = "{{{{ emotion }}}}"
        """
    write_rules(rules, rule.format(name="first"))
    seen = listen(["test/#", EVENTS, f"emotion/status/{CLIENT_ID}"])
    log = tmp_path / "worker.log"
    proc = start_worker(rules_env(worker_env, rules, watch_s=0), log)  # no checks of the file: SIGHUP only
    camera = Camera(mosquitto.port, face_frames)
    try:
        seen.wait_for(lambda m: m.payload == b"online", STARTUP_S, "'online'")
        masks = signals_blocked_by_other_threads(proc.pid)
        assert all({signal.SIGTERM, signal.SIGINT, signal.SIGHUP} <= m for m in masks.values()), masks
        camera.send()  # one frame: the camera's state is 'none', and stays so (a face must be seen for hold_s)
        seen.wait_for(lambda m: m.topic == "test/first", 30, "the first rule's action")

        write_rules(rules, rule.format(name="second"))
        after = log_lines(log)
        proc.send_signal(signal.SIGHUP)
        reloaded = wait_log(log, "rules reloaded", after=after)
        assert (reloaded["why"], reloaded["rules"]) == ("SIGHUP", ["second"])
        # A new rule acts on the state that holds, at the next evaluation.
        seen.wait_for(lambda m: m.topic == "test/second", 30, "the reloaded rule's action")

        # A bad file on SIGHUP: logged, the worker goes on with the rules it had.
        rules.write_text("[[rules]]\nname = 'third'\ntopic = 'test/third'\npayload = '{{ emotion'\n")
        after = log_lines(log)
        proc.send_signal(signal.SIGHUP)
        refused = wait_log(log, "rules not reloaded, the old rules stay", after=after)
        assert "rule 'third' (rules[0]): payload: template does not compile" in refused["error"]
        camera.until(lambda: len(seen.on("test/second")) >= 2, seen, then=0)
        assert proc.poll() is None
        assert [m.payload for m in seen.on("test/first")] == [b"none"]
        assert seen.on("test/second")[-1].payload != b"none" and seen.on("test/third") == []
    finally:
        camera.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    signals = [json.loads(line)["signal"] for line in log.read_text().splitlines() if '"signal received"' in line]
    assert signals == ["SIGHUP", "SIGHUP", "SIGTERM"]


def test_a_bad_rules_file_stops_the_start_naming_the_rule_and_the_key(worker_env, tmp_path):
    rules = tmp_path / "rules.toml"
    write_rules(
        rules,
        """
        [[rules]]
        name = "led"
        emotions = ["happy", "joyful"]
        topic = "test/light"
        payload = "{{ emotion }}"
        """,
    )
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run"],
        env=rules_env(worker_env, rules, watch_s=0),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    [line] = [json.loads(x) for x in out.stderr.splitlines() if '"cannot start"' in x]
    assert "rule 'led' (rules[0]): emotions: unknown emotion 'joyful'" in line["error"]
    assert '"model loaded"' not in out.stderr  # checked before the model is loaded
    missing = {**rules_env(worker_env, tmp_path / "missing.toml", watch_s=0)}
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run"], env=missing, cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 2 and "missing.toml does not exist" in out.stderr
