"""Face backbones for aligned 112x112 crops: IResNet and MobileFaceNet (insightface arcface_torch layouts).

Input: RGB float [B, 3, H, W] normalised as ``(x - 127.5) / 127.5``; output: raw embeddings [B, D].
IResNet also covers AdaFace's IR nets (``identity_first_shortcut=True, affine_features=False``).
"""
from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mlearn.input_spec import DEFAULT_IMAGE_SPEC, image_spec
from mlearn.models.backbone import register_backbone, register_variant


def _conv_out(size: int, stride: int) -> int:
    """Output size of a 3x3 convolution with padding 1."""
    return (size - 1) // stride + 1


# ----------------------------------------------------------------------------------------- IResNet


class IBasicBlock(nn.Module):
    """BN - conv3x3 - BN - PReLU - conv3x3(stride) - BN, plus the shortcut.

    The shortcut is a 1x1 conv + BN when the stride or width changes; with ``pool_shortcut`` a block
    that keeps its width uses the parameter-free strided identity ``MaxPool2d(1, stride)`` instead
    (AdaFace's rule; insightface projects whenever ``stride != 1``).
    """

    def __init__(self, inplanes: int, planes: int, stride: int = 1, pool_shortcut: bool = False) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(inplanes, eps=1e-5),
            nn.Conv2d(inplanes, planes, 3, 1, 1, bias=False),
            nn.BatchNorm2d(planes, eps=1e-5),
            nn.PReLU(planes),
            nn.Conv2d(planes, planes, 3, stride, 1, bias=False),
            nn.BatchNorm2d(planes, eps=1e-5),
        )
        self.downsample: Optional[nn.Module] = None
        if pool_shortcut and inplanes == planes and stride != 1:
            self.downsample = nn.MaxPool2d(1, stride)
        elif stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.body(x) + shortcut


@register_backbone("iresnet")
class IResNet(nn.Module):
    """Improved ResNet of ArcFace (insightface ``iresnet``): [B, 3, H, W] -> raw embeddings [B, D].

    Stem conv3x3 (stride ``stem_stride``; insightface uses 1) + BN + PReLU, then one stage of
    IBasicBlocks per entry of ``layers`` with widths ``width * 2**i``, each stage starting with stride 2;
    neck BN2d - Dropout - Flatten - Linear - BatchNorm1d. As in insightface, the last BatchNorm1d's
    scale is frozen at 1 (``features.weight.requires_grad = False``); ``affine_features=False`` drops
    its scale and shift altogether (AdaFace). ``identity_first_shortcut`` makes the first block's
    shortcut (same width, stride 2) a parameter-free strided identity (AdaFace) instead of a 1x1 conv +
    BN (insightface). ``input_size`` (square side)
    sizes the Linear: 112 -> 7x7 after four stages. ``gradient_checkpointing`` recomputes each stage
    in the backward pass (training only) to save activation memory. Input: (x - 127.5) / 127.5, RGB.
    Weights of insightface checkpoints load through :func:`convert_insightface_iresnet`;
    ``mlearn import insightface|adaface`` converts whole checkpoints (mlearn/models/importers/).
    """

    input_spec = DEFAULT_IMAGE_SPEC

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 14, 3),
        width: int = 64,
        embedding_size: int = 512,
        dropout: float = 0.0,
        input_size: int = 112,
        stem_stride: int = 1,
        gradient_checkpointing: bool = False,
        identity_first_shortcut: bool = False,
        affine_features: bool = True,
    ) -> None:
        super().__init__()
        if not layers or any(n < 1 for n in layers):
            raise ValueError(f"layers={list(layers)}: expected a non-empty list of positive block counts")
        if width < 1 or embedding_size < 1:
            raise ValueError(f"width={width}, embedding_size={embedding_size}: expected positive integers")
        self.embedding_size = int(embedding_size)
        self.gradient_checkpointing = gradient_checkpointing
        self.input_spec = image_spec(input_size)
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, stem_stride, 1, bias=False),
                                  nn.BatchNorm2d(width, eps=1e-5), nn.PReLU(width))
        stages: List[nn.Module] = []
        inplanes, spatial = width, _conv_out(input_size, stem_stride)
        for i, blocks in enumerate(layers):
            planes = width * 2 ** i
            stage = [IBasicBlock(inplanes, planes, stride=2, pool_shortcut=identity_first_shortcut)]
            stage += [IBasicBlock(planes, planes) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*stage))
            inplanes, spatial = planes, _conv_out(spatial, 2)
        self.stages = nn.Sequential(*stages)
        self.neck = nn.Sequential(nn.BatchNorm2d(inplanes, eps=1e-5), nn.Dropout(dropout), nn.Flatten(),
                                  nn.Linear(inplanes * spatial * spatial, embedding_size))
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5, affine=affine_features)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1)
                nn.init.constant_(module.bias, 0)
        if affine_features:
            nn.init.constant_(self.features.weight, 1.0)
            self.features.weight.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, input_size, input_size] -> [B, embedding_size]."""
        x = self.stem(x)
        for stage in self.stages:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(stage, x, use_reentrant=False)
            else:
                x = stage(x)
        return self.features(self.neck(x))


IRESNET_LAYERS: Dict[str, Sequence[int]] = {
    "iresnet18": (2, 2, 2, 2), "iresnet34": (3, 4, 6, 3), "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3), "iresnet200": (6, 26, 60, 6),
}
iresnet18 = register_variant(IResNet, "iresnet18", layers=IRESNET_LAYERS["iresnet18"])
iresnet34 = register_variant(IResNet, "iresnet34", layers=IRESNET_LAYERS["iresnet34"])
iresnet50 = register_variant(IResNet, "iresnet50", layers=IRESNET_LAYERS["iresnet50"])
iresnet100 = register_variant(IResNet, "iresnet100", layers=IRESNET_LAYERS["iresnet100"])
iresnet200 = register_variant(IResNet, "iresnet200", layers=IRESNET_LAYERS["iresnet200"])

# insightface module prefix -> ours, outside the residual stages
_INSIGHTFACE_IRESNET_PREFIXES = {"conv1.": "stem.0.", "bn1.": "stem.1.", "prelu.": "stem.2.",
                                 "bn2.": "neck.0.", "fc.": "neck.3.", "features.": "features."}
_BLOCK_BODY_INDEX = {"bn1": 0, "conv1": 1, "bn2": 2, "prelu": 3, "conv2": 4, "bn3": 5}


def convert_insightface_iresnet(state_dict: Mapping[str, torch.Tensor], *,
                                keep_unknown: bool = False) -> Dict[str, torch.Tensor]:
    """Rename an insightface ``iresnet`` state dict (``conv1``, ``layer1.0.bn1``, ``fc``...) to IResNet's.

    ``IResNet(layers, ...).load_state_dict(convert_insightface_iresnet(state))`` with
    ``state = torch.load("backbone.pth", weights_only=True)``.
    Raises ``KeyError`` on a name it does not know, or passes it through unchanged with ``keep_unknown``
    (for a caller that reports mismatching keys itself).
    """
    out: Dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        match = re.match(r"^layer(\d+)\.(\d+)\.(downsample|bn1|conv1|bn2|prelu|conv2|bn3)\.(.+)$", name)
        if match:
            stage, block, part, rest = int(match[1]) - 1, match[2], match[3], match[4]
            inner = f"downsample.{rest}" if part == "downsample" else f"body.{_BLOCK_BODY_INDEX[part]}.{rest}"
            out[f"stages.{stage}.{block}.{inner}"] = tensor
            continue
        prefix = next((p for p in _INSIGHTFACE_IRESNET_PREFIXES if name.startswith(p)), None)
        if prefix is None:
            if not keep_unknown:
                raise KeyError(f"insightface iresnet: unexpected parameter '{name}'")
            out[name] = tensor
            continue
        out[_INSIGHTFACE_IRESNET_PREFIXES[prefix] + name[len(prefix):]] = tensor
    return out


# ----------------------------------------------------------------------------------- MobileFaceNet
# Module names follow insightface's ``mobilefacenet.py`` so its checkpoints load as they are.


class ConvBlock(nn.Module):
    """conv(k, stride, groups) - BN (- PReLU when ``act``): [B, C_in, H, W] -> [B, C_out, H', W']."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0,
                 groups: int = 1, act: bool = True) -> None:
        super().__init__()
        layers: List[nn.Module] = [nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                   nn.BatchNorm2d(out_c)]
        if act:
            layers.append(nn.PReLU(out_c))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``hidden`` - 3x3 depthwise(stride) - 1x1 linear projection."""

    def __init__(self, in_c: int, out_c: int, hidden: int, stride: int = 2, residual: bool = False) -> None:
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            ConvBlock(hidden, out_c, act=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` residual stride-1 :class:`DepthWise` blocks at ``channels``."""

    def __init__(self, channels: int, num_block: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(channels, channels, hidden, stride=1, residual=True)
                                      for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv (kernel = whole map) - BN - Flatten - Linear - BN1d: [B, C, k, k] -> [B, D]."""

    def __init__(self, channels: int, kernel: int, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            ConvBlock(channels, channels, kernel=kernel, groups=channels, act=False),
            nn.Flatten(),
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_backbone("mobilefacenet", "mbf")
class MobileFaceNet(nn.Module):
    """MobileFaceNet as insightface's ``mbf``: [B, 3, H, W] -> raw embeddings [B, embedding_size].

    Stem conv3x3/2, then inverted-bottleneck stages at ``base_width * scale`` and ``2 * base_width *
    scale`` channels with ``blocks`` residual blocks each (three stride-2 bottlenecks in between),
    1x1 conv to ``8 * base_width``, GDC head. Bottleneck expansions are fixed multiples of
    ``base_width`` (2x, 4x, 8x), as in insightface, which does not scale them with ``scale``.
    Defaults give ``mbf`` (2.0M parameters); ``blocks=(2, 8, 12, 4), scale=4`` gives ``mbf_large``.
    ``base_width`` (64) shrinks the whole net for tests and CPU runs. ``input_size`` must be divisible
    by 16 (112 -> 7x7 GDC kernel).
    """

    input_spec = DEFAULT_IMAGE_SPEC

    def __init__(
        self,
        embedding_size: int = 512,
        blocks: Sequence[int] = (1, 4, 6, 2),
        scale: int = 2,
        base_width: int = 64,
        input_size: int = 112,
    ) -> None:
        super().__init__()
        if len(blocks) != 4 or any(n < 1 for n in blocks):
            raise ValueError(f"blocks={list(blocks)}: expected four positive block counts")
        if input_size % 16:
            raise ValueError(f"input_size={input_size}: must be divisible by 16")
        self.embedding_size = int(embedding_size)
        self.input_spec = image_spec(input_size)
        b, c1, c2 = base_width, base_width * scale, 2 * base_width * scale
        first: nn.Module = (ConvBlock(c1, c1, kernel=3, padding=1, groups=b) if blocks[0] == 1
                            else Residual(c1, blocks[0], hidden=2 * b))
        self.layers = nn.ModuleList([
            ConvBlock(3, c1, kernel=3, stride=2, padding=1),
            first,
            DepthWise(c1, c1, hidden=2 * b),
            Residual(c1, blocks[1], hidden=2 * b),
            DepthWise(c1, c2, hidden=4 * b),
            Residual(c2, blocks[2], hidden=4 * b),
            DepthWise(c2, c2, hidden=8 * b),
            Residual(c2, blocks[3], hidden=4 * b),
        ])
        self.conv_sep = ConvBlock(c2, 8 * b)
        self.features = GDC(8 * b, input_size // 16, embedding_size)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, 3, input_size, input_size] -> [B, embedding_size]."""
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


mobilefacenet_large = register_variant(
    MobileFaceNet, "mobilefacenet_large", "mbf_large", blocks=(2, 8, 12, 4), scale=4)
