"""The MQTT connection: paho-mqtt 2.x, availability, a persistent session, checked publishing.

paho's network thread only hands messages to ``on_frame``, which must enqueue and return;
subscriptions are made in ``on_connect`` so a reconnect renews them.

Nothing is lost without a word. Every publish's result is checked. While the broker is away,
messages wait in the outage queue (``mqtt.queue_size``; when it is full the oldest goes),
retained ones apart, the last one per topic, never dropped. On every (re)connect ``online`` goes
out first, then what waited. A broker's refusal (the MQTT 5 PUBACK reason code, e.g. "Not
authorized") is logged and counted by topic, like every other loss (:meth:`Stats.publish_dropped`).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from worker.config import Settings
from worker.log import Throttled, get_logger
from worker.stats import Stats
from worker.topics import is_shared, worker_status

ONLINE, OFFLINE = b"online", b"offline"
DEFAULT_SESSION_EXPIRY_S = 3600
SESSION_TAKEN_OVER = 0x8E  # MQTT 5 DISCONNECT reason code
# Brokers that close a taken-over connection without saying why (Mosquitto before 2.0.15, MQTT 3.1.1):
# this many connections in a row that the broker closed within SHORT_LIVED_S of their start.
SHORT_LIVED_S, SHORT_LIVED_IN_A_ROW = 10.0, 3
log = get_logger("emotion-worker.mqtt")


def configure_tls(client: mqtt.Client, tls) -> None:
    """Apply the ``mqtt.tls`` settings; a missing or unreadable file is a ValueError naming the key."""
    for key in ("ca_certs", "certfile", "keyfile"):
        path = getattr(tls, key)
        if path is not None and not path.is_file():
            raise ValueError(f"mqtt.tls.{key}: {path} does not exist")
    try:
        client.tls_set(
            ca_certs=str(tls.ca_certs) if tls.ca_certs else None,
            certfile=str(tls.certfile) if tls.certfile else None,
            keyfile=str(tls.keyfile) if tls.keyfile else None,
        )
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"mqtt.tls: the certificate files could not be used: {exc}") from None
    client.tls_insecure_set(tls.insecure)


def describe_connect_error(exc: BaseException, tls=None) -> str:
    """Why a connection attempt failed, in words that point at the cause (and the setting to check)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = (
            "the broker's certificate does not match its address; connect by a name the certificate holds"
            if "hostname" in str(exc.verify_message).lower() or "ip address mismatch" in str(exc.verify_message).lower()
            else "is mqtt.tls.ca_certs the CA that signed the broker's certificate?"
        )
        return f"TLS handshake failed: certificate verify failed: {exc.verify_message} ({hint})"
    if isinstance(exc, ssl.SSLError):
        reason = exc.reason or str(exc)
        if reason == "WRONG_VERSION_NUMBER":
            return "TLS handshake failed: the broker did not answer in TLS (is this port a TLS listener?)"
        return f"TLS handshake failed: {reason.lower().replace('_', ' ')}"
    if isinstance(exc, ConnectionResetError) and tls is not None and tls.enabled:
        return "broker closed the connection during the TLS handshake (is this port a TLS listener?)"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused: nothing listens on that port"
    if isinstance(exc, socket.gaierror):
        return f"host name not found: {exc.strerror}"
    if isinstance(exc, TimeoutError):
        return "timed out: no answer from that address"
    return f"{type(exc).__name__}: {exc}"


def describe_tls_alert(error: str) -> str:
    """A TLS alert the broker sent while the connection was being set up (paho's socket error text)."""
    if "CERTIFICATE_REQUIRED" in error:
        cause = "the broker requires a client certificate (mqtt.tls.certfile, mqtt.tls.keyfile)"
    elif any(code in error for code in ("UNKNOWN_CA", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR")):
        cause = "the broker does not trust the client certificate (mqtt.tls.certfile)"
    else:
        cause = "the broker ended the handshake"
    detail = error.split("] ", 1)[-1].split(" (_ssl.c", 1)[0]
    return f"TLS handshake failed: {cause}: {detail}"


def describe_refusal(reason: str) -> str:
    """A CONNACK refusal, with the settings to check for the usual ones."""
    lowered = reason.lower()
    if "not authorized" in lowered or "bad user name or password" in lowered:
        return (
            f"{reason}: check mqtt.username and the password "
            "(mqtt.password, mqtt.password_file or the credential mqtt_password)"
        )
    if "identifier" in lowered:
        return f"{reason}: check mqtt.client_id"
    return reason


class _Client(mqtt.Client):
    """paho's client, keeping the exception of the last failed connection attempt.

    paho's background loop swallows it and only calls ``on_connect_fail``; the worker's log must say why.
    """

    connect_error: BaseException | None = None

    def reconnect(self):
        try:
            return super().reconnect()
        except Exception as exc:
            self.connect_error = exc
            raise


def session_expiry_s(settings: Settings) -> int:
    """The session expiry the worker asks the broker for, in seconds.

    ``mqtt.session_expiry_s`` when set; else 0 when a frames filter is a ``$share/`` group (Mosquitto
    keeps sending an absent member with a kept session its share of the frames, which the group's
    other members then never see), else :data:`DEFAULT_SESSION_EXPIRY_S`.
    """
    if settings.mqtt.session_expiry_s is not None:
        return settings.mqtt.session_expiry_s
    return 0 if any(is_shared(f) for f in settings.topics.frames) else DEFAULT_SESSION_EXPIRY_S


@dataclass(slots=True)
class Outgoing:
    topic: str
    payload: bytes
    qos: int
    retain: bool


class MqttLink:
    """One client: frames in, events, errors and status out."""

    def __init__(self, settings: Settings, on_frame: Callable[..., None], stats: Stats | None = None):
        """``on_frame(topic, payload, received_at, reply)``: ``reply`` is (response topic, correlation data)
        when an MQTT 5 frame asked for its outcome, else None."""
        self.settings = settings
        self.on_frame = on_frame
        self.stats = stats if stats is not None else Stats()
        mq = settings.mqtt
        self.protocol = mqtt.MQTTv5 if mq.protocol == "5" else mqtt.MQTTv311
        self.session_expiry_s = session_expiry_s(settings)
        self.persistent = self.session_expiry_s > 0
        kwargs = {} if self.protocol == mqtt.MQTTv5 else {"clean_session": not self.persistent}
        self.client_id = mq.effective_client_id()
        # Frames are acknowledged once the pipeline has them, so the ones that arrive while the worker
        # stops stay with the broker, which delivers them again to the next start (persistent session).
        self.client = _Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=self.protocol,
            manual_ack=True,
            **kwargs,
        )
        self.client.enable_logger(None)
        # Each worker has its own availability topic, so one worker's last will cannot hide another that serves.
        self.status_topic = worker_status(settings.topics.status, self.client_id)
        self.client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        if mq.username:
            self.client.username_pw_set(mq.username, mq.secret())
        if mq.tls.enabled:
            configure_tls(self.client, mq.tls)
        self._delays = (max(1, round(mq.reconnect_min_s)), max(1, round(mq.reconnect_max_s)))
        self.client.reconnect_delay_set(*self._delays)
        # paho's own queue stays unbounded: the outage queue below is the bound, and `online` must never
        # be refused behind it.
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_log = self._on_log
        self.connected = threading.Event()
        self.connections = 0
        self.left_at_stop = 0  # frames that arrived after stop_consuming, not acknowledged
        self._accepting = True
        self._subscriptions: list[tuple[str, int]] = []  # besides the frames, in the order they were added
        # Why the last attempt failed, for the status systemd shows; None once connected.
        self.last_error: str | None = None
        # Whether the broker accepted or refused this connection; a disconnect before either is a failed attempt.
        self._in_session = self._refused = False
        self._socket_error: str | None = None  # paho's last "failed to receive" error, e.g. a TLS alert
        self._taken_over = False
        self._connected_at = 0.0  # monotonic
        self._short_lived = 0  # connections in a row that the broker closed soon after they were made
        # The outage queue: guarded by _lock, which is held while handing messages to paho, so a flush
        # after a reconnect and new publishes keep their order.
        self._lock = threading.Lock()
        self._ready = False  # connected and the outage queue flushed
        self._held: deque[Outgoing] = deque()
        self._held_retained: dict[str, Outgoing] = {}
        # Messages handed to paho and not yet acknowledged (QoS 1) or written (QoS 0), by message id.
        # _mid_lock is never held while calling paho: paho calls on_publish holding its own lock.
        self._mid_lock = threading.Lock()
        self._pending: dict[int, Outgoing] = {}
        self._early: dict[int, mqtt.ReasonCode] = {}  # answers that came before publish() returned
        self._online_mid: int | None = None  # the `online` of the current connection
        self._online_answered = threading.Event()
        self._lost_log = {
            "queue_full": Throttled(
                log, "outage queue full, dropping the oldest messages", loss="queue_full", queue_size=mq.queue_size
            ),
            "refused": Throttled(log, "broker refused messages", level="error", loss="refused"),
            "publish_error": Throttled(log, "messages could not be published", level="error", loss="publish_error"),
            "connection_lost": Throttled(log, "QoS 0 messages lost with the connection", loss="connection_lost"),
            "shutdown": Throttled(
                log, "messages still waiting for the broker at shutdown were lost", level="error", loss="shutdown"
            ),
        }

    @property
    def where(self) -> str:
        return f"{self.settings.mqtt.host}:{self.settings.mqtt.port}"

    def start(self) -> None:
        """Connect in the background; paho retries with backoff until the broker answers."""
        mq = self.settings.mqtt
        log.info(
            "connecting",
            broker=self.where,
            protocol=f"MQTT {mq.protocol}",
            tls=mq.tls.enabled,
            client_id=self.client_id,
            session_expiry_s=self.session_expiry_s,
            queue_size=mq.queue_size,
        )
        kwargs = {}
        if self.protocol == mqtt.MQTTv5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry_s
            kwargs = {"clean_start": not self.persistent, "properties": props}
        self.client.connect_async(mq.host, mq.port, mq.keepalive_s, **kwargs)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        """Wait until connected, ``online`` published and what waited during an outage sent; False after ``timeout`` s."""
        return self.connected.wait(timeout)

    # -- publishing ---------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Send ``payload`` to ``topic``, or keep it in the outage queue while the broker is away.

        Never raises for a message that is lost: it is counted in the stats and logged.
        """
        msg = Outgoing(topic, payload, qos, retain)
        with self._lock:
            if self._ready:
                self._send(msg)
            else:
                self._hold(msg)

    def publish_json(self, topic: str, doc: dict, qos: int = 1, retain: bool = False) -> None:
        self.publish(topic, json.dumps(doc, separators=(",", ":")).encode(), qos, retain)

    def _send(self, msg: Outgoing) -> int | None:
        """Hand ``msg`` to paho and check the result; call with ``_lock`` held. Returns the message id."""
        info = self.client.publish(msg.topic, msg.payload, qos=msg.qos, retain=msg.retain)
        if info.rc == mqtt.MQTT_ERR_NO_CONN and msg.qos == 0:
            self._hold(msg)  # the connection went before paho noticed; paho keeps only QoS 1 for the next one
            return None
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):  # NO_CONN: paho sends QoS 1 later
            self._lost("publish_error", msg.topic, error=mqtt.error_string(info.rc))
            return None
        with self._mid_lock:
            answer = self._early.pop(info.mid, None)
            if answer is None:
                self._pending[info.mid] = msg
        if answer is not None and answer.is_failure:
            self._lost("refused", msg.topic, reason=str(answer))
        return info.mid

    def _hold(self, msg: Outgoing) -> None:
        """Keep ``msg`` until the broker is back; call with ``_lock`` held."""
        if msg.retain:
            self._held_retained[msg.topic] = msg  # a newer value replaces an older one, as the broker would
            return
        if len(self._held) >= self.settings.mqtt.queue_size:
            # The oldest goes: after an outage, the newest events say more about what is happening now.
            dropped = self._held.popleft() if self._held else msg
            self._lost("queue_full", dropped.topic)
            if dropped is msg:
                return
        self._held.append(msg)

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        if mid == self._online_mid:
            self._online_answered.set()
        with self._mid_lock:
            msg = self._pending.pop(mid, None)
            if msg is None:
                self._early[mid] = reason_code
                return
        if reason_code.is_failure:
            self._lost("refused", msg.topic, reason=str(reason_code))

    def _lost(self, loss: str, topic: str, n: int = 1, **fields) -> None:
        self.stats.publish_dropped(topic, n, reason=loss)
        self._lost_log[loss](topic, n, **fields)

    @property
    def held(self) -> int:
        """Messages waiting in the outage queue, retained ones included."""
        with self._lock:
            return len(self._held) + len(self._held_retained)

    @property
    def unacknowledged(self) -> int:
        """Messages handed to the client and not yet acknowledged by the broker (QoS 1) or written (QoS 0)."""
        with self._mid_lock:
            return len(self._pending)

    # -- connection ---------------------------------------------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:
            self._refused = True
            self.last_error = f"broker refused the connection: {describe_refusal(str(reason_code))}"
            log.error(
                "broker refused the connection, retrying", broker=self.where, error=describe_refusal(str(reason_code))
            )
            return
        self._in_session = True
        self.last_error = None
        self.connections += 1
        self._connected_at = time.monotonic()
        if self._taken_over:
            self._taken_over = False
            client.reconnect_delay_set(*self._delays)
        topics = self.settings.topics
        with self._lock:
            self._forget_unwritten_qos0()
            # Subscribed before `online`, so a client that sees `online` knows frames will be taken.
            if self._accepting:
                client.subscribe([(f, 1) for f in topics.frames])
            if self._subscriptions:  # in one request, before `online`: see subscribe()
                client.subscribe(self._subscriptions)
            # Then availability, before any message: the last will may already have said offline, and
            # nothing that waited in the outage queue may hold `online` back.
            self._online_answered.clear()
            self._online_mid = self._send(Outgoing(self.status_topic, ONLINE, 1, True))
            if self._online_mid is None:  # refused by paho itself: no answer will come
                self._online_answered.set()
        threading.Thread(
            target=self._send_waiting, args=(self.connections,), name="mqtt-after-outage", daemon=True
        ).start()
        log.info(
            "connected" if self.connections == 1 else "reconnected",
            broker=self.where,
            subscribed=topics.frames,
            events=topics.events,
            status=self.status_topic,
            session_present=flags.session_present,
        )
        if self.persistent and not flags.session_present and self.connections > 1:
            log.warning(
                "the broker kept no session for this worker: frames published while it was away are lost",
                broker=self.where,
                client_id=self.client_id,
            )

    def _send_waiting(self, connection: int) -> None:
        """Send what waited in the outage queue once the broker has answered `online`.

        By then paho has sent again what the last connection left unacknowledged (it does so right
        after ``on_connect``), so an older retained value can never land after a newer one.
        """
        if not self._online_answered.wait(2 * self.settings.mqtt.keepalive_s):
            return  # this connection went too; the next one sends them
        with self._lock:
            if connection != self.connections or not self.client.is_connected():
                return
            waiting = [*self._held_retained.values(), *self._held]
            self._held_retained.clear()
            self._held.clear()
            for msg in waiting:
                self._send(msg)
            self._ready = True
        self.connected.set()
        for throttle in self._lost_log.values():
            throttle.flush()
        if waiting:
            log.info("sent what waited for the broker", messages=len(waiting), broker=self.where)

    def _forget_unwritten_qos0(self) -> None:
        """Count as lost the QoS 0 messages paho had not written when the last connection dropped."""
        with self._mid_lock:
            gone = [mid for mid, msg in self._pending.items() if msg.qos == 0]
            lost = [self._pending.pop(mid) for mid in gone]
        for msg in lost:
            self._lost("connection_lost", msg.topic)

    def _on_connect_fail(self, client, userdata) -> None:
        exc, client.connect_error = client.connect_error, None
        error = describe_connect_error(exc, self.settings.mqtt.tls) if exc is not None else "unknown cause"
        self.last_error = error
        if isinstance(exc, ssl.SSLError):  # no retry fixes a certificate: someone must act
            log.error("TLS handshake failed, retrying", broker=self.where, error=error)
        else:
            log.warning("broker unreachable, retrying", broker=self.where, error=error)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        # No _lock here: paho may call this while holding its message lock, which _lock's holders wait for.
        self._ready = False
        self.connected.clear()
        in_session, refused, socket_error = self._in_session, self._refused, self._socket_error
        self._in_session = self._refused = False
        self._socket_error = None
        if not self._accepting or refused:  # stopping, or a refusal that was logged with its reason
            return
        if in_session:
            lived = time.monotonic() - self._connected_at
            self._short_lived = self._short_lived + 1 if lived < SHORT_LIVED_S else 0
            if reason_code == SESSION_TAKEN_OVER:
                self._client_id_conflict(
                    "another client connected with this worker's client id and took its session over; "
                    "give each worker its own mqtt.client_id"
                )
            elif self._short_lived >= SHORT_LIVED_IN_A_ROW and not self._taken_over:
                self._client_id_conflict(
                    f"the broker closed the connection soon after it was made, {self._short_lived} times in a row: "
                    "another client probably uses this worker's client id (give each worker its own "
                    "mqtt.client_id), or the broker refuses something; its log says which",
                    connection_lived_s=round(lived, 2),
                )
            else:
                detail = {"error": socket_error} if socket_error else {}
                log.warning(
                    "disconnected from broker, reconnecting", broker=self.where, reason=str(reason_code), **detail
                )
        elif socket_error and "SSL" in socket_error:
            self.last_error = describe_tls_alert(socket_error)
            log.error("TLS handshake failed, retrying", broker=self.where, error=self.last_error)
        else:
            # The broker hung up before accepting the connection: most often TLS it wanted, or a client
            # certificate it did not get or did not trust. Its own log says which.
            tls = self.settings.mqtt.tls
            if not tls.enabled:
                cause = "does this port require TLS (mqtt.tls.enabled)?"
            elif tls.certfile is None:
                cause = "does it require a client certificate (mqtt.tls.certfile, mqtt.tls.keyfile)?"
            else:
                cause = "did it reject the client certificate (mqtt.tls.certfile)?"
            self.last_error = f"the broker closed the connection before accepting it: {cause}"
            log.error(
                "broker closed the connection before accepting it, retrying", broker=self.where, error=self.last_error
            )

    def _on_log(self, client, userdata, level, buf: str) -> None:
        if level == mqtt.MQTT_LOG_ERR and buf.startswith("failed to receive on socket: "):
            self._socket_error = buf[len("failed to receive on socket: ") :]

    def _client_id_conflict(self, message: str, **fields) -> None:
        # Reconnecting at once would take the session back and start a tug of war; wait the longest delay.
        self._taken_over = True
        self.stats.add("client_id_conflicts")
        self.client.reconnect_delay_set(self._delays[1], self._delays[1])
        log.error(message, client_id=self.client_id, broker=self.where, retry_in_s=self._delays[1], **fields)

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if not self._accepting:
            self.left_at_stop += 1  # not acknowledged: a kept session delivers it again at the next start
            self.stats.add("left_at_stop")
            return
        props = getattr(msg, "properties", None)
        reply_topic = getattr(props, "ResponseTopic", None)
        reply = (reply_topic, getattr(props, "CorrelationData", None)) if reply_topic else None
        try:
            self.on_frame(msg.topic, msg.payload, time.time(), reply)
        except Exception:  # an exception here would end paho's network thread
            log.exception("frame could not be queued", topic=msg.topic)
            self.stats.add("internal_errors")
        client.ack(msg.mid, msg.qos)

    def publish_reply(self, reply: tuple[str, bytes | None], doc: dict) -> None:
        """Publish ``doc`` on a frame's reply topic (QoS 0), with its MQTT 5 correlation data if any."""
        topic, correlation = reply
        props = None
        if correlation is not None and self.protocol == mqtt.MQTTv5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        info = self.client.publish(topic, json.dumps(doc, separators=(",", ":")), qos=0, properties=props)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self._lost("publish_error", topic, error=mqtt.error_string(info.rc))

    def subscribe(self, topic_filter: str, qos: int, callback: Callable[[str, bytes, bool], None]) -> None:
        """Also subscribe to ``topic_filter``, now and on each reconnect (all such filters in one request, in the
        order added, so the broker sends their retained messages in that order).

        ``callback(topic, payload, retained)`` runs on paho's network thread: it must only hand work on.
        """
        self._subscriptions.append((topic_filter, qos))

        def on_message(client, userdata, msg: mqtt.MQTTMessage) -> None:
            try:
                callback(msg.topic, msg.payload, bool(msg.retain))
            except Exception:  # an exception here would end paho's network thread
                log.exception("message could not be handed on", topic=msg.topic)
                self.stats.add("internal_errors")
            client.ack(msg.mid, msg.qos)  # acknowledged by hand, as every message here (manual_ack)

        self.client.message_callback_add(topic_filter, on_message)
        if self.connected.is_set():
            self.client.subscribe(topic_filter, qos)

    # -- stopping -----------------------------------------------------------------------------------
    def stop_consuming(self) -> None:
        """Take no more frames. A kept session stays subscribed, so frames wait at the broker for the next start."""
        self._accepting = False
        if self.connected.is_set() and not self.persistent:
            self.client.unsubscribe(self.settings.topics.frames)

    def close(self, timeout: float = 3.0) -> None:
        """Publish ``offline`` (retained), wait up to ``timeout`` s for pending publishes, disconnect.

        What still waits then (the broker is away or slow) is counted and logged as lost.
        """
        self._accepting = False
        with self._lock:
            if self.client.is_connected():  # straight to paho: `offline` never waits behind the outage queue
                self._send(Outgoing(self.status_topic, OFFLINE, 1, True))
        deadline = time.monotonic() + timeout
        while self.unacknowledged and self.client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.02)
        with self._lock:
            self._ready = False
            waiting = [*self._held_retained.values(), *self._held]
            self._held_retained.clear()
            self._held.clear()
        with self._mid_lock:
            waiting += self._pending.values()
            self._pending.clear()
        for msg in waiting:
            self._lost("shutdown", msg.topic)
        for throttle in self._lost_log.values():
            throttle.flush()
        if self.left_at_stop:
            log.info(
                "frames that arrived while stopping were left with the broker",
                frames=self.left_at_stop,
                redelivered_at_next_start=self.persistent,
            )
        # paho's network thread can run one more loop after the socket is closed and log
        # "Client is not connected" as an error; nothing is lost at this point.
        self.client.disable_logger()
        self.client.disconnect()
        self.client.loop_stop()
