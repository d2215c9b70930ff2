"""FER2013 loaders: the image-folder layout and the original ``fer2013.csv``.

Labels are mapped by class name, never by position, into the order of the class list asked for.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch

from worker.frames import IMAGE_SUFFIXES
from worker.model import CLASSES, INPUT_SIZE

# Label order of the original fer2013.csv (Goodfellow et al., ICML 2013 challenge).
CSV_LABELS = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
# Folder names of the image-folder layout and the Usage values of the CSV.
SPLITS = {"train": "Training", "val": "PublicTest", "test": "PrivateTest"}


class DataError(ValueError):
    """The data set is missing, malformed or has labels the model does not know."""


@dataclass
class Split:
    """One split held in memory: ``images`` uint8 (N, 48, 48), ``labels`` int64 (N,)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    source: str

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, n: int, seed: int = 0) -> Split:
        """A class-stratified random subset of about ``n`` images."""
        if n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self), generator=g)
        picked = []
        for c in range(len(self.classes)):
            idx = order[self.labels[order] == c]
            picked.append(idx[: max(1, round(n * len(idx) / len(self)))] if len(idx) else idx)
        keep = torch.cat(picked)
        return Split(self.images[keep], self.labels[keep], self.classes, self.source)


def load_split(data: str | Path, split: str, classes: tuple[str, ...] = CLASSES) -> Split:
    """Load ``split`` ("train", "val" or "test") of ``data``: a folder of ``<split>/<class>/*.jpg``, of
    ``<class>/*.jpg`` (``split`` ignored), or a ``fer2013.csv`` or a folder holding it."""
    data = Path(data)
    if not data.exists():
        raise DataError(f"data path {data} does not exist")
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}, expected one of {sorted(SPLITS)}")
    if data.is_file():
        return _load_csv(data, split, classes)
    if (data / split).is_dir():
        return _load_folder(data / split, classes)
    if (data / "fer2013.csv").is_file():
        return _load_csv(data / "fer2013.csv", split, classes)
    if any(p.is_dir() and p.name.lower() in classes for p in data.iterdir()):
        return _load_folder(data, classes)
    raise DataError(f"{data} has no '{split}/' folder, no class folders and no fer2013.csv")


def _folder_files(root: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """(image path, label index in ``classes``) for each image under ``root/<class>/``."""
    folders = sorted(p for p in root.iterdir() if p.is_dir())
    unknown = [p.name for p in folders if p.name.lower() not in classes]
    if unknown:
        raise DataError(f"{root}: class folders {unknown} are not among the model's classes {list(classes)}")
    files = [
        (path, classes.index(folder.name.lower()))
        for folder in folders
        for path in sorted(folder.iterdir())
        if path.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not files:
        raise DataError(f"{root}: no images found in its class folders")
    return files


def _decode(data: bytes | np.ndarray, where: object) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DataError(f"{where}: not a readable image")
    if img.shape != (INPUT_SIZE, INPUT_SIZE):
        img = cv2.resize(img, (INPUT_SIZE, INPUT_SIZE), interpolation=cv2.INTER_AREA)
    return img


def _load_folder(root: Path, classes: tuple[str, ...]) -> Split:
    files = _folder_files(root, classes)
    images = [_decode(path.read_bytes(), path) for path, _ in files]
    labels = [label for _, label in files]
    return Split(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), classes, str(root))


def _load_csv(path: Path, split: str, classes: tuple[str, ...]) -> Split:
    usage = SPLITS[split]
    images, labels = [], []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"emotion", "pixels"} - set(reader.fieldnames or ())
        if missing:
            raise DataError(f"{path}: CSV lacks the columns {sorted(missing)}")
        for row_no, row in enumerate(reader, start=2):
            if "Usage" in row and row["Usage"] != usage:
                continue
            try:
                name = CSV_LABELS[int(row["emotion"])]
                pixels = np.array(row["pixels"].split(), dtype=np.uint8)
                img = pixels.reshape(INPUT_SIZE, INPUT_SIZE)
            except (ValueError, IndexError) as exc:
                raise DataError(f"{path}:{row_no}: malformed row ({exc})") from None
            if name not in classes:
                raise DataError(f"{path}:{row_no}: label {name!r} is not among the model's classes")
            images.append(img)
            labels.append(classes.index(name))
    if not images:
        raise DataError(f"{path}: no rows with Usage {usage!r}")
    return Split(torch.from_numpy(np.stack(images)), torch.tensor(labels, dtype=torch.int64), classes, str(path))
