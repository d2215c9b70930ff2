"""Settings: defaults, TOML file, EMOTION_* environment and overrides, validation, secrets."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

from worker.config import ConfigError, Settings, config_path, load_settings, masked, to_toml

SECRET = "s3cr3t-Hunter2"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No EMOTION_* variable from the machine, and a working directory without config/worker.toml."""
    for name in list(os.environ):
        if name.startswith("EMOTION_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def write(tmp_path: Path, text: str, name: str = "worker.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def config_error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(*args, **kwargs)
    return str(info.value)


# --- sources and precedence ---------------------------------------------------------------------


def test_defaults():
    assert config_path() is None  # nothing in the (empty) working directory
    s = load_settings()
    assert s.mqtt.host == "127.0.0.1" and s.mqtt.port == 1883 and s.mqtt.protocol == "5"
    assert s.mqtt.password.get_secret_value() == ""
    assert s.mqtt.tls.enabled is False
    assert s.topics.frames == ["emotion/frames/+"] and s.topics.events == "emotion/events"
    assert s.broker.embedded is False
    assert s.model.weights == "auto" and s.model.backend == "auto" and s.model.precision == "auto"
    assert s.model.tta == "auto" and s.model.batch_size == 32
    assert s.detector.kind == "haar" and s.detector.detect_width == 320 and s.detector.max_faces == 8
    assert s.pipeline.max_payload_bytes == 4_000_000 and s.pipeline.max_pixels == 16_000_000
    assert s.log.level == "info"
    assert s == Settings()


def test_every_field_has_a_description():
    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            assert field.description, f"{prefix}{name} has no description"
            sub = field.annotation
            if isinstance(sub, type) and hasattr(sub, "model_fields"):
                walk(sub, f"{prefix}{name}.")

    walk(Settings)


def test_the_repository_default_file_is_valid_and_equals_the_defaults():
    path = Path(__file__).resolve().parents[2] / "config" / "worker.toml"
    assert load_settings(path) == Settings()


def test_file_value_is_used(tmp_path):
    path = write(tmp_path, '[mqtt]\nhost = "broker.lan"\nport = 8883\n\n[mqtt.tls]\nenabled = true\n')
    s = load_settings(path)
    assert s.mqtt.host == "broker.lan" and s.mqtt.port == 8883 and s.mqtt.tls.enabled is True
    assert s.mqtt.keepalive_s == 30  # untouched keys keep their default


def test_default_file_in_the_working_directory_is_read(tmp_path):
    (tmp_path / "config").mkdir()
    write(tmp_path / "config", "[mqtt]\nport = 1999\n")
    assert load_settings().mqtt.port == 1999


def test_emotion_config_names_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, "[mqtt]\nport = 2001\n", "elsewhere.toml")
    monkeypatch.setenv("EMOTION_CONFIG", str(path))
    assert load_settings().mqtt.port == 2001
    # an explicit path wins over EMOTION_CONFIG
    other = write(tmp_path, "[mqtt]\nport = 2002\n", "other.toml")
    assert load_settings(other).mqtt.port == 2002


def test_env_overrides_the_file(tmp_path, monkeypatch):
    path = write(tmp_path, '[mqtt]\nhost = "broker.lan"\nport = 8883\n')
    monkeypatch.setenv("EMOTION_MQTT__PORT", "1884")
    s = load_settings(path)
    assert s.mqtt.port == 1884
    assert s.mqtt.host == "broker.lan"  # the file still supplies what the environment does not


def test_env_sets_nested_and_list_values(monkeypatch):
    monkeypatch.setenv("EMOTION_MQTT__TLS__ENABLED", "true")
    monkeypatch.setenv("EMOTION_TOPICS__FRAMES", '["site/+/frames", "$share/g/cams/+"]')
    monkeypatch.setenv("EMOTION_MODEL__WEIGHTS", "/models/x.safetensors")
    s = load_settings()
    assert s.mqtt.tls.enabled is True
    assert s.topics.frames == ["site/+/frames", "$share/g/cams/+"]
    assert s.model.weights == Path("/models/x.safetensors")


def test_overrides_win_over_env_and_file(tmp_path, monkeypatch):
    path = write(tmp_path, "[mqtt]\nport = 8883\n[broker]\nembedded = false\n")
    monkeypatch.setenv("EMOTION_MQTT__PORT", "1884")
    monkeypatch.setenv("EMOTION_MQTT__HOST", "env-host")
    s = load_settings(path, mqtt={"port": 1999}, broker={"embedded": True})
    assert s.mqtt.port == 1999 and s.broker.embedded is True
    assert s.mqtt.host == "env-host"  # an override of one key keeps the other sources' keys


# --- errors name the key --------------------------------------------------------------------------


def test_unknown_key_in_the_file(tmp_path):
    path = write(tmp_path, '[mqtt]\nhots = "broker.lan"\n')
    message = config_error(path)
    assert "mqtt.hots: unknown key" in message and str(path) in message


def test_unknown_section_in_the_file(tmp_path):
    assert "mqt: unknown key" in config_error(write(tmp_path, "[mqt]\nport = 1\n"))


def test_unknown_nested_env_key(monkeypatch):
    monkeypatch.setenv("EMOTION_DETECTOR__MIN_FACE", "30")
    assert "detector.min_face: unknown key" in config_error()


def test_unknown_top_level_env_var(monkeypatch):
    monkeypatch.setenv("EMOTION_FOO", "1")
    message = config_error()
    assert "EMOTION_FOO" in message and "'foo'" in message and "mqtt" in message


def test_unknown_env_section_with_nested_key(monkeypatch):
    monkeypatch.setenv("EMOTION_MQQT__PORT", "1")
    assert "EMOTION_MQQT__PORT" in config_error()


@pytest.mark.parametrize(
    "name, value, key, words",
    [
        ("EMOTION_MQTT__PORT", "abc", "mqtt.port", "valid integer"),
        ("EMOTION_MQTT__PORT", "70000", "mqtt.port", "65535"),
        ("EMOTION_MQTT__PORT", "0", "mqtt.port", "greater than or equal to 1"),
        ("EMOTION_MQTT__PROTOCOL", "4", "mqtt.protocol", "'4'"),
        ("EMOTION_MODEL__TTA", "mirror", "model.tta", "'mirror'"),
        ("EMOTION_MODEL__BACKEND", "openvino", "model.backend", "'onnxruntime'"),
        ("EMOTION_DETECTOR__KIND", "dlib", "detector.kind", "'dlib'"),
        ("EMOTION_PIPELINE__MAX_PIXELS", "10", "pipeline.max_pixels", "1024"),
        ("EMOTION_LOG__LEVEL", "verbose", "log.level", "'verbose'"),
    ],
)
def test_bad_env_value_names_the_key(monkeypatch, name, value, key, words):
    monkeypatch.setenv(name, value)
    message = config_error()
    assert f"{key}:" in message and words in message


@pytest.mark.parametrize(
    "text, key",
    [
        ('[mqtt]\nport = "abc"\n', "mqtt.port"),
        ("[mqtt]\nport = 70000\n", "mqtt.port"),
        ('[mqtt]\nprotocol = "4"\n', "mqtt.protocol"),
        ("[mqtt]\nprotocol = 5\n", "mqtt.protocol"),  # a number, not the string "5"
        ("[mqtt]\nreconnect_min_s = 10.0\nreconnect_max_s = 2.0\n", "mqtt"),
    ],
)
def test_bad_file_value_names_the_key(tmp_path, text, key):
    message = config_error(write(tmp_path, text))
    assert f"  {key}:" in message


def test_every_problem_is_listed(monkeypatch):
    monkeypatch.setenv("EMOTION_MQTT__PORT", "abc")
    monkeypatch.setenv("EMOTION_MQTT__PROTOCOL", "4")
    message = config_error()
    assert "mqtt.port:" in message and "mqtt.protocol:" in message


def test_missing_config_file(tmp_path):
    path = tmp_path / "nope.toml"
    message = config_error(path)
    assert str(path) in message and "does not exist" in message


def test_config_path_that_is_a_directory(tmp_path):
    assert f"config file {tmp_path} " in config_error(tmp_path)


def test_invalid_toml(tmp_path):
    path = write(tmp_path, "[mqtt\nport = 1\n")
    message = config_error(path)
    assert str(path) in message and "not valid TOML" in message and "line 1" in message


def test_toml_that_is_not_utf8(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes('[mqtt]\nhost = "café"\n'.encode("latin-1"))
    assert "not valid TOML" in config_error(path)


# --- topics and detector ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "topic", ["emotion/frames", "emotion/frames/cam1", "$share/group/emotion/frames", "$share/g", ""]
)
def test_frame_topic_needs_a_device_level(topic):
    message = config_error(topics={"frames": [topic]})
    assert "topics.frames" in message and "'+'" in message


@pytest.mark.parametrize(
    "topic", ["emotion/frames/+", "$share/group/emotion/frames/+", "site/+/camera/frames", "emotion/frames/#"]
)
def test_frame_topic_with_a_device_level(topic):
    assert load_settings(topics={"frames": [topic]}).topics.frames == [topic]


def test_frame_topics_may_not_be_empty():
    assert "topics.frames" in config_error(topics={"frames": []})


@pytest.mark.parametrize("topic", ["emotion/events/+", "emotion/#", ""])
def test_publish_topics_have_no_wildcards(topic):
    assert "topics.events" in config_error(topics={"events": topic})


def test_yunet_needs_a_model_path(tmp_path):
    message = config_error(detector={"kind": "yunet"})
    assert "detector:" in message and "yunet_model" in message
    onnx = tmp_path / "yunet.onnx"
    s = load_settings(detector={"kind": "yunet", "yunet_model": str(onnx)})
    assert s.detector.kind == "yunet" and s.detector.yunet_model == onnx


# --- secrets --------------------------------------------------------------------------------------


@pytest.fixture
def secret_settings(monkeypatch) -> Settings:
    monkeypatch.setenv("EMOTION_MQTT__PASSWORD", SECRET)
    monkeypatch.setenv("EMOTION_MQTT__USERNAME", "camera-user")
    return load_settings()


def test_password_is_read(secret_settings):
    assert secret_settings.mqtt.password.get_secret_value() == SECRET


def test_password_never_shown(secret_settings):
    data = masked(secret_settings)
    assert data["mqtt"]["password"] == "**********" and data["mqtt"]["username"] == "camera-user"
    for text in (
        str(data),
        to_toml(data),
        repr(secret_settings),
        str(secret_settings),
        secret_settings.model_dump_json(),
        repr(secret_settings.mqtt),
    ):
        assert SECRET not in text
    assert 'password = "**********"' in to_toml(data)


def test_unset_password_is_shown_empty():
    assert masked(load_settings())["mqtt"]["password"] == ""


def test_masked_does_not_change_the_settings(secret_settings):
    masked(secret_settings)
    assert secret_settings.mqtt.password.get_secret_value() == SECRET


def test_password_not_in_a_field_error(monkeypatch):
    monkeypatch.setenv("EMOTION_MQTT__PASSWORD", SECRET)
    monkeypatch.setenv("EMOTION_MQTT__PORT", "abc")
    message = config_error()
    assert "mqtt.port" in message and SECRET not in message


def test_password_not_in_a_section_error(monkeypatch):
    # A section-level check (reconnect delays) reports the whole section as its input.
    monkeypatch.setenv("EMOTION_MQTT__PASSWORD", SECRET)
    monkeypatch.setenv("EMOTION_MQTT__RECONNECT_MIN_S", "10")
    monkeypatch.setenv("EMOTION_MQTT__RECONNECT_MAX_S", "1")
    message = config_error()
    assert "reconnect_max_s must not be smaller" in message
    assert SECRET not in message and "**********" in message


def test_password_not_in_an_error_about_a_bad_password_value(tmp_path):
    message = config_error(write(tmp_path, "[mqtt]\npassword = 12345678\n"))
    assert "mqtt.password" in message and "12345678" not in message


def test_misspelt_password_key_does_not_show_its_value(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOTION_MQTT__PASSWD", SECRET)
    message = config_error()
    assert "mqtt.passwd: unknown key" in message and SECRET not in message


# --- to_toml ----------------------------------------------------------------------------------------


def test_defaults_round_trip_through_toml(tmp_path):
    settings = load_settings()
    text = to_toml(masked(settings))
    assert tomllib.loads(text)["mqtt"]["port"] == 1883
    assert load_settings(write(tmp_path, text, "dump.toml")) == settings


def test_changed_settings_round_trip_through_toml(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOTION_MQTT__TLS__CA_CERTS", "/etc/ssl/ca.pem")
    settings = load_settings(
        mqtt={"host": 'broker "quoted" \\ lan', "port": 8883, "protocol": "3.1.1", "reconnect_min_s": 0.25},
        topics={"frames": ["$share/g/emotion/frames/+", "site/+/cam"]},
        model={"weights": "/models/m.safetensors", "tta": "rotate"},
        detector={"kind": "yunet", "yunet_model": "/models/yunet.onnx", "score_threshold": 0.55},
        pipeline={"publish_empty": True},
    )
    text = to_toml(masked(settings))
    doc = tomllib.loads(text)
    assert doc["mqtt"]["tls"]["ca_certs"] == "/etc/ssl/ca.pem"
    assert "certfile" not in doc["mqtt"]["tls"]  # None is left out
    monkeypatch.delenv("EMOTION_MQTT__TLS__CA_CERTS")
    assert load_settings(write(tmp_path, text, "dump.toml")) == settings


@pytest.mark.parametrize(
    "value, expected",
    [
        ("auto", "auto"),
        ("resnet9", "resnet9"),
        ("resnet9-small", "resnet9-small"),
        ("/models/m.safetensors", Path("/models/m.safetensors")),
        ("small.int8.onnx", Path("small.int8.onnx")),
    ],
)
def test_model_weights_is_a_bundled_name_or_a_path(monkeypatch, value, expected):
    monkeypatch.setenv("EMOTION_MODEL__WEIGHTS", value)
    assert load_settings().model.weights == expected


# --- the password from a file or a systemd credential --------------------------------------------


def test_password_file_is_read_without_its_line_break(tmp_path, monkeypatch):
    secret = write(tmp_path, SECRET + "\n", "mqtt_password")
    monkeypatch.setenv("EMOTION_MQTT__PASSWORD_FILE", str(secret))
    settings = load_settings()
    assert settings.mqtt.secret() == SECRET
    assert SECRET not in to_toml(masked(settings))
    assert f'password_file = "{secret}"' in to_toml(masked(settings))


def test_systemd_credential_is_the_password_when_nothing_else_is_set(tmp_path, monkeypatch):
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert load_settings().mqtt.secret() is None  # no credential of that name
    (creds / "mqtt_password").write_text(SECRET + "\r\n")
    assert load_settings().mqtt.secret() == SECRET
    monkeypatch.setenv("EMOTION_MQTT__PASSWORD", "from-the-environment")
    assert load_settings().mqtt.secret() == "from-the-environment"
    (creds / "mqtt_password").write_text("")  # an anonymous broker
    monkeypatch.delenv("EMOTION_MQTT__PASSWORD")
    assert load_settings().mqtt.secret() is None


def test_missing_password_file_names_the_key_and_the_path(tmp_path, monkeypatch):
    monkeypatch.setenv("EMOTION_MQTT__PASSWORD_FILE", str(tmp_path / "nope"))
    message = config_error()
    assert "mqtt.password_file" in message and str(tmp_path / "nope") in message and "does not exist" in message


def test_password_and_password_file_together_are_refused(tmp_path, monkeypatch):
    secret = write(tmp_path, SECRET, "mqtt_password")
    monkeypatch.setenv("EMOTION_MQTT__PASSWORD_FILE", str(secret))
    monkeypatch.setenv("EMOTION_MQTT__PASSWORD", SECRET)
    message = config_error()
    assert "password or password_file, not both" in message and SECRET not in message


def test_unreadable_password_file_at_start_names_the_key(tmp_path, monkeypatch):
    secret = write(tmp_path, SECRET, "mqtt_password")
    monkeypatch.setenv("EMOTION_MQTT__PASSWORD_FILE", str(secret))
    settings = load_settings()
    secret.unlink()
    with pytest.raises(ValueError, match=r"mqtt\.password_file: cannot read"):
        settings.mqtt.secret()


def test_health_and_metrics_defaults(tmp_path):
    settings = load_settings()
    assert settings.health.max_age_s == 30 and settings.health.heartbeat_file is None
    assert settings.metrics.port == 0  # off unless asked for
    assert "metrics.port" in config_error(metrics={"port": 70000})
