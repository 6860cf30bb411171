"""Per-sample random streams: a sample's augmentation draws depend only on ``(seed, epoch, index)``.

:func:`sample_seed` hashes the three numbers into a 128-bit PCG64 state; :func:`seed_generators` sets
a numpy generator (and a :class:`GeneratorRandom` over it, for code that draws from Python's
``random``) to that state in a few microseconds, so every sample can be re-seeded as it is loaded.
:class:`SampleStreams` holds the seeds of one batch; :func:`reseed_transform` points a transform's
draws at the shared generators.
"""
from __future__ import annotations

import random
from typing import Any, List, Sequence, Tuple

import numpy as np

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
    return [(hi << 64) | lo for hi, lo in zip(high.tolist(), low.tolist())]


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
    same streams :class:`mlearn.data.order.EpochSeededDataset` gives the sample's augmentation."""
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
    ``random_generator``): :class:`mlearn.data.images.transforms.ImageTransform`, a bare
    ``albumentations.Compose``, :class:`mlearn.data.audio.dataset.SpeakerAudioDataset`.
    ``set_random_state``, not ``set_random_seed``: the latter gives every transform of the pipeline its
    own generator from the SAME seed, so all their first draws coincide (a flip and a crop applied
    together or not at all).
    """
    if getattr(transform, "set_random_state", None) is None or not getattr(transform, "draws_randomly", True):
        return False
    if getattr(transform, "random_generator", None) is not generators[0]:
        transform.set_random_state(*generators)
    return True
