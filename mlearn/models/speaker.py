"""Speaker backbones over log-mel filterbanks: ECAPA-TDNN and a ResNet (WeSpeaker layouts).

Input: Kaldi-style fbank features [B, T, num_mel_bins] (25 ms windows, 10 ms shift, 16 kHz audio,
per-utterance mean-normalised over time); output: raw embeddings [B, embedding_size]. Module names
follow WeSpeaker's so its checkpoints load after dropping their ``projection.*`` (margin head) keys.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mlearn.data.audio.fbank import fbank_spec
from mlearn.models.backbone import register_backbone, register_variant


def _audio_spec(num_mel_bins: int) -> Dict[str, Any]:
    """The input spec recorded at export: every Kaldi fbank option (Hamming window, not Kaldi's povey
    default; dither 0 at inference; int16-range input scale; CMN), so that consumers can rebuild the
    front-end exactly."""
    return {"modality": "audio", **fbank_spec({"num_mel_bins": num_mel_bins}),
            "layout": "[B, T, num_mel_bins]"}


AUDIO_INPUT_SPEC: Dict[str, Any] = _audio_spec(80)


def _mean_std(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """[B, C, T] -> [B, 2C]: mean and standard deviation over time (population variance: T=1 is valid)."""
    return torch.cat([x.mean(dim=-1), torch.sqrt(x.var(dim=-1, correction=0) + eps)], dim=1)


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

    With ``global_context`` the attention also sees the utterance's mean and std at every frame.
    """

    def __init__(self, in_dim: int, bottleneck: int = 128, global_context: bool = True) -> None:
        super().__init__()
        self.global_context = global_context
        self.linear1 = nn.Conv1d(in_dim * 3 if global_context else in_dim, bottleneck, kernel_size=1)
        self.linear2 = nn.Conv1d(bottleneck, in_dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = x
        if self.global_context:
            mean = x.mean(dim=-1, keepdim=True).expand_as(x)
            std = torch.sqrt(x.var(dim=-1, keepdim=True, correction=0) + 1e-10).expand_as(x)
            context = torch.cat([x, mean, std], dim=1)
        # tanh, not ReLU, in the attention MLP: ReLU converges badly here (WeSpeaker's note)
        alpha = torch.softmax(self.linear2(torch.tanh(self.linear1(context))), dim=2)
        mean = torch.sum(alpha * x, dim=2)
        std = torch.sqrt((torch.sum(alpha * x * x, dim=2) - mean * mean).clamp(min=1e-10))
        return torch.cat([mean, std], dim=1)


@register_backbone("ecapa_tdnn")
class ECAPA_TDNN(nn.Module):
    """ECAPA-TDNN (Desplanques et al. 2020) as WeSpeaker's ``ECAPA_TDNN_GLOB``: [B, T, F] fbank -> [B, D].

    Conv1d(k5) stem, three SE-Res2Blocks (kernel 3, dilations 2, 3, 4, Res2 ``scale`` 8), multi-layer
    feature aggregation (concatenation + 1x1 conv to ``mfa_channels``, 1536 as in current WeSpeaker
    whatever ``channels``), attentive statistics pooling (with global context), BN, Linear to
    ``embedding_size``. ``channels`` 512 (6.2M parameters) or 1024 (14.7M).
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
    ) -> None:
        super().__init__()
        self.embedding_size = int(embedding_size)
        self.input_spec = _audio_spec(num_mel_bins)
        self.layer1 = Conv1dReluBn(num_mel_bins, channels, kernel_size=5)
        self.layer2 = SERes2Block(channels, 3, dilation=2, scale=scale, se_bottleneck=se_bottleneck)
        self.layer3 = SERes2Block(channels, 3, dilation=3, scale=scale, se_bottleneck=se_bottleneck)
        self.layer4 = SERes2Block(channels, 3, dilation=4, scale=scale, se_bottleneck=se_bottleneck)
        self.conv = nn.Conv1d(3 * channels, mfa_channels, kernel_size=1)
        self.pool = AttentiveStatsPool(mfa_channels, attention_bottleneck, global_context)
        self.bn = nn.BatchNorm1d(2 * mfa_channels)
        self.linear = nn.Linear(2 * mfa_channels, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, num_mel_bins] -> [B, embedding_size]."""
        out1 = self.layer1(x.transpose(1, 2))
        out2 = self.layer2(out1)
        out3 = self.layer3(out2)
        out4 = self.layer4(out3)
        out = F.relu(self.conv(torch.cat([out2, out3, out4], dim=1)))
        return self.linear(self.bn(self.pool(out)))


ecapa_tdnn_c512 = register_variant(ECAPA_TDNN, "ecapa_tdnn_c512", channels=512)
ecapa_tdnn_c1024 = register_variant(ECAPA_TDNN, "ecapa_tdnn_c1024", channels=1024)


# ------------------------------------------------------------------------------------------ ResNet


class BasicBlock(nn.Module):
    """conv3x3(stride) - BN - ReLU - conv3x3 - BN, + (projected) shortcut, ReLU.

    [B, C, F, T] -> [B, C', F / stride, T / stride].
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + self.shortcut(x))


@register_backbone("resnet_speaker")
class ResNetSpeaker(nn.Module):
    """WeSpeaker's ResNet: [B, T, F] fbank -> [B, embedding_size].

    The fbank is a one-channel image [B, 1, F, T]; conv3x3 stem (stride 1, no max-pool), BasicBlock
    stages at ``base_channels * (1, 2, 4, 8)`` with strides 1, 2, 2, 2; frequency is folded into
    channels, then temporal statistics pooling (mean + std over time) and one Linear.
    """

    input_spec = AUDIO_INPUT_SPEC

    def __init__(
        self,
        layers: Sequence[int] = (3, 4, 6, 3),
        base_channels: int = 32,
        embedding_size: int = 256,
        num_mel_bins: int = 80,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers={list(layers)}: expected four positive block counts")
        self.embedding_size = int(embedding_size)
        self.input_spec = _audio_spec(num_mel_bins)
        self.conv1 = nn.Conv2d(1, base_channels, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(base_channels)
        in_planes, freq = base_channels, num_mel_bins
        for i, (blocks, stride) in enumerate(zip(layers, (1, 2, 2, 2))):
            planes = base_channels * 2 ** i
            stage = [BasicBlock(in_planes, planes, stride)]
            stage += [BasicBlock(planes, planes) for _ in range(blocks - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*stage))
            in_planes, freq = planes, (freq - 1) // stride + 1
        self.seg_1 = nn.Linear(2 * in_planes * freq, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, T, num_mel_bins] -> [B, embedding_size]."""
        out = F.relu(self.bn1(self.conv1(x.transpose(1, 2).unsqueeze(1))))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.seg_1(_mean_std(out.flatten(1, 2)))


@register_backbone("resnet34_speaker")
class ResNet34Speaker(ResNetSpeaker):
    """:class:`ResNetSpeaker` with BasicBlocks (3, 4, 6, 3): WeSpeaker's ResNet34 (6.6M parameters)."""

    def __init__(self, base_channels: int = 32, embedding_size: int = 256, num_mel_bins: int = 80) -> None:
        super().__init__((3, 4, 6, 3), base_channels, embedding_size, num_mel_bins)
