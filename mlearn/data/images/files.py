"""Identity-labelled image sets: the common dataset base, image folders, list files, and ``open_dataset``.

Every dataset here exposes ``labels`` (int64 [N], remapped to ``0..C-1`` in sorted order of the
original labels or identity names, available without decoding any image), ``label_map`` (original
label -> index), ``num_classes``, and ``__getitem__(i) -> (image, label)`` where ``image`` is the
transform's output or, without a transform, uint8 [H, W, 3] RGB. A sample that cannot be read or
decoded gives ``None`` (``strict=False``, logged at debug level; pair with
:func:`mlearn.data.corrupt.collate_skip_corrupt`) or raises :class:`CorruptSampleError` (``strict=True``).
:meth:`IdentityImageDataset.load_batch` assembles a whole batch in place (what
:class:`mlearn.data.samplers.EpochSeededDataset` hands a DataLoader).
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from mlearn.data.batches import AnyImageBatch, BatchAllocator
from mlearn.data.corrupt import CorruptSampleError, decode_image

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
Transform = Callable[[np.ndarray], Any]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
FORMATS_ACCEPTED = ("a folder with train.rec + train.idx (insightface RecordIO), a .rec file, an image "
                    "folder root/<identity>/<image>, or a list file of 'path label' lines")


class IdentityImageDataset(Dataset):
    """Base of the image datasets: label bookkeeping, decoding, and the corrupt-sample policy.

    Subclasses set ``labels`` and ``label_map`` and implement :meth:`read_bytes` and :meth:`describe`.
    """

    format_name = "images"

    def __init__(self, transform: Optional[Transform] = None, strict: bool = False) -> None:
        self.transform = transform
        self.strict = strict
        self.labels: np.ndarray = np.zeros(0, dtype=np.int64)
        self.label_map: Dict[Hashable, int] = {}
        self.batch_allocator = BatchAllocator()

    @property
    def num_classes(self) -> int:
        return len(self.label_map)

    def __len__(self) -> int:
        return len(self.labels)

    def read_bytes(self, index: int) -> bytes:
        """The encoded image of sample ``index``; raises :class:`CorruptSampleError` if unreadable."""
        raise NotImplementedError

    def describe(self, index: int) -> str:
        """Where sample ``index`` lives (file path, or record key and file), for messages."""
        raise NotImplementedError

    def read_many(self, indices: Sequence[int]) -> List[Optional[bytes]]:
        """The encoded images of ``indices``; ``None`` for an unreadable one (raised when ``strict``)."""
        return [self._unless_corrupt(index, self.read_bytes, index) for index in indices]

    def load_image(self, index: int) -> np.ndarray:
        """Decode sample ``index``: uint8 [H, W, 3] RGB; raises :class:`CorruptSampleError`."""
        return decode_image(self.read_bytes(index), lambda: self.describe(index))

    def _unless_corrupt(self, index: int, read: Callable[..., Any], *args: Any) -> Any:
        """``read(*args)`` for sample ``index``; ``None`` if the sample is corrupt (raised if ``strict``)."""
        try:
            return read(*args)
        except CorruptSampleError as exc:
            self._skip(index, exc)
            return None

    def _skip(self, index: int, error: CorruptSampleError) -> None:
        if self.strict:
            raise error
        log.debug("skipping corrupt sample %d: %s", index, error)

    def _decoded(self, indices: Sequence[int], encoded: Sequence[Optional[bytes]]
                 ) -> Iterator[Optional[np.ndarray]]:
        """The images of ``encoded`` decoded one at a time; ``None`` for an unreadable or corrupt one."""
        for index, data in zip(indices, encoded):
            if data is None:
                yield None
                continue
            try:  # inline, not through _unless_corrupt: this loop runs once per training image
                yield decode_image(data, lambda: self.describe(index))
            except CorruptSampleError as exc:
                self._skip(index, exc)
                yield None

    def __getitem__(self, index: int) -> Optional[Tuple[Any, int]]:
        image = self._unless_corrupt(index, self.load_image, index)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.labels[index])

    def load_batch(self, indices: Sequence[int], streams: Optional[Any] = None
                   ) -> Union[AnyImageBatch, List[Optional[Tuple[Any, int]]]]:
        """Samples ``indices`` as one batch. ``streams`` (:class:`mlearn.data.samplers.SampleStreams`):
        the j-th sample's augmentation draws from stream j (``streams.select(j)`` before its transform).

        With a transform that writes in place (``fill_batch`` and ``sample_shape``/``sample_dtype``, as
        :class:`~mlearn.data.transforms.ImageTransform`) each image is decoded and at once transformed
        into one preallocated batch (in a DataLoader worker, a reused shared-memory buffer of
        :class:`~mlearn.data.batches.BatchAllocator`): an :class:`ImageBatch` of
        ``[B', *transform.sample_shape]`` images, the corrupt samples dropped and counted; with a
        transform that ``defers_mirror`` (uint8 output) an :class:`UnmirroredBatch`, whose images are
        still to be mirrored by :func:`~mlearn.data.transforms.normalize_images`. Other transforms give
        the list of ``self[i]`` for :func:`collate_skip_corrupt`.
        """
        transform = self.transform
        if getattr(transform, "fill_batch", None) is None or getattr(transform, "sample_shape", None) is None:
            samples = []
            for position, index in enumerate(indices):
                if streams is not None:
                    streams.select(position)
                samples.append(self[index])
            return samples
        encoded = self.read_many(indices)
        images, buffer_slot = self.batch_allocator.allocate((len(indices), *transform.sample_shape),
                                                            transform.sample_dtype)
        mirror = np.zeros(len(indices), dtype=bool) if getattr(transform, "defers_mirror", False) else None
        # decoded one at a time as fill_batch consumes them: each image is written out while it is
        # still in the cache, and the decoder reuses one freed block instead of 128 of them
        decoded, out = self._decoded(indices, encoded), images.numpy()
        written = (transform.fill_batch(decoded, out, streams) if mirror is None
                   else transform.fill_batch(decoded, out, streams, mirror=mirror))
        labels = torch.from_numpy(self.labels[np.asarray([indices[j] for j in written], dtype=np.int64)])
        good = len(written)
        flags = None if mirror is None else torch.from_numpy(mirror[:good])
        return self.batch_allocator.batch(images[:good], labels, len(indices) - good, buffer_slot, flags)

    def save_label_map(self, path: PathLike) -> None:
        """Write ``label_map`` as JSON ``{original label: index}`` (keys as strings)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", encoding="utf-8") as f:
            json.dump({str(k): int(v) for k, v in self.label_map.items()}, f, indent=0, ensure_ascii=False)

    def class_sizes(self) -> np.ndarray:
        """Images per class: int64 [num_classes]."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes)"


LABEL_MAP_FILE = "label_map.json"


def save_run_label_map(trainer: Any, dataset: Any, stage: str) -> bool:
    """At fit start on global rank 0: ``dataset.save_label_map(<trainer.default_root_dir>/label_map.json)``.

    Returns True when it was written (the caller then logs the training set once)."""
    if stage != "fit" or trainer is None or not trainer.is_global_zero:
        return False
    run_dir = Path(trainer.default_root_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    dataset.save_label_map(run_dir / LABEL_MAP_FILE)
    return True


def load_label_map(path: PathLike) -> Dict[str, int]:
    """Read a label map written by :meth:`IdentityImageDataset.save_label_map` (keys are strings)."""
    with Path(path).open(encoding="utf-8") as f:
        return {str(k): int(v) for k, v in json.load(f).items()}


def remap_labels(original: Sequence[Hashable]) -> Tuple[np.ndarray, Dict[Hashable, int]]:
    """Map original labels to ``0..C-1`` in sorted order. Returns (int64 [N], {original: index})."""
    names = sorted(set(original))
    label_map = {name: i for i, name in enumerate(names)}
    return np.fromiter((label_map[x] for x in original), dtype=np.int64, count=len(original)), label_map


class StringTable:
    """Many strings in two numpy arrays: no per-string Python objects, so DataLoader workers forked
    from the main process share the pages instead of copying them on reference-count writes, and
    tens of millions of paths fit in a few bytes each more than their text."""

    def __init__(self) -> None:
        self._chunks: List[bytes] = []
        self._lengths: List[np.ndarray] = []
        self._data = np.zeros(0, dtype=np.uint8)
        self._offsets = np.zeros(1, dtype=np.int64)

    def extend(self, strings: Sequence[str]) -> None:
        encoded = [x.encode("utf-8") for x in strings]
        self._chunks.append(b"".join(encoded))
        self._lengths.append(np.fromiter((len(b) for b in encoded), dtype=np.int64, count=len(encoded)))

    @classmethod
    def of(cls, strings: Sequence[str]) -> "StringTable":
        """A frozen table of ``strings``."""
        table = cls()
        table.extend(strings)
        return table.freeze()

    def freeze(self) -> "StringTable":
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        self._offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=self._offsets[1:])
        self._data = np.frombuffer(b"".join(self._chunks), dtype=np.uint8)
        self._chunks, self._lengths = [], []
        return self

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def __getitem__(self, index: int) -> str:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} entries")
        start, end = self._offsets[index], self._offsets[index + 1]
        return self._data[start:end].tobytes().decode("utf-8")


class _FileListDataset(IdentityImageDataset):
    """Samples stored as one image file each; ``_files`` holds paths relative to ``_base``."""

    _base = ""
    _files: StringTable

    def path(self, index: int) -> str:
        """File path of sample ``index``."""
        return os.path.join(self._base, self._files[int(index)])

    def describe(self, index: int) -> str:
        return self.path(index)

    def read_bytes(self, index: int) -> bytes:
        path = self.path(index)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            raise CorruptSampleError(f"{path}: cannot read ({exc.strerror or exc})") from None


class ImageFolderDataset(_FileListDataset):
    """``root/<identity>/<image>``: one sub-folder per identity, labels in sorted order of folder names.

    Files with an image extension (``.jpg .jpeg .png .bmp .webp .tif .tiff``, any case) count;
    hidden entries, files directly under ``root`` and empty identity folders are ignored.
    """

    format_name = "folder"

    def __init__(self, root: PathLike, transform: Optional[Transform] = None, strict: bool = False) -> None:
        super().__init__(transform, strict)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        identities = sorted(e.name for e in os.scandir(self.root)
                            if e.is_dir() and not e.name.startswith("."))
        files = StringTable()
        labels: List[np.ndarray] = []
        label_map: Dict[Hashable, int] = {}
        for name in identities:
            folder = self.root / name
            images = sorted(e.name for e in os.scandir(folder) if not e.name.startswith(".")
                            and e.name.lower().endswith(IMAGE_EXTENSIONS) and e.is_file())
            if not images:
                log.warning("%s: no images, identity skipped", folder)
                continue
            label_map[name] = len(label_map)
            files.extend([os.path.join(name, image) for image in images])
            labels.append(np.full(len(images), label_map[name], dtype=np.int64))
        if not labels:
            raise ValueError(f"{self.root}: no images found; expected root/<identity>/<image> with "
                             f"extensions "
                             f"{', '.join(IMAGE_EXTENSIONS)}")
        self._base = str(self.root)
        self._files = files.freeze()
        self.labels = np.concatenate(labels)
        self.label_map = label_map


class ImageListDataset(_FileListDataset):
    """A text file of ``path label`` lines; relative paths start at the list file's folder.

    The label is the last whitespace-separated field (so paths may contain spaces); blank lines and
    lines starting with ``#`` are skipped. Integer labels are ordered numerically, others as strings;
    when at least half the labels are integers, one that is not is an error naming its line.
    """

    format_name = "list"

    def __init__(self, list_file: PathLike, transform: Optional[Transform] = None,
                 strict: bool = False) -> None:
        super().__init__(transform, strict)
        self.list_file = Path(list_file)
        if not self.list_file.is_file():
            raise FileNotFoundError(f"list file not found: {self.list_file}")
        base = self.list_file.parent
        files: List[str] = []
        raw: List[str] = []
        lines: List[int] = []
        with self.list_file.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                fields = line.rsplit(None, 1)
                if len(fields) != 2:
                    raise ValueError(f"{self.list_file}:{lineno}: expected 'path label', got {line!r}")
                path, label = fields
                files.append(path)  # absolute paths survive os.path.join(base, path)
                raw.append(label)
                lines.append(lineno)
        if not files:
            raise ValueError(f"{self.list_file}: no 'path label' lines")
        original = _list_labels(raw, self.list_file, lines)
        self._base = str(base)
        self._files = StringTable.of(files)
        self.labels, self.label_map = remap_labels(original)


def _list_labels(raw: List[str], list_file: Path, lines: List[int]) -> Sequence[Hashable]:
    """Integer labels when at least half of them are integers (a stray name among them is then an
    error naming its line, not a new class), identity names otherwise."""
    numbers: List[Optional[int]] = []
    for label in raw:
        try:
            numbers.append(int(label))
        except ValueError:
            numbers.append(None)
    bad = [i for i, n in enumerate(numbers) if n is None]
    if not bad:
        return numbers  # type: ignore[return-value]
    if 2 * len(bad) > len(raw):
        return raw
    first = bad[0]
    raise ValueError(f"{list_file}:{lines[first]}: label {raw[first]!r} is not an integer, but "
                     f"{len(raw) - len(bad)} of the {len(raw)} labels are ({len(bad)} are not); fix "
                     f"the label, or use names for every identity")


def open_dataset(
    path: PathLike,
    transform: Optional[Transform] = None,
    strict: bool = False,
    num_classes: Optional[int] = None,
) -> IdentityImageDataset:
    """Open a training set, detecting its format.

    A folder holding ``train.rec`` (or a ``.rec`` file) is insightface RecordIO, another folder is an
    image folder, another file is a list file. Raises ``FileNotFoundError`` for a missing path and
    ``ValueError`` when ``num_classes`` is given and differs from the data's class count.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset not found: {path}; expected {FORMATS_ACCEPTED}")
    dataset: IdentityImageDataset
    if (path.is_dir() and (path / "train.rec").is_file()) or (path.is_file() and path.suffix == ".rec"):
        from mlearn.data.recordio import RecordIODataset  # recordio imports this module

        dataset = RecordIODataset(path, transform=transform, strict=strict)
    elif path.is_dir():
        dataset = ImageFolderDataset(path, transform=transform, strict=strict)
    else:
        dataset = ImageListDataset(path, transform=transform, strict=strict)
    if num_classes is not None and int(num_classes) != dataset.num_classes:
        raise ValueError(f"{path}: the data has {dataset.num_classes} classes but num_classes={num_classes} "
                         f"was given")
    return dataset
