"""Frame payloads: raw JPEG or PNG bytes, or a JSON envelope with a base64 image.

Every check that can reject a payload happens here, before a full decode, and
raises :class:`FrameError` with a short machine-readable ``reason`` and a
sentence naming what was wrong.

JPEG is decoded with libjpeg-turbo through simplejpeg and PNG with Pillow: both
report a decoder's complaint to Python instead of printing it to stderr, where it
would break a JSON-lines log. A JPEG that libjpeg can recover ("Corrupt JPEG
data: ...") is still decoded, and the complaint travels with the frame
(:attr:`Frame.warnings`).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import cv2
import numpy as np
import simplejpeg
from PIL import Image

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp"}
MAX_JSON_DEPTH = 32  # levels of nesting in an envelope; far more than any camera sends, far below Python's limit


Reply = tuple[str, bytes | None]
"""Where a frame's outcome goes: (topic, MQTT 5 correlation data or None)."""


class FrameError(ValueError):
    """A payload that cannot be processed. ``reason`` is one of the codes below.

    ``reply`` is the envelope's ``reply_to`` when it was read before the error.
    """

    reply: Reply | None = None

    REASONS = (
        "payload_too_large",
        "empty_payload",
        "not_an_image",
        "truncated_image",
        "corrupt_image",
        "image_too_large",
        "bad_json",
        "bad_base64",
        "bad_field",
        "no_device_id",
        "unknown_topic",
        "internal",
    )

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Frame:
    """A decoded frame. ``image`` is BGR uint8 (H, W, 3); times are Unix seconds."""

    device_id: str
    topic: str
    frame_id: str
    received_at: float
    captured_at: float | None
    image: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    reply: Reply | None = None
    warnings: list[str] = field(default_factory=list)  # what the decoder recovered from, e.g. corrupt JPEG data

    @property
    def timestamp(self) -> float:
        """When the frame was taken if the camera said so, else when it arrived."""
        return self.captured_at if self.captured_at is not None else self.received_at


def fmt_bytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def decode_payload(
    payload: bytes,
    device_id: str,
    topic: str,
    max_payload_bytes: int,
    max_pixels: int,
    received_at: float | None = None,
) -> Frame:
    """Turn an MQTT payload into a :class:`Frame`.

    ``payload`` is JPEG or PNG bytes, or a JSON object ``{"image": "<base64>",
    "frame_id": "...", "captured_at": "<ISO 8601>" | <epoch seconds>, ...}``
    whose other keys are kept as ``meta``; ``"reply_to": "<topic>"`` asks for the
    frame's outcome on that topic (see ``docs/getting-started.md``). Images over
    ``max_pixels`` pixels are refused from their header, before they are decoded.
    """
    received_at = time.time() if received_at is None else received_at
    if len(payload) > max_payload_bytes:
        raise FrameError(
            "payload_too_large",
            f"payload is {fmt_bytes(len(payload))}, limit is {fmt_bytes(max_payload_bytes)} (pipeline.max_payload_bytes)",
        )
    if not payload:
        raise FrameError("empty_payload", "payload is empty")
    frame_id, captured_at, meta, reply = None, None, {}, None
    data = payload
    envelope = payload.lstrip()[:1] in (b"{", b"[")  # "[" too, so a JSON array is told it must be an object
    if envelope:
        data, frame_id, captured_at, meta, reply = _parse_envelope(payload)
    warnings: list[str] = []
    try:
        image = decode_image(data, max_pixels, warnings)
    except FrameError as err:
        if envelope and err.reason == "not_an_image":
            err = FrameError("not_an_image", f"JSON 'image' is base64 of {_what(data)}, not of a JPEG or a PNG")
        err.reply = reply
        raise err from None
    return Frame(
        device_id=device_id,
        topic=topic,
        frame_id=frame_id or uuid.uuid4().hex[:12],
        received_at=received_at,
        captured_at=captured_at,
        image=image,
        meta=meta,
        reply=reply,
        warnings=warnings,
    )


def _what(data: bytes) -> str:
    """A short description of bytes that are not an image, for an error message."""
    if not data:
        return "nothing"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or not all(c.isprintable() or c in "\r\n\t" for c in text):
        return f"{len(data)} bytes starting {data[:8].hex(' ')}"
    shown = text if len(text) <= 40 else text[:37] + "..."
    return f"text ({len(data)} bytes: {shown!r})"


def _parse_envelope(payload: bytes) -> tuple[bytes, str | None, float | None, dict, Reply | None]:
    too_deep = FrameError("bad_json", f"JSON payload nests more than {MAX_JSON_DEPTH} levels deep")
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError("bad_json", f"payload starts like JSON but is not valid JSON: {exc}") from None
    except RecursionError:  # the parser's own limit, near 1,000 levels
        raise too_deep from None
    if not isinstance(doc, dict):
        raise FrameError("bad_json", "JSON payload must be an object")
    if _deeper_than(doc, MAX_JSON_DEPTH):  # the extra keys go into the event, which must stay serialisable
        raise too_deep
    reply = _reply_to(doc.pop("reply_to", None))
    try:
        return (*_envelope_fields(doc), doc, reply)
    except FrameError as err:
        err.reply = reply
        raise


def _envelope_fields(doc: dict) -> tuple[bytes, str | None, float | None]:
    """The image bytes, frame id and capture time of an envelope, popped from ``doc``."""
    image = doc.pop("image", None)
    if not isinstance(image, str) or not image:
        raise FrameError("bad_field", "JSON payload needs 'image', a base64 string of JPEG or PNG bytes")
    if image.startswith("data:") and "," in image:  # a data URL, as browsers produce
        image = image.split(",", 1)[1]
    try:
        data = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FrameError("bad_base64", f"'image' is not valid base64: {exc}") from None
    frame_id = doc.pop("frame_id", None)
    if frame_id is not None and (isinstance(frame_id, bool) or not isinstance(frame_id, (str, int))):
        raise FrameError("bad_field", f"'frame_id' must be a string, got {type(frame_id).__name__}")
    captured_at = parse_time(doc.pop("captured_at", None))
    return data, None if frame_id is None else str(frame_id), captured_at


def _reply_to(value: Any) -> Reply | None:
    """The envelope's ``reply_to``: a topic without wildcards, for the frame's outcome."""
    if value is None:
        return None
    if not isinstance(value, str) or not value or "+" in value or "#" in value or value.startswith("$"):
        raise FrameError("bad_field", f"'reply_to' must be a topic without wildcards, got {value!r}")
    return value, None


def _deeper_than(doc: Any, limit: int) -> bool:
    """Whether ``doc`` (parsed JSON) nests lists and objects more than ``limit`` levels deep; no recursion."""
    stack = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is None:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def parse_time(value: Any) -> float | None:
    """Epoch seconds from ISO 8601 text (UTC when no zone is given) or a number of epoch seconds."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise FrameError("bad_field", "'captured_at' must be ISO 8601 text or epoch seconds, got a boolean")
    if isinstance(value, (int, float)):
        if not 0 <= value < 1e11:
            raise FrameError("bad_field", f"'captured_at' {value} is not plausible epoch seconds")
        return float(value)
    if isinstance(value, str):
        try:
            seconds = float(value) if value.replace(".", "", 1).isdigit() else _iso(value)
        except ValueError:
            raise FrameError("bad_field", f"'captured_at' {value!r} is neither ISO 8601 nor epoch seconds") from None
        if not 0 <= seconds < 1e11:  # the same check as for a number: milliseconds or year 1 are not plausible
            raise FrameError("bad_field", f"'captured_at' {value!r} is not a plausible time")
        return seconds
    raise FrameError("bad_field", f"'captured_at' must be ISO 8601 text or epoch seconds, got {type(value).__name__}")


def _iso(text: str) -> float:
    dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) in pixels read from a JPEG or PNG header, without decoding the image."""
    if data.startswith(PNG_MAGIC):
        if len(data) < 24 or data[12:16] != b"IHDR":
            raise FrameError("truncated_image", "PNG ends before its IHDR header")
        return struct.unpack(">II", data[16:24])
    if data.startswith(JPEG_MAGIC):
        return _jpeg_size(data)
    raise FrameError("not_an_image", "payload is not a JPEG, a PNG or a JSON object")


def _jpeg_size(data: bytes) -> tuple[int, int]:
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise FrameError("corrupt_image", f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        # SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC) carry the frame size.
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            if i + 9 > len(data):
                break
            height, width = struct.unpack(">HH", data[i + 5 : i + 9])
            return width, height
        if marker == 0xDA:  # start of scan before any frame header
            raise FrameError("corrupt_image", "JPEG has no frame header before its image data")
        i += 2 + length
    raise FrameError("truncated_image", "JPEG ends before its frame header")


def decode_image(data: bytes, max_pixels: int, warnings: list[str] | None = None) -> np.ndarray:
    """Decode JPEG or PNG bytes into BGR uint8 (H, W, 3), refusing truncated files and images over ``max_pixels``.

    Nothing is decoded before the size in the header, as this module and the decoder both read it,
    is found within ``max_pixels``. What the decoder recovered from is appended to ``warnings``.
    """
    width, height = image_size(data)
    _check_size(width, height, max_pixels)
    if data.startswith(JPEG_MAGIC) and not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        raise FrameError("truncated_image", "JPEG is truncated (no end-of-image marker)")
    if data.startswith(PNG_MAGIC) and b"IEND" not in data[-12:]:
        raise FrameError("truncated_image", "PNG is truncated (no IEND chunk)")
    if data.startswith(PNG_MAGIC):
        image = _decode_png(data, width, height)
    else:
        image = _decode_jpeg(data, width, height, warnings)
    if image.shape != (height, width, 3):
        raise FrameError("corrupt_image", f"image decoded to {image.shape}, its header says {width}x{height}")
    return image


def _check_size(width: int, height: int, max_pixels: int) -> None:
    if width == 0 or height == 0:
        raise FrameError("corrupt_image", f"image header gives a size of {width}x{height}")
    if width * height > max_pixels:
        raise FrameError(
            "image_too_large",
            f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels, "
            f"limit is {max_pixels / 1e6:.1f} (pipeline.max_pixels)",
        )


def _decode_jpeg(data: bytes, width: int, height: int, warnings: list[str] | None) -> np.ndarray:
    # simplejpeg reports a broken file mostly as ValueError, sometimes otherwise (a KeyError for an odd subsampling).
    try:
        h, w, _, _ = simplejpeg.decode_jpeg_header(data, strict=False)
    except Exception as exc:
        raise FrameError("corrupt_image", f"JPEG header could not be read: {_why(exc)}") from None
    if (w, h) != (width, height):  # the decoder would allocate for its own reading, not ours
        raise FrameError("corrupt_image", f"JPEG headers disagree on the size: {width}x{height} and {w}x{h}")
    try:
        return simplejpeg.decode_jpeg(data, colorspace="BGR")
    except Exception as exc:
        complaint = str(exc)
    # libjpeg recovers from much corrupt data (it fills in what it cannot read): the frame is still worth a look.
    try:
        image = simplejpeg.decode_jpeg(data, colorspace="BGR", strict=False)
    except Exception as exc:
        raise FrameError("corrupt_image", f"JPEG could not be decoded: {_why(exc)}") from None
    if warnings is not None:
        warnings.append(complaint)
    return image


def _decode_png(data: bytes, width: int, height: int) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as im:
            if im.size != (width, height):
                raise FrameError("corrupt_image", f"PNG headers disagree on the size: {width}x{height} and {im.size}")
            im.load()
            if im.mode in ("I", "I;16", "I;16B", "I;16L"):  # 16-bit grey: keep the high byte, as other decoders do
                grey = (np.asarray(im, dtype=np.uint32) >> 8).astype(np.uint8)
                return np.repeat(grey[:, :, None], 3, axis=2)
            rgb = np.asarray(im.convert("RGB"))
    except FrameError:
        raise
    except Exception as exc:  # Pillow reports a broken file as OSError, SyntaxError, ValueError, zlib.error, ...
        raise FrameError("corrupt_image", f"PNG could not be decoded: {_why(exc)}") from None
    return np.ascontiguousarray(rgb[:, :, ::-1])


def _why(exc: Exception) -> str:
    return str(exc) if isinstance(exc, (ValueError, OSError)) and str(exc) else repr(exc)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    ok, buf = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("image could not be encoded as JPEG")
    return buf.tobytes()
