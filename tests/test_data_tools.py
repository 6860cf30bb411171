"""``inspect_dataset`` / ``format_inspect_report`` and ``convert_dataset`` round trips."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import cv2
import numpy as np
import pytest

from mlearn.data.images.files import ImageFolderDataset
from mlearn.data.images.inspect import convert_dataset, format_inspect_report, inspect_dataset
from mlearn.data.images.recordio import RecordIOWriter
from mlearn.data.images.recordio_dataset import RecordIODataset


def make_folder(root: Path, sizes: dict) -> None:
    rng = np.random.default_rng(0)
    for name, count in sizes.items():
        (root / name).mkdir(parents=True)
        for n in range(count):
            image = cv2.resize(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8), (20, 20))
            cv2.imwrite(str(root / name / f"{n}.jpg"), image)


def test_inspect_folder_counts_histogram_and_corrupt(tmp_path: Path) -> None:
    make_folder(tmp_path / "set", {"ann": 1, "ben": 4, "cid": 2})
    (tmp_path / "set" / "ben" / "9.jpg").write_bytes(b"broken")
    report = inspect_dataset(tmp_path / "set", progress=False)
    assert report["format"] == "folder" and report["num_images"] == 8 and report["num_classes"] == 3
    assert report["class_size"] == {"min": 1, "median": 2.0, "mean": 8 / 3, "max": 5}
    assert report["decoded"] == 8 and report["corrupt"] == 1 and "9.jpg" in report["corrupt_examples"][0]
    assert report["image_sizes"] == {"20x20": 7}
    text = format_inspect_report(report)
    assert "images:       8" in text and "corrupt:      1 of 8" in text and "9.jpg" in text
    sampled = inspect_dataset(tmp_path / "set", sample=3, progress=False)
    assert sampled["decoded"] == 3 and "random sample of 3" in format_inspect_report(sampled)


def test_inspect_recordio_with_workers(tiny_recordio: Callable) -> None:
    rec = tiny_recordio(classes=4, per_class=[2, 2, 2, 1], size=16, corrupt=[6])  # class 3: its one image
    report = inspect_dataset(rec, num_workers=2, progress=False)
    assert report["format"] == "recordio" and report["num_images"] == 7 and report["num_classes"] == 4
    assert report["property_num_classes"] == 4 and report["corrupt"] == 1
    assert "record 7 of" in report["corrupt_examples"][0]


def test_convert_folder_to_rec_to_folder_round_trip(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", {"zoe": 2, "adam": 3, "mia": 1})
    (tmp_path / "src" / "mia" / "bad.jpg").write_bytes(b"\xff\xd8 broken")
    summary = convert_dataset(tmp_path / "src", tmp_path / "rec", to="rec", progress=False)
    assert summary == {"images": 6, "classes": 3, "skipped": 1}
    rec = RecordIODataset(tmp_path / "rec")
    assert rec.header0 == (7, 10) and (tmp_path / "rec" / "property").read_text().strip() == "3,20,20"
    convert_dataset(tmp_path / "rec", tmp_path / "back", to="folder", progress=False)
    source, back = ImageFolderDataset(tmp_path / "src"), ImageFolderDataset(tmp_path / "back")
    assert back.label_map == {"adam": 0, "mia": 1, "zoe": 2} == source.label_map
    good = [i for i in range(len(source)) if not source.path(i).endswith("bad.jpg")]
    assert [source.read_bytes(i) for i in good] == [back.read_bytes(i) for i in range(len(back))]
    np.testing.assert_array_equal(source.labels[good], back.labels)
    for i in range(len(back)):
        np.testing.assert_array_equal(back[i][0], rec[i][0])


def test_convert_rec_without_names_uses_padded_numbers(tmp_path: Path) -> None:
    # written inline: raw labels 2 and 10 (not 0..n-1) are the point, their padded folder names
    with RecordIOWriter(tmp_path / "rec") as writer:
        for label in (2, 10):
            writer.add(np.full((8, 8, 3), label, np.uint8), label)
    convert_dataset(tmp_path / "rec", tmp_path / "out", to="folder", progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["02", "10"]
    back = ImageFolderDataset(tmp_path / "out")
    np.testing.assert_array_equal(back.labels, RecordIODataset(tmp_path / "rec").labels)
    with pytest.raises(ValueError, match="not empty"):
        convert_dataset(tmp_path / "rec", tmp_path / "out", to="folder", progress=False)
    with pytest.raises(ValueError, match="'folder' or 'rec'"):
        convert_dataset(tmp_path / "rec", tmp_path / "x", to="lmdb")


UNSAFE_NAMES = ["../evil", "/abs/path", "a/b", "a_b", "..", ".", "", ".hidden", "tab\there", "back\\slash",
                "Bob", "bob"]


def test_convert_to_folder_never_writes_outside_dst_nor_merges(tmp_path: Path,
                                                                tiny_recordio: Callable) -> None:
    import json

    counts = [label % 2 + 1 for label in range(len(UNSAFE_NAMES))]
    tiny_recordio(tmp_path / "rec", classes=len(UNSAFE_NAMES), per_class=counts, size=8)
    names = {name: i for i, name in enumerate(UNSAFE_NAMES)}
    (tmp_path / "rec" / "label_map.json").write_text(json.dumps(names))
    before = sorted(p for p in tmp_path.rglob("*"))
    dst = tmp_path / "deep" / "out"
    summary = convert_dataset(tmp_path / "rec", dst, to="folder", progress=False)
    assert summary == {"images": 18, "classes": 12, "skipped": 0}
    after = sorted(p for p in tmp_path.rglob("*") if dst not in p.parents and p != dst)
    assert after == sorted(before + [tmp_path / "deep"])  # nothing outside dst
    mapping = json.loads((dst / "folder_names.json").read_text())
    assert set(mapping) == set(UNSAFE_NAMES)
    folders = [p for p in dst.iterdir() if p.is_dir()]
    assert len(folders) == 12 and {p.name for p in folders} == set(mapping.values())
    assert len({p.name.casefold() for p in folders}) == 12  # distinct even where case does not count
    assert mapping["a_b"] == "a_b" and mapping["Bob"] == "Bob" and mapping["a/b"] != "a_b"
    assert all(not name.startswith(".") and "/" not in name and "\t" not in name for name in mapping.values())
    back = ImageFolderDataset(dst)
    sizes = {name: int(back.class_sizes()[back.label_map[folder]]) for name, folder in mapping.items()}
    assert sizes == {name: i % 2 + 1 for i, name in enumerate(UNSAFE_NAMES)}


def test_convert_refuses_a_non_empty_destination_and_a_set_without_images(tmp_path: Path) -> None:
    make_folder(tmp_path / "src", {"ann": 2, "ben": 1})
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "label_map.json").write_text("{}")
    with pytest.raises(ValueError, match=r"destination .*dst is not empty"):
        convert_dataset(tmp_path / "src", tmp_path / "dst", to="rec", progress=False)
    assert [p.name for p in (tmp_path / "dst").iterdir()] == ["label_map.json"]
    assert (tmp_path / "dst" / "label_map.json").read_text() == "{}"
    for image in (tmp_path / "src").rglob("*.jpg"):
        image.write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"none of the 3 images .*src could be read"):
        convert_dataset(tmp_path / "src", tmp_path / "new", to="folder", progress=False)


def test_inspect_counts_records_dropped_at_open(tiny_recordio: Callable) -> None:
    root = tiny_recordio(classes=3, per_class=2, size=16)
    lines = (root / "train.idx").read_text().splitlines()
    cut = int(lines[5].split()[1])  # records 5.. gone: two images and the identity records
    rec = root / "train.rec"
    rec.write_bytes(rec.read_bytes()[:cut])
    report = inspect_dataset(root, progress=False)
    assert report["num_images"] == 4 and report["dropped_at_open"] == 2 and report["corrupt"] == 2
    text = format_inspect_report(report)
    assert "corrupt:      2 of 6 records: 2 dropped at open" in text and "past the end" in text
