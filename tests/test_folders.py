"""Image folders, list files, ``open_dataset`` detection and errors, corrupt files, label maps."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mlearn.data.corrupt import CorruptSampleError, collate_skip_corrupt
from mlearn.data.images.files import ImageFolderDataset, ImageListDataset
from mlearn.data.images.open import open_dataset
from mlearn.data.images.recordio import RecordIOWriter
from mlearn.data.images.recordio_dataset import RecordIODataset
from mlearn.data.images.transforms import build_transform
from mlearn.data.labels import load_label_map


def save_image(path: Path, seed: int, size: int = 24) -> np.ndarray:
    """Write a PNG (lossless, so decoded pixels can be compared). Returns the RGB image."""
    image = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return image


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "faces"
    for p, (person, count) in enumerate((("carol", 2), ("alice", 3), ("bob", 1))):
        for n in range(count):
            save_image(root / person / f"{n}.png", seed=10 * p + n)
    (root / "bob" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    (root / "README.md").write_text("ignored")
    return root


def test_image_folder_labels_sorted_by_name(folder: Path, tmp_path: Path) -> None:
    dataset = ImageFolderDataset(folder)
    assert len(dataset) == 6 and dataset.num_classes == 3
    assert dataset.label_map == {"alice": 0, "bob": 1, "carol": 2}
    np.testing.assert_array_equal(dataset.labels, [0, 0, 0, 1, 2, 2])
    np.testing.assert_array_equal(dataset.class_sizes(), [3, 1, 2])
    image, label = dataset[3]
    assert label == 1 and image.dtype == np.uint8 and image.shape == (24, 24, 3)
    expected = cv2.cvtColor(cv2.imread(str(folder / "bob" / "0.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(image, expected)
    dataset.save_label_map(tmp_path / "run" / "label_map.json")
    assert load_label_map(tmp_path / "run" / "label_map.json") == {"alice": 0, "bob": 1, "carol": 2}


def test_image_folder_with_transform_and_corrupt_file(folder: Path) -> None:
    (folder / "bob" / "1.jpg").write_bytes(b"\xff\xd8\xff garbage")
    dataset = ImageFolderDataset(folder, transform=build_transform("eval", image_size=24))
    assert len(dataset) == 7
    bad = [i for i in range(len(dataset)) if dataset[i] is None]
    assert len(bad) == 1 and dataset.path(bad[0]).endswith("1.jpg")
    images, labels, num_corrupt = collate_skip_corrupt([dataset[i] for i in range(len(dataset))])
    assert images.shape == (6, 3, 24, 24) and images.dtype == torch.float32 and num_corrupt == 1
    assert labels.dtype == torch.long and labels.tolist() == [0, 0, 0, 1, 2, 2]
    strict = ImageFolderDataset(folder, strict=True)
    with pytest.raises(CorruptSampleError, match=r"bob/1\.jpg"):
        strict[bad[0]]


def test_missing_file_is_corrupt_not_fatal(folder: Path) -> None:
    dataset = ImageFolderDataset(folder)
    (folder / "carol" / "1.png").unlink()
    assert dataset[5] is None
    with pytest.raises(CorruptSampleError, match="cannot read"):
        dataset.load_image(5)


def test_list_file_relative_absolute_and_numeric_labels(tmp_path: Path) -> None:
    images = [save_image(tmp_path / "imgs" / f"{i}.png", seed=i) for i in range(4)]
    absolute = tmp_path / "imgs" / "3.png"
    (tmp_path / "train.txt").write_text(
        "# path label\nimgs/0.png 10\nimgs/1.png 2\n\nimgs/2.png 10\n" f"{absolute} 7\n")
    dataset = ImageListDataset(tmp_path / "train.txt")
    assert dataset.label_map == {2: 0, 7: 1, 10: 2}  # numeric order, not string order
    np.testing.assert_array_equal(dataset.labels, [2, 0, 2, 1])
    for i, image in enumerate(images):
        np.testing.assert_array_equal(dataset[i][0], image)


def test_list_file_string_labels_and_bad_line(tmp_path: Path) -> None:
    save_image(tmp_path / "a b.png", seed=0)
    (tmp_path / "list.txt").write_text("a b.png zed\na b.png amy\n")
    dataset = ImageListDataset(tmp_path / "list.txt")
    assert dataset.label_map == {"amy": 0, "zed": 1} and dataset[0][0].shape == (24, 24, 3)
    (tmp_path / "bad.txt").write_text("a.png 1\nonly_a_path\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: expected 'path label'"):
        ImageListDataset(tmp_path / "bad.txt")


def test_open_dataset_detects_formats(folder: Path, tmp_path: Path) -> None:
    assert isinstance(open_dataset(folder), ImageFolderDataset)
    (tmp_path / "list.txt").write_text(f"{folder / 'alice' / '0.png'} 0\n")
    assert isinstance(open_dataset(tmp_path / "list.txt"), ImageListDataset)
    with RecordIOWriter(tmp_path / "rec") as writer:
        writer.add(np.zeros((8, 8, 3), np.uint8), 0)
    assert isinstance(open_dataset(tmp_path / "rec"), RecordIODataset)
    assert isinstance(open_dataset(tmp_path / "rec" / "train.rec"), RecordIODataset)
    assert open_dataset(folder, num_classes=3).num_classes == 3


def test_open_dataset_errors(folder: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as info:
        open_dataset(missing)
    message = str(info.value)
    assert str(missing) in message and "train.rec" in message
    assert "image folder" in message and "list file" in message
    with pytest.raises(ValueError, match=r"3 classes but num_classes=5"):
        open_dataset(folder, num_classes=5)
    (tmp_path / "empty_root").mkdir()
    with pytest.raises(ValueError, match="no images found"):
        open_dataset(tmp_path / "empty_root")


def test_collate_all_corrupt_batch() -> None:
    images, labels, num_corrupt = collate_skip_corrupt([None, None])
    assert images.numel() == 0 and labels.dtype == torch.long and labels.numel() == 0 and num_corrupt == 2


def test_list_file_non_integer_label_among_integers_is_an_error(tmp_path: Path) -> None:
    save_image(tmp_path / "a.png", seed=0)
    (tmp_path / "list.txt").write_text("a.png 1\na.png 2\n# note\na.png 2x\na.png 3\n")
    with pytest.raises(ValueError, match=r"list\.txt:4: label '2x' is not an integer, but 3 of the 4 "):
        ImageListDataset(tmp_path / "list.txt")
    (tmp_path / "names.txt").write_text("a.png zed\na.png 007\na.png amy\n")  # names; one looks numeric
    assert ImageListDataset(tmp_path / "names.txt").label_map == {"007": 0, "amy": 1, "zed": 2}


def test_corrupt_sample_error_from_a_worker_keeps_one_line() -> None:
    from torch.utils.data._utils import ExceptionWrapper

    try:
        raise CorruptSampleError("record 3 of /x/train.rec: cannot decode image")
    except CorruptSampleError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(CorruptSampleError) as info:
        wrapped.reraise()
    assert str(info.value) == "record 3 of /x/train.rec: cannot decode image (in DataLoader worker process 0)"
