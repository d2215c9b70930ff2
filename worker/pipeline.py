"""Threads and queues between the MQTT client and the model.

    paho network thread --submit()--> inbox (bounded, drops oldest)
      --> prepare threads: device id, age, decode, detect, crop
      --> ready (bounded, drops oldest)
      --> inference thread: batches faces of several frames, publishes events

Frames are perishable: a full queue drops its oldest frame and counts it, so
latency stays bounded when the worker falls behind.

Every frame ends in one outcome (event, error, no_face, stale or dropped), handed to
``report`` with the frame's reply topic, if it asked for one.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import structlog

from worker.classify import Classifier
from worker.config import Settings
from worker.events import face_record, make_error, make_event, make_outcome
from worker.faces import Box, FaceDetector, crop_faces
from worker.frames import Frame, FrameError, Reply, decode_payload
from worker.health import Heartbeat
from worker.log import Throttled, get_logger
from worker.stats import IntervalStats, Stats
from worker.topics import device_id_for

log = get_logger("emotion-worker.pipeline")


class DropOldestQueue:
    """A bounded FIFO whose ``put`` drops (and returns) the oldest item when full."""

    def __init__(self, maxsize: int):
        self._items: deque = deque()
        self._maxsize = maxsize
        self._cond = threading.Condition()

    def put(self, item):
        with self._cond:
            dropped = self._items.popleft() if len(self._items) >= self._maxsize else None
            self._items.append(item)
            self._cond.notify()
            return dropped

    def get(self, timeout: float):
        """The oldest item, or None after ``timeout`` seconds."""
        with self._cond:
            if not self._items:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Message:
    topic: str
    payload: bytes
    received_at: float
    reply: Reply | None = None


@dataclass
class Job:
    frame: Frame
    boxes: list[Box]
    crops: np.ndarray


class Pipeline:
    """Frames in through :meth:`submit`; events and error records out through the two callbacks."""

    def __init__(
        self,
        settings: Settings,
        classifier: Classifier,
        detector: FaceDetector,
        publish_event: Callable[[dict], None],
        publish_error: Callable[[dict], None],
        report: Callable[[dict, Reply | None], None] | None = None,
        observe: Callable[[Frame, list[dict]], None] | None = None,
    ):
        self.settings = settings
        self.classifier = classifier
        self.detector = detector
        self.publish_event = publish_event
        self.publish_error = publish_error
        self.report = report
        self.observe = observe  # each processed frame and its faces, to the per-camera state
        p = settings.pipeline
        self.inbox = DropOldestQueue(p.queue_size)
        self.ready = DropOldestQueue(p.queue_size)
        self.stats = Stats()
        self.interval = IntervalStats()
        # Each stage beats when it finishes work or finds none: see worker.health.
        self.heartbeat = Heartbeat(("prepare", "inference"))
        self._stop = threading.Event()
        self._pending = 0  # frames accepted and not yet finished
        self._pending_cond = threading.Condition()
        self._threads: list[threading.Thread] = []
        self._last_drop_log = 0.0
        self._no_face_log: dict[str, tuple[float | None, int]] = {}  # device: (last line, frames since)
        self._stale_log = Throttled(log, "frames skipped, older than pipeline.max_age_s", key="device")
        self._decode_warning_log = Throttled(log, "frames decoded despite corrupt data", key="device")

    # -- life cycle -------------------------------------------------------------------------------
    def start(self) -> None:
        for i in range(self.settings.pipeline.threads):
            self._threads.append(threading.Thread(target=self._prepare_loop, name=f"prepare-{i}", daemon=True))
        self._threads.append(threading.Thread(target=self._infer_loop, name="inference", daemon=True))
        for t in self._threads:
            t.start()

    def drain(self, timeout: float) -> bool:
        """Wait until every accepted frame is finished; False if ``timeout`` seconds passed first."""
        deadline = time.monotonic() + timeout
        with self._pending_cond:
            while self._pending > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._pending_cond.wait(left)
        return True

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        self._stale_log.flush()
        self._decode_warning_log.flush()

    # -- input (paho's network thread) -----------------------------------------------------------
    def submit(self, topic: str, payload: bytes, received_at: float, reply: Reply | None = None) -> None:
        """Queue a message; never blocks and does no work beyond that. ``reply``: where its outcome goes."""
        self._begin()
        dropped = self.inbox.put(Message(topic, payload, received_at, reply))
        if dropped is not None:
            self._dropped(dropped)

    def _begin(self) -> None:
        with self._pending_cond:
            self._pending += 1
        self.stats.add("received")

    def _done(self, n: int = 1) -> None:
        with self._pending_cond:
            self._pending -= n
            if self._pending <= 0:
                self._pending_cond.notify_all()

    def _dropped(self, item: Message | Job) -> None:
        self.stats.add("dropped")
        self._done()
        topic = item.topic if isinstance(item, Message) else item.frame.topic
        now = time.monotonic()
        if now - self._last_drop_log > 5:  # one line per burst, the count says the rest
            self._last_drop_log = now
            log.warning("behind, dropping oldest frames", topic=topic, dropped_total=self.stats.counts["dropped"])
        message = f"dropped: the worker was behind and the queue of {self.settings.pipeline.queue_size} frames was full (pipeline.queue_size)"
        if isinstance(item, Message):
            try:
                device = device_id_for(item.topic, self.settings.topics.frames)
            except FrameError:
                device = None
            self._outcome("dropped", device, item.topic, None, message, item.reply)
        else:
            self._frame_outcome("dropped", item.frame, message)

    def _outcome(self, outcome: str, device, topic: str, frame_id, message: str, reply: Reply | None, **extra) -> None:
        """Hand a frame's outcome to ``report``; a failure there is logged and costs nothing else."""
        if self.report is None:
            return
        try:
            self.report(make_outcome(outcome, device, topic, frame_id, message, time.time(), **extra), reply)
        except Exception:
            log.exception("could not report a frame's outcome", outcome=outcome, topic=topic)

    def _frame_outcome(self, outcome: str, frame: Frame, message: str, **extra) -> None:
        self._outcome(outcome, frame.device_id, frame.topic, frame.frame_id, message, frame.reply, **extra)

    def _no_face(self, frame: Frame) -> None:
        """Report a frame without a face; log it at info, at most once a minute per device."""
        kind = self.settings.detector.kind
        self._frame_outcome("no_face", frame, f"no face found (detector {kind})", detector=kind)
        now = time.monotonic()
        last, count = self._no_face_log.get(frame.device_id, (None, 0))
        if len(self._no_face_log) > 1000:  # device ids come from topics: bound what they can grow
            self._no_face_log.clear()
        if last is None or now - last >= 60:
            log.info("no face found", device=frame.device_id, frame=frame.frame_id, detector=kind, frames=count + 1)
            self._no_face_log[frame.device_id] = (now, 0)
        else:
            self._no_face_log[frame.device_id] = (last, count + 1)

    # -- prepare threads --------------------------------------------------------------------------
    def _prepare_loop(self) -> None:
        while not self._stop.is_set():
            msg = self.inbox.get(timeout=0.1)
            self.heartbeat.beat("prepare")
            if msg is None:
                continue
            try:
                job = self._prepare(msg)
            except Exception as exc:  # a bug must cost one frame, never the worker
                log.exception("frame failed", topic=msg.topic)
                self._reject(None, msg, FrameError("internal", f"internal error: {exc!r}"))
                job = None
            if job is None:
                self._done()
            elif not job.boxes:
                self.stats.add("no_face")
                if self.settings.pipeline.publish_empty:
                    self._publish(job.frame, [])
                else:
                    self.stats.add("processed")
                    self._no_face(job.frame)
                self._observe(job.frame, [])
                self._done()
            else:
                dropped = self.ready.put(job)
                if dropped is not None:
                    self._dropped(dropped)

    def _prepare(self, msg: Message) -> Job | None:
        p = self.settings.pipeline
        try:
            device = device_id_for(msg.topic, self.settings.topics.frames)
        except FrameError as err:
            self._reject(None, msg, err)
            return None
        age = time.time() - msg.received_at
        if age > p.max_age_s:
            self._stale(device, age)
            self._outcome("stale", device, msg.topic, None, _stale_message(age, "waiting", p.max_age_s), msg.reply)
            return None
        try:
            frame = decode_payload(msg.payload, device, msg.topic, p.max_payload_bytes, p.max_pixels, msg.received_at)
        except FrameError as err:
            self._reject(device, msg, err)
            return None
        if msg.reply is not None:  # the MQTT 5 response topic wins over the envelope's reply_to
            frame.reply = msg.reply
        if frame.warnings:
            self.stats.add("decode_warnings")
            self._decode_warning_log(device, frame=frame.frame_id, warning=frame.warnings[0])
        with structlog.contextvars.bound_contextvars(device=device, frame=frame.frame_id):
            age = time.time() - frame.timestamp
            if age > p.max_age_s:
                self._stale(device, age)
                self._frame_outcome("stale", frame, _stale_message(age, "since capture", p.max_age_s))
                return None
            boxes = self.detector.detect(frame.image)
            log.debug("frame decoded", size=f"{frame.image.shape[1]}x{frame.image.shape[0]}", faces=len(boxes))
        return Job(frame, boxes, crop_faces(frame.image, boxes))

    def _stale(self, device: str, age_s: float) -> None:
        self.stats.add("stale")
        self._stale_log(device, age_s=round(age_s, 2), max_age_s=self.settings.pipeline.max_age_s)

    def _reject(self, device: str | None, msg: Message, err: FrameError) -> None:
        self.stats.reject(err.reason)
        log.warning("frame rejected", device=device, topic=msg.topic, reason=err.reason, error=str(err))
        record = make_error(device, msg.topic, err.reason, str(err), len(msg.payload), time.time())
        try:
            self.publish_error(record)
        except Exception:
            log.exception("could not publish error record")
        reply = msg.reply or getattr(err, "reply", None)
        self._outcome("error", device, msg.topic, None, f"rejected: {err.reason}: {err}", reply, error=record)

    def _frame_failed(self, frame: Frame, stage: str, exc: Exception) -> None:
        """Report ``frame`` as lost to an internal error in ``stage`` (inference, publish)."""
        self._reject(
            frame.device_id,
            Message(frame.topic, b"", frame.received_at, frame.reply),
            FrameError("internal", f"{stage} failed: {exc!r}"),
        )

    # -- inference thread -------------------------------------------------------------------------
    def _infer_loop(self) -> None:
        m = self.settings.model
        while not self._stop.is_set():
            first = self.ready.get(timeout=0.1)
            self.heartbeat.beat("inference")
            if first is None:
                continue
            jobs, faces = [first], len(first.boxes)
            deadline = time.monotonic() + m.max_wait_ms / 1000
            while faces < m.batch_size:
                left = deadline - time.monotonic()
                job = self.ready.get(timeout=left) if left > 0 else None
                if job is None:
                    break
                jobs.append(job)
                faces += len(job.boxes)
            try:
                self._classify(jobs)
            except Exception as exc:
                log.exception("inference failed", frames=len(jobs))
                for job in jobs:
                    self._frame_failed(job.frame, "inference", exc)
            finally:
                self._done(len(jobs))

    def _classify(self, jobs: list[Job]) -> None:
        crops = np.concatenate([j.crops for j in jobs])
        started = time.perf_counter()
        probs = self.classifier.predict(crops).tolist()
        self.stats.observe("inference_seconds", time.perf_counter() - started)
        self.stats.observe("batch_faces", len(crops))
        self.interval.batch(len(crops))
        classes = self.classifier.info.classes
        at = 0
        for job in jobs:
            faces = [face_record(b, probs[at + i], classes) for i, b in enumerate(job.boxes)]
            at += len(job.boxes)
            self.stats.add("faces", len(faces))
            self._publish(job.frame, faces)
            self._observe(job.frame, faces)

    def _observe(self, frame: Frame, faces: list[dict]) -> None:
        """Hand a processed frame and its faces to the per-camera state; a failure there costs nothing else."""
        if self.observe is None:
            return
        try:
            self.observe(frame, faces)
        except Exception:
            self.stats.add("state_errors")
            log.exception("state update failed", device=frame.device_id)

    def _publish(self, frame: Frame, faces: list[dict]) -> None:
        """Publish the event of ``frame``; a failure costs this frame only, in either thread."""
        events = self.settings.pipeline.publish_events  # off: the event still answers the frame's reply topic
        try:
            event = make_event(frame, faces, self.classifier.info, time.time())
            if events:
                self.publish_event(event)
        except Exception as exc:
            log.exception("publish failed", topic=frame.topic)
            self._frame_failed(frame, "publish", exc)
            return
        if events:
            self.stats.add("events")
        self.stats.add("processed")
        self.stats.latency(event["latency_ms"])
        self.interval.latency(event["latency_ms"])
        summary = ", ".join(f"{f['emotion']} {f['confidence']:.2f}" for f in faces) or "no face (event published)"
        self._frame_outcome("event", frame, summary, event=event)
        log.info(
            "event",
            device=frame.device_id,
            frame=frame.frame_id,
            emotion=event["emotion"],
            faces=len(faces),
            latency_ms=event["latency_ms"],
        )


def _stale_message(age: float, how: str, limit: float) -> str:
    return f"skipped: {age:.1f} s old ({how}), limit is {limit:g} s (pipeline.max_age_s)"
