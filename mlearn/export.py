"""Export a trained backbone (the head is training-only) to ONNX, TorchScript or safetensors.

Every export records its preprocessing and provenance as metadata and runs a parity check:

============  ======================================  ==============================================
format        metadata                                parity check
============  ======================================  ==============================================
onnx          ``metadata_props`` (JSON values)        onnxruntime vs the PyTorch model
torchscript   extra file ``mlearn.json`` (one JSON)   ``torch.jit.load``-ed module vs the PyTorch model
safetensors   header ``__metadata__`` (JSON values)   weights reloaded into a freshly built backbone
============  ======================================  ==============================================

Metadata keys: ``input_spec`` (modality, input size / fbank settings, channel order, mean, std),
``embedding_size``, ``backbone`` (``class_path`` + ``init_args``), ``config_hash`` (sha256 of the
training hyper-parameters, 16 hex digits), ``mlearn_version``, ``format``, ``precision`` (fp32 / fp16),
``input_name``, ``output_name``, ``dynamic_axes``; with ``thresholds`` (``mlearn export --thresholds``)
also ``thresholds``: the verification thresholds at target FARs from an ``own_data`` evaluation of this
model (:func:`mlearn.evaluation.protocols.own_data.read_thresholds`), which
``load_model(path).verify(a, b, far=...)`` uses; with ``calibration`` (``mlearn export --calibration``)
also ``calibration``: a speaker score calibration (:class:`~mlearn.evaluation.metrics.calibration.Calibration`
``to_dict()``, ``info.source`` / ``info.benchmark`` saying where it came from, see :func:`read_calibration`),
which ``load_model(path).calibration`` returns and the trials protocol applies with
``calibration: {from_model: true}`` (docs/protocols.md c.6).

Axes: batch is dynamic; audio models (input fbank ``[B, T, num_mel_bins]``) also have a dynamic
``frames`` axis. ONNX/TorchScript outputs are raw (un-normalised) embeddings.

Quality head (a model trained with ``model.quality``, :mod:`mlearn.quality`): ONNX and TorchScript get a
second output ``quality`` [B] (the head on the raw embedding), safetensors stores the head's weights as
``quality_head.*``, and the metadata gets ``quality`` = ``{"method", "output": "quality"}`` (absent for a
model without a head, whose exports are unchanged). Its parity check: max abs diff of the quality
output, divided by max(1, max |reference quality|) (a trained head's quality is of order 1, so this is
the plain abs diff; an untrained head on raw embeddings of norm ~1000 would otherwise fail on float32
rounding alone), within the same tolerance as the embeddings.

fp16: weights and compute are float16 but the exported ONNX/TorchScript model keeps float32 input and
output (casts inside the graph), so it is a drop-in for the fp32 one. Its parity reference is always
the float32 PyTorch model (what users care about; torch on CPU may lack float16 kernels anyway), with
tolerance 1e-2 instead of 1e-4.

Parity passes when the max abs diff of the L2-normalised embeddings is within the tolerance AND the
min cosine between exported and PyTorch embeddings is at least 0.99999 (fp32) / 0.999 (fp16).
"""
from __future__ import annotations

import copy
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from mlearn import __version__
from mlearn.inference import (
    QUALITY_OUTPUT,
    QUALITY_PREFIX,
    TORCHSCRIPT_METADATA_FILE,
    Embedder,
    l2_normalize,
    load_backbone,
    load_model,
    resolve_checkpoint,
)

if TYPE_CHECKING:
    from mlearn.evaluation.metrics.calibration import Calibration

log = logging.getLogger(__name__)

PathLike = Union[str, Path]
FORMATS = ("onnx", "torchscript", "safetensors")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".pt", "safetensors": ".safetensors"}
TOLERANCE = {False: 1e-4, True: 1e-2}  # max abs diff of L2-normalised embeddings: fp32, fp16
MIN_COSINE = {False: 0.99999, True: 0.999}  # min cosine of exported vs PyTorch embeddings: fp32, fp16
INPUT_NAME, OUTPUT_NAME = "input", "embedding"
EXPORT_FRAMES, PARITY_FRAMES = 200, 157  # audio: trace at one length, check at another (dynamic axis)


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
    min_cosine_required: float = MIN_COSINE[False]
    quality_max_abs_diff: Optional[float] = None  # quality output / max(1, max |q|); None: no quality head

    @property
    def passed(self) -> bool:
        # NaN fails; so does an all-zero embedding (cosine 0), which would make the diff vacuously small
        quality_ok = self.quality_max_abs_diff is None or bool(self.quality_max_abs_diff <= self.tolerance)
        return bool(self.max_abs_diff <= self.tolerance and self.min_cosine >= self.min_cosine_required
                    and quality_ok)

    def __str__(self) -> str:
        verdict = "PASS" if self.passed else "FAIL"
        quality = "" if self.quality_max_abs_diff is None else (
            f", quality max abs diff {self.quality_max_abs_diff:.3e} (tolerance {self.tolerance:.0e})")
        return (f"parity {verdict}: max abs diff {self.max_abs_diff:.3e} of L2-normalised embeddings "
                f"(tolerance {self.tolerance:.0e}), min cosine {self.min_cosine:.6f} "
                f"(required >= {self.min_cosine_required}), "
                f"raw max diff / max |x| {self.raw_relative_diff:.1e}{quality}")


@dataclass
class ExportResult:
    path: Path
    format: str
    fp16: bool
    report: ParityReport
    metadata: Dict[str, Any]

    def __str__(self) -> str:
        precision = "fp16" if self.fp16 else "fp32"
        return f"{self.format} ({precision}) written to {self.path}\n{self.format} {self.report}"


def export_model(model: PathLike, format: str = "onnx", output: Optional[PathLike] = None, fp16: bool = False,
                 opset: int = 17, parity_batch: int = 3, *, unsafe: bool = False,
                 allow_any_class: bool = False, thresholds: Optional[PathLike] = None,
                 thresholds_benchmark: Optional[str] = None, calibration: Optional[PathLike] = None,
                 calibration_benchmark: Optional[str] = None) -> ExportResult:
    """Export the backbone of ``model`` (run dir or ``.ckpt``) as ``format`` and check parity.

    ``output`` defaults to ``<run dir>/model[_fp16].{onnx,pt,safetensors}``. The parity check embeds
    ``parity_batch`` random inputs (uint8 images, or fbank features of another length than the traced
    one) with the exported file, loaded back through :func:`mlearn.load_model`, and with the float32
    PyTorch backbone. Raises :class:`ParityError` when the max abs difference of the L2-normalised
    embeddings exceeds 1e-4 (fp32) / 1e-2 (fp16) or their min cosine is below 0.99999 / 0.999; the
    failed file is renamed ``<output>.failed``. ``unsafe`` / ``allow_any_class``: see
    :func:`mlearn.load_model` (only for checkpoints you trust). ``output`` never overwrites the input.

    ``thresholds``: a ``results.json`` of an ``own_data`` evaluation, its folder, or a run dir (its newest
    ``eval/*/results.json`` with thresholds; ``thresholds_benchmark`` picks a row when several have
    them): stored as the ``thresholds`` metadata after checking, on a fixed probe input, that they were
    computed with this model (``ValueError`` otherwise; nothing is written).

    ``calibration``: a calibration JSON file, or a ``results.json`` / its folder / a run dir holding a
    calibrated trials row (see :func:`read_calibration`; ``calibration_benchmark`` picks the row when
    several have one): stored as the ``calibration`` metadata; refused (``ValueError``, nothing written)
    when its ``config_hash`` differs from this model's.
    """
    if format not in FORMATS:
        raise ValueError(f"format '{format}': expected one of {list(FORMATS)}")
    if parity_batch < 1:
        raise ValueError(f"parity_batch={parity_batch}: expected a positive integer")
    output = Path(output) if output else default_output(Path(model), format, fp16)
    checkpoint = resolve_checkpoint(model, unsafe=unsafe)
    if output.exists() and (output.is_dir() or output.resolve() == checkpoint.resolve()):
        what = "a folder" if output.is_dir() else f"the input checkpoint {checkpoint}"
        raise ValueError(f"--output {output} is {what}; expected a new file such as "
                         f"{default_output(Path(model), format, fp16)}")
    backbone, spec, info = load_backbone(checkpoint, unsafe=unsafe, allow_any_class=allow_any_class)
    backbone = backbone.float().eval()
    head = info.get("quality_head")
    net = backbone if head is None else WithQuality(backbone, head.float().eval())
    record = _thresholds_for(backbone, spec, thresholds, thresholds_benchmark) if thresholds else None
    stored_calibration = None
    if calibration:
        cal = read_calibration(calibration, calibration_benchmark)
        cal.check_model(info["config_hash"], f"model {checkpoint}")
        stored_calibration = cal.to_dict()
    output.parent.mkdir(parents=True, exist_ok=True)
    audio = spec.get("modality") == "audio"
    input_axes = {0: "batch", 1: "frames"} if audio else {0: "batch"}
    dynamic_axes = {INPUT_NAME: input_axes, OUTPUT_NAME: {0: "batch"}}
    if head is not None:
        dynamic_axes[QUALITY_OUTPUT] = {0: "batch"}
    metadata = {
        "input_spec": spec,
        "embedding_size": int(backbone.embedding_size),
        "backbone": info["backbone"],
        "config_hash": info["config_hash"],
        "mlearn_version": __version__,
        "format": format,
        "precision": "fp16" if fp16 else "fp32",
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "dynamic_axes": {name: {str(k): v for k, v in axes.items()} for name, axes in dynamic_axes.items()},
    }
    if record is not None:
        metadata["thresholds"] = record
    if stored_calibration is not None:
        metadata["calibration"] = stored_calibration
    if head is not None:
        metadata["quality"] = info["quality"]
    to_export = copy.deepcopy(net).half() if fp16 else net
    example = torch.from_numpy(_example_input(spec, batch=2, frames=EXPORT_FRAMES))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based ONNX exporter, torch.jit
        warnings.simplefilter("ignore", FutureWarning)
        _WRITERS[format](to_export, fp16, example, output, metadata, opset=opset, dynamic_axes=dynamic_axes)
    exported = load_model(output, device="cpu", allow_any_class=allow_any_class)
    report = check_parity(backbone, exported, fp16=fp16, batch=parity_batch, quality_head=head)
    log.debug("%s %s", output, report)
    if not report.passed:
        failed = output.with_name(output.name + ".failed")
        output.replace(failed)
        raise ParityError(f"{format} export does not match the PyTorch model: {report} "
                          f"(file moved to {failed})")
    return ExportResult(path=output, format=format, fp16=fp16, report=report, metadata=metadata)


def _thresholds_for(backbone: nn.Module, spec: Dict[str, Any], source: PathLike,
                    benchmark: Optional[str]) -> Dict[str, Any]:
    """The thresholds record of ``source`` (see :func:`export_model`), checked against ``backbone``."""
    from mlearn.evaluation.protocols.own_data import check_probe, read_thresholds
    from mlearn.inference import TorchEmbedder

    record = read_thresholds(source, benchmark)
    check_probe(TorchEmbedder(backbone, spec, device="cpu"), record, record["source"])
    return record


def read_calibration(source: PathLike, benchmark: Optional[str] = None) -> "Calibration":
    """The speaker score calibration of ``source``: a calibration JSON file
    (:meth:`~mlearn.evaluation.metrics.calibration.Calibration.save`), a ``results.json`` of a trials
    evaluation with ``calibration``, the eval folder holding it, or a run / model dir (its newest
    ``eval/*/results.json`` with a calibrated row). ``benchmark`` picks the row when several are
    calibrated. ``info["source"]`` (and ``info["benchmark"]`` for a results row) say where it came from."""
    from mlearn.evaluation.metrics.calibration import FORMAT, Calibration
    from mlearn.evaluation.report import latest_results_with, one_row, rows_with

    path = Path(source)
    if path.is_dir():
        path = path / "results.json" if (path / "results.json").is_file() else latest_results_with(
            path, "calibration", "a calibration",
            "evaluate a trials entry with calibration: {dev_trials: ...} first")
    if not path.is_file():
        raise FileNotFoundError(f"calibration: {path} not found (expected a calibration JSON or an eval "
                                "results.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"calibration: {path} is not valid JSON ({exc})") from None
    if isinstance(data, dict) and data.get("format") == FORMAT:
        cal = Calibration.from_dict(data, str(path))
        cal.info["source"] = str(path)
        return cal
    row = one_row(rows_with(data, "calibration"), benchmark, f"calibration: {path}", "a calibration",
                  "pick one with --calibration-benchmark from",
                  "evaluate a trials entry with calibration: {dev_trials: ...} first")
    cal = Calibration.from_dict(row["calibration"], f"{path} ({row.get('benchmark')})")
    cal.info.update(source=str(path), benchmark=row.get("benchmark"))
    return cal




def export_onnx(model: PathLike, output: Optional[PathLike] = None, opset: int = 17, fp16: bool = False,
                parity_batch: int = 4) -> ParityReport:
    """ONNX export (see :func:`export_model`); returns the parity report."""
    return export_model(model, "onnx", output, fp16=fp16, opset=opset, parity_batch=parity_batch).report


def check_parity(backbone: nn.Module, exported: Embedder, fp16: bool = False, batch: int = 3,
                 seed: int = 0, quality_head: Optional[nn.Module] = None) -> ParityReport:
    """Embed one random batch with the float32 PyTorch ``backbone`` and with ``exported``.

    Both see the same preprocessed input (``exported.preprocess``: the recorded spec); images are
    random uint8 RGB at the spec's size, audio random fbank features of :data:`PARITY_FRAMES` frames.
    With ``quality_head`` the exported quality output is compared too (``exported.quality``).
    """
    raw_inputs = _random_batch(exported.spec, batch, seed)
    with torch.inference_mode():
        reference_t = backbone.float().eval()(torch.from_numpy(exported.preprocess(raw_inputs)))
        ref_quality = None if quality_head is None else quality_head.float().eval()(reference_t).numpy()
        reference = reference_t.numpy()
    if quality_head is None:
        candidate, quality = exported.embed(raw_inputs, normalize=False), None
    else:
        candidate, quality = exported.embed(raw_inputs, normalize=False, with_quality=True)
    nan = float("nan")
    finite = np.isfinite(reference).all() and np.isfinite(candidate).all()
    if candidate.shape != reference.shape or not finite:
        # non-finite outputs (e.g. float16 overflow) or a wrong shape: NaN fails the check
        return ParityReport(max_abs_diff=nan, min_cosine=nan, tolerance=TOLERANCE[fp16],
                            raw_relative_diff=nan, min_cosine_required=MIN_COSINE[fp16],
                            quality_max_abs_diff=None if quality_head is None else nan)
    reference, candidate = reference.astype(np.float64), candidate.astype(np.float64)
    unit_ref, unit_exp = l2_normalize(reference), l2_normalize(candidate)
    raw = float(np.abs(reference - candidate).max() / max(float(np.abs(reference).max()), 1e-12))
    return ParityReport(max_abs_diff=float(np.abs(unit_ref - unit_exp).max()),
                        min_cosine=float((unit_ref * unit_exp).sum(1).min()), tolerance=TOLERANCE[fp16],
                        raw_relative_diff=raw, min_cosine_required=MIN_COSINE[fp16],
                        quality_max_abs_diff=_quality_diff(ref_quality, quality))


def _quality_diff(reference: Optional[np.ndarray], candidate: Optional[np.ndarray]) -> Optional[float]:
    """max |reference - candidate| / max(1, max |reference|) of two quality outputs [N]; NaN when they do
    not match in shape or are not finite; None without a reference (no quality head)."""
    if reference is None:
        return None
    ref = np.asarray(reference, np.float64).reshape(-1)
    cand = np.asarray(candidate if candidate is not None else [], np.float64).reshape(-1)
    if ref.shape != cand.shape or not (np.isfinite(ref).all() and np.isfinite(cand).all()):
        return float("nan")
    return float(np.abs(ref - cand).max() / max(1.0, float(np.abs(ref).max())))


def default_output(model: Path, format: str, fp16: bool) -> Path:
    """``<run dir>/model[_fp16]<suffix>``; a checkpoint in ``<run>/checkpoints/`` exports into ``<run>``."""
    folder = model if model.is_dir() else model.parent
    if not model.is_dir() and folder.name == "checkpoints":
        folder = folder.parent
    return folder / (("model_fp16" if fp16 else "model") + SUFFIXES[format])


# ------------------------------------------------------------------------------------------ writers


class WithQuality(nn.Module):
    """Backbone + quality head: input -> (raw embedding [B, D], quality [B]), the two exported outputs."""

    def __init__(self, backbone: nn.Module, quality_head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.quality_head = quality_head
        self.embedding_size = getattr(backbone, "embedding_size", None)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        embedding = self.backbone(x)
        return embedding, self.quality_head(embedding)


class Float32IO(nn.Module):
    """Runs a float16 network on float32 inputs and returns float32 outputs (casts inside the graph)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.embedding_size = getattr(net, "embedding_size", None)

    def forward(self, x: torch.Tensor) -> Any:
        out = self.net(x.half())
        if isinstance(out, tuple):  # WithQuality: (embedding, quality)
            return tuple(o.float() for o in out)
        return out.float()


def _output_names(net: nn.Module) -> List[str]:
    inner = net.net if isinstance(net, Float32IO) else net
    return [OUTPUT_NAME, QUALITY_OUTPUT] if isinstance(inner, WithQuality) else [OUTPUT_NAME]


def _write_onnx(backbone: nn.Module, fp16: bool, example: torch.Tensor, path: Path, metadata: Dict[str, Any],
                opset: int, dynamic_axes: Dict[str, Dict[int, str]]) -> None:
    net = Float32IO(backbone) if fp16 else backbone
    torch.onnx.export(net.eval(), (example,), str(path), input_names=[INPUT_NAME],
                      output_names=_output_names(net), dynamic_axes=dynamic_axes, opset_version=opset,
                      dynamo=False)
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, json.dumps(value)
    onnx.save(proto, str(path))


def _write_torchscript(backbone: nn.Module, fp16: bool, example: torch.Tensor, path: Path,
                       metadata: Dict[str, Any], opset: int, dynamic_axes: Dict[str, Dict[int, str]]) -> None:
    net = Float32IO(backbone) if fp16 else backbone
    # trace, not script: backbones are plain feed-forward graphs; batch and frame sizes stay symbolic.
    traced = torch.jit.trace(net.eval(), example, check_trace=False)
    torch.jit.save(traced, str(path), _extra_files={TORCHSCRIPT_METADATA_FILE: json.dumps(metadata)})


def _write_safetensors(backbone: nn.Module, fp16: bool, example: torch.Tensor, path: Path,
                       metadata: Dict[str, Any], opset: int, dynamic_axes: Dict[str, Dict[int, str]]) -> None:
    from safetensors.torch import save_file

    tensors = dict(backbone.state_dict())
    if isinstance(backbone, WithQuality):  # backbone weights unprefixed (as without a head) + quality_head.*
        tensors = dict(backbone.backbone.state_dict())
        tensors.update({QUALITY_PREFIX + k: v for k, v in backbone.quality_head.state_dict().items()})
    state = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(state, str(path), metadata={k: json.dumps(v) for k, v in metadata.items()})


_WRITERS: Dict[str, Callable[..., None]] = {
    "onnx": _write_onnx, "torchscript": _write_torchscript, "safetensors": _write_safetensors,
}


# ------------------------------------------------------------------------------------------- inputs


def _example_input(spec: Dict[str, Any], batch: int, frames: int) -> np.ndarray:
    """A preprocessed float32 input for tracing: [B, 3, H, W] images or [B, frames, bins] fbank."""
    rng = np.random.default_rng(1)
    if spec.get("modality") == "audio":
        return rng.standard_normal((batch, frames, int(spec["num_mel_bins"]))).astype(np.float32)
    height, width = spec["input_size"]
    return rng.uniform(-1, 1, (batch, 3, height, width)).astype(np.float32)


def _random_batch(spec: Dict[str, Any], batch: int, seed: int) -> np.ndarray:
    """What a user feeds ``embed``: uint8 RGB images [B, H, W, 3], or fbank features [B, T, bins]."""
    rng = np.random.default_rng(seed)
    if spec.get("modality") == "audio":
        return rng.standard_normal((batch, PARITY_FRAMES, int(spec["num_mel_bins"]))).astype(np.float32)
    height, width = spec["input_size"]
    return rng.integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
