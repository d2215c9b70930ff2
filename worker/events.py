"""Emotion events and error records: what the worker publishes, in the shape of ``schemas/``."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # types only: the rules and the CLI use this module without loading OpenCV or torch
    from worker.faces import Box
    from worker.frames import Frame
    from worker.model import ModelInfo

SCHEMA_VERSION = 1
SCHEMAS = Path(__file__).parent / "schemas"
EVENT_SCHEMA = SCHEMAS / "event.schema.json"
ERROR_SCHEMA = SCHEMAS / "error.schema.json"
OUTCOME_SCHEMA = SCHEMAS / "outcome.schema.json"
SKIPPED = ("no_face", "stale", "dropped")  # outcomes that give neither an event nor an error record


def iso(ts: float) -> str:
    """Unix seconds as ISO 8601 UTC with milliseconds, e.g. ``2026-11-27T22:14:05.123Z``."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def face_record(box: Box, probs: list[float], classes: tuple[str, ...]) -> dict:
    """One face of an event: box [x, y, w, h] in frame pixels, top emotion, its probability, all scores."""
    best = max(range(len(classes)), key=lambda i: probs[i])
    total = sum(probs) or 1.0
    return {
        "box": [box.x, box.y, box.w, box.h],
        "emotion": classes[best],
        "confidence": round(probs[best] / total, 4),
        "scores": {c: round(p / total, 4) for c, p in zip(classes, probs)},
    }


def make_event(frame: Frame, faces: list[dict], info: ModelInfo, processed_at: float) -> dict:
    """The event for ``frame``; ``faces`` from :func:`face_record`, largest first."""
    event = {
        "schema": SCHEMA_VERSION,
        "event_id": uuid.uuid4().hex,
        "device_id": frame.device_id,
        "frame_id": frame.frame_id,
        "captured_at": iso(frame.timestamp),
        "processed_at": iso(processed_at),
        "latency_ms": round((processed_at - frame.timestamp) * 1000, 1),
        "faces": faces,
        "emotion": faces[0]["emotion"] if faces else None,
        "model": {"name": info.name, "version": info.version},
    }
    if frame.meta:
        event["meta"] = frame.meta
    return event


def make_error(
    device_id: str | None,
    topic: str,
    reason: str,
    message: str,
    payload_bytes: int,
    at: float,
    frame_id: str | None = None,
) -> dict:
    """A record of a rejected frame for the errors topic."""
    return {
        "schema": SCHEMA_VERSION,
        "device_id": device_id,
        "topic": topic,
        "reason": reason,
        "message": message,
        "frame_id": frame_id,
        "at": iso(at),
        "payload_bytes": payload_bytes,
    }


def make_outcome(
    outcome: str,
    device_id: str | None,
    topic: str,
    frame_id: str | None,
    message: str,
    at: float,
    **extra,
) -> dict:
    """What became of one frame: ``outcome`` is event, error, no_face, stale or dropped.

    ``message`` says it in a sentence; ``extra`` adds ``event`` (the event), ``error``
    (the error record) or ``detector`` (for no_face).
    """
    return {
        "schema": SCHEMA_VERSION,
        "outcome": outcome,
        "device_id": device_id,
        "frame_id": frame_id,
        "topic": topic,
        "message": message,
        "at": iso(at),
        **extra,
    }


def load_schema(path: Path = EVENT_SCHEMA) -> dict:
    return json.loads(path.read_text())
