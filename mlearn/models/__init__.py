"""Backbones (face and speaker) and their registry: ``build_backbone(name, **kw)``, ``list_backbones()``.

Importing this package registers every built-in backbone; ``timm/<model_name>`` builds any timm model.
"""
from mlearn.models.backbone import (
    BACKBONES,
    TimmBackbone,
    build_backbone,
    list_backbones,
    register_backbone,
    register_variant,
)
from mlearn.models.face import IResNet, MobileFaceNet, convert_insightface_iresnet
from mlearn.models.speaker import ECAPA_TDNN, ResNet34Speaker, ResNetSpeaker

__all__ = [
    "BACKBONES", "ECAPA_TDNN", "IResNet", "MobileFaceNet", "ResNet34Speaker", "ResNetSpeaker", "TimmBackbone",
    "build_backbone", "convert_insightface_iresnet", "list_backbones", "register_backbone",
    "register_variant",
]
