"""insightface RecordIO without mxnet: byte layout, header/multi-part records, corrupt records, workers."""
from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Callable, List, Tuple

import cv2
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mlearn.data.corrupt import CorruptSampleError, collate_skip_corrupt
from mlearn.data.images.recordio import (
    IR_SIZE,
    MAGIC,
    IRHeader,
    RecordIOReader,
    RecordIOWriter,
    _IndexedWriter,
    frame,
    pack,
    unpack,
)
from mlearn.data.images.recordio_dataset import RecordIODataset, _float32_window
from mlearn.data.images.recordio_index import _read_index
from mlearn.data.images.transforms import build_transform


def jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)
    return cv2.imencode(".jpg", image)[1].tobytes()


def write_set(root: Path, labels: List[int], header: bool = True) -> List[bytes]:
    """The JPEG bytes written, for the tests that compare them or need labels in any order or no header
    record (the ``tiny_recordio`` fixture otherwise)."""
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


def test_writer_rejects_labels_not_grouped(tmp_path: Path) -> None:  # inline: the writer's own check
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
    # written inline: float-array labels are the point (not a tiny_recordio)
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
    # written inline: a payload split into parts by the magic number is the point (not a tiny_recordio)
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


def test_corrupt_record_is_skipped_counted_or_raised(tmp_path: Path, tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path, classes=2, per_class=[2, 1], size=32, corrupt=[1])
    dataset = RecordIODataset(tmp_path, transform=build_transform("eval", image_size=32))
    assert dataset[1] is None
    images, labels, num_corrupt = collate_skip_corrupt([dataset[i] for i in range(3)])
    assert images.shape == (2, 3, 32, 32) and labels.tolist() == [0, 1] and num_corrupt == 1
    strict = RecordIODataset(tmp_path, strict=True)
    with pytest.raises(CorruptSampleError, match=r"record 2 of .*train\.rec"):
        strict[1]


def test_bad_magic_and_truncated_file(tmp_path: Path, tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path, classes=2, per_class=[2, 1], size=32)
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


def test_dataloader_workers_match_single_process(tmp_path: Path, tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path, classes=8, per_class=[3] * 7 + [1], size=32)  # labels i // 3 of 22 images
    dataset = RecordIODataset(tmp_path, transform=build_transform("eval", image_size=32))
    dataset[0]  # open a handle in the parent: workers must not share its state
    pickle.loads(pickle.dumps(dataset))[1]
    serial = _batches(dataset, 0)
    parallel = _batches(dataset, 2)
    assert len(serial) == len(parallel) == 6
    for (a, la, ca), (b, lb, cb) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb) and ca == cb == 0


def test_identity_records_inconsistent_with_headers_fall_back_to_headers(tmp_path: Path) -> None:
    # written record by record: identity records that contradict the headers are the point
    writer = _IndexedWriter(tmp_path / "train.rec", tmp_path / "train.idx")
    writer.write(0, pack(IRHeader(2, [4.0, 5.0], 0, 0), b""))
    for key, label in ((1, 7.0), (2, 7.0), (3, 8.0)):
        writer.write(key, pack(IRHeader(0, label, key, 0), jpeg(key)))
    writer.write(4, pack(IRHeader(2, [1.0, 4.0], 4, 0), b""))  # claims one identity for keys 1..3
    writer.close()
    dataset = RecordIODataset(tmp_path)
    assert dataset.label_map == {7: 0, 8: 1}
    np.testing.assert_array_equal(dataset.labels, [0, 0, 1])


def _idx_lines(root: Path) -> List[str]:
    return (root / "train.idx").read_text().splitlines()


def test_index_parser_chunks_blank_lines_crlf_and_bad_lines(tmp_path: Path) -> None:
    keys = np.arange(0, 3000, 3, dtype=np.int64)[::-1]  # any key order
    offsets = keys * 1_000_003 + 7
    text = "".join(f"{k}\t{o}\n" for k, o in zip(keys.tolist(), offsets.tolist()))
    idx = tmp_path / "a.idx"
    idx.write_text(text)
    for chunk in (16, 100, 1 << 22):  # cut inside lines, near line ends, one chunk
        got_keys, got_offsets = _read_index(idx, chunk_bytes=chunk)
        np.testing.assert_array_equal(got_keys, keys)
        np.testing.assert_array_equal(got_offsets, offsets)
    idx.write_bytes(b"\r\n0\t8\r\n\r\n1 16\n\n2\t24")  # blank lines, CRLF, spaces, no final newline
    got_keys, got_offsets = _read_index(idx, chunk_bytes=5)
    assert got_keys.tolist() == [0, 1, 2] and got_offsets.tolist() == [8, 16, 24]
    for bad, line in ((b"0\t8\n1\t16\n2\tx9\n", 3), (b"0\t8\n1\n", 2), (b"0\t8\t9\n", 1),
                      (b"0\t8\n1\t99999999999999999999\n", 2), (b"0\t8\n1\t1.5\n", 2)):
        idx.write_bytes(bad)
        with pytest.raises(ValueError, match=rf"a\.idx:{line}: expected 'key<TAB>offset'"):
            _read_index(idx, chunk_bytes=4)


def test_reader_holds_no_keys_for_an_ordered_index_and_int32_spans(tmp_path: Path,
                                                                   tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path, classes=2, per_class=[2, 1], size=32)
    reader = RecordIOReader(tmp_path / "train.rec")
    assert reader._keys is None and reader.keys.tolist() == list(range(6)) and len(reader) == 6
    assert reader.spans.dtype == np.int32
    offsets = [int(line.split()[1]) for line in _idx_lines(tmp_path)]
    assert reader.spans.tolist() == np.diff(offsets + [reader.file_size]).tolist()
    lines = _idx_lines(tmp_path)
    (tmp_path / "train.idx").write_text("\n".join(lines[::-1]) + "\n")  # reversed: sorted on open
    again = RecordIOReader(tmp_path / "train.rec")
    assert again.offsets.tolist() == reader.offsets.tolist() and again.spans.tolist() == reader.spans.tolist()
    (tmp_path / "train.idx").write_text("\n".join(lines[1:]) + "\n")  # keys 1..6: stored
    sparse = RecordIOReader(tmp_path / "train.rec")
    assert sparse.keys.tolist() == list(range(1, 6)) and 0 not in sparse and 3 in sparse
    pos, known = sparse.positions(np.array([0, 3, 9]))
    assert known.tolist() == [False, True, False] and pos[1] == 2


def test_corrupt_length_word_never_reads_past_the_span(tmp_path: Path, tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path, classes=2, per_class=2, size=32)
    rec = tmp_path / "train.rec"
    offsets = {int(k): int(v) for k, v in (line.split() for line in _idx_lines(tmp_path))}
    raw = bytearray(rec.read_bytes())
    struct.pack_into("<I", raw, offsets[2] + 4, 300 << 20)  # record 2 claims 300 MiB
    rec.write_bytes(bytes(raw))
    with rec.open("r+b") as f:
        f.truncate(len(raw) + (400 << 20))  # sparse tail: the file is large enough to hold the claim
    reader = RecordIOReader(rec)
    sizes: List[int] = []
    pread = reader._pread
    reader._pread = lambda offset, size: sizes.append(size) or pread(offset, size)  # type: ignore
    with pytest.raises(CorruptSampleError, match=r"record 2 of .*corrupt length .*300 ?MiB|corrupt length"):
        reader.read(2)
    span = int(reader.spans[2])
    assert max(sizes) <= max(span, 8) < 100_000
    dataset = RecordIODataset(tmp_path, transform=build_transform("eval", image_size=32))
    dataset.reader._pread = reader._pread  # type: ignore[method-assign]
    sizes.clear()
    assert dataset[1] is None and dataset[0] is not None and dataset[2] is not None
    batch = dataset.load_batch([0, 1, 2, 3])
    assert batch.num_corrupt == 1 and batch.labels.tolist() == [0, 1, 1]
    assert max(sizes) < 100_000


def test_keys_missing_from_the_idx_are_dropped_counted_or_refused(tmp_path: Path,
                                                                  tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path, classes=2, per_class=3, size=32)
    lines = _idx_lines(tmp_path)
    kept = [line for line in lines if not line.startswith("3\t")]
    (tmp_path / "train.idx").write_text("\n".join(kept) + "\n")
    dataset = RecordIODataset(tmp_path, transform=build_transform("eval", image_size=32))
    assert len(dataset) == 5 and dataset.num_dropped_at_open == 1 and dataset.header0 == (7, 9)
    assert dataset.image_keys.tolist() == [1, 2, 4, 5, 6] and dataset.labels.tolist() == [0, 0, 1, 1, 1]
    assert "missing from" in dataset.dropped_at_open[0]
    batch = dataset.load_batch(list(range(5)))
    assert batch.num_corrupt == 0 and len(batch.labels) == 5
    dataset.image_keys = np.array([1, 3], dtype=np.int64)  # read a key the .idx lacks: corrupt, not KeyError
    with pytest.raises(CorruptSampleError, match=r"record 3 of .*key not in .*train\.idx"):
        dataset.read_record(1)
    assert dataset[1] is None
    with pytest.raises(ValueError, match=r"1 of 6 image records cannot be read .*missing from .*strict"):
        RecordIODataset(tmp_path, strict=True)


def test_rec_truncated_at_a_record_boundary(tmp_path: Path, tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path, classes=3, per_class=2, size=32)
    offsets = {int(k): int(v) for k, v in (line.split() for line in _idx_lines(tmp_path))}
    rec = tmp_path / "train.rec"
    rec.write_bytes(rec.read_bytes()[:offsets[4]])  # records 4.. (images 4-6, identities) are gone
    dataset = RecordIODataset(tmp_path)
    assert len(dataset) == 3 and dataset.num_dropped_at_open == 3 and dataset.labels.tolist() == [0, 0, 1]
    assert "3 image records past the end" in dataset.dropped_at_open[0]
    with pytest.raises(ValueError, match=r"train\.rec: 3 of 6 image records cannot be read .*past the end"):
        RecordIODataset(tmp_path, strict=True)


def test_empty_rec_or_idx_is_one_clear_error(tmp_path: Path, tiny_recordio: Callable) -> None:
    tiny_recordio(tmp_path, classes=2, per_class=1, size=32)
    (tmp_path / "train.idx").write_bytes(b"")
    with pytest.raises(ValueError, match=r"train\.rec: no readable image records .*0 entries in .*\.idx"):
        RecordIODataset(tmp_path)
    tiny_recordio(tmp_path, classes=2, per_class=1, size=32)
    (tmp_path / "train.rec").write_bytes(b"")
    with pytest.raises(ValueError, match=r"train\.rec: no readable image records \(0 bytes"):
        RecordIODataset(tmp_path)


def test_float32_window() -> None:
    assert _float32_window(7.0) == (7, 7) and _float32_window(2.0 ** 24 - 1) == (2 ** 24 - 1, 2 ** 24 - 1)
    for n in (2 ** 24 + 1, 2 ** 24 + 3, 2 ** 25 + 5, 42_000_001):
        lo, hi = _float32_window(float(np.float32(n)))
        assert lo <= n <= hi and hi - lo <= 2 * float(np.spacing(np.float32(n)))


def test_counts_above_2_24_are_exact(tmp_path: Path) -> None:
    """Header record 0 and identity ranges above 2^24 are float32-rounded; the set is read exactly from
    the records near the rounded values (a sparse index: the keys in between are absent and dropped)."""
    big = 2 ** 24
    n_images, first_identity = big + 6, big + 7
    classes = {k: 5.0 for k in (1, 2, 3, *range(big - 2, big + 3))}
    classes.update({k: 9.0 for k in range(big + 3, big + 7)})
    writer = _IndexedWriter(tmp_path / "train.rec", tmp_path / "train.idx")  # record by record: keys > 2^24
    writer.write(0, pack(IRHeader(2, [first_identity, first_identity + 2], 0, 0), b""))
    for key, cls in sorted(classes.items()):
        writer.write(key, pack(IRHeader(0, cls, key, 0), jpeg(key % 7)))
    writer.write(first_identity, pack(IRHeader(2, [1.0, big + 3], first_identity, 0), b""))
    writer.write(first_identity + 1, pack(IRHeader(2, [big + 3, n_images + 1], first_identity + 1, 0), b""))
    writer.close()
    header = unpack(RecordIOReader(tmp_path / "train.rec").read(0))[0]
    assert float(header.label[0]) != first_identity  # rounded: read as is, key 2^24+8 is the first identity
    dataset = RecordIODataset(tmp_path)
    assert dataset.header0 == (first_identity, first_identity + 2)
    assert dataset.label_map == {5: 0, 9: 1} and dataset.class_sizes().tolist() == [8, 4]
    assert dataset.image_keys.tolist() == sorted(classes)
    assert dataset.num_dropped_at_open == n_images - len(classes)


def test_corrupt_first_image_of_an_identity_keeps_the_identity_records(
        tmp_path: Path, tiny_recordio: Callable, caplog: pytest.LogCaptureFixture) -> None:
    tiny_recordio(tmp_path, classes=3, per_class=[3, 1, 2], size=32)
    offsets = {int(k): int(v) for k, v in (line.split() for line in _idx_lines(tmp_path))}
    rec = tmp_path / "train.rec"
    raw = bytearray(rec.read_bytes())
    raw[offsets[1]:offsets[1] + 4] = bytes(4)  # image 1 (first of identity 0): bad magic
    rec.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        dataset = RecordIODataset(tmp_path)
    assert "instead of the identity records" not in caplog.text  # no scan of every header
    assert dataset.header0 == (7, 10) and len(dataset) == 6 and dataset.labels.tolist() == [0, 0, 0, 1, 2, 2]
    raw[offsets[4]:offsets[4] + 4] = bytes(4)  # identity 1's only image too: its class is unknowable
    rec.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        scanned = RecordIODataset(tmp_path)
    assert "instead of the identity records" in caplog.text and "record 4 of" in caplog.text
    assert len(scanned) == 4 and scanned.num_dropped_at_open == 2 and scanned.labels.tolist() == [0, 0, 1, 1]


def test_index_cache_is_used_refreshed_when_stale_and_optional(tmp_path: Path,
                                                               tiny_recordio: Callable, monkeypatch) -> None:
    import mlearn.data.images.recordio_index as recordio

    tiny_recordio(tmp_path, classes=2, per_class=[2, 1], size=32)
    idx = tmp_path / "train.idx"
    cache = tmp_path / "train.idx.npy"
    expected = RecordIOReader(tmp_path / "train.rec")
    assert not cache.exists()  # small indexes are not cached unless asked
    parsed: List[Path] = []
    real_read_index = recordio._read_index
    monkeypatch.setattr(recordio, "_read_index", lambda path: parsed.append(path) or real_read_index(path))
    first = RecordIOReader(tmp_path / "train.rec", cache_index=True)
    assert cache.is_file() and len(parsed) == 1 and not list(tmp_path.glob(".*tmp"))
    second = RecordIOReader(tmp_path / "train.rec", cache_index=True)
    assert len(parsed) == 1  # served from the memory-mapped cache
    for reader in (first, second):
        assert reader.offsets.tolist() == expected.offsets.tolist() and reader.read(2) == expected.read(2)
    lines = _idx_lines(tmp_path)
    idx.write_text("\n".join(lines[:-1]) + "\n")  # the index changed: the cache is stale
    third = RecordIOReader(tmp_path / "train.rec", cache_index=True)
    assert len(parsed) == 2 and len(third) == len(expected) - 1
    assert len(RecordIOReader(tmp_path / "train.rec", cache_index=True)) == len(third) and len(parsed) == 2
    cache.write_bytes(b"garbage")  # unreadable: parsed again and rewritten
    assert len(RecordIOReader(tmp_path / "train.rec", cache_index=True)) == len(third) and len(parsed) == 3
    cache.unlink()

    def read_only(*args: object) -> None:
        raise PermissionError(30, "Read-only file system")
    monkeypatch.setattr(recordio.os, "replace", read_only)
    assert len(RecordIOReader(tmp_path / "train.rec", cache_index=True)) == len(third)
    assert not cache.exists() and not list(tmp_path.glob(".*tmp"))
