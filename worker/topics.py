"""MQTT topic names and filters: which device a frame came from, and where each record goes.

The pipeline, the MQTT link and the command line all read topics through this module.
"""

from __future__ import annotations

import paho.mqtt.client as mqtt

from worker.frames import FrameError


def strip_share(topic_filter: str) -> str:
    """The topic filter without an MQTT 5 ``$share/<group>/`` prefix."""
    if is_shared(topic_filter):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else ""
    return topic_filter


def is_shared(topic_filter: str) -> bool:
    """Whether ``topic_filter`` is an MQTT 5 shared subscription (``$share/<group>/...``)."""
    return topic_filter.startswith("$share/")


def matches(topic_filter: str, topic: str) -> bool:
    """Whether ``topic`` matches ``topic_filter`` (``+`` and ``#`` wildcards; a ``$share/`` prefix is ignored)."""
    return mqtt.topic_matches_sub(strip_share(topic_filter), topic)


def device_level(topic_filter: str) -> int | None:
    """The index of the level of ``topic_filter`` that holds the device id (its first ``+`` or ``#``)."""
    parts = strip_share(topic_filter).split("/")
    return next((i for i, p in enumerate(parts) if p in ("+", "#")), None)


def check_frame_filter(topic_filter: str) -> str:
    """``topic_filter`` if it can name a device; a ValueError otherwise."""
    topic = strip_share(topic_filter)
    if not topic or "+" not in topic.split("/") and not topic.endswith("#"):
        raise ValueError(f"frame topic {topic_filter!r} has no '+' level for the device id")
    return topic_filter


def check_plain(topic: str) -> str:
    """``topic`` if it is a topic name one can publish to; a ValueError otherwise."""
    if not topic or "+" in topic or "#" in topic:
        raise ValueError(f"{topic!r} must be a topic name without wildcards")
    return topic


def check_publish(topic: str) -> str:
    """``topic`` if a client may publish to it: a topic name without wildcards, not a ``$`` topic (``$SYS``, brokers
    refuse those), without NUL, at most 65,535 bytes in UTF-8; a ValueError otherwise."""
    check_plain(topic)
    if topic.startswith("$"):
        raise ValueError(f"{topic!r} starts with '$': topics such as $SYS belong to the broker")
    if "\0" in topic:
        raise ValueError(f"{topic!r} contains a NUL character")
    if len(topic.encode()) > 65535:
        raise ValueError(f"topic is {len(topic.encode())} bytes long; MQTT allows 65,535")
    return topic


def device_id_for(topic: str, filters: list[str]) -> str:
    """The device id in ``topic``: the level matched by the first wildcard of the first matching filter.

    Raises :class:`FrameError` (``unknown_topic`` or ``no_device_id``).
    """
    levels = topic.split("/")
    for f in filters:
        if not matches(f, topic):
            continue
        at = device_level(f)
        device = levels[at] if at is not None and at < len(levels) else ""
        if not device:
            raise FrameError("no_device_id", f"topic {topic!r} has an empty device id level (filter {f!r})")
        return device
    raise FrameError("unknown_topic", f"topic {topic!r} matches none of the frame filters {filters}")


def frame_topic(filters: list[str], device: str) -> str:
    """The topic a camera called ``device`` publishes to: the first frame filter with its wildcard filled in."""
    parts = strip_share(filters[0]).split("/")
    at = device_level(filters[0])
    parts[at] = device
    return "/".join(parts[: at + 1] if parts[-1] == "#" else parts)


def worker_status(status: str, client_id: str) -> str:
    """The retained availability topic of one worker: ``<status>/<client id>``."""
    return f"{status}/{client_id}"


def check_device_id(device: str) -> str:
    """``device`` if it can be one level of a topic; a ValueError otherwise."""
    if not device or any(c in device for c in "/+#") or "\0" in device:
        raise ValueError(f"device id {device!r} must be a non-empty topic level without '/', '+' or '#'")
    return device


def device_topic(base: str, device: str) -> str:
    """The per-camera topic under ``base``, e.g. the retained state ``<state>/<device id>``."""
    return f"{base}/{device}"


def discovery_config(prefix: str, component: str, node_id: str, object_id: str) -> str:
    """Home Assistant's discovery topic of one entity: ``<prefix>/<component>/<node_id>/<object_id>/config``."""
    return f"{prefix}/{component}/{node_id}/{object_id}/config"


def discovery_filter(prefix: str, node_id: str) -> str:
    """The filter that matches every discovery config under ``node_id``, whatever the component and object."""
    return f"{prefix}/+/{node_id}/+/config"


def worker_stats(stats: str, client_id: str) -> str:
    """The retained statistics topic of one worker: ``<stats>/<client id>``."""
    return f"{stats}/{client_id}"
