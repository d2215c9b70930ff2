"""Fixtures for the training tests: a small copy of FER2013 and one tiny fit run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import FER
from worker.model import CLASSES

# Images per class copied from FER2013: enough for `fit --limit 300` (7 x 50 = 350
# train, 7 x 12 = 84 val) while loading in well under a second, unlike the full
# 32,000 images.
TRAIN_PER_CLASS = 50
VAL_PER_CLASS = 12

# Arguments of every fit run in these tests: seconds on one CPU thread.
TINY_FIT = ["--limit", "300", "--epochs", "1", "--width", "0.125", "--device", "cpu"]


def fer_images(split: str, name: str, n: int, skip: int = 0) -> list[Path]:
    """The first ``n`` (after ``skip``) FER2013 images of class ``name`` in ``split``, by file name."""
    paths = sorted((FER / split / name).glob("*.jpg"))[skip : skip + n]
    assert len(paths) == n, f"expected {n} images in {FER / split / name}, found {len(paths)}"
    return paths


def copy_images(paths: list[Path], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for path in paths:
        shutil.copy(path, folder / path.name)


@pytest.fixture(scope="session")
def small_fer(tmp_path_factory) -> Path:
    """A FER2013 folder tree (train/ and val/, all seven classes) with a few hundred real images."""
    root = tmp_path_factory.mktemp("fer-small")
    for name in CLASSES:
        copy_images(fer_images("train", name, TRAIN_PER_CLASS), root / "train" / name)
        copy_images(fer_images("val", name, VAL_PER_CLASS), root / "val" / name)
    return root


@pytest.fixture(scope="session")
def best_run(small_fer, tmp_path_factory) -> Path:
    """The --out folder of a finished one-epoch `emotion-train fit` on ``small_fer``."""
    from training.cli import main

    out = tmp_path_factory.mktemp("run-best")
    assert main(["fit", "--data", str(small_fer), "--out", str(out), *TINY_FIT]) == 0
    return out


@pytest.fixture(scope="session")
def warm_run(best_run, small_fer, tmp_path_factory) -> Path:
    """The --out folder of a one-epoch `emotion-train fit --init` from ``best_run``'s model, at another seed."""
    from training.cli import main

    out = tmp_path_factory.mktemp("run-warm")
    init = ["--init", str(best_run / "best.safetensors"), "--lr", "0.01", "--seed", "1"]
    assert main(["fit", "--data", str(small_fer), "--out", str(out), *TINY_FIT, *init]) == 0
    return out
