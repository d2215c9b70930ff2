"""config/emotion-worker.service: checked by `systemd-analyze verify`, and its keys read back."""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO

UNIT = REPO / "config" / "emotion-worker.service"
EXEC = "/opt/emotion-worker/.venv/bin/emotion-worker"


def service_section() -> dict[str, list[str]]:
    """[Service] keys and their values (a key may repeat)."""
    out: dict[str, list[str]] = {}
    section = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
        elif section == "[Service]":
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_finds_nothing_wrong(tmp_path):
    # verify checks that ExecStart's program exists; the installed path does not here.
    unit = tmp_path / "emotion-worker.service"
    unit.write_text(UNIT.read_text().replace(EXEC, sys.executable))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (out.stdout + out.stderr).splitlines() if "emotion-worker.service" in line]
    assert out.returncode == 0 and complaints == [], out.stdout + out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_would_catch_a_misspelt_key(tmp_path):
    unit = tmp_path / "emotion-worker.service"
    unit.write_text(UNIT.read_text().replace(EXEC, sys.executable).replace("WatchdogSec=", "WatchdogSecs="))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert "Unknown key 'WatchdogSecs'" in out.stdout + out.stderr


def test_notify_watchdog_credentials_and_hardening():
    s = service_section()
    one = {k: v[-1] for k, v in s.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    # docs/running.md: pings every 15 s, a restart 30 s after the last; a broker away for 180 s fails the start.
    assert (one["WatchdogSec"], one["TimeoutStartSec"]) == ("30", "180")
    assert one["ExecStart"].startswith(EXEC + " run ")
    # The CLI exits 2 on a configuration error: no restart loop for that.
    assert one["RestartPreventExitStatus"] == "2" and one["Restart"] == "on-failure"
    assert one["LoadCredential"].startswith("mqtt_password:")  # read as $CREDENTIALS_DIRECTORY/mqtt_password
    assert one["RuntimeDirectory"] == "emotion-worker"  # the heartbeat file's $RUNTIME_DIRECTORY
    for key, value in {
        "SystemCallFilter": "@system-service",
        "ProtectProc": "invisible",
        "UMask": "0077",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "ProtectHome": "yes",
        "PrivateTmp": "yes",
        "PrivateDevices": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert one.get(key) == value, key
    assert "AF_UNIX" in one["RestrictAddressFamilies"]  # the notify socket


def test_install_notes_do_not_name_a_python_minor_version():
    header = [line for line in UNIT.read_text().splitlines() if line.startswith("#")]
    assert any("python3 -m venv" in line for line in header)
    assert not any("python3." in line for line in header)


def test_unit_parses_as_ini():
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read_string(UNIT.read_text())
    assert parser.sections() == ["Unit", "Service", "Install"]
