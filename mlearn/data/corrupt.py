"""Decoding encoded images, and skipping (and counting) corrupt samples instead of dying mid-epoch.

A dataset in non-strict mode returns ``None`` for a sample it cannot read or decode;
:func:`collate_skip_corrupt` drops those from the batch and reports how many it dropped, so the
training loop can sum the count and report it at the end of the epoch. Datasets that assemble whole
batches themselves return an :class:`ImageBatch` (or :class:`UnmirroredBatch`), which the collate
function passes through.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np
import torch
from torch.utils.data import default_collate

from mlearn.data.batches import AnyImageBatch, ImageBatch, UnmirroredBatch

log = logging.getLogger(__name__)

# OpenCV >= 4.10 decodes straight to RGB (one pass less than decode + cvtColor)
_IMREAD_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)


class CorruptSampleError(RuntimeError):
    """A sample that cannot be read or decoded; the message names the record index or file.

    Raised in a DataLoader worker, it reaches the main process re-created from torch's message (the
    worker's traceback as text); the message is cut back to its one line there."""

    exit_code = 2  # bad data, not a bug: the CLI reports the message as its one error line

    def __init__(self, message: str = "") -> None:
        super().__init__(_from_worker(str(message)))


def _from_worker(message: str) -> str:
    """The original one-line message inside torch's "Caught ... in DataLoader worker" text."""
    if "Original Traceback" not in message:
        return message
    last = message.strip().splitlines()[-1]
    _, found, text = last.partition(f"{CorruptSampleError.__name__}: ")
    where = message.splitlines()[0].replace("Caught CorruptSampleError ", "").rstrip(".")
    return f"{text if found else last.strip()} ({where})"


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


def where_text(where: Union[str, Callable[[], str]]) -> str:
    """``where`` itself, or the text its callable gives (error messages built only when needed)."""
    return where if isinstance(where, str) else where()


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


def collate_skip_corrupt(batch: Union[AnyImageBatch, Sequence[Optional[Tuple[Any, int]]]]) -> AnyImageBatch:
    """Collate ``(image, label)`` samples, dropping the ``None`` of corrupt ones (an
    :class:`ImageBatch` or :class:`UnmirroredBatch` a dataset assembled itself is returned as it is).

    Returns ``(images [B', ...], labels [B'] int64, num_corrupt)`` with ``B' = B - num_corrupt``.
    Images that are numpy arrays (no transform) are stacked as tensors of their dtype. When every
    sample of the batch is corrupt the trailing shape is unknown: ``images`` is an empty float32
    tensor of shape [0] and ``labels`` an empty int64 tensor; the training step should skip a batch
    with ``labels.numel() == 0``.
    """
    if isinstance(batch, (ImageBatch, UnmirroredBatch)):
        return batch
    good: List[Tuple[Any, int]] = [sample for sample in batch if sample is not None]
    num_corrupt = len(batch) - len(good)
    if num_corrupt:
        log.debug("dropped %d corrupt sample(s) from a batch of %d", num_corrupt, len(batch))
    if not good:
        return ImageBatch(torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.long), num_corrupt)
    images, labels = default_collate(good)
    return ImageBatch(images, torch.as_tensor(labels, dtype=torch.long), num_corrupt)


def failure_kinds(failures: Dict[str, str]) -> Dict[str, Tuple[int, str]]:
    """``{kind: (count, first "path: reason")}`` of ``{path: "kind: detail"}``, most frequent first."""
    kinds: Dict[str, Tuple[int, str]] = {}
    for path, reason in failures.items():
        kind = reason.split(":", 1)[0]
        count, example = kinds.get(kind, (0, f"{path}: {reason}"))
        kinds[kind] = (count + 1, example)
    return dict(sorted(kinds.items(), key=lambda item: -item[1][0]))


def summarize_failures(failures: Dict[str, str]) -> str:
    """One line: counts by kind and the first example, e.g. ``3 wrong sample rate (e.g. a.wav: wrong
    sample rate: 8000 Hz, expected 16000 Hz)``."""
    kinds = failure_kinds(failures)
    return "; ".join(f"{count} {kind} (e.g. {example})" for kind, (count, example) in kinds.items())
