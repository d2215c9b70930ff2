"""The embedded default broker of ``run --embedded-broker``: whatever MQTT broker is at hand, started when needed.

In order:

1. A broker already answering MQTT on ``broker.host:broker.port`` (Mosquitto, the Home
   Assistant add-on, ...) is used as it is.
2. Else Mosquitto, when installed, runs as a child process with a generated config
   (MQTT 5, shared subscriptions, no persistence), its output in the worker's log, and
   stops with the worker.
3. Else amqtt runs in-process (MQTT 3.1.1). A small front end reads each connection
   before amqtt does, to work around three faults of amqtt 0.12 (see :class:`AmqttBroker`).

:func:`start_broker` returns a :class:`RunningBroker` that says which broker it is and
which protocol the worker should speak to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from worker.log import get_logger

log = get_logger("emotion-worker.broker")

MOSQUITTO_FALLBACK_PATH = Path("/usr/sbin/mosquitto")  # Debian and Ubuntu put it outside a user's PATH
PROBE_TIMEOUT_S = 1.5


class BrokerError(RuntimeError):
    """No broker could be started or used; the message says why and what to do."""


EmbeddedBrokerError = BrokerError  # the name used before the broker could be Mosquitto or an existing one


@dataclass
class BrokerInfo:
    """A broker the worker connects to: ``kind`` is mosquitto, amqtt or existing; ``protocol`` "5" or "3.1.1"."""

    kind: str
    host: str
    port: int
    protocol: str
    version: str | None = None

    def describe(self) -> str:
        name = self.version or {"mosquitto": "Mosquitto", "amqtt": "amqtt"}.get(self.kind, "an MQTT broker")
        where = {"existing": "already running", "mosquitto": "child process", "amqtt": "in-process"}[self.kind]
        return f"{name} ({where}) on {self.host}:{self.port}, MQTT {self.protocol}"


# -- MQTT probing, with plain sockets so that a silent or foreign server cannot hang it -------------------------


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">H", len(raw)) + raw


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n // 128, n % 128
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _connect_packet(level: int, client_id: str) -> bytes:
    body = _string("MQTT") + bytes([level, 0x02]) + struct.pack(">H", 10)
    if level == 5:
        body += b"\x00"  # no properties
    body += _string(client_id)
    return b"\x10" + _varint(len(body)) + body


def _read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """(packet type byte, body) of the next packet; ConnectionError at EOF."""

    def exactly(n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("connection closed")
            data += chunk
        return data

    kind = exactly(1)[0]
    length, shift = 0, 0
    for _ in range(4):
        digit = exactly(1)[0]
        length |= (digit & 0x7F) << shift
        shift += 7
        if not digit & 0x80:
            break
    return kind, exactly(length)


def _try_connect(host: str, port: int, level: int, timeout: float) -> bool | None:
    """True: a CONNACK of protocol ``level`` came back (accepted or not); False: no MQTT answer; None: refused."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        return None
    except OSError:
        return False
    with sock:
        try:
            sock.settimeout(timeout)
            sock.sendall(_connect_packet(level, f"emotion-probe-{os.getpid()}"))
            kind, body = _read_packet(sock)
            if kind != 0x20:
                return False
            if level == 5:
                # An MQTT 5 CONNACK has flags, a reason code and properties; a 3.1.1 broker
                # answers a 5 CONNECT with a two-byte CONNACK (code 1) or 0x84 (unsupported version).
                ok = len(body) >= 3 and body[1] != 0x84
            else:
                ok = len(body) == 2
            if ok:
                with contextlib.suppress(OSError):
                    sock.sendall(b"\xe0\x00")
            return ok
        except (OSError, IndexError):
            return False


def probe(host: str, port: int, timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """The MQTT protocol spoken on ``host:port``: "5", "3.1.1", or None when nothing listens there.

    Raises :class:`BrokerError` when something listens but does not answer MQTT.
    """
    first = _try_connect(host, port, 5, timeout)
    if first is None:
        return None
    if first:
        return "5"
    if _try_connect(host, port, 4, timeout):
        return "3.1.1"
    raise BrokerError(
        f"{host}:{port} is taken by a program that does not answer MQTT; stop it, or give the embedded "
        "broker another port (broker.port) and the cameras that port too"
    )


def broker_version(host: str, port: int, protocol: str, timeout: float = 1.0) -> str | None:
    """What the broker says it is on ``$SYS/broker/version`` (Mosquitto does), or None within ``timeout`` s."""
    import paho.mqtt.client as mqtt

    got: list[str] = []
    done = threading.Event()
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"emotion-probe-{os.getpid()}-{time.time_ns() % 10**6}",
        protocol=mqtt.MQTTv5 if protocol == "5" else mqtt.MQTTv311,
    )

    def on_message(c, userdata, msg):
        got.append(msg.payload.decode(errors="replace"))
        done.set()

    client.on_connect = lambda c, *a: c.subscribe("$SYS/broker/version")
    client.on_message = on_message
    try:
        client.connect(host, port, 10)
    except OSError:
        return None
    client.loop_start()
    try:
        done.wait(timeout)
    finally:
        client.disconnect()
        client.loop_stop()
    return got[0].strip() if got else None


def find_mosquitto() -> str | None:
    """The Mosquitto executable: on PATH, else /usr/sbin/mosquitto; None when not installed."""
    exe = shutil.which("mosquitto")
    if exe:
        return exe
    if os.access(MOSQUITTO_FALLBACK_PATH, os.X_OK):
        return str(MOSQUITTO_FALLBACK_PATH)
    return None


def planned(kind: str, host: str, port: int) -> BrokerInfo:
    """The broker :func:`start_broker` would use now, without starting one (for ``emotion-worker config``)."""
    host = _connect_host(host)
    try:
        protocol = probe(host, port)
    except BrokerError:
        protocol = None
    if protocol is not None:
        return BrokerInfo("existing", host, port, protocol)
    if kind in ("auto", "mosquitto") and find_mosquitto():
        return BrokerInfo("mosquitto", host, port, "5")
    return BrokerInfo("amqtt", host, port, "3.1.1")


def _connect_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


class RunningBroker:
    """A broker :func:`start_broker` found or started; ``stop()`` stops it if it was started."""

    def __init__(self, info: BrokerInfo, server: MosquittoBroker | AmqttBroker | None = None):
        self.info = info
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()


def start_broker(kind: str, host: str, port: int, timeout: float = 10.0) -> RunningBroker:
    """Use the broker already on ``host:port``, else start one (``kind``: auto, mosquitto or amqtt).

    ``host`` is the address to listen on; the returned info has the address to connect to.
    Raises :class:`BrokerError` naming the problem and what to do about it.
    """
    where = _connect_host(host)
    protocol = probe(where, port) if port else None
    if protocol is not None:
        info = BrokerInfo("existing", where, port, protocol, broker_version(where, port, protocol))
        return RunningBroker(info)
    exe = find_mosquitto() if kind in ("auto", "mosquitto") else None
    if kind == "mosquitto" and exe is None:
        raise BrokerError(
            "broker.kind is 'mosquitto' but Mosquitto is not installed "
            "(apt install mosquitto; or set broker.kind to 'auto' or 'amqtt')"
        )
    if exe is not None:
        server: MosquittoBroker | AmqttBroker = MosquittoBroker(exe, host, port)
        server.start(timeout)
        return RunningBroker(BrokerInfo("mosquitto", where, server.port, server.protocol, server.version), server)
    server = AmqttBroker(host, port)
    server.start(timeout)
    return RunningBroker(BrokerInfo("amqtt", where, server.port, "3.1.1", f"amqtt {_amqtt_version()}"), server)


def _amqtt_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("amqtt")
    except PackageNotFoundError:
        return "?"


# -- Mosquitto as a child process ------------------------------------------------------------------------------


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    # The worker blocks SIGTERM and SIGINT in every thread (worker.signals); a child inherits
    # the mask, and Mosquitto must be stoppable. On Linux it also goes when the worker dies.
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    if _prctl is not None:
        _prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _load_prctl():
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_prctl = _load_prctl()


class MosquittoBroker:
    """Mosquitto as a child process on ``host:port`` with a generated config; its output goes to the log."""

    def __init__(self, exe: str, host: str, port: int):
        self.exe, self.host, self.port = exe, host, port
        self.version: str | None = None
        self.protocol: str | None = None
        self.proc: subprocess.Popen | None = None
        self._dir: tempfile.TemporaryDirectory | None = None
        self._reader: threading.Thread | None = None
        self._output: list[str] = []

    def config_text(self) -> str:
        # Started as root, Mosquitto switches to the mosquitto user, and Linux then forgets the
        # parent-death signal that stops it with a killed worker: it stays with the worker's user.
        user = "user root\n" if os.geteuid() == 0 else ""
        return (
            "# Generated by emotion-worker for `run --embedded-broker`; removed once Mosquitto has read it.\n"
            f"{user}"
            f"listener {self.port} {self.host}\n"
            "allow_anonymous true\n"
            "persistence false\n"
            "log_dest stdout\n"
            "log_type error\n"
            "log_type warning\n"
            "log_timestamp false\n"
        )

    def start(self, timeout: float = 10.0) -> None:
        if self.port == 0:
            self.port = _free_port(self.host)
        self._dir = tempfile.TemporaryDirectory(prefix="emotion-mosquitto-")
        conf = Path(self._dir.name) / "mosquitto.conf"
        conf.write_text(self.config_text())
        self.proc = subprocess.Popen(
            [self.exe, "-c", str(conf)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=_child_setup,
            start_new_session=True,  # Ctrl-C goes to the worker, which stops Mosquitto after its 'offline'
        )
        self._reader = threading.Thread(target=self._pump, name="mosquitto-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        where = _connect_host(self.host)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._reader.join(2)
                output = " / ".join(self._output[-5:]) or "no output"
                self._cleanup()
                raise BrokerError(
                    f"Mosquitto ({self.exe}) could not listen on {self.host}:{self.port}: {output}; "
                    "give the embedded broker another port (broker.port)"
                )
            try:
                self.protocol = probe(where, self.port, 0.5)
            except BrokerError:  # listening, not answering yet
                self.protocol = None
            if self.protocol:  # "5", or "3.1.1" from a Mosquitto older than 1.6
                self.version = broker_version(where, self.port, self.protocol) or "Mosquitto"
                # Read once at start (no SIGHUP reaches it in its own session): removed now, so
                # a killed worker leaves no file behind.
                self._dir.cleanup()
                self._dir = None
                return
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"Mosquitto ({self.exe}) did not answer on {self.host}:{self.port} within {timeout:.0f} s")

    def _pump(self) -> None:
        blog = get_logger("mosquitto")
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            if line:
                self._output.append(line)
                del self._output[:-20]
                blog.warning(line)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout)
        self._cleanup()

    def _cleanup(self) -> None:
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# -- amqtt, with a front end ----------------------------------------------------------------------------------

MQTT5_UNSUPPORTED_CONNACK = b"\x20\x03\x00\x84\x00"  # MQTT 5 CONNACK: reason 0x84, unsupported protocol version
CONNECT_TIMEOUT_S = 10.0
SETTLE_TIMEOUT_S = 2.0


class _PacketReader:
    """amqtt's reader for one connection: whole MQTT packets, held back at the end until amqtt has taken the rest.

    amqtt 0.12 reads each packet in one task and hands it to a new task; at end of
    stream it cancels those tasks that have not run yet. When a PUBLISH, a DISCONNECT
    and the end of stream are all buffered, as happens when a client connects,
    publishes and disconnects, the reader task gets to the end without ever letting
    the PUBLISH task run (``asyncio.wait_for`` no longer yields on Python 3.12, nor on
    3.11 with keep-alive 0), and the message is lost without a word. A frame larger
    than one loopback segment (64 KiB) arrives in pieces, so it is the one whose tail,
    DISCONNECT and end of stream are buffered together. Before a DISCONNECT or the end
    of stream this reader waits until amqtt has queued and taken every message of the
    connection, so the session's last messages are broadcast before it closes.
    """

    def __init__(self, stream: asyncio.StreamReader, first: bytes, undelivered):
        self._stream = stream
        self._buf = bytearray(first)
        self._task: asyncio.Future | None = None
        self._undelivered = undelivered

    async def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            if self._task is None:
                self._task = asyncio.ensure_future(self._next_packet())
            # Shielded: amqtt times a read out at the keep-alive; a packet half read must not be lost.
            packet = await asyncio.shield(self._task)
            self._task = None
            if not packet:
                break
            self._buf += packet
        size = len(self._buf) if n < 0 else min(n, len(self._buf))
        data = bytes(self._buf[:size])
        del self._buf[:size]
        return data

    def feed_eof(self) -> None:
        self._stream.feed_eof()

    async def _next_packet(self) -> bytes:
        try:
            head = await self._stream.readexactly(1)
            length, raw_len = 0, bytearray()
            for i in range(4):
                digit = (await self._stream.readexactly(1))[0]
                raw_len.append(digit)
                length |= (digit & 0x7F) << (7 * i)
                if not digit & 0x80:
                    break
            body = await self._stream.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            await self._settle()
            return b""
        if head[0] & 0xF0 == 0xE0:  # DISCONNECT
            await self._settle()
        return head + bytes(raw_len) + body

    async def _settle(self) -> None:
        await asyncio.sleep(0)  # the tasks amqtt made for the packets before this one run now
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while self._undelivered(self) and time.monotonic() < deadline:
            await asyncio.sleep(0.002)


def _patched_broker_class():
    from amqtt.broker import Broker

    class FixedBroker(Broker):
        """amqtt's Broker, sending retained messages only for the client's own subscriptions.

        amqtt 0.12 sends a newly connected client the retained messages matching every
        topic filter that any client subscribed to, before it has subscribed itself, then
        again for its own subscription: `watch` printed the worker's status two or three times.
        """

        async def _publish_retained_messages_for_subscription(self, subscription, session) -> None:
            subscribers = self._subscriptions.get(subscription[0], [])
            if any(s.client_id == session.client_id for s, _ in subscribers):
                await super()._publish_retained_messages_for_subscription(subscription, session)

    return FixedBroker


class AmqttBroker:
    """amqtt (MQTT 3.1.1) on its own event loop in a daemon thread, behind a front end that reads each connection.

    The front end
    - answers an MQTT 5 CONNECT with an MQTT 5 CONNACK "unsupported protocol version"
      at once (amqtt misreads it as 3.1.1, the client hangs and amqtt logs
      ``OSError(107)`` at error level), so MQTT 5 clients can fall back to 3.1.1;
    - closes connections that never send a CONNECT (port probes) without an error log;
    - keeps the last messages of a connect-publish-disconnect client (:class:`_PacketReader`).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 1883):
        self.host, self.port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="embedded-broker", daemon=True)
        self._broker = None
        self._server: asyncio.base_events.Server | None = None

    def start(self, timeout: float = 10.0) -> None:
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {"default": {"type": "external", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._thread.start()

        async def start() -> None:
            self._broker = _patched_broker_class()(config)
            await self._broker.start()
            self._server = await asyncio.start_server(self._connected, self.host, self.port, reuse_address=True)
            self.port = self._server.sockets[0].getsockname()[1]

        try:
            asyncio.run_coroutine_threadsafe(start(), self._loop).result(timeout)
        except Exception as exc:
            self._loop.call_soon_threadsafe(self._loop.stop)
            raise BrokerError(
                f"embedded broker could not listen on {self.host}:{self.port}: {exc}; "
                "give it another port (broker.port)"
            ) from None

    def _undelivered(self, reader: _PacketReader) -> int:
        for session, handler in list(self._broker._sessions.values()):
            if handler.reader is reader:
                return session.delivered_message_queue.qsize()
        return 0

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from amqtt.adapters import StreamWriterAdapter

        try:
            first = await asyncio.wait_for(_read_connect(reader), CONNECT_TIMEOUT_S)
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, ValueError):
            first = None
        if first is None:
            writer.close()
            return
        if first[1] == 5:
            # Info, not warning: publish and watch try MQTT 5 first and then fall back.
            log.info(
                "refused an MQTT 5 client: the amqtt broker speaks MQTT 3.1.1 only; "
                "connect with MQTT 3.1.1, or install Mosquitto for MQTT 5",
                peer=str(writer.get_extra_info("peername")),
            )
            with contextlib.suppress(ConnectionError):
                writer.write(MQTT5_UNSUPPORTED_CONNACK)
                await writer.drain()
            writer.close()
            return
        try:
            await self._broker.external_connected(
                _PacketReader(reader, first[0], self._undelivered), StreamWriterAdapter(writer), "default"
            )
        except OSError as exc:  # the client went away; amqtt has cleaned up its session
            log.debug("client connection ended", error=repr(exc))

    def stop(self, timeout: float = 5.0) -> None:
        async def stop() -> None:
            if self._server is not None:
                self._server.close()
            if self._broker is not None:
                await self._broker.shutdown()

        if self._thread.is_alive():
            with contextlib.suppress(Exception):  # shutting down anyway; nothing left to save
                asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)


EmbeddedBroker = AmqttBroker


async def _read_connect(reader: asyncio.StreamReader) -> tuple[bytes, int] | None:
    """The first packet (a CONNECT) as bytes, and its protocol level; None if it is not a CONNECT."""
    head = await reader.readexactly(1)
    if head[0] & 0xF0 != 0x10:
        return None
    length, raw_len = 0, bytearray()
    for i in range(4):
        digit = (await reader.readexactly(1))[0]
        raw_len.append(digit)
        length |= (digit & 0x7F) << (7 * i)
        if not digit & 0x80:
            break
    if length > 65536 + 1024:  # client id, will, user name and password: a CONNECT is small
        raise ValueError("CONNECT too large")
    body = await reader.readexactly(length)
    name_len = struct.unpack(">H", body[:2])[0] if len(body) >= 2 else 0
    level = body[2 + name_len] if len(body) > 2 + name_len else 0
    return head + bytes(raw_len) + body, level
