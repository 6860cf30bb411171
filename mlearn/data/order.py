"""Resumable, seeded training order: an epoch-keyed permutation sampler and per-sample augmentation seeds.

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
import random
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from torch.utils.data import Dataset, DistributedSampler

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


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijective 64-bit hash with full avalanche."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


_PCG_INCREMENT = (_mix64(0x2545F4914F6CDD1D) << 1) | 1  # PCG64 needs an odd increment; any fixed one


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 128-bit seed for one sample of one epoch (a hash of the three numbers)."""
    high = _mix64(int(seed) ^ _mix64(int(epoch) ^ _mix64(int(index))))
    return (high << 64) | _mix64(high ^ 0x5851F42D4C957F2D)


def _mix64_array(x: np.ndarray) -> np.ndarray:
    """:func:`_mix64` of every element of a uint64 array (numpy's uint64 arithmetic wraps mod 2^64)."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def sample_seeds(seed: int, epochs: Sequence[int], indices: Sequence[int]) -> List[int]:
    """:func:`sample_seed` of many ``(epoch, index)`` pairs at once (vectorised; the same numbers)."""
    epoch = np.asarray(epochs, dtype=np.int64).astype(np.uint64)
    index = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    high = _mix64_array(np.uint64(int(seed) & _MASK64) ^ _mix64_array(epoch ^ _mix64_array(index)))
    low = _mix64_array(high ^ np.uint64(0x5851F42D4C957F2D))
    return [(h << 64) | l for h, l in zip(high.tolist(), low.tolist())]


class GeneratorRandom(random.Random):
    """A ``random.Random`` drawing from a numpy ``Generator``: re-seeding the generator re-seeds it too.

    albumentations draws from a Python ``Random`` and a numpy ``Generator``; seeding a Mersenne Twister
    for every sample costs ~7 us (a 624-word state), setting a PCG64 state ~2 us. ``random()`` and
    ``getrandbits()`` are the two primitives every other ``Random`` method is built on.
    """

    def __init__(self, generator: np.random.Generator) -> None:
        self.generator = generator
        super().__init__()

    def seed(self, *args: Any, **kwargs: Any) -> None:
        """Only clears the cached second ``gauss()`` value: the draws follow ``generator``, seed that."""
        self.gauss_next = None

    def random(self) -> float:
        return float(self.generator.random())

    def getrandbits(self, k: int) -> int:
        if k < 0:
            raise ValueError("number of bits must be non-negative")
        words = [int(w) for w in self.generator.bit_generator.random_raw((k + 63) // 64)] if k else []
        value = 0
        for word in words:
            value = (value << 64) | word
        return value >> (64 * len(words) - k)

    def getstate(self) -> Any:
        return self.generator.bit_generator.state, self.gauss_next

    def setstate(self, state: Any) -> None:
        self.generator.bit_generator.state, self.gauss_next = state

    def __reduce__(self) -> Tuple[Any, ...]:  # with its generator (pickle keeps it the sibling's object)
        return type(self), (self.generator,), self.getstate()


def seed_generators(numpy_generator: np.random.Generator, python_random: random.Random, value: int) -> None:
    """Re-seed a PCG64 numpy generator and a Python ``Random`` in place from the 128-bit ``value``.

    Sets the PCG64 state directly (no ``SeedSequence``: a few microseconds per sample instead of tens);
    distinct values start the stream at unrelated points of its 2^128 cycle. A :class:`GeneratorRandom`
    over ``numpy_generator`` follows it (its ``seed`` only drops its cached ``gauss`` value).
    """
    numpy_generator.bit_generator.state = {"bit_generator": "PCG64",
                                           "state": {"state": value, "inc": _PCG_INCREMENT},
                                           "has_uint32": 0, "uinteger": 0}
    python_random.seed(value)


def new_generators() -> Tuple[np.random.Generator, random.Random]:
    """A PCG64 numpy generator and a :class:`GeneratorRandom` over it (seed with :func:`seed_generators`)."""
    generator = np.random.Generator(np.random.PCG64(0))
    return generator, GeneratorRandom(generator)


def sample_generators(seed: int, epoch: int, index: int) -> Tuple[np.random.Generator, random.Random]:
    """New numpy and Python generators for one sample of one epoch: a pure function of its inputs, the
    same streams :class:`EpochSeededDataset` gives the sample's augmentation."""
    generators = new_generators()
    seed_generators(*generators, sample_seed(seed, epoch, index))
    return generators


_PCG_MULTIPLIER = 0x2360ED051FC65DA44385DF649FCCF645  # PCG64's 128-bit LCG multiplier
_MASK128 = (1 << 128) - 1


class SampleStreams:
    """The augmentation random streams of one batch: stream j is ``generators`` (a pair from
    :func:`new_generators`) seeded by :func:`seed_generators` with ``seeds[j]``."""

    def __init__(self, seeds: Sequence[int], generators: Tuple[np.random.Generator, random.Random]) -> None:
        self.seeds = seeds
        self.generators = generators

    def __len__(self) -> int:
        return len(self.seeds)

    def select(self, j: int) -> None:
        """Seed the generators with stream j: the next draws are that sample's."""
        seed_generators(*self.generators, self.seeds[j])

    def first_randoms(self) -> List[float]:
        """The first ``random()`` of every stream (what ``select(j)`` then ``generators[1].random()``
        gives) without touching the generators: one PCG64 step and its XSL-RR output, per seed."""
        draws = []
        for value in self.seeds:
            state = (value * _PCG_MULTIPLIER + _PCG_INCREMENT) & _MASK128
            folded = ((state >> 64) ^ state) & _MASK64
            rotation = state >> 122
            word = ((folded >> rotation) | (folded << (64 - rotation))) & _MASK64
            draws.append((word >> 11) * 2.0**-53)  # numpy's random(): the top 53 bits
        return draws


def reseed_transform(transform: Any, generators: Tuple[np.random.Generator, random.Random]) -> bool:
    """Make the augmentations of ``transform`` draw from ``generators`` (shared by all of them); returns
    False when ``transform`` draws nothing.

    Handles anything with ``set_random_state(numpy_generator, python_random)`` (and ``draws_randomly``,
    ``random_generator``): :class:`mlearn.data.transforms.ImageTransform`, a bare ``albumentations.Compose``,
    :class:`mlearn.data.audio.SpeakerAudioDataset`.
    ``set_random_state``, not ``set_random_seed``: the latter gives every transform of the pipeline its
    own generator from the SAME seed, so all their first draws coincide (a flip and a crop applied
    together or not at all).
    """
    if getattr(transform, "set_random_state", None) is None or not getattr(transform, "draws_randomly", True):
        return False
    if getattr(transform, "random_generator", None) is not generators[0]:
        transform.set_random_state(*generators)
    return True


class EpochSeededDataset(Dataset):
    """``dataset[(index, epoch)]`` -> ``dataset[index]``, its random draws (the dataset's own, if it has
    ``set_random_state``, else ``dataset.transform``'s) from the streams of :func:`sample_generators`
    ``(seed, epoch, index)``.

    A DataLoader fetches whole batches through :meth:`__getitems__`: with a dataset that has
    ``load_batch`` (:class:`mlearn.data.folders.IdentityImageDataset`) the batch is assembled in place
    (:class:`mlearn.data.batches.ImageBatch`, or :class:`~mlearn.data.batches.UnmirroredBatch` whose flips
    are still to be applied), with the same images as per-sample loading.
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
