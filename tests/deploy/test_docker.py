"""The Dockerfiles and compose files, checked statically: no Docker engine or compose plugin runs where
the tests do, so the YAML is read with PyYAML (merge keys included, as Compose reads them) and its keys
asserted. The broker configuration they mount runs for real in tests/deploy/test_mosquitto.py.
"""

from __future__ import annotations

import re
import shlex

import pytest
import yaml

from tests.conftest import REPO

DOCKER = REPO / "docker"
COMPOSE = DOCKER / "compose.yaml"
NO_BROKER = DOCKER / "compose.no-broker.yaml"


def instructions(path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            word, _, rest = current.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def args(path) -> dict[str, str]:
    return dict(rest.split("=", 1) for word, rest in instructions(path) if word == "ARG" and "=" in rest)


def compose(path) -> dict:
    return yaml.safe_load(path.read_text())


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.cuda"])
def test_image_has_a_health_check_that_runs_emotion_worker_health(dockerfile):
    steps = instructions(DOCKER / dockerfile)
    (health,) = [rest for word, rest in steps if word == "HEALTHCHECK"]
    options, _, command = health.partition("CMD")
    assert command.strip() == '["emotion-worker", "health"]'
    # docs/running.md: every 30 s after a 120 s start period.
    assert "--interval=30s" in options.split() and "--start-period=120s" in options.split()
    user = [rest for word, rest in steps if word == "USER"][-1]
    assert user.split(":")[0] not in ("0", "root")
    assert ("ENTRYPOINT", '["emotion-worker"]') in steps and ("CMD", '["run"]') in steps
    assert ("STOPSIGNAL", "SIGTERM") in steps


def test_cuda_image_is_built_on_an_nvidia_cuda_runtime_with_the_matching_torch_wheels():
    a = args(DOCKER / "Dockerfile.cuda")
    steps = instructions(DOCKER / "Dockerfile.cuda")
    assert ("FROM", "${CUDA_IMAGE}") in steps
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu\d+\.\d+", a["CUDA_IMAGE"])
    assert m, a["CUDA_IMAGE"]
    assert a["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/cu{m[1]}{m[2]}"
    cpu = args(DOCKER / "Dockerfile")
    assert cpu["TORCH_INDEX_URL"].endswith("/whl/cpu")
    assert a["TORCH_VERSION"] == cpu["TORCH_VERSION"]
    env = " ".join(rest for word, rest in steps if word == "ENV")
    assert "EMOTION_MODEL__DEVICE=cuda" in env
    docs = (REPO / "docs" / "running.md").read_text()
    assert a["CUDA_IMAGE"] in docs and f"cu{m[1]}{m[2]} wheels" in docs


def test_profiles_choose_the_cpu_or_the_gpu_worker_and_the_gpu_one_reserves_a_gpu():
    for path in (COMPOSE, NO_BROKER):
        services = compose(path)["services"]
        assert services["worker"]["profiles"] == ["cpu"]
        assert services["worker"]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
        assert "deploy" not in services["worker"]
        cuda = services["worker-cuda"]
        assert cuda["profiles"] == ["cuda"]
        assert cuda["build"] == {"context": "..", "dockerfile": "docker/Dockerfile.cuda"}
        assert (DOCKER / "Dockerfile.cuda").is_file()
        (device,) = cuda["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"] >= 1
        assert cuda["environment"]["EMOTION_MODEL__DEVICE"] == "cuda"
        for service in (services["worker"], cuda):
            assert service.get("healthcheck", {}).get("disable") is not True  # the image's HEALTHCHECK stays
            assert service["image"].startswith("emotion-worker:")


def test_the_password_reaches_the_worker_as_a_file_never_in_the_environment():
    for path in (COMPOSE, NO_BROKER):
        doc = compose(path)
        for name in ("worker", "worker-cuda"):
            service = doc["services"][name]
            env = service["environment"]
            assert "EMOTION_MQTT__PASSWORD" not in env
            assert env["EMOTION_MQTT__PASSWORD_FILE"] == "/run/secrets/mqtt_password"
            assert service["secrets"] == ["mqtt_password"]
        assert doc["secrets"]["mqtt_password"]["file"] == "./secrets/mqtt_password"


def test_no_port_is_open_to_the_lan_without_a_login():
    doc = compose(COMPOSE)
    for name, service in doc["services"].items():
        for port in service.get("ports", []):
            if str(port).startswith("127.0.0.1:"):
                continue
            # Published on every address: only the broker, and only with logins.
            assert name == "mosquitto", (name, port)
            # container path -> host path, of the bind mounts (host:container:ro)
            mounts = {c: h for h, c, _ in (v.split(":") for v in service["volumes"] if v.count(":") == 2)}
            conf = (DOCKER / mounts["/mosquitto/config/mosquitto.conf"]).resolve()
            settings = [line.split(None, 1) for line in conf.read_text().splitlines() if line and line[0] != "#"]
            values = {k: v for k, v in settings}
            assert values["allow_anonymous"] == "false"
            assert mounts[values["password_file"]] == "./secrets/mosquitto_passwd"
            assert (DOCKER / mounts[values["acl_file"]]).resolve() == REPO / "config" / "mosquitto.acl"
    assert "docker/secrets/" in (REPO / ".gitignore").read_text().splitlines()
    assert "docker/secrets/" in (REPO / ".dockerignore").read_text().splitlines()


def test_the_variant_without_a_broker_asks_for_the_brokers_address():
    doc = compose(NO_BROKER)
    assert set(doc["services"]) == {"worker", "worker-cuda"}
    for service in doc["services"].values():
        assert service["environment"]["EMOTION_MQTT__HOST"].startswith("${MQTT_HOST:?")
        assert "depends_on" not in service
        assert service["extra_hosts"] == ["host.docker.internal:host-gateway"]  # a broker on the Docker host
    # Apart from the broker, the two files run the same workers.
    full = compose(COMPOSE)["services"]
    for name, service in doc["services"].items():
        same = {k: v for k, v in service.items() if k not in ("environment", "extra_hosts")}
        assert same == {k: v for k, v in full[name].items() if k not in ("environment", "depends_on")}


def test_make_secrets_is_the_command_the_compose_file_documents():
    header = COMPOSE.read_text().split("\nname:")[0]
    (line,) = [line for line in header.splitlines() if "make-secrets.sh" in line]
    command = shlex.split(line.split(":", 1)[1])
    assert command[:3] == ["docker", "run", "--rm"] and command[-2:] == ["sh", "make-secrets.sh"]
    assert "eclipse-mosquitto:2" in command
