"""insightface RecordIO without mxnet: byte layout, header/multi-part records, corrupt records, workers."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import List, Tuple

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mlearn.data.corrupt import CorruptSampleError, collate_skip_corrupt
from mlearn.data.recordio import (IR_SIZE, MAGIC, IRHeader, RecordIODataset, RecordIOReader, RecordIOWriter,
                                  _IndexedWriter, frame, pack, unpack)
from mlearn.data.transforms import build_transform


def jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)
    return cv2.imencode(".jpg", image)[1].tobytes()


def write_set(root: Path, labels: List[int], header: bool = True) -> List[bytes]:
    images = [jpeg(i) for i in range(len(labels))]
    with RecordIOWriter(root, insightface_header=header) as writer:
        for image, label in zip(images, labels, strict=True):
            writer.add(image, label)
    return images


def test_pack_unpack_scalar_and_array_labels() -> None:
    header, payload = unpack(pack(IRHeader(0, 7.0, 3, 0), b"img"))
    assert header == IRHeader(0, 7.0, 3, 0) and payload == b"img"
    record = pack(IRHeader(0, [4.0, 0.25, -1.0], 9, 1), b"xyz")
    assert struct.unpack_from("<I", record)[0] == 3  # flag = number of floats
    assert len(record) == IR_SIZE + 12 + 3
    header, payload = unpack(record)
    assert header.flag == 3 and header.id == 9 and header.id2 == 1 and payload == b"xyz"
    np.testing.assert_array_equal(header.label, np.array([4.0, 0.25, -1.0], np.float32))


def test_frame_layout_padding_and_multipart() -> None:
    framed = frame(b"abcde")
    magic, lrec = struct.unpack_from("<II", framed)
    assert magic == MAGIC and lrec >> 29 == 0 and lrec & ((1 << 29) - 1) == 5 and len(framed) == 8 + 8
    magic_bytes = struct.pack("<I", MAGIC)
    data = b"abcd" + magic_bytes + b"efgh" + magic_bytes + b"ij" + magic_bytes  # 2 aligned hits, 1 unaligned
    framed = frame(data)
    flags = []
    pos = 0
    while pos < len(framed):
        _, lrec = struct.unpack_from("<II", framed, pos)
        flags.append(lrec >> 29)
        length = lrec & ((1 << 29) - 1)
        pos += 8 + length + (-length % 4)
    assert flags == [1, 2, 3]


def test_writer_layout_header_record_and_identity_records(tmp_path: Path) -> None:
    labels = [5, 5, 2, 2, 2, 9]
    images = write_set(tmp_path, labels)
    assert (tmp_path / "property").read_text().strip() == "3,32,32"
    idx = [line.split("\t") for line in (tmp_path / "train.idx").read_text().splitlines()]
    assert [int(k) for k, _ in idx] == list(range(10))  # header 0, images 1..6, identities 7..9
    reader = RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    header0, rest = unpack(reader.read(0))
    assert header0.flag == 2 and rest == b"" and list(header0.label) == [7.0, 10.0]
    ranges = [tuple(unpack(reader.read(k))[0].label) for k in range(7, 10)]
    assert ranges == [(1.0, 3.0), (3.0, 6.0), (6.0, 7.0)]
    dataset = RecordIODataset(tmp_path)
    assert dataset.header0 == (7, 10) and len(dataset) == 6 and dataset.num_classes == 3
    assert dataset.label_map == {2: 0, 5: 1, 9: 2}
    np.testing.assert_array_equal(dataset.labels, [1, 1, 0, 0, 0, 2])
    for i, image in enumerate(images):
        assert dataset.read_bytes(i) == image
        decoded, label = dataset[i]
        assert decoded.dtype == np.uint8 and decoded.shape == (32, 32, 3) and label == dataset.labels[i]
        bgr = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
        expected = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        np.testing.assert_array_equal(decoded, expected)


def test_writer_rejects_labels_not_grouped(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="grouped by label"):
        with RecordIOWriter(tmp_path) as writer:
            for label in (1, 2, 1):
                writer.add(jpeg(label), label)


def test_labels_from_headers_without_header_record_and_without_idx(tmp_path: Path) -> None:
    labels = [3, 1, 1, 3, 2]  # not grouped: fine without identity records
    images = write_set(tmp_path, labels, header=False)
    dataset = RecordIODataset(tmp_path)
    assert dataset.header0 is None and len(dataset) == 5
    np.testing.assert_array_equal(dataset.labels, [2, 0, 0, 2, 1])
    (tmp_path / "train.idx").unlink()  # no index: the file is scanned
    scanned = RecordIODataset(tmp_path / "train.rec")
    np.testing.assert_array_equal(scanned.labels, dataset.labels)
    assert [scanned.read_bytes(i) for i in range(5)] == images


def test_float_array_labels_use_first_value(tmp_path: Path) -> None:
    with RecordIOWriter(tmp_path) as writer:
        writer.add(jpeg(0), [4.0, 0.5])
        writer.add(jpeg(1), [4.0, 0.7])
        writer.add(jpeg(2), [1.0, 0.1])
    dataset = RecordIODataset(tmp_path)
    assert dataset.label_map == {1: 0, 4: 1}
    np.testing.assert_array_equal(dataset.labels, [1, 1, 0])
    header, _ = dataset.read_record(1)
    assert header.flag == 2 and np.allclose(header.label, [4.0, 0.7])


def test_multipart_record_round_trip(tmp_path: Path) -> None:
    magic = struct.pack("<I", MAGIC)
    base = jpeg(0)
    # trailing bytes after the JPEG end marker, with the magic number at 4-byte-aligned offsets of the record
    pad = b"\0" * (-(IR_SIZE + len(base)) % 4)
    payload = base + pad + magic + b"tail" + magic
    with RecordIOWriter(tmp_path) as writer:
        writer.add(payload, 0)
        writer.add(jpeg(1), 1)
    raw = (tmp_path / "train.rec").read_bytes()
    assert raw.count(magic) > 2 + 2 + 2  # records 0, 2, identities: 1 each; record 1: 3 parts
    dataset = RecordIODataset(tmp_path)
    assert dataset.read_bytes(0) == payload
    assert dataset[0][0].shape == (32, 32, 3)
    assert dataset.read_bytes(1) == jpeg(1)


def test_corrupt_record_is_skipped_counted_or_raised(tmp_path: Path) -> None:
    with RecordIOWriter(tmp_path) as writer:
        writer.add(jpeg(0), 0)
        writer.add(b"\xff\xd8\xff\xe0 this is not a jpeg", 0)
        writer.add(jpeg(2), 1)
    dataset = RecordIODataset(tmp_path, transform=build_transform("eval", image_size=32))
    assert dataset[1] is None
    images, labels, num_corrupt = collate_skip_corrupt([dataset[i] for i in range(3)])
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1] and num_corrupt == 1
    strict = RecordIODataset(tmp_path, strict=True)
    with pytest.raises(CorruptSampleError, match=r"record 2 of .*train\.rec"):
        strict[1]


def test_bad_magic_and_truncated_file(tmp_path: Path) -> None:
    write_set(tmp_path, [0, 0, 1])
    rec = tmp_path / "train.rec"
    lines = (tmp_path / "train.idx").read_text().splitlines()
    offsets = {int(k): int(v) for k, v in (line.split() for line in lines)}
    raw = bytearray(rec.read_bytes())
    raw[offsets[2]:offsets[2] + 4] = b"\0\0\0\0"  # record 2's magic
    rec.write_bytes(bytes(raw))
    dataset = RecordIODataset(tmp_path, strict=True)
    with pytest.raises(CorruptSampleError, match="bad magic"):
        dataset[1]
    assert dataset[0] is not None and dataset[2] is not None
    rec.write_bytes(bytes(raw[:offsets[3] + 20]))  # cut short inside record 3 (an image)
    reader = RecordIOReader(rec)
    with pytest.raises(CorruptSampleError, match="truncated"):
        reader.read(3)
    with pytest.raises(CorruptSampleError, match="truncated"):
        reader.read(5)  # an identity record past the end
    dataset = RecordIODataset(tmp_path)  # the identity records are gone: labels come from the headers
    assert len(dataset) == 1 and dataset[0] is not None  # records 2 (bad magic) and 3 (truncated) dropped


def _batches(dataset: RecordIODataset, num_workers: int) -> List[Tuple[torch.Tensor, torch.Tensor, int]]:
    loader = DataLoader(dataset, batch_size=4, shuffle=False, num_workers=num_workers,
                        collate_fn=collate_skip_corrupt)
    return list(loader)


def test_dataloader_workers_match_single_process(tmp_path: Path) -> None:
    labels = [i // 3 for i in range(22)]
    write_set(tmp_path, labels)
    dataset = RecordIODataset(tmp_path, transform=build_transform("eval", image_size=32))
    dataset[0]  # open a handle in the parent: workers must not share its state
    pickle.loads(pickle.dumps(dataset))[1]
    serial = _batches(dataset, 0)
    parallel = _batches(dataset, 2)
    assert len(serial) == len(parallel) == 6
    for (a, la, ca), (b, lb, cb) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb) and ca == cb == 0


def test_identity_records_inconsistent_with_headers_fall_back_to_headers(tmp_path: Path) -> None:
    writer = _IndexedWriter(tmp_path / "train.rec", tmp_path / "train.idx")
    writer.write(0, pack(IRHeader(2, [4.0, 5.0], 0, 0), b""))
    for key, label in ((1, 7.0), (2, 7.0), (3, 8.0)):
        writer.write(key, pack(IRHeader(0, label, key, 0), jpeg(key)))
    writer.write(4, pack(IRHeader(2, [1.0, 4.0], 4, 0), b""))  # claims one identity for keys 1..3
    writer.close()
    dataset = RecordIODataset(tmp_path)
    assert dataset.label_map == {7: 0, 8: 1}
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1])
