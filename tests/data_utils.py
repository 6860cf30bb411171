"""Tiny files written by the tests: ``write_palette_rec(root, ...)`` -> an insightface RecordIO folder
(also the ``tiny_recordio`` fixture of ``tests/conftest.py``); ``make_run(run, cls, init_args)`` -> a run
dir holding a backbone checkpoint as ``mlearn train`` writes it."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence, Union

import cv2
import numpy as np
import torch

from mlearn.data.images.recordio import RecordIOWriter

CORRUPT_IMAGE = b"\xff\xd8\xff\xe0 not a jpeg at all"  # a JPEG start marker, then no image


def write_palette_rec(root: Path, classes: int, per_class: Union[int, Sequence[int]], size: int,
                      seed: int = 0, grid: int = 3, noise: float = 25.0, corrupt: Iterable[int] = ()) -> Path:
    """``classes`` identities of ``per_class`` smooth random colour images [size, size, 3] (``per_class``:
    one count for all or one per class): each identity is a random ``grid x grid`` colour palette, each
    image that palette plus N(0, noise) jitter, upsampled. The images at the 0-based positions
    ``corrupt`` are written as :data:`CORRUPT_IMAGE` instead (the others stay as without them)."""
    counts = [per_class] * classes if isinstance(per_class, int) else list(per_class)
    if len(counts) != classes:
        raise ValueError(f"per_class: {len(counts)} counts for {classes} classes")
    corrupt = set(corrupt)
    rng = np.random.default_rng(seed)
    position = 0
    with RecordIOWriter(root) as writer:
        for label, count in enumerate(counts):
            palette = rng.integers(0, 256, (grid, grid, 3))
            for _ in range(count):
                coarse = np.clip(palette + rng.normal(0, noise, palette.shape), 0, 255).astype(np.uint8)
                image = cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR)
                writer.add(CORRUPT_IMAGE if position in corrupt else image, label)
                position += 1
    return root


def make_run(run: Path, cls: type, init_args: dict) -> Path:
    """A run dir holding ``checkpoints/last.ckpt`` as ``mlearn train`` writes it (backbone part only,
    weights of ``cls(**init_args)`` drawn with seed 0)."""
    torch.manual_seed(0)
    (run / "checkpoints").mkdir(parents=True)
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in cls(**init_args).state_dict().items()},
                "hyper_parameters": {"backbone": {"class_path": f"mlearn.models.{cls.__name__}",
                                                  "init_args": init_args}}},
               run / "checkpoints" / "last.ckpt")
    return run


def add_quality_head(run: Path, size: int, seed: int = 1) -> Path:
    """Give the run's checkpoint what a model trained with ``model.quality`` has: the quality head's
    weights (random, small enough for quality of order 1) and the ``quality`` hyper-parameter. Its
    BN statistics are made non-trivial too, so parity is not vacuous."""
    path = run / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(path, weights_only=True)
    generator = torch.Generator().manual_seed(seed)
    for key, tensor in checkpoint["state_dict"].items():
        if key.endswith(("running_mean", "running_var")):
            tensor.add_(0.2 * torch.rand(tensor.shape, generator=generator))
    checkpoint["state_dict"]["quality_head.fc.weight"] = 0.05 * torch.randn(1, size, generator=generator)
    checkpoint["state_dict"]["quality_head.fc.bias"] = torch.randn(1, generator=generator)
    checkpoint["state_dict"]["quality_head.norm_weight"] = torch.tensor([-0.05])
    checkpoint["hyper_parameters"]["quality"] = {"method": "cr_fiqa", "weight": 10.0, "beta": 0.5}
    torch.save(checkpoint, path)
    return run
