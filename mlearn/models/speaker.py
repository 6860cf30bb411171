"""Speaker backbones over log-mel filterbanks: ECAPA-TDNN and ResNets (WeSpeaker layouts).

Input: Kaldi-style fbank features [B, T, num_mel_bins] (25 ms windows, 10 ms shift, 16 kHz audio,
per-utterance mean-normalised over time); output: raw embeddings [B, embedding_size]. Module names,
structure and pooling statistics follow WeSpeaker's, so its checkpoints load after dropping their
``projection.*`` (margin head) keys (``mlearn import wespeaker``, :mod:`mlearn.models.importers.wespeaker`).

Pooling statistics (``pooling_variance``): ``"unbiased"`` (default) is WeSpeaker's: the standard
deviation over time is ``sqrt(var_{T-1} + 1e-7)`` (TSTP and ASTP's global context) and ASTP's
attentive std is ``sqrt(clamp(E_a[x^2] - E_a[x]^2, min=1e-7))``. ``"biased"`` is mlearn 0.1.0's
(population variance, eps 1e-8 / 1e-10): set it to reproduce a checkpoint trained with 0.1.0 exactly;
under the default its embeddings move by about 1e-3 (relative, more for clips of few frames).
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlearn.data.audio.fbank import fbank_spec
from mlearn.models.backbone import register_backbone, register_variant


def audio_input_spec(num_mel_bins: int = 80, **fbank_options: Any) -> Dict[str, Any]:
    """The input spec recorded at export: every Kaldi fbank option (Hamming window, not Kaldi's povey
    default; dither 0 at inference; int16-range input scale; CMN), so that consumers can rebuild the
    front-end exactly. ``fbank_options``: other :data:`~mlearn.data.audio.fbank.FBANK_DEFAULTS` keys."""
    return {"modality": "audio", **fbank_spec({**fbank_options, "num_mel_bins": num_mel_bins}),
            "layout": "[B, T, num_mel_bins]"}


_audio_spec = audio_input_spec


AUDIO_INPUT_SPEC: Dict[str, Any] = _audio_spec(80)


POOLING_VARIANCES = ("unbiased", "biased")
STD_EPS = 1e-7  # WeSpeaker's floor of the pooled variance


def _check_pooling_variance(value: str) -> str:
    if value not in POOLING_VARIANCES:
        raise ValueError(f"pooling_variance={value!r}: expected one of {list(POOLING_VARIANCES)}")
    return value


def _unbiased_var(x: torch.Tensor, keepdim: bool = False) -> torch.Tensor:
    """Sample variance over the last (time) axis, ``sum((x - mean)^2) / (T - 1)`` like ``torch.var``;
    T = 1 gives 0 instead of NaN. The frame count is a tensor so that ONNX exports keep T dynamic."""
    frames = torch.ones_like(x[..., :1, :]).sum(dim=-1, keepdim=True)  # [..., 1, 1] = T
    centred = x - x.mean(dim=-1, keepdim=True)
    var = centred.square().sum(dim=-1, keepdim=True) / (frames - 1).clamp(min=1)
    return var if keepdim else var.squeeze(-1)


def _mean_std(x: torch.Tensor, pooling_variance: str = "unbiased") -> torch.Tensor:
    """[B, C, T] -> [B, 2C]: mean and standard deviation over time (WeSpeaker's TSTP by default)."""
    if pooling_variance == "biased":
        return torch.cat([x.mean(dim=-1), torch.sqrt(x.var(dim=-1, correction=0) + 1e-8)], dim=1)
    return torch.cat([x.mean(dim=-1), torch.sqrt(_unbiased_var(x) + STD_EPS)], dim=1)


# ------------------------------------------------------------------------------------- ECAPA-TDNN


class Conv1dReluBn(nn.Module):
    """Conv1d - ReLU - BN (WeSpeaker's order): [B, C_in, T] -> [B, C_out, T]."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, padding=dilation * (kernel_size // 2),
                              dilation=dilation)
        self.bn = nn.BatchNorm1d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(F.relu(self.conv(x)))


class Res2Conv1dReluBn(nn.Module):
    """Res2Net split into ``scale`` groups; group i (i >= 1) convolves itself plus group i-1's output.

    The last group passes through unchanged. [B, C, T] -> [B, C, T].
    """

    def __init__(self, channels: int, kernel_size: int, dilation: int, scale: int) -> None:
        super().__init__()
        if channels % scale:
            raise ValueError(f"channels={channels} must be divisible by scale={scale}")
        self.width = channels // scale
        branches = max(scale - 1, 1)
        padding = dilation * (kernel_size // 2)
        self.convs = nn.ModuleList([
            nn.Conv1d(self.width, self.width, kernel_size, padding=padding, dilation=dilation)
            for _ in range(branches)])
        self.bns = nn.ModuleList([nn.BatchNorm1d(self.width) for _ in range(branches)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        splits = torch.split(x, self.width, dim=1)
        out: List[torch.Tensor] = []
        for i, (conv, bn) in enumerate(zip(self.convs, self.bns)):
            y = splits[i] if i == 0 else splits[i] + out[-1]
            out.append(bn(F.relu(conv(y))))
        out.extend(splits[len(self.convs):])
        return torch.cat(out, dim=1)


class SEConnect(nn.Module):
    """Squeeze-excitation over channels: [B, C, T] -> [B, C, T] scaled by sigmoid(MLP(mean_t x))."""

    def __init__(self, channels: int, bottleneck: int = 128) -> None:
        super().__init__()
        self.linear1 = nn.Linear(channels, bottleneck)
        self.linear2 = nn.Linear(bottleneck, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.linear2(F.relu(self.linear1(x.mean(dim=2)))))
        return x * gate.unsqueeze(2)


class SERes2Block(nn.Module):
    """x + SE(Conv1x1(Res2(Conv1x1(x)))): [B, C, T] -> [B, C, T]."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, scale: int,
                 se_bottleneck: int) -> None:
        super().__init__()
        self.se_res2block = nn.Sequential(
            Conv1dReluBn(channels, channels),
            Res2Conv1dReluBn(channels, kernel_size, dilation, scale),
            Conv1dReluBn(channels, channels),
            SEConnect(channels, se_bottleneck),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.se_res2block(x)


class AttentiveStatsPool(nn.Module):
    """Channel- and context-dependent attentive statistics pooling: [B, C, T] -> [B, 2C] (mean, std).

    With ``global_context`` the attention also sees the utterance's mean and std at every frame
    (WeSpeaker's ASTP with ``global_context_att``).
    """

    def __init__(self, in_dim: int, bottleneck: int = 128, global_context: bool = True,
                 pooling_variance: str = "unbiased") -> None:
        super().__init__()
        self.global_context = global_context
        self.pooling_variance = _check_pooling_variance(pooling_variance)
        self.linear1 = nn.Conv1d(in_dim * 3 if global_context else in_dim, bottleneck, kernel_size=1)
        self.linear2 = nn.Conv1d(bottleneck, in_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        biased = self.pooling_variance == "biased"
        context = x
        if self.global_context:
            mean = x.mean(dim=-1, keepdim=True).expand_as(x)
            if biased:
                var = x.var(dim=-1, keepdim=True, correction=0) + 1e-10
            else:
                var = _unbiased_var(x, keepdim=True) + STD_EPS
            context = torch.cat([x, mean, torch.sqrt(var).expand_as(x)], dim=1)
        # tanh, not ReLU, in the attention MLP: ReLU converges badly here (WeSpeaker's note)
        alpha = torch.softmax(self.linear2(torch.tanh(self.linear1(context))), dim=2)
        mean = torch.sum(alpha * x, dim=2)
        var = torch.sum(alpha * x.square(), dim=2) - mean.square()
        std = torch.sqrt(var.clamp(min=1e-10 if biased else STD_EPS))
        return torch.cat([mean, std], dim=1)


@register_backbone("ecapa_tdnn")
class ECAPA_TDNN(nn.Module):
    """ECAPA-TDNN (Desplanques et al. 2020) as WeSpeaker's ``ECAPA_TDNN_GLOB``: [B, T, F] fbank -> [B, D].

    Conv1d(k5) stem, three SE-Res2Blocks (kernel 3, dilations 2, 3, 4, Res2 ``scale`` 8), multi-layer
    feature aggregation (concatenation + 1x1 conv to ``mfa_channels``, 1536 as in current WeSpeaker
    whatever ``channels``), attentive statistics pooling (with global context), BN, Linear to
    ``embedding_size`` (then BatchNorm1d ``bn2`` with ``emb_bn``, WeSpeaker's SSL option).
    ``channels`` 512 (6.2M parameters) or 1024 (14.7M). ``pooling_variance``: see the module docstring.
    """

    input_spec = AUDIO_INPUT_SPEC

    def __init__(
        self,
        channels: int = 512,
        embedding_size: int = 192,
        num_mel_bins: int = 80,
        scale: int = 8,
        se_bottleneck: int = 128,
        attention_bottleneck: int = 128,
        global_context: bool = True,
        mfa_channels: int = 1536,
        emb_bn: bool = False,
        pooling_variance: str = "unbiased",
    ) -> None:
        super().__init__()
        self.embedding_size = int(embedding_size)
        self.input_spec = _audio_spec(num_mel_bins)
        self.layer1 = Conv1dReluBn(num_mel_bins, channels, kernel_size=5)
        self.layer2 = SERes2Block(channels, 3, dilation=2, scale=scale, se_bottleneck=se_bottleneck)
        self.layer3 = SERes2Block(channels, 3, dilation=3, scale=scale, se_bottleneck=se_bottleneck)
        self.layer4 = SERes2Block(channels, 3, dilation=4, scale=scale, se_bottleneck=se_bottleneck)
        self.conv = nn.Conv1d(3 * channels, mfa_channels, kernel_size=1)
        self.pool = AttentiveStatsPool(mfa_channels, attention_bottleneck, global_context, pooling_variance)
        self.bn = nn.BatchNorm1d(2 * mfa_channels)
        self.linear = nn.Linear(2 * mfa_channels, embedding_size)
        self.bn2 = nn.BatchNorm1d(embedding_size) if emb_bn else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, num_mel_bins] -> [B, embedding_size]."""
        out1 = self.layer1(x.transpose(1, 2))
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        out = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
        return self.bn2(self.linear(self.bn(self.pool(out))))


ecapa_tdnn_c512 = register_variant(ECAPA_TDNN, "ecapa_tdnn_c512", channels=512)
ecapa_tdnn_c1024 = register_variant(ECAPA_TDNN, "ecapa_tdnn_c1024", channels=1024)


# ------------------------------------------------------------------------------------------ ResNet


class BasicBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, + (projected) shortcut, ReLU.

    [B, C, F, T] -> [B, planes, F / stride, T / stride].
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """conv1x1 - BN - ReLU - conv3x3(stride) - BN - ReLU - conv1x1 (x4 channels) - BN, + shortcut, ReLU.

    [B, C, F, T] -> [B, 4 * planes, F / stride, T / stride] (WeSpeaker's ResNet50 and deeper).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut = _shortcut(in_planes, planes * self.expansion, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        return F.relu(self.bn3(self.conv3(out)) + self.shortcut(x))


def _shortcut(in_planes: int, out_planes: int, stride: int) -> nn.Sequential:
    """Identity (an empty Sequential: no state) or strided conv1x1 + BN when the shape changes."""
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


@register_backbone("resnet_speaker")
class ResNetSpeaker(nn.Module):
    """WeSpeaker's ResNet: [B, T, F] fbank -> [B, embedding_size].

    The fbank is a one-channel image [B, 1, F, T]; conv3x3 stem (stride 1, no max-pool), ``block``
    stages (``"basic"``, or ``"bottleneck"`` with 4x wider outputs) at ``base_channels * (1, 2, 4, 8)``
    with strides 1, 2, 2, 2; frequency is folded into channels, then temporal statistics pooling
    (mean + std over time, WeSpeaker's TSTP; ``pooling_variance``: see the module docstring) and one
    Linear ``seg_1``. ``two_emb_layer``: ReLU, BatchNorm1d without affine (``seg_bn_1``) and a second
    Linear ``seg_2`` whose output is the embedding.
    """

    input_spec = AUDIO_INPUT_SPEC

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        base_channels: int = 32,
        embedding_size: int = 256,
        num_mel_bins: int = 80,
        block: str = "basic",
        two_emb_layer: bool = False,
        pooling_variance: str = "unbiased",
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers={list(layers)}: expected four positive block counts")
        if block not in BLOCKS:
            raise ValueError(f"block={block!r}: expected one of {sorted(BLOCKS)}")
        block_type = BLOCKS[block]
        self.embedding_size = int(embedding_size)
        self.input_spec = _audio_spec(num_mel_bins)
        self.pooling_variance = _check_pooling_variance(pooling_variance)
        self.two_emb_layer = bool(two_emb_layer)
        self.conv1 = nn.Conv2d(1, base_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        in_planes, freq = base_channels, num_mel_bins
        for i, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = base_channels * 2 ** i
            stage = [block_type(in_planes, planes, stride)]
            in_planes = planes * block_type.expansion
            stage += [block_type(in_planes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            freq = (freq - 1) // stride + 1
        self.seg_1 = nn.Linear(2 * in_planes * freq, embedding_size)
        if self.two_emb_layer:
            self.seg_bn_1 = nn.BatchNorm1d(embedding_size, affine=False)
            self.seg_2 = nn.Linear(embedding_size, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, num_mel_bins] -> [B, embedding_size]."""
        out = F.relu(self.bn1(self.conv1(x.transpose(1, 2).unsqueeze(1))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        embedding = self.seg_1(_mean_std(out.flatten(1, 2), self.pooling_variance))
        if self.two_emb_layer:
            embedding = self.seg_2(self.seg_bn_1(F.relu(embedding)))
        return embedding


@register_backbone("resnet34_speaker")
class ResNet34Speaker(ResNetSpeaker):
    """:class:`ResNetSpeaker` with BasicBlocks (3, 4, 6, 3): WeSpeaker's ResNet34 (6.6M parameters)."""

    def __init__(self, base_channels: int = 32, embedding_size: int = 256, num_mel_bins: int = 80,
                 two_emb_layer: bool = False, pooling_variance: str = "unbiased") -> None:
        super().__init__((3, 4, 6, 3), base_channels, embedding_size, num_mel_bins, "basic", two_emb_layer,
                         pooling_variance)


# WeSpeaker's deep Bottleneck ResNets (ResNet221: 23.8M parameters, ResNet293: 28.6M)
resnet221_speaker = register_variant(ResNetSpeaker, "resnet221_speaker", layers=(6, 16, 48, 3),
                                     block="bottleneck")
resnet293_speaker = register_variant(ResNetSpeaker, "resnet293_speaker", layers=(10, 20, 64, 3),
                                     block="bottleneck")
