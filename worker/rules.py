"""Rules: MQTT actions on each camera's steady emotion, from their own TOML file (docs/rules.md).

A rule fires for a camera when its steady state (``worker/state.py``) matches: the device, the emotion,
``min_confidence``, held for ``for_s``, outside ``quiet_hours``, ``cooldown_s`` after the rule's last action
for that camera. It fires once per steady state (per rule, camera and ``since``), never per frame. The
payload (and the topic, if it is one) is a Jinja2 template rendered in the sandbox with ``StrictUndefined``.

Every action goes to its topic and is recorded on the actions topic; a template that fails costs that action
only: it is logged, counted and reported on the errors topic. The rules file is read again on SIGHUP and when
it changes; a bad new file leaves the old rules in force.
"""

from __future__ import annotations

import hashlib
import re
import threading
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from pathlib import Path
from typing import Any, Literal

from jinja2 import StrictUndefined, Template, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from worker.config import ConfigError
from worker.events import iso
from worker.log import get_logger
from worker.topics import check_device_id, check_publish, matches

log = get_logger("emotion-worker.rules")

NONE = "none"  # the state's emotion when nobody is in view
ANY = "*"
SCHEMA_VERSION = 1
# What a template sees besides the rule's vars: the state document's fields, then these.
STATE_FIELDS = ("device_id", "emotion", "confidence", "scores", "faces", "since", "updated_at", "model")
EXTRA_FIELDS = ("now", "held_s", "rule")
_TEMPLATE_MARKS = ("{{", "{%", "{#")

# One environment for every rule: the sandbox keeps templates from reaching Python internals; StrictUndefined
# makes a misspelt name an error instead of an empty string in a device's command.
_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)


class RulesError(ConfigError):
    """The rules file is invalid; one line per problem, each naming the rule and the key."""


def is_template(text: str) -> bool:
    return any(mark in text for mark in _TEMPLATE_MARKS)


def _compile(text: str) -> Template:
    try:
        return _env.from_string(text)
    except TemplateSyntaxError as exc:
        raise ValueError(f"template does not compile: {exc.message} (line {exc.lineno})") from None


# -- quiet hours -------------------------------------------------------------------------------------------------
_HHMM = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


@dataclass(frozen=True)
class QuietHours:
    """From ``start`` to ``end``, minutes after local midnight; ``start > end`` crosses midnight."""

    start: int
    end: int

    @classmethod
    def parse(cls, text: str) -> QuietHours:
        """``"HH:MM-HH:MM"`` (local time, may cross midnight); a ValueError saying what is wrong otherwise."""
        m = _HHMM.match(text)
        if not m:
            raise ValueError(f"{text!r} is not HH:MM-HH:MM, e.g. '23:00-07:00'")
        h1, m1, h2, m2 = (int(g) for g in m.groups())
        for h, mi in ((h1, m1), (h2, m2)):
            if h > 23 or mi > 59:
                raise ValueError(f"{text!r}: {h:02d}:{mi:02d} is not a time of day (00:00 to 23:59)")
        if (h1, m1) == (h2, m2):
            raise ValueError(f"{text!r}: start and end are the same time")
        return cls(h1 * 60 + m1, h2 * 60 + m2)

    def __contains__(self, local: datetime) -> bool:
        minute = local.hour * 60 + local.minute
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"


# -- the file ----------------------------------------------------------------------------------------------------
class Rule(BaseModel):
    """One ``[[rules]]`` table. Validated with the context ``{"classes": ..., "frames": ...}``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, description="Name of the rule, unique in the file; in logs, stats and records.")
    devices: list[str] = Field(
        [ANY], min_length=1, description="Device ids the rule acts for (the '+' level of the frames topic); '*': all."
    )
    emotions: list[str] = Field(
        [ANY],
        min_length=1,
        description="Emotions the rule fires on: class names of the model, 'none' (nobody in view), '*' (any of "
        "the classes; not 'none').",
    )
    min_confidence: float = Field(
        0.0,
        ge=0,
        le=1,
        description="The state's confidence (0-1) must be at least this; not checked for 'none', which has none.",
    )
    for_s: float = Field(0.0, ge=0, description="Seconds the steady state must have held before the rule fires.")
    cooldown_s: float = Field(
        0.0, ge=0, description="Seconds after an action of this rule for a camera before its next for that camera."
    )
    quiet_hours: str | None = Field(
        None, description="'HH:MM-HH:MM' in local time (may cross midnight) when the rule does not fire."
    )
    topic: str = Field(description="Topic the payload is published to; may be a template.")
    payload: str = Field(description="Jinja2 template of the payload: the state's fields, vars, now, held_s, rule.")
    qos: Literal[0, 1, 2] = Field(1, description="MQTT QoS of the action.")
    retain: bool = Field(False, description="Publish the action retained.")
    vars: dict[str, Any] = Field(default_factory=dict, description="Values the templates can use by name.")

    @field_validator("devices", "emotions", mode="before")
    @classmethod
    def _listed(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("devices")
    @classmethod
    def _devices(cls, devices: list[str]) -> list[str]:
        for d in devices:
            if d != ANY:
                check_device_id(d)
        return devices

    @field_validator("emotions")
    @classmethod
    def _emotions(cls, emotions: list[str], info: ValidationInfo) -> list[str]:
        classes = (info.context or {}).get("classes") or ()
        known = (ANY, NONE, *classes)
        for e in emotions:
            if e not in known:
                raise ValueError(f"unknown emotion {e!r}; known: {', '.join(known)}")
        return emotions

    @field_validator("quiet_hours")
    @classmethod
    def _quiet(cls, text: str | None) -> str | None:
        if text is not None:
            QuietHours.parse(text)
        return text

    @field_validator("topic")
    @classmethod
    def _topic(cls, topic: str, info: ValidationInfo) -> str:
        if is_template(topic):
            _compile(topic)
            return topic
        check_publish(topic)
        _not_a_frames_topic(topic, (info.context or {}).get("frames") or ())
        return topic

    @field_validator("payload")
    @classmethod
    def _payload(cls, payload: str) -> str:
        _compile(payload)
        return payload

    @field_validator("vars")
    @classmethod
    def _vars(cls, values: dict[str, Any]) -> dict[str, Any]:
        for name in values:
            if name in STATE_FIELDS or name in EXTRA_FIELDS:
                raise ValueError(f"'{name}' is a name the templates already have; call the variable something else")
        return values


class RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rules: list[Rule] = Field(default_factory=list, description="The rules, each a [[rules]] table.")


def _not_a_frames_topic(topic: str, frames) -> None:
    for f in frames:
        if matches(f, topic):
            raise ValueError(f"{topic!r} is a frames topic of this worker ({f!r}): the worker would read it as a frame")


# -- compiled rules ----------------------------------------------------------------------------------------------
class RenderError(Exception):
    def __init__(self, key: str, message: str):
        super().__init__(f"{key}: {message}")
        self.key, self.message = key, message


@dataclass
class CompiledRule:
    rule: Rule
    payload: Template
    topic: Template | None  # None: a fixed topic
    quiet: QuietHours | None
    frames: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.rule.name

    @classmethod
    def build(cls, rule: Rule, frames=()) -> CompiledRule:
        return cls(
            rule,
            _compile(rule.payload),
            _compile(rule.topic) if is_template(rule.topic) else None,
            QuietHours.parse(rule.quiet_hours) if rule.quiet_hours else None,
            tuple(frames),
        )

    def why_not(self, state: dict, local: datetime) -> str | None:
        """Why the rule does not fire for ``state`` at local time ``local``, leaving time held and cooldown aside;
        None when it would."""
        r = self.rule
        device, emotion = state["device_id"], state["emotion"]
        if ANY not in r.devices and device not in r.devices:
            return f"device {device!r} is not in devices {r.devices}"
        if emotion not in r.emotions and not (ANY in r.emotions and emotion != NONE):
            why = " ('*' is any emotion, not 'none')" if emotion == NONE and ANY in r.emotions else ""
            return f"emotion {emotion!r} is not in emotions {r.emotions}{why}"
        if emotion != NONE and state["confidence"] < r.min_confidence:
            return f"confidence {state['confidence']:.2f} is below min_confidence {r.min_confidence:g}"
        if self.quiet is not None and local in self.quiet:
            return f"quiet hours {self.quiet} (it is {local:%H:%M})"
        return None

    def context(self, state: dict, local: datetime, held_s: float) -> dict:
        ctx = dict(self.rule.vars)
        ctx.update({k: state.get(k) for k in STATE_FIELDS})
        ctx.update(now=local, held_s=round(held_s, 3), rule=self.name)
        return ctx

    def render(self, ctx: dict) -> tuple[str, str]:
        """The topic and payload for ``ctx``; a :class:`RenderError` naming the key otherwise."""
        topic = self.rule.topic
        if self.topic is not None:
            topic = _render(self.topic, ctx, "topic").strip()
            try:
                check_publish(topic)
                _not_a_frames_topic(topic, self.frames)
            except ValueError as exc:
                raise RenderError("topic", f"rendered to a topic that cannot be used: {exc}") from None
        return topic, _render(self.payload, ctx, "payload")


def _render(template: Template, ctx: dict, key: str) -> str:
    try:
        return template.render(ctx)
    except Exception as exc:  # UndefinedError, SecurityError, TypeError, ZeroDivisionError, ...: this action only
        raise RenderError(key, f"{type(exc).__name__}: {exc}") from None


@dataclass
class RuleSet:
    """The rules of one file, compiled; ``digest`` identifies the file's content (None: no file)."""

    rules: list[CompiledRule] = field(default_factory=list)
    source: str = ""
    digest: str | None = None

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rules]


def parse_rules(text: str, source: str = "rules", classes=(), frames=()) -> RuleSet:
    """The rules in the TOML ``text``; ``classes`` are the model's class names, ``frames`` the worker's frame
    filters (a rule may not publish there). Raises :class:`RulesError` with one line per problem."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise RulesError(f"rules file {source} is not valid TOML: {exc}") from None
    try:
        parsed = RulesFile.model_validate(data, context={"classes": tuple(classes), "frames": tuple(frames)})
    except ValidationError as exc:
        raise RulesError(f"invalid rules in {source}:\n" + "\n".join(_problems(exc, data))) from None
    seen: dict[str, int] = {}
    problems = []
    for i, rule in enumerate(parsed.rules):
        if rule.name in seen:
            problems.append(f"  rule {rule.name!r} (rules[{i}]): name: also the name of rules[{seen[rule.name]}]")
        seen.setdefault(rule.name, i)
    if problems:
        raise RulesError(f"invalid rules in {source}:\n" + "\n".join(problems))
    return RuleSet(
        [CompiledRule.build(r, frames) for r in parsed.rules],
        source,
        hashlib.sha256(text.encode()).hexdigest(),
    )


def load_rules(path: Path, classes=(), frames=()) -> RuleSet:
    """The rules in the file at ``path``; a :class:`RulesError` naming the file when it cannot be read."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise RulesError(f"rules file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RulesError(f"rules file {path} cannot be read: {exc}") from None
    return parse_rules(text, str(path), classes, frames)


def _problems(exc: ValidationError, data: dict) -> list[str]:
    """One line per validation error, naming the rule (by name when it has one) and the key."""
    rules = data.get("rules") if isinstance(data.get("rules"), list) else []
    lines = []
    for err in exc.errors():
        loc = list(err["loc"])
        where = ""
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            i = loc[1]
            name = rules[i].get("name") if i < len(rules) and isinstance(rules[i], dict) else None
            where = f"rule {name!r} (rules[{i}])" if isinstance(name, str) and name else f"rules[{i}] (no name)"
            loc = loc[2:]
        key = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            what = "unknown key"
        elif err["type"] == "missing":
            what = "missing (required)"
        elif err["type"] == "value_error":  # our own checks, which quote what was wrong
            what = err["msg"].removeprefix("Value error, ")
        else:
            what = f"{err['msg']} (got {_shown(err.get('input'))})"
        if not where:
            lines.append(f"  {key or 'file'}: {what}" + (" (rules are [[rules]] tables)" if key != "rules" else ""))
        else:
            lines.append(f"  {where}: {key}: {what}" if key else f"  {where}: {what}")
    return lines


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def model_classes(settings) -> tuple[str, ...]:
    """The class names of the configured model, read from its checkpoint's header; the standard seven when the
    checkpoint cannot be read (loading the model then says why)."""
    from worker.model import BUNDLED_WEIGHTS, CLASSES, CheckpointError, read_info

    try:
        return tuple(read_info(settings.model.weights or BUNDLED_WEIGHTS).classes)
    except CheckpointError:
        return tuple(CLASSES)


def local_zone(name: str) -> tzinfo | None:
    """The zone of ``rules.timezone``; None for the system's local time."""
    if not name:
        return None
    from zoneinfo import ZoneInfo

    return ZoneInfo(name)


def local_time(now: float, zone: tzinfo | None) -> datetime:
    """Unix seconds ``now`` as an aware datetime in ``zone`` (None: the system's local time)."""
    return datetime.fromtimestamp(now, zone) if zone is not None else datetime.fromtimestamp(now).astimezone()


def parse_time(iso_text: str) -> float:
    """An ISO 8601 time of the state (``since``) as Unix seconds."""
    return datetime.fromisoformat(iso_text).timestamp()


# -- the engine --------------------------------------------------------------------------------------------------
@dataclass
class _Fired:
    since: str  # the steady state it fired for
    at: float  # Unix seconds


class RulesEngine:
    """Evaluates the rules on every evaluation of a camera's state (a :class:`StateTracker` listener).

    ``publish(topic, payload: bytes, qos, retain)`` sends an action; ``publish_json(topic, doc, qos)`` a record
    (``actions_topic``, ``errors_topic``). ``path`` is the rules file to reload (None: nothing to reload);
    ``classes`` and ``frames`` validate a reloaded file as at start. ``zone`` is the local time zone of quiet
    hours and ``now`` (None: the system's). ``stats`` counts actions and errors per rule.
    """

    def __init__(
        self,
        ruleset: RuleSet,
        publish: Callable[[str, bytes, int, bool], None],
        publish_json: Callable[..., None],
        actions_topic: str = "emotion/actions",
        errors_topic: str = "emotion/errors",
        path: Path | None = None,
        classes=(),
        frames=(),
        zone: tzinfo | None = None,
        stats=None,
        watch_s: float = 0.0,
    ):
        self.publish = publish
        self.publish_json = publish_json
        self.actions_topic = actions_topic
        self.errors_topic = errors_topic
        self.path = Path(path) if path is not None else None
        self.classes = tuple(classes)
        self.frames = tuple(frames)
        self.zone = zone
        self.stats = stats
        self.watch_s = watch_s
        self._lock = threading.RLock()
        self._ruleset = ruleset
        self._fired: dict[str, dict[str, _Fired]] = {r.name: {} for r in ruleset.rules}
        self._seen = ruleset.digest  # the content last read from the file, loaded or not
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def rules(self) -> RuleSet:
        return self._ruleset

    # -- evaluation ----------------------------------------------------------------------------------------------
    def on_state(self, state: dict, change: dict | None, now: float) -> None:
        """The state listener: fire each rule that matches ``state`` at ``now`` (Unix seconds) and has not fired
        for this steady state. Never raises for a rule's failure."""
        with self._lock:
            if not self._ruleset.rules:
                return
            device = state["device_id"]
            local = local_time(now, self.zone)
            held_s = max(0.0, now - parse_time(state["since"]))
            for rule in self._ruleset.rules:
                if held_s < rule.rule.for_s or rule.why_not(state, local) is not None:
                    continue
                fired = self._fired.setdefault(rule.name, {})
                last = fired.get(device)
                if last is not None and (last.since == state["since"] or now - last.at < rule.rule.cooldown_s):
                    continue
                fired[device] = _Fired(state["since"], now)
                self._act(rule, state, local, held_s, now)

    def _act(self, rule: CompiledRule, state: dict, local: datetime, held_s: float, now: float) -> None:
        device = state["device_id"]
        try:
            topic, payload = rule.render(rule.context(state, local, held_s))
        except RenderError as exc:
            self._count(rule.name, "errors")
            log.error("rule action failed", rule=rule.name, device=device, key=exc.key, error=exc.message)
            self.publish_json(self.errors_topic, rule_error(rule, state, exc, now), qos=0)
            return
        self.publish(topic, payload.encode(), rule.rule.qos, rule.rule.retain)
        record = action_record(rule.name, state, topic, now)
        self.publish_json(self.actions_topic, record, qos=1)
        self._count(rule.name, "actions")
        log.info(
            "rule fired",
            rule=rule.name,
            device=device,
            emotion=state["emotion"],
            confidence=state["confidence"],
            topic=topic,
            held_s=round(held_s, 1),
        )

    def _count(self, rule: str, what: str) -> None:
        if self.stats is not None:
            self.stats.rule(rule, what)

    # -- reloading -----------------------------------------------------------------------------------------------
    def reload(self, why: str = "SIGHUP") -> bool:
        """Read the rules file again; True when the new rules are in force. A bad file leaves the old rules."""
        if self.path is None:
            log.info("no rules file to reload", why=why)
            return False
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            self._seen = None
            return self._refuse(why, f"rules file {self.path} does not exist")
        except OSError as exc:
            return self._refuse(why, f"rules file {self.path} cannot be read: {exc}")
        return self._apply(data, why)

    def _apply(self, data: bytes, why: str) -> bool:
        self._seen = hashlib.sha256(data).hexdigest()
        try:
            text = data.decode()
        except UnicodeDecodeError as exc:
            return self._refuse(why, f"rules file {self.path} is not UTF-8 text: {exc}")
        try:
            ruleset = parse_rules(text, str(self.path), self.classes, self.frames)
        except RulesError as exc:
            return self._refuse(why, str(exc))
        with self._lock:
            old = {r.name: r.rule for r in self._ruleset.rules}
            # A rule that is unchanged keeps what it fired for; a new or changed one acts on the current states.
            self._fired = {
                r.name: self._fired.get(r.name, {}) if old.get(r.name) == r.rule else {} for r in ruleset.rules
            }
            self._ruleset = ruleset
        if self.stats is not None:
            self.stats.add("rules_reloads")
        log.info("rules reloaded", file=str(self.path), why=why, rules=ruleset.names)
        return True

    def _refuse(self, why: str, error: str) -> bool:
        if self.stats is not None:
            self.stats.add("rules_reload_errors")
        log.error(
            "rules not reloaded, the old rules stay",
            file=str(self.path),
            why=why,
            error=error,
            rules=self._ruleset.names,
        )
        return False

    def poll(self) -> bool | None:
        """Reload when the file's content differs from what was last read; None when it did not change.

        A removed file keeps the rules loaded (editors remove and rename while saving), and is logged once.
        """
        if self.path is None:
            return None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            if self._seen is None:
                return None
            self._seen = None
            log.warning("rules file removed, the rules loaded stay", file=str(self.path), rules=self._ruleset.names)
            return None
        except OSError as exc:
            log.warning("rules file cannot be read", file=str(self.path), error=str(exc))
            return None
        if hashlib.sha256(data).hexdigest() == self._seen:
            return None
        return self._apply(data, "file changed")

    def start(self) -> None:
        """Check the file every ``watch_s`` seconds in a thread (not when 0 or without a file)."""
        if self.watch_s > 0 and self.path is not None:
            self._thread = threading.Thread(target=self._watch, name="rules-watch", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _watch(self) -> None:
        while not self._stop.wait(self.watch_s):
            try:
                self.poll()
            except Exception:  # the next check tries again
                log.exception("rules file check failed")


# -- records -----------------------------------------------------------------------------------------------------
def action_record(rule: str, state: dict, topic: str, now: float) -> dict:
    """The record of one action on the actions topic (``schemas/action.schema.json``)."""
    return {
        "schema": SCHEMA_VERSION,
        "rule": rule,
        "device_id": state["device_id"],
        "emotion": state["emotion"],
        "confidence": state["confidence"],
        "topic": topic,
        "since": state["since"],
        "at": iso(now),
    }


def rule_error(rule: CompiledRule, state: dict, exc: RenderError, now: float) -> dict:
    """The record of a failed action on the errors topic (``schemas/error.schema.json``, a rule error)."""
    return {
        "schema": SCHEMA_VERSION,
        "rule": rule.name,
        "device_id": state["device_id"],
        "emotion": state["emotion"],
        "topic": None if rule.topic is not None else rule.rule.topic,
        "reason": "template_error",
        "message": f"rule {rule.name!r} for device {state['device_id']!r}: {exc.key}: {exc.message}",
        "at": iso(now),
    }


# -- trying rules without a worker (`emotion-worker rules check` and `rules test`) ---------------------------------
def sample_state(device: str, emotion: str, confidence: float, classes, now: float, held_s: float, model=None):
    """A state document as the tracker would make it: ``emotion`` at ``confidence``, the rest shared evenly."""
    classes = tuple(classes)
    if emotion == NONE:
        scores = {c: 0.0 for c in classes}
        confidence, faces = 0.0, 0
    else:
        rest = (1 - confidence) / max(1, len(classes) - 1)
        scores = {c: round(confidence if c == emotion else rest, 4) for c in classes}
        faces = 1
    return {
        "device_id": device,
        "emotion": emotion,
        "confidence": round(confidence, 4),
        "scores": scores,
        "faces": faces,
        "since": iso(now - held_s),
        "updated_at": iso(now),
        "model": model or {"name": "model", "version": "?"},
    }


def try_rule(rule: CompiledRule, state: dict, local: datetime) -> tuple[str, str] | str:
    """(topic, payload) that ``rule`` would publish for ``state`` once held for its ``for_s``, or why it would
    not fire or failed, as a sentence."""
    why = rule.why_not(state, local)
    if why is not None:
        return f"does not fire: {why}"
    try:
        return rule.render(rule.context(state, local, rule.rule.for_s))
    except RenderError as exc:
        return f"fails: {exc}"


def template_warnings(ruleset: RuleSet, classes, zone=None) -> list[str]:
    """Templates that fail on a sample state of an emotion the rule fires on, one line each."""
    now = time.time()
    local = local_time(now, zone)
    out = []
    for rule in ruleset.rules:
        r = rule.rule
        device = next((d for d in r.devices if d != ANY), "camera")
        emotions = [e for e in r.emotions if e != ANY]
        if ANY in r.emotions:
            emotions += [c for c in classes if c not in emotions]
        for emotion in emotions:
            state = sample_state(device, emotion, max(r.min_confidence, 0.9), classes, now, r.for_s)
            try:
                rule.render(rule.context(state, local, r.for_s))
            except RenderError as exc:
                out.append(f"rule {rule.name!r}: {exc.key} fails when the emotion is {emotion!r}: {exc.message}")
    return out
