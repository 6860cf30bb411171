"""Tiny training sets written by the tests: ``write_palette_rec(root, ...)`` -> an insightface RecordIO
folder."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from mlearn.data.images.recordio import RecordIOWriter


def write_palette_rec(root: Path, classes: int, per_class: int, size: int, seed: int = 0, grid: int = 3,
                      noise: float = 25.0) -> Path:
    """``classes`` identities of ``per_class`` smooth random colour images [size, size, 3]: each identity is a
    random ``grid x grid`` colour palette, each image that palette plus N(0, noise) jitter, upsampled."""
    rng = np.random.default_rng(seed)
    with RecordIOWriter(root) as writer:
        for label in range(classes):
            palette = rng.integers(0, 256, (grid, grid, 3))
            for _ in range(per_class):
                coarse = np.clip(palette + rng.normal(0, noise, palette.shape), 0, 255).astype(np.uint8)
                writer.add(cv2.resize(coarse, (size, size), interpolation=cv2.INTER_LINEAR), label)
    return root
