"""``RecordIODataset``: an insightface RecordIO training set (``train.rec`` + ``train.idx`` +
``property``; the format: :mod:`mlearn.data.images.recordio`), its labels read from the identity
records (or, when those do not tile the images, from every image header)."""
from __future__ import annotations

import logging
import struct
from pathlib import Path
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

from mlearn.data.corrupt import CorruptSampleError
from mlearn.data.images.base import IdentityImageDataset, PathLike, Transform
from mlearn.data.images.recordio import (
    _FRAMED_IR,
    _LEN_MASK,
    IR_SIZE,
    MAGIC,
    IRHeader,
    RecordIOReader,
    unpack,
)

log = logging.getLogger(__name__)


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
