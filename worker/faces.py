"""Face detection: OpenCV Haar cascade, OpenCV YuNet, or none (frames are face crops).

Detection runs on a grey copy scaled down to ``detect_width`` pixels (Haar on a
640x480 frame takes about three times as long as on the same frame at half
size), and boxes are mapped back to frame pixels.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from worker.config import DetectorSettings
from worker.model import INPUT_SIZE


class DetectorError(ValueError):
    """The detector cannot be created (missing cascade or ONNX file)."""


@dataclass(frozen=True)
class Box:
    """A face in frame pixels: top-left corner, width, height; ``score`` in [0, 1] where known."""

    x: int
    y: int
    w: int
    h: int
    score: float = 1.0

    @property
    def area(self) -> int:
        return self.w * self.h


def share_cores(pipeline_threads: int) -> int:
    """Set OpenCV to one thread per call when ``pipeline_threads`` frames are detected at once: its own thread
    pool on top of theirs oversubscribes the cores (docs/benchmarks.md, "OpenCV threads"). One pipeline thread
    keeps OpenCV's pool. Process-wide; returns OpenCV's thread count."""
    if pipeline_threads > 1:
        cv2.setNumThreads(1)
    return cv2.getNumThreads()


class FaceDetector:
    """Finds faces in BGR frames. Safe to call from several threads."""

    def __init__(self, settings: DetectorSettings):
        self.settings = settings
        self.kind = settings.kind
        self._local = threading.local()  # cascades and YuNet keep per-call state
        if self.kind == "haar":
            path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
            if not path.is_file():
                raise DetectorError(f"Haar cascade {path} is missing from the OpenCV install")
            self._cascade_path = str(path)
            self._make()
        elif self.kind == "yunet":
            model = settings.yunet_model
            if model is None or not Path(model).is_file():
                raise DetectorError(f"YuNet model {model} does not exist (detector.yunet_model)")
            try:
                self._make()
            except cv2.error as exc:
                raise DetectorError(f"YuNet model {model} could not be loaded: {exc}") from None

    def _make(self):
        if self.kind == "haar":
            det = cv2.CascadeClassifier(self._cascade_path)
            if det.empty():
                raise DetectorError(f"Haar cascade {self._cascade_path} could not be loaded")
        else:
            det = cv2.FaceDetectorYN.create(
                str(self.settings.yunet_model), "", (320, 320), self.settings.score_threshold, 0.3, 50
            )
        self._local.det = det
        return det

    def _detector(self):
        return getattr(self._local, "det", None) or self._make()

    def detect(self, image: np.ndarray) -> list[Box]:
        """Faces in a BGR (H, W, 3) frame, largest first, at most ``max_faces``."""
        h, w = image.shape[:2]
        if self.kind == "none":
            return [Box(0, 0, w, h)]
        scale = min(1.0, self.settings.detect_width / w)
        small = (
            cv2.resize(image, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_AREA)
            if scale < 1
            else image
        )
        min_px = max(8, round(self.settings.min_face_px * scale))
        if self.kind == "haar":
            grey = cv2.equalizeHist(cv2.cvtColor(small, cv2.COLOR_BGR2GRAY))
            found = self._detector().detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(min_px, min_px))
            raw = [(x, y, bw, bh, 1.0) for (x, y, bw, bh) in (found if len(found) else [])]
        else:
            det = self._detector()
            det.setInputSize((small.shape[1], small.shape[0]))
            _, found = det.detect(small)
            raw = [(r[0], r[1], r[2], r[3], float(r[14])) for r in (found if found is not None else [])]
            raw = [r for r in raw if min(r[2], r[3]) >= min_px]
        boxes = []
        for x, y, bw, bh, score in raw:
            x0, y0 = max(0, int(round(x / scale))), max(0, int(round(y / scale)))
            x1, y1 = min(w, int(round((x + bw) / scale))), min(h, int(round((y + bh) / scale)))
            if x1 > x0 and y1 > y0:
                boxes.append(Box(x0, y0, x1 - x0, y1 - y0, round(score, 4)))
        boxes.sort(key=lambda b: b.area, reverse=True)
        return boxes[: self.settings.max_faces]


def crop_faces(image: np.ndarray, boxes: list[Box], size: int = INPUT_SIZE) -> np.ndarray:
    """Grey ``size`` x ``size`` uint8 crops (N, size, size) of ``boxes`` in a BGR frame.

    Each crop is the box made square around its centre (FER2013 faces are square
    crops); parts outside the frame are filled by replicating the edge.
    """
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.ndim == 3 else image
    h, w = grey.shape
    crops = np.empty((len(boxes), size, size), np.uint8)
    for i, b in enumerate(boxes):
        side = max(b.w, b.h)
        cx, cy = b.x + b.w / 2, b.y + b.h / 2
        x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
        x1, y1 = x0 + side, y0 + side
        pad = max(0, -x0, -y0, x1 - w, y1 - h)
        src = cv2.copyMakeBorder(grey, pad, pad, pad, pad, cv2.BORDER_REPLICATE) if pad else grey
        face = src[y0 + pad : y1 + pad, x0 + pad : x1 + pad]
        crops[i] = cv2.resize(face, (size, size), interpolation=cv2.INTER_AREA if side > size else cv2.INTER_LINEAR)
    return crops
