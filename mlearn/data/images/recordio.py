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
"""
from __future__ import annotations

import logging
import os
import struct
import threading
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from mlearn.data.corrupt import CorruptSampleError, decode_image, where_text
from mlearn.data.folders import IdentityImageDataset, PathLike, Transform

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


_INDEX_CHUNK = 1 << 22  # bytes of .idx text parsed at a time (about 200K lines)
_INT64_LIMITS = (np.iinfo(np.int64).min, np.iinfo(np.int64).max)  # what an overflowing field parses to


def _read_index(idx_path: Path, chunk_bytes: int = _INDEX_CHUNK) -> Tuple[np.ndarray, np.ndarray]:
    """Parse ``key<TAB>offset`` lines: (keys int64 [N], offsets int64 [N]).

    Memory stays bounded at WebFace scale: a first pass counts the lines to size the two output
    arrays, a second parses chunks of about ``chunk_bytes`` (cut at line ends) with numpy's C parser,
    so the peak is the 16 bytes per line of the result plus one chunk.
    """
    capacity = 0
    for _, chunk in _line_chunks(idx_path, chunk_bytes):
        capacity += chunk.count(b"\n") + 1
    keys = np.empty(capacity, dtype=np.int64)
    offsets = np.empty(capacity, dtype=np.int64)
    count = 0
    for first_line, chunk in _line_chunks(idx_path, chunk_bytes):
        values = _parse_index_chunk(chunk, idx_path, first_line)
        pairs = values.size // 2
        keys[count:count + pairs] = values[0::2]
        offsets[count:count + pairs] = values[1::2]
        count += pairs
    return keys[:count], offsets[:count]


INDEX_CACHE_MIN_BYTES = 64 << 20  # .idx files this large (~3.5M lines) are cached beside themselves


def load_index(idx_path: Path, cache: Optional[bool] = None) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`_read_index` through a cache beside the index, ``<name>.idx.npy`` (with ``cache=None``
    only for indexes of :data:`INDEX_CACHE_MIN_BYTES` and more).

    The cache is an int64 [2, N + 1] ``.npy`` (no pickle): column 0 holds the index's size and
    mtime (ns) when it was parsed, rows 0/1 the keys/offsets. It is memory-mapped, so the ranks and
    workers of a node share one copy in the page cache; a cache whose stamp differs from the index's
    is ignored and rewritten. A folder that cannot be written (read-only data) just goes uncached.
    """
    stat = idx_path.stat()
    if not (stat.st_size >= INDEX_CACHE_MIN_BYTES if cache is None else cache):
        return _read_index(idx_path)
    cache_path = idx_path.with_name(idx_path.name + ".npy")
    stamp = (stat.st_size, stat.st_mtime_ns)
    cached = _load_index_cache(cache_path, stamp)
    if cached is not None:
        return cached
    keys, offsets = _read_index(idx_path)
    _write_index_cache(cache_path, stamp, keys, offsets)
    return keys, offsets


def _load_index_cache(path: Path, stamp: Tuple[int, int]) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    if not path.is_file():
        return None
    try:
        table = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable index cache, parsing the index instead (%s)", path, exc)
        return None
    if table.dtype != np.int64 or table.ndim != 2 or table.shape[0] != 2 or table.shape[1] < 1:
        log.warning("%s: not an index cache (int64 [2, N + 1]); parsing the index instead", path)
        return None
    if (int(table[0, 0]), int(table[1, 0])) != stamp:
        log.info("%s: stale (the index changed since it was cached); parsing the index", path)
        return None
    return np.asarray(table[0, 1:]), np.asarray(table[1, 1:])


def _write_index_cache(path: Path, stamp: Tuple[int, int], keys: np.ndarray, offsets: np.ndarray,
                       block: int = 1 << 20) -> None:
    """Write the cache block by block (no [2, N] copy in memory), atomically (a temporary file renamed)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False,
                                                     "shape": (2, len(keys) + 1)})
            for first, values in zip(stamp, (keys, offsets)):
                f.write(np.asarray([first], dtype="<i8").tobytes())
                for start in range(0, len(values), block):
                    f.write(values[start:start + block].astype("<i8", copy=False).tobytes())
        os.replace(tmp, path)
        log.info("%s: index cached", path)
    except OSError as exc:
        log.info("%s: index not cached (%s)", path, exc)
        try:
            tmp.unlink()
        except OSError:
            pass


def _line_chunks(path: Path, chunk_bytes: int) -> Iterator[Tuple[int, bytes]]:
    """``(number of the chunk's first line, chunk)`` of about ``chunk_bytes`` each, cut after a newline."""
    line, rest = 1, b""
    with path.open("rb") as f:
        while True:
            block = f.read(chunk_bytes)
            if not block:
                break
            data = rest + block
            cut = data.rfind(b"\n") + 1
            if cut == 0:  # one line longer than a chunk: keep reading
                rest = data
                continue
            yield line, data[:cut]
            line += data.count(b"\n", 0, cut)
            rest = data[cut:]
    if rest.strip():
        yield line, rest


def _parse_index_chunk(chunk: bytes, idx_path: Path, first_line: int) -> np.ndarray:
    """The integers of whole ``key<TAB>offset`` lines, flat int64 [2 x lines]; the first malformed
    line raises ``ValueError`` naming ``file:line``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)  # numpy's "could not be read to its end"
        try:
            values = np.fromstring(chunk, dtype=np.int64, sep=" ")  # any whitespace separates
        except (ValueError, DeprecationWarning):
            values = None
    lines = chunk.count(b"\n") + (not chunk.endswith(b"\n"))
    if values is not None and values.size == 2 * lines and not np.isin(values, _INT64_LIMITS).any():
        return values
    return _parse_index_lines(chunk, idx_path, first_line)  # blank lines, or an error to locate


def _parse_index_lines(chunk: bytes, idx_path: Path, first_line: int) -> np.ndarray:
    values: List[int] = []
    for lineno, line in enumerate(chunk.split(b"\n"), first_line):
        fields = line.split()
        if not fields:
            continue
        try:
            pair = [int(x) for x in fields]
        except ValueError:
            pair = []
        if len(pair) != 2 or not all(_INT64_LIMITS[0] < v < _INT64_LIMITS[1] for v in pair):
            text = line.decode("utf-8", "replace").strip()[:80]
            raise ValueError(f"{idx_path}:{lineno}: expected 'key<TAB>offset' integer lines, got {text!r}")
        values.extend(pair)
    return np.asarray(values, dtype=np.int64)


def _increasing(values: np.ndarray, block: int = 1 << 20) -> bool:
    """Whether ``values`` strictly increase (compared block by block: no N-sized temporary)."""
    for start in range(0, max(len(values) - 1, 0), block):
        a = values[start:start + block + 1]
        if not (a[1:] > a[:-1]).all():
            return False
    return True


def _spans(offsets: np.ndarray, file_size: int, block: int = 1 << 18) -> np.ndarray:
    """Bytes from each record's offset to the next record's (or the end of the file), by offset:
    int32 [N], 0 past the end of the file, clipped at 2^31 - 1 (records are < 2^29 bytes)."""
    limit = np.iinfo(np.int32).max
    spans = np.empty(len(offsets), dtype=np.int32)
    if len(offsets) < 2 or _increasing(offsets):  # the usual layout: one pass, no sort
        for start in range(0, len(offsets), block):
            here = offsets[start:start + block]
            following = offsets[start + 1:start + block + 1]
            ends = np.full(len(here), file_size, dtype=np.int64)
            ends[:len(following)] = np.minimum(following, file_size)
            spans[start:start + block] = np.clip(ends - here, 0, limit)
        return spans
    by_offset = np.argsort(offsets, kind="stable")
    ends = np.empty_like(offsets)
    ends[by_offset[:-1]] = np.minimum(offsets[by_offset[1:]], file_size)
    ends[by_offset[-1]] = file_size
    spans[:] = np.clip(ends - offsets, 0, limit)
    return spans


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
        if not _increasing(keys):
            order = np.argsort(keys, kind="stable")
            keys, offsets = keys[order], offsets[order]
            del order
            if len(keys) > 1 and (np.diff(keys) == 0).any():
                raise ValueError(f"{self.idx_path}: duplicate keys")
        self._contiguous = len(keys) == 0 or bool(keys[0] == 0 and keys[-1] == len(keys) - 1)
        self._keys: Optional[np.ndarray] = None if self._contiguous else keys
        del keys
        self.offsets = offsets
        self.spans = _spans(offsets, self.file_size)

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


def _find_rec(root: Path) -> Tuple[Path, Path]:
    if root.is_dir():
        return root / "train.rec", root / "train.idx"
    return root, root.with_suffix(".idx")


_FLOAT32_EXACT = 1 << 24  # integers below this are exact in float32


def _float32_window(value: float) -> Tuple[int, int]:
    """``[lo, hi]``: the integers that round to float32 ``value`` (one integer below 2^24)."""
    if abs(value) < _FLOAT32_EXACT:
        return int(value), int(value)
    half = float(np.spacing(np.float32(abs(value)))) / 2
    return int(np.ceil(value - half)), int(np.floor(value + half))


class RecordIODataset(IdentityImageDataset):
    """An insightface RecordIO training set (MS1MV2/V3, Glint360K, WebFace, CASIA as distributed).

    Args:
        root: folder with ``train.rec`` + ``train.idx`` (+ optional ``property``), or a ``.rec`` path
            (index beside it with the ``.idx`` suffix).
        transform: applied to the uint8 [H, W, 3] RGB image.
        strict: raise :class:`CorruptSampleError` for a corrupt record instead of returning ``None``,
            and ``ValueError`` at open when records are dropped there.

    Labels come from the identity records when header record 0 provides them (three small reads per
    identity: its range, and the labels of its first and last image, which must agree; counts above
    2^24, rounded in float32, are made exact from the records next to them), otherwise (logged, with
    the reason) from reading every image record's header (no image decoding).

    Image records the ``.idx`` lacks, that lie past the end of the ``.rec`` (a truncated copy) or
    whose label cannot be read are dropped at open: ``num_dropped_at_open`` counts them and
    ``dropped_at_open`` says why (one line per cause); an empty set is a ``ValueError``.
    """

    format_name = "recordio"

    def __init__(self, root: PathLike, transform: Optional[Transform] = None, strict: bool = False) -> None:
        super().__init__(transform, strict)
        self.root = Path(root)
        rec_path, idx_path = _find_rec(self.root)
        if not rec_path.is_file():
            raise FileNotFoundError(f"RecordIO file not found: {rec_path}")
        self.reader = RecordIOReader(rec_path, idx_path)
        self.header0: Optional[Tuple[int, int]] = None
        self.num_dropped_at_open = 0
        self.dropped_at_open: List[str] = []  # why, one line per cause
        image_keys = self._image_keys()
        original = self._labels_from_identity_records(len(image_keys)) if self.header0 else None
        if original is None:
            original, image_keys = self._labels_from_headers(self._drop_absent(image_keys))
        else:
            present = self._present(image_keys)
            original, image_keys = original[present], image_keys[present]
        self._check_opened(len(image_keys))
        self.image_keys = image_keys
        uniques, inverse = np.unique(original, return_inverse=True)
        self.labels = inverse.astype(np.int64).ravel()
        self.label_map: Dict[Hashable, int] = {int(u) if float(u).is_integer() else float(u): i
                                                for i, u in enumerate(uniques.tolist())}
        self.image_shape = self._read_property(rec_path.parent / "property")

    def _image_keys(self) -> np.ndarray:
        keys = self.reader.keys
        if 0 not in self.reader:
            return keys
        try:
            header, payload = unpack(self.reader.read(0), self.reader.where(0))
        except CorruptSampleError:
            return keys
        if header.flag >= 2 and not payload:
            start_f, end_f = float(header.label[0]), float(header.label[1])
            bounds = self._exact_header0(start_f, end_f)
            if bounds is None:
                lo = _float32_window(start_f)[0]
                log.warning("%s: header record 0 gives ~%d images (float32, inexact above 2^24) and no "
                            "identity record matches it: images taken as keys 1..%d, labels from every "
                            "image header", self.reader.rec_path, start_f - 1, lo - 1)
                return keys[(keys >= 1) & (keys < lo)]
            self.header0 = bounds
            return np.arange(1, bounds[0], dtype=np.int64)
        return keys

    def _exact_header0(self, start_f: float, end_f: float) -> Optional[Tuple[int, int]]:
        """``[first identity key, end)`` from header record 0's float32 labels, made exact where they
        are not (above 2^24) from the records themselves: the first identity record is the one whose
        range starts at key 1, and the identity records run to the next key that is not one."""
        lo, hi = _float32_window(start_f)
        start = lo if lo == hi else next((k for k in range(lo, hi + 1) if self._starts_identities(k)), None)
        if start is None:
            return None
        lo, hi = _float32_window(end_f)
        if lo == hi:
            return start, lo
        end = next((k for k in range(max(lo, start + 1), hi + 2) if self._identity_range(k) is None), None)
        return None if end is None or end > hi else (start, end)

    def _starts_identities(self, key: int) -> bool:
        """Whether ``key`` is the first identity record (its range starts at image key 1)."""
        bounds = self._identity_range(key)
        return bounds is not None and bounds[0] == 1.0

    def _identity_range(self, key: int) -> Optional[Tuple[float, float]]:
        """The float32 ``[start, end)`` of identity record ``key``; ``None`` when it is not one."""
        try:
            header, payload = unpack(self.reader.read(key), self.reader.where(key))
        except (CorruptSampleError, KeyError):
            return None
        if header.flag < 2 or payload:
            return None
        return float(header.label[0]), float(header.label[1])

    def _present(self, keys: np.ndarray) -> np.ndarray:
        """bool [K]: which ``keys`` the ``.idx`` lists at an offset inside the ``.rec``; the others are
        dropped at open (counted in ``num_dropped_at_open``, an error when ``strict``)."""
        pos, known = self.reader.positions(keys)
        inside = known & (self.reader.offsets[pos] < self.reader.file_size) if len(self.reader) else known
        missing, past_end = int((~known).sum()), int((known & ~inside).sum())
        if missing:
            self._note_dropped(missing, f"{missing} image keys missing from {self.reader.idx_path} "
                                        f"(first: {int(keys[np.argmax(~known)])})")
        if past_end:
            self._note_dropped(past_end, f"{past_end} image records past the end of {self.reader.rec_path} "
                                         f"({self.reader.file_size} bytes; truncated copy?)")
        return inside

    def _drop_absent(self, keys: np.ndarray) -> np.ndarray:
        return keys[self._present(keys)]

    def _note_dropped(self, count: int, why: str) -> None:
        self.num_dropped_at_open += count
        self.dropped_at_open.append(why)
        log.warning("%s: dropped at open: %s", self.reader.rec_path, why)

    def _check_opened(self, num_images: int) -> None:
        """An empty set, or records dropped at open under ``strict``: one error naming the files."""
        why = "; ".join(self.dropped_at_open)
        if num_images == 0:
            raise ValueError(f"{self.reader.rec_path}: no readable image records ({self.reader.file_size} "
                             f"bytes, {len(self.reader)} entries in {self.reader.idx_path})"
                             + (f": {why}" if why else ""))
        if self.strict and self.num_dropped_at_open:
            total = num_images + self.num_dropped_at_open
            raise ValueError(f"{self.reader.rec_path}: {self.num_dropped_at_open} of {total} image records "
                             f"cannot be read ({why}); strict: true stops here, strict: false skips and "
                             f"counts them")

    def _scan_instead(self, reason: str) -> None:
        log.warning("%s: labels read from every image header instead of the identity records: %s",
                    self.reader.rec_path, reason)

    def _labels_from_identity_records(self, num_images: int) -> Optional[np.ndarray]:
        """Original labels of keys ``1..num_images`` from the identity records (sorted by range start,
        they must tile the keys); ``None`` (logged) when they do not. Ranges above 2^24 are float32-
        rounded: each end is then found where the image class changes within the rounding window."""
        assert self.header0 is not None
        start, end = self.header0
        if end <= start:
            return self._scan_instead(f"header record 0 lists no identity records ({start}, {end})")
        bounds = np.empty((end - start, 2), dtype=np.float64)
        labels = np.full(num_images, np.nan, dtype=np.float64)
        try:
            for j, key in enumerate(range(start, end)):
                header, _ = unpack(self.reader.read(key), self.reader.where(key))
                bounds[j] = header.label[0], header.label[1]
            pos = 1
            for j in np.argsort(bounds[:, 0], kind="stable").tolist():
                first, stop = bounds[j]
                lo, hi = _float32_window(first)
                if not lo <= pos <= hi:
                    return self._scan_instead(f"identity record {start + j} starts at key {first:g}; the "
                                              f"previous one ends at {pos}")
                cls = self._first_class(pos, _float32_window(stop)[0])
                after = self._range_stop(stop, pos, cls, num_images)
                if after is None:
                    return self._scan_instead(f"identity record {start + j} ends at key {stop:g}, which "
                                              f"does not match the class labels of its images")
                labels[pos - 1:after - 1] = cls
                pos = after
        except (CorruptSampleError, KeyError, IndexError, TypeError) as exc:
            return self._scan_instead(f"identity record or image unreadable ({exc})")
        if pos != num_images + 1:
            return self._scan_instead(f"identity records cover keys 1..{pos - 1} of 1..{num_images}")
        return labels

    def _first_class(self, key: int, end: int, tries: int = 4) -> float:
        """The class of the first readable image among keys ``key..`` (up to ``tries`` of them, all
        before ``end``): one corrupt first image does not force a scan of every header."""
        last = max(min(key + tries, end), key + 1)
        for k in range(key, last):
            cls = self._read_class_or_none(k)
            if cls is not None:
                return cls
        raise CorruptSampleError(f"{self.reader.where(key)}: label unreadable (and of the next "
                                 f"{last - key - 1} images of its identity)")

    def _range_stop(self, stop: float, pos: int, cls: float, num_images: int) -> Optional[int]:
        """The exact end key of an identity range starting at ``pos`` of class ``cls`` whose stored
        end is float32 ``stop``; ``None`` when the image labels contradict it."""
        lo, hi = _float32_window(stop)
        lo, hi = max(lo, pos + 1), min(hi, num_images + 1)
        if lo > hi:
            return None
        if lo == hi:
            last = self._read_class_or_none(lo - 1) if lo - 1 > pos else None
            return lo if last in (cls, None) else None
        for key in range(lo, hi + 1):  # rounded: the range ends at the first image of another class
            if key == num_images + 1:
                return key
            other = self._read_class_or_none(key)
            if other is None:
                return None  # cannot tell where the identity ends
            if other != cls:
                return key
        return None

    def _labels_from_headers(self, image_keys: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Original labels read from every image header; records whose header cannot be read are
        dropped (counted and logged). Returns (labels float64 [N'], image keys [N'])."""
        labels = np.empty(len(image_keys), dtype=np.float64)
        readable = np.ones(len(image_keys), dtype=bool)
        first_error = ""
        for i, key in enumerate(image_keys.tolist()):
            try:
                labels[i] = self._read_class(key)
            except CorruptSampleError as exc:
                readable[i] = False
                first_error = first_error or str(exc)
                log.debug("dropped (label unreadable): %s", exc)
        unreadable = len(image_keys) - int(readable.sum())
        if unreadable:
            self._note_dropped(unreadable, f"{unreadable} image records whose label is unreadable "
                                           f"(first: {first_error})")
        return labels[readable], image_keys[readable]

    def _read_class_or_none(self, key: int) -> Optional[float]:
        try:
            return self._read_class(key)
        except (CorruptSampleError, KeyError):
            return None

    def _read_class(self, key: int) -> float:
        """The class label of image record ``key`` from its first bytes (``label[0]`` for array labels,
        as arcface_torch does)."""
        data = self.reader.read(key, prefix=IR_SIZE + 4)
        if len(data) < IR_SIZE:
            raise CorruptSampleError(f"{self.reader.where(key)}: {len(data)} bytes, shorter than the "
                                     f"{IR_SIZE}-byte IRHeader")
        flag, label = struct.unpack_from("<If", data)
        if flag == 0:
            return float(label)
        if len(data) < IR_SIZE + 4:
            raise CorruptSampleError(f"{self.reader.where(key)}: IRHeader flag={flag} but no label array")
        return float(struct.unpack_from("<f", data, IR_SIZE)[0])

    @staticmethod
    def _read_property(path: Path) -> Optional[Tuple[int, int]]:
        if not path.is_file():
            return None
        try:
            fields = [int(x) for x in path.read_text().strip().split(",")]
            return fields[1], fields[2]
        except (ValueError, IndexError):
            log.warning("%s: expected 'num_classes,height,width'; ignored", path)
            return None

    def property_num_classes(self) -> Optional[int]:
        """The class count written in ``property`` (``None`` without one)."""
        path = self.reader.rec_path.parent / "property"
        try:
            return int(path.read_text().split(",")[0])
        except (OSError, ValueError):
            return None

    def describe(self, index: int) -> str:
        return self.reader.where(int(self.image_keys[index]))

    def read_record(self, index: int) -> Tuple[IRHeader, bytes]:
        """``(IRHeader, encoded image)`` of sample ``index``; raises :class:`CorruptSampleError`."""
        key = int(self.image_keys[index])
        try:
            data = self.reader.read(key)
        except KeyError:
            raise CorruptSampleError(f"{self.reader.where(key)}: key not in {self.reader.idx_path}") from None
        return unpack(data, lambda: self.reader.where(key))

    def read_bytes(self, index: int) -> bytes:
        data = _single_part_payload(self.reader.read_span(int(self.image_keys[index])))
        return data if data is not None else self._read_general(index)

    def _read_general(self, index: int) -> bytes:
        """Any record layout, and every error message (the fast path's spans are not read again)."""
        return self.read_record(index)[1]

    def read_many(self, indices: Sequence[int]) -> List[Optional[bytes]]:
        spans = self.reader.read_spans(self.image_keys[np.asarray(indices, dtype=np.int64)])
        out = []
        for index, span in zip(indices, spans):
            data = _single_part_payload(span)
            out.append(data if data is not None else self._unless_corrupt(index, self._read_general, index))
        return out


def _single_part_payload(span: Optional[bytes]) -> Optional[bytes]:
    """The encoded image of a raw record span in the layout of nearly every record (one part, IRHeader
    flag 0: a scalar label); ``None`` for anything else (parsed by the general path)."""
    if span is None or len(span) < _FRAMED_IR.size:
        return None
    magic, lrec, flag = _FRAMED_IR.unpack_from(span)[:3]
    end = 8 + (lrec & _LEN_MASK)
    if magic == MAGIC and lrec >> 29 == 0 and flag == 0 and _FRAMED_IR.size <= end <= len(span):
        return span[_FRAMED_IR.size:end]
    return None
