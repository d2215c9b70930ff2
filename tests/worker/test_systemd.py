"""sd_notify over a fake NOTIFY_SOCKET: path and abstract-namespace addresses, the watchdog interval."""

from __future__ import annotations

import os
import socket

import pytest

from worker import systemd


class FakeNotifySocket:
    """A datagram socket standing in for systemd's; ``address`` is what goes into $NOTIFY_SOCKET."""

    def __init__(self, address: str):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.settimeout(5)

    def receive(self) -> str:
        return self.sock.recv(4096).decode()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def fake_systemd(tmp_path, monkeypatch):
    made = []

    def make(abstract: bool = False) -> FakeNotifySocket:
        address = f"@emotion-test-{os.getpid()}-{len(made)}" if abstract else str(tmp_path / f"notify-{len(made)}")
        made.append(FakeNotifySocket(address))
        monkeypatch.setenv("NOTIFY_SOCKET", address)
        return made[-1]

    yield make
    for s in made:
        s.close()


def test_notify_sends_one_datagram_to_a_socket_path(fake_systemd):
    fake = fake_systemd()
    assert systemd.notify("READY=1", "STATUS=serving") is True
    assert fake.receive() == "READY=1\nSTATUS=serving"


def test_notify_reaches_an_abstract_namespace_socket(fake_systemd):
    fake = fake_systemd(abstract=True)
    assert fake.address.startswith("@")
    assert systemd.notify("WATCHDOG=1") is True
    assert fake.receive() == "WATCHDOG=1"


def test_notify_does_nothing_outside_systemd(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_notify_to_a_vanished_socket_raises_oserror(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    with pytest.raises(OSError):
        systemd.notify("READY=1")


def test_watchdog_interval_is_half_of_watchdog_usec_and_only_for_this_process(monkeypatch):
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.watchdog_interval() is None
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert systemd.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert systemd.watchdog_interval() is None
