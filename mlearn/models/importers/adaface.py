"""AdaFace checkpoints (``adaface_ir*.ckpt``, mk-minchul/AdaFace) -> :class:`~mlearn.models.face.IResNet`.

Archs (AdaFace's ``build_model`` names): ``ir_18``, ``ir_34``, ``ir_50``, ``ir_101`` (stage depths
as insightface's r18/r34/r50/r100). The published ``.ckpt`` is a Lightning checkpoint holding only
``state_dict``: the backbone is under ``model.``; ``head.kernel`` and the head's buffers are dropped.
A plain backbone state dict (``input_layer.*``, ``body.*``, ``output_layer.*``) is accepted too.

AdaFace's IR net differs from insightface's IResNet in four places, all covered by IResNet options
or by the renaming here: the first block's shortcut is a parameter-free strided identity
(``identity_first_shortcut``); the final BatchNorm1d has no affine parameters (``affine_features``);
the blocks are numbered continuously across stages (``body.0`` ... ``body.N``, renamed to
``stages.S.B``); its ``forward`` returns ``(embedding / norm, norm)`` -- mlearn keeps the raw
embedding, whose L2-normalisation is the same first element.

AdaFace feeds **BGR** images normalised as ``(x / 255 - 0.5) / 0.5`` = ``(x - 127.5) / 127.5``.
The channel flip is folded into the stem convolution (its input-channel axis is reversed), so the
imported model takes RGB like every mlearn model; the recorded input spec says ``channels: RGB``.
"""
from __future__ import annotations

import re
from itertools import accumulate
from pathlib import Path
from typing import Dict, List, Optional

import torch

from mlearn.input_spec import image_spec
from mlearn.models.face import IRESNET_LAYERS
from mlearn.models.importers.base import Conversion, Importer, load_tensors, register_importer

IRESNET = "mlearn.models.face.IResNet"
EMBEDDING_SIZE = 512
INPUT_SIZE = 112
DROPOUT = 0.4  # AdaFace's output_layer Dropout (training only; kept so that fine-tuning matches)
ARCHS: Dict[str, List[int]] = {
    "ir_18": list(IRESNET_LAYERS["iresnet18"]), "ir_34": list(IRESNET_LAYERS["iresnet34"]),
    "ir_50": list(IRESNET_LAYERS["iresnet50"]), "ir_101": list(IRESNET_LAYERS["iresnet100"]),
}
MODEL_PREFIX = "model."
STEM_CONV = "input_layer.0.weight"
# AdaFace module prefix -> IResNet's, outside the residual blocks
_PREFIXES = {"input_layer.": "stem.", "output_layer.0.": "neck.0.", "output_layer.3.": "neck.3.",
             "output_layer.4.": "features."}
_BLOCK = re.compile(r"^body\.(\d+)\.(res_layer|shortcut_layer)\.(.+)$")


@register_importer("adaface")
class AdaFaceImporter(Importer):
    """AdaFace IR-18/34/50/101 backbones (Lightning ``.ckpt``)."""

    archs = tuple(ARCHS)

    def read_checkpoint(self, path: Path) -> Dict[str, torch.Tensor]:
        state = load_tensors(path)
        if any(isinstance(k, str) and k.startswith(MODEL_PREFIX) for k in state):  # drops the head.* keys
            state = {k[len(MODEL_PREFIX):]: v for k, v in state.items()
                     if isinstance(k, str) and k.startswith(MODEL_PREFIX)}
        bad = next((k for k, v in state.items() if not isinstance(v, torch.Tensor)), None)
        if bad is not None:
            raise ValueError(f"{path}: '{bad}' is not a tensor; expected an AdaFace Lightning checkpoint "
                             "('state_dict' of 'model.*' tensors)")
        if STEM_CONV not in state or not any(k.startswith("body.") for k in state):
            raise ValueError(f"{path}: not an AdaFace IR checkpoint (expected 'model.input_layer.0.weight' "
                             "and 'model.body.*' keys in its state_dict)")
        return dict(state)

    def conversion(self, arch: str, config: Optional[Path]) -> Conversion:
        init_args = {"layers": ARCHS[arch], "embedding_size": EMBEDDING_SIZE, "input_size": INPUT_SIZE,
                     "dropout": DROPOUT, "identity_first_shortcut": True, "affine_features": False}
        return Conversion({"class_path": IRESNET, "init_args": init_args}, image_spec(INPUT_SIZE))

    def convert_state(self, state: Dict[str, torch.Tensor], arch: str,
                      conversion: Conversion) -> Dict[str, torch.Tensor]:
        starts = [0, *accumulate(ARCHS[arch])]  # body index where each stage starts
        out: Dict[str, torch.Tensor] = {}
        for name, tensor in state.items():
            if name.endswith("num_batches_tracked"):
                tensor = tensor.long()
            elif tensor.is_floating_point():
                tensor = tensor.float()
            if name == STEM_CONV and tensor.dim() == 4 and tensor.shape[1] == 3:
                tensor = tensor.flip(1)  # BGR -> RGB input: fold the channel flip into the stem
            out[_rename(name, starts)] = tensor
        return out


def _rename(name: str, starts: List[int]) -> str:
    """AdaFace name -> IResNet name; a name it does not know (or a block past the arch) is kept."""
    match = _BLOCK.match(name)
    if match:
        index = int(match[1])
        stage = next((s for s in range(len(starts) - 1) if starts[s] <= index < starts[s + 1]), None)
        if stage is None:
            return name
        part = "body" if match[2] == "res_layer" else "downsample"
        return f"stages.{stage}.{index - starts[stage]}.{part}.{match[3]}"
    prefix = next((p for p in _PREFIXES if name.startswith(p)), None)
    return name if prefix is None else _PREFIXES[prefix] + name[len(prefix):]
