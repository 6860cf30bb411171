"""The base of the identity-labelled image sets, and image decoding.

Every image dataset exposes ``labels`` (int64 [N], remapped to ``0..C-1`` in sorted order of the
original labels or identity names, available without decoding any image), ``label_map`` (original
label -> index), ``num_classes``, and ``__getitem__(i) -> (image, label)`` where ``image`` is the
transform's output or, without a transform, uint8 [H, W, 3] RGB. A sample that cannot be read or
decoded gives ``None`` (``strict=False``, logged at debug level; pair with
:func:`mlearn.data.corrupt.collate_skip_corrupt`) or raises :class:`CorruptSampleError` (``strict=True``).
:meth:`IdentityImageDataset.load_batch` assembles a whole batch in place (what
:class:`mlearn.data.order.EpochSeededDataset` hands a DataLoader).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from mlearn.data.corrupt import CorruptSampleError, where_text
from mlearn.data.images.batches import BatchAllocator, ImageBatch
from mlearn.data.labels import save_label_map

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
Transform = Callable[[np.ndarray], Any]

# OpenCV >= 4.10 decodes straight to RGB (one pass less than decode + cvtColor)
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


def decode_image(data: bytes, where: Union[str, Callable[[], str]]) -> np.ndarray:
    """Decode JPEG/PNG/BMP/WebP ``data``. Returns uint8 [H, W, 3] RGB.

    Grayscale images are expanded to three channels and alpha is dropped. Raises
    :class:`CorruptSampleError` naming ``where`` (a string, or a callable giving it, formatted only
    on failure) when the bytes are not a decodable image.
    """
    if not data:
        raise CorruptSampleError(f"{where_text(where)}: empty image payload")
    buffer = np.frombuffer(data, dtype=np.uint8)
    image = cv2.imdecode(buffer, _IMREAD_RGB if _IMREAD_RGB is not None else cv2.IMREAD_COLOR)
    if image is None:
        raise CorruptSampleError(f"{where_text(where)}: cannot decode image ({len(data)} bytes, "
                                 f"starts {data[:4].hex()})")
    return image if _IMREAD_RGB is not None else cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def image_extension(data: bytes) -> str:
    """File extension (``.jpg``, ``.png``, ...) matching the signature of encoded image ``data``."""
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    if data[:2] == b"BM":
        return ".bmp"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return ".webp"
    return ".jpg"  # unknown: insightface sets are JPEG; the decoder sniffs the content anyway


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
                yield decode_image(data, lambda index=index: self.describe(index))
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
                   ) -> Union[ImageBatch, List[Optional[Tuple[Any, int]]]]:
        """Samples ``indices`` as one batch. ``streams`` (:class:`mlearn.data.seeding.SampleStreams`):
        the j-th sample's augmentation draws from stream j (``streams.select(j)`` before its transform).

        With a transform that writes in place (``fill_batch`` and ``sample_shape``/``sample_dtype``, as
        :class:`~mlearn.data.images.transforms.ImageTransform`) each image is decoded and at once
        transformed into one preallocated batch (in a DataLoader worker, a reused shared-memory buffer of
        :class:`~mlearn.data.images.batches.BatchAllocator`): an :class:`ImageBatch` of
        ``[B', *transform.sample_shape]`` images, the corrupt samples dropped and counted. Other
        transforms give the list of ``self[i]`` for :func:`collate_skip_corrupt`.
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
        # decoded one at a time as fill_batch consumes them: each image is written out while it is
        # still in the cache, and the decoder reuses one freed block instead of 128 of them
        decoded, out = self._decoded(indices, encoded), images.numpy()
        written = transform.fill_batch(decoded, out, streams)
        labels = torch.from_numpy(self.labels[np.asarray([indices[j] for j in written], dtype=np.int64)])
        good = len(written)
        return self.batch_allocator.batch(images[:good], labels, len(indices) - good, buffer_slot)

    def save_label_map(self, path: PathLike) -> None:
        """Write ``label_map`` as JSON ``{original label: index}`` (keys as strings)."""
        save_label_map(self.label_map, path)

    def class_sizes(self) -> np.ndarray:
        """Images per class: int64 [num_classes]."""
        return np.bincount(self.labels, minlength=self.num_classes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} images, {self.num_classes} classes)"
