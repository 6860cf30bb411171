"""Export a trained backbone (the head is training-only) to ONNX, with metadata and a parity check."""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional, Union

import numpy as np
import torch

from mlearn import __version__
from mlearn.inference import OnnxEmbedder, l2_normalize, load_backbone, preprocess_images

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
TOLERANCE = {False: 1e-4, True: 1e-2}  # max abs diff allowed: fp32, fp16


class ParityError(RuntimeError):
    """The exported model's output differs from PyTorch's beyond the tolerance."""


@dataclass
class ParityReport:
    """``max_abs_diff`` compares L2-normalised embeddings (unit vectors, what every consumer uses);
    raw embeddings can have norms in the thousands, where float32 rounding alone exceeds 1e-4."""

    max_abs_diff: float
    min_cosine: float
    tolerance: float
    raw_relative_diff: float

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        return (f"parity {verdict}: max abs diff {self.max_abs_diff:.3e} of L2-normalised embeddings "
                f"(tolerance {self.tolerance:.0e}), min cosine {self.min_cosine:.6f}, "
                f"raw max diff / max |x| {self.raw_relative_diff:.1e}")


def export_onnx(model: PathLike, output: Optional[PathLike] = None, opset: int = 17, fp16: bool = False,
                parity_batch: int = 4) -> ParityReport:
    """Export the backbone of ``model`` (run dir or checkpoint) to ONNX with a dynamic batch axis.

    The preprocessing (input spec), embedding size, backbone spec and config hash are written into
    ``metadata_props``. A random batch is run through PyTorch and onnxruntime; raises
    :class:`ParityError` if the max abs difference exceeds 1e-4 (fp32) / 1e-2 (fp16).
    """
    backbone, spec, info = load_backbone(model)
    output = Path(output) if output else _default_output(Path(model), fp16)
    output.parent.mkdir(parents=True, exist_ok=True)
    height, width = spec["input_size"]
    dummy = torch.randn(2, 3, height, width)
    net = backbone.half() if fp16 else backbone
    torch.onnx.export(
        net, dummy.half() if fp16 else dummy, str(output), input_names=["input"], output_names=["embedding"],
        dynamic_axes={"input": {0: "batch"}, "embedding": {0: "batch"}}, opset_version=opset, dynamo=False,
    )
    metadata = {
        "input_spec": spec,
        "embedding_size": int(backbone.embedding_size),
        "backbone": info["backbone"],
        "config_hash": info["config_hash"],
        "mlearn_version": __version__,
    }
    _write_metadata(output, metadata)
    report = check_parity(backbone.float(), output, spec, fp16=fp16, batch=parity_batch)
    if not report.passed:
        raise ParityError(f"{output}: {report}")
    return report


def check_parity(backbone: torch.nn.Module, onnx_path: PathLike, spec: Dict[str, Any], fp16: bool = False,
                 batch: int = 4, seed: int = 0) -> ParityReport:
    """Compare PyTorch and onnxruntime embeddings of one random uint8 image batch."""
    height, width = spec["input_size"]
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    onnx_model = OnnxEmbedder(onnx_path)

    with torch.inference_mode():
        reference = backbone.eval()(torch.from_numpy(preprocess_images(images, spec))).numpy()
    exported = onnx_model.embed(images, normalize=False)
    unit_ref, unit_exp = l2_normalize(reference), l2_normalize(exported)
    raw = float(np.abs(reference - exported).max() / max(np.abs(reference).max(), 1e-12))
    return ParityReport(max_abs_diff=float(np.abs(unit_ref - unit_exp).max()),
                        min_cosine=float((unit_ref * unit_exp).sum(1).min()), tolerance=TOLERANCE[fp16],
                        raw_relative_diff=raw)


def _write_metadata(path: Path, metadata: Dict[str, Any]) -> None:
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))


def _default_output(model: Path, fp16: bool) -> Path:
    folder = model if model.is_dir() else model.parent
    return folder / ("model_fp16.onnx" if fp16 else "model.onnx")
