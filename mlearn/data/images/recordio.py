"""insightface RecordIO (``train.rec`` + ``train.idx`` + ``property``) read and written without mxnet.

Byte layout (dmlc-core RecordIO, little-endian). Each record is one or more parts::

    uint32 magic = 0xced7230a
    uint32 lrec  = cflag << 29 | length        cflag: 0 whole, 1 first, 2 middle, 3 last part
    length bytes of data, zero-padded to a multiple of 4

The writer splits a record wherever the magic number occurs in the data at a 4-byte-aligned
position, dropping those 4 bytes; the reader puts the magic back between parts. ``train.idx`` holds
``key<TAB>byte offset`` lines. A record's data is an image record (mxnet ``recordio.pack``)::

    struct IRHeader {uint32 flag; float32 label; uint64 id; uint64 id2}   (24 bytes, "<IfQQ")
    flag > 0: flag float32 labels follow the header (and the header's label field is 0)
    then the encoded image (JPEG in insightface sets)

insightface sets start with header record 0: ``flag=2, label=[N+1, N+1+C]``. Images are keys
``1..N``; keys ``N+1..N+C`` are identity records whose label ``[start, end)`` is the key range of
that identity's images. ``property`` is ``num_classes,height,width``.

This module holds the format, :class:`RecordIOReader` and :class:`RecordIOWriter`; the ``.idx``
parser is :mod:`mlearn.data.images.recordio_index`, the training set
:mod:`mlearn.data.images.recordio_dataset`.
"""
from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from mlearn.data.corrupt import CorruptSampleError, where_text
from mlearn.data.images.base import PathLike, decode_image
from mlearn.data.images.recordio_index import load_index, record_spans, strictly_increasing

log = logging.getLogger(__name__)

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24
_BIG_SPAN = 1 << 22  # spans larger than this (gaps in the index) are read header-first
_FRAMED_IR = struct.Struct("<II" + _IR_FORMAT[1:])  # a whole record's frame word pair + its IRHeader


class IRHeader(NamedTuple):
    """mxnet's image-record header. ``label`` is a float, or float32 [flag] when ``flag > 0``."""

    flag: int
    label: Union[float, np.ndarray]
    id: int
    id2: int


def pack(header: IRHeader, payload: bytes) -> bytes:
    """Serialise ``header`` + ``payload`` like ``mxnet.recordio.pack`` (array labels set ``flag``)."""
    label = header.label
    if isinstance(label, (int, float, np.integer, np.floating)):
        return struct.pack(_IR_FORMAT, 0, float(label), header.id, header.id2) + payload
    values = np.asarray(label, dtype="<f4").ravel()
    return struct.pack(_IR_FORMAT, len(values), 0.0, header.id, header.id2) + values.tobytes() + payload


def unpack(record: bytes, where: Union[str, Callable[[], str]] = "record") -> Tuple[IRHeader, bytes]:
    """Split a record into ``(IRHeader, payload)`` like ``mxnet.recordio.unpack``. ``where`` (or a
    callable giving it) names the record in error messages."""
    if len(record) < IR_SIZE:
        raise CorruptSampleError(f"{where_text(where)}: {len(record)} bytes, shorter than the "
                                 f"{IR_SIZE}-byte IRHeader")
    flag, label, id_, id2 = struct.unpack_from(_IR_FORMAT, record)
    if flag == 0:
        return IRHeader(0, label, id_, id2), record[IR_SIZE:]
    end = IR_SIZE + 4 * flag
    if len(record) < end:
        raise CorruptSampleError(f"{where_text(where)}: IRHeader flag={flag} needs {end} bytes, record has "
                                 f"{len(record)}")
    labels = np.frombuffer(record, dtype="<f4", count=flag, offset=IR_SIZE).astype(np.float32)
    return IRHeader(flag, labels, id_, id2), record[end:]


def frame(data: bytes) -> bytes:
    """Encode ``data`` as RecordIO part(s), as dmlc's ``RecordIOWriter::WriteRecord`` does."""
    if len(data) >= 1 << 29:
        raise ValueError(f"RecordIO records must be < 2^29 bytes, got {len(data)}")
    parts: List[bytes] = []
    start = 0
    pos = data.find(_MAGIC_BYTES)
    while pos != -1:
        if pos % 4 == 0:  # only aligned occurrences split the record
            parts.append(data[start:pos])
            start = pos + 4
            pos = data.find(_MAGIC_BYTES, start)
        else:
            pos = data.find(_MAGIC_BYTES, pos + 1)
    parts.append(data[start:])
    out = bytearray()
    for i, part in enumerate(parts):
        if len(parts) == 1:
            cflag = 0
        else:
            cflag = 1 if i == 0 else (3 if i == len(parts) - 1 else 2)
        out += struct.pack("<II", MAGIC, (cflag << 29) | len(part))
        out += part
        out += b"\0" * (-len(part) % 4)
    return bytes(out)


class _Short(Exception):
    """The buffer ends inside the record; ``needed`` bytes from its start are required to go on."""

    def __init__(self, needed: int) -> None:
        super().__init__(needed)
        self.needed = needed


def _unframe(buf: bytes, where: Callable[[], str]) -> bytes:
    """Parse the record at the start of ``buf`` and return its data (parts joined). Raises
    :class:`_Short` when ``buf`` ends inside it and :class:`CorruptSampleError` on a bad layout."""
    pos = 0
    parts: List[bytes] = []
    while True:
        if len(buf) < pos + 8:
            raise _Short(pos + 8)
        magic, lrec = struct.unpack_from("<II", buf, pos)
        if magic != MAGIC:
            raise CorruptSampleError(f"{where()}: bad magic 0x{magic:08x} at +{pos} (expected 0x{MAGIC:08x})")
        cflag, length = lrec >> 29, lrec & _LEN_MASK
        first = not parts
        if (first and cflag not in (0, 1)) or (not first and cflag not in (2, 3)):
            raise CorruptSampleError(f"{where()}: unexpected continuation flag {cflag} at +{pos}")
        end = pos + 8 + length
        if len(buf) < end:
            raise _Short(end if cflag in (0, 3) else end + (-length % 4) + 8)
        parts.append(buf[pos + 8:end])
        pos = end + (-length % 4)
        if cflag in (0, 3):
            return parts[0] if len(parts) == 1 else _MAGIC_BYTES.join(parts)


class RecordIOReader:
    """Random access to the records of a ``.rec`` file through its ``.idx``.

    Safe with DataLoader workers: the file is opened lazily once per process (a forked worker
    re-opens it), reads are positional (``os.pread``), and pickling drops the handle. Without an
    ``.idx`` the file is scanned once and records get keys ``0..N-1`` in file order. ``cache_index``:
    see :func:`load_index` (``None``: cache indexes of 64 MiB and more).
    """

    def __init__(self, rec_path: PathLike, idx_path: Optional[PathLike] = None,
                 cache_index: Optional[bool] = None) -> None:
        self.rec_path = Path(rec_path)
        self.cache_index = cache_index
        if not self.rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {self.rec_path}")
        self.idx_path = Path(idx_path) if idx_path is not None else self.rec_path.with_suffix(".idx")
        self.file_size = self.rec_path.stat().st_size
        self._fd: Optional[int] = None
        self._file: Any = None
        self._pid = -1
        self._lock = threading.Lock()
        self._build_index()

    def _load_index(self) -> Tuple[np.ndarray, np.ndarray]:
        if self.idx_path.is_file():
            return load_index(self.idx_path, self.cache_index)
        log.warning("%s: no index %s; scanning the file to build one", self.rec_path, self.idx_path)
        offsets = self._scan_offsets()
        return np.arange(len(offsets), dtype=np.int64), offsets

    def _build_index(self) -> None:
        """Read the index, sort it by key (a no-op for indexes written in key order) and derive each
        record's span.

        Keys ``0..N-1`` in order (insightface sets) are not kept (freed before the spans are made): the
        reader then holds 12 bytes per record (int64 offset, int32 span)."""
        keys, offsets = self._load_index()
        if len(offsets) and int(offsets.min()) < 0:
            raise ValueError(f"{self.idx_path}: negative offset for key {int(keys[np.argmax(offsets < 0)])}")
        past_end = int(np.count_nonzero(offsets >= self.file_size))
        if past_end:  # kept: reading them raises CorruptSampleError (datasets drop and count them at open)
            log.warning("%s: %d index entries point past the end of %s (%d bytes); truncated file?",
                        self.idx_path, past_end, self.rec_path, self.file_size)
        if not strictly_increasing(keys):
            order = np.argsort(keys, kind="stable")
            keys, offsets = keys[order], offsets[order]
            del order
            if len(keys) > 1 and (np.diff(keys) == 0).any():
                raise ValueError(f"{self.idx_path}: duplicate keys")
        self._contiguous = len(keys) == 0 or bool(keys[0] == 0 and keys[-1] == len(keys) - 1)
        self._keys: Optional[np.ndarray] = None if self._contiguous else keys
        del keys
        self.offsets = offsets
        self.spans = record_spans(offsets, self.file_size)

    @property
    def keys(self) -> np.ndarray:
        """The record keys in increasing order: int64 [N] (built on demand for keys ``0..N-1``)."""
        return self._keys if self._keys is not None else np.arange(len(self.offsets), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets)

    def __contains__(self, key: int) -> bool:
        return self._position(key) is not None

    def positions(self, keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Where each of ``keys`` (int64 [K]) sits in the index: (positions [K], known bool [K]);
        the position of an unknown key is 0."""
        keys = np.asarray(keys, dtype=np.int64)
        if self._keys is None:
            known = (keys >= 0) & (keys < len(self.offsets))
            return np.where(known, keys, 0), known
        pos = np.searchsorted(self._keys, keys)
        known = pos < len(self._keys)
        known[known] = self._keys[pos[known]] == keys[known]
        return np.where(known, pos, 0), known

    def _position(self, key: int) -> Optional[int]:
        if self._keys is None:
            return int(key) if 0 <= key < len(self.offsets) else None
        pos = int(np.searchsorted(self._keys, key))
        return pos if pos < len(self._keys) and self._keys[pos] == key else None

    def _scan_offsets(self) -> np.ndarray:
        offsets: List[int] = []
        with self.rec_path.open("rb") as f:
            pos, first = 0, True
            while pos + 8 <= self.file_size:
                f.seek(pos)
                magic, lrec = struct.unpack("<II", f.read(8))
                if magic != MAGIC:
                    raise ValueError(f"{self.rec_path}: bad magic at byte {pos}; cannot index it "
                                     f"without an .idx")
                cflag, length = lrec >> 29, lrec & _LEN_MASK
                if first:
                    offsets.append(pos)
                first = cflag in (0, 3)
                pos += 8 + length + (-length % 4)
        return np.asarray(offsets, dtype=np.int64)

    def _ensure_open(self) -> None:
        if self._pid != os.getpid():  # first use in this process (or a forked DataLoader worker)
            self._open()

    def _pread(self, offset: int, size: int) -> bytes:
        self._ensure_open()
        if self._fd is not None:
            return os.pread(self._fd, size, offset)
        with self._lock:
            self._file.seek(offset)
            return self._file.read(size)

    def _open(self) -> None:
        if hasattr(os, "pread"):
            self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        else:  # Windows
            self._file = self.rec_path.open("rb", buffering=0)
        self._pid = os.getpid()

    def close(self) -> None:
        """Close this process's file handle (reopened on the next read)."""
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        if self._file is not None:
            self._file.close()
        self._fd, self._file, self._pid = None, None, -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fd=None, _file=None, _pid=-1, _lock=None)
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def where(self, key: int) -> str:
        return f"record {key} of {self.rec_path}"

    def read_span(self, key: int) -> Optional[bytes]:
        """:meth:`read_spans` of one key."""
        pos = self._position(key)
        if pos is None or self.spans[pos] > _BIG_SPAN:
            return None
        try:
            return self._pread(int(self.offsets[pos]), int(self.spans[pos]))
        except OSError:
            return None

    def read_spans(self, keys: Sequence[int]) -> List[Optional[bytes]]:
        """For each key, the raw bytes from its record's offset to the next record's (frame included,
        unparsed): one positional read each. ``None`` for an unknown key, a span over 4 MiB or a failed
        read (:meth:`read` then gives the data or the error)."""
        pos, known = self.positions(keys)
        sizes = self.spans[pos] if len(self.offsets) else np.zeros(len(pos), dtype=np.int32)
        offsets = self.offsets[pos] if len(self.offsets) else sizes
        readable = known & (sizes <= _BIG_SPAN)
        self._ensure_open()
        fd = self._fd  # os.pread directly (once per training image); self._pread where there is no fd
        out: List[Optional[bytes]] = []
        for ok, offset, size in zip(readable.tolist(), offsets.tolist(), sizes.tolist()):
            if not ok:
                out.append(None)
                continue
            try:
                out.append(os.pread(fd, size, offset) if fd is not None else self._pread(offset, size))
            except OSError:
                out.append(None)
        return out

    def read(self, key: int, prefix: Optional[int] = None) -> bytes:
        """The data of record ``key`` (multi-part records joined). Raises ``KeyError`` for an unknown
        key and :class:`CorruptSampleError` for a truncated or malformed record, or one whose length
        words reach past its span (reads never go beyond the span: a corrupt length costs nothing).

        With ``prefix``, only the first ``prefix`` bytes of the data are needed (a cheap header
        read); fewer come back only when the record is shorter.
        """
        pos = self._position(key)
        if pos is None:
            raise KeyError(f"key {key} not in {self.idx_path}")
        offset, span = int(self.offsets[pos]), int(self.spans[pos])

        def where() -> str:
            return self.where(key)
        available = self.file_size - offset
        size = min(span, _BIG_SPAN) if prefix is None else min(span, 8 + prefix)
        while True:
            try:
                buf = self._pread(offset, max(size, 8))
            except OSError as exc:
                raise CorruptSampleError(f"{where()}: read error at byte {offset} ({exc})") from None
            if prefix is not None and len(buf) >= 8:
                magic, lrec = struct.unpack_from("<II", buf)
                length = lrec & _LEN_MASK
                if magic == MAGIC and lrec >> 29 in (0, 1) and len(buf) >= 8 + min(prefix, length):
                    if length >= prefix or lrec >> 29 == 0:
                        return buf[8:8 + min(prefix, length)]
                prefix = None  # the magic split the header: read the whole record
            try:
                return _unframe(buf, where)
            except _Short as short:
                if short.needed > min(span, available) or short.needed <= len(buf):
                    text = _overrun_text(where(), short.needed, offset, span, available)
                    raise CorruptSampleError(text) from None
                size = max(short.needed, min(span, _BIG_SPAN))


def _overrun_text(where: str, needed: int, offset: int, span: int, available: int) -> str:
    """Why a record that needs ``needed`` bytes from ``offset`` cannot be read whole."""
    if available <= 0:
        return f"{where}: truncated (its offset {offset} is past the end of the file)"
    if span < available:
        return (f"{where}: corrupt length (its frame needs {needed} bytes from offset {offset}, but the "
                f"next record in the .idx starts {span} bytes after it)")
    return f"{where}: truncated (needs {needed} bytes from offset {offset}, file has {available})"


class _IndexedWriter:
    """Low-level ``.rec`` + ``.idx`` writer; keys must increase (the index is streamed, so writing
    tens of millions of records needs no memory per record)."""

    def __init__(self, rec_path: Path, idx_path: Path) -> None:
        self.rec_path, self.idx_path = rec_path, idx_path
        self._file = rec_path.open("wb")
        self._idx = idx_path.open("w")
        self._last_key = -1
        self._reserved: Dict[int, Tuple[int, int]] = {}  # key -> (offset, framed size), for overwrite()

    def write(self, key: int, data: bytes, reserve: bool = False) -> int:
        """Append record ``key``; with ``reserve`` it can be rewritten later by :meth:`overwrite`."""
        if key <= self._last_key:
            raise ValueError(f"{self.rec_path}: key {key} after key {self._last_key}; keys must increase")
        offset = self._file.tell()
        framed = frame(data)
        self._file.write(framed)
        self._idx.write(f"{key}\t{offset}\n")
        self._last_key = key
        if reserve:
            self._reserved[key] = (offset, len(framed))
        return offset

    def overwrite(self, key: int, data: bytes) -> None:
        """Rewrite reserved record ``key`` in place; the new framed record must have the old size."""
        offset, size = self._reserved[key]
        framed = frame(data)
        if len(framed) != size:
            raise ValueError(f"{self.rec_path}: record {key} is {size} bytes; cannot overwrite with "
                             f"{len(framed)}")
        end = self._file.tell()
        self._file.seek(offset)
        self._file.write(framed)
        self._file.seek(end)

    def close(self) -> None:
        self._file.close()
        self._idx.close()


class RecordIOWriter:
    """Write an insightface-style RecordIO set: ``root/train.rec``, ``train.idx``, ``property``.

    Add images grouped by label (each label's images contiguous, as insightface's identity
    records require; not needed with ``insightface_header=False``)::

        with RecordIOWriter(root) as writer:
            writer.add(jpeg_bytes_or_rgb_uint8_array, label)

    On close it writes header record 0 (``flag=2, label=[N+1, N+1+C]``), one identity record per
    label (keys ``N+1..N+C``, label ``[first key, last key + 1)``) and ``property``. With
    ``insightface_header=False`` only the images are written, with keys ``0..N-1``.
    """

    def __init__(self, root: PathLike, insightface_header: bool = True, jpeg_quality: int = 95,
                 name: str = "train") -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.insightface_header = insightface_header
        self.jpeg_quality = jpeg_quality
        self._writer = _IndexedWriter(self.root / f"{name}.rec", self.root / f"{name}.idx")
        self._next_key = 1 if insightface_header else 0
        self._ranges: List[Tuple[float, int, int]] = []  # (class label, first key, end key)
        self._seen: set = set()
        self._shape: Optional[Tuple[int, int]] = None
        self._closed = False
        if insightface_header:  # placeholder of the final size, rewritten on close
            self._writer.write(0, self._header0(0, 0), reserve=True)

    @staticmethod
    def _header0(a: int, b: int) -> bytes:
        return pack(IRHeader(2, np.array([a, b], np.float32), 0, 0), b"")

    def __len__(self) -> int:
        return self._next_key - (1 if self.insightface_header else 0)

    def add(self, image: Union[bytes, np.ndarray], label: Union[int, float, Sequence[float]]) -> int:
        """Append one image (encoded bytes, or uint8 [H, W, 3] RGB encoded as JPEG). ``label`` is a
        number, or a float sequence stored as ``flag = len(label)`` floats (class = ``label[0]``).
        Returns the record key."""
        if self._closed:
            raise ValueError(f"{self._writer.rec_path}: writer is closed")
        if isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
                raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {image.dtype} {image.shape}")
            if self._shape is None:
                self._shape = image.shape[:2]
            ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, self.jpeg_quality])
            if not ok:
                raise ValueError("cv2.imencode failed")
            payload = encoded.tobytes()
        else:
            payload = bytes(image)
            if self._shape is None:
                try:
                    self._shape = decode_image(payload, "first image").shape[:2]
                except CorruptSampleError:
                    pass
        scalar = isinstance(label, (int, float, np.integer, np.floating))
        cls = float(label) if scalar else float(np.asarray(label, dtype=np.float32).ravel()[0])
        key = self._next_key
        if not self._ranges or self._ranges[-1][0] != cls:
            if cls in self._seen and self.insightface_header:
                raise ValueError(f"label {cls:g} was added before, then other labels; add images grouped "
                                 f"by label")
            self._seen.add(cls)
            self._ranges.append((cls, key, key))
        self._ranges[-1] = (cls, self._ranges[-1][1], key + 1)
        self._writer.write(key, pack(IRHeader(0, float(label) if scalar else label, key, 0), payload))
        self._next_key += 1
        return key

    def close(self) -> None:
        """Write the identity records, header record 0, the index and ``property``."""
        if self._closed:
            return
        self._closed = True
        num_images = len(self)
        if self.insightface_header:
            first_identity = num_images + 1
            for j, (_, start, end) in enumerate(self._ranges):
                key = first_identity + j
                label = np.array([start, end], np.float32)
                self._writer.write(key, pack(IRHeader(2, label, key, 0), b""))
            self._writer.overwrite(0, self._header0(first_identity, first_identity + len(self._ranges)))
        self._writer.close()
        height, width = self._shape or (112, 112)
        (self.root / "property").write_text(f"{len(self._seen)},{height},{width}\n")

    def __enter__(self) -> "RecordIOWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
