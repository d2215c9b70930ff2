"""Face detection (Haar, none, YuNet set-up errors) and face crops."""

from __future__ import annotations

import threading

import cv2
import numpy as np
import pytest

from worker.config import DetectorSettings
from worker.faces import Box, DetectorError, FaceDetector, crop_faces, share_cores


def iou(box: Box, rect: tuple[int, int, int, int]) -> float:
    x, y, w, h = rect
    ix = max(0, min(box.x + box.w, x + w) - max(box.x, x))
    iy = max(0, min(box.y + box.h, y + h) - max(box.y, y))
    inter = ix * iy
    return inter / (box.area + w * h - inter)


@pytest.fixture(scope="module")
def haar() -> FaceDetector:
    return FaceDetector(DetectorSettings())


def inside(box: Box, frame: np.ndarray) -> bool:
    h, w = frame.shape[:2]
    return box.x >= 0 and box.y >= 0 and box.w > 0 and box.h > 0 and box.x + box.w <= w and box.y + box.h <= h


def test_haar_finds_the_pasted_face(haar, face_frames):
    for frame, rect in face_frames:
        boxes = haar.detect(frame)
        assert len(boxes) == 1, boxes
        assert iou(boxes[0], rect) > 0.5, (boxes[0], rect)
        assert inside(boxes[0], frame) and boxes[0].score == 1.0


@pytest.mark.parametrize("detect_width", [320, 480, 640, 1024])
def test_boxes_are_in_frame_pixels_whatever_the_detection_width(face_frames, detect_width):
    detector = FaceDetector(DetectorSettings(detect_width=detect_width))
    frame, rect = face_frames[0]
    boxes = detector.detect(frame)
    assert len(boxes) == 1 and iou(boxes[0], rect) > 0.5, (boxes, rect)


def test_large_frame_is_scaled_down_and_boxes_scaled_back(face_frames):
    frame, (x, y, w, h) = face_frames[0]
    big = cv2.resize(frame, (1280, 960), interpolation=cv2.INTER_LINEAR)
    big_rect = (2 * x, 2 * y, 2 * w, 2 * h)
    small = FaceDetector(DetectorSettings(detect_width=320)).detect(big)  # detects at a quarter of the size
    full = FaceDetector(DetectorSettings(detect_width=1280)).detect(big)  # detects at full size
    assert len(small) == 1 and len(full) == 1
    assert iou(small[0], big_rect) > 0.5 and iou(full[0], big_rect) > 0.5
    assert small[0].w > 2 * 100  # in the 1280-pixel frame's pixels, not the 320-pixel copy's
    assert iou(small[0], (full[0].x, full[0].y, full[0].w, full[0].h)) > 0.6


def test_min_face_px_is_in_frame_pixels(face_frames):
    frame, rect = face_frames[0]
    found = FaceDetector(DetectorSettings(detect_width=320, min_face_px=100)).detect(frame)
    assert len(found) == 1 and iou(found[0], rect) > 0.5
    assert FaceDetector(DetectorSettings(detect_width=320, min_face_px=300)).detect(frame) == []


@pytest.mark.parametrize("value", [0, 90, 255])
def test_blank_frame_has_no_faces(haar, value):
    assert haar.detect(np.full((480, 640, 3), value, np.uint8)) == []


def test_noise_frame_has_no_faces(haar):
    noise = np.random.default_rng(0).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    noise = cv2.GaussianBlur(noise, (0, 0), 3)
    assert haar.detect(noise) == []


def test_kind_none_returns_the_whole_frame():
    detector = FaceDetector(DetectorSettings(kind="none"))
    assert detector.detect(np.zeros((123, 77, 3), np.uint8)) == [Box(0, 0, 77, 123)]


def face_of(face_frames, i: int) -> np.ndarray:
    frame, (x, y, w, h) = face_frames[i % len(face_frames)]
    return cv2.cvtColor(frame[y : y + h, x : x + w], cv2.COLOR_BGR2GRAY)


def two_faces(face_frames, big_left: bool) -> tuple[np.ndarray, tuple, tuple]:
    """A 640x480 frame with a 220-pixel face and a 120-pixel face; returns (frame, big rect, small rect)."""
    canvas = np.full((480, 640), 90, np.uint8)
    big_rect, small_rect = ((20, 40, 220, 220), (400, 200, 120, 120))
    if not big_left:
        big_rect, small_rect = ((400, 40, 220, 220), (40, 200, 120, 120))
    for (x, y, w, h), i in ((big_rect, 0), (small_rect, 1)):
        canvas[y : y + h, x : x + w] = cv2.resize(face_of(face_frames, i), (w, h), interpolation=cv2.INTER_CUBIC)
    return cv2.cvtColor(canvas, cv2.COLOR_GRAY2BGR), big_rect, small_rect


@pytest.mark.parametrize("big_left", [True, False])
def test_boxes_are_sorted_largest_first_and_limited(face_frames, big_left):
    frame, big_rect, small_rect = two_faces(face_frames, big_left)
    boxes = FaceDetector(DetectorSettings(max_faces=8)).detect(frame)
    assert len(boxes) == 2, boxes
    assert boxes[0].area > boxes[1].area
    assert iou(boxes[0], big_rect) > 0.5 and iou(boxes[1], small_rect) > 0.5
    one = FaceDetector(DetectorSettings(max_faces=1)).detect(frame)
    assert one == boxes[:1]


def test_detector_works_from_several_threads_at_once(haar, face_frames):
    frame2, _, _ = two_faces(face_frames, True)
    frames = [f for f, _ in face_frames] + [frame2, np.full((480, 640, 3), 90, np.uint8)]
    expected = [haar.detect(f) for f in frames]
    assert sum(len(e) for e in expected) >= len(face_frames) + 2
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def work(t: int) -> None:
        try:
            start.wait()
            results[t] = [haar.detect(frames[(t + k) % len(frames)]) for k in range(3 * len(frames))]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    assert sorted(results) == [0, 1, 2, 3]
    for t, found in results.items():
        for k, boxes in enumerate(found):
            assert boxes == expected[(t + k) % len(frames)], (t, k)


def test_yunet_with_a_missing_model(tmp_path):
    missing = tmp_path / "models" / "face_detection_yunet.onnx"
    with pytest.raises(DetectorError) as info:
        FaceDetector(DetectorSettings(kind="yunet", yunet_model=missing))
    assert str(missing) in str(info.value) and "detector.yunet_model" in str(info.value)


def test_yunet_with_a_file_that_is_not_onnx(tmp_path):
    bad = tmp_path / "yunet.onnx"
    bad.write_bytes(b"this is not an ONNX model")
    with pytest.raises(DetectorError) as info:
        FaceDetector(DetectorSettings(kind="yunet", yunet_model=bad))
    assert str(bad) in str(info.value) and "could not be loaded" in str(info.value)


# --- crops ----------------------------------------------------------------------------------------


def test_crop_faces_shape_and_content():
    grey = np.zeros((100, 200), np.uint8)
    grey[10:58, 20:68] = 200  # a 48x48 bright square
    frame = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    crops = crop_faces(frame, [Box(20, 10, 48, 48), Box(100, 50, 30, 30)])
    assert crops.shape == (2, 48, 48) and crops.dtype == np.uint8
    assert (crops[0] == 200).all()  # same size: a plain copy
    assert (crops[1] == 0).all()


def test_crop_faces_without_boxes():
    crops = crop_faces(np.zeros((50, 50, 3), np.uint8), [])
    assert crops.shape == (0, 48, 48) and crops.dtype == np.uint8


def test_crop_is_made_square_around_the_centre():
    grey = np.zeros((200, 200), np.uint8)
    grey[50:150, 75:125] = 255  # a tall 50x100 bright bar
    crops = crop_faces(grey, [Box(75, 50, 50, 100)], size=100)
    # the square is 100x100 around the bar's centre: bright in the middle half, dark either side
    assert (crops[0][:, 30:70] == 255).all()
    assert (crops[0][:, :20] == 0).all() and (crops[0][:, 80:] == 0).all()


def test_crop_faces_scales_large_boxes_down():
    grey = np.tile(np.arange(96, dtype=np.uint8) * 2, (96, 1))  # a horizontal ramp
    crops = crop_faces(grey, [Box(0, 0, 96, 96)])
    expected = cv2.resize(grey, (48, 48), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(crops[0], expected)


@pytest.mark.parametrize(
    "box, pad_side",
    [
        (Box(0, 20, 20, 40), "left"),  # a tall box at the left edge: the square reaches 10 px out
        (Box(80, 20, 20, 40), "right"),
        (Box(20, 0, 40, 20), "top"),
        (Box(20, 80, 40, 20), "bottom"),
    ],
)
def test_crop_at_the_border_replicates_the_edge(box, pad_side):
    # 100x100 frame: a distinct value on each border line, a ramp inside.
    grey = np.full((100, 100), 100, np.uint8)
    grey[:, 0], grey[:, 99], grey[0, :], grey[99, :] = 10, 20, 30, 40
    out = crop_faces(grey, [box], size=40)[0]  # side 40 -> no resampling
    side = max(box.w, box.h)
    cx, cy = box.x + box.w / 2, box.y + box.h / 2
    x0, y0 = int(round(cx - side / 2)), int(round(cy - side / 2))
    padded = np.pad(grey, side, mode="edge")
    np.testing.assert_array_equal(out, padded[y0 + side : y0 + 2 * side, x0 + side : x0 + 2 * side])
    if pad_side == "left":
        assert (out[:, :11] == 10).all() and (out[:, 11:] == 100).all()
    elif pad_side == "right":
        assert (out[:, -11:] == 20).all() and (out[:, :-11] == 100).all()
    elif pad_side == "top":
        assert (out[:11, :] == 30).all() and (out[11:, :] == 100).all()
    else:
        assert (out[-11:, :] == 40).all() and (out[:-11, :] == 100).all()


def test_crop_bigger_than_the_frame():
    grey = np.arange(30 * 40, dtype=np.uint16).reshape(30, 40).astype(np.uint8)
    out = crop_faces(grey, [Box(0, 0, 40, 30)], size=40)[0]  # square of 40 around a 40x30 frame
    np.testing.assert_array_equal(out[5:35], grey)
    np.testing.assert_array_equal(out[:5], np.repeat(grey[:1], 5, axis=0))
    np.testing.assert_array_equal(out[35:], np.repeat(grey[-1:], 5, axis=0))


def test_crops_of_detected_faces(haar, face_frames):
    frame, rect = face_frames[0]
    boxes = haar.detect(frame)
    crops = crop_faces(frame, boxes)
    assert crops.shape == (1, 48, 48)
    # the crop shows the pasted face, not the flat background around it
    assert crops[0].std() > 20


def test_share_cores_gives_opencv_one_thread_only_when_the_pipeline_detects_in_parallel():
    before = cv2.getNumThreads()
    try:
        cv2.setNumThreads(2)
        assert share_cores(1) == 2 == cv2.getNumThreads()  # one pipeline thread keeps OpenCV's pool
        assert share_cores(2) == 1 == cv2.getNumThreads()
    finally:
        cv2.setNumThreads(before)
