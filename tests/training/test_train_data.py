"""FER2013 loaders: the CSV and the image-folder layout give the same faces under the same names."""

from __future__ import annotations

import csv
import hashlib
import random

import cv2
import pytest

from tests.training.conftest import copy_images, fer_images
from training.data import DataError, load_split
from worker.model import CLASSES

# The label order of the original fer2013.csv, written out here rather than taken
# from training.data, so a wrong order there fails this test.
ORIGINAL_CSV_ORDER = ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
USAGE = {"train": "Training", "val": "PublicTest"}
# A few classes, with those whose positions differ between the two orders
# (sad, surprise, neutral) among them; a different count per class.
PICK = {"angry": 2, "happy": 3, "neutral": 4, "sad": 3, "surprise": 2, "disgust": 1}


@pytest.fixture(scope="module")
def fer_both_ways(tmp_path_factory):
    """The same real faces as fer2013.csv (rows shuffled) and as a train/ val/ folder tree.

    Returns (csv path, folder, {split: {pixel digest: class name}}).
    """
    root = tmp_path_factory.mktemp("fer-both")
    rows, truth = [], {}
    for split in ("train", "val"):
        truth[split] = {}
        for name, n in PICK.items():
            paths = fer_images(split, name, n)
            copy_images(paths, root / "folder" / split / name)
            for path in paths:
                img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
                truth[split][digest(img.tobytes())] = name
                rows.append((ORIGINAL_CSV_ORDER.index(name), " ".join(map(str, img.ravel())), USAGE[split]))
    # One PrivateTest row: it must stay out of train and val.
    rows.append((ORIGINAL_CSV_ORDER.index("fear"), " ".join(["7"] * 48 * 48), "PrivateTest"))
    random.Random(0).shuffle(rows)
    csv_path = root / "csv" / "fer2013.csv"
    csv_path.parent.mkdir()
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["emotion", "pixels", "Usage"])
        writer.writerows(rows)
    return csv_path, root / "folder", truth


def digest(pixels: bytes) -> str:
    return hashlib.sha1(pixels).hexdigest()[:12]


def named(split) -> dict[str, str]:
    """Class name of each image in ``split``, by a digest of its pixels."""
    pairs = {digest(img.numpy().tobytes()): split.classes[i] for img, i in zip(split.images, split.labels.tolist())}
    assert len(pairs) == len(split), "duplicate images in the split"
    return pairs


@pytest.mark.parametrize("split", ["train", "val"])
def test_csv_and_folder_give_the_same_faces_with_the_same_names(fer_both_ways, split):
    csv_path, folder, truth = fer_both_ways
    from_csv = load_split(csv_path, split)
    from_folder = load_split(folder, split)
    assert len(from_csv) == len(from_folder) == sum(PICK.values())
    assert from_csv.images.shape == (len(from_csv), 48, 48)
    assert str(from_csv.images.dtype) == "torch.uint8"
    assert named(from_csv) == truth[split]
    assert named(from_folder) == truth[split]
    # The directory holding fer2013.csv works as well as the file.
    assert named(load_split(csv_path.parent, split)) == truth[split]


def test_labels_follow_the_class_list_asked_for(fer_both_ways):
    csv_path, folder, truth = fer_both_ways
    reordered = tuple(reversed(CLASSES))
    for data in (csv_path, folder):
        split = load_split(data, "train", reordered)
        assert split.classes == reordered
        assert named(split) == truth["train"]
        assert split.labels.tolist().count(reordered.index("happy")) == PICK["happy"]


def test_csv_test_split_holds_only_private_test_rows(fer_both_ways):
    csv_path, _, _ = fer_both_ways
    split = load_split(csv_path, "test")
    assert len(split) == 1
    assert split.classes[split.labels[0]] == "fear"
    assert split.images[0].unique().tolist() == [7]


def test_folder_of_class_folders_without_split_level(fer_both_ways):
    _, folder, truth = fer_both_ways
    assert named(load_split(folder / "val", "val")) == truth["val"]


def test_loader_errors_name_the_problem(tmp_path):
    bad = tmp_path / "fer2013.csv"
    bad.write_text("emotion,pixels,Usage\n9," + " ".join(["0"] * 2304) + ",Training\n")
    with pytest.raises(DataError, match=r"fer2013\.csv:2: malformed row"):
        load_split(bad, "train")
    bad.write_text("emotion,Usage\n1,Training\n")
    with pytest.raises(DataError, match=r"lacks the columns \['pixels'\]"):
        load_split(bad, "train")
    (tmp_path / "faces" / "contempt").mkdir(parents=True)
    (tmp_path / "faces" / "happy").mkdir()
    with pytest.raises(DataError, match=r"class folders \['contempt'\] are not among"):
        load_split(tmp_path / "faces", "val")
    with pytest.raises(DataError, match="does not exist"):
        load_split(tmp_path / "nowhere", "train")
