"""Training throughput: the training data loader (RecordIO + decode + augmentation, in the seeded resumable
order of FaceDataModule) against a bare JPEG-decode loop, and IResNet-50 + Partial FC training steps.

Loader rows (same synthetic ``train.rec`` and the same run; helpers from ``bench_loader.py``):

  bare cv2 decode          cv2.imdecode of the JPEG bytes already in memory: the reference (ratio 1)
  minimal loop             the floor of a Python loader: pread, decode and copy into a preallocated uint8
                           batch, nothing else
  DataLoader w=N shuffle   RecordIODataset + ``standard`` augmentation through a plain shuffled DataLoader,
                           one sample at a time, float32 output, default_collate (the textbook loader)
  FaceDataModule w=N       FaceDataModule.train_dataloader(), what training uses: the epoch-permutation
                           sampler, per-sample augmentation seeds, batches assembled in place as uint8
                           [B, H, W, 3] (normalised later on the training device, not timed here), pooled
                           shared-memory buffers in workers
  ... float                the same with uint8_batches=False: float32 [B, 3, H, W] normalised on the CPU

With/without rows of the loader's optimisations, side by side in the same run (each the FaceDataModule
row with one thing undone; the summary after the table gives each one's gain):

  ... per-sample draw      without the first-draw prediction: each sample's stream seeded and its flip
                           drawn one at a time, instead of all first draws computed up front
                           (``SampleStreams.first_randoms``)
  ... albu flip            without the trailing-flip interception: the flip run by albumentations inside
                           the pipeline, as any other transform (so without the first-draw prediction too)
  ... no pool              without the shared-memory buffer pool (``BatchAllocator(capacity=0)``): a fresh
                           shared-memory batch per batch (workers only)

Loader rows count each pass from its first batch on (the steady rate: an epoch of millions of images pays
the workers' start-up once). ``per_worker`` is images/s divided by the processes doing the work (1 for
N=0); ``ratio`` is the median over ``--repeats`` rounds (after a warm-up round) of ``per_worker`` over the
bare decode rate measured right before and after it (target: FaceDataModule >= 0.8); img/s are medians
too. Workers share the machine's cores with the main process.

Batch rows (``--parts batch``): microseconds per image of assembling batches in this process
(``EpochSeededDataset.__getitems__``, uint8, ``standard``) for FaceDataModule and its in-process
``without`` variants, alternated over ``--repeats`` rounds: the same comparison without the noise of whole
loader passes.

Training row: ``EmbeddingModule`` (IResNet-50, ArcFace Partial FC over ``--num-classes`` classes, SGD)
through Lightning's Trainer on one device, on an in-memory batch repeated (the loader is measured
above): images/s over ``--train-steps`` steps after ``--train-warmup`` untimed ones.

Examples:
  python tools/bench_train.py --images 3000 --workers 0 1 2 4                      # CPU
  python tools/bench_train.py --parts batch --images 3000 --repeats 9
  python tools/bench_train.py --device cuda --precision bf16-mixed --train-steps 50 --parts train
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple, Union

import albumentations as A
import cv2
import numpy as np
import pytorch_lightning as pl
import torch

# tools/ (this script's folder) is on sys.path
from bench_loader import bare_cv2_decode, loader_epoch, make_rec, measure, steady_pass
from torch.utils.data import DataLoader, IterableDataset

from mlearn.data.images.batches import BatchAllocator
from mlearn.data.images.datamodule import FaceDataModule
from mlearn.data.images.recordio import IR_SIZE
from mlearn.data.images.recordio_dataset import RecordIODataset
from mlearn.data.images.transforms import build_transform


class _NoOpPipeline:
    """An albumentations stand-in that changes nothing: the transform then takes its per-sample path
    (each sample's stream selected, its flip drawn), not the first draws computed for the batch."""

    def __call__(self, image: np.ndarray) -> Dict[str, np.ndarray]:
        return {"image": image}

    def set_random_state(self, *generators: object) -> None:
        pass


WITHOUT = ("per-sample draw", "albu flip", "no pool")  # the optimisation each row undoes


def datamodule_epoch_loader(root: str, workers: int, batch_size: int, uint8: bool = True, without: str = ""
                            ) -> DataLoader:
    """FaceDataModule's training loader; ``without`` (one of :data:`WITHOUT`) undoes one optimisation."""
    data = FaceDataModule(root, batch_size=batch_size, num_workers=workers, augmentation="standard",
                          uint8_batches=uint8)
    transform = data.dataset.transform
    if without == "per-sample draw":
        transform.pipeline = _NoOpPipeline()
    elif without == "albu flip":
        transform.pipeline, transform.flip_p = A.Compose([A.HorizontalFlip(p=0.5)]), 0.0
    elif without == "no pool":
        data.dataset.batch_allocator = BatchAllocator(capacity=0)
    elif without:
        raise ValueError(f"without={without!r}: expected one of {WITHOUT}")
    return data.train_dataloader()


def datamodule_epoch(root: str, workers: int, batch_size: int, uint8: bool = True, without: str = ""
                     ) -> Callable[[], Tuple[int, float]]:
    """One epoch of :func:`datamodule_epoch_loader` (workers persist between epochs), timed as
    :func:`bench_loader.steady_pass`."""
    loader = datamodule_epoch_loader(root, workers, batch_size, uint8, without)
    epoch = [0]

    def run() -> Tuple[int, float]:
        loader.sampler.set_epoch(epoch[0])
        epoch[0] += 1
        return steady_pass(loader)

    return run


def batch_costs(root: str, batch_size: int, rounds: int) -> Dict[str, float]:
    """Microseconds per image of assembling batches in this process (``EpochSeededDataset.__getitems__``,
    uint8, ``standard``), for the FaceDataModule loader and each in-process ``without`` variant: the
    variants alternate over ``rounds`` rounds of one pass each over the set; median of the rounds after
    the first. No DataLoader, no processes: the noise of whole loader passes is left out."""
    variants = {"FaceDataModule": ""} | {f"... {w}": w for w in WITHOUT if w != "no pool"}
    loaders = {}
    for name, without in variants.items():
        loader = datamodule_epoch_loader(root, 0, batch_size, without=without)
        loaders[name] = (loader.dataset, [list(batch) for batch in _chunks(list(loader.sampler), batch_size)])
    times: Dict[str, List[float]] = {name: [] for name in variants}
    for round_ in range(rounds + 1):
        for name, (seeded, batches) in loaders.items():
            start = time.perf_counter()
            for keys in batches:
                seeded.__getitems__(keys)
            if round_:
                times[name].append(1e6 * (time.perf_counter() - start) / (len(batches) * batch_size))
    return {name: statistics.median(values) for name, values in times.items()}


def bare_cv2_decode_cost(root: str) -> float:
    """Microseconds per image of ``cv2.imdecode`` of the set's JPEGs in memory (median of 3 passes)."""
    dataset = RecordIODataset(root)
    payloads = [dataset.read_bytes(i) for i in range(len(dataset))]
    run = bare_cv2_decode(payloads)
    passes = []
    for _ in range(3):
        start = time.perf_counter()
        n = run()
        passes.append(1e6 * (time.perf_counter() - start) / n)
    return statistics.median(passes)


def _chunks(items: List[Tuple[int, int]], size: int) -> Iterator[List[Tuple[int, int]]]:
    for start in range(0, len(items) - size + 1, size):
        yield items[start:start + size]


def minimal_loop(dataset: RecordIODataset, batch_size: int, size: int) -> Callable[[], int]:
    """The floor of a Python training loader, for reference: per record of a shuffled epoch, one ``pread``
    of its span, ``cv2.imdecode`` of the payload, and a copy into a preallocated uint8 batch; no checks,
    no sampler, no seeds, no collation."""
    reader = dataset.reader
    fd = os.open(reader.rec_path, os.O_RDONLY)
    offsets = reader.offsets[dataset.image_keys].tolist()
    spans = reader.spans[dataset.image_keys].tolist()
    payload_at = 8 + IR_SIZE  # a single-part record: frame words, IRHeader, then the JPEG
    flag = getattr(cv2, "IMREAD_COLOR_RGB", cv2.IMREAD_COLOR)
    order = np.random.default_rng(0).permutation(len(offsets))
    usable = len(order) // batch_size * batch_size

    def run() -> int:
        for start in range(0, usable, batch_size):
            out = np.empty((batch_size, size, size, 3), dtype=np.uint8)
            for k, i in enumerate(order[start:start + batch_size].tolist()):
                out[k] = cv2.imdecode(np.frombuffer(os.pread(fd, spans[i], offsets[i]), np.uint8,
                                                    offset=payload_at), flag)
        return usable

    return run


def bench_loader(args: argparse.Namespace) -> List[Tuple[str, float, float, float]]:
    """Rows ``(name, images/s, per worker, ratio to bare decode)``."""
    with tempfile.TemporaryDirectory() as tmp:
        payloads = make_rec(Path(tmp), args.images, args.size, args.quality, args.classes)
        augmented = RecordIODataset(tmp, transform=build_transform("standard", image_size=args.size))

        runs: Dict[str, Callable[[], Union[int, Tuple[int, float]]]] = {
            "bare cv2 decode": bare_cv2_decode(payloads),
            "minimal loop": minimal_loop(augmented, args.batch_size, args.size),
        }
        procs = {"bare cv2 decode": 1, "minimal loop": 1}
        for w in args.workers:
            runs[f"DataLoader w={w} shuffle"] = loader_epoch(augmented, w, args.batch_size)
            names = [f"DataLoader w={w} shuffle", f"FaceDataModule w={w}"]
            runs[names[1]] = datamodule_epoch(tmp, w, args.batch_size)
            for without in WITHOUT:
                if without != "no pool" or w > 0:  # the main process never pools
                    names.append(f"FaceDataModule w={w} {without}")
                    runs[names[-1]] = datamodule_epoch(tmp, w, args.batch_size, without=without)
            names.append(f"FaceDataModule w={w} float")
            runs[names[-1]] = datamodule_epoch(tmp, w, args.batch_size, uint8=False)
            procs.update({name: max(w, 1) for name in names})
        rows = measure(runs, args.repeats, reference="bare cv2 decode")
    return [(name, rate, rate / procs[name], ratio / procs[name]) for name, (rate, ratio) in rows.items()]


class _RepeatedBatch(IterableDataset):
    """The same (images, labels) batch forever: training compute without the loader."""

    def __init__(self, batch_size: int, size: int, num_classes: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.randn(batch_size, 3, size, size, generator=g)
        self.labels = torch.randint(0, num_classes, (batch_size,), generator=g)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.images, self.labels


class _StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.times: List[float] = []
        self._start = 0.0

    def _sync(self, module: pl.LightningModule) -> None:
        if module.device.type == "cuda":
            torch.cuda.synchronize(module.device)

    def on_train_batch_start(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
        self._sync(module)
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, module: pl.LightningModule, *args: object) -> None:
        self._sync(module)
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def bench_training(args: argparse.Namespace) -> Dict[str, float]:
    """IResNet-50 + ArcFace Partial FC training steps: ``{images_per_sec, median_step_ms}``."""
    from mlearn.heads import ArcFace
    from mlearn.models import IResNet
    from mlearn.module import EmbeddingModule, HeadConfig
    from mlearn.schedules import LRSchedule

    torch.manual_seed(0)
    module = EmbeddingModule(IResNet(layers=[3, 4, 14, 3], embedding_size=512, input_size=args.size),
                             HeadConfig(margin=ArcFace(s=64.0, m=0.5), sample_rate=args.sample_rate),
                             num_classes=args.num_classes, schedule=LRSchedule("constant"),
                             clip_backbone_grad_norm=5.0)
    loader = DataLoader(_RepeatedBatch(args.train_batch_size, args.size, args.num_classes), batch_size=None)
    timer = _StepTimer(args.train_warmup)
    trainer = pl.Trainer(accelerator=args.device, devices=1, precision=args.precision,
                         max_steps=args.train_warmup + args.train_steps, callbacks=[timer], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         benchmark=args.device == "cuda")
    trainer.fit(module, train_dataloaders=loader)
    step = statistics.median(timer.times)
    return {"images_per_sec": args.train_batch_size / step, "median_step_ms": 1000 * step}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=("loader", "batch", "train"),
                        default=["loader", "train"])
    parser.add_argument("--images", type=int, default=3000, help="synthetic RecordIO images (loader)")
    parser.add_argument("--classes", type=int, default=100, help="identities of the synthetic RecordIO set")
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the synthetic images")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=128, help="loader batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (training)")
    parser.add_argument("--precision", default="32", help="Lightning precision: 32, bf16-mixed, 16-mixed")
    parser.add_argument("--train-batch-size", type=int, default=128)
    parser.add_argument("--num-classes", type=int, default=93431, help="Partial FC classes (MS1MV3: 93431)")
    parser.add_argument("--sample-rate", type=float, default=1.0)
    parser.add_argument("--train-steps", type=int, default=20, help="timed training steps")
    parser.add_argument("--train-warmup", type=int, default=3, help="untimed training steps first")
    args = parser.parse_args()

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})"
          + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""))
    if "loader" in args.parts:
        torch.set_num_threads(1)
        rows = bench_loader(args)
        print(f"loader: {args.images} images {args.size}x{args.size} JPEG q={args.quality}, "
              f"batch {args.batch_size}, median of {args.repeats}")
        print(f"{'path':<36}{'img/s':>10}{'per_worker':>12}{'ratio':>8}")
        for name, rate, per, ratio in rows:
            print(f"{name:<36}{rate:>10.0f}{per:>12.0f}{ratio:>8.2f}")
        ratios = {name: ratio for name, _, _, ratio in rows}
        print("gain of each optimisation (ratio with / ratio without - 1):")
        for w in args.workers:
            gains = [f"{without} {100 * (ratios[f'FaceDataModule w={w}'] / ratios[key] - 1):+.1f}%"
                     for without in WITHOUT if (key := f"FaceDataModule w={w} {without}") in ratios]
            print(f"  w={w}: " + ", ".join(gains))
        torch.set_num_threads(os.cpu_count() or 1)
    if "batch" in args.parts:
        torch.set_num_threads(1)
        with tempfile.TemporaryDirectory() as tmp:
            make_rec(Path(tmp), args.images, args.size, args.quality, args.classes)
            decode = bare_cv2_decode_cost(tmp)
            costs = batch_costs(tmp, args.batch_size, args.repeats)
        print(f"batch assembly in process: {args.images} images, batch {args.batch_size}, us per image, "
              f"median of {args.repeats} alternated rounds (bare cv2 decode {decode:.1f} us)")
        base = costs["FaceDataModule"]
        for name, cost in costs.items():
            saved = "" if name == "FaceDataModule" else f"   saves {100 * (cost / base - 1):+.1f}%"
            print(f"  {name:<24}{cost:>8.1f}{saved}")
        torch.set_num_threads(os.cpu_count() or 1)
    if "train" in args.parts:
        result = bench_training(args)
        print(f"train: IResNet-50 + ArcFace Partial FC ({args.num_classes} classes, sample rate "
              f"{args.sample_rate}), batch {args.train_batch_size}, {args.precision} on {args.device}: "
              f"{result['images_per_sec']:.1f} img/s (median step {result['median_step_ms']:.0f} ms over "
              f"{args.train_steps} steps)")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
