"""A running worker fed 2,000 bad payloads between good frames: no crash, every message accounted for, flat memory."""

from __future__ import annotations

import base64
import json
import random
import struct
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import needs_proc, publisher, start_worker
from tests.worker.test_service import ERRORS, EVENTS, STATUS, payload, stop, wait_online
from worker.frames import FrameError, decode_payload, encode_jpeg

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

BAD, GOOD_EVERY = 2000, 10  # a good frame after every 10 bad payloads
MAX_PAYLOAD, MAX_PIXELS = 100_000, 1_000_000
# Resident memory may grow this much over the run, from its level after the first frames: decoders'
# and allocators' caches settle within a few hundred frames; a leak of even 1 kB per payload would
# show as 2 MB, a decoded bomb as hundreds.
RSS_GROWTH_MB = 60


def bad_payloads(seed: int = 0) -> list[bytes]:
    """``BAD`` payloads of many kinds, some chosen, most mutated at random."""
    rng = random.Random(seed)
    image = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    jpeg = encode_jpeg(image)
    sof = jpeg.find(b"\xff\xc0")
    sos = jpeg.find(b"\xff\xda")
    sos_end = sos + 2 + struct.unpack(">H", jpeg[sos + 2 : sos + 4])[0]

    def mutated(data: bytes) -> bytes:
        b = bytearray(data)
        for _ in range(rng.randint(1, 6)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b)

    def junk(n: int) -> bytes:
        return bytes(rng.randrange(256) for _ in range(n))

    kinds = [
        lambda: b"",
        lambda: b"plain text, " + junk(rng.randint(0, 200)),
        lambda: jpeg[: rng.randint(10, len(jpeg) - 10)],  # truncated
        lambda: b"\xff\xd8" + junk(MAX_PAYLOAD),  # too large
        lambda: jpeg[: sof + 5] + struct.pack(">HH", 5000, 5000) + jpeg[sof + 9 :],  # 25 megapixels declared
        lambda: jpeg[:sos_end] + junk(rng.randint(100, 2000)) + b"\xff\xd9",  # corrupt body: decodable, or not
        lambda: mutated(jpeg),
        lambda: b'{"image": ' + junk(rng.randint(0, 50)),
        lambda: b'{"image": "' + b"[" * rng.randint(1, 20) + b'%%% not base64"}',
        lambda: b'{"x": ' + b"[" * rng.randint(40, 100_000) + b"}",  # nested past any limit
        lambda: json.dumps({"image": base64.b64encode(mutated(jpeg)).decode(), "captured_at": "yesterday"}).encode(),
        lambda: json.dumps({"image": base64.b64encode(junk(300)).decode()}).encode(),
        lambda: json.dumps([1, 2, 3]).encode(),
    ]
    return [rng.choice(kinds)() for _ in range(BAD)]


def expected(data: bytes) -> str:
    """What the worker should make of ``data``: a FrameError reason, or 'event' for a frame it can decode."""
    try:
        decode_payload(data, "x", "emotion/frames/x", MAX_PAYLOAD, MAX_PIXELS)
    except FrameError as err:
        return err.reason
    return "event"


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS:"))) / 1024


@needs_proc
def test_2000_bad_payloads_between_good_frames(worker_env, listen, mosquitto, tmp_path):
    env = {
        **worker_env,
        "EMOTION_DETECTOR__KIND": "none",  # every decodable frame is a face: an event each
        "EMOTION_MODEL__TTA": "none",
        "EMOTION_LOG__LEVEL": "info",
        "EMOTION_PIPELINE__MAX_PAYLOAD_BYTES": str(MAX_PAYLOAD),
        "EMOTION_PIPELINE__MAX_PIXELS": str(MAX_PIXELS),
        # Nothing may be shed here: the test counts every message through.
        "EMOTION_PIPELINE__QUEUE_SIZE": "5000",
        "EMOTION_PIPELINE__MAX_AGE_S": "600",
    }
    out = listen([EVENTS, ERRORS, STATUS])
    log = tmp_path / "worker.log"
    proc = start_worker(env, log)
    try:
        wait_online(out)
        camera = publisher(mosquitto.port)
        good = encode_jpeg(np.random.default_rng(1).integers(0, 255, (48, 64, 3), dtype=np.uint8))
        camera.publish("emotion/frames/warmup", good, qos=1)
        out.wait_for(lambda m: m.topic == EVENTS, 60, "the first event")
        rss_before = rss_mb(proc.pid)

        bad = bad_payloads()
        want = {f"bad{i}": expected(data) for i, data in enumerate(bad)}
        goods = []
        t0 = time.monotonic()
        for i, data in enumerate(bad):
            camera.publish(f"emotion/frames/bad{i}", data, qos=1)
            if i % GOOD_EVERY == 0:
                goods.append(f"good{i}")
                camera.publish(f"emotion/frames/{goods[-1]}", good, qos=1)
            time.sleep(max(0.0, t0 + (i + len(goods)) / 200 - time.monotonic()))  # about 200 messages a second
        n_events = 1 + len(goods) + sum(1 for v in want.values() if v == "event")
        n_errors = sum(1 for v in want.values() if v != "event")
        deadline = time.monotonic() + 120
        while len(out.on(EVENTS)) < n_events or len(out.on(ERRORS)) < n_errors:
            assert time.monotonic() < deadline, (len(out.on(EVENTS)), n_events, len(out.on(ERRORS)), n_errors)
            time.sleep(0.2)
        time.sleep(1)
        assert proc.poll() is None, "the worker exited"
        rss_after = rss_mb(proc.pid)
    finally:
        camera.loop_stop()
        code = stop(proc, timeout=30)

    errors = [payload(m) for m in out.on(ERRORS)]
    events = [payload(m) for m in out.on(EVENTS)]
    # One error record per bad payload, with the reason its decoding gives; an event for every other message.
    got = {e["device_id"]: e["reason"] for e in errors}
    assert len(errors) == len(got) == n_errors
    assert got == {d: r for d, r in want.items() if r != "event"}
    devices = Counter(e["device_id"] for e in events)
    assert set(devices) == {"warmup", *goods, *(d for d, r in want.items() if r == "event")}
    assert set(devices.values()) == {1}
    assert len(set(want.values())) >= 8, Counter(want.values())  # the mix reaches many kinds of refusal

    assert code == 0
    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines()]  # every line is JSON: nothing on stderr
    stopped = next(r for r in records if r["event"] == "stopped")
    assert stopped["rejected"] == n_errors and stopped["events"] == n_events
    assert stopped.get("dropped", 0) == 0 and stopped.get("internal_errors", 0) == 0
    assert stopped["rejected_by_reason"].get("internal", 0) == 0
    corrupt_but_decoded = sum(1 for r in records if r["event"] == "frames decoded despite corrupt data")
    assert stopped.get("decode_warnings", 0) > 0 and corrupt_but_decoded > 0
    assert rss_after - rss_before < RSS_GROWTH_MB, (rss_before, rss_after)
    print(f"RSS {rss_before:.0f} MB after the first frame, {rss_after:.0f} MB after {BAD + len(goods)} messages")
