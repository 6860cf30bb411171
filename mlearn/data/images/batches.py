"""Image batches assembled in place, and reusable shared-memory batch buffers for DataLoader workers.

A DataLoader worker hands every batch to the main process in shared memory. A fresh shared-memory
segment per batch costs a page fault on every 4 KiB page the worker writes: ~1,200 faults for a batch
of 128 uint8 112x112 images, which on a virtual machine can cost as much as decoding the JPEGs
(``evaluation/BENCHMARKS.md``); and every shared tensor sent costs a file-descriptor hand-over (a
connection to the worker's resource-sharer thread, ~1-5 ms). :class:`BatchAllocator` therefore keeps a
few buffers per worker and reuses them, and a batch travels as a :class:`PooledImageBatch`: the
buffer's handle only the first time, afterwards its slot number. The receiving process keeps the
buffers mapped, hands out the images in place and, once no tensor views them any more, clears the
buffer's flag in a shared flag array, so a buffer is never rewritten while anyone can still see its
contents. The receiving side belongs to the allocator of the dataset the DataLoader reads (the copy in
the process that iterates it): the mappings live as long as that dataset, not as long as the process.
"""
from __future__ import annotations

import multiprocessing.util
import os
import threading
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.data import get_worker_info

from mlearn.data.corrupt import Batch

_FENCE = threading.Lock()  # acquire/release: a full memory barrier around the flag hand-over


class ImageBatch(Batch):
    """A :class:`~mlearn.data.corrupt.Batch` of images, ``images [B', ...]`` (its ``inputs``), ``labels
    [B']`` int64 and ``num_corrupt`` samples dropped, assembled in place by
    :meth:`mlearn.data.images.base.IdentityImageDataset.load_batch`."""

    __slots__ = ()

    @property
    def images(self) -> torch.Tensor:
        return self.inputs


def empty_batch(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor for a batch; inside a DataLoader worker it lives in shared memory
    (as ``default_collate`` allocates it), so sending it to the main process copies nothing."""
    if get_worker_info() is None:
        return torch.empty(tuple(shape), dtype=dtype)
    prototype = torch.empty(0, dtype=dtype)
    numel = int(np.prod(shape, dtype=np.int64))
    storage = prototype._typed_storage()._new_shared(numel, device=prototype.device)
    return prototype.new(storage).view(tuple(shape))


class _WorkerPool:
    """One worker process's reusable buffers. ``flags[slot]`` (shared memory) is 1 while buffer ``slot``
    is in use; ``flags[capacity]`` becomes 1 when the pool is gone (the worker exited), so that receivers
    unmap its buffers."""

    def __init__(self, capacity: int, receiver_key: str) -> None:
        self.token = f"{os.getpid()}-{os.urandom(8).hex()}"
        self.receiver_key = receiver_key
        self.flags = torch.zeros(capacity + 1, dtype=torch.uint8).share_memory_()
        self.buffers: List[torch.Tensor] = []
        self.shapes: List[Tuple[int, ...]] = []
        self.generations: List[int] = []  # bumped when a slot gets a new buffer
        self.sent: Dict[int, int] = {}  # slot -> generation whose handle has been sent
        self.flags_sent = False
        multiprocessing.util.Finalize(self, _close_pool, args=(self.flags,), exitpriority=0)

    def message(self, slot: int, generation: int, buffer: torch.Tensor) -> Tuple[Any, ...]:
        """What a batch in ``slot`` sends: ``(receiver key, token, flags or None, slot, generation, buffer
        or None)``, the shared tensors only to a receiver that does not have them yet."""
        flags = None if self.flags_sent else self.flags
        handle = None if self.sent.get(slot) == generation else buffer
        self.flags_sent, self.sent[slot] = True, generation
        return self.receiver_key, self.token, flags, slot, generation, handle


def _close_pool(flags: torch.Tensor) -> None:
    flags[-1] = 1


class _Receiver:
    """The receiving side of pooled batches: the pools' buffers (sent once each), and the slots whose
    images are still in use (released, at every receipt, once no tensor views them)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the pin-memory thread and the main thread both receive
        # flags as numpy views of the shared tensors: indexing a tensor costs ~10 us, an array ~0.1 us
        self._pools: Dict[str, Tuple[np.ndarray, Dict[int, Tuple[int, torch.Tensor]]]] = {}
        self._in_use: List[Tuple[StorageWeakRef, np.ndarray, int]] = []

    def receive(self, token: str, flags: Optional[torch.Tensor], slot: int, generation: int,
                handle: Optional[torch.Tensor]) -> Tuple[np.ndarray, torch.Tensor]:
        """``(pool flags, buffer)`` of a received batch."""
        with self._lock:
            self._release_unused()
            if flags is not None:
                self._pools[token] = (flags.numpy(), {})
            pool = self._pools.get(token)
            if pool is not None and handle is not None:
                pool[1][slot] = (generation, handle)
            entry = None if pool is None else pool[1].get(slot)
            if entry is None or entry[0] != generation:
                raise RuntimeError(f"pooled batch from worker pool {token}, slot {slot}: its buffer was "
                                   "never received here. A PooledImageBatch must be sent once, to the "
                                   "process that iterates the DataLoader, in the order it was made.")
            return pool[0], entry[1]

    def hand_out(self, storage_owner: torch.Tensor, flags: np.ndarray, slot: int) -> None:
        """Release ``slot`` of ``flags`` once nothing uses the storage of ``storage_owner``."""
        with self._lock:
            self._in_use.append((StorageWeakRef(storage_owner.untyped_storage()), flags, slot))

    def _release_unused(self) -> None:
        still = []
        for ref, flags, slot in self._in_use:
            if ref.expired():
                flags[slot] = 0
            else:
                still.append((ref, flags, slot))
        self._in_use = still
        for token in [token for token, (flags, _) in self._pools.items() if flags[-1]]:
            del self._pools[token]  # the worker is gone: unmap (images still viewed stay mapped)


# the receivers of this process by key; each is owned by its BatchAllocator (of the dataset a DataLoader
# reads), so its mapped buffers go with that dataset
_RECEIVERS: "weakref.WeakValueDictionary[str, _Receiver]" = weakref.WeakValueDictionary()


def _receive_pooled(receiver_key: str, token: str, flags: Optional[torch.Tensor], slot: int, generation: int,
                    handle: Optional[torch.Tensor], shape: Tuple[int, ...], dtype: torch.dtype, good: int,
                    labels: np.ndarray, num_corrupt: int) -> ImageBatch:
    """Unpickling a :class:`PooledImageBatch` (in the receiving process): the images stay in the
    worker's buffer."""
    receiver = _RECEIVERS.get(receiver_key)
    if receiver is None:
        raise RuntimeError(f"pooled batch from worker pool {token}: no dataset of this process receives "
                           "it (the dataset whose DataLoader made it is gone, or it was sent to another "
                           "process)")
    flags, buffer = receiver.receive(token, flags, slot, generation, handle)
    # a storage of its own over the buffer's memory: it dies with the last tensor handed out, which
    # releases the slot, while the receiver keeps the buffer itself mapped for the next batch in it
    own = torch.from_numpy(buffer.numpy())
    receiver.hand_out(own, flags, slot)
    return ImageBatch(own.view(dtype).view(shape)[:good], torch.from_numpy(labels), num_corrupt)


class PooledImageBatch(ImageBatch):
    """An :class:`ImageBatch` whose images are the first rows of buffer ``slot`` of a worker's pool.

    Pickled (sent to the main process), it arrives as a plain :class:`ImageBatch` viewing the same
    shared memory, and the worker reuses the buffer only after every tensor over it is gone there. The
    buffer's handle travels with the first batch in it only: send each batch once, to the process that
    iterates the DataLoader (as the DataLoader does). The labels travel by value.
    """

    pool: _WorkerPool
    slot: int
    generation: int
    buffer: torch.Tensor
    full_shape: Tuple[int, ...]

    def __reduce__(self) -> Tuple[Any, ...]:
        return _receive_pooled, (*self.pool.message(self.slot, self.generation, self.buffer), self.full_shape,
                                 self.images.dtype, len(self.labels), self.labels.numpy(), self.num_corrupt)


class BatchAllocator:
    """Batch tensors: ``torch.empty`` in the main process; in a DataLoader worker, up to ``capacity``
    reusable shared-memory buffers (a fresh segment when all are in use).

    A pooled buffer is a uint8 shared-memory tensor of the batch's bytes, in use from :meth:`allocate`
    until the receiving process no longer views it. One allocator per dataset object; a forked or
    spawned worker starts its own pool, and its batches are received by the allocator it was copied
    from (``receiver``: the buffers received, mapped as long as this allocator lives).
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = int(capacity)
        self._pid = -1
        self._pool: Optional[_WorkerPool] = None
        self.receiver_key = f"{os.getpid()}-{os.urandom(8).hex()}"
        self.receiver: Optional[_Receiver] = _Receiver()
        _RECEIVERS[self.receiver_key] = self.receiver

    def __getstate__(self) -> dict:
        return {"capacity": self.capacity, "receiver_key": self.receiver_key}

    def __setstate__(self, state: dict) -> None:
        # a copy (a spawned worker's): it sends to the original's receiver, and receives nothing itself
        self.capacity, self.receiver_key = int(state["capacity"]), state["receiver_key"]
        self._pid, self._pool, self.receiver = -1, None, None

    def allocate(self, shape: Sequence[int], dtype: torch.dtype) -> Tuple[torch.Tensor, int]:
        """``(uninitialised tensor of shape, slot)``; ``slot`` is -1 unless the tensor is a pooled buffer."""
        shape = tuple(shape)
        if get_worker_info() is None or self.capacity < 1:
            return empty_batch(shape, dtype), -1
        if self._pid != os.getpid():
            self._pool, self._pid = _WorkerPool(self.capacity, self.receiver_key), os.getpid()
        pool = self._pool
        assert pool is not None
        nbytes = int(np.prod(shape, dtype=np.int64)) * torch.empty(0, dtype=dtype).element_size()
        with _FENCE:
            flags = pool.flags.numpy()
            slot = next((i for i in range(len(pool.buffers)) if flags[i] == 0), None)
            if slot is None:
                if len(pool.buffers) == self.capacity:
                    return empty_batch(shape, dtype), -1
                slot = len(pool.buffers)
                pool.buffers.append(empty_batch((nbytes,), torch.uint8))
                pool.shapes.append(shape)
                pool.generations.append(0)
            elif pool.buffers[slot].numel() != nbytes:  # a batch of another size: replace the free buffer
                pool.buffers[slot] = empty_batch((nbytes,), torch.uint8)
                pool.generations[slot] += 1
            pool.shapes[slot] = shape
            flags[slot] = 1
        return pool.buffers[slot].view(dtype).view(shape), slot

    def batch(self, images: torch.Tensor, labels: torch.Tensor, num_corrupt: int, slot: int) -> ImageBatch:
        """The batch to return: a :class:`PooledImageBatch` for a pooled buffer (``slot >= 0``), whose
        ``images`` are the first rows of the tensor :meth:`allocate` gave."""
        if slot < 0:
            return ImageBatch(images, labels, num_corrupt)
        pool = self._pool
        assert pool is not None
        batch = PooledImageBatch(images, labels, num_corrupt)
        batch.pool, batch.slot, batch.generation = pool, slot, pool.generations[slot]
        batch.buffer, batch.full_shape = pool.buffers[slot], pool.shapes[slot]
        return batch
