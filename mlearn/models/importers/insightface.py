"""insightface ``arcface_torch`` checkpoints (``model.pt``) -> mlearn face backbones.

Archs (arcface_torch's ``network`` names): ``r18``, ``r34``, ``r50``, ``r100``, ``r200`` ->
:class:`~mlearn.models.face.IResNet` (insightface module names renamed by
:func:`~mlearn.models.face.convert_insightface_iresnet`); ``mbf`` ->
:class:`~mlearn.models.face.MobileFaceNet`, which already uses insightface's module names.

The published ``model.pt`` is a plain float32 state dict without prefix, also for models trained
with ``fp16`` (autocast only). A training checkpoint (``checkpoint_gpu_*.pt``) is accepted too: its
``state_dict_backbone`` is used. The ``features`` BatchNorm1d after ``fc`` keeps its scale frozen at 1
but its shift and running statistics are real and loaded. Embedding size 512 (arcface_torch's
``embedding_size``). Preprocessing: RGB, 112x112, ``(x - 127.5) / 127.5``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from mlearn.input_spec import image_spec
from mlearn.models.face import IRESNET_LAYERS, convert_insightface_iresnet
from mlearn.models.importers.base import Conversion, Importer, load_tensors, register_importer

IRESNET = "mlearn.models.face.IResNet"
MOBILEFACENET = "mlearn.models.face.MobileFaceNet"
EMBEDDING_SIZE = 512
INPUT_SIZE = 112

# arcface_torch arch -> (mlearn backbone, the arguments the arch fixes)
ARCHS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    **{f"r{depth}": (IRESNET, {"layers": list(IRESNET_LAYERS[f"iresnet{depth}"])})
       for depth in (18, 34, 50, 100, 200)},
    "mbf": (MOBILEFACENET, {"blocks": [1, 4, 6, 2], "scale": 2}),
}
TRAINING_CHECKPOINT_KEY = "state_dict_backbone"  # arcface_torch's resumable checkpoint_gpu_N.pt


@register_importer("insightface")
class InsightFaceImporter(Importer):
    """insightface arcface_torch IResNet (r18 ... r200) and MobileFaceNet (mbf) backbones."""

    archs = tuple(ARCHS)

    def read_checkpoint(self, path: Path) -> Dict[str, torch.Tensor]:
        state: Dict[str, Any] = load_tensors(path)
        if isinstance(state.get(TRAINING_CHECKPOINT_KEY), dict):
            state = state[TRAINING_CHECKPOINT_KEY]
        if state and all(isinstance(k, str) and k.startswith("module.") for k in state):  # saved from DDP
            state = {k[len("module."):]: v for k, v in state.items()}
        bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise ValueError(f"{path}: '{bad}' is not a tensor; expected an arcface_torch state dict "
                             "(model.pt: parameter name -> tensor)")
        is_iresnet = "conv1.weight" in state and any(k.startswith("layer1.") for k in state)
        is_mbf = "conv_sep.layers.0.weight" in state and any(k.startswith("layers.0.") for k in state)
        if not (is_iresnet or is_mbf):
            raise ValueError(f"{path}: not an insightface arcface_torch iresnet / mobilefacenet checkpoint "
                             "(expected 'conv1.weight' and 'layer1.*', or 'layers.*' and 'conv_sep.*' keys)")
        return dict(state)

    def conversion(self, arch: str, config: Optional[Path]) -> Conversion:
        class_path, fixed = ARCHS[arch]
        init_args = {**fixed, "embedding_size": EMBEDDING_SIZE, "input_size": INPUT_SIZE}
        return Conversion({"class_path": class_path, "init_args": init_args}, image_spec(INPUT_SIZE))

    def convert_state(self, state: Dict[str, torch.Tensor], arch: str,
                      conversion: Conversion) -> Dict[str, torch.Tensor]:
        state = {k: _plain(k, v) for k, v in state.items()}
        if conversion.backbone["class_path"] == MOBILEFACENET:
            return state  # same module names
        return convert_insightface_iresnet(state, keep_unknown=True)


def _plain(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """fp32 parameters and integer BatchNorm counters, whatever precision the file was saved in."""
    if name.endswith("num_batches_tracked"):
        return tensor.long()
    return tensor.float() if tensor.is_floating_point() else tensor
