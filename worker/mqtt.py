"""The MQTT connection: paho-mqtt 2.x, availability, subscriptions, publishing.

paho's network thread only hands messages to ``on_frame``, which must enqueue
and return; subscriptions are made in ``on_connect`` so a reconnect renews them.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable

import paho.mqtt.client as mqtt

from worker.config import Settings
from worker.log import get_logger
from worker.topics import worker_status

ONLINE, OFFLINE = b"online", b"offline"
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


class MqttLink:
    """One client: frames in, events, errors and status out."""

    def __init__(self, settings: Settings, on_frame: Callable[..., None]):
        """``on_frame(topic, payload, received_at, reply)``: ``reply`` is (response topic, correlation data)
        when an MQTT 5 frame asked for its outcome, else None."""
        self.settings = settings
        self.on_frame = on_frame
        mq = settings.mqtt
        self.protocol = mqtt.MQTTv5 if mq.protocol == "5" else mqtt.MQTTv311
        kwargs = {} if self.protocol == mqtt.MQTTv5 else {"clean_session": True}
        self.client_id = mq.effective_client_id()
        self.client = _Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=self.protocol, **kwargs
        )
        self.client.enable_logger(None)
        # Each worker has its own availability topic, so one worker's last will cannot hide another that serves.
        self.status_topic = worker_status(settings.topics.status, self.client_id)
        self.client.will_set(self.status_topic, OFFLINE, qos=1, retain=True)
        if mq.username:
            self.client.username_pw_set(mq.username, mq.secret())
        if mq.tls.enabled:
            configure_tls(self.client, mq.tls)
        self.client.reconnect_delay_set(
            min_delay=max(1, round(mq.reconnect_min_s)), max_delay=max(1, round(mq.reconnect_max_s))
        )
        # Events published while the broker is away wait here; bounded so a long outage cannot exhaust memory.
        self.client.max_queued_messages_set(1000)
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_log = self._on_log
        self.connected = threading.Event()
        self.connections = 0
        self._accepting = True
        self._subscriptions: list[tuple[str, int]] = []  # besides the frames, in the order they were added
        # Why the last attempt failed, for the status systemd shows; None once connected.
        self.last_error: str | None = None
        # Whether the broker accepted or refused this connection; a disconnect before either is a failed attempt.
        self._in_session = self._refused = False
        self._socket_error: str | None = None  # paho's last "failed to receive" error, e.g. a TLS alert

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
        )
        self.client.connect_async(mq.host, mq.port, mq.keepalive_s)
        self.client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

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
        topics = self.settings.topics
        if self._accepting:
            client.subscribe([(f, 0) for f in topics.frames])
        if self._subscriptions:
            client.subscribe(self._subscriptions)
        client.publish(self.status_topic, ONLINE, qos=1, retain=True)
        self.connected.set()
        log.info(
            "connected" if self.connections == 1 else "reconnected",
            broker=self.where,
            subscribed=topics.frames,
            events=topics.events,
            status=self.status_topic,
        )

    def _on_connect_fail(self, client, userdata) -> None:
        exc, client.connect_error = client.connect_error, None
        error = describe_connect_error(exc, self.settings.mqtt.tls) if exc is not None else "unknown cause"
        self.last_error = error
        if isinstance(exc, ssl.SSLError):  # no retry fixes a certificate: someone must act
            log.error("TLS handshake failed, retrying", broker=self.where, error=error)
        else:
            log.warning("broker unreachable, retrying", broker=self.where, error=error)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self.connected.clear()
        in_session, refused, socket_error = self._in_session, self._refused, self._socket_error
        self._in_session = self._refused = False
        self._socket_error = None
        if not self._accepting or refused:  # a refusal was logged with its reason
            return
        if in_session:
            detail = {"error": socket_error} if socket_error else {}
            log.warning("disconnected from broker, reconnecting", broker=self.where, reason=str(reason_code), **detail)
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

    def _on_message(self, client, userdata, msg: mqtt.MQTTMessage) -> None:
        if self._accepting:
            props = getattr(msg, "properties", None)
            topic = getattr(props, "ResponseTopic", None)
            reply = (topic, getattr(props, "CorrelationData", None)) if topic else None
            self.on_frame(msg.topic, msg.payload, time.time(), reply)

    def publish_reply(self, reply: tuple[str, bytes | None], doc: dict) -> None:
        """Publish ``doc`` on a frame's reply topic (QoS 0), with its MQTT 5 correlation data if any."""
        topic, correlation = reply
        props = None
        if correlation is not None and self.protocol == mqtt.MQTTv5:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        self.client.publish(topic, json.dumps(doc, separators=(",", ":")), qos=0, properties=props)

    def subscribe(self, topic_filter: str, qos: int, callback: Callable[[str, bytes, bool], None]) -> None:
        """Also subscribe to ``topic_filter``, now and on each reconnect (all such filters in one request, in the
        order added, so the broker sends their retained messages in that order).

        ``callback(topic, payload, retained)`` runs on paho's network thread: it must only hand work on.
        """
        self._subscriptions.append((topic_filter, qos))
        self.client.message_callback_add(
            topic_filter, lambda client, userdata, msg: callback(msg.topic, msg.payload, bool(msg.retain))
        )
        if self.connected.is_set():
            self.client.subscribe(topic_filter, qos)

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=qos, retain=retain)

    def publish_json(self, topic: str, doc: dict, qos: int = 1, retain: bool = False) -> None:
        self.publish(topic, json.dumps(doc, separators=(",", ":")), qos=qos, retain=retain)

    def stop_consuming(self) -> None:
        """Unsubscribe from frames; messages already in flight are ignored."""
        self._accepting = False
        if self.connected.is_set():
            self.client.unsubscribe(self.settings.topics.frames)

    def close(self, timeout: float = 3.0) -> None:
        """Publish ``offline`` (retained), wait for pending publishes, disconnect."""
        self._accepting = False
        if self.connected.is_set():
            info = self.client.publish(self.status_topic, OFFLINE, qos=1, retain=True)
            deadline = time.monotonic() + timeout
            while not info.is_published() and time.monotonic() < deadline:
                time.sleep(0.02)
        # paho's network thread can run one more loop after the socket is closed and log
        # "Client is not connected" as an error; nothing is lost at this point.
        self.client.disable_logger()
        self.client.disconnect()
        self.client.loop_stop()
