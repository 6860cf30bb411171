"""Load a trained embedding model (run dir, Lightning checkpoint or exported ONNX) for inference.

Imports neither Lightning nor the training code: an ONNX model needs only onnxruntime and numpy.
"""
from __future__ import annotations

import hashlib
import importlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

PathLike = Union[str, Path]
CHECKPOINT_NAMES = ("last.ckpt",)

DEFAULT_IMAGE_SPEC: Dict[str, Any] = {
    "modality": "image", "input_size": [112, 112], "channels": "RGB",
    "mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5],
}


def preprocess_images(images: Any, spec: Dict[str, Any]) -> np.ndarray:
    """uint8 [N, H, W, 3] RGB (numpy or tensor) -> float32 [N, 3, h, w] normalised as ``spec`` says."""
    array = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if array.ndim == 3:
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3:
        raise ValueError(f"images: expected uint8 [N, H, W, 3] RGB, got shape {tuple(array.shape)}")
    height, width = spec["input_size"]
    if array.shape[1:3] != (height, width):
        from PIL import Image

        array = np.stack([np.asarray(Image.fromarray(np.asarray(a, np.uint8)).resize((width, height), Image.BILINEAR))
                          for a in array])
    if spec.get("channels", "RGB") == "BGR":
        array = array[..., ::-1]
    mean = np.asarray(spec["mean"], np.float32)
    std = np.asarray(spec["std"], np.float32)
    out = (array.astype(np.float32) - mean) / std
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)


class TorchEmbedder:
    """A PyTorch backbone plus its preprocessing. ``embed(images) -> [N, D]`` float32."""

    def __init__(self, backbone: Any, spec: Dict[str, Any], device: Optional[str] = None) -> None:
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone = backbone.to(self.device).eval()
        self.spec = spec
        self.embedding_size = int(getattr(backbone, "embedding_size", 0))

    def embed(self, images: Any, normalize: bool = True) -> np.ndarray:
        import torch

        x = torch.from_numpy(preprocess_images(images, self.spec)).to(self.device)
        with torch.inference_mode():
            out = self.backbone(x).float().cpu().numpy()
        return l2_normalize(out) if normalize else out


class OnnxEmbedder:
    """An exported ONNX model; preprocessing read from its metadata. ``embed(images) -> [N, D]``."""

    def __init__(self, path: PathLike) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
        self.session = ort.InferenceSession(str(self.path), providers=providers)
        meta = self.session.get_modelmeta().custom_metadata_map
        self.metadata = {k: json.loads(v) for k, v in meta.items()}
        self.spec = self.metadata.get("input_spec", DEFAULT_IMAGE_SPEC)
        self.embedding_size = int(self.metadata.get("embedding_size", 0))
        self.input_name = self.session.get_inputs()[0].name

    def embed(self, images: Any, normalize: bool = True) -> np.ndarray:
        x = preprocess_images(images, self.spec)
        if self.session.get_inputs()[0].type == "tensor(float16)":
            x = x.astype(np.float16)
        out = self.session.run(None, {self.input_name: x})[0].astype(np.float32)
        return l2_normalize(out) if normalize else out


def load_model(path: PathLike, device: Optional[str] = None) -> Union[TorchEmbedder, OnnxEmbedder]:
    """Load ``path`` (a run dir, a ``.ckpt`` or a ``.onnx``) as an object with ``.embed(images)``.

    ``images``: uint8 [N, H, W, 3] RGB numpy array or tensor; the model's recorded preprocessing
    (input size, mean/std) is applied. Returns L2-normalised float32 [N, D] (``normalize=False`` for raw).
    """
    path = Path(path)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise FileNotFoundError(f"model not found: {path}")
        return OnnxEmbedder(path)
    backbone, spec, _ = load_backbone(path)
    return TorchEmbedder(backbone, spec, device=device)


def resolve_checkpoint(path: PathLike) -> Path:
    """A run dir -> its ``checkpoints/last.ckpt``; a file -> itself. Clear error when missing."""
    path = Path(path)
    if path.is_dir():
        for name in CHECKPOINT_NAMES:
            candidate = path / "checkpoints" / name
            if candidate.is_file():
                return candidate
        found = sorted((path / "checkpoints").glob("*.ckpt"))
        if found:
            return found[-1]
        raise FileNotFoundError(f"no checkpoint in run dir {path} (expected {path}/checkpoints/last.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"model not found: {path} (expected a run dir, a .ckpt or a .onnx file)")
    return path


def load_backbone(path: PathLike) -> Tuple[Any, Dict[str, Any], Dict[str, Any]]:
    """Rebuild the backbone of a run dir / checkpoint with its trained weights.

    Returns ``(backbone in eval mode, input_spec, info)`` where ``info`` has ``backbone`` (the
    class_path/init_args spec), ``checkpoint`` path and ``config_hash``.
    """
    import torch

    ckpt_path = resolve_checkpoint(path)
    # Our own checkpoints hold the training config (plain Python objects), hence weights_only=False.
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    spec = _backbone_spec(checkpoint, ckpt_path)
    backbone = instantiate(spec)
    state = {k[len("backbone."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("backbone.")}
    backbone.load_state_dict(state)
    backbone.eval()
    input_spec = dict(getattr(backbone, "input_spec", DEFAULT_IMAGE_SPEC))
    config_hash = hashlib.sha256(json.dumps(checkpoint.get("hyper_parameters", {}), sort_keys=True,
                                            default=str).encode()).hexdigest()[:16]
    info = {"backbone": spec, "checkpoint": str(ckpt_path), "config_hash": config_hash}
    return backbone, input_spec, info


def _backbone_spec(checkpoint: Dict[str, Any], ckpt_path: Path) -> Dict[str, Any]:
    spec = checkpoint.get("hyper_parameters", {}).get("backbone")
    if not isinstance(spec, dict) or "class_path" not in spec:
        raise ValueError(f"{ckpt_path}: no backbone class_path in the checkpoint's hyper_parameters "
                         "(train with `mlearn train` so the config is stored)")
    return spec


def instantiate(spec: Dict[str, Any]) -> Any:
    """Build ``{class_path: pkg.mod.Class, init_args: {...}}`` (nested specs included)."""
    module_name, _, attr = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), attr)
    kwargs = {k: instantiate(v) if isinstance(v, dict) and "class_path" in v else v
              for k, v in (spec.get("init_args") or {}).items()}
    return cls(**kwargs)
