"""The image input spec every face/image backbone records: uint8 RGB, ``(x - 127.5) / 127.5``.

One definition shared by the backbones (``input_spec`` attribute, written into exports) and by
:mod:`mlearn.inference` (the spec assumed when a file records none). Imports nothing.
"""
from __future__ import annotations

from typing import Any, Dict

DEFAULT_IMAGE_SPEC: Dict[str, Any] = {
    "modality": "image", "input_size": [112, 112], "channels": "RGB",
    "mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5],
}


def image_spec(input_size: int = 112) -> Dict[str, Any]:
    """A fresh copy of :data:`DEFAULT_IMAGE_SPEC` for square ``input_size`` x ``input_size`` inputs."""
    return {**DEFAULT_IMAGE_SPEC, "input_size": [int(input_size), int(input_size)],
            "mean": list(DEFAULT_IMAGE_SPEC["mean"]), "std": list(DEFAULT_IMAGE_SPEC["std"])}
