"""Settings of the worker: defaults, ``config/worker.toml``, ``EMOTION_*`` environment, command line.

Precedence, highest first: command line, environment, config file, defaults.
Unknown keys in any source are errors, so a typo never passes silently.
"""

from __future__ import annotations

import contextvars
import os
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from worker.topics import check_device_id, check_frame_filter, check_plain

ENV_PREFIX = "EMOTION_"
DEFAULT_CONFIG = Path("config/worker.toml")
DEFAULT_RULES = Path("config/rules.toml")
_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar("config_file", default=None)


class ConfigError(ValueError):
    """The configuration is invalid; the message names the key and the problem."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TLSSettings(Section):
    enabled: bool = Field(False, description="Connect with TLS.")
    ca_certs: Path | None = Field(None, description="CA bundle to verify the broker with; the system's when unset.")
    certfile: Path | None = Field(None, description="Client certificate (PEM) for brokers that require one.")
    keyfile: Path | None = Field(None, description="Private key (PEM) of the client certificate.")
    insecure: bool = Field(False, description="Skip verification of the broker's host name. Only for testing.")


class MqttSettings(Section):
    host: str = Field("127.0.0.1", description="Broker host name or address.")
    port: int = Field(1883, ge=1, le=65535, description="Broker port (8883 is usual with TLS).")
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT protocol version.")
    client_id: str = Field(
        "",
        description="Client id, stable across restarts; empty gives 'emotion-worker-<host name>'. "
        "Several workers on one host need one each.",
    )
    username: str = Field("", description="User name; empty connects anonymously.")
    password: SecretStr = Field(SecretStr(""), description="Password; never logged or printed.")
    password_file: Path | None = Field(
        None,
        description="File holding the password (one line), instead of 'password'. Unset, the worker reads "
        "systemd's credential $CREDENTIALS_DIRECTORY/mqtt_password when there is one.",
    )
    keepalive_s: int = Field(30, ge=5, le=3600, description="Keep-alive interval in seconds.")
    reconnect_min_s: float = Field(
        1.0, gt=0, description="First delay before reconnecting, in seconds; doubles each try."
    )
    reconnect_max_s: float = Field(30.0, gt=0, description="Longest delay between reconnection attempts, in seconds.")
    tls: TLSSettings = Field(default_factory=TLSSettings, description="TLS options.")
    queue_size: int = Field(
        1000,
        ge=0,
        le=1_000_000,
        description="Messages (events, errors, changes) kept for the broker while it is away. When full, the "
        "oldest is dropped, counted and logged: after an outage the newest say more about now. Retained messages "
        "(status, state, stats) are kept apart, the last one per topic, and never dropped.",
    )
    session_expiry_s: int | None = Field(
        None,
        ge=0,
        le=4_294_967_295,
        description="How long the broker keeps this worker's session, its subscriptions and the QoS 1 frames "
        "that arrive for it, while the worker is away, in seconds. Unset: 3600, or 0 when a frames filter is a "
        "'$share/' group (the broker would hold an absent member's share of the frames; the group serves them). "
        "0: a new session on every connect.",
    )

    @model_validator(mode="after")
    def _delays(self) -> MqttSettings:
        if self.reconnect_max_s < self.reconnect_min_s:
            raise ValueError("reconnect_max_s must not be smaller than reconnect_min_s")
        return self

    @field_validator("password_file")
    @classmethod
    def _readable(cls, path: Path | None) -> Path | None:
        if path is not None and not os.access(path, os.R_OK):
            raise ValueError(f"{path} does not exist or cannot be read" if path.exists() else f"{path} does not exist")
        return path

    @model_validator(mode="after")
    def _one_password(self) -> MqttSettings:
        if self.password_file is not None and self.password.get_secret_value():
            raise ValueError("set password or password_file, not both")
        return self

    def secret(self) -> str | None:
        """The password: 'password', else the content of 'password_file', else systemd's credential
        ``$CREDENTIALS_DIRECTORY/mqtt_password``; None when there is none. One trailing line break is removed.

        Raises ValueError naming the file when it cannot be read.
        """
        if self.password.get_secret_value():
            return self.password.get_secret_value()
        path, key = self.password_file, "mqtt.password_file"
        if path is None and os.environ.get("CREDENTIALS_DIRECTORY"):
            path, key = Path(os.environ["CREDENTIALS_DIRECTORY"]) / "mqtt_password", "credential mqtt_password"
            if not path.is_file():
                return None
        if path is None:
            return None
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"{key}: cannot read {path}: {exc}") from None
        return text.removesuffix("\n").removesuffix("\r") or None

    def effective_client_id(self) -> str:
        return self.client_id or f"emotion-worker-{socket.gethostname()}"


class TopicsSettings(Section):
    frames: list[str] = Field(
        ["emotion/frames/+"],
        min_length=1,
        description="Topic filters frames arrive on. The level matched by the first '+' is the device id. "
        "Prefix with '$share/<group>/' (MQTT 5) to split frames among several workers.",
    )
    events: str = Field("emotion/events", description="Topic emotion events are published to (QoS 1).")
    errors: str = Field("emotion/errors", description="Topic records of rejected frames are published to.")
    status: str = Field(
        "emotion/status",
        description="Each worker publishes a retained 'online' / 'offline' on '<status>/<client id>'.",
    )
    state: str = Field("emotion/state", description="Each camera's steady emotion, retained on '<state>/<device id>'.")
    changes: str = Field("emotion/changes", description="One record per change of a camera's steady emotion.")
    stats: str = Field(
        "emotion/stats", description="Each worker's statistics, retained on '<stats>/<client id>' every stats interval."
    )
    actions: str = Field("emotion/actions", description="One record per action a rule took.")
    skipped: str = Field(
        "emotion/skipped",
        description="One record per frame that gave neither an event nor an error: no face found, "
        "too old, or dropped while the worker was behind (QoS 0).",
    )

    @field_validator("frames")
    @classmethod
    def _filters(cls, filters: list[str]) -> list[str]:
        return [check_frame_filter(f) for f in filters]

    @field_validator("events", "errors", "status", "state", "changes", "stats", "actions", "skipped")
    @classmethod
    def _plain(cls, topic: str) -> str:
        return check_plain(topic)


class BrokerSettings(Section):
    embedded: bool = Field(
        False,
        description="Use the MQTT broker already on host:port, else start one (Mosquitto when installed, "
        "else amqtt), and connect to it with the protocol it speaks; mqtt.host, port and protocol are then ignored.",
    )
    kind: Literal["auto", "mosquitto", "amqtt"] = Field(
        "auto",
        description="Which broker to start when none is running: auto is Mosquitto (MQTT 5) when installed, "
        "else amqtt (in-process, MQTT 3.1.1).",
    )
    host: str = Field("127.0.0.1", description="Address the embedded broker listens on.")
    port: int = Field(1883, ge=0, le=65535, description="Port the embedded broker listens on.")


class ModelSettings(Section):
    weights: Literal["auto", "resnet9", "resnet9-small"] | Path | None = Field(
        "auto",
        description="The model: a bundled one by name (resnet9: the full model; resnet9-small: a narrow "
        "network distilled from it, 10 times as fast and a little less accurate), a checkpoint (.safetensors) or an ONNX "
        "model (.onnx). auto (or unset): resnet9 on CUDA, resnet9-small on a CPU.",
    )
    backend: Literal["auto", "torch", "onnxruntime"] = Field(
        "auto",
        description="What runs the network. torch: PyTorch, on the CPU or CUDA; onnxruntime: ONNX Runtime on the "
        "CPU, with the int8 ONNX file beside the checkpoint (<name>.int8.onnx). auto: torch on CUDA and on a CPU "
        "with bf16, onnxruntime on another CPU.",
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Where to run the network: auto picks CUDA when available."
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto",
        description="Precision of the torch backend. auto: bf16 on a CPU that has it, bf16 or fp16 on CUDA, "
        "else fp32. The onnxruntime backend computes in its file's precision and takes auto only.",
    )
    tta: Literal["auto", "none", "flip", "tencrop", "rotate"] = Field(
        "auto",
        description="Test-time augmentation per face: flip averages the face and its mirror image (2 views); "
        "tencrop adds 2-pixel shifts (10 views), rotate adds turns of ±8 degrees (6 views). "
        "auto: flip on CUDA, none on a CPU, where flip would halve the frames per second.",
    )
    batch_size: int = Field(32, ge=1, le=1024, description="Most faces classified in one batch.")
    max_wait_ms: float = Field(5.0, ge=0, le=1000, description="Longest wait for more faces to fill a batch, in ms.")
    threads: int = Field(
        0,
        ge=0,
        description="CPU threads for the network. 0: PyTorch on a CPU gets the cores that pipeline.threads "
        "leaves (at least 1); ONNX Runtime and CUDA keep their defaults.",
    )


class DetectorSettings(Section):
    kind: Literal["haar", "yunet", "none"] = Field(
        "haar", description="haar: OpenCV Haar cascade; yunet: OpenCV FaceDetectorYN; none: each frame is a face crop."
    )
    yunet_model: Path | None = Field(None, description="ONNX file of YuNet, required when kind is yunet.")
    detect_width: int = Field(
        320, ge=64, le=4096, description="Frames wider than this are scaled down to it for detection, in pixels."
    )
    min_face_px: int = Field(40, ge=8, description="Smallest face to report, in frame pixels.")
    score_threshold: float = Field(0.7, ge=0, le=1, description="YuNet confidence threshold.")
    max_faces: int = Field(8, ge=1, le=64, description="Most faces classified per frame, largest first.")

    @model_validator(mode="after")
    def _yunet(self) -> DetectorSettings:
        if self.kind == "yunet" and self.yunet_model is None:
            raise ValueError("kind 'yunet' needs yunet_model, the path of the YuNet ONNX file")
        return self


class PipelineSettings(Section):
    queue_size: int = Field(
        8, ge=1, le=10000, description="Frames waiting to be processed; beyond it the oldest are dropped."
    )
    threads: int = Field(
        2,
        ge=1,
        le=64,
        description="Threads decoding frames and detecting faces; with 2 or more, OpenCV gives each detection one "
        "thread.",
    )
    max_age_s: float = Field(
        5.0, gt=0, description="Frames older than this (from captured_at, else from arrival) are skipped, in seconds."
    )
    max_payload_bytes: int = Field(4_000_000, ge=1024, description="Largest accepted frame payload, in bytes.")
    max_pixels: int = Field(16_000_000, ge=1024, description="Largest accepted image, in pixels (width x height).")
    publish_empty: bool = Field(False, description="Publish an event for frames without faces too.")
    publish_events: bool = Field(
        True, description="Publish one event per frame on the events topic; false leaves only the steady state."
    )
    stats_interval_s: float = Field(
        60.0,
        ge=0,
        description="Seconds between statistics, logged and published retained on '<stats>/<client id>'; 0 turns "
        "them off.",
    )


class StateSettings(Section):
    """The steady emotion per camera; the defaults come from ``benchmarks/smoothing.py`` (docs/state.md)."""

    time_constant_s: float = Field(
        0.7, ge=0, le=600, description="Time constant of the exponential smoothing of class scores, in seconds."
    )
    combine: Literal["largest", "mean"] = Field(
        "largest", description="How the faces of one frame combine: the largest face, or the mean of all faces."
    )
    min_confidence: float = Field(
        0.25, ge=0, le=1, description="A new emotion's smoothed score must reach this (0-1) to take over."
    )
    margin: float = Field(
        0.1, ge=0, le=1, description="A new emotion must lead the current one by this much (0-1) to take over."
    )
    hold_s: float = Field(
        1.0,
        ge=0,
        le=600,
        description="Seconds a new emotion must lead (or a face be seen, after none) before the state changes.",
    )
    absent_after_s: float = Field(
        5.0, gt=0, le=86400, description="Seconds without a face after which the state becomes 'none'."
    )
    state_interval_s: float = Field(
        10.0,
        ge=0,
        description="While frames come and the state holds, republish it at most this often, in seconds; "
        "0 publishes on changes only.",
    )
    tick_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="Seconds between checks of every camera without frames (for 'none', and for rules on time).",
    )


class CameraSettings(Section):
    name: str = Field("", description="Friendly name shown in Home Assistant; empty uses the device id.")
    area: str = Field("", description="Area Home Assistant suggests for the camera, e.g. 'Kitchen'.")


class HomeAssistantSettings(Section):
    discovery: bool = Field(True, description="Announce every camera and this worker through MQTT discovery.")
    prefix: str = Field("homeassistant", description="Home Assistant's discovery prefix.")
    status_topic: str = Field(
        "homeassistant/status", description="Home Assistant's birth topic; 'online' there makes the worker re-announce."
    )
    cameras: dict[str, CameraSettings] = Field(
        default_factory=dict,
        description="Cameras announced from the start, by device id: [homeassistant.cameras.<device id>]. "
        "A camera removed from here is removed from Home Assistant at the next start.",
    )

    @field_validator("prefix", "status_topic")
    @classmethod
    def _plain(cls, topic: str) -> str:
        return check_plain(topic)

    @field_validator("cameras")
    @classmethod
    def _device_ids(cls, cameras: dict[str, CameraSettings]) -> dict[str, CameraSettings]:
        for device in cameras:
            check_device_id(device)
        return cameras


class HealthSettings(Section):
    max_age_s: float = Field(
        30.0,
        gt=0,
        description="The worker is unhealthy when a pipeline stage with work waiting has made no progress "
        "for this long, in seconds (`emotion-worker health`, systemd's watchdog).",
    )
    heartbeat_file: Path | None = Field(
        None,
        description="File the heartbeat is written to for `emotion-worker health`; unset: "
        "$RUNTIME_DIRECTORY/heartbeat under systemd, else <temp dir>/emotion-worker-<uid>/heartbeat. "
        "Two workers of one user on one host need one each.",
    )


class MetricsSettings(Section):
    port: int = Field(
        0, ge=0, le=65535, description="Port of the Prometheus endpoint (/metrics); 0 turns it off, 9464 is usual."
    )
    host: str = Field("0.0.0.0", description="Address the endpoint listens on; 127.0.0.1 keeps it to this host.")


class RulesSettings(Section):
    file: Path | None = Field(
        None,
        description="TOML file of rules that act on each camera's steady emotion (docs/rules.md). Unset: "
        "config/rules.toml (from the working directory) when it exists, else no rules until it appears.",
    )
    watch_s: float = Field(
        2.0,
        ge=0,
        le=3600,
        description="Seconds between checks of the rules file for changes, which reload it; 0: only SIGHUP reloads.",
    )
    timezone: str = Field(
        "",
        description="IANA time zone of quiet hours and of 'now' in templates, e.g. 'Europe/Berlin'; empty: the "
        "system's local time ($TZ).",
    )

    @field_validator("timezone")
    @classmethod
    def _zone(cls, name: str) -> str:
        if name:
            from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

            try:
                ZoneInfo(name)
            except (ZoneInfoNotFoundError, ValueError):
                raise ValueError(
                    f"unknown time zone {name!r}; use an IANA name such as 'Europe/Berlin' "
                    "(without the system's zoneinfo, pip install tzdata)"
                ) from None
        return name

    def path(self) -> Path:
        """The rules file to read: ``file`` when set, else ``config/rules.toml`` (which may not exist yet)."""
        return self.file if self.file is not None else DEFAULT_RULES


class LogSettings(Section):
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    format: Literal["auto", "json", "console"] = Field(
        "auto", description="auto: readable on a terminal, JSON lines otherwise."
    )


class Settings(BaseSettings):
    """The whole configuration of the worker."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_assignment=True,
    )

    mqtt: MqttSettings = Field(default_factory=MqttSettings, description="Connection to the MQTT broker.")
    topics: TopicsSettings = Field(default_factory=TopicsSettings, description="MQTT topics.")
    broker: BrokerSettings = Field(
        default_factory=BrokerSettings, description="Embedded broker for a set-up without one."
    )
    model: ModelSettings = Field(default_factory=ModelSettings, description="Emotion model and inference.")
    detector: DetectorSettings = Field(default_factory=DetectorSettings, description="Face detection.")
    pipeline: PipelineSettings = Field(
        default_factory=PipelineSettings, description="Queues, limits and what to publish."
    )
    log: LogSettings = Field(default_factory=LogSettings, description="Logging.")
    state: StateSettings = Field(default_factory=StateSettings, description="The steady emotion of each camera.")
    homeassistant: HomeAssistantSettings = Field(
        default_factory=HomeAssistantSettings, description="Home Assistant MQTT discovery."
    )
    health: HealthSettings = Field(default_factory=HealthSettings, description="Liveness: heartbeat and watchdog.")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings, description="Prometheus metrics endpoint.")
    rules: RulesSettings = Field(default_factory=RulesSettings, description="Rules: actions on the steady emotions.")

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = _config_file.get()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


def config_path(explicit: str | Path | None = None) -> Path | None:
    """The config file to read: ``--config``, else ``$EMOTION_CONFIG``, else ``config/worker.toml`` if present."""
    if explicit:
        return Path(explicit)
    if os.environ.get(f"{ENV_PREFIX}CONFIG"):
        return Path(os.environ[f"{ENV_PREFIX}CONFIG"])
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else None


def load_settings(path: str | Path | None = None, **overrides: Any) -> Settings:
    """Build the settings from the config file at ``path`` (see :func:`config_path`), the environment and ``overrides``.

    ``overrides`` are nested dicts by section, e.g. ``{"broker": {"embedded": True}}``.
    Raises :class:`ConfigError` with one line per problem, each naming its key.
    """
    file = config_path(path)
    if file is not None:
        if not file.is_file():
            raise ConfigError(f"config file {file} does not exist")
        try:
            tomllib.loads(file.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    _check_env_names()
    token = _config_file.set(file)
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        where = f" (from {file}, EMOTION_* environment and command line)" if file else ""
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"])
            if err["type"] == "extra_forbidden":  # no value: a misspelt 'password' key holds a secret
                lines.append(f"  {key}: unknown key")
            else:
                lines.append(f"  {key}: {err['msg']} (got {_shown(key, err.get('input'))})")
        raise ConfigError(f"invalid configuration{where}:\n" + "\n".join(lines)) from None
    finally:
        _config_file.reset(token)


def parse_set(items: list[str]) -> dict[str, Any]:
    """``--set section.key=value`` options as nested overrides for :func:`load_settings`.

    ``value`` is read as a TOML value when it is one (``8883``, ``true``, ``["a/+"]``,
    ``"text"``), else taken as text (``broker.lan``). Raises :class:`ConfigError` naming a
    malformed item; unknown keys are reported by :func:`load_settings`.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) < 2 or not all(parts):
            raise ConfigError(f"--set {item!r}: expected section.key=value, e.g. --set mqtt.port=8883")
        try:
            value = tomllib.loads(f"v = {text}")["v"]
        except tomllib.TOMLDecodeError:
            value = text
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r}: {part} is set to a value and used as a section")
        node[parts[-1]] = value
    return out


def _shown(key: str, value: Any) -> str:
    if "password" in key and not key.endswith("password_file"):
        return "'**********'"
    text = repr(_hide_secrets(value))
    return text if len(text) <= 80 else text[:77] + "..."


def _hide_secrets(value: Any) -> Any:
    """``value`` with passwords masked, for a whole section shown by a section-level error."""
    if isinstance(value, dict):
        return {
            k: "**********" if "password" in str(k) and not str(k).endswith("_file") else _hide_secrets(v)
            for k, v in value.items()
        }
    return value


def _check_env_names() -> None:
    """Refuse ``EMOTION_*`` variables that name no section (pydantic-settings would ignore them)."""
    sections = {name.upper() for name in Settings.model_fields}
    for name in os.environ:
        upper = name.upper()  # pydantic-settings reads names case-insensitively
        if not upper.startswith(ENV_PREFIX) or upper == f"{ENV_PREFIX}CONFIG":
            continue
        section = upper[len(ENV_PREFIX) :].split("__", 1)[0]
        if section not in sections:
            raise ConfigError(
                f"environment variable {name}: unknown key {section.lower()!r}; sections are "
                + ", ".join(sorted(s.lower() for s in sections))
            )


def masked(settings: Settings) -> dict[str, Any]:
    """The settings as plain data, with secrets shown as '**********' (or '' when unset)."""
    data = settings.model_dump(mode="json")
    data["mqtt"]["password"] = "**********" if settings.mqtt.password.get_secret_value() else ""
    return data


def to_toml(data: dict[str, Any], prefix: str = "") -> str:
    """Render nested settings data as TOML (None values are left out)."""
    lines, tables = [], []
    for key, value in data.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif value is not None:
            lines.append(f"{key} = {_toml_value(value)}")
    out = "\n".join(lines)
    for key, value in tables:
        name = f"{prefix}{key}"
        body = to_toml(value, f"{name}.")
        out += f"\n\n[{name}]\n{body}" if out or prefix else f"[{name}]\n{body}"
    return out.strip("\n") if not prefix else out


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    import json

    return json.dumps(str(value))
