"""Skipping (and counting) corrupt samples instead of dying mid-epoch, for every modality.

A dataset in non-strict mode returns ``None`` for a sample it cannot read or decode;
:func:`collate_skip_corrupt` drops those from the batch and reports how many it dropped, so the
training loop can sum the count and report it at the end of the epoch. Datasets that assemble whole
batches themselves return a :class:`Batch` (e.g. :class:`mlearn.data.images.batches.ImageBatch`),
which the collate function passes through. :func:`summarize_failures` condenses the reasons of many
unusable files into one line.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import default_collate

log = logging.getLogger(__name__)


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


def where_text(where: Union[str, Callable[[], str]]) -> str:
    """``where`` itself, or the text its callable gives (error messages built only when needed)."""
    return where if isinstance(where, str) else where()


class Batch(NamedTuple):
    """A collated batch: ``inputs [B', ...]``, ``labels [B']`` int64, and ``num_corrupt`` samples dropped
    (``B' = B - num_corrupt``)."""

    inputs: torch.Tensor
    labels: torch.Tensor
    num_corrupt: int


Samples = Sequence[Optional[Tuple[Any, int]]]  # (input, label) or None for a corrupt sample


def collate_skip_corrupt(batch: Union[Tuple[Any, ...], Samples]) -> Tuple[Any, ...]:
    """Collate ``(input, label)`` samples into a :class:`Batch`, dropping the ``None`` of corrupt ones; a
    batch a dataset assembled itself (a tuple, e.g. an ``ImageBatch``, not a list of samples) is
    returned as it is.

    Returns ``(inputs [B', ...], labels [B'] int64, num_corrupt)`` with ``B' = B - num_corrupt``.
    Inputs that are numpy arrays (images without a transform) are stacked as tensors of their dtype.
    When every sample of the batch is corrupt the trailing shape is unknown: ``inputs`` is an empty
    float32 tensor of shape [0] and ``labels`` an empty int64 tensor; the training step should skip a
    batch with ``labels.numel() == 0``.
    """
    if isinstance(batch, tuple):
        return batch
    good: List[Tuple[Any, int]] = [sample for sample in batch if sample is not None]
    num_corrupt = len(batch) - len(good)
    if num_corrupt:
        log.debug("dropped %d corrupt sample(s) from a batch of %d", num_corrupt, len(batch))
    if not good:
        return Batch(torch.empty(0, dtype=torch.float32), torch.empty(0, dtype=torch.long), num_corrupt)
    inputs, labels = default_collate(good)
    return Batch(inputs, torch.as_tensor(labels, dtype=torch.long), num_corrupt)


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
