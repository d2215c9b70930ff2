"""A steady emotion per camera, from the scores of its frames.

Each camera's class scores are smoothed exponentially over time (a time constant
in seconds, so irregular frame spacing weighs each frame by the time it covers).
The state changes only with hysteresis: a new emotion must lead with at least
``min_confidence``, by ``margin`` over the current one, for ``hold_s`` seconds.
After ``absent_after_s`` without a face the state is ``none``; leaving ``none``
takes a face seen for ``hold_s``. ``none`` has confidence 0.

Out: the retained state document on ``<state>/<device>`` (on each change, and at
most every ``state_interval_s`` while frames come), one record per change on the
changes topic, and every evaluation to the listeners (``add_listener``).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from worker.events import iso
from worker.log import get_logger

NONE = "none"
log = get_logger("emotion-worker.state")

Listener = Callable[[dict, dict | None, float], None]


@dataclass
class _Camera:
    device: str
    since: float
    emotion: str = NONE
    scores: list[float] | None = None  # smoothed; None until a face is seen (again)
    scored_at: float = 0.0  # time of the last frame that updated the scores
    last_face: float | None = None
    face_since: float | None = None  # first face after 'none'
    faces: int = 0
    candidate: str | None = None
    candidate_since: float = 0.0
    published_at: float | None = None
    updated_at: float = 0.0


def combine_faces(faces: list[dict], classes: tuple[str, ...], how: str) -> list[float]:
    """One score per class for a frame's ``faces`` (face records with ``box`` [x, y, w, h] and ``scores``).

    ``largest``: the scores of the face with the largest box; ``mean``: the mean over the faces.
    """
    if how == "largest":
        face = max(faces, key=lambda f: f["box"][2] * f["box"][3])
        return [float(face["scores"].get(c, 0.0)) for c in classes]
    return [sum(float(f["scores"].get(c, 0.0)) for f in faces) / len(faces) for c in classes]


class StateTracker:
    """Per-camera steady emotions; thread-safe (frames from the pipeline, ticks from its own thread).

    ``settings`` is the ``state`` section, ``classes`` the model's class names in output order, ``model``
    ``{"name", "version"}``. ``publish_state(device, doc)`` and ``publish_change(record)`` send to MQTT;
    ``clock`` gives Unix seconds (injectable for tests and the smoothing benchmark).
    """

    def __init__(
        self,
        settings,
        classes: tuple[str, ...],
        model: dict,
        publish_state: Callable[[str, dict], None] | None = None,
        publish_change: Callable[[dict], None] | None = None,
        clock: Callable[[], float] = time.time,
        stats=None,
    ):
        self.settings = settings
        self.classes = tuple(classes)
        self.model = dict(model)
        self.publish_state = publish_state
        self.publish_change = publish_change
        self.clock = clock
        self.stats = stats
        self._cameras: dict[str, _Camera] = {}
        self._listeners: list[Listener] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- listeners and life cycle -----------------------------------------------------------------
    def add_listener(self, fn: Listener) -> None:
        """Call ``fn(state, change, now)`` after every evaluation of a camera (each frame and each tick).

        ``change`` is the change record when that evaluation changed the emotion, else None. ``fn`` runs
        with the tracker locked and must not block; an exception is logged and counted.
        """
        with self._lock:
            self._listeners.append(fn)

    def start(self) -> None:
        """Tick every ``tick_s`` in a thread, so cameras that stop sending frames still become ``none``."""
        self._thread = threading.Thread(target=self._tick_loop, name="state-tick", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout)

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.settings.tick_s):
            try:
                self.tick()
            except Exception:  # a bug must not end the ticks
                log.exception("state tick failed")

    # -- input -------------------------------------------------------------------------------------
    def observe(self, device: str, faces: list[dict], now: float | None = None) -> dict:
        """Take one frame of ``device`` (its face records, possibly none); returns the state document.

        ``now`` defaults to the clock: the time the frame was processed, in Unix seconds.
        """
        with self._lock:
            now = self.clock() if now is None else now
            cam = self._cameras.get(device)
            first = cam is None
            if first:
                cam = self._cameras[device] = _Camera(device, since=now)
            cam.faces = len(faces)
            cam.updated_at = now
            if faces:
                self._smooth(cam, combine_faces(faces, self.classes, self.settings.combine), now)
                cam.last_face = now
                if cam.face_since is None:
                    cam.face_since = now
            change = self._absence(cam, now) or (self._decide(cam, now) if faces else None)
            interval = self.settings.state_interval_s
            due = interval > 0 and cam.published_at is not None and now - cam.published_at >= interval
            return self._emit(cam, change, now, publish=first or change is not None or due)

    def tick(self, now: float | None = None) -> None:
        """Evaluate every camera without a frame: ``none`` after ``absent_after_s``; listeners see each."""
        with self._lock:
            now = self.clock() if now is None else now
            for cam in list(self._cameras.values()):
                change = self._absence(cam, now)
                if change:
                    cam.updated_at = now
                self._emit(cam, change, now, publish=change is not None)

    def forget(self, device: str) -> bool:
        """Drop everything known about ``device``; True if it was known."""
        with self._lock:
            return self._cameras.pop(device, None) is not None

    def devices(self) -> list[str]:
        with self._lock:
            return list(self._cameras)

    def state(self, device: str) -> dict | None:
        """The current state document of ``device``, or None if it was never seen."""
        with self._lock:
            cam = self._cameras.get(device)
            return self._document(cam) if cam else None

    # -- the rules ---------------------------------------------------------------------------------
    def _smooth(self, cam: _Camera, scores: list[float], now: float) -> None:
        tau = self.settings.time_constant_s
        if cam.scores is None or tau <= 0:
            cam.scores = list(scores)
        else:
            # Each frame weighs by the time since the previous one: a frame after a long gap counts for
            # more than one of a burst. Out-of-order processing gives dt < 0, counted as 0.
            a = 1.0 - math.exp(-max(0.0, now - cam.scored_at) / tau)
            cam.scores = [s + a * (x - s) for s, x in zip(cam.scores, scores)]
        cam.scored_at = now

    def _absence(self, cam: _Camera, now: float) -> dict | None:
        """After ``absent_after_s`` without a face: forget the scores, and change to ``none`` if not there yet."""
        last = cam.last_face if cam.last_face is not None else cam.since
        if now - last < self.settings.absent_after_s:
            return None
        cam.scores, cam.face_since, cam.candidate, cam.last_face = None, None, None, None
        if cam.emotion == NONE:
            return None
        cam.faces = 0
        return self._change(cam, NONE, now)

    def _decide(self, cam: _Camera, now: float) -> dict | None:
        s = self.settings
        scores = cam.scores
        top = max(range(len(scores)), key=scores.__getitem__)
        new = self.classes[top]
        if cam.emotion == NONE:
            # Someone came into view: the state follows once a face has been seen for hold_s.
            return self._change(cam, new, now) if now - cam.face_since >= s.hold_s else None
        current = scores[self.classes.index(cam.emotion)] if cam.emotion in self.classes else 0.0
        if new == cam.emotion or scores[top] < s.min_confidence or scores[top] - current < s.margin:
            cam.candidate = None
            return None
        if cam.candidate != new:
            cam.candidate, cam.candidate_since = new, now
        return self._change(cam, new, now) if now - cam.candidate_since >= s.hold_s else None

    def _change(self, cam: _Camera, new: str, now: float) -> dict:
        record = {
            "device_id": cam.device,
            "from": cam.emotion,
            "to": new,
            "confidence": round(self._confidence(cam, new), 4),
            "at": iso(now),
            "held_s": round(now - cam.since, 3),
        }
        cam.emotion, cam.since, cam.candidate = new, now, None
        return record

    def _confidence(self, cam: _Camera, emotion: str) -> float:
        if emotion == NONE or cam.scores is None:
            return 0.0
        return cam.scores[self.classes.index(emotion)]

    # -- output ------------------------------------------------------------------------------------
    def _document(self, cam: _Camera) -> dict:
        scores = cam.scores or [0.0] * len(self.classes)
        return {
            "device_id": cam.device,
            "emotion": cam.emotion,
            "confidence": round(self._confidence(cam, cam.emotion), 4),
            "scores": {c: round(v, 4) for c, v in zip(self.classes, scores)},
            "faces": cam.faces,
            "since": iso(cam.since),
            "updated_at": iso(cam.updated_at),
            "model": dict(self.model),
        }

    def _emit(self, cam: _Camera, change: dict | None, now: float, publish: bool) -> dict:
        doc = self._document(cam)
        if change is not None:
            self._count("state_changes")
            log.info(
                "state changed",
                device=cam.device,
                emotion=change["to"],
                previous=change["from"],
                confidence=change["confidence"],
                held_s=change["held_s"],
            )
        if publish:
            cam.published_at = now
            self._send(cam.device, self.publish_state, cam.device, doc)
            if change is not None:
                self._send(cam.device, self.publish_change, change)
        for fn in list(self._listeners):
            try:
                fn(doc, change, now)
            except Exception:
                self._count("listener_errors")
                log.exception("state listener failed", device=cam.device, listener=getattr(fn, "__qualname__", fn))
        return doc

    def _send(self, device: str, fn, *args) -> None:
        if fn is None:
            return
        try:
            fn(*args)
        except Exception:
            self._count("state_publish_errors")
            log.exception("could not publish the state", device=device)

    def _count(self, key: str) -> None:
        if self.stats is not None:
            self.stats.add(key)
