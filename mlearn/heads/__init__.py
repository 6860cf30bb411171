"""Margin heads (cosine -> logits), loss criteria (:mod:`mlearn.heads.criteria`) and the Partial FC
classifier (sharded, sampled class centers; exact loss computed over class blocks by
:mod:`mlearn.heads.chunked`)."""

from mlearn.heads.criteria import (
    UNPG,
    Criterion,
    LogSphericalSoftmax,
    LogTaylorSoftmax,
    SphereFace2,
    UniFace,
    ZLoss,
    build_criterion,
    list_criteria,
    register_criterion,
)
from mlearn.heads.margins import (
    AdaFace,
    ArcFace,
    CircleMargin,
    CombinedMargin,
    CosFace,
    CurricularFace,
    ElasticArcFace,
    ElasticCosFace,
    Margin,
    Softmax,
    build_margin,
    list_margins,
    register_margin,
)
from mlearn.heads.partial_fc import PartialFC

__all__ = [
    "AdaFace",
    "ArcFace",
    "CircleMargin",
    "CombinedMargin",
    "CosFace",
    "Criterion",
    "CurricularFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "LogSphericalSoftmax",
    "LogTaylorSoftmax",
    "Margin",
    "PartialFC",
    "Softmax",
    "SphereFace2",
    "UNPG",
    "UniFace",
    "ZLoss",
    "build_criterion",
    "build_margin",
    "list_criteria",
    "list_margins",
    "register_criterion",
    "register_margin",
]
