"""Rules on the steady state: when they fire, what they publish, how the file is checked and reloaded.

The state tracker and the rules run on a fake clock, in a fixed time zone; what they publish is recorded.
The same rules through a running worker and a real Mosquitto: tests/worker/test_rules_service.py.
"""

from __future__ import annotations

import json
import textwrap
from datetime import UTC, datetime, timedelta, timezone

import jsonschema
import pytest

from tests.conftest import REPO
from worker import cli
from worker.config import StateSettings, load_settings
from worker.events import ERROR_SCHEMA, SCHEMAS, load_schema
from worker.model import CLASSES
from worker.rules import QuietHours, RulesEngine, RulesError, load_rules, parse_rules
from worker.state import StateTracker
from worker.stats import IntervalStats, Stats, StatsReporter

ACTION_SCHEMA = SCHEMAS / "action.schema.json"
ZONE = timezone(timedelta(hours=1))  # local time in these tests: UTC+1, no daylight saving
# 2027-01-15 12:00 local time; every test starts here unless it says otherwise.
NOON = datetime(2027, 1, 15, 12, 0, tzinfo=ZONE).timestamp()
FRAMES = ["emotion/frames/+"]


def scores(**given: float) -> dict:
    rest = (1.0 - sum(given.values())) / (len(CLASSES) - len(given))
    return {c: given.get(c, rest) for c in CLASSES}


def face(**given: float) -> dict:
    return {"box": [10, 10, 100, 100], "scores": scores(**given)}


def rules_toml(*rules: str) -> str:
    return "\n".join(f"[[rules]]\n{textwrap.dedent(r).strip()}\n" for r in rules)


class World:
    """A state tracker and a rules engine on one fake clock; records every publish."""

    def __init__(self, *rules: str, start: float = NOON, path=None, **state):
        self.t = start
        self.start = start
        self.published: list[tuple[str, str, int, bool]] = []  # actions: topic, payload, qos, retain
        self.records: list[tuple[str, dict]] = []  # actions and errors topics
        self.stats = Stats()
        ruleset = (
            parse_rules(rules_toml(*rules), "test", CLASSES, FRAMES)
            if path is None
            else load_rules(path, CLASSES, FRAMES)
        )
        self.engine = RulesEngine(
            ruleset,
            publish=lambda topic, payload, qos, retain: self.published.append((topic, payload.decode(), qos, retain)),
            publish_json=lambda topic, doc, qos: self.records.append((topic, json.loads(json.dumps(doc)))),
            path=path,
            classes=CLASSES,
            frames=FRAMES,
            zone=ZONE,
            stats=self.stats,
        )
        settings = {"hold_s": 1.0, "absent_after_s": 3600.0, "time_constant_s": 0.0, **state}
        self.tracker = StateTracker(StateSettings(**settings), CLASSES, {"name": "m", "version": "1"}, clock=self.now)
        self.tracker.add_listener(self.engine.on_state)

    def now(self) -> float:
        return self.t

    def frames(self, seconds: float, fps: float = 5, device: str = "kitchen", **given: float) -> None:
        """Frames of one face with the scores ``given``, for ``seconds`` from the current time."""
        for _ in range(round(seconds * fps)):
            self.t += 1 / fps
            self.tracker.observe(device, [face(**given)])

    def tick(self, until: float, every: float = 1.0) -> None:
        """Ticks without frames until ``until`` seconds after the start."""
        while self.t + every <= self.start + until + 1e-3:
            self.t += every
            self.tracker.tick()

    def topics(self) -> list[str]:
        return [p[0] for p in self.published]

    def actions(self) -> list[dict]:
        return [doc for topic, doc in self.records if topic == "emotion/actions"]

    def errors(self) -> list[dict]:
        return [doc for topic, doc in self.records if topic == "emotion/errors"]


LED = """
    name = "led"
    devices = ["kitchen"]
    emotions = ["*"]
    topic = "light/kitchen/set"
    payload = '{"color": "{{ colors[emotion] }}", "at": "{{ now.strftime("%H:%M") }}"}'
    [rules.vars.colors]
    angry = "red"
    disgust = "green"
    fear = "purple"
    happy = "yellow"
    neutral = "white"
    sad = "blue"
    surprise = "orange"
"""


# -- firing -------------------------------------------------------------------------------------------------------
def test_a_steady_state_fires_once_not_once_per_frame():
    w = World(LED)
    w.frames(20, happy=0.8)  # 100 frames of one steady happy face
    w.tick(until=60)
    assert w.published == [("light/kitchen/set", '{"color": "yellow", "at": "12:00"}', 1, False)]
    [action] = w.actions()
    jsonschema.validate(action, load_schema(ACTION_SCHEMA))
    state = w.tracker.state("kitchen")
    assert action == {
        "schema": 1,
        "rule": "led",
        "device_id": "kitchen",
        "emotion": "happy",
        "confidence": action["confidence"],
        "topic": "light/kitchen/set",
        "since": state["since"],
        "at": action["at"],
    }
    assert action["confidence"] == pytest.approx(0.8)
    # It fired when the state changed (hold_s 1 after the first face), not at the first frame.
    assert datetime.fromisoformat(action["at"]) == datetime.fromisoformat(state["since"])
    assert w.stats.rule_counts() == {"led": {"actions": 1, "errors": 0}}

    # A change of emotion fires again, once; the next steady state too.
    w.frames(10, sad=0.8)
    w.frames(10, happy=0.8)
    assert [json.loads(p[1])["color"] for p in w.published] == ["yellow", "blue", "yellow"]
    assert len({a["since"] for a in w.actions()}) == 3


def test_for_s_counts_from_the_states_since_and_ticks_fire_it():
    w = World(LED.replace('name = "led"', 'name = "led"\nfor_s = 10'))
    w.frames(4, sad=0.8)  # the state becomes sad 1 s after the first face (hold_s), at 1.2 s
    since = datetime.fromisoformat(w.tracker.state("kitchen")["since"]).timestamp()
    assert since == pytest.approx(w.start + 1.2)
    w.tick(until=11)  # 9.8 s held: not yet
    assert w.published == []
    w.tick(until=12)  # a tick without frames: 10.8 s held
    assert [json.loads(p[1])["color"] for p in w.published] == ["blue"]
    assert w.actions()[0]["at"] == datetime.fromtimestamp(w.start + 12, UTC).isoformat(timespec="milliseconds").replace(
        "+00:00", "Z"
    )
    w.tick(until=100)
    assert len(w.published) == 1

    # A state that ends before for_s never fires (happy, 4 s); the next sad does, once held for 10 s.
    w.frames(5, happy=0.8)
    w.frames(10.8, sad=0.8)
    assert [json.loads(p[1])["color"] for p in w.published] == ["blue"]
    w.frames(0.4, sad=0.8)
    assert [json.loads(p[1])["color"] for p in w.published] == ["blue", "blue"]


def test_cooldown_is_per_rule_and_device_and_delays_rather_than_drops():
    w = World(LED.replace('devices = ["kitchen"]', 'devices = ["*"]\ncooldown_s = 30'))
    w.frames(3, happy=0.8)  # fires at 1.2 s
    w.frames(3, sad=0.8)  # sad from about 4.2 s: within the cooldown
    w.frames(3, device="hall", angry=0.8)  # another camera has its own cooldown
    assert [(json.loads(p[1])["color"], a["device_id"]) for p, a in zip(w.published, w.actions())] == [
        ("yellow", "kitchen"),
        ("red", "hall"),
    ]
    w.tick(until=31)
    assert len(w.published) == 2
    w.tick(until=32)  # 30 s after the first action, the kitchen's sad state still holds: it goes out now
    assert [a["emotion"] for a in w.actions()] == ["happy", "angry", "sad"]
    w.tick(until=120)
    assert len(w.published) == 3


def test_quiet_hours_are_local_time_and_cross_midnight():
    late = datetime(2027, 1, 15, 23, 0, tzinfo=ZONE).timestamp()
    rule = LED.replace('name = "led"', 'name = "led"\nquiet_hours = "23:30-07:00"')
    w = World(rule, start=late, absent_after_s=86400)
    w.frames(3, happy=0.8)  # 23:00: fires
    assert len(w.published) == 1
    w.t = datetime(2027, 1, 15, 23, 40, tzinfo=ZONE).timestamp()
    w.frames(3, sad=0.8)  # 23:40: quiet
    w.t = datetime(2027, 1, 16, 6, 58, tzinfo=ZONE).timestamp()
    w.tracker.tick()  # 06:58, after midnight: still quiet
    assert [json.loads(p[1])["color"] for p in w.published] == ["yellow"]
    w.t = datetime(2027, 1, 16, 7, 0, tzinfo=ZONE).timestamp()
    w.tracker.tick()  # 07:00 local (06:00 UTC): the sad state has held all night, and now it acts
    assert [json.loads(p[1]) for p in w.published][1] == {"color": "blue", "at": "07:00"}

    q = QuietHours.parse("23:30-07:00")
    at = lambda hh, mm: datetime(2027, 1, 1, hh, mm)
    assert [at(23, 29) in q, at(23, 30) in q, at(0, 0) in q, at(6, 59) in q, at(7, 0) in q] == [
        False,
        True,
        True,
        True,
        False,
    ]
    day = QuietHours.parse("9:00-17:30")
    assert (at(8, 59) in day, at(9, 0) in day, at(17, 29) in day, at(17, 30) in day) == (False, True, True, False)


def test_devices_emotions_and_min_confidence_filter_as_written():
    w = World(
        """
        name = "kitchen-any"
        devices = ["kitchen"]
        topic = "t/kitchen-any"
        payload = "{{ emotion }}"
        """,
        """
        name = "sad-or-angry-anywhere"
        emotions = ["sad", "angry"]
        topic = "t/sad-or-angry"
        payload = "{{ device_id }} {{ emotion }}"
        """,
        """
        name = "confident-happy"
        emotions = ["happy"]
        min_confidence = 0.7
        topic = "t/confident"
        payload = "{{ '%.2f' | format(confidence) }}"
        """,
        """
        name = "nobody"
        devices = ["hall"]
        emotions = ["none"]
        for_s = 5
        topic = "t/nobody"
        payload = "off"
        """,
        absent_after_s=5,
    )
    w.frames(3, device="kitchen", happy=0.6)  # happy at 0.6: below 0.7
    w.frames(3, device="hall", sad=0.8)
    w.frames(3, device="garage", happy=0.6)
    w.frames(3, device="kitchen", happy=0.9)  # the same steady state, now confident enough
    fired = [(t, p) for t, p, _, _ in w.published]
    assert fired == [
        ("t/kitchen-any", "happy"),  # kitchen, '*' emotions
        ("t/sad-or-angry", "hall sad"),  # any device, sad
        ("t/confident", "0.90"),  # kitchen's happy once its confidence reached 0.7
    ]
    # Nobody in the hall for 5 s makes it 'none'; 'nobody' fires after 5 s more. 'kitchen-any' ('*') does not
    # take 'none' in the kitchen.
    w.tick(until=w.t - w.start + 12)
    assert [t for t, _ in fired] + ["t/nobody"] == w.topics()
    assert {a["device_id"]: a["emotion"] for a in w.actions()}["hall"] == "none"


def test_a_template_error_is_reported_and_the_next_action_still_goes_out():
    w = World(
        """
        name = "typo"
        topic = "t/typo"
        payload = '{"color": "{{ colours[emotion] }}"}'
        """,
        """
        name = "wildcard-topic"
        topic = "t/{{ 'room/+' if emotion == 'sad' else device_id }}"
        payload = "x"
        """,
        LED,
    )
    w.frames(3, happy=0.8)
    assert w.topics() == ["t/kitchen", "light/kitchen/set"]
    w.frames(3, sad=0.8)
    assert w.topics()[2:] == ["light/kitchen/set"]
    errors = w.errors()
    assert [(e["rule"], e["device_id"], e["emotion"]) for e in errors] == [
        ("typo", "kitchen", "happy"),
        ("typo", "kitchen", "sad"),
        ("wildcard-topic", "kitchen", "sad"),
    ]
    for e in errors:
        jsonschema.validate(e, load_schema(ERROR_SCHEMA))
    assert "payload" in errors[0]["message"] and "'colours' is undefined" in errors[0]["message"]
    assert "topic" in errors[2]["message"] and "wildcards" in errors[2]["message"]
    assert errors[2]["topic"] is None and errors[0]["topic"] == "t/typo"
    assert w.stats.rule_counts() == {
        "led": {"actions": 2, "errors": 0},
        "typo": {"actions": 0, "errors": 2},
        "wildcard-topic": {"actions": 1, "errors": 1},
    }
    assert (w.stats.counts["actions"], w.stats.counts["action_errors"]) == (3, 3)
    # A failed action is not retried on every frame: it cost that steady state only.
    w.frames(5, sad=0.8)
    assert len(w.errors()) == 3


def test_the_template_sees_the_state_the_vars_and_local_now():
    w = World(
        """
        name = "everything"
        topic = "t/{{ device_id }}/{{ emotion }}"
        payload = '''{{ {"device_id": device_id, "emotion": emotion, "confidence": confidence, "top": scores | dictsort(by="value") | last | first, "faces": faces, "since": since, "updated_at": updated_at, "model": model.name, "now": now.isoformat(), "held_s": held_s, "rule": rule, "greeting": greeting} | tojson }}'''
        vars = { greeting = "hi" }
        for_s = 2
        """
    )
    w.frames(4, surprise=0.8)
    [(topic, payload, qos, retain)] = w.published
    doc = json.loads(payload)
    state = w.tracker.state("kitchen")
    assert topic == "t/kitchen/surprise" and (qos, retain) == (1, False)
    now = datetime.fromisoformat(doc["now"])
    assert now.utcoffset() == timedelta(hours=1)
    assert abs(now.timestamp() - (w.start + 3.2)) < 1e-3
    assert doc == {
        "device_id": "kitchen",
        "emotion": "surprise",
        "confidence": pytest.approx(0.8),
        "top": "surprise",
        "faces": 1,
        "since": state["since"],
        "updated_at": doc["updated_at"],
        "model": "m",
        "now": doc["now"],
        "held_s": pytest.approx(2.0),
        "rule": "everything",
        "greeting": "hi",
    }


def test_the_sandbox_refuses_python_internals():
    w = World(
        """
        name = "escape"
        topic = "t/escape"
        payload = "{{ scores.__class__.__mro__ }}"
        """
    )
    w.frames(3, happy=0.8)
    assert w.published == []
    assert "SecurityError" in w.errors()[0]["message"] or "UndefinedError" in w.errors()[0]["message"]


# -- the file ---------------------------------------------------------------------------------------------------
BAD_RULES = [
    ('name = "r"\ntopic = "t"\npayload = "x"\ncolour = "red"', ["rule 'r' (rules[0]): colour: unknown key"]),
    ('name = "r"\npayload = "x"', ["rule 'r' (rules[0]): topic: missing"]),
    ('topic = "t"\npayload = "x"', ["rules[0] (no name): name: missing"]),
    ('name = "r"\ntopic = "lights/+/set"\npayload = "x"', ["rule 'r' (rules[0]): topic:", "without wildcards"]),
    ('name = "r"\ntopic = "$SYS/x"\npayload = "x"', ["rule 'r' (rules[0]): topic:", "belong to the broker"]),
    ('name = "r"\ntopic = "emotion/frames/kitchen"\npayload = "x"', ["rule 'r' (rules[0]): topic:", "frames topic"]),
    ('name = "r"\ntopic = "t"\npayload = "x"\nemotions = ["joy"]', ["rule 'r' (rules[0]): emotions:", "'joy'"]),
    ('name = "r"\ntopic = "t"\npayload = "x"\ndevices = ["a/b"]', ["rule 'r' (rules[0]): devices:", "'a/b'"]),
    ('name = "r"\ntopic = "t"\npayload = "x"\nquiet_hours = "23:00"', ["quiet_hours: '23:00' is not HH:MM-HH:MM"]),
    ('name = "r"\ntopic = "t"\npayload = "x"\nquiet_hours = "22:00-24:00"', ["quiet_hours:", "24:00 is not a time"]),
    ('name = "r"\ntopic = "t"\npayload = "x"\nquiet_hours = "07:00-07:00"', ["quiet_hours:", "the same time"]),
    ('name = "r"\ntopic = "t"\npayload = "{{ emotion }"', ["rule 'r' (rules[0]): payload: template does not compile"]),
    ('name = "r"\ntopic = "t/{% if %}"\npayload = "x"', ["rule 'r' (rules[0]): topic: template does not compile"]),
    ('name = "r"\ntopic = "t"\npayload = "x"\nmin_confidence = 1.5', ["rule 'r' (rules[0]): min_confidence:"]),
    ('name = "r"\ntopic = "t"\npayload = "x"\nfor_s = -1', ["rule 'r' (rules[0]): for_s:"]),
    ('name = "r"\ntopic = "t"\npayload = "x"\nqos = 3', ["rule 'r' (rules[0]): qos:"]),
    ('name = "r"\ntopic = "t"\npayload = "x"\nvars = { emotion = 1 }', ["rule 'r' (rules[0]): vars:", "'emotion'"]),
]


@pytest.mark.parametrize(("rule", "expected"), BAD_RULES, ids=[e[0].split("\n")[-1][:30] for e in BAD_RULES])
def test_each_kind_of_bad_rule_is_an_error_naming_the_rule_and_the_key(rule, expected):
    good = 'name = "fine"\ntopic = "t/fine"\npayload = "ok"'
    with pytest.raises(RulesError) as err:
        parse_rules(rules_toml(good, rule), "rules.toml", CLASSES, FRAMES)
    message = str(err.value).replace("rules[1]", "rules[0]")
    assert message.startswith("invalid rules in rules.toml:")
    for part in expected:
        assert part in message, message
    assert "fine" not in message  # only the bad rule is named


def test_file_level_errors_name_what_is_wrong():
    cases = {
        "[[rules]]\nname = 'a'\ntopic = 't'\npayload = 'x'\n[[rules]]\nname = 'a'\ntopic = 'u'\npayload = 'y'": (
            "rule 'a' (rules[1]): name: also the name of rules[0]"
        ),
        "[rule]\nname = 'a'": "rule: unknown key (rules are [[rules]] tables)",
        "[[rules]\nname = 'a'": "is not valid TOML",
    }
    for text, expected in cases.items():
        with pytest.raises(RulesError, match=None) as err:
            parse_rules(text, "rules.toml", CLASSES, FRAMES)
        assert expected in str(err.value), str(err.value)
    assert parse_rules("", "rules.toml", CLASSES).rules == []  # an empty file: no rules, valid


def test_the_example_rules_pass_check_and_do_what_they_say(capsys):
    example = REPO / "config" / "rules.example.toml"
    assert cli.main(["rules", "check", str(example)]) == 0
    out, err = capsys.readouterr()
    assert "4 rules, valid" in out and err == ""
    ruleset = load_rules(example, CLASSES, FRAMES)
    first = ruleset.rules[0].rule
    assert first.emotions == ["*"] and set(first.vars["colors"]) == set(CLASSES)  # the LED: seven colours
    w = World(path=example)
    w.frames(5, device="kitchen", sad=0.8)
    assert w.published[0][0] == "zigbee2mqtt/kitchen_light/set"
    assert json.loads(w.published[0][1])["color"] == {"hex": "#1E90FF"}
    w.frames(15, device="living-room", sad=0.8)  # sad for 10 s at noon: the lamp dims
    assert ("cmnd/living_room_lamp/Backlog", "Dimmer 30; CT 400") in [(t, p) for t, p, _, _ in w.published]
    w.frames(8, device="hall", fear=0.8)
    notify = [json.loads(p) for t, p, _, _ in w.published if t == "notify/phone"]
    assert notify and notify[0]["title"] == "hall camera: fear" and notify[0]["topic"] == "home-cameras"


def test_rules_check_exits_2_with_the_problems(tmp_path, capsys):
    bad = tmp_path / "rules.toml"
    bad.write_text(rules_toml('name = "r"\ntopic = "a/#"\npayload = "{{ x"'))
    assert cli.main(["rules", "check", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "rule 'r' (rules[0]): topic:" in err and "rule 'r' (rules[0]): payload: template does not compile" in err
    assert cli.main(["rules", "check", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_rules_check_warns_of_a_template_that_fails_on_an_emotion_it_fires_on(tmp_path, capsys):
    path = tmp_path / "rules.toml"
    path.write_text(rules_toml('name = "r"\ntopic = "t"\npayload = "{{ c[emotion] }}"\nvars = { c = { happy = 1 } }'))
    assert cli.main(["rules", "check", str(path)]) == 0
    err = capsys.readouterr().err
    assert "warning: rule 'r': payload fails when the emotion is 'sad'" in err
    assert "'happy'" not in err


def test_rules_test_prints_what_would_be_published_and_why_not(capsys):
    example = str(REPO / "config" / "rules.example.toml")
    common = ["--set", "rules.timezone=UTC"]
    args = ["rules", "test", example, "--device", "living-room", "--emotion", "sad", *common]
    assert cli.main([*args, "--at", "12:00"]) == 0
    out = capsys.readouterr().out
    assert "nothing is published" in out
    assert "dim-when-sad: publishes to cmnd/living_room_lamp/Backlog (qos 1) once the state has held 10 s:" in out
    assert "Dimmer 30; CT 400" in out
    assert "kitchen-led: does not fire: device 'living-room' is not in devices ['kitchen']" in out
    assert "phone-alert: does not fire: emotion 'sad' is not in emotions ['angry', 'fear']" in out
    assert cli.main([*args, "--at", "23:00"]) == 0
    assert "dim-when-sad: does not fire: quiet hours 22:30-07:00 (it is 23:00)" in capsys.readouterr().out
    assert cli.main([*args, "--at", "12:00", "--confidence", "0.3"]) == 0
    assert "dim-when-sad: does not fire: confidence 0.30 is below min_confidence 0.4" in capsys.readouterr().out
    assert cli.main(["rules", "test", example, "--device", "kitchen", "--emotion", "joy", *common]) == 2
    assert "unknown emotion 'joy'" in capsys.readouterr().err


# -- reloading --------------------------------------------------------------------------------------------------
def test_a_reload_with_a_bad_file_keeps_the_old_rules(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(rules_toml(LED))
    w = World(path=path)
    path.write_text(rules_toml(LED.replace("topic =", "tpoic =")))
    assert w.engine.reload() is False
    assert w.engine.poll() is None  # that content was read already; it is not retried on every check
    path.unlink()
    assert w.engine.poll() is None and w.engine.reload() is False  # a removed file keeps the rules too
    w.frames(3, happy=0.8)
    assert w.topics() == ["light/kitchen/set"]  # the old rule still acts
    assert w.stats.counts["rules_reload_errors"] == 2 and "rules_reloads" not in w.stats.counts


def test_a_changed_file_is_reloaded_and_a_changed_rule_acts_on_the_current_state(tmp_path):
    path = tmp_path / "rules.toml"
    other = 'name = "other"\ntopic = "t/other"\npayload = "{{ emotion }}"'
    path.write_text(rules_toml(LED, other))
    w = World(path=path)
    assert w.engine.poll() is None  # unchanged
    w.frames(3, happy=0.8)
    assert w.topics() == ["light/kitchen/set", "t/other"]
    # The LED rule gets new colours; "other" stays as it was.
    path.write_text(rules_toml(LED.replace('"yellow"', '"gold"'), other))
    assert w.engine.poll() is True
    assert w.stats.counts["rules_reloads"] == 1
    w.tick(until=w.t - w.start + 1)
    # The changed rule fires again for the state that holds; the unchanged one remembers it fired.
    assert w.topics() == ["light/kitchen/set", "t/other", "light/kitchen/set"]
    assert json.loads(w.published[-1][1])["color"] == "gold"
    # A rule removed from the file stops acting.
    path.write_text(rules_toml(other))
    assert w.engine.poll() is True
    w.frames(3, sad=0.8)
    assert w.topics()[3:] == ["t/other"]


# -- settings and stats ---------------------------------------------------------------------------------------------
def test_rules_settings_from_the_environment_and_a_bad_time_zone(monkeypatch, tmp_path):
    empty = tmp_path / "worker.toml"
    empty.write_text("")
    monkeypatch.setenv("EMOTION_RULES__FILE", str(tmp_path / "mine.toml"))
    monkeypatch.setenv("EMOTION_RULES__TIMEZONE", "Europe/Berlin")
    s = load_settings(empty)
    assert s.rules.path() == tmp_path / "mine.toml" and s.rules.timezone == "Europe/Berlin"
    monkeypatch.setenv("EMOTION_RULES__TIMEZONE", "Mars/Olympus")
    with pytest.raises(ValueError, match="rules.timezone: .*unknown time zone 'Mars/Olympus'"):
        load_settings(empty)
    monkeypatch.delenv("EMOTION_RULES__FILE")
    monkeypatch.delenv("EMOTION_RULES__TIMEZONE")
    assert str(load_settings(empty).rules.path()) == "config/rules.toml"


def test_the_stats_document_counts_actions_and_errors_per_rule():
    stats = Stats()
    stats.rule("led", "actions")
    stats.rule("led", "actions")
    stats.rule("typo", "errors")
    doc = StatsReporter(stats, IntervalStats(), 60, context=dict).document()
    assert doc["rules"] == {"led": {"actions": 2, "errors": 0}, "typo": {"actions": 0, "errors": 1}}
    assert doc["counts"] == {"actions": 2, "action_errors": 1}


def test_rules_start_once_the_default_file_appears(tmp_path):
    path = tmp_path / "rules.toml"  # not there at start
    w = World()
    w.engine.path = path
    assert w.engine.poll() is None and w.engine.rules.rules == []
    w.frames(3, happy=0.8)
    assert w.published == []
    path.write_text(rules_toml(LED))
    assert w.engine.poll() is True and w.engine.rules.names == ["led"]
    w.tracker.tick()
    assert w.topics() == ["light/kitchen/set"]  # the state that holds
