"""Batches assembled in place (``load_batch`` / ``EpochSeededDataset.__getitems__``), pooled shared-memory
buffers of DataLoader workers, the fused trailing flip, and the cheap per-sample generators behind them."""
from __future__ import annotations

import pickle
import random
from multiprocessing.reduction import ForkingPickler
from pathlib import Path
from typing import Callable

import albumentations as A
import numpy as np
import pytest
import torch
import torch.multiprocessing  # noqa: F401 - registers the shared-memory reductions with ForkingPickler
from torch.utils.data import DataLoader

from mlearn.data.corrupt import collate_skip_corrupt
from mlearn.data.images import batches
from mlearn.data.images.batches import BatchAllocator, ImageBatch, PooledImageBatch
from mlearn.data.images.datamodule import FaceDataModule
from mlearn.data.images.recordio import RecordIOWriter
from mlearn.data.images.recordio_dataset import RecordIODataset
from mlearn.data.images.transforms import ImageTransform, build_transform, normalize_images
from mlearn.data.order import EpochSeededDataset
from mlearn.data.seeding import (
    GeneratorRandom,
    SampleStreams,
    new_generators,
    sample_seed,
    sample_seeds,
    seed_generators,
)

SIZE = 24


@pytest.fixture(scope="module")
def rec_with_corrupt(tiny_recordio: Callable) -> Path:
    """20 images of 4 identities, record 6 (dataset index 5) not a decodable JPEG."""
    return tiny_recordio(classes=4, per_class=5, size=SIZE, corrupt=[5])


@pytest.mark.parametrize("output", ["float", "uint8"])
@pytest.mark.parametrize("augmentation", ["standard", "low_quality", "eval"])
def test_batch_assembled_in_place_equals_per_sample_loading(rec_with_corrupt: Path, output: str,
                                                            augmentation: str) -> None:
    dataset = RecordIODataset(rec_with_corrupt, transform=build_transform(augmentation, SIZE, output=output))
    seeded = EpochSeededDataset(dataset, seed=11)
    keys = [(i, 3) for i in (7, 5, 0, 19, 12, 3)]
    batch = seeded.__getitems__(keys)
    assert type(batch) is ImageBatch
    assert collate_skip_corrupt(batch) is batch
    reference = collate_skip_corrupt([seeded[key] for key in keys])  # per sample
    assert batch.num_corrupt == reference.num_corrupt == 1
    assert batch.labels.tolist() == reference.labels.tolist() == [1, 0, 3, 2, 0]
    expected_shape = (5, 3, SIZE, SIZE) if output == "float" else (5, SIZE, SIZE, 3)
    assert batch.images.shape == expected_shape and batch.images.dtype == reference.inputs.dtype
    torch.testing.assert_close(batch.images, reference.inputs, rtol=0, atol=0)


def test_all_corrupt_batch_and_strict_mode(rec_with_corrupt: Path) -> None:
    dataset = RecordIODataset(rec_with_corrupt, transform=build_transform("standard", SIZE, output="uint8"))
    batch = EpochSeededDataset(dataset).__getitems__([(5, 0), (5, 1)])
    assert batch.num_corrupt == 2 and batch.labels.numel() == 0 and batch.images.shape[0] == 0
    strict = RecordIODataset(rec_with_corrupt, transform=build_transform("standard", SIZE), strict=True)
    with pytest.raises(Exception, match=r"record 6 of .*train\.rec"):
        EpochSeededDataset(strict).__getitems__([(4, 0), (5, 0)])


def _received_buffer_addresses(allocator: BatchAllocator) -> set:
    """Where the buffers of the worker pools received by ``allocator`` lie."""
    pools = allocator.receiver._pools.values()
    return {buffer.data_ptr() for _, slots in pools for _, buffer in slots.values()}


def test_worker_batches_reuse_buffers_without_touching_held_batches(tiny_recordio: Callable) -> None:
    """Two workers; every batch of epoch 0 kept alive (6 of each worker's 8 buffers stay in use), then
    only every third batch of epoch 1 (the others' buffers are reused meanwhile; a worker whose pool runs
    dry sends a fresh segment): no kept batch ever changes, each lies in the worker's memory (no copy), and
    the stream equals the in-process one."""
    rec = tiny_recordio(classes=6, per_class=16, size=SIZE)

    def epochs(workers: int) -> list:
        data = FaceDataModule(str(rec), batch_size=8, num_workers=workers, image_size=SIZE)
        loader = data.train_dataloader()
        kept = list(loader)
        loader.sampler.set_epoch(1)
        kept += [batch for j, batch in enumerate(loader) if j % 3 == 0]
        if workers:
            pooled = _received_buffer_addresses(data.dataset.batch_allocator)
            in_pool = [b.images.data_ptr() in pooled for b in kept]
            assert len(pooled) <= 2 * 8 and all(in_pool[:12])  # epoch 0: 6 batches of each worker's 8 buffers
            assert all(in_pool[j] or kept[j].images.is_shared() for j in range(len(kept)))  # or fresh ones
        return kept

    in_process, with_workers = epochs(0), epochs(2)
    assert len(in_process) == len(with_workers) == 16
    for a, b in zip(in_process, with_workers):
        assert type(b) is ImageBatch and b.images.dtype == torch.uint8
        torch.testing.assert_close(a.images, b.images, rtol=0, atol=0)
        torch.testing.assert_close(a.labels, b.labels)


def test_pooled_buffers_are_sent_once_and_released_when_unused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batches, "get_worker_info", lambda: object())  # as inside a DataLoader worker
    allocator = BatchAllocator(capacity=2)
    first, slot0 = allocator.allocate((3, 4, 4, 3), torch.uint8)
    second, slot1 = allocator.allocate((3, 4, 4, 3), torch.uint8)
    third, slot2 = allocator.allocate((3, 4, 4, 3), torch.uint8)
    assert (slot0, slot1, slot2) == (0, 1, -1) and first.is_shared()  # both in use: a fresh buffer
    assert third.is_shared() and third.shape == (3, 4, 4, 3)
    assert type(allocator.batch(third, torch.tensor([0, 0, 0]), 0, slot2)) is ImageBatch
    flags = allocator._pool.flags

    def send(images: torch.Tensor, slot: int) -> bytes:
        batch = allocator.batch(images[:2], torch.tensor([1, 2]), 1, slot)
        assert isinstance(batch, PooledImageBatch)
        return ForkingPickler.dumps(batch)  # as a worker's queue sends it: shared memory by handle

    first.fill_(7)
    with_handle = send(first, slot0)
    received = pickle.loads(with_handle)
    assert type(received) is ImageBatch and received.num_corrupt == 1 and received.labels.tolist() == [1, 2]
    assert received.images.shape == (2, 4, 4, 3) and received.images.eq(7).all()
    assert received.images.data_ptr() == first.data_ptr()  # the worker's memory itself
    assert allocator.allocate((3, 4, 4, 3), torch.uint8)[1] == -1  # slot 0 still in use
    view = received.images[1]
    del received
    pickle.loads(send(second, slot1))  # every receipt releases the slots nothing views any more
    assert flags[slot0] == 1  # ``view`` still uses slot 0
    del view
    pickle.loads(send(second, slot1))
    assert flags[slot0] == 0
    reused, slot = allocator.allocate((3, 4, 4, 3), torch.uint8)
    assert slot == slot0 and reused.data_ptr() == first.data_ptr()
    reused.fill_(9)
    without_handle = send(reused, slot0)
    assert len(without_handle) < len(with_handle)  # the buffer's handle went with the first batch only
    assert pickle.loads(without_handle).images.eq(9).all()

    larger, slot = allocator.allocate((5, 4, 4, 3), torch.uint8)  # a new buffer in a free slot
    assert slot == slot1 and allocator.batch(larger, torch.tensor([0]), 0, slot).generation == 1
    larger.fill_(3)
    assert pickle.loads(send(larger, slot1)).images.eq(3).all()
    with pytest.raises(RuntimeError, match="never received here"):
        batches._receive_pooled(allocator.receiver_key, "unknown-pool", None, 0, 0, None, (1, 2), torch.uint8,
                                1, np.zeros(1), 0)
    with pytest.raises(RuntimeError, match="no dataset of this process receives it"):
        batches._receive_pooled("gone", "unknown-pool", None, 0, 0, None, (1, 2), torch.uint8, 1, np.zeros(1),
                                0)
    batches._close_pool(flags)  # the worker exited: its buffers are unmapped at the next receipt
    allocator.receiver.receive("another", torch.zeros(3, dtype=torch.uint8), 0, 0, torch.zeros(1))
    assert allocator._pool.token not in allocator.receiver._pools

    copy = pickle.loads(pickle.dumps(allocator))  # as a spawned worker's: sends to the original's receiver
    assert copy.allocate((1, 2), torch.uint8)[1] == 0 and copy.receiver is None  # a fresh pool
    assert copy.receiver_key == allocator.receiver_key
    floats, slot = BatchAllocator(capacity=1).allocate((2, 3, 5, 5), torch.float32)
    assert slot == 0 and floats.dtype == torch.float32 and floats.shape == (2, 3, 5, 5)
    assert floats.is_contiguous()


@pytest.mark.parametrize("output", ["float", "uint8"])
def test_trailing_flip_is_fused_into_the_output_copy(output: str) -> None:
    image = np.random.default_rng(0).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    always = ImageTransform([A.HorizontalFlip(p=1.0)], SIZE, output=output)
    never = ImageTransform([A.HorizontalFlip(p=0.0)], SIZE, output=output)
    assert always.pipeline is None and always.flip_p == 1.0 and always.draws_randomly
    plain = ImageTransform([], SIZE, output=output)
    assert not plain.draws_randomly
    torch.testing.assert_close(always(image), plain(np.ascontiguousarray(image[:, ::-1])), rtol=0, atol=0)
    torch.testing.assert_close(never(image), plain(image), rtol=0, atol=0)
    mirrored = torch.from_numpy(image[:, ::-1].copy())
    torch.testing.assert_close(torch.from_numpy(always.augment(image)), mirrored)
    half = ImageTransform([A.HorizontalFlip(p=0.5)], SIZE, output=output)
    half.set_random_state(*new_generators())
    flipped = sum(not torch.equal(half(image), plain(image)) for _ in range(400))
    assert 150 < flipped < 250


def test_normalize_images_makes_channels_first_float() -> None:
    hwc = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    out = normalize_images(hwc)
    assert out.shape == (2, 3, 5, 7) and out.dtype == torch.float32 and out.is_contiguous()
    torch.testing.assert_close(out, (hwc.permute(0, 3, 1, 2).float() - 127.5) / 127.5)


def test_vectorised_sample_seeds_equal_the_scalar_hash() -> None:
    indices = [0, 1, 2, 12345, 2**31 + 7, 2**40, 2**62]
    epochs = [0, 1, 7, 3, 2**20, 5, 0]
    for seed in (0, 2048, 2**63 + 11, -1):
        expected = [sample_seed(seed, e, i) for e, i in zip(epochs, indices)]
        assert sample_seeds(seed, epochs, indices) == expected


def test_generator_random_follows_its_numpy_generator() -> None:
    numpy_generator, python_random = new_generators()
    assert isinstance(python_random, GeneratorRandom)

    def draws() -> list:
        return [python_random.random(), python_random.randint(3, 9), python_random.getrandbits(100),
                python_random.choice("abcdef"), python_random.gauss(0.0, 1.0), python_random.uniform(-2, 2)]

    seed_generators(numpy_generator, python_random, sample_seed(1, 2, 3))
    first = draws()
    python_random.gauss(0.0, 1.0)  # leaves a cached second normal deviate behind
    seed_generators(numpy_generator, python_random, sample_seed(1, 2, 3))
    assert draws() == first  # re-seeding the numpy generator re-seeds everything (cache dropped)
    seed_generators(numpy_generator, python_random, sample_seed(1, 2, 4))
    assert draws() != first
    state = python_random.getstate()
    after = draws()
    python_random.setstate(state)
    assert draws() == after
    values = [python_random.randint(0, 9) for _ in range(5000)]
    assert set(values) == set(range(10)) and abs(np.mean(values) - 4.5) < 0.2
    bits = [python_random.getrandbits(k) for k in (0, 1, 63, 64, 65, 130)]
    assert bits[0] == 0 and all(0 <= b < 2**k for b, k in zip(bits, (0, 1, 63, 64, 65, 130)))
    assert isinstance(python_random, random.Random)


def test_plain_dataloader_over_a_dataset_still_collates_per_sample(rec_with_corrupt: Path) -> None:
    """Without the seeded wrapper a DataLoader gets samples one by one (default collate keeps working)."""
    dataset = RecordIODataset(rec_with_corrupt, transform=build_transform("eval", SIZE))
    images, labels, corrupt = next(iter(DataLoader(dataset, batch_size=8, collate_fn=collate_skip_corrupt)))
    assert images.shape == (7, 3, SIZE, SIZE) and corrupt == 1
    assert not hasattr(dataset, "__getitems__")


def test_read_many_matches_read_bytes_on_every_record_layout(tmp_path: Path) -> None:
    """Batched reads take a fast path for single-part, scalar-label records and fall back to the general
    parser for the rest (multi-part records, array labels) and for corrupt ones."""
    from mlearn.data.images.recordio import MAGIC

    magic = MAGIC.to_bytes(4, "little")
    # written inline: raw payloads, multi-part and array-label records are the point (not a tiny_recordio)
    payloads = [b"\xff\xd8\xff" + bytes([i]) * (40 + i) for i in range(6)]
    payloads[2] = magic + b"split here" + magic + b"and here!!"  # magic at aligned offsets: multi-part
    with RecordIOWriter(tmp_path, insightface_header=False) as writer:
        for i, data in enumerate(payloads):
            writer.add(data, [float(i), 0.5] if i == 4 else i)  # record 4: an array label (IRHeader flag 2)
    dataset = RecordIODataset(tmp_path)
    order = [5, 2, 0, 4, 1, 3, 2]
    assert dataset.read_many(order) == [dataset.read_bytes(i) for i in order] == [payloads[i] for i in order]


def test_seeded_dataset_pickles_for_spawned_workers(rec_with_corrupt: Path) -> None:
    transform = build_transform("low_quality", SIZE, output="uint8")
    dataset = RecordIODataset(rec_with_corrupt, transform=transform)
    seeded = EpochSeededDataset(dataset, seed=5)
    before = seeded.__getitems__([(1, 0), (2, 0)])
    clone = pickle.loads(pickle.dumps(seeded))
    assert clone.generators[1].generator is clone.generators[0]
    torch.testing.assert_close(clone.__getitems__([(1, 0), (2, 0)]).images, before.images, rtol=0, atol=0)


def test_first_randoms_of_sample_streams_equal_seeding_then_drawing() -> None:
    generators = new_generators()
    seeds = sample_seeds(9, [0] * 500 + [3] * 500, list(range(500)) * 2) + [0, 1, 2**128 - 1, 2**64]
    streams = SampleStreams(seeds, generators)
    expected = []
    for j in range(len(streams)):
        streams.select(j)
        expected.append(generators[1].random())
    assert streams.first_randoms() == expected
    assert 0.45 < np.mean(expected) < 0.55


class _PooledBatches(torch.utils.data.Dataset):
    """Batches of zeros straight from a BatchAllocator (transport only)."""

    def __init__(self) -> None:
        self.allocator = BatchAllocator(capacity=4)

    def __len__(self) -> int:
        return 48

    def __getitems__(self, indices: list) -> ImageBatch:
        images, slot = self.allocator.allocate((len(indices), 4, 4, 3), torch.uint8)
        images.zero_()
        return self.allocator.batch(images, torch.zeros(len(indices), dtype=torch.int64), 0, slot)


def test_buffers_of_exited_workers_are_unmapped() -> None:
    """Workers restarted every epoch (no persistent workers): the receiver drops the pools of the
    workers that exited, and keeps only the current ones."""
    dataset = _PooledBatches()
    loader = DataLoader(dataset, batch_size=8, num_workers=2, collate_fn=lambda batch: batch)
    seen = []
    for _ in range(3):
        for j, batch in enumerate(loader):
            assert batch.images.eq(0).all()
            if j == 2:
                seen.append(set(dataset.allocator.receiver._pools))
    assert all(len(pools) == 2 for pools in seen)
    assert not seen[0] & seen[1] and not seen[1] & seen[2]


def test_workers_forked_after_the_parent_drew_keep_the_sample_streams(tiny_recordio: Callable) -> None:
    """The parent loads batches first (its transform then holds the per-sample generators), then forks
    workers: they must keep drawing from the sample streams, not re-seed the transform as a fresh
    process would."""
    rec = tiny_recordio(classes=4, per_class=8, size=SIZE)
    data = FaceDataModule(str(rec), batch_size=8, num_workers=0, image_size=SIZE,
                          augmentation="low_quality")
    reference = [batch.images.clone() for batch in data.train_dataloader()]
    data.num_workers = 2
    with_workers = [batch.images for batch in data.train_dataloader()]  # same dataset object, forked
    assert len(with_workers) == len(reference) == 4
    for a, b in zip(reference, with_workers):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("augmentation", ["low_quality", "standard"])
def test_a_seeded_dataset_used_in_the_parent_draws_the_same_in_workers(rec_with_corrupt: Path,
                                                                       augmentation: str) -> None:
    dataset = RecordIODataset(rec_with_corrupt, transform=build_transform(augmentation, SIZE, output="uint8"))
    seeded = EpochSeededDataset(dataset, seed=2)
    keys = [(i, 0) for i in range(20)]
    in_parent = seeded.__getitems__(keys).images.clone()  # the transform now holds the sample streams
    loader = DataLoader(seeded, batch_size=20, sampler=keys, num_workers=1, collate_fn=collate_skip_corrupt)
    torch.testing.assert_close(next(iter(loader)).images, in_parent, rtol=0, atol=0)
