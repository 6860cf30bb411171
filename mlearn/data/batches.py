"""Image batches assembled in place, and reusable shared-memory batch buffers for DataLoader workers.

A DataLoader worker hands every batch to the main process in shared memory. A fresh shared-memory
segment per batch costs a page fault on every 4 KiB page the worker writes: ~1,200 faults for a batch
of 128 uint8 112x112 images, which on a virtual machine can cost as much as decoding the JPEGs
(``evaluation/BENCHMARKS.md``). :class:`BatchAllocator` therefore keeps a few buffers per worker and
reuses them: the batch travels as a :class:`PooledImageBatch`; the receiving process uses the images
in place and, once no tensor views a buffer any more, clears its flag in a shared flag array, so a
buffer is never rewritten while anyone can still see its contents.
"""
from __future__ import annotations

import os
import threading
from typing import Any, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
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


class _PendingReleases:
    """The receiving side of pooled buffers: batches are handed out without a copy, and a buffer's
    in-flight flag is cleared once no tensor uses its storage any more (checked at every receipt)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the pin-memory thread and the main thread both receive
        self._pending: List[Tuple[StorageWeakRef, torch.Tensor, int]] = []

    def track(self, buffer: torch.Tensor, flags: torch.Tensor, slot: int) -> None:
        with self._lock:
            self._pending.append((StorageWeakRef(buffer.untyped_storage()), flags, slot))
            still = []
            for ref, flag_array, flag_slot in self._pending:
                if ref.expired():
                    flag_array[flag_slot] = 0
                else:
                    still.append((ref, flag_array, flag_slot))
            self._pending = still


_RELEASES = _PendingReleases()  # per process: the pooled buffers this process holds


def _receive_pooled(buffer: torch.Tensor, shape: Tuple[int, ...], dtype: torch.dtype, good: int,
                    labels: np.ndarray, num_corrupt: int, flags: torch.Tensor, slot: int) -> ImageBatch:
    """Unpickling a :class:`PooledImageBatch` (in the receiving process): the images stay in the
    worker's buffer, which is released when the last tensor viewing it is gone."""
    images = buffer.view(dtype).view(shape)[:good]
    _RELEASES.track(buffer, flags, slot)
    return ImageBatch(images, torch.from_numpy(labels), num_corrupt)


class PooledImageBatch(ImageBatch):
    """An :class:`ImageBatch` whose images are the first rows of buffer ``slot`` of a worker's pool.

    Pickled (sent to the main process), it arrives as a plain :class:`ImageBatch` viewing the same
    shared memory; the worker reuses the buffer only after every tensor over it is gone. The labels
    travel by value.
    """

    buffer: torch.Tensor
    full_shape: Tuple[int, ...]
    flags: torch.Tensor
    slot: int

    def __reduce__(self) -> Tuple[Any, ...]:
        return _receive_pooled, (self.buffer, self.full_shape, self.images.dtype, len(self.labels),
                                 self.labels.numpy(), self.num_corrupt, self.flags, self.slot)


class BatchAllocator:
    """Batch tensors: ``torch.empty`` in the main process; in a DataLoader worker, up to ``capacity``
    reusable shared-memory buffers (a fresh segment when all are in use).

    A pooled buffer is a uint8 shared-memory tensor of the batch's bytes; ``flags[slot]`` (shared
    memory too) is 1 while it is in use: set by the worker when it fills the buffer, cleared by the
    receiving process once no tensor there views it. One allocator per dataset object; a forked or
    spawned worker starts its own pool.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = int(capacity)
        self._pid = -1
        self._flags: Optional[torch.Tensor] = None
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
            self._flags = torch.zeros(self.capacity, dtype=torch.uint8).share_memory_()
            self._buffers, self._shapes, self._pid = [], [], os.getpid()
        assert self._flags is not None
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        with _FENCE:
            flags = self._flags.numpy()
            slot = next((i for i in range(len(self._buffers)) if flags[i] == 0), None)
            if slot is None:
                if len(self._buffers) == self.capacity:
                    return empty_batch(shape, dtype), -1
                slot = len(self._buffers)
                self._buffers.append(empty_batch((nbytes,), torch.uint8))
                self._shapes.append(shape)
            elif self._buffers[slot].numel() != nbytes:  # a batch of another size: replace the free buffer
                self._buffers[slot] = empty_batch((nbytes,), torch.uint8)
            self._shapes[slot] = shape
            flags[slot] = 1
        return self._buffers[slot].view(dtype).view(shape), slot

    def batch(self, images: torch.Tensor, labels: torch.Tensor, num_corrupt: int, slot: int) -> ImageBatch:
        """The batch to return: a :class:`PooledImageBatch` for a pooled buffer (``slot >= 0``), whose
        ``images`` are the first rows of the tensor :meth:`allocate` gave."""
        if slot < 0:
            return ImageBatch(images, labels, num_corrupt)
        batch = PooledImageBatch(images, labels, num_corrupt)
        batch.buffer, batch.full_shape = self._buffers[slot], self._shapes[slot]
        batch.flags, batch.slot = self._flags, slot
        return batch
