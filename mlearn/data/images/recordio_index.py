"""The ``.idx`` of a RecordIO file (``key<TAB>byte offset`` lines): a bounded-memory parser, a
memory-mapped cache beside the index, and the byte span of every record."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np

log = logging.getLogger(__name__)

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


def strictly_increasing(values: np.ndarray, block: int = 1 << 20) -> bool:
    """Whether ``values`` strictly increase (compared block by block: no N-sized temporary)."""
    for start in range(0, max(len(values) - 1, 0), block):
        a = values[start:start + block + 1]
        if not (a[1:] > a[:-1]).all():
            return False
    return True


def record_spans(offsets: np.ndarray, file_size: int, block: int = 1 << 18) -> np.ndarray:
    """Bytes from each record's offset to the next record's (or the end of the file), by offset:
    int32 [N], 0 past the end of the file, clipped at 2^31 - 1 (records are < 2^29 bytes)."""
    limit = np.iinfo(np.int32).max
    spans = np.empty(len(offsets), dtype=np.int32)
    if len(offsets) < 2 or strictly_increasing(offsets):  # the usual layout: one pass, no sort
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
