"""Frame decoding under arbitrary input (hypothesis): a Frame within the pixel limit, or a FrameError, nothing else.

The decoders are watched: neither simplejpeg nor Pillow is ever asked to decode an image whose header,
as the decoder itself reads it, declares more pixels than the limit, and the peak of Python's traced
memory stays within a bound set by the payload's size and the limit.
"""

from __future__ import annotations

import base64
import json
import struct
import tracemalloc
import zlib

import cv2
import numpy as np
import pytest
import simplejpeg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import ImageFile

from tests.worker.test_frames import encode, sample_image
from worker.frames import JPEG_MAGIC, PNG_MAGIC, FrameError, decode_payload

MAX_PIXELS = 64 * 64  # small, so that a mutated header easily declares more
MAX_BYTES = 100_000
EXAMPLES = settings(
    max_examples=500, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


JPEG = encode(".jpg", sample_image(40, 48), cv2.IMWRITE_JPEG_QUALITY, 90)  # 1,920 pixels, under the limit
JPEG_BIG = encode(".jpg", sample_image(80, 96))  # 7,680 pixels, over it
PROGRESSIVE = encode(".jpg", sample_image(40, 48), cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
PNG = encode(".png", sample_image(40, 48))
PNG_GREY = encode(".png", sample_image(40, 48)[:, :, 0])
PNG_BIG = encode(".png", sample_image(80, 96))


class Watch:
    """Wraps the decoders and fails the moment one is asked to decode more pixels than the limit."""

    def __init__(self):
        self.calls = 0
        self.real_jpeg = simplejpeg.decode_jpeg
        self.real_load = ImageFile.ImageFile.load

    def jpeg(self, data, *args, **kwargs):
        self.calls += 1
        try:
            h, w, _, _ = simplejpeg.decode_jpeg_header(data, strict=False)
        except Exception:
            h = w = 0  # the decoder cannot read a size either, so it cannot allocate for one
        assert h * w <= MAX_PIXELS, f"simplejpeg asked to decode {w}x{h}"
        return self.real_jpeg(data, *args, **kwargs)

    def load(watch, image):
        watch.calls += 1
        w, h = image.size
        assert w * h <= MAX_PIXELS, f"Pillow asked to decode {w}x{h}"
        return watch.real_load(image)


@pytest.fixture(scope="module")
def watch():
    w = Watch()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(simplejpeg, "decode_jpeg", w.jpeg)
        mp.setattr(ImageFile.ImageFile, "load", lambda image: w.load(image))
        for data in (JPEG, PNG):  # imports and first-use caches, before memory is traced
            decode_payload(data, "cam", "emotion/frames/cam", MAX_BYTES, MAX_PIXELS)
        yield w


def check(payload: bytes) -> None:
    """The property: a Frame within the limit or a FrameError, and a bounded peak of traced memory."""
    tracemalloc.start()  # around the decoding only: tracing hypothesis itself would slow it tenfold
    try:
        frame = decode_payload(payload, "cam", "emotion/frames/cam", MAX_BYTES, MAX_PIXELS)
    except FrameError as err:
        frame = None
        assert err.reason in FrameError.REASONS and str(err)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if frame is not None:
        h, w, c = frame.image.shape
        assert c == 3 and h * w <= MAX_PIXELS and frame.image.dtype == np.uint8
    # Parsed JSON can take ~25 bytes per byte of text ('[{},{},...]'); a decoded image and its copies
    # a few times 3 bytes a pixel. A decoder that allocated for a forged 65535x65535 header would be GBs.
    assert peak < 32 * len(payload) + 16 * MAX_PIXELS + 512_000, (peak, len(payload))


# -- strategies --------------------------------------------------------------------------------------------


def edited(base: bytes):
    """``base`` with a few bytes set, inserted or deleted, and maybe cut short."""
    edit = st.tuples(st.integers(0, len(base) - 1), st.sampled_from(["set", "insert", "delete"]), st.integers(0, 255))

    def apply(edits, cut):
        data = bytearray(base)
        for at, how, value in edits:
            at = min(at, len(data) - 1)
            if how == "set":
                data[at] = value
            elif how == "insert":
                data.insert(at, value)
            elif len(data) > 1:
                del data[at]
        return bytes(data[:cut])

    return st.builds(apply, st.lists(edit, min_size=1, max_size=8), st.none() | st.integers(0, len(base)))


def jpeg_sized(base: bytes):
    """``base`` declaring another width and height in its frame header."""
    sof = next(base.find(m) for m in (b"\xff\xc0", b"\xff\xc2") if base.find(m) > 0)
    return st.builds(
        lambda w, h: base[: sof + 5] + struct.pack(">HH", h, w) + base[sof + 9 :],
        st.integers(0, 65535),
        st.integers(0, 65535),
    )


def png_sized(base: bytes):
    """``base`` declaring another width and height in IHDR, its CRC fixed or not."""

    def resize(w, h, fix_crc):
        ihdr = struct.pack(">II", w, h) + base[24:29]
        crc = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr)) if fix_crc else base[29:33]
        return base[:16] + ihdr + crc + base[33:]

    return st.builds(resize, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.booleans())


IMAGES = [JPEG, JPEG_BIG, PROGRESSIVE, PNG, PNG_GREY, PNG_BIG]
images = st.sampled_from(IMAGES)
mutated_images = st.one_of([edited(b) for b in IMAGES])
any_image = st.one_of(images, mutated_images, jpeg_sized(JPEG), png_sized(PNG), st.binary(max_size=300))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=24,
)
image_fields = st.one_of(
    any_image.map(lambda b: base64.b64encode(b).decode()),
    any_image.map(lambda b: "data:image/jpeg;base64," + base64.b64encode(b).decode()),
    st.text(max_size=40),
    json_values,
)
envelopes = st.fixed_dictionaries(
    {"image": image_fields},
    optional={"frame_id": json_values, "captured_at": json_values, "room": json_values, "x": json_values},
).map(lambda doc: json.dumps(doc).encode())
VALID_ENVELOPE = json.dumps({"image": base64.b64encode(PNG).decode(), "frame_id": "f1", "captured_at": 1.5e9}).encode()
nested = st.builds(
    lambda depth, opener: b'{"image": "", "x": ' + opener * depth + b"}",
    st.integers(1, 5000),
    st.sampled_from([b"[", b'{"a":']),
)


# -- properties --------------------------------------------------------------------------------------------


@EXAMPLES
@given(st.binary(max_size=4000))
def test_arbitrary_bytes(watch, payload):
    check(payload)


@EXAMPLES
@given(
    st.one_of(st.binary(max_size=2000).map(lambda b: JPEG_MAGIC + b), st.binary(max_size=2000).map(PNG_MAGIC.__add__))
)
def test_anything_after_an_image_signature(watch, payload):
    check(payload)


@EXAMPLES
@given(mutated_images)
def test_mutated_jpeg_and_png(watch, payload):
    check(payload)


@EXAMPLES
@given(st.one_of(jpeg_sized(JPEG), jpeg_sized(PROGRESSIVE), png_sized(PNG), png_sized(PNG_GREY)))
def test_any_declared_size(watch, payload):
    check(payload)


@EXAMPLES
@given(st.one_of(envelopes, edited(VALID_ENVELOPE), nested))
def test_mutated_json_envelopes(watch, payload):
    check(payload)


def test_the_watch_sees_every_decode(watch):
    """The properties above mean something only if the wrapped decoders are the ones in use."""
    for data in (JPEG, PROGRESSIVE, PNG, PNG_GREY):
        before = watch.calls
        decode_payload(data, "cam", "emotion/frames/cam", MAX_BYTES, MAX_PIXELS)
        assert watch.calls > before
    with pytest.raises(AssertionError, match="asked to decode 96x80"):
        watch.jpeg(JPEG_BIG)
