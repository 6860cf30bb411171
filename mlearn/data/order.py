"""Resumable, seeded training order: an epoch-keyed permutation sampler and the dataset wrapper that
seeds each sample's augmentation (the streams themselves: :mod:`mlearn.data.seeding`).

Every epoch ``e`` is one permutation of the dataset drawn from ``(seed, e)`` alone, cut into GLOBAL
batches of ``batch_size * num_replicas`` samples (the incomplete last one is dropped); rank ``r`` takes
the ``r``-th slice of every global batch. The order therefore depends only on the seed, the epoch and
the global batch size (not on the rank count), and a position is a number of global samples: a run
stopped after ``k`` batches of epoch ``e`` resumes with ``EpochPermutationSampler(..., epoch=e,
start=k * global_batch)``, also on a different number of ranks with the same global batch.

The sampler yields ``(index, epoch)`` keys; :class:`EpochSeededDataset` turns them into
``dataset[index]`` with the augmentation random state seeded from ``(seed, epoch, index)``, so a
sample gets the same augmentation whichever worker process (or how many workers) loads it.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset, DistributedSampler

from mlearn.data.seeding import (
    SampleStreams,
    new_generators,
    reseed_transform,
    sample_seed,
    sample_seeds,
    seed_generators,
)

log = logging.getLogger(__name__)

SampleKey = Tuple[int, int]  # (dataset index, epoch)


class EpochPermutationSampler(DistributedSampler):
    """Yield this rank's ``(index, epoch)`` keys of the seeded epoch permutation, from position ``start``.

    Args:
        num_samples: dataset size N.
        batch_size: per-rank batch size B; the global batch is B * ``num_replicas``.
        seed: permutation seed (epoch ``e`` uses the generator seeded with ``[seed, e]``).
        num_replicas, rank: the rank layout (default: 1 and 0, not read from ``torch.distributed``
            so that the caller decides).
        epoch: the epoch the next iteration yields (``set_epoch`` changes it, as for
            ``DistributedSampler``; Lightning calls it at every epoch start).
        start: global samples of ``epoch`` already consumed: the next iteration skips them (rounded
            down to a whole global batch). Applies once; a new epoch starts at 0.

    ``len()`` is the full epoch's per-rank sample count, ``(N // (B * num_replicas)) * B``.
    A subclass of ``DistributedSampler`` so that Lightning neither replaces nor wraps it.
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0, epoch: int = 0, start: int = 0) -> None:
        if num_samples < 1 or batch_size < 1:
            raise ValueError(f"num_samples={num_samples}, batch_size={batch_size}: expected positive "
                             "integers")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank}: expected 0 <= rank < num_replicas={num_replicas}")
        global_batch = batch_size * num_replicas
        if num_samples < global_batch:
            raise ValueError(f"{num_samples} training samples are fewer than one global batch ({batch_size} "
                             f"per rank x {num_replicas} ranks = {global_batch}); lower the batch size")
        super().__init__(range(num_samples), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=True)
        self.num_items = int(num_samples)
        self.batch_size = int(batch_size)
        self.global_batch = global_batch
        self.batches_per_epoch = num_samples // global_batch
        self.epoch = int(epoch)
        self.start = 0
        self.set_start(start)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch of the next iteration; a different epoch resets the start position."""
        if int(epoch) != self.epoch:
            self.epoch = int(epoch)
            self.start = 0

    def set_start(self, start: int) -> None:
        """Skip the first ``start`` global samples of the current epoch in the next iteration."""
        if start < 0:
            raise ValueError(f"start={start}: expected a non-negative number of samples")
        if start % self.global_batch:
            log.warning("resume position %d is not a multiple of the global batch %d (was the global batch "
                        "size changed?); resuming at the batch boundary before it", start, self.global_batch)
        self.start = int(start)

    def permutation(self, epoch: int) -> np.ndarray:
        """The epoch's dataset order: int64 [N], the same on every rank."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_items)

    def rank_indices(self, epoch: int, first_batch: int = 0) -> np.ndarray:
        """This rank's dataset indices of global batches ``first_batch..`` of ``epoch``: int64 [k * B]."""
        used = self.permutation(epoch)[: self.batches_per_epoch * self.global_batch]
        grid = used.reshape(self.batches_per_epoch, self.num_replicas, self.batch_size)
        return grid[first_batch:, self.rank].reshape(-1)

    def __iter__(self) -> Iterator[SampleKey]:
        epoch, first_batch = self.epoch, self.start // self.global_batch
        self.start = 0  # the skip applies to this iteration only
        return _keys(self.rank_indices(epoch, first_batch), epoch)

    def __len__(self) -> int:
        return self.batches_per_epoch * self.batch_size


def _keys(indices: np.ndarray, epoch: int, chunk: int = 1 << 16) -> Iterator[SampleKey]:
    # chunked: tens of millions of samples never exist as Python objects all at once
    for start in range(0, len(indices), chunk):
        for index in indices[start:start + chunk].tolist():
            yield index, epoch


class EpochSeededDataset(Dataset):
    """``dataset[(index, epoch)]`` -> ``dataset[index]``, its random draws (the dataset's own, if it has
    ``set_random_state``, else ``dataset.transform``'s) from the streams of
    :func:`~mlearn.data.seeding.sample_generators` ``(seed, epoch, index)``.

    A DataLoader fetches whole batches through :meth:`__getitems__`: with a dataset that has
    ``load_batch`` (:class:`mlearn.data.images.base.IdentityImageDataset`) the batch is assembled in
    place (:class:`mlearn.data.images.batches.ImageBatch`), with the same images as per-sample loading.
    """

    def __init__(self, dataset: Any, seed: int = 0) -> None:
        self.dataset = dataset
        self.seed = int(seed)
        # re-seeded in place for every sample (each worker process has its own copy)
        self.generators = new_generators()

    def __len__(self) -> int:
        return len(self.dataset)

    def _draws_randomly(self) -> bool:
        """Points the dataset's random draws (its own, or its ``transform``'s) at ``self.generators``;
        False when it draws none."""
        drawer: Optional[Any] = self.dataset
        if getattr(drawer, "set_random_state", None) is None:
            drawer = getattr(self.dataset, "transform", None)
        return drawer is not None and reseed_transform(drawer, self.generators)

    def __getitem__(self, key: SampleKey) -> Any:
        index, epoch = key
        if self._draws_randomly():
            seed_generators(*self.generators, sample_seed(self.seed, epoch, index))
        return self.dataset[index]

    def __getitems__(self, keys: Sequence[SampleKey]) -> Any:
        load_batch = getattr(self.dataset, "load_batch", None)
        if load_batch is None:
            return [self[key] for key in keys]
        indices = [index for index, _ in keys]
        if not self._draws_randomly():
            return load_batch(indices)
        seeds = sample_seeds(self.seed, [epoch for _, epoch in keys], indices)
        return load_batch(indices, SampleStreams(seeds, self.generators))
