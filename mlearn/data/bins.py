"""insightface verification ``.bin`` files: a pickle of ``(list of encoded images, list of bool)``.

Pair ``i`` is ``(images[2i], images[2i+1])``; images are encoded JPEG/PNG bytes, decoded to RGB.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Sequence, Tuple, Union

import numpy as np
from PIL import Image

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
    try:
        bins, issame = pickle.loads(raw)
    except UnicodeDecodeError:  # written by Python 2
        bins, issame = pickle.loads(raw, encoding="bytes")
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise ValueError(f"{path}: not an insightface .bin pickle ({exc})") from None
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; expected 2 per pair")
    images = np.stack([_decode(b, image_size, path, i) for i, b in enumerate(bins)])
    return images, np.asarray(issame, dtype=bool)


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
