"""Data-loading throughput: RecordIO + decode + ``standard`` augmentation vs a bare JPEG-decode loop.

Writes a synthetic insightface-style ``train.rec`` (smooth random colour fields plus sensor-like
noise, JPEG-encoded at ``--size`` px, so the files are about the size of real aligned faces) into a
temporary folder, then measures, in the same run and over the same records:

  bare cv2 decode        cv2.imdecode of the JPEG bytes already in memory (what the dataset uses)
  bare PIL decode        PIL decode of the same bytes (the alternative decoder, for comparison)
  dataset[i], no aug     RecordIODataset: positional read + unpack + decode
  dataset[i], standard   ... + flip + normalise to a float32 [3, H, W] tensor (the default output)
  DataLoader w=N         batches through torch's DataLoader with N workers and collate_skip_corrupt
                         (loader rows: the steady rate of each pass, from its first batch on)
  ... uint8              the same with ``build_transform(..., output="uint8")``: uint8 [H, W, 3]
                         tensors, normalised later on the device (not included in the timing)

``per_worker`` divides images/s by the number of processes doing the work (1 for N=0); ``ratio`` is
the median, over ``--repeats`` rounds (after a warm-up round), of ``per_worker`` over the bare cv2
decode rate measured right before and after it (every round alternates the bare decode with the rows).
Workers compete for the same cores as the main process, so on a machine with fewer free cores than
workers the per-worker figure drops for that reason alone.

Example:
  python tools/bench_loader.py --images 3000 --workers 0 1 2
"""
from __future__ import annotations

import argparse
import io
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Tuple, Union

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mlearn.data.corrupt import collate_skip_corrupt
from mlearn.data.images.base import decode_image
from mlearn.data.images.recordio import RecordIOWriter
from mlearn.data.images.recordio_dataset import RecordIODataset
from mlearn.data.images.transforms import build_transform


def make_rec(root: Path, count: int, size: int, quality: int, classes: int, seed: int = 0) -> List[bytes]:
    """Write ``count`` synthetic JPEGs grouped into ``classes`` identities; returns the JPEG bytes."""
    rng = np.random.default_rng(seed)
    payloads: List[bytes] = []
    per_class = max(1, count // classes)
    with RecordIOWriter(root) as writer:
        for i in range(count):
            coarse = rng.uniform(0, 255, (7, 7, 3)).astype(np.float32)
            image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)
            image = np.clip(image + rng.normal(0, 8, image.shape), 0, 255).astype(np.uint8)
            data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])[1].tobytes()
            payloads.append(data)
            writer.add(data, min(i // per_class, classes - 1))
    return payloads


def bare_cv2_decode(payloads: List[bytes]) -> Callable[[], int]:
    """The reference: ``decode_image`` (cv2, what the datasets use) of JPEG bytes already in memory."""
    def run() -> int:
        for data in payloads:
            decode_image(data, "bench")
        return len(payloads)

    return run


def steady_pass(batches: Iterable[Any]) -> Tuple[int, float]:
    """``(images, seconds)`` of one pass over a loader, counted from its first batch on: the steady rate,
    without the start-up a training epoch of millions of images pays once (workers resuming, receiving
    their first indices and filling the first batches), which on a pass of a few thousand images would
    weigh several percent."""
    batches = iter(batches)
    next(batches)
    start = time.perf_counter()
    n = sum(len(batch[1]) for batch in batches)  # (images, labels, ...) of either batch type
    return n, time.perf_counter() - start


def loader_epoch(dataset: RecordIODataset, workers: int, batch_size: int) -> Callable[[], Tuple[int, float]]:
    """One pass over ``dataset`` through a DataLoader (workers persist between passes)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=collate_skip_corrupt, persistent_workers=workers > 0)
    return lambda: steady_pass(loader)


def measure(runs: Dict[str, Callable[[], Union[int, Tuple[int, float]]]], repeats: int,
            reference: str) -> Dict[str, Tuple[float, float]]:
    """``{name: (median images/s, median ratio to the reference)}`` over ``repeats`` rounds (after one
    warm-up round). A run returns its image count (and is timed whole) or ``(images, seconds)``.

    In every round the reference runs before the first row, between every two rows and after the last,
    and a row's ratio is its rate over the mean rate of the reference passes just before and after it:
    on a shared machine whose speed drifts by tens of percent within seconds, only such neighbouring
    passes see the same machine."""
    rows = [name for name in runs if name != reference]
    rates: Dict[str, List[float]] = {name: [] for name in runs}
    ratios: Dict[str, List[float]] = {name: [] for name in runs}

    def rate(name: str) -> float:
        start = time.perf_counter()
        result = runs[name]()
        n, seconds = result if isinstance(result, tuple) else (result, time.perf_counter() - start)
        return n / seconds

    for round_ in range(repeats + 1):
        before = rate(reference)
        for name in rows:
            value, after = rate(name), rate(reference)
            if round_:
                rates[name].append(value)
                ratios[name].append(value / ((before + after) / 2))
                rates[reference].append(after)
                ratios[reference].append(1.0)
            before = after
    return {name: (statistics.median(rates[name]), statistics.median(ratios[name])) for name in runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality of the synthetic images")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as tmp:
        payloads = make_rec(Path(tmp), args.images, args.size, args.quality, args.classes)
        plain = RecordIODataset(tmp)
        augmented = RecordIODataset(tmp, transform=build_transform("standard", image_size=args.size))
        augmented_u8 = RecordIODataset(tmp, transform=build_transform("standard", image_size=args.size,
                                                                       output="uint8"))
        n = len(plain)

        def bare_pil() -> int:
            for data in payloads:
                np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
            return len(payloads)

        def items(dataset: RecordIODataset) -> Callable[[], int]:
            def run() -> int:
                for i in range(n):
                    dataset[i]
                return n
            return run

        runs: Dict[str, Callable[[], Union[int, Tuple[int, float]]]] = {
            "bare cv2 decode": bare_cv2_decode(payloads),
            "bare PIL decode": bare_pil,
            "dataset[i], no aug": items(plain),
            "dataset[i], standard": items(augmented),
            "dataset[i], standard uint8": items(augmented_u8),
        }
        procs = {name: 1 for name in runs}
        for suffix, dataset in (("", augmented), (" uint8", augmented_u8)):
            for w in args.workers:
                name = f"DataLoader w={w}{suffix}"
                runs[name] = loader_epoch(dataset, w, args.batch_size)
                procs[name] = max(w, 1)
        rows = measure(runs, args.repeats, reference="bare cv2 decode")

    mean_bytes = np.mean([len(p) for p in payloads])
    print(f"{n} images {args.size}x{args.size}, JPEG q={args.quality}, mean {mean_bytes:.0f} "
          f"bytes; batch {args.batch_size}; median of {args.repeats}; cv2 {cv2.__version__}, torch "
          f"{torch.__version__}, {os.cpu_count()} CPUs ({platform.processor() or platform.machine()})")
    print(f"{'path':<30}{'img/s':>10}{'per_worker':>12}{'ratio':>8}")
    for name, (value, ratio) in rows.items():
        print(f"{name:<30}{value:>10.0f}{value / procs[name]:>12.0f}{ratio / procs[name]:>8.2f}")


if __name__ == "__main__":
    main()
