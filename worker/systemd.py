"""systemd's notify protocol: READY, STATUS, WATCHDOG and STOPPING datagrams on ``$NOTIFY_SOCKET``.

A few lines of the protocol (sd_notify(3)) instead of a C binding. Outside systemd
``NOTIFY_SOCKET`` is unset and every call does nothing.
"""

from __future__ import annotations

import os
import socket


def notify_socket() -> str | None:
    """The socket address systemd gave (``$NOTIFY_SOCKET``), as ``connect`` takes it; None outside systemd.

    An address starting with '@' is in the abstract namespace: its first byte is a NUL.
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return None
    return "\0" + address[1:] if address.startswith("@") else address


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. ``"READY=1"``, ``"STATUS=serving"``) as one datagram.

    Returns False outside systemd; an unreachable socket raises OSError.
    """
    address = notify_socket()
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall("\n".join(lines).encode())
    return True


def watchdog_interval() -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``$WATCHDOG_USEC``), or None when no watchdog is set for us.

    ``$WATCHDOG_PID``, when set, names the process the watchdog is for.
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 1e6 / 2
