"""insightface verification ``.bin`` files: a pickle of ``(list of encoded images, list of bool)``.

Pair ``i`` is ``(images[2i], images[2i+1])``; images are encoded JPEG/PNG bytes, decoded to RGB.

The sets come from third-party mirrors, so they are read with :func:`mlearn.trust.restricted_unpickle`:
only lists, tuples, bytes, bools and numpy bool arrays are admitted, nothing named by the file runs.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from mlearn.trust import restricted_unpickle

PathLike = Union[str, Path]


def read_bin(path: PathLike, image_size: int = 112) -> Tuple[np.ndarray, np.ndarray]:
    """Load a ``.bin`` set.

    Returns ``images`` uint8 [2N, H, W, 3] RGB (short side resized to ``image_size`` when it differs)
    and ``issame`` bool [N].
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set not found: {path}")
    with path.open("rb") as f:
        raw = f.read()
    bins, issame = _check_contents(restricted_unpickle(raw, source=str(path)), path)
    images = np.stack([_decode(b, image_size, path, i) for i, b in enumerate(bins)])
    return images, issame


def _check_contents(obj: Any, path: Path) -> Tuple[List[bytes], np.ndarray]:
    """``(encoded images, issame)`` as the released sets hold them, or one ValueError line."""
    if not (isinstance(obj, (tuple, list)) and len(obj) == 2):
        raise ValueError(f"{path}: expected a pickled (images, issame) pair, got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not all(isinstance(b, (bytes, bytearray, str)) for b in bins):
        raise ValueError(f"{path}: images: expected a list of encoded images (bytes)")
    # a Python 2 str read as ASCII (an image that happens to be pure ASCII) is latin-1 bytes
    encoded = [b.encode("latin1") if isinstance(b, str) else bytes(b) for b in bins]
    flags = np.asarray(issame)
    if flags.ndim != 1 or flags.dtype != bool:
        raise ValueError(f"{path}: issame: expected a list of bools, got {flags.dtype} {flags.shape}")
    if len(encoded) != 2 * len(flags):
        raise ValueError(f"{path}: {len(encoded)} images for {len(flags)} pairs; expected 2 per pair")
    if not flags.any() or flags.all():
        missing = "different" if flags.all() and len(flags) else "same"
        raise ValueError(f"{path}: {len(flags)} pairs, none {missing}-identity; verification needs both "
                         "same- and different-identity pairs")
    return encoded, flags


def write_bin(path: PathLike, images: Sequence[np.ndarray], issame: Sequence[bool], fmt: str = "PNG") -> None:
    """Write ``images`` (uint8 HWC RGB, two per pair) and ``issame`` as an insightface ``.bin``."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs; expected 2 per pair")
    encoded = []
    for image in images:
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(image, dtype=np.uint8)).save(buffer, format=fmt)
        encoded.append(buffer.getvalue())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump((encoded, [bool(x) for x in issame]), f, protocol=pickle.HIGHEST_PROTOCOL)


def _decode(data: bytes, image_size: int, path: Path, index: int) -> np.ndarray:
    try:
        image = Image.open(io.BytesIO(data)).convert("RGB")
    except Exception as exc:  # noqa: BLE001
        raise ValueError(f"{path}: image {index} cannot be decoded ({exc})") from None
    if image.width != image_size:
        scale = image_size / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.BILINEAR)
    return np.asarray(image, dtype=np.uint8)
