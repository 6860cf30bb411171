"""Load a trained or exported embedding model for inference: ``load_model(path).embed(batch)``.

Formats: a run dir or Lightning ``.ckpt``, an exported ``.onnx``, TorchScript ``.pt`` (metadata in the
``mlearn.json`` extra file) and ``.safetensors`` (metadata in the header's ``__metadata__``; the
backbone is rebuilt from the recorded ``class_path`` spec). Imports neither Lightning nor the
training code: an ONNX model needs only onnxruntime and numpy.

Trust (docs/security.md): a recorded ``class_path`` builds only a registered mlearn backbone
(``allow_any_class=True`` opts out) and checkpoints load with ``torch.load(weights_only=True)``
(``unsafe=True`` opts out); ONNX and safetensors files are safe from strangers, TorchScript files
are programs and are not.

Quality (issue 20): a model trained with ``model.quality`` carries a quality head (one linear unit on the
raw embedding); every format keeps it (ONNX/TorchScript: a second output ``quality`` [B]; safetensors and
checkpoints: the ``quality_head.`` weights) and ``Embedder.quality(batch)`` returns it. The embedding
norm (``method="norm"``, AdaFace/MagFace style) is the baseline any model gives.

Why one module of ~600 lines: every format's loader goes through the same trust checks
(``instantiate``, ``check_input_spec``) and returns the same ``Embedder``; keeping them together keeps
those rules in one place.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, Dict, Iterable, Optional, Protocol, Tuple, Union

import numpy as np

from mlearn.input_spec import DEFAULT_IMAGE_SPEC
from mlearn.trust import load_checkpoint, order_checkpoints, resolve_backbone_spec

PathLike = Union[str, Path]
CHECKPOINT_NAMES = ("last.ckpt",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".jit", ".torchscript")
TORCHSCRIPT_METADATA_FILE = "mlearn.json"
MODEL_DIR_WEIGHTS = "backbone.safetensors"  # a model directory (``mlearn import``): weights + metadata
QUALITY_OUTPUT = "quality"  # the quality output's name in exports and in the ``quality`` metadata
QUALITY_PREFIX = "quality_head."  # quality head weights in checkpoints and safetensors exports
QUALITY_CHOICES = ("head", "norm")  # Embedder.quality methods: the trained head, the embedding norm



# ---------------------------------------------------------------------------------- preprocessing


def preprocess_images(images: Any, spec: Dict[str, Any]) -> np.ndarray:
    """uint8 RGB images -> float32 [N, 3, h, w] normalised as ``spec`` says (``(x - mean) / std``).

    ``images``: numpy array or tensor, one image or a batch, channels last ([H, W, 3], [N, H, W, 3])
    or channels first ([3, H, W], [N, 3, H, W]); images of another size are resized (bilinear) to
    ``spec["input_size"]`` ([height, width]). Only dtype uint8 (0-255) is accepted: float images
    (often in [0, 1]) would silently give unrelated embeddings, so they raise ``ValueError`` like any
    other dtype or shape.
    """
    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim == 4 and array.shape[-1] != 3 and array.shape[1] == 3:
        array = array.transpose(0, 2, 3, 1)  # channels first -> channels last
    if array.ndim != 4 or array.shape[-1] != 3 or 0 in array.shape[1:3]:
        raise ValueError(f"images: expected uint8 RGB [N, H, W, 3] or [N, 3, H, W], "
                         f"got shape {tuple(array.shape)}")
    if array.dtype != np.uint8:
        # float images in [0, 1] would be normalised as if in [0, 255]: wrong embeddings, no error
        raise ValueError(f"images: expected dtype uint8 (RGB values 0-255), got {array.dtype}; "
                         "convert float images in [0, 1] with (x * 255).round().astype(np.uint8)")
    height, width = spec["input_size"]
    if array.shape[1:3] != (height, width):
        array = np.stack([resize_image(a, height, width) for a in array])
    if spec.get("channels", "RGB") == "BGR":
        array = array[..., ::-1]
    mean = np.asarray(spec["mean"], np.float32)
    std = np.asarray(spec["std"], np.float32)
    out = (array.astype(np.float32) - mean) / std
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def resize_image(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """[H, W, 3] uint8 -> [height, width, 3] (bilinear; cv2 when installed, else PIL)."""
    image = np.ascontiguousarray(image, dtype=np.uint8)
    if image.shape[:2] == (height, width):
        return image
    try:
        import cv2
    except ImportError:
        from PIL import Image

        return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def preprocess_features(features: Any, spec: Dict[str, Any]) -> np.ndarray:
    """Audio: fbank features [T, F] or [N, T, F] (numpy or tensor) -> float32 [N, T, F].

    The waveform -> fbank front-end (``spec``: Kaldi fbank, ``num_mel_bins``, 25/10 ms, CMN) is not
    applied here: pass features computed as the spec says.
    """
    array = features.detach().cpu().numpy() if hasattr(features, "detach") else np.asarray(features)
    if array.ndim == 2:
        array = array[None]
    bins = int(spec.get("num_mel_bins", array.shape[-1]))
    if array.ndim != 3 or array.shape[-1] != bins or array.shape[1] == 0:
        raise ValueError(f"features: expected fbank [N, T, {bins}] (or [T, {bins}]), "
                         f"got shape {tuple(array.shape)}")
    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"features: expected float fbank features, got dtype {array.dtype}")
    if not np.isfinite(array).all():
        raise ValueError("features: contain NaN or infinite values; expected finite fbank features")
    return np.ascontiguousarray(array, dtype=np.float32)


def l2_normalize(x: Any, eps: float = 1e-12) -> np.ndarray:
    """Rows of ``x`` [N, D] scaled to unit L2 norm (zero rows stay zero): the one row normaliser of
    mlearn (inference, every evaluation protocol, ``mlearn embed``).

    Float input keeps its dtype (other input becomes float64). Squared norms are summed in float64
    (raw float32 embeddings of an untrained network can overflow float32) without a float64 copy of
    ``x``; each row is multiplied by its reciprocal norm in ``x``'s dtype.
    """
    x = np.asarray(x)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float64)
    squared = np.einsum("ij,ij->i", x, x, dtype=np.float64)
    scale = 1.0 / np.maximum(np.sqrt(squared), eps)
    return x * scale.astype(x.dtype)[:, None]


class SupportsEmbed(Protocol):
    """Anything with ``embed(batch, normalize=False) -> [N, D]`` (an :class:`Embedder`, a test double)."""

    def embed(self, batch: Any, normalize: bool = ...) -> Any: ...


def embed_batches(model: SupportsEmbed, batches: Iterable[np.ndarray], flip: bool = False,
                  dim: int = 0) -> np.ndarray:
    """Raw (unnormalised) float32 embeddings [N, D] of uint8 image batches [B, H, W, 3], in order.

    The one flip-fusion path (suite protocols, the training callback, ``mlearn embed``): with
    ``flip`` the embedding of the horizontally mirrored batch is added before any normalisation
    (insightface's flip fusion). ``dim``: the width of the empty result when ``batches`` is empty.
    """
    chunks = []
    for batch in batches:
        emb = np.asarray(model.embed(batch, normalize=False), np.float32)
        if flip:
            mirrored = np.ascontiguousarray(batch[:, :, ::-1])
            emb = emb + np.asarray(model.embed(mirrored, normalize=False), np.float32)
        chunks.append(emb)
    return np.concatenate(chunks) if chunks else np.zeros((0, dim), np.float32)


# -------------------------------------------------------------------------------------- embedders


class Embedder:
    """A model plus its recorded preprocessing: ``embed(batch) -> float32 [N, D]`` (L2-normalised),
    ``verify(a, b, far=1e-3) -> (score, accepted)`` at a threshold stored with the model.

    Attributes: ``spec`` (the input spec), ``embedding_size``, ``metadata`` (everything recorded at
    export, ``thresholds`` included when exported with ``--thresholds``; for a checkpoint, the same keys
    rebuilt from it), ``modality`` (``image`` / ``audio``), ``has_quality`` (a trained quality head),
    ``source`` (the file it came from, for messages).
    """

    spec: Dict[str, Any]
    metadata: Dict[str, Any]
    embedding_size: int
    source: str = "in memory"

    @property
    def has_quality(self) -> bool:
        """True when the model carries a trained quality head (``metadata["quality"]``)."""
        return False

    @property
    def modality(self) -> str:
        return str(self.spec.get("modality", "image"))

    def preprocess(self, batch: Any) -> np.ndarray:
        """Images (uint8 RGB, see :func:`preprocess_images`) or audio fbank features -> model input."""
        if self.modality == "audio":
            return preprocess_features(batch, self.spec)
        return preprocess_images(batch, self.spec)

    def embed(self, batch: Any, normalize: bool = True, with_quality: Union[bool, str] = False) -> Any:
        """``batch``: one or N uint8 RGB images (HWC or CHW; numpy or tensor; values 0-255), resized if
        needed; for audio models finite float fbank features [N, T, F] ([T, F] for one), or raw 16 kHz
        waveforms: one 1-D array or a list of them (float in [-1, 1] or int16, any lengths; see
        :meth:`embed_waveforms`). Other dtypes (float, uint16, bool images; integer or NaN features) and
        shapes raise ``ValueError``. Returns float32 [N, D], L2-normalised unless ``normalize=False``.

        ``with_quality``: True (or ``"head"``) / ``"norm"``: returns ``(embeddings [N, D], quality [N])``
        from one forward pass; see :meth:`quality`."""
        if with_quality is not False:
            method = self.check_quality("head" if with_quality is True else with_quality)
            raw, quality = self._embed_with_quality(batch, method)
            return (l2_normalize(raw) if normalize else raw), quality
        if self.modality == "audio":
            from mlearn.inference_audio import is_waveform_input

            if is_waveform_input(batch):
                return self.embed_waveforms(batch, normalize=normalize)
        out = np.asarray(self.forward(self.preprocess(batch)), dtype=np.float32)
        return l2_normalize(out) if normalize else out

    def quality(self, batch: Any, method: str = "head") -> np.ndarray:
        """Quality [N] float32 of ``batch`` (whatever :meth:`embed` takes); higher is better.

        ``method``: ``"head"`` the trained quality head (CR-FIQA, :mod:`mlearn.quality`; a model without
        one raises ``ValueError``), ``"norm"`` the L2 norm of the raw embedding (AdaFace/MagFace-style
        baseline, any model)."""
        return self.embed(batch, normalize=False, with_quality=method)[1]

    def check_quality(self, method: Any) -> str:
        """``method`` if this model can give quality by it, else ``ValueError`` (one line naming the model
        and the options)."""
        if method not in QUALITY_CHOICES:
            raise ValueError(f"quality method {method!r}: expected one of {', '.join(QUALITY_CHOICES)}")
        if method == "head" and not self.has_quality:
            raise ValueError(f"model {self.source} has no quality head (trained without model.quality); use "
                             "method='norm' (mlearn embed --quality norm) for the embedding-norm baseline")
        return str(method)

    def _embed_with_quality(self, batch: Any, method: str) -> Tuple[np.ndarray, np.ndarray]:
        """Raw embeddings [N, D] and quality [N] (float32) of ``batch`` by ``method``."""
        def both(inputs: np.ndarray) -> np.ndarray:  # [N, D + 1]: quality as the last column
            raw, quality = self.forward_quality(inputs) if method == "head" else (self.forward(inputs), None)
            raw = np.asarray(raw, np.float32)
            if quality is None:
                quality = np.sqrt(np.einsum("ij,ij->i", raw, raw, dtype=np.float64))
            return np.concatenate([raw, np.asarray(quality, np.float32).reshape(-1, 1)], axis=1)

        if self.modality == "audio":
            from mlearn.inference_audio import embed_waveforms, is_waveform_input

            if is_waveform_input(batch):
                out = embed_waveforms(lambda feats: both(self.preprocess(feats)), batch, self.spec)
                return out[:, :-1], out[:, -1]
        out = both(self.preprocess(batch))
        return out[:, :-1], out[:, -1]

    def embed_waveforms(self, waveforms: Any, sample_rate: int = 16000, normalize: bool = True,
                        batch_size: int = 64) -> np.ndarray:
        """Audio models: raw waveforms (one 1-D array / tensor or a list; float in [-1, 1] or int16) at
        ``sample_rate`` (the spec's, 16 kHz; nothing is resampled) -> the recorded fbank front-end, as
        ``mlearn embed`` treats a wav file of the same samples -> float32 [N, D]."""
        if self.modality != "audio":
            raise ValueError(f"embed_waveforms: only audio models take waveforms (this one: {self.modality})")
        from mlearn.inference_audio import embed_waveforms

        out = embed_waveforms(lambda feats: self.forward(self.preprocess(feats)), waveforms, self.spec,
                              sample_rate=sample_rate, batch_size=batch_size)
        return l2_normalize(out) if normalize else out

    def threshold(self, far: float = 1e-3, thresholds: Optional[Dict[str, Any]] = None) -> float:
        """The score threshold for target FAR ``far`` stored with the model (``metadata["thresholds"]``,
        written by ``mlearn export --thresholds``) or given as ``thresholds`` (what
        :func:`mlearn.evaluation.protocols.own_data.read_thresholds` returns for a ``results.json``).
        ``ValueError`` naming the FARs available when there is none for ``far``."""
        from mlearn.evaluation.metrics.thresholds import stored_threshold

        return stored_threshold(self.metadata.get("thresholds") if thresholds is None else thresholds, far)

    @property
    def calibration(self) -> Optional[Dict[str, Any]]:
        """The speaker score calibration stored with the model (``metadata["calibration"]``, written by
        ``mlearn export --calibration``; a :meth:`Calibration.to_dict
        <mlearn.evaluation.metrics.calibration.Calibration.to_dict>` dict), or None."""
        stored = self.metadata.get("calibration")
        return stored if isinstance(stored, dict) else None

    def verify(self, a: Any, b: Any, far: float = 1e-3,
               thresholds: Optional[Dict[str, Any]] = None) -> Tuple[Any, Any]:
        """Same identity? ``a`` and ``b``: one input each, or N each (whatever :meth:`embed` takes).
        Returns ``(score, accepted)``: the cosine of the two L2-normalised embeddings and ``score >=
        threshold`` at target FAR ``far`` (see :meth:`threshold`); a float and a bool for one pair,
        float64 [N] and bool [N] arrays for N pairs."""
        threshold = self.threshold(far, thresholds)  # before embedding: a missing FAR fails fast
        first, second = self.embed(a), self.embed(b)
        if first.shape != second.shape:
            raise ValueError(f"verify: {len(first)} inputs in a but {len(second)} in b; expected as many")
        scores = np.einsum("nd,nd->n", first, second, dtype=np.float64)
        accepted = scores >= threshold
        if len(scores) == 1:
            return float(scores[0]), bool(accepted[0])
        return scores, accepted

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        """Preprocessed float32 inputs -> raw embeddings [N, D]."""
        raise NotImplementedError

    def forward_quality(self, inputs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Preprocessed float32 inputs -> (raw embeddings [N, D], quality head output [N])."""
        raise ValueError(f"model {self.source} has no quality head")


class TorchEmbedder(Embedder):
    """A PyTorch module (eager backbone or TorchScript) and its preprocessing.

    Quality: ``quality_head`` (eager: applied to the raw embedding), or a TorchScript export whose
    module returns ``(embedding, quality)`` (its metadata has ``quality``)."""

    def __init__(self, backbone: Any, spec: Dict[str, Any], device: Optional[str] = None,
                 metadata: Optional[Dict[str, Any]] = None, quality_head: Any = None,
                 source: Optional[PathLike] = None) -> None:
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone = backbone.to(self.device).eval()
        self.quality_head = None if quality_head is None else quality_head.to(self.device).float().eval()
        self.spec = dict(spec)
        self.metadata = dict(metadata or {"input_spec": self.spec})
        size = getattr(backbone, "embedding_size", 0) or self.metadata.get("embedding_size", 0)
        self.embedding_size = int(size)
        if source is not None:
            self.source = str(source)

    @property
    def has_quality(self) -> bool:
        return self.quality_head is not None or isinstance(self.metadata.get("quality"), dict)

    def _run(self, inputs: np.ndarray) -> Tuple[Any, Any]:
        """(raw embeddings, the module's quality output or None), as float32 tensors."""
        import torch

        out = self.backbone(torch.from_numpy(inputs).to(self.device))
        if isinstance(out, (tuple, list)):  # a TorchScript export with the quality output
            return out[0].float(), out[1].float()
        return out.float(), None

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return self._run(inputs)[0].cpu().numpy()

    def forward_quality(self, inputs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        import torch

        with torch.inference_mode():
            raw, quality = self._run(inputs)
            if quality is None:
                if self.quality_head is None:
                    return super().forward_quality(inputs)
                quality = self.quality_head(raw)
            return raw.cpu().numpy(), quality.float().reshape(-1).cpu().numpy()


class OnnxEmbedder(Embedder):
    """An exported ONNX model; preprocessing read from its ``metadata_props`` (JSON values)."""

    def __init__(self, path: PathLike, providers: Optional[list] = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if providers is None:
            available = ort.get_available_providers()
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), providers=providers)
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types for a bad file
            raise ValueError(f"{self.path}: not a readable ONNX model ({_first_line(exc)}); "
                             "export one with `mlearn export --format onnx`") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k: _json_or_str(v) for k, v in meta.items()}
        self.spec = check_input_spec(self.metadata.get("input_spec", DEFAULT_IMAGE_SPEC), self.path)
        node = self.session.get_inputs()[0]
        self.input_name = node.name
        self.input_dtype = np.float16 if node.type == "tensor(float16)" else np.float32
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = outputs[0]
        self.quality_name = QUALITY_OUTPUT if QUALITY_OUTPUT in outputs[1:] else None
        self.source = str(self.path)
        size = self.metadata.get("embedding_size", 0) or self.session.get_outputs()[0].shape[-1]
        self.embedding_size = int(size) if isinstance(size, (int, str)) and str(size).isdigit() else 0

    @property
    def has_quality(self) -> bool:
        return self.quality_name is not None

    def forward(self, inputs: np.ndarray) -> np.ndarray:
        feed = {self.input_name: inputs.astype(self.input_dtype, copy=False)}
        return self.session.run([self.output_name], feed)[0]

    def forward_quality(self, inputs: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        if self.quality_name is None:
            return super().forward_quality(inputs)
        feed = {self.input_name: inputs.astype(self.input_dtype, copy=False)}
        raw, quality = self.session.run([self.output_name, self.quality_name], feed)
        return raw, np.asarray(quality, np.float32).reshape(-1)


# ------------------------------------------------------------------------------------------ loading


def load_model(path: PathLike, device: Optional[str] = None, *, unsafe: bool = False,
               allow_any_class: bool = False) -> Embedder:
    """Load a model as an object with ``.embed(batch)`` (see :meth:`Embedder.embed`).

    ``path``: a run dir or ``.ckpt`` (training checkpoint), a model directory written by ``mlearn import``
    (``backbone.safetensors`` inside), ``.onnx``, TorchScript ``.pt``/``.pth``
    (exported by ``mlearn export --format torchscript``) or ``.safetensors`` (exported by ``mlearn
    export --format safetensors``; the backbone is rebuilt from the recorded spec). ``device``: torch
    device for the PyTorch formats (default: CUDA when available); ONNX uses CUDA when onnxruntime has it.

    Trust (docs/security.md): ``unsafe=True`` loads checkpoints that need a full pickle (code named by
    the file may run); ``allow_any_class=True`` lets a recorded ``class_path`` import any class, not
    only registered mlearn backbones. Both only for files you trust. TorchScript files are programs:
    load them only from trusted sources.
    """
    path = Path(path)
    if (path / MODEL_DIR_WEIGHTS).is_file():
        path = path / MODEL_DIR_WEIGHTS
    suffix = path.suffix.lower()
    if (suffix in (".onnx", ".safetensors") or suffix in TORCHSCRIPT_SUFFIXES) and not path.is_file():
        raise FileNotFoundError(f"model not found: {path}")
    if suffix == ".onnx":
        return OnnxEmbedder(path)
    if suffix == ".safetensors":
        backbone, metadata, head = load_safetensors(path, allow_any_class=allow_any_class)
        return TorchEmbedder(backbone, metadata["input_spec"], device=device, metadata=metadata,
                             quality_head=head, source=path)
    if suffix in TORCHSCRIPT_SUFFIXES:
        module, metadata = load_torchscript(path, device=device)
        spec = check_input_spec(metadata.get("input_spec", DEFAULT_IMAGE_SPEC), path)
        return TorchEmbedder(module, spec, device=device, metadata=metadata, source=path)
    backbone, spec, info = load_backbone(path, unsafe=unsafe, allow_any_class=allow_any_class)
    metadata = {"input_spec": spec, "embedding_size": int(backbone.embedding_size),
                "backbone": info["backbone"], "config_hash": info["config_hash"]}
    if info.get("quality"):
        metadata["quality"] = info["quality"]
    return TorchEmbedder(backbone, spec, device=device, metadata=metadata,
                         quality_head=info.get("quality_head"), source=path)


def load_torchscript(path: PathLike, device: Optional[str] = None) -> Tuple[Any, Dict[str, Any]]:
    """A TorchScript file and the metadata dict stored in its ``mlearn.json`` extra file ({} if absent).

    A TorchScript file is a program (its code runs when called): load only files you trust. The
    metadata is plain JSON and never names anything that gets imported.
    """
    import torch

    extra = {TORCHSCRIPT_METADATA_FILE: ""}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated upstream, still supported
        try:
            module = torch.jit.load(str(path), map_location=device or "cpu", _extra_files=extra)
        except Exception as exc:  # noqa: BLE001 - RuntimeError for most damage, others for some
            raise ValueError(f"{path}: not a TorchScript file ({_first_line(exc)}); "
                             "export one with `mlearn export --format torchscript`") from None
    raw = extra[TORCHSCRIPT_METADATA_FILE]
    try:
        metadata = json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw else {}
    except ValueError:
        raise ValueError(f"{path}: its {TORCHSCRIPT_METADATA_FILE} metadata is not JSON") from None
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: its {TORCHSCRIPT_METADATA_FILE} metadata is not a JSON object")
    return module.eval(), metadata


def read_safetensors_metadata(path: PathLike) -> Dict[str, Any]:
    """The ``__metadata__`` of a safetensors file, each (string) value JSON-decoded where possible."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as exc:  # noqa: BLE001 - SafetensorError and OSError for a damaged header
        raise ValueError(f"{path}: not a readable safetensors file ({_first_line(exc)}); "
                         "export one with `mlearn export --format safetensors`") from None
    return {k: _json_or_str(v) for k, v in raw.items()}


def load_safetensors(path: PathLike, *, allow_any_class: bool = False) -> Tuple[Any, Dict[str, Any], Any]:
    """Rebuild the backbone recorded in a safetensors file's metadata and load its weights (as float32).

    The recorded ``class_path`` must be a registered mlearn backbone unless ``allow_any_class``
    (see :func:`mlearn.trust.resolve_backbone_spec`); nothing named by the file is imported. Returns
    ``(backbone, metadata, quality head or None)``: weights named ``quality_head.*`` rebuild the quality
    head (and ``metadata["quality"]`` then says so).
    """
    from safetensors.torch import load_file

    metadata = read_safetensors_metadata(path)
    spec = metadata.get("backbone")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{path}: no backbone class_path in the safetensors metadata "
                         "(export it with `mlearn export --format safetensors`)")
    backbone = instantiate(spec, allow_any_class=allow_any_class, source=str(path))
    try:
        state = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated tensor section
        raise ValueError(f"{path}: cannot read the weights ({_first_line(exc)})") from None
    state, head_state = split_quality_state(state)
    _load_weights(backbone, state, path)  # copy_ casts fp16 weights into the fp32 module
    backbone.eval()
    head = build_quality_head(head_state, path) if head_state else None
    if head is not None:
        metadata["quality"] = quality_metadata(metadata.get("quality"))
    metadata["input_spec"] = check_input_spec(
        metadata.get("input_spec", dict(getattr(backbone, "input_spec", DEFAULT_IMAGE_SPEC))), path)
    return backbone, metadata, head


def resolve_checkpoint(path: PathLike, *, unsafe: bool = False) -> Path:
    """A run dir -> its ``checkpoints/last.ckpt``, else its newest checkpoint by the recorded
    (epoch, global_step) (never by name: ``epoch=10`` is newer than ``epoch=9``); a model directory ->
    its ``backbone.safetensors``; a file -> itself."""
    path = Path(path)
    if (path / MODEL_DIR_WEIGHTS).is_file():
        return path / MODEL_DIR_WEIGHTS
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        found = sorted((path / "checkpoints").glob("*.ckpt"))
        if found:
            return order_checkpoints(list(found), unsafe=unsafe)[-1]
        raise FileNotFoundError(f"no checkpoint in run dir {path} (expected {path}/checkpoints/last.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path} "
                                "(expected a run dir, .ckpt, .onnx, .pt or .safetensors)")
    return path


def load_backbone(path: PathLike, *, unsafe: bool = False,
                  allow_any_class: bool = False) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
    """Rebuild the backbone of a run dir / checkpoint / model directory / ``.safetensors`` export with
    its trained weights.

    Returns ``(backbone in eval mode, input_spec, info)`` where ``info`` has ``backbone`` (the
    class_path/init_args spec), ``checkpoint`` path, ``config_hash``, and for a model trained with a
    quality head ``quality_head`` (the module, float32, eval) and ``quality`` (the metadata record:
    ``{"method", "output"}``); both None otherwise. The checkpoint loads with
    :func:`mlearn.trust.load_checkpoint` (``unsafe``) and the backbone through the registered
    backbones (``allow_any_class``).
    """
    ckpt_path = resolve_checkpoint(path, unsafe=unsafe)
    if ckpt_path.suffix.lower() == ".safetensors":
        backbone, metadata, head = load_safetensors(ckpt_path, allow_any_class=allow_any_class)
        config_hash = str(metadata.get("config_hash") or hashlib.sha256(
            json.dumps(metadata["backbone"], sort_keys=True).encode()).hexdigest()[:16])
        info = {"backbone": metadata["backbone"], "checkpoint": str(ckpt_path), "config_hash": config_hash,
                "quality_head": head, "quality": metadata.get("quality") if head is not None else None}
        return backbone, metadata["input_spec"], info
    checkpoint = load_checkpoint(ckpt_path, unsafe=unsafe)
    spec = _backbone_spec(checkpoint, ckpt_path)
    backbone = instantiate(spec, allow_any_class=allow_any_class, source=str(ckpt_path))
    state_dict = checkpoint.get("state_dict")
    if not isinstance(state_dict, dict):
        raise ValueError(f"{ckpt_path}: no state_dict in the checkpoint "
                         "(expected one written by `mlearn train`)")
    state = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
    _load_weights(backbone, state, ckpt_path)
    backbone.eval()
    _, head_state = split_quality_state(state_dict)
    head = build_quality_head(head_state, ckpt_path) if head_state else None
    hparams = checkpoint.get("hyper_parameters", {})
    input_spec = check_input_spec(dict(getattr(backbone, "input_spec", DEFAULT_IMAGE_SPEC)), ckpt_path)
    config_hash = hashlib.sha256(json.dumps(hparams, sort_keys=True, default=str).encode()).hexdigest()[:16]
    info = {"backbone": spec, "checkpoint": str(ckpt_path), "config_hash": config_hash, "quality_head": head,
            "quality": quality_metadata(hparams.get("quality") if isinstance(hparams, dict) else None)
            if head is not None else None}
    return backbone, input_spec, info


def split_quality_state(state: Dict[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """``state`` -> (the entries not named ``quality_head.*``, the quality head's entries unprefixed)."""
    rest = {k: v for k, v in state.items() if not k.startswith(QUALITY_PREFIX)}
    head = {k[len(QUALITY_PREFIX):]: v for k, v in state.items() if k.startswith(QUALITY_PREFIX)}
    return rest, head


def build_quality_head(state: Dict[str, Any], source: PathLike) -> Any:
    """A float32 :class:`mlearn.quality.QualityHead` of ``state`` (``fc.weight`` [1, D], ``fc.bias`` [1],
    ``norm_weight`` [1]; heads saved before ``norm_weight`` existed load with it at 0, their function)."""
    import torch

    from mlearn.quality import QualityHead

    weight = state.get("fc.weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] != 1:
        shape = None if weight is None else tuple(weight.shape)
        raise ValueError(f"{source}: {QUALITY_PREFIX}fc.weight has shape {shape}; "
                         "expected [1, embedding size]")
    head = QualityHead(int(weight.shape[1]))
    state = {"norm_weight": torch.zeros(1), **state}
    try:
        head.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as exc:
        raise ValueError(f"{source}: quality head weights do not fit ({_first_line(exc)})") from None
    return head.eval()


def quality_metadata(config: Any) -> Dict[str, Any]:
    """The ``quality`` metadata record ``{"method", "output"}`` of a ``model.quality`` setting (a dict,
    ``{class_path, init_args}``, a QualityConfig or a record read back from an export)."""
    if isinstance(config, dict):
        nested = config.get("init_args")
        method = (nested if isinstance(nested, dict) else config).get("method")
    else:
        method = getattr(config, "method", None)
    return {"method": str(method or "cr_fiqa"), "output": QUALITY_OUTPUT}


def _backbone_spec(checkpoint: Dict[str, Any], ckpt_path: Path) -> Dict[str, Any]:
    hparams = checkpoint.get("hyper_parameters", {})
    spec = hparams.get("backbone") if isinstance(hparams, dict) else None
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{ckpt_path}: no backbone class_path in the checkpoint's hyper_parameters "
                         "(train with `mlearn train` so the config is stored)")
    return spec


def _load_weights(backbone: Any, state: Dict[str, Any], source: PathLike) -> None:
    """``backbone.load_state_dict(state)`` with a one-line error naming ``source`` on a mismatch."""
    try:
        backbone.load_state_dict(state)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = " ".join(lines[1:3]) if len(lines) > 1 else (lines[0] if lines else "")
        raise ValueError(f"{source}: weights do not fit the recorded backbone ({detail[:300]})") from None


def instantiate(spec: Dict[str, Any], *, allow_any_class: bool = False, source: str = "backbone spec") -> Any:
    """Build ``{class_path, init_args}`` read from a file: registered mlearn backbones only (nested
    specs included) unless ``allow_any_class`` (see :func:`mlearn.trust.resolve_backbone_spec`).

    ``pretrained_path`` is dropped: the weights come from the file, and the path may not exist here.
    """
    init_args = spec.get("init_args") if isinstance(spec, dict) else None
    if isinstance(init_args, dict) and init_args.get("pretrained_path") is not None:
        spec = dict(spec, init_args=dict(init_args, pretrained_path=None))
    return resolve_backbone_spec(spec, allow_any_class=allow_any_class, source=source)


def check_input_spec(spec: Any, source: PathLike) -> Dict[str, Any]:
    """Validate a recorded input spec (preprocessing) read from ``source``; returns it as a dict."""
    def fail(what: str) -> ValueError:
        return ValueError(f"{source}: input_spec {what}; got {str(spec)[:120]}")

    if not isinstance(spec, dict):
        raise fail("is not a mapping")
    modality = spec.get("modality", "image")
    if modality == "audio":
        bins = spec.get("num_mel_bins")
        if not _positive_int(bins):
            raise fail("num_mel_bins: expected a positive integer")
        return dict(spec)
    if modality != "image":
        raise fail(f"modality '{modality}': expected 'image' or 'audio'")
    size = spec.get("input_size")
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(_positive_int(v) for v in size)):
        raise fail("input_size: expected [height, width], positive integers")
    for key in ("mean", "std"):
        values = spec.get(key)
        if not (isinstance(values, (list, tuple)) and len(values) == 3 and all(_number(v) for v in values)):
            raise fail(f"{key}: expected three numbers")
    if any(float(v) == 0 for v in spec["std"]):
        raise fail("std: expected non-zero values")
    if spec.get("channels", "RGB") not in ("RGB", "BGR"):
        raise fail("channels: expected 'RGB' or 'BGR'")
    return dict(spec)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(exc).__name__


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except (TypeError, ValueError):
        return value
