"""Image batches assembled in place, and reusable shared-memory batch buffers for DataLoader workers.

A DataLoader worker hands every batch to the main process in shared memory. A fresh shared-memory
segment per batch costs a page fault on every 4 KiB page the worker writes: ~1,200 faults for a batch
of 128 uint8 112x112 images, which on a virtual machine can cost as much as decoding the JPEGs
(``evaluation/BENCHMARKS.md``). :class:`BatchAllocator` therefore keeps a few buffers per worker and
reuses them: the batch travels as a :class:`PooledImageBatch`, and unpickling it in the main process
copies the images out (into ordinary memory) and marks the buffer free again in a shared flag array,
so a buffer is never written while anyone can still see its contents.
"""
from __future__ import annotations

import os
import threading
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import get_worker_info

_FENCE = threading.Lock()  # acquire/release: a full memory barrier around the flag hand-over


class ImageBatch(NamedTuple):
    """A collated batch: ``images [B', ...]``, ``labels [B']`` int64, and ``num_corrupt`` samples dropped."""

    images: torch.Tensor
    labels: torch.Tensor
    num_corrupt: int


def empty_batch(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for a batch; inside a DataLoader worker it lives in shared memory
    (as ``default_collate`` allocates it), so sending it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    prototype = torch.empty(0, dtype=dtype)
    numel = int(np.prod(shape, dtype=np.int64))
    storage = prototype._typed_storage()._new_shared(numel, device=prototype.device)
    return prototype.new(storage).view(tuple(shape))


def _receive_pooled(buffer: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype, good: int,
                    labels: np.ndarray, num_corrupt: int) -> ImageBatch:
    """Unpickling a :class:`PooledImageBatch` (in the receiving process): copy out, then free the buffer."""
    images = _images_in(buffer, shape, dtype)[:good].clone()
    with _FENCE:
        buffer[-1] = 0
    return ImageBatch(images, torch.from_numpy(labels), num_corrupt)


def _images_in(buffer: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The batch tensor inside a pooled byte buffer (its last byte is the in-flight flag)."""
    return buffer[:-1].view(dtype).view(shape)


class PooledImageBatch(ImageBatch):
    """An :class:`ImageBatch` whose images are the first rows of a pooled worker buffer.

    Pickled (sent to the main process), it arrives as a plain :class:`ImageBatch` holding a copy, and
    the buffer is free for the worker's next batch. Only the buffer travels as shared memory (one file
    descriptor per batch); the labels travel by value.
    """

    buffer: torch.Tensor
    full_shape: Tuple[int, ...]

    def __reduce__(self) -> Tuple[Any, ...]:
        return _receive_pooled, (self.buffer, self.full_shape, self.images.dtype, len(self.labels),
                                 self.labels.numpy(), self.num_corrupt)


class BatchAllocator:
    """Batch tensors: ``torch.empty`` in the main process; in a DataLoader worker, up to ``capacity``
    reusable shared-memory buffers (a fresh segment when all are in flight).

    A pooled buffer is a uint8 shared-memory tensor of the batch's bytes plus one flag byte (1: in
    flight, 0: free), cleared by the receiving process once it has copied the batch out. One allocator
    per dataset object; a forked or spawned worker starts its own pool.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = int(capacity)
        self._pid = -1
        self._buffers: List[torch.Tensor] = []
        self._shapes: List[Tuple[int, ...]] = []

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["capacity"])

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> Tuple[torch.Tensor, int]:
        """``(uninitialised tensor of shape, slot)``; ``slot`` is -1 unless the tensor is a pooled buffer."""
        shape = tuple(shape)
        if get_worker_info() is None or self.capacity < 1:
            return empty_batch(shape, dtype), -1
        if self._pid != os.getpid():
            self._buffers, self._shapes, self._pid = [], [], os.getpid()
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        with _FENCE:
            slot = next((i for i, buffer in enumerate(self._buffers) if buffer.numpy()[-1] == 0), None)
            if slot is None:
                if len(self._buffers) == self.capacity:
                    return empty_batch(shape, dtype), -1
                slot = len(self._buffers)
                self._buffers.append(empty_batch((nbytes + 1,), torch.uint8))
                self._shapes.append(shape)
            elif self._buffers[slot].numel() != nbytes + 1:  # a batch of another size: replace the free buffer
                self._buffers[slot] = empty_batch((nbytes + 1,), torch.uint8)
            self._shapes[slot] = shape
            self._buffers[slot].numpy()[-1] = 1
        return _images_in(self._buffers[slot], shape, dtype), slot

    def batch(self, images: torch.Tensor, labels: torch.Tensor, num_corrupt: int, slot: int) -> ImageBatch:
        """The batch to return: a :class:`PooledImageBatch` for a pooled buffer (``slot >= 0``), whose
        ``images`` are the first rows of the tensor :meth:`allocate` gave."""
        if slot < 0:
            return ImageBatch(images, labels, num_corrupt)
        batch = PooledImageBatch(images, labels, num_corrupt)
        batch.buffer, batch.full_shape = self._buffers[slot], self._shapes[slot]
        return batch
