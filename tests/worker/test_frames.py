"""Payload decoding: raw JPEG/PNG, the JSON envelope, and every way a payload is refused."""

from __future__ import annotations

import base64
import json
import math
import struct
import zlib
from datetime import UTC, datetime

import cv2
import numpy as np
import pytest

from worker import frames
from worker.frames import FrameError, decode_image, decode_payload, image_size, parse_time

MAX_BYTES = 4_000_000
MAX_PIXELS = 16_000_000


def sample_image(h: int = 60, w: int = 80) -> np.ndarray:
    """A smooth, non-uniform BGR picture, so codecs have real content to work on."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 3 % 256, yy * 4 % 256, (xx + yy) * 2 % 256], axis=-1).astype(np.uint8)


def encode(ext: str, image: np.ndarray, *params: int) -> bytes:
    ok, buf = cv2.imencode(ext, image, list(params))
    assert ok
    return buf.tobytes()


@pytest.fixture(scope="module")
def jpeg() -> bytes:
    return encode(".jpg", sample_image(), cv2.IMWRITE_JPEG_QUALITY, 95)


@pytest.fixture(scope="module")
def png() -> bytes:
    return encode(".png", sample_image())


def decode(payload: bytes, max_payload_bytes: int = MAX_BYTES, max_pixels: int = MAX_PIXELS, **kw):
    return decode_payload(payload, "cam1", "emotion/frames/cam1", max_payload_bytes, max_pixels, **kw)


def refused(payload: bytes, reason: str, **kw) -> str:
    with pytest.raises(FrameError) as info:
        decode(payload, **kw)
    assert info.value.reason == reason, f"{info.value.reason}: {info.value}"
    assert info.value.reason in FrameError.REASONS
    return str(info.value)


def envelope(**doc) -> bytes:
    return json.dumps(doc).encode()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


# --- raw images ---------------------------------------------------------------------------------


def test_raw_jpeg_decodes_to_bgr_of_its_size(jpeg):
    frame = decode(jpeg, received_at=123.5)
    assert frame.image.shape == (60, 80, 3) and frame.image.dtype == np.uint8
    # JPEG is lossy, but at quality 95 a smooth picture comes back close, channels in BGR order.
    assert np.abs(frame.image.astype(int) - sample_image().astype(int)).mean() < 4
    assert frame.device_id == "cam1" and frame.topic == "emotion/frames/cam1"
    assert frame.received_at == 123.5 and frame.captured_at is None and frame.timestamp == 123.5
    assert frame.meta == {}
    assert len(frame.frame_id) == 12  # generated when the camera gives none


def test_raw_png_decodes_exactly(png):
    frame = decode(png)
    np.testing.assert_array_equal(frame.image, sample_image())


def test_grey_png_decodes_to_three_channels():
    grey = sample_image()[..., 0].copy()
    image = decode_image(encode(".png", grey), MAX_PIXELS)
    assert image.shape == (60, 80, 3)
    np.testing.assert_array_equal(image[..., 0], grey)
    np.testing.assert_array_equal(image[..., 2], grey)


def test_frame_ids_are_unique_when_generated(jpeg):
    assert decode(jpeg).frame_id != decode(jpeg).frame_id


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_image_size_reads_the_header(ext):
    data = encode(ext, sample_image(37, 91))
    assert image_size(data) == (91, 37)


def test_image_size_skips_jpeg_segments_before_the_frame_header(jpeg):
    # An APP1 segment (as cameras write EXIF) between SOI and the frame header.
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 100) + b"Exif\x00\x00" + bytes(94)
    data = jpeg[:2] + app1 + jpeg[2:]
    assert image_size(data) == (80, 60)
    assert decode_image(data, MAX_PIXELS).shape == (60, 80, 3)


# --- the JSON envelope --------------------------------------------------------------------------


def test_envelope_with_id_time_and_meta(jpeg):
    payload = envelope(
        image=base64.b64encode(jpeg).decode(), frame_id="f-42", captured_at="2024-05-01T12:00:00Z", room="hall", n=3
    )
    frame = decode(payload, received_at=1.0)
    assert frame.image.shape == (60, 80, 3)
    assert frame.frame_id == "f-42"
    assert frame.captured_at == datetime(2024, 5, 1, 12, tzinfo=UTC).timestamp()
    assert frame.timestamp == frame.captured_at
    assert frame.meta == {"room": "hall", "n": 3}  # image, frame_id and captured_at are not meta


def test_envelope_integer_frame_id_becomes_text(png):
    frame = decode(envelope(image=base64.b64encode(png).decode(), frame_id=7))
    assert frame.frame_id == "7"


def test_envelope_with_leading_whitespace(png):
    frame = decode(b"  \n" + envelope(image=base64.b64encode(png).decode(), frame_id="a"))
    assert frame.frame_id == "a"
    np.testing.assert_array_equal(frame.image, sample_image())


@pytest.mark.parametrize("prefix", ["data:image/png;base64,", "data:application/octet-stream;base64,"])
def test_envelope_accepts_a_data_url(png, prefix):
    frame = decode(envelope(image=prefix + base64.b64encode(png).decode()))
    np.testing.assert_array_equal(frame.image, sample_image())


# 2024-05-01T12:00:00Z
NOON = 1714564800.0


@pytest.mark.parametrize(
    "value, expected",
    [
        ("2024-05-01T12:00:00Z", NOON),
        ("2024-05-01T12:00:00.250Z", NOON + 0.25),
        ("2024-05-01T14:00:00+02:00", NOON),
        ("2024-05-01T07:30:00-04:30", NOON),
        ("2024-05-01T12:00:00", NOON),  # naive is UTC, not local time
        ("2024-05-01 12:00:00", NOON),
        (NOON, NOON),
        (1714564800, NOON),
        (NOON + 0.5, NOON + 0.5),
        ("1714564800", NOON),
        ("1714564800.75", NOON + 0.75),
        (0, 0.0),
        (None, None),
    ],
)
def test_parse_time(value, expected):
    assert parse_time(value) == expected


def test_naive_iso_is_utc_whatever_the_local_zone():
    import os
    import time

    old = os.environ.get("TZ")
    os.environ["TZ"] = "America/New_York"
    time.tzset()
    try:
        assert parse_time("2024-05-01T12:00:00") == NOON
    finally:
        if old is None:
            del os.environ["TZ"]
        else:
            os.environ["TZ"] = old
        time.tzset()


@pytest.mark.parametrize("value", ["2024-05-01T12:00:00Z", 1714564800, "1714564800"])
def test_captured_at_forms_in_an_envelope(png, value):
    frame = decode(envelope(image=base64.b64encode(png).decode(), captured_at=value))
    assert frame.captured_at == NOON


@pytest.mark.parametrize(
    "value, words",
    [
        (True, "boolean"),
        (False, "boolean"),
        ("yesterday", "'yesterday'"),
        ("2024-13-45T99:00:00", "2024-13-45"),
        ("", "neither ISO 8601"),
        ("1.2.3", "'1.2.3'"),
        ("nan", "'nan'"),
        (-5, "-5"),
        (-0.5, "-0.5"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        (1714564800000, "1714564800000"),  # milliseconds, not seconds
        ("1714564800000", "1714564800000"),
        ("0001-01-01T00:00:00Z", "0001-01-01"),
        ([2024, 5, 1], "list"),
        ({"s": 1}, "dict"),
    ],
)
def test_bad_captured_at(png, value, words):
    with pytest.raises(FrameError) as info:
        parse_time(value)
    assert info.value.reason == "bad_field"
    assert "captured_at" in str(info.value) and words in str(info.value)
    if not (isinstance(value, float) and math.isnan(value)):  # NaN is not JSON
        payload = envelope(image=base64.b64encode(png).decode(), captured_at=value)
        assert "captured_at" in refused(payload, "bad_field")


# --- refused payloads ---------------------------------------------------------------------------


def test_payload_over_the_limit():
    message = refused(b"\xff\xd8\xff" + bytes(5_000_000), "payload_too_large")
    assert "5.0 MB" in message and "4.0 MB" in message and "pipeline.max_payload_bytes" in message


def test_payload_limit_is_checked_in_bytes(jpeg):
    assert decode(jpeg, max_payload_bytes=len(jpeg)).image.shape == (60, 80, 3)
    message = refused(jpeg, "payload_too_large", max_payload_bytes=len(jpeg) - 1)
    assert f"{len(jpeg)} bytes" in message and f"limit is {len(jpeg) - 1} bytes" in message
    assert "pipeline.max_payload_bytes" in message


def test_empty_payload():
    assert "empty" in refused(b"", "empty_payload")


@pytest.mark.parametrize(
    "payload",
    [
        b"hello, I am not a picture",
        np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"GIF89a\x01\x00\x01\x00",
        b"BM" + bytes(100),
        b"\xff\xd8",  # shorter than the JPEG magic
        b"42",
    ],
)
def test_not_an_image(payload):
    message = refused(payload, "not_an_image")
    assert "not a JPEG, a PNG or a JSON object" in message


def test_not_an_image_inside_an_envelope_says_what_the_image_held():
    payload = envelope(image=base64.b64encode(b"plain text, not a picture").decode())
    message = refused(payload, "not_an_image")
    # The payload was a JSON object: the message is about its 'image'.
    assert "JSON object" not in message
    assert message == "JSON 'image' is base64 of text (25 bytes: 'plain text, not a picture'), not of a JPEG or a PNG"
    binary = refused(envelope(image=base64.b64encode(b"\x00\x01\x02\x03binary").decode()), "not_an_image")
    assert "10 bytes starting 00 01 02 03" in binary


def test_reply_to_in_the_envelope_is_kept_even_when_the_frame_is_refused(jpeg):
    frame = decode_payload(
        envelope(image=base64.b64encode(jpeg).decode(), reply_to="me/replies/f1"), "cam1", "t", 10**7, 10**8
    )
    assert frame.reply == ("me/replies/f1", None) and "reply_to" not in frame.meta
    with pytest.raises(FrameError) as err:
        decode_payload(
            envelope(image=base64.b64encode(b"text").decode(), reply_to="me/replies/f2"), "cam1", "t", 10**7, 10**8
        )
    assert err.value.reply == ("me/replies/f2", None)
    with pytest.raises(FrameError) as err:
        decode_payload(envelope(image=base64.b64encode(jpeg).decode(), reply_to="me/+/x"), "cam1", "t", 10**7, 10**8)
    assert err.value.reason == "bad_field" and "reply_to" in str(err.value)


def test_truncated_jpeg(jpeg):
    message = refused(jpeg[: len(jpeg) // 2], "truncated_image")
    assert "JPEG" in message and "truncated" in message


def test_jpeg_cut_before_its_frame_header(jpeg):
    sof = jpeg.find(b"\xff\xc0")
    assert sof > 0
    message = refused(jpeg[: sof + 4], "truncated_image")
    assert "frame header" in message


def test_truncated_png(png):
    message = refused(png[: len(png) // 2], "truncated_image")
    assert "PNG" in message and "IEND" in message


def test_png_cut_inside_its_header(png):
    assert "IHDR" in refused(png[:20], "truncated_image")


def corrupt_body(jpeg: bytes, seed: int = 2) -> bytes:
    """``jpeg`` with random bytes instead of its entropy-coded data: the headers are intact."""
    sos = jpeg.find(b"\xff\xda")
    sos_len = struct.unpack(">H", jpeg[sos + 2 : sos + 4])[0]
    garbage = np.random.default_rng(seed).integers(0, 255, 3000, dtype=np.uint8).tobytes()
    return jpeg[: sos + 2 + sos_len] + garbage + b"\xff\xd9"


def test_corrupt_jpeg_body_decodes_to_the_header_size_with_the_decoders_warning(jpeg, capfd):
    """Garbage after a valid header: libjpeg recovers and returns a picture of the declared size.
    Its complaint comes with the frame, not on stderr, where it would break a JSON-lines log."""
    frame = decode(corrupt_body(jpeg))
    assert frame.image.shape == (60, 80, 3) and frame.image.dtype == np.uint8
    assert np.abs(frame.image.astype(int) - sample_image().astype(int)).mean() > 10  # garbage decodes to garbage
    assert len(frame.warnings) == 1 and frame.warnings[0].startswith("Corrupt JPEG data"), frame.warnings
    assert capfd.readouterr().err == ""


def test_a_clean_jpeg_has_no_warnings(jpeg):
    assert decode(jpeg).warnings == []


def test_png_decoding_says_nothing_on_stderr(png, capfd):
    broken = png[:40] + bytes(len(png) - 52) + png[-12:]  # header and IEND intact, the data zeroed
    refused(broken, "corrupt_image")
    assert capfd.readouterr().err == ""


def test_16_bit_png_keeps_the_high_byte():
    grey = (np.arange(48, dtype=np.uint16).reshape(6, 8) * 1365).astype(np.uint16)
    image = decode(encode(".png", grey)).image
    assert image.shape == (6, 8, 3) and (image == (grey >> 8).astype(np.uint8)[:, :, None]).all()


def test_jpeg_with_garbage_instead_of_its_tables_is_corrupt(jpeg):
    sos = jpeg.find(b"\xff\xda")
    garbage = np.random.default_rng(3).integers(0, 255, 3000, dtype=np.uint8).tobytes()
    message = refused(jpeg[:sos] + garbage + b"\xff\xd9", "corrupt_image")
    assert "JPEG" in message


def test_jpeg_with_a_broken_marker_is_corrupt(jpeg):
    # After the APP0 segment the next segment's marker must follow; here a stray byte replaces it.
    app0_end = 4 + struct.unpack(">H", jpeg[4:6])[0]
    assert jpeg[app0_end] == 0xFF
    message = refused(jpeg[:app0_end] + b"\x00" + jpeg[app0_end + 1 :], "corrupt_image")
    assert f"marker expected at byte {app0_end}" in message


def test_jpeg_with_scan_before_frame_header_is_corrupt():
    data = b"\xff\xd8" + b"\xff\xda" + struct.pack(">H", 8) + bytes(6) + b"\xff\xd9"
    assert "no frame header" in refused(data, "corrupt_image")


def test_png_with_zero_size_is_corrupt(png):
    ihdr = b"\x00\x00\x00\x00" + png[20:29]
    data = png[:8] + png_chunk(b"IHDR", ihdr) + png[33:]
    assert "0x60" in refused(data, "corrupt_image")


def test_png_with_a_corrupt_body_is_refused(png):
    # The header is fine and IEND is there, but the compressed data is garbage.
    ihdr_end = 8 + 25
    body = png_chunk(b"IDAT", b"this is not zlib data at all") + png_chunk(b"IEND", b"")
    message = refused(png[:ihdr_end] + body, "corrupt_image")
    assert "PNG could not be decoded" in message


# --- decompression bombs: refused from the header, never decoded ---------------------------------


@pytest.fixture
def no_decoding(monkeypatch):
    def imdecode(*args, **kwargs):
        raise AssertionError("cv2.imdecode was called for an image that should be refused from its header")

    monkeypatch.setattr(frames.cv2, "imdecode", imdecode)


@pytest.fixture(scope="module")
def black_png_5000() -> bytes:
    """A real 5000x5000 black PNG: 25 megapixels in about 25 kB."""
    return encode(".png", np.zeros((5000, 5000), np.uint8), cv2.IMWRITE_PNG_COMPRESSION, 9)


def test_png_bomb_is_refused_before_decoding(black_png_5000, no_decoding):
    assert len(black_png_5000) < 100_000
    assert image_size(black_png_5000) == (5000, 5000)
    message = refused(black_png_5000, "image_too_large")  # 25 MP against the default 16 MP
    assert "5000x5000" in message and "25.0 megapixels" in message and "pipeline.max_pixels" in message
    refused(black_png_5000, "image_too_large", max_pixels=1_000_000)


def test_png_bomb_in_an_envelope_is_refused(black_png_5000, no_decoding):
    refused(envelope(image=base64.b64encode(black_png_5000).decode()), "image_too_large")


def test_png_declaring_20000x20000_is_refused(no_decoding):
    row = b"\x00" + bytes(20000)  # filter byte and one black row; the rest is never read
    ihdr = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    data = (
        frames.PNG_MAGIC
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(row * 16, 9))
        + png_chunk(b"IEND", b"")
    )
    assert len(data) < 1000
    message = refused(data, "image_too_large")
    assert "20000x20000 = 400.0 megapixels" in message


def test_jpeg_declaring_20000x20000_is_refused(jpeg, no_decoding):
    sof = jpeg.find(b"\xff\xc0")
    data = jpeg[: sof + 5] + struct.pack(">HH", 20000, 20000) + jpeg[sof + 9 :]
    assert image_size(data) == (20000, 20000)
    assert "20000x20000" in refused(data, "image_too_large", max_pixels=1_000_000)


def test_real_5000x5000_jpeg_is_refused(no_decoding):
    data = encode(".jpg", np.zeros((5000, 5000), np.uint8))
    assert "5000x5000" in refused(data, "image_too_large", max_pixels=20_000_000)


def test_image_at_the_pixel_limit_is_accepted(png):
    assert decode(png, max_pixels=60 * 80).image.shape == (60, 80, 3)
    refused(png, "image_too_large", max_pixels=60 * 80 - 1)


# --- bad envelopes ------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b'{"image": ', b"{not json}", b'{"image": "x",}', b"{\xff\xfe}"])
def test_bad_json(payload):
    assert "not valid JSON" in refused(payload, "bad_json")


@pytest.mark.parametrize("depth", [frames.MAX_JSON_DEPTH, 5_000, 1_000_000])
def test_json_nested_too_deep_is_bad_json(png, depth):
    image = base64.b64encode(png).decode()
    payload = b'{"image": "' + image.encode() + b'", "x": ' + b"[" * depth + b"]" * depth + b"}"
    message = refused(payload, "bad_json", max_payload_bytes=10_000_000)
    assert f"more than {frames.MAX_JSON_DEPTH} levels" in message


def test_json_nested_to_the_limit_is_accepted(png):
    depth = frames.MAX_JSON_DEPTH - 1  # the envelope itself is the first level
    nested = json.loads("[" * depth + "]" * depth)
    assert decode(envelope(image=base64.b64encode(png).decode(), x=nested)).meta == {"x": nested}


@pytest.mark.parametrize("payload", [b"[]", b'[{"image": "AAAA"}]', b"  [1, 2]"])
def test_json_that_is_not_an_object(payload):
    assert "must be an object" in refused(payload, "bad_json")


@pytest.mark.parametrize(
    "doc", [{}, {"frame_id": "a"}, {"image": ""}, {"image": None}, {"image": 12}, {"image": ["AAAA"]}]
)
def test_missing_or_empty_image(doc):
    message = refused(envelope(**doc), "bad_field")
    assert "'image'" in message and "base64" in message


@pytest.mark.parametrize("text", ["not base64!", "AAA", "QUJD RA==", "data:image/png;base64,@@@@"])
def test_bad_base64(text):
    message = refused(envelope(image=text), "bad_base64")
    assert "'image' is not valid base64" in message


@pytest.mark.parametrize("frame_id, kind", [(1.5, "float"), ([1], "list"), ({"a": 1}, "dict"), (True, "bool")])
def test_bad_frame_id(png, frame_id, kind):
    message = refused(envelope(image=base64.b64encode(png).decode(), frame_id=frame_id), "bad_field")
    assert "'frame_id' must be a string" in message and kind in message
